"""Cost, budgets, accounting and learning from history, in store jobs. The arithmetic is `core.accounting`'s.

Rules:
- An allocation's charges are fixed when it is granted: what it holds, as what kind (a CPU slot counts as its
  cores), in which pool, at the price per unit-hour of that moment. Later price changes apply to later grants.
- Budgets are checked when a request arrives: a tool, owner or pool whose hard limit is spent for the current
  period (local calendar day, ISO week, month) is refused with BUDGET_EXCEEDED. Allocations already granted
  keep running. The soft threshold raises a `budget` alert (warning; error once the limit is spent) that
  resolves when a new period starts or the budget is raised.
- Regular users see their own allocations in `usage`; root, the daemon's user and the admin group see all.
- What a holder used is what it reported at release (`mcpctl run` reports its command's rusage), else what the
  daemon sampled of the holder's process tree while it ran.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from datetime import datetime
from typing import TYPE_CHECKING, Any, cast

from mcpresd.core import accounting
from mcpresd.core import alerts as alerting
from mcpresd.core.accounting import Budget, Charge, UsageRecord, cost_per_hour
from mcpresd.core.errors import BudgetExceeded, DomainError, InvalidRequest, PermissionDenied
from mcpresd.core.model import Allocation, AllocationItem, Demand
from mcpresd.core.pools import utilisation
from mcpresd.protocol import POOL_PREFIX, BudgetScope, Period, PoolState

if TYPE_CHECKING:
    from mcpresd import params as p
    from mcpresd.service import Broker, Caller

BUDGET_CHECK_INTERVAL_S = 5.0
OPTIMISE_INTERVAL_S = 300.0
"""How often the re-optimisation pass looks for allocations holding far more than they use."""
_ADJECTIVE = {Period.DAY: "daily", Period.WEEK: "weekly", Period.MONTH: "monthly"}
HISTORY_RUNS = 50


class Accounts:
    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.budgets: dict[tuple[str, str, str], Budget] = {}
        self.measured: dict[str, dict[str, float]] = {}
        """What the daemon sampled of each active allocation's holder, by allocation id."""
        self._ended = 0
        self._ended_cost: dict[tuple[str, str, str], tuple[float, float]] = {}
        """Per budget: its period's start and what allocations that ended in it cost in it."""
        self._durations: dict[str, tuple[int, float | None, int]] = {}
        self._last_check = -math.inf
        self._last_pass = broker.clock()
        self._last_found: list[str] = []
        self._cpu_base: dict[str, float] = {}
        self._folded: dict[str, dict[str, float]] = {}
        """The figures last folded per allocation (a cgroup backend hands back the same dict while nothing changed)."""
        self._gpu_samples: dict[str, int] = {}
        self.load()

    def load(self) -> None:
        self.budgets = {}
        for scope, subject, period, limit, soft in self.broker.store.load_budgets():
            budget = Budget(BudgetScope(scope), subject, limit, Period(period), soft)
            self.budgets[_key(budget)] = budget
        self._ended_cost = {}

    # -- charges and records -----------------------------------------------------

    def charges(self, items: Iterable[AllocationItem]) -> tuple[Charge, ...]:
        """What each granted item costs per hour and counts as (a pool slot as its share of the parent)."""
        ledger = self.broker.ledger
        charges = []
        for item in items:
            resource = ledger.find(item.resource)
            if resource is None:
                continue
            pool = ledger.pool_of(resource.name)
            kind, amount = resource.type.value, item.amount
            share = resource.labels.get("slot_size")
            parent_kind = resource.labels.get("kind")
            if resource.source == "pool" and isinstance(parent_kind, str) and isinstance(share, (int, float)):
                kind, amount = parent_kind, item.amount * float(share)
            unit_cost = resource.cost_per_unit_hour
            if unit_cost is None and pool is not None:
                pool_cost = ledger.pools[pool].spec.cost_per_unit_hour
                unit_cost = None if pool_cost is None else pool_cost / resource.capacity
            charges.append(Charge(resource.name, kind, amount, item.amount * (unit_cost or 0.0), pool))
        return tuple(charges)

    def record(self, allocation: Allocation) -> UsageRecord:
        measured = allocation.measured if allocation.measured is not None else self.measured.get(allocation.id, {})
        return UsageRecord(allocation.id, allocation.tool_id, allocation.owner_uid, allocation.created_at,
                           allocation.granted_at, allocation.released_at, allocation.charges, dict(measured))

    def cost_of(self, allocation: Allocation, now: float) -> float | None:
        """What the allocation has cost so far (final once released); None where nothing is charged.

        `UsageRecord.cost` without building the record: this is on every reply.
        """
        granted_at = allocation.granted_at
        if granted_at is None or not allocation.charges:
            return None
        end = now if allocation.released_at is None else allocation.released_at
        return round(cost_per_hour(allocation.charges) * (max(0.0, end - granted_at) / 3600), 6)

    def ended(self, allocation: Allocation, reported: dict[str, float] | None) -> Allocation:
        """The ended allocation with what its holder used (reported wins over sampled); forget the samples."""
        sampled = self.measured.pop(allocation.id, None)
        self._folded.pop(allocation.id, None)
        self._cpu_base.pop(allocation.id, None)
        self._gpu_samples.pop(allocation.id, None)
        self._ended += 1
        measured = {**(sampled or {}), **(reported or {})}
        ended = allocation.changed(measured=measured) if measured and allocation.granted_at is not None else allocation
        record = self.record(ended)
        self.broker.store.end_usage(record)
        now = self.broker.clock()
        for key, (start, spent) in self._ended_cost.items():
            # The budget's ended part takes what the live part had of it: summed again only for a new period.
            budget = self.budgets.get(key)
            if budget is not None and budget.applies_to(record):
                self._ended_cost[key] = (start, spent + accounting.spent(budget, [record], now))
        return ended

    def report(self, allocation: Allocation, measured: dict[str, float]) -> Allocation:
        """A measurement reported for an allocation that has already ended: it wins over what was sampled."""
        reported = allocation.changed(measured={**(allocation.measured or {}), **measured})
        self.broker.store.set_measured(allocation.id, reported.measured)
        self.broker.store.add_usage(self.record(allocation), -1)
        self.broker.store.add_usage(self.record(reported))
        self._ended += 1
        return reported

    def sampled(self, usage: dict[str, dict[str, float]], readings: dict[str, dict[str, Any]] | None = None) -> None:
        """Fold one round of samples into each active allocation's figures.

        CPU seconds count from the first sample (what the holder used before is not this allocation's);
        memory keeps its peak; GPU utilisation is the running mean over the GPUs it holds whole. A cgroup's other
        figures (memory now, OOM kills, memory.events counts, pressure) are its own since it was made: the last
        read is kept.
        """
        folded = self._folded
        for allocation_id, figures in usage.items():
            if folded.get(allocation_id) is figures:
                continue  # the same figures as the round before (an unchanged cgroup): folding them changes nothing
            allocation = self.broker.live.get(allocation_id)
            if allocation is None or not allocation.is_active:
                continue
            folded[allocation_id] = figures
            kept = self.measured.setdefault(allocation_id, {})
            for key, value in figures.items():
                if key == "cpu_seconds":
                    base = self._cpu_base.setdefault(allocation_id, value)
                    kept[key] = max(0.0, value - base)
                elif key.endswith("_peak"):
                    kept[key] = max(kept.get(key, 0.0), value)
                else:
                    kept[key] = value
        if readings is None or not any("utilisation" in values for values in readings.values()):
            return  # no GPU utilisation read this round: nothing to average (and no pass over every allocation)
        for allocation in self.broker.active_on_gpus():
            gpus = [c.resource for c in allocation.charges if c.kind == "gpu" and c.amount >= 1]
            values = [v for g in gpus if isinstance(v := readings.get(g, {}).get("utilisation"), (int, float))]
            if gpus and len(values) == len(gpus):
                kept = self.measured.setdefault(allocation.id, {})
                count = self._gpu_samples.get(allocation.id, 0)
                mean = kept.get("gpu_utilisation", 0.0)
                kept["gpu_utilisation"] = (mean * count + sum(values) / len(values) / 100) / (count + 1)
                self._gpu_samples[allocation.id] = count + 1

    def holders(self) -> dict[str, int]:
        """Active allocations held by a process: what the sampler reads."""
        return self.broker.held_by_pid()  # an index the broker keeps: a pass over 10,000 took 5 ms a round

    # -- budgets ----------------------------------------------------------------

    def check(self, caller_uid: int, tool_id: str | None, demands: Iterable[Demand]) -> None:
        """Refuse a new request that a spent budget covers."""
        if not self.budgets:
            return
        now = self.broker.clock()
        request_pools = self.request_pools(demands) if any(
            b.scope is BudgetScope.POOL for b in self.budgets.values()) else []
        for budget in self.budgets.values():
            applies = ((budget.scope is BudgetScope.TOOL and tool_id == budget.subject)
                       or (budget.scope is BudgetScope.OWNER and str(caller_uid) == budget.subject)
                       or (budget.scope is BudgetScope.POOL and budget.subject in request_pools))
            if not applies:
                continue
            spent = self.spent(budget, now)
            if accounting.budget_state(budget, spent) == "exceeded":
                _, end = accounting.period_bounds(budget.period, now)
                raise BudgetExceeded(
                    f"the {_ADJECTIVE[budget.period]} budget of {budget.scope.value} {budget.subject} is spent"
                    f" ({spent:.4g} of {budget.limit:g}); it resets at {_local(end)}"
                    " (`mcpctl budgets` shows it)",
                    scope=budget.scope.value, subject=budget.subject, period=budget.period.value,
                    spent=round(spent, 6), limit=budget.limit, resets_at=end)

    def spent(self, budget: Budget, now: float) -> float:
        start, _ = accounting.period_bounds(budget.period, now)
        key = _key(budget)
        cached = self._ended_cost.get(key)
        if cached is not None and cached[0] == start:
            ended_part = cached[1]
        else:
            tallies = self._ended_usage({}, budget.scope.value, start, now, key=budget.subject)[0]
            ended_part = tallies[budget.subject].cost if budget.subject in tallies else 0.0
            self._ended_cost[key] = (start, ended_part)
        live = [self.record(a) for a in self.broker.live.values() if a.is_active]
        return ended_part + accounting.spent(budget, live, now)

    def tick(self, now: float) -> None:
        """Raise or resolve each budget's alert (every few seconds); run the re-optimisation pass (every few minutes)."""
        if now - self._last_pass >= OPTIMISE_INTERVAL_S:
            self._last_pass = now
            self._report(now)
        if not self.budgets or now - self._last_check < BUDGET_CHECK_INTERVAL_S:
            return
        self._last_check = now
        for budget in self.budgets.values():
            self._alert(budget, now)

    def _report(self, now: float) -> None:
        """The periodic re-optimisation pass: an `optimise.report` event when it finds something new."""
        report = self.optimise(None)
        found = sorted([f"{o['allocation_id']}:{o['kind']}" for o in report["oversized"]]
                       + [f"pool:{c['pool']}:{c['could_remove']}" for c in report["consolidate"]])
        if found and found != self._last_found:
            live = self.broker.live
            oversized = [{**o, "owner_uid": live[o["allocation_id"]].owner_uid} for o in report["oversized"]
                         if o["allocation_id"] in live]  # the owner: a user sees only their own in the event
            self.broker._event(now, "optimise.report", detail={
                "oversized": oversized, "consolidate": report["consolidate"], "note": report["note"]})
        self._last_found = found

    def _alert(self, budget: Budget, now: float) -> None:
        spent = self.spent(budget, now)
        state = accounting.budget_state(budget, spent)
        level = {"ok": None, "soft": alerting.Level.WARNING, "exceeded": alerting.Level.ERROR}[state]
        self.broker.monitor.condition("budget", _alert_resource(budget), level, round(spent, 6), now, {
            "scope": budget.scope.value, "subject": budget.subject, "period": budget.period.value,
            "limit": budget.limit, "soft": budget.soft, "spent": round(spent, 6), "state": state})

    def set_budget(self, caller: Caller, command: p.SetBudgetCommand) -> dict[str, Any]:
        _administer(caller, "set budgets")
        budget = Budget(command.key.scope, command.key.subject, command.limit, command.key.period, command.soft)
        try:
            budget.validate()
        except ValueError as error:
            raise InvalidRequest(str(error)) from None
        now = self.broker.clock()
        self.budgets[_key(budget)] = budget
        self._ended_cost.pop(_key(budget), None)
        self.broker.store.save_budget((budget.scope.value, budget.subject, budget.period.value, budget.limit,
                                       budget.soft), now)
        self.broker._event(now, "budget.set", uid=caller.uid, detail={
            "scope": budget.scope.value, "subject": budget.subject, "period": budget.period.value,
            "limit": budget.limit, "soft": budget.soft})
        self._alert(budget, now)
        return accounting.budget_dict(budget, self.spent(budget, now), now)

    def delete_budget(self, caller: Caller, key: p.BudgetKey) -> dict[str, Any]:
        _administer(caller, "delete budgets")
        budget = self.budgets.get((key.scope.value, key.subject, key.period.value))
        if budget is None:
            raise InvalidRequest(f"no {_ADJECTIVE[key.period]} budget for {key.scope.value} {key.subject}"
                                 " (see `mcpctl budgets`)", scope=key.scope.value, subject=key.subject)
        now = self.broker.clock()
        shown = accounting.budget_dict(budget, self.spent(budget, now), now)
        del self.budgets[_key(budget)]
        self._ended_cost.pop(_key(budget), None)
        self.broker.store.delete_budget(key.scope.value, key.subject, key.period.value)
        self.broker.monitor.condition("budget", _alert_resource(budget), None, shown["spent"], now,
                                      {"why": "the budget was deleted"})
        self.broker._event(now, "budget.deleted", uid=caller.uid, detail={
            "scope": budget.scope.value, "subject": budget.subject, "period": budget.period.value})
        return shown

    def list_budgets(self, caller: Caller) -> list[dict[str, Any]]:
        """Every budget; to a user who does not administer, owner budgets of their own uid only (the rest is others'
        spending)."""
        now = self.broker.clock()
        return [accounting.budget_dict(b, self.spent(b, now), now) for b in self.budgets.values()
                if caller.administers or b.scope is not BudgetScope.OWNER or b.subject == str(caller.uid)]

    # -- accounting and learning --------------------------------------------------

    def usage(self, caller: Caller, command: p.UsageCommand) -> dict[str, Any]:
        now = self.broker.clock()
        by = cast("accounting.UsageBy", command.by)
        owner = None if caller.administers else caller.uid
        tallies, since = self._ended_usage({}, by, now - command.since, now, owner)
        live = [self.record(a) for a in self.broker.live.values() if owner is None or a.owner_uid == owner]
        rows = accounting.rows_of(accounting.usage_tallies(live, by, since, now, tallies))
        totals = accounting.usage_totals(rows)
        if by == "resource":
            # An allocation is in the row of every resource it holds: counted once, as its tool's row counts it.
            per_tool = self._ended_usage({}, "tool", now - command.since, now, owner)[0]
            once = accounting.usage_totals(accounting.rows_of(accounting.usage_tallies(live, "tool", since, now,
                                                                                       per_tool)))
            totals.update({field: once[field] for field in ("allocations", "active", "waited_s", "mean_wait_s")})
        return {"by": command.by, "since": since, "until": now, "rows": rows, "totals": totals}

    def _ended_usage(self, tallies: dict[str, Any], by: str, since: float, now: float, owner: int | None = None,
                     key: str | None = None) -> tuple[dict[str, Any], float]:
        """Add ended allocations' usage in [since, now] to `tallies`, from the hourly totals; returns them and the
        window's start.

        Whole hours come from the totals; the hour `since` falls in takes the part after `since` of what was
        held through it, and reads the few allocations that began or ended in it. Where that hour's
        allocations may have been pruned, the window starts at the top of the hour instead.
        """
        store = self.broker.store
        hour = math.floor(since / accounting.USAGE_HOUR) * accounting.USAGE_HOUR
        if since < self.pruned_before(now):
            since = hour
        start = hour if hour == since else hour + accounting.USAGE_HOUR
        accounting.add_totals(tallies, store.usage_totals(by, start, owner, key))
        if start > since:
            fraction = (start - since) / accounting.USAGE_HOUR
            accounting.add_totals(tallies, store.usage_totals(by, hour, owner, key, through_hour=hour), fraction)
            records = [r for r in store.ended_within_hour(hour, start) if owner is None or r.owner_uid == owner]
            accounting.ended_part_tallies(records, cast("accounting.UsageBy", by), since, start, tallies)
        return tallies, since

    def pruned_before(self, now: float) -> float:
        """Allocations that ended before this may have been pruned (retention)."""
        before = self.broker.policy.retention.allocations_before(now)
        return -math.inf if before is None else before

    def recommend(self, caller: Caller, command: p.RecommendCommand) -> dict[str, Any]:
        # As `usage`: a user who does not administer learns from their own runs only, not from other users'.
        owner = None if caller.administers else caller.uid
        runs = self.broker.store.recent_runs(command.tool_id, command.runs, owner)
        return accounting.recommend(command.tool_id, [self.record(a) for a in runs], self.broker.clock(),
                                    command.runs)

    def expected_end(self, allocation: Allocation, named: bool = True) -> tuple[float | None, str]:
        """For `explain`: its TTL, else when its tool's runs usually end (the median of its recent durations).

        Not `named`: the basis does not name the tool (another user's allocation)."""
        if allocation.expires_at is not None:
            return allocation.expires_at, "its TTL"
        if allocation.tool_id is None or allocation.granted_at is None:
            return None, ""
        cached = self._durations.get(allocation.tool_id)
        if cached is None or cached[0] != self._ended:
            runs = self.broker.store.recent_runs(allocation.tool_id, HISTORY_RUNS)
            durations = [a.released_at - a.granted_at for a in runs
                         if a.released_at is not None and a.granted_at is not None]
            median = accounting.percentile(durations, 50) if len(durations) >= accounting.MIN_RUNS else None
            cached = (self._ended, median, len(durations))
            self._durations[allocation.tool_id] = cached
        _, median, count = cached
        if median is None:
            return None, ""
        now = self.broker.clock()
        end = max(now, allocation.granted_at + median)
        tool = allocation.tool_id if named else "its tool"
        return end, f"{tool} usually runs {median:.0f}s (median of {count} runs)"

    def optimise(self, caller: Caller | None) -> dict[str, Any]:
        """Allocations holding far more than they use and pools that could shrink; None: everyone's."""
        now = self.broker.clock()
        active = [a for a in self.broker.live.values() if a.is_active]
        if caller is not None and not caller.administers:
            active = [a for a in active if a.owner_uid == caller.uid]
        oversized = accounting.oversized([self.record(a) for a in active], now)
        consolidate = []
        pools = self.broker.pools
        for name, pool in pools.pools.items():
            if pool.state is not PoolState.ACTIVE:
                continue
            load = pools.load_of(pool)
            fraction = utilisation(load)
            spare = len(load.idle) - max(0, math.ceil((load.busy + load.queued) / pool.spec.scale.target)
                                         - load.busy) if load.size else 0
            floor = pool.spec.min_size if pool.makes_members else 0
            could_remove = max(0, min(spare, load.size - max(floor, load.busy)))
            if could_remove > 0 and fraction < pool.spec.scale.down_at:
                consolidate.append({
                    "pool": name, "size": load.size, "busy": load.busy, "idle": len(load.idle),
                    "could_remove": could_remove,
                    "reason": f"{load.busy} of {load.size} members busy ({fraction:.0%}); {could_remove} idle"
                              f" member(s) could go" + ("" if pool.makes_members else
                                                        " (a static pool: remove them from its list)")})
        return {"ts": now, "oversized": oversized, "consolidate": consolidate,
                "note": "a report only: nothing running is moved or resized"}

    def request_pools(self, demands: Iterable[Demand]) -> list[str]:
        names: list[str] = []
        for demand in demands:
            if demand.selector.startswith(POOL_PREFIX):
                try:
                    names += [p.name for p in self.broker.ledger.matched_pools(demand.selector)]
                except DomainError:
                    pass
        return names


def _local(ts: float) -> str:
    return datetime.fromtimestamp(ts).astimezone().isoformat(timespec="minutes")


def _key(budget: Budget) -> tuple[str, str, str]:
    return (budget.scope.value, budget.subject, budget.period.value)


def _alert_resource(budget: Budget) -> str:
    return f"budget:{budget.scope.value}/{budget.subject}/{budget.period.value}"


def _administer(caller: Caller, what: str) -> None:
    if not caller.administers:
        raise PermissionDenied(f"only root, the daemon's user and the admin group may {what}", uid=caller.uid)
