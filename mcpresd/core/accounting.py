"""Cost, budgets, sacct-style usage, and what a tool's history says it needs.

Rules:
- An allocation costs its rate (the sum of its items' cost per hour) for the
  time it is held, from grant to release (or `now`); one never granted costs
  nothing. A window takes only the held time inside it.
- Budget periods are calendar ones in a time zone: the day, the ISO week from
  Monday 00:00, the month. Bounds are local midnights turned into epoch
  seconds, so a day with a DST change lasts 23 or 25 hours. Without a zone
  the system's local time is used, DST included.
- A budget counts the cost inside the current period of the records it applies
  to; a pool budget counts only that pool's items. Money is compared at the 6
  decimals it is shown at: soft from soft * limit, exceeded from the limit,
  both inclusive.
- Usage rows (Slurm sacct style) take the part of each record inside
  [since, now]. Measured use: cpu core-hours = cpu_seconds / 3600, spread
  evenly over the held time; memory byte-hours = memory_peak * hours; GPU-hours
  = gpu_utilisation * GPUs held * hours. Requested counts, per kind, only the
  records measured for that kind; efficiency = measured / requested. A row per
  pool or resource shares a record's measured use among its items of that
  kind by amount.
- Percentiles are numpy's default (linear, Hyndman-Fan type 7), computed as
  numpy computes them, to the last bit.
- Recommendations use the newest ended, measured runs of a tool, with headroom:
    cpu    = ceil_to(p95 * 1.2, 0.5), at least 0.5 cores
    memory = ceil_to(p95 * 1.2, 64 MiB), at least 64 MiB
    gpu    = max(1, ceil(p95)) GPUs, or, when the usual (p50) request was a
             share below 1, ceil_to(p95 * 1.2, 0.1) between 0.1 and 1
    ttl_s  = ceil_to(p95 duration * 1.5, 60), at least 60
  ceil_to takes a value within a relative 1e-12 of a step as on it (1.2 * 2.5
  gives 3.0, not 3.5). Fewer than 3 runs are not enough to trust.
- Oversized: a running allocation held at least min_age_s that uses less than
  `ratio` of a kind it holds, where the rule above (on that one value) asks for
  less than it holds. A holder of at most one GPU is pointed at a share.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone, tzinfo
from typing import Any, Literal, NamedTuple

from mcpresd.protocol import MAX_NAME_LENGTH, BudgetScope, Period, format_amount, format_size, parse_size

MEASURED_KEYS = ("cpu_seconds", "memory_peak", "gpu_utilisation", "gpu_memory_peak")
MEASURED_KINDS = ("cpu", "memory", "gpu")
MIN_RUNS = 3
MIB_64 = 64 << 20
_EPSILON = 1e-12

BudgetState = Literal["ok", "soft", "exceeded"]
UsageBy = Literal["tool", "owner", "pool", "resource"]


@dataclass(frozen=True)
class Charge:
    """One item of an allocation as accounting sees it."""

    resource: str
    kind: str
    amount: float
    rate: float
    pool: str | None = None


@dataclass(frozen=True)
class UsageRecord:
    allocation_id: str
    tool_id: str | None
    owner_uid: int
    created_at: float
    granted_at: float | None
    released_at: float | None
    charges: tuple[Charge, ...]
    measured: Mapping[str, float] = field(default_factory=dict)

    def end(self, now: float) -> float:
        return now if self.released_at is None else self.released_at

    def duration(self, now: float) -> float:
        return 0.0 if self.granted_at is None else max(0.0, self.end(now) - self.granted_at)

    def waited(self, now: float) -> float:
        return (self.end(now) if self.granted_at is None else self.granted_at) - self.created_at

    def rate(self) -> float:
        return cost_per_hour(self.charges)

    def cost(self, now: float, since: float | None = None, pool: str | None = None) -> float:
        if self.granted_at is None:
            return 0.0
        start = self.granted_at if since is None else max(self.granted_at, since)
        hours = max(0.0, self.end(now) - start) / 3600
        return cost_per_hour(c for c in self.charges if pool is None or c.pool == pool) * hours

    def amount(self, kind: str) -> float:
        return math.fsum(c.amount for c in self.charges if c.kind == kind)

    def measure(self, key: str) -> float | None:
        """A measured value, or None where it is missing or not a sane number."""
        value = self.measured.get(key)
        return float(value) if value is not None and math.isfinite(value) and value >= 0 else None


def cost_per_hour(charges: Iterable[Charge]) -> float:
    return math.fsum(c.rate for c in charges)


# -- budgets ------------------------------------------------------------------


def period_bounds(period: Period, now: float, tz: tzinfo | None = None) -> tuple[float, float]:
    # A naive datetime is local time and .timestamp() resolves it with the system's DST rules.
    today = datetime.fromtimestamp(now, tz).date()
    if period == Period.DAY:
        first, after = today, today + timedelta(days=1)
    elif period == Period.WEEK:
        first = today - timedelta(days=today.weekday())
        after = first + timedelta(days=7)
    else:
        first = today.replace(day=1)
        after = (first + timedelta(days=32)).replace(day=1)
    return _midnight(first, tz), _midnight(after, tz)


def _midnight(day: date, tz: tzinfo | None) -> float:
    return datetime(day.year, day.month, day.day, tzinfo=tz).timestamp()


@dataclass(frozen=True)
class Budget:
    scope: BudgetScope
    subject: str
    limit: float
    period: Period
    soft: float = 0.8

    def validate(self) -> None:
        if not (math.isfinite(self.limit) and self.limit > 0):
            raise ValueError(f"a budget limit must be a positive finite amount, got {self.limit!r}")
        if not (math.isfinite(self.soft) and 0 < self.soft <= 1):
            raise ValueError(f"the soft alert fraction must be above 0 and at most 1, got {self.soft!r}")
        if not 1 <= len(self.subject) <= MAX_NAME_LENGTH:
            raise ValueError(f"a budget subject must be 1 to {MAX_NAME_LENGTH} characters")
        if self.scope == BudgetScope.OWNER and not (self.subject.isdecimal() and str(int(self.subject)) == self.subject):
            raise ValueError(f"an owner budget's subject is a uid in decimal, got {self.subject!r}")

    def applies_to(self, record: UsageRecord) -> bool:
        if self.scope == BudgetScope.TOOL:
            return record.tool_id == self.subject
        if self.scope == BudgetScope.OWNER:
            return str(record.owner_uid) == self.subject
        return any(c.pool == self.subject for c in record.charges)


def spent(budget: Budget, records: Iterable[UsageRecord], now: float, tz: tzinfo | None = None) -> float:
    start, _ = period_bounds(budget.period, now, tz)
    pool = budget.subject if budget.scope == BudgetScope.POOL else None
    return math.fsum(r.cost(now, since=start, pool=pool) for r in records if budget.applies_to(r))


def budget_state(budget: Budget, spent: float) -> BudgetState:
    if _money(spent) >= _money(budget.limit):
        return "exceeded"
    if _money(spent) >= _money(budget.soft * budget.limit):
        return "soft"
    return "ok"


def budget_dict(budget: Budget, spent: float, now: float, tz: tzinfo | None = None) -> dict[str, Any]:
    start, end = period_bounds(budget.period, now, tz)
    return {
        "scope": str(budget.scope), "subject": budget.subject, "period": str(budget.period),
        "limit": budget.limit, "soft": budget.soft, "spent": _money(spent),
        "remaining": _money(max(0.0, budget.limit - spent)), "fraction": _money(spent / budget.limit),
        "state": budget_state(budget, spent), "period_start": start, "period_end": end,
    }


def _money(value: float) -> float:
    return round(value, 6)


# -- usage (sacct) ------------------------------------------------------------


@dataclass
class _Tally:
    """A usage row while it is summed."""

    ids: set[str] = field(default_factory=set)
    counted: int = 0
    """Allocations counted from totals (hourly ones), beside those in `ids`."""
    active: int = 0
    waited: float = 0.0
    cost: float = 0.0
    resource_hours: dict[str, float] = field(default_factory=dict)
    requested: dict[str, float] = field(default_factory=dict)
    measured: dict[str, float] = field(default_factory=dict)


def _groups(record: UsageRecord, by: UsageBy) -> dict[str, list[Charge]]:
    if by == "tool":
        return {record.tool_id or "-": list(record.charges)}
    if by == "owner":
        return {str(record.owner_uid): list(record.charges)}
    groups: dict[str, list[Charge]] = {}
    for c in record.charges:
        key = c.pool if by == "pool" else c.resource
        if key is not None:
            groups.setdefault(key, []).append(c)
    return groups


def _used_hours(record: UsageRecord, kind: str, hours: float, held_hours: float) -> float | None:
    """The record's measured use of `kind` over `hours` of its `held_hours`, in kind-hours."""
    if kind == "cpu":
        cpu = record.measure("cpu_seconds")
        return None if cpu is None else (cpu / 3600 * hours / held_hours if held_hours > 0 else 0.0)
    if kind == "memory":
        peak = record.measure("memory_peak")
        return None if peak is None else peak * hours
    utilisation = record.measure("gpu_utilisation")
    return None if utilisation is None else utilisation * record.amount("gpu") * hours


