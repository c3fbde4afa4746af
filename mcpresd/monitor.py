"""The monitor: samples in, history, alerts, health and forecasts out.

Rules:
- Runs in store jobs as part of the broker (`Broker.monitor`); `record()`
  is one sampling round, in the same transaction as everything else.
- Per resource it stores the measured values and `utilisation_rate`
  (allocated / capacity, in %). A value the device does not offer is stored as
  'unsupported', a failed read as 'unknown', never as 0.
- A round costs what changed, not how many resources exist (a registry of
  100,000 custom resources must not stall the daemon every second):
  `utilisation_rate` is stored every round for the host's sampled resources
  and for every resource with an open alert; for any other resource when its
  allocated share changes (held, changed, fallen idle): its history is a step
  line, each point holding until the next. A resource never held has no
  history; `metrics.current` still gives every resource's rate. Alert rules are
  evaluated where a value was stored this round or an alert is open, which
  decides the same as evaluating every resource every round: an unchanged value
  with no open alert cannot open one it did not open before. Health is scored
  where there is something to score; a resource with nothing against it scores
  100.
- History: raw samples for `raw_max_age` (at most `raw_points` per metric) and
  1-minute roll-ups (min, max, avg, count) for `rollup_max_age`; a minute is
  rolled up once it is over; `retain()` enforces both.
- Alerts follow `mcpresd.core.alerts`; a transition that notifies becomes an
  event (`alert.firing`, `alert.level`, `alert.resolved`), and a firing alert
  names the allocations holding the resource, largest first.
- Foreign GPU use (`mcpresd.core.risk.foreign_gpu_use`): each (GPU, pid) spell
  is one `foreign_gpu_use` event, and a GPU with any foreign process has a
  `foreign-gpu-use` alert (value: how many), naming the allocations concerned
  and the pids, resolved when none is left. Membership comes from the cgroups
  the sampler read (`members`) and from the holders' process trees.
- Health (`mcpresd.core.health`) is scored every `health_interval`; a resource
  below `health_threshold` is not granted until it recovers (events both ways).
- Forecasts: a linear fit over `forecast_window` of raw samples. Every minute the
  monitor also forecasts each utilisation `forecast_horizon` ahead and scores
  those forecasts when their time comes (MAPE), so every forecast carries its
  track record.
"""

from __future__ import annotations

import json
import math
from collections import deque
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any

from mcpresd.core import alerts as alerting
from mcpresd.core import forecast as forecasting
from mcpresd.core import health as healthing
from mcpresd.core.ledger import Ledger, Observation
from mcpresd.core.risk import (
    ForeignSpells,
    ForeignUse,
    GpuProcess,
    GpuReading,
    belongs_to,
    foreign_gpu_use,
    foreign_processes,
    risk_notes,
)
from mcpresd.core.rollup import minute_of, retention_cutoffs, roll_up
from mcpresd.store import MetricStore

if TYPE_CHECKING:
    from mcpresd.service import Broker

Value = float | str | None
Readings = dict[str, dict[str, Value]]
UNSUPPORTED = "unsupported"


CONDITIONS = ("budget", "pool-factory", "overuse", "foreign-gpu-use")
"""Alert rules the broker raises itself (`Monitor.condition`), beside the configured metric rules."""


@dataclass(frozen=True)
class MonitorPolicy:
    interval: float = 5.0
    raw_max_age: float = 3600.0
    raw_points: int = 1000
    rollup_max_age: float = 86400.0
    health_interval: float = 30.0
    health_threshold: int = 50
    forecast_window: float = 1800.0
    forecast_horizon: float = 300.0
    rules: tuple[alerting.AlertRule, ...] = field(default_factory=alerting.default_rules)


def _block_reason(health: healthing.Health) -> str:
    return f"health score {health.score}: {'; '.join(health.reasons) or 'recovered'}"


_HEALTH_FACTS = frozenset({"utilisation", "throttle_reasons", "foreign_memory"})
"""The sampled metrics a health score reads (a resource with none of them, and nothing else against it, scores 100)."""


@dataclass
class _Open:
    id: int | None
    alert: alerting.Alert


class Monitor:
    def __init__(self, broker: Broker, policy: MonitorPolicy) -> None:
        self.broker = broker
        self.policy = policy
        self.metrics = MetricStore(broker.store.conn)
        self.latest: Readings = {}
        self.latest_ts: float | None = None
        self.alerts: dict[tuple[str, str], _Open] = {}
        self.health: dict[str, healthing.Health] = {}
        self.healthy: dict[str, bool] = {}
        self._errors: dict[str, int] = {}
        self._window: dict[str, deque[float]] = {}
        self._rates: dict[str, float] = {}
        """The utilisation_rate last stored per resource (0 for an idle one seen but never held)."""
        self._rates_nonzero: set[str] = set()
        """Resources whose last stored utilisation_rate was not 0 (they get a row when they fall idle)."""
        self._rates_scanned: tuple[Ledger, int] | None = None
        """The ledger and its catalogue_version when every resource was last looked at (`Broker.reload` builds a
        new ledger, which counts afresh: both must match)."""
        self._last_health = -math.inf
        # The newest stored minute was still in progress when the daemon stopped: roll it up once it is over.
        newest = self.metrics.newest_sample_ts()
        self._last_minute: float | None = None if newest is None else minute_of(newest)
        self._last_retain = -math.inf
        self._forecasts: list[tuple[str, str, forecasting.Forecast]] = []
        self._scored: dict[tuple[str, str], deque[tuple[float, float]]] = {}
        self._foreign = ForeignSpells()
        self.gpu_processes: dict[str, list[dict[str, Any]]] = {}
        """The latest round's compute processes per GPU: pid, used_memory, the allocations each belongs to and
        whether its use is foreign (what `metrics.current` shows and `mcpctl top` draws)."""
        self._load_open_alerts()

    def _load_open_alerts(self) -> None:
        rules = {r.name for r in self.policy.rules} | set(CONDITIONS)
        for row in self.metrics.alerts(include_resolved=False):
            if row["rule"] not in rules:
                continue
            alert = alerting.Alert(
                rule=row["rule"], resource=row["resource"], state=alerting.State(row["state"]),
                level=alerting.Level(row["level"]), since=row["since"], fired_at=row["fired_at"],
                last_value=row["last_value"], min=row["min"], max=row["max"],
                total=(row["avg"] or 0.0), count=1 if row["avg"] is not None else 0, unknown=row["unknown"],
            )
            self.alerts[(row["rule"], row["resource"])] = _Open(row["id"], alert)

    def reconfigure(self, policy: MonitorPolicy, now: float) -> list[str]:
        """A reload: take the new policy; alerts of rules no longer configured are resolved (if firing) or dropped."""
        if policy == self.policy:
            return []
        changes = [f"monitor {f.name}: {getattr(self.policy, f.name)} -> {getattr(policy, f.name)}"
                   for f in fields(MonitorPolicy) if f.name != "rules"
                   and getattr(self.policy, f.name) != getattr(policy, f.name)]
        before = {r.name: r for r in self.policy.rules}
        after = {r.name: r for r in policy.rules}
        changes += [f"alert rule {name} added" for name in sorted(after.keys() - before.keys())]
        changes += [f"alert rule {name} removed" for name in sorted(before.keys() - after.keys())]
        changes += [f"alert rule {name} changed" for name in sorted(before.keys() & after.keys())
                    if before[name] != after[name]]
        self.policy = policy
        if policy.rules != tuple(before.values()):
            self._rates.clear()  # new rules meet every resource's value once, at the next round
            self._rates_scanned = None
        for key, entry in list(self.alerts.items()):
            if key[0] not in after and key[0] not in CONDITIONS:
                del self.alerts[key]
                self._retire(entry, now)
        return changes

    def _retire(self, entry: _Open, now: float) -> None:
        alert = entry.alert
        if entry.id is None:
            return
        if alert.state is not alerting.State.FIRING:
            self.metrics.conn.execute("DELETE FROM alerts WHERE id = ?", (entry.id,))
            return
        entry.alert = replace(alert, state=alerting.State.RESOLVED, resolved_at=now)
        self._save(entry, None)
        self.broker.emit(now, "alert.resolved", resource=alert.resource, detail={
            "alert_id": entry.id, "rule": alert.rule, "level": (alert.level or alerting.Level.INFO).value,
            "value": alert.last_value, "why": "its rule was removed from the config"})

    # -- one sampling round -----------------------------------------------

    def record(self, now: float, readings: Readings,
               gpu_processes: dict[str, list[tuple[int | None, int | None, tuple[int, ...]]]] | None = None,
               members: dict[int, str] | None = None) -> None:
        """One sampling round; `members` maps GPU processes' pids to the allocation whose cgroup holds them."""
        first_seen_idle = self._add_utilisation_rates(readings)
        rows: list[tuple[str, str, float, float | None, str]] = []
        for resource_name, values in readings.items():
            for metric, value in values.items():
                if isinstance(value, float) and math.isfinite(value):
                    rows.append((resource_name, metric, now, value, "ok"))
                elif value == UNSUPPORTED:
                    rows.append((resource_name, metric, now, None, "unsupported"))
                else:
                    rows.append((resource_name, metric, now, None, "unknown"))
                    self._errors[resource_name] = self._errors.get(resource_name, 0) + 1
        self.metrics.insert_samples(rows)
        for name, rate in first_seen_idle.items():  # no row, but the alert rules see the value once
            readings.setdefault(name, {})["utilisation_rate"] = rate
        self.latest, self.latest_ts = readings, now
        self._observe_gpus(readings, gpu_processes or {}, members or {}, now)
        self._evaluate_alerts(now, readings)
        self._roll_up_finished_minutes(now)
        self._forecast_and_score(now)
        if now - self._last_health >= self.policy.health_interval:
            self._check_health(now)
        if now - self._last_retain >= 60.0:
            self.retain(now)

    def _add_utilisation_rates(self, readings: Readings) -> dict[str, float]:
        """Add `utilisation_rate` where a row is due this round (see the module's rules); return the rates of idle
        resources seen for the first time (no row: their alert rules still see the value once)."""
        ledger = self.broker.ledger
        in_use = ledger.in_use()
        rates = self._rates
        due = [name for name in readings if name in ledger]
        for name, used in in_use.items():  # held: stored when the share changed (a step line)
            if name not in readings and name in ledger and rates.get(name) != 100.0 * (used / ledger.get(name).capacity):
                due.append(name)
        due.extend(name for name in self._rates_nonzero if name not in in_use and name not in readings)
        due.extend({name for _, name in self.alerts} - set(due))
        scanned = self._rates_scanned
        if scanned is None or scanned[0] is not ledger or scanned[1] != ledger.catalogue_version:
            # Resources came or went (or the ledger was rebuilt): look at them all, once.
            self._rates_scanned = (ledger, ledger.catalogue_version)
            known = {resource.name for resource in ledger.resources()}
            for gone in self._rates.keys() - known:
                del self._rates[gone]
                self._rates_nonzero.discard(gone)
            listed = set(due)
            first = {name: 0.0 for name in known if name not in self._rates and name not in listed}
            self._rates.update(first)
        else:
            first = {}
        for name in due:
            if name not in ledger:
                continue
            rate = 100.0 * (in_use.get(name, 0.0) / ledger.get(name).capacity)
            readings.setdefault(name, {})["utilisation_rate"] = rate
            self._rates[name] = rate
            if rate:
                self._rates_nonzero.add(name)
            else:
                self._rates_nonzero.discard(name)
        return first

    def current(self) -> Readings:
        """The latest round's readings, and the utilisation_rate last stored for resources it left out."""
        ledger = self.broker.ledger
        current = {name: dict(values) for name, values in self.latest.items()}
        for name, rate in self._rates.items():
            if name not in current and name in ledger:
                current[name] = {"utilisation_rate": rate}
        return current

    def _observe_gpus(self, readings: Readings,
                      processes: dict[str, list[tuple[int | None, int | None, tuple[int, ...]]]],
                      members: dict[int, str], now: float) -> None:
        broker = self.broker
        gpus = [name for name in readings if name.startswith("gpu:") and name in broker.ledger]
        holders_of: dict[str, set[int]] = {name: set() for name in gpus}
        granted_of: dict[str, set[str]] = {name: set() for name in gpus}
        if gpus:  # one pass over the allocations on GPUs for every GPU (a pass over all per GPU: 8 x 10,000)
            for allocation in broker.active_on_gpus():
                for item in allocation.items:
                    if item.resource in holders_of:
                        granted_of[item.resource].add(allocation.id)
                        if allocation.holder_pid is not None:
                            holders_of[item.resource].add(allocation.holder_pid)
        # The holders among the GPU processes and their ancestors, from the broker's index: a few lookups a round.
        lineages = {pid for listed in processes.values() for first, _, lineage in listed if first is not None
                    for pid in (lineage or (first,))}
        held_by = {pid: held for pid in lineages if (held := broker.active_held_by(pid))} if gpus else {}
        for name in gpus:
            values = readings[name]
            used, utilisation = values.get("memory_used"), values.get("utilisation")
            resource = broker.ledger.get(name)
            total = resource.labels.get("memory")
            reading = GpuReading(
                load=utilisation / 100 if isinstance(utilisation, float) else None,
                memory_used=int(used) if isinstance(used, float) else None,
                memory_total=total if isinstance(total, int) else None,
                throttle_reasons=int(t) if isinstance(t := values.get("throttle_reasons"), float) else None,
                processes=tuple(GpuProcess(pid, mem, lineage) for pid, mem, lineage in processes.get(name, [])),
            )
            broker.ledger.observe(name, Observation(reading.load, reading.memory_free))
            holders = holders_of[name]
            broker.risks[name] = risk_notes(name, reading, holders)
            foreign = foreign_processes(reading, holders)
            values["foreign_memory"] = float(sum(p.used_memory or 0 for p in foreign))
            found = foreign_gpu_use(name, reading.processes, granted_of[name], members, held_by)
            self._foreign_use(name, found, now)
            foreign_pids = {use.pid for use in found}
            self.gpu_processes[name] = [
                {"pid": p.pid, "used_memory": p.used_memory,
                 "allocations": sorted(belongs_to(p, members, held_by)), "foreign": p.pid in foreign_pids}
                for p in reading.processes]

    def _foreign_use(self, gpu: str, found: list[ForeignUse], now: float) -> None:
        """One event per (GPU, pid) spell; the GPU's foreign-gpu-use alert fires while any is left."""
        if not found and not self._foreign.pids(gpu) and ("foreign-gpu-use", gpu) not in self.alerts:
            return
        for use in self._foreign.observe(gpu, found):
            # Filed under the process's own allocation, else the first holding the GPU (`events --allocation`).
            self.broker.emit(now, "foreign_gpu_use", resource=gpu, allocation_id=(use.allocations + use.granted)[0],
                             detail={
                "gpu": gpu, "pid": use.pid, "used_memory": use.used_memory,
                "allocation": ",".join(use.allocations) or None, "granted_to": ",".join(use.granted) or None,
                "why": use.why()})
        concerned: dict[str, list[int]] = {}
        for use in found:
            for allocation_id in use.allocations + use.granted:
                concerned.setdefault(allocation_id, []).append(use.pid)
        named: list[dict[str, Any]] = []
        for allocation_id, pids in concerned.items():
            allocation = self.broker.live.get(allocation_id)
            if allocation is not None:
                named.append({"id": allocation.id, "amount": sum(i.amount for i in allocation.items
                                                                 if i.resource == gpu),
                              "tool_id": allocation.tool_id, "holder_pid": allocation.holder_pid,
                              "owner_uid": allocation.owner_uid, "gpu_pids": sorted(set(pids))})
        named.sort(key=lambda h: (-float(h["amount"]), h["id"]))
        pids = sorted({use.pid for use in found})
        self.condition("foreign-gpu-use", gpu, alerting.Level.WARNING if found else None, float(len(pids)), now,
                       {"pids": ",".join(map(str, pids)), "why": "; ".join(use.why() for use in found)}
                       if found else {"why": "no process uses it without a grant"}, allocations=named)

    # -- alerts -----------------------------------------------------------

    def _evaluate_alerts(self, now: float, readings: Readings) -> None:
        ledger = self.broker.ledger
        for rule in self.policy.rules:
            metric = rule.metric.split(".", 1)[-1]
            names = [name for name, values in readings.items() if metric in values and name in ledger]
            names.extend(name for rule_name, name in self.alerts
                         if rule_name == rule.name and metric not in readings.get(name, ()) and name in ledger)
            for resource in map(ledger.get, names):
                if not alerting.selects(rule, resource.name, resource.type.value):
                    continue
                key = (rule.name, resource.name)
                opened = self.alerts.get(key)
                raw = readings.get(resource.name, {}).get(metric)
                value = raw if isinstance(raw, float) else None
                if opened is None and value is None:
                    continue
                alert, transitions = alerting.evaluate(rule, opened.alert if opened else None, value, now,
                                                       resource=resource.name)
                if alert is None or alert.state is alerting.State.INACTIVE:
                    if opened is not None and opened.id is not None:
                        self.metrics.conn.execute("DELETE FROM alerts WHERE id = ?", (opened.id,))
                    self.alerts.pop(key, None)
                    continue
                entry = opened or _Open(None, alert)
                entry.alert = alert
                allocations = self._holders_of(resource.name) if any(t.kind == "firing" for t in transitions) \
                    else None
                entry.id = self._save(entry, allocations)
                if alert.state is alerting.State.RESOLVED:
                    self.alerts.pop(key, None)
                else:
                    self.alerts[key] = entry
                for transition in transitions:
                    if transition.notify:
                        self._announce(transition, alert, entry.id, allocations)

    def condition(self, rule: str, resource: str, level: alerting.Level | None, value: float, now: float,
                  detail: dict[str, Any], allocations: list[dict[str, Any]] | None = None) -> None:
        """An alert raised by the broker itself (a budget's soft limit, a paused pool factory, an allocation's
        overuse, foreign GPU use), not by a metric; `allocations` names the allocations concerned, as a firing
        metric alert does.

        It fires at once at `level` (or changes level), and resolves when called with level None. `allocations`
        (the ones concerned) are kept with it, and updated while it fires at the same level.
        """
        assert rule in CONDITIONS
        key = (rule, resource)
        opened = self.alerts.get(key)
        if level is None:
            if opened is None:
                return
            opened.alert = replace(opened.alert, state=alerting.State.RESOLVED, resolved_at=now, last_value=value)
            self._save(opened, None)
            del self.alerts[key]
            self.broker.emit(now, "alert.resolved", resource=resource, detail={
                "alert_id": opened.id, "rule": rule, "level": (opened.alert.level or level or alerting.Level.INFO).value,
                "value": value, **detail})
            return
        if opened is not None and opened.alert.level is level:
            if allocations is not None and allocations != self._stored_allocations(opened.id):
                opened.alert = replace(opened.alert, last_value=value)
                self._save(opened, allocations)
            return
        previous = opened.alert.level if opened is not None else None
        alert = alerting.Alert(rule, resource, state=alerting.State.FIRING, level=level, since=now, fired_at=now,
                               last_value=value, min=value, max=value, total=value, count=1)
        entry = opened or _Open(None, alert)
        entry.alert = replace(alert, since=opened.alert.since, fired_at=opened.alert.fired_at) if opened else alert
        entry.id = self._save(entry, allocations or [])
        self.alerts[key] = entry
        self.broker.emit(now, "alert.firing", resource=resource, detail={
            "alert_id": entry.id, "rule": rule, "level": level.value, "value": value,
            **({"previous_level": previous.value} if previous else {}), **detail,
            **({"allocations": allocations} if allocations else {})})

    def _holders_of(self, resource: str) -> list[dict[str, Any]]:
        held = []
        for allocation in self.broker.active:
            amount = sum(i.amount for i in allocation.items if i.resource == resource)
            if amount > 0:
                held.append({"id": allocation.id, "amount": amount, "tool_id": allocation.tool_id,
                             "holder_pid": allocation.holder_pid, "owner_uid": allocation.owner_uid})
        return sorted(held, key=lambda h: -float(h["amount"]))

    def _save(self, entry: _Open, allocations: list[dict[str, Any]] | None) -> int:
        alert = entry.alert
        row = {
            "id": entry.id, "rule": alert.rule, "resource": alert.resource, "state": alert.state.value,
            "level": (alert.level or alerting.Level.INFO).value, "since": alert.since or 0.0,
            "fired_at": alert.fired_at, "resolved_at": alert.resolved_at, "last_value": alert.last_value,
            "min": alert.min, "max": alert.max, "avg": alert.avg, "unknown": int(alert.unknown),
            "allocations": allocations if allocations is not None else self._stored_allocations(entry.id),
        }
        return self.metrics.save_alert(row)

    def _stored_allocations(self, alert_id: int | None) -> list[dict[str, Any]]:
        if alert_id is None:
            return []
        row = self.metrics.conn.execute("SELECT allocations FROM alerts WHERE id = ?", (alert_id,)).fetchone()
        return list(json.loads(row[0])) if row else []

    def _announce(self, transition: alerting.Transition, alert: alerting.Alert, alert_id: int,
                  allocations: list[dict[str, Any]] | None) -> None:
        detail: dict[str, Any] = {
            "alert_id": alert_id, "rule": transition.rule, "level": transition.level.value,
            "value": transition.value,
        }
        if transition.previous is not None:
            detail["previous_level"] = transition.previous.value
        if allocations:
            detail["allocations"] = allocations
        if transition.kind == "resolved":
            detail.update({"duration_s": alert.duration, "min": alert.min, "max": alert.max, "avg": alert.avg})
        self.broker.emit(transition.at, f"alert.{transition.kind}", resource=transition.resource, detail=detail)

    def alert_list(self, include_resolved: bool) -> list[dict[str, Any]]:
        rows = self.metrics.alerts(include_resolved)
        for row in rows:
            row["duration_s"] = (row["resolved_at"] - row["fired_at"]) if row["resolved_at"] and row["fired_at"] \
                else None
        return rows

    # -- history ------------------------------------------------------------

    def _roll_up_finished_minutes(self, now: float) -> None:
        minute = minute_of(now)
        if self._last_minute is None:
            self._last_minute = minute
            return
        if minute <= self._last_minute:
            return
        start, self._last_minute = self._last_minute, minute
        grouped: dict[tuple[str, str], list[tuple[float, float]]] = {}
        for resource, metric, ts, value in self.metrics.samples_between(start, minute):
            grouped.setdefault((resource, metric), []).append((ts, value))
        rows = [(resource, metric, r.minute_start, r.min, r.max, r.avg, r.count)
                for (resource, metric), samples in grouped.items() for r in roll_up(samples)]
        self.metrics.upsert_rollups(rows)

    def retain(self, now: float) -> int:
        self._last_retain = now
        raw_cutoff, rollup_cutoff = retention_cutoffs(now, self.policy.raw_max_age, self.policy.rollup_max_age)
        return self.metrics.retain(raw_cutoff, rollup_cutoff, self.policy.raw_points)

    def history(self, resource: str, metric: str, since: float, now: float) -> dict[str, Any]:
        raw = self.metrics.samples(resource, metric, since)
        rollups = self.metrics.rollups(resource, metric, since)
        return {
            "resource": resource, "metric": metric, "since": since, "now": now,
            "points": [{"ts": ts, "value": value, "status": status} for ts, value, status in raw],
            "rollups": [{"minute": m, "min": lo, "max": hi, "avg": avg, "count": n} for m, lo, hi, avg, n in rollups],
        }

    # -- forecasts ----------------------------------------------------------

    def _points(self, resource: str, metric: str, now: float) -> list[tuple[float, float]]:
        return [(ts, value) for ts, value, status in
                self.metrics.samples(resource, metric, now - self.policy.forecast_window)
                if status == "ok" and value is not None]

    def _forecast_and_score(self, now: float) -> None:
        due = [f for f in self._forecasts if f[2].target_time <= now]
        if due:
            self._forecasts = [f for f in self._forecasts if f[2].target_time > now]
            for resource, metric, made in due:
                latest = self.latest.get(resource, {}).get(metric)
                pairs = forecasting.score_due([made], now, lambda _: latest if isinstance(latest, float) else None)
                self._scored.setdefault((resource, metric), deque(maxlen=100)).extend(pairs)
        if not self._forecasts or self._forecasts[-1][2].made_at <= now - 60:
            for resource_name, values in self.latest.items():
                if "utilisation" in values:
                    fresh = forecasting.forecast(self._points(resource_name, "utilisation", now), now,
                                                 self.policy.forecast_horizon)
                    if fresh is not None:
                        self._forecasts.append((resource_name, "utilisation", fresh))

    def predict(self, resource: str, metric: str, horizon: float, now: float) -> dict[str, Any]:
        points = self._points(resource, metric, now)
        predicted = forecasting.value_in(points, now, horizon)
        percent = metric.endswith("utilisation") or metric == "utilisation_rate"
        threshold = 100.0 if percent else None
        if percent and predicted is not None:
            predicted = min(100.0, max(0.0, predicted))  # a percentage cannot leave 0..100, whatever the line says
        until = forecasting.time_until(points, now, threshold) if threshold is not None and points else None
        pairs = list(self._scored.get((resource, metric), ()))
        return {
            "resource": resource, "metric": metric, "now": now, "horizon_s": horizon,
            "current": points[-1][1] if points else None, "predicted": predicted,
            "threshold": threshold, "seconds_until_threshold": until,
            "samples": len(points), "window_s": self.policy.forecast_window,
            "accuracy": {"mape_pct": forecasting.mape(pairs), "scored": len(pairs),
                         "horizon_s": self.policy.forecast_horizon},
        }

    # -- health -------------------------------------------------------------

    def _check_health(self, now: float) -> None:
        self._last_health = now
        broker = self.broker
        firing: dict[str, list[alerting.Level]] = {}
        for (_, name), entry in self.alerts.items():
            if entry.alert.state is alerting.State.FIRING and entry.alert.level is not None:
                firing.setdefault(name, []).append(entry.alert.level)
        ledger = broker.ledger
        names = {name for name, values in self.latest.items() if _HEALTH_FACTS.intersection(values)}
        names.update(firing, self._errors, (name for name, window in self._window.items() if window))
        names.update(n for n, ok in self.healthy.items() if not ok)
        names.update(n for n, health in self.health.items() if health.score < 100)
        for resource in map(ledger.get, sorted(n for n in names if n in ledger)):
            values = self.latest.get(resource.name, {})
            utilisation = values.get("utilisation")
            window = self._window.setdefault(resource.name, deque(maxlen=6))
            if isinstance(utilisation, float):
                window.append(utilisation)
            throttle = values.get("throttle_reasons")
            facts = healthing.HealthInput(
                resource=resource.name,
                firing=tuple(firing.get(resource.name, ())),
                sampler_errors=self._errors.pop(resource.name, 0),
                foreign_use=bool(values.get("foreign_memory")),
                throttled=isinstance(throttle, float) and bool(int(throttle) & 0xEC),
                utilisation=tuple(window),
            )
            health = healthing.score(facts)
            self.health[resource.name] = health
            was_ok = self.healthy.get(resource.name, True)
            ok = healthing.gate(was_ok, health.score, self.policy.health_threshold)
            self.healthy[resource.name] = ok
            if ok != was_ok:
                broker.ledger.block(resource.name, None if ok else _block_reason(health))
                broker.emit(now, "resource.healthy" if ok else "resource.unhealthy", resource=resource.name,
                            detail={"score": health.score, "reasons": list(health.reasons)})
                if ok:
                    broker.schedule()

    def block_unhealthy(self, ledger: Ledger) -> None:
        """Keep what the health gate refused out of a rebuilt ledger (`Broker.reload`) until it recovers."""
        for name, ok in self.healthy.items():
            health = self.health.get(name)
            if not ok and health is not None and name in ledger:
                ledger.block(name, _block_reason(health))

    def health_of(self, resource: str) -> dict[str, Any] | None:
        """A resource's last score; a full score where nothing was held against it; None before the first check."""
        health = self.health.get(resource)
        if health is None:
            if self._last_health == -math.inf:
                return None
            return {"score": 100, "reasons": [], "granted": self.healthy.get(resource, True)}
        return {"score": health.score, "reasons": list(health.reasons), "granted": self.healthy.get(resource, True)}