def usage_rows(records: Iterable[UsageRecord], by: UsageBy, since: float, now: float) -> list[dict[str, Any]]:
    return rows_of(usage_tallies(records, by, since, now))


def rows_of(tallies: Mapping[str, _Tally]) -> list[dict[str, Any]]:
    rows = [_row(key, t) for key, t in tallies.items()]
    return sorted(rows, key=lambda row: (-row["cost"], row["key"]))


def usage_tallies(records: Iterable[UsageRecord], by: UsageBy, since: float, now: float,
                  tallies: dict[str, _Tally] | None = None) -> dict[str, _Tally]:
    """Sum each record's part of [since, now] into `tallies` (new ones if None), by `by`."""
    tallies = {} if tallies is None else tallies
    for record in records:
        end = min(record.end(now), now)
        if end < since or record.created_at > now:
            continue
        granted = record.granted_at
        hours = held_hours = 0.0
        if granted is not None and granted <= now:
            hours = max(0.0, end - max(granted, since)) / 3600
            held_hours = record.duration(now) / 3600
        running = granted is not None and granted <= now and (record.released_at is None or record.released_at > now)
        waited = min(end if granted is None else granted, now) - record.created_at
        used = {kind: _used_hours(record, kind, hours, held_hours) for kind in MEASURED_KINDS}
        for key, charges in _groups(record, by).items():
            tally = tallies.setdefault(key, _Tally())
            if record.allocation_id not in tally.ids:
                tally.ids.add(record.allocation_id)
                tally.active += running
                tally.waited += waited
            for c in charges:
                tally.cost += c.rate * hours
                _add(tally.resource_hours, c.kind, c.amount * hours)
                use = used.get(c.kind)
                total = record.amount(c.kind)
                if use is not None and total > 0:
                    _add(tally.requested, c.kind, c.amount * hours)
                    _add(tally.measured, c.kind, use * c.amount / total)
    return tallies


# -- usage totals kept as allocations end ---------------------------------------

USAGE_KEPT: tuple[UsageBy, ...] = ("tool", "pool", "resource")
"""The groupings whose totals are kept; an owner's are the tool rows of that owner (each record has one tool key)."""
USAGE_HOUR = 3600.0
"""Ended allocations are summed into totals per clock hour (Unix time, UTC) as they end."""


class UsagePart(NamedTuple):
    """What one ended record adds to one usage row inside a span; kind "" is the record itself (count, wait).

    A named tuple: every release makes several, and a frozen dataclass took a fifth of the time to make them."""

    by: UsageBy
    key: str
    kind: str
    allocations: int = 0
    waited: float = 0.0
    cost: float = 0.0
    resource_hours: float | None = None
    requested: float | None = None
    measured: float | None = None


def usage_parts(record: UsageRecord, start: float, end: float, by: UsageBy | None = None) -> list[UsagePart]:
    """An ended record's part of every usage row in [start, end): the time it was held there, and the record
    itself (one allocation, its wait) where it ended there; of the rows by `by` if given, else of the kept
    groupings (USAGE_KEPT). The parts of
    adjoining spans add up to what `usage_tallies` takes over their union."""
    released = record.released_at
    if released is None:
        raise ValueError(f"usage parts are of ended records; {record.allocation_id} has not ended")
    counted = start <= released < end
    granted = record.granted_at
    hours = held_hours = 0.0
    if granted is not None:
        hours = max(0.0, min(released, end) - max(granted, start)) / 3600
        held_hours = max(0.0, released - granted) / 3600
    if not counted and hours <= 0:
        return []
    used = {kind: _used_hours(record, kind, hours, held_hours) for kind in MEASURED_KINDS} if record.measured else {}
    waited = record.waited(released)
    parts: list[UsagePart] = []
    for grouping in USAGE_KEPT if by is None else (by,):
        for key, charges in _groups(record, grouping).items():
            if counted:
                parts.append(UsagePart(grouping, key, "", 1, waited))
            kinds: dict[str, list[float | None]] = {}
            for c in charges:
                cost, resource_hours, requested, measured = kinds.setdefault(c.kind, [0.0, 0.0, None, None])
                assert cost is not None and resource_hours is not None
                figures: list[float | None] = [cost + c.rate * hours, resource_hours + c.amount * hours,
                                               requested, measured]
                use = used.get(c.kind)
                if use is not None and (total := record.amount(c.kind)) > 0:
                    figures[2] = (requested or 0.0) + c.amount * hours
                    figures[3] = (measured or 0.0) + use * c.amount / total
                kinds[c.kind] = figures
            for kind, (cost, resource_hours, requested, measured) in kinds.items():
                parts.append(UsagePart(grouping, key, kind, cost=cost or 0.0, resource_hours=resource_hours,
                                       requested=requested, measured=measured))
    return parts


USAGE_SPAN_HOURS = 24
"""A record held through more whole hours than this keeps them as one span (its figures per hour and its
bounds) rather than one entry an hour: releasing a year-long hold writes a few rows, not 80,000."""


def hourly_usage_parts(record: UsageRecord) -> tuple[list[tuple[float, bool, UsagePart]],
                                                     list[tuple[float, float, UsagePart]]]:
    """An ended record's parts per clock hour, each with whether it was held through that whole hour; and,
    where it was held through more than USAGE_SPAN_HOURS whole hours, those hours as spans instead:
    (first hour, end of the last, its parts of one such hour)."""
    released = record.released_at
    if released is None:
        raise ValueError(f"usage parts are of ended records; {record.allocation_id} has not ended")
    granted = record.granted_at
    hour = math.floor(min(released, released if granted is None else granted) / USAGE_HOUR) * USAGE_HOUR
    spans: list[tuple[float, float, UsagePart]] = []
    through_from = through_to = hour
    if granted is not None:
        through_from = math.ceil(granted / USAGE_HOUR) * USAGE_HOUR
        through_to = math.floor(released / USAGE_HOUR) * USAGE_HOUR
        if through_to - through_from > USAGE_SPAN_HOURS * USAGE_HOUR:
            spans = [(through_from, through_to, part)
                     for part in usage_parts(record, through_from, through_from + USAGE_HOUR) if part.kind]
    found: list[tuple[float, bool, UsagePart]] = []
    while hour <= released:
        if spans and through_from <= hour < through_to:
            hour = through_to
            continue
        through = granted is not None and granted <= hour and released >= hour + USAGE_HOUR
        found += [(hour, through, part) for part in usage_parts(record, hour, hour + USAGE_HOUR)]
        hour += USAGE_HOUR
    return found, spans


def add_totals(tallies: dict[str, _Tally], totals: Iterable[tuple[str, str, int, float, float, float | None,
                                                                   float | None, float | None]],
               scale: float = 1.0) -> dict[str, _Tally]:
    """Add summed parts (key, kind, allocations, waited, cost, resource_hours, requested, measured) to
    `tallies`, their held-time figures times `scale` (a fraction of an hour held throughout)."""
    for key, kind, allocations, waited, cost, resource_hours, requested, measured in totals:
        tally = tallies.setdefault(key, _Tally())
        tally.counted += allocations
        tally.waited += waited
        tally.cost += cost * scale
        if kind and resource_hours is not None:
            _add(tally.resource_hours, kind, resource_hours * scale)
        if kind and requested is not None and measured is not None:
            _add(tally.requested, kind, requested * scale)
            _add(tally.measured, kind, measured * scale)
    return tallies


def ended_part_tallies(records: Iterable[UsageRecord], by: UsageBy, start: float, end: float,
                       tallies: dict[str, _Tally]) -> dict[str, _Tally]:
    """Add ended records' parts of [start, end) by `by` to `tallies`."""
    for record in records:
        parts = usage_parts(record, start, end, by)
        add_totals(tallies, [(p.key, p.kind, p.allocations, p.waited, p.cost, p.resource_hours, p.requested,
                              p.measured) for p in parts])
    return tallies


def _add(into: dict[str, float], kind: str, value: float) -> None:
    into[kind] = into.get(kind, 0.0) + value


def _row(key: str, t: _Tally) -> dict[str, Any]:
    return _row_from(key, len(t.ids) + t.counted, t.active, t.resource_hours, t.cost, t.waited, t.requested, t.measured)


def _row_from(key: str, allocations: int, active: int, resource_hours: Mapping[str, float], cost: float,
              waited: float, requested: Mapping[str, float], measured: Mapping[str, float]) -> dict[str, Any]:
    def rounded(values: Mapping[str, float]) -> dict[str, float]:
        # Significant digits, not decimals: a few seconds' use is a millionth of an hour, and totals are summed
        # from these rows (rounded to 6 decimals, their efficiency would drift from the rows').
        return {k: round(v, 6) if abs(v) >= 1 else float(f"{v:.6g}") for k, v in sorted(values.items())}

    return {
        "key": key, "allocations": allocations, "active": active, "resource_hours": rounded(resource_hours),
        "cost": round(cost, 6), "waited_s": round(waited, 6),
        "mean_wait_s": round(waited / allocations, 6) if allocations else 0.0,
        "requested": rounded(requested), "measured": rounded(measured),
        "efficiency": rounded({k: measured.get(k, 0.0) / v for k, v in requested.items() if v > 0}),
    }


def usage_totals(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    def summed(field_name: str) -> dict[str, float]:
        total: dict[str, float] = {}
        for row in rows:
            for kind, value in row[field_name].items():
                _add(total, kind, value)
        return total

    return _row_from("total", sum(r["allocations"] for r in rows), sum(r["active"] for r in rows),
                     summed("resource_hours"), math.fsum(r["cost"] for r in rows),
                     math.fsum(r["waited_s"] for r in rows), summed("requested"), summed("measured"))


# -- learning from history ----------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        raise ValueError("no values to take a percentile of")
    if not 0 <= q <= 100:
        raise ValueError(f"a percentile must be between 0 and 100, got {q!r}")
    ordered = sorted(float(v) for v in values)
    index = (len(ordered) - 1) * (q / 100)
    below = math.floor(index)
    low, high = ordered[below], ordered[min(below + 1, len(ordered) - 1)]
    weight = index - below
    # numpy's _lerp: interpolating from the nearer end keeps the result monotonic and exact at the ends.
    if weight >= 0.5:
        return high - (high - low) * (1 - weight)
    return low + (high - low) * weight


def ceil_to(value: float, step: float) -> float:
    steps = value / step
    whole = round(steps)
    count = whole if math.isclose(steps, whole, rel_tol=_EPSILON, abs_tol=_EPSILON) else math.ceil(steps)
    return round(count * step, 9)


def recommended(kind: str, p95: float, *, share: bool = False) -> float:
    """What to ask for of `kind` (or "duration_s") when the 95th percentile of use is `p95`."""
    if kind == "cpu":
        return max(0.5, ceil_to(p95 * 1.2, 0.5))
    if kind == "memory":
        return max(float(MIB_64), ceil_to(p95 * 1.2, MIB_64))
    if kind == "gpu":
        return min(1.0, max(0.1, ceil_to(p95 * 1.2, 0.1))) if share else max(1.0, ceil_to(p95, 1))
    return max(60.0, ceil_to(p95 * 1.5, 60))


def _use(record: UsageRecord, kind: str, now: float) -> float | None:
    """What one record used of `kind` while held: cores, bytes, GPUs."""
    if kind == "cpu":
        cpu, held = record.measure("cpu_seconds"), record.duration(now)
        return None if cpu is None or held <= 0 else cpu / held
    if kind == "memory":
        return record.measure("memory_peak")
    utilisation, gpus = record.measure("gpu_utilisation"), record.amount("gpu")
    return None if utilisation is None or gpus <= 0 else utilisation * gpus


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="seconds")


def recommend(tool_id: str, records: Sequence[UsageRecord], now: float, runs: int = 50) -> dict[str, Any]:
    if runs < 1:
        raise ValueError(f"runs must be at least 1, got {runs}")
    ended = [r for r in records if r.tool_id == tool_id and r.granted_at is not None and r.released_at is not None
             and any(r.measure(k) is not None for k in MEASURED_KEYS)]
    chosen = sorted(ended, key=lambda r: (r.end(now), r.allocation_id), reverse=True)[:runs]
    samples: dict[str, list[tuple[float, float | None]]] = {}
    for r in chosen:
        for kind in MEASURED_KINDS:
            if (use := _use(r, kind, now)) is not None:
                samples.setdefault(kind, []).append((use, r.amount(kind)))
        samples.setdefault("duration_s", []).append((r.duration(now), None))
    evidence: dict[str, dict[str, Any]] = {}
    recommendation: dict[str, float] = {}
    for kind, pairs in samples.items():
        used = [u for u, _ in pairs]
        asked = [a for _, a in pairs if a is not None]
        requested_p50 = percentile(asked, 50) if asked else None
        p95 = percentile(used, 95)
        evidence[kind] = {
            "requested_p50": None if requested_p50 is None else round(requested_p50, 6),
            "p50": round(percentile(used, 50), 6), "p90": round(percentile(used, 90), 6),
            "p95": round(p95, 6), "max": round(max(used), 6), "samples": len(used),
        }
        share = kind == "gpu" and requested_p50 is not None and requested_p50 < 1
        recommendation["ttl_s" if kind == "duration_s" else kind] = recommended(kind, p95, share=share)
    basis = (f"{len(chosen)} run{'' if len(chosen) == 1 else 's'} from "
             f"{_iso(min(r.granted_at or 0.0 for r in chosen))} to {_iso(max(r.end(now) for r in chosen))}"
             if chosen else "no measured runs")
    return {"tool_id": tool_id, "runs": len(chosen), "basis": basis, "evidence": evidence,
            "recommendation": recommendation, "args": _allocate_args(recommendation),
            "enough": len(chosen) >= MIN_RUNS}


def _allocate_args(recommendation: Mapping[str, float]) -> list[str]:
    args: list[str] = []
    for kind, option in (("cpu", "--cpu"), ("memory", "--mem"), ("gpu", "--gpu"), ("ttl_s", "--ttl")):
        if kind in recommendation:
            args += [option, _shown(kind, recommendation[kind])]
    return args


def _shown(kind: str, value: float) -> str:
    if kind == "memory":
        text = format_size(value)
        if parse_size(text) >= value or not text[-1].isalpha():
            return text
        # format_size rounds to one decimal; round up instead, never to less than recommended.
        tenths = math.ceil(value / (1 << (10 * (1 + "KMGTP".index(text[-1])))) * 10)
        return f"{tenths / 10:.1f}".removesuffix(".0") + text[-1]
    if kind == "ttl_s":
        return f"{int(value) // 3600}h" if value % 3600 == 0 else f"{math.ceil(value / 60)}m"
    return format_amount(value, "")


def oversized(records: Sequence[UsageRecord], now: float, *, min_age_s: float = 600.0,
              ratio: float = 0.25) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    for r in records:
        if r.granted_at is None or r.released_at is not None or r.duration(now) < min_age_s:
            continue
        for kind in MEASURED_KINDS:
            held, used = r.amount(kind), _use(r, kind, now)
            if used is None or held <= 0 or used >= ratio * held:
                continue
            ask = recommended(kind, used, share=held <= 1)
            if ask >= held:
                continue
            hint = "" if r.tool_id is None else f" (see `mcpctl recommend {r.tool_id}`)"
            found.append({
                "allocation_id": r.allocation_id, "tool_id": r.tool_id, "kind": kind, "held": held,
                "used": round(used, 6), "ratio": round(used / held, 6), "since": r.granted_at,
                "suggestion": (f"holds {_quantity(kind, held)}, uses {_quantity(kind, used, bare=True)}: "
                               f"ask for {_shown(kind, ask)}{hint}"),
            })
    return sorted(found, key=lambda f: (f["ratio"], f["allocation_id"], f["kind"]))


def _quantity(kind: str, value: float, *, bare: bool = False) -> str:
    if kind == "memory":
        return format_size(value)
    text = format_amount(value, "")
    if bare:
        return text
    unit = "core" if kind == "cpu" else "GPU"
    return f"{text} {unit}{'' if value == 1 else 's'}"
