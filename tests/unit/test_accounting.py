"""Accounting rules: cost accrual, calendar periods, budgets, sacct-style usage, recommendations."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import datetime, timezone
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from mcpresd.core.accounting import (
    Budget, Charge, UsageRecord, budget_dict, budget_state, ceil_to, cost_per_hour, oversized, percentile,
    period_bounds, recommend, spent, usage_rows, usage_totals,
)
from mcpresd.protocol import BudgetScope, Period

H = 3600.0
T0 = 1_700_000_000.0  # 2023-11-14T22:13:20Z
GIB = float(1 << 30)
UTC = timezone.utc
BERLIN = ZoneInfo("Europe/Berlin")


def at(text: str) -> float:
    """Epoch seconds of an ISO time with its offset, e.g. 2024-03-31T00:00+01:00."""
    return datetime.fromisoformat(text).timestamp()


def record(aid: str = "a1", *charges: Charge, tool: str | None = "train", uid: int = 1000, created: float = T0,
           granted: float | None = T0, released: float | None = None, **measured: float) -> UsageRecord:
    return UsageRecord(aid, tool, uid, created, granted, released, charges, measured)


def gpu(index: int, rate: float = 1.5, amount: float = 1.0, pool: str | None = None) -> Charge:
    return Charge(f"gpu:{index}", "gpu", amount, rate, pool)


def cpu(cores: float, rate: float = 0.0, resource: str = "cpu", pool: str | None = None) -> Charge:
    return Charge(resource, "cpu", cores, rate, pool)


def memory(size: float, rate: float = 0.0) -> Charge:
    return Charge("memory", "memory", size, rate)


# -- cost ---------------------------------------------------------------------


def test_two_gpus_at_one_and_a_half_an_hour_for_ninety_minutes_cost_four_and_a_half() -> None:
    held = record("a1", gpu(0), gpu(1), granted=T0, released=T0 + 1.5 * H)
    assert held.rate() == cost_per_hour(held.charges) == 3.0
    assert held.cost(now=T0 + 10 * H) == 4.5


@pytest.mark.parametrize("granted, released, now, since, pool, expected", [
    (T0, None, T0 + 2 * H, None, None, 6.0),            # running: accrues until now
    (T0, T0 + H, T0 + 5 * H, None, None, 3.0),          # released: stops at release
    (None, T0 + H, T0 + 5 * H, None, None, 0.0),        # never granted
    (T0, T0 + 2 * H, T0 + 5 * H, T0 + H, None, 3.0),    # window starts mid-run
    (T0, T0 + 2 * H, T0 + 5 * H, T0 + 3 * H, None, 0.0),  # window after the run
    (T0, T0 + 2 * H, T0 + 5 * H, T0 - H, None, 6.0),    # window before the grant changes nothing
    (T0, T0 + 2 * H, T0 + 5 * H, None, "gpus", 4.0),    # only the pool's charges
    (T0, T0 + 2 * H, T0 + 5 * H, T0 + H, "gpus", 2.0),
    (T0, T0 + 2 * H, T0 + 5 * H, None, "other", 0.0),
])
def test_cost_accrues_over_the_held_time_inside_the_window(granted: float | None, released: float | None,
                                                          now: float, since: float | None, pool: str | None,
                                                          expected: float) -> None:
    held = record("a1", gpu(0, rate=2.0, pool="gpus"), cpu(4, rate=1.0), granted=granted, released=released)
    assert held.cost(now, since=since, pool=pool) == expected


@pytest.mark.parametrize("granted, released, duration, waited", [
    (T0 + 60, T0 + 660, 600.0, 60.0),
    (T0 + 60, None, 940.0, 60.0),
    (None, T0 + 300, 0.0, 300.0),   # withdrawn while queued
    (None, None, 0.0, 1000.0),      # still queued
])
def test_held_and_waited_time(granted: float | None, released: float | None, duration: float,
                              waited: float) -> None:
    r = record(created=T0, granted=granted, released=released)
    assert (r.duration(T0 + 1000), r.waited(T0 + 1000)) == (duration, waited)


# -- periods ------------------------------------------------------------------


@pytest.mark.parametrize("period, now, tz, start, end", [
    (Period.DAY, "2024-05-10T12:00+00:00", UTC, "2024-05-10T00:00+00:00", "2024-05-11T00:00+00:00"),
    (Period.DAY, "2024-05-10T00:00+00:00", UTC, "2024-05-10T00:00+00:00", "2024-05-11T00:00+00:00"),
    (Period.WEEK, "2024-05-12T23:59+00:00", UTC, "2024-05-06T00:00+00:00", "2024-05-13T00:00+00:00"),
    (Period.WEEK, "2024-05-13T00:00+00:00", UTC, "2024-05-13T00:00+00:00", "2024-05-20T00:00+00:00"),
    (Period.MONTH, "2024-01-31T23:59:59+00:00", UTC, "2024-01-01T00:00+00:00", "2024-02-01T00:00+00:00"),
    (Period.MONTH, "2024-02-29T12:00+00:00", UTC, "2024-02-01T00:00+00:00", "2024-03-01T00:00+00:00"),
    (Period.MONTH, "2023-12-31T23:00+00:00", UTC, "2023-12-01T00:00+00:00", "2024-01-01T00:00+00:00"),
    # Berlin: the day clocks go forward lasts 23 h, the day they go back 25 h.
    (Period.DAY, "2024-03-31T12:00+02:00", BERLIN, "2024-03-31T00:00+01:00", "2024-04-01T00:00+02:00"),
    (Period.DAY, "2024-10-27T12:00+01:00", BERLIN, "2024-10-27T00:00+02:00", "2024-10-28T00:00+01:00"),
    (Period.WEEK, "2024-03-31T12:00+02:00", BERLIN, "2024-03-25T00:00+01:00", "2024-04-01T00:00+02:00"),
    (Period.MONTH, "2024-03-31T23:30+02:00", BERLIN, "2024-03-01T00:00+01:00", "2024-04-01T00:00+02:00"),
    # 23:30 UTC on the last day is already the next month in Berlin.
    (Period.MONTH, "2024-04-30T23:30+00:00", BERLIN, "2024-05-01T00:00+02:00", "2024-06-01T00:00+02:00"),
])
def test_period_bounds_are_local_midnights(period: Period, now: str, tz: ZoneInfo | timezone, start: str,
                                           end: str) -> None:
    assert period_bounds(period, at(now), tz) == (at(start), at(end))


def test_a_dst_day_in_berlin_lasts_23_hours() -> None:
    start, end = period_bounds(Period.DAY, at("2024-03-31T12:00+02:00"), BERLIN)
    assert end - start == 23 * H


@pytest.fixture
def berlin_local_time(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("TZ", "Europe/Berlin")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


@pytest.mark.usefixtures("berlin_local_time")
def test_without_a_zone_the_local_time_is_used_with_its_dst_rules() -> None:
    assert period_bounds(Period.WEEK, at("2024-03-31T12:00+02:00")) == (
        at("2024-03-25T00:00+01:00"), at("2024-04-01T00:00+02:00"))


# -- budgets ------------------------------------------------------------------


@pytest.mark.parametrize("limit, soft, spent_, state", [
    (10.0, 0.8, 0.0, "ok"),
    (10.0, 0.8, 7.999999, "ok"),
    (10.0, 0.8, 8.0, "soft"),          # exactly 80 %
    (10.0, 0.8, 9.999999, "soft"),
    (10.0, 0.8, 10.0, "exceeded"),     # exactly the limit
    (10.0, 0.8, 12.0, "exceeded"),
    (3.0, 0.8, 2.4, "soft"),           # 0.8 * 3 is 2.4000000000000004 in floats
    (0.3, 1.0, 0.7 - 0.4, "exceeded"),  # 0.29999999999999993 is 0.3 in money
    (0.3, 1.0, 0.299999, "ok"),        # soft = 1: no soft stage
])
def test_budget_state_at_exact_thresholds(limit: float, soft: float, spent_: float, state: str) -> None:
    assert budget_state(Budget(BudgetScope.TOOL, "train", limit, Period.DAY, soft), spent_) == state


@pytest.mark.parametrize("budget, message", [
    (Budget(BudgetScope.TOOL, "t", 0.0, Period.DAY), "positive finite"),
    (Budget(BudgetScope.TOOL, "t", -1.0, Period.DAY), "positive finite"),
    (Budget(BudgetScope.TOOL, "t", float("nan"), Period.DAY), "positive finite"),
    (Budget(BudgetScope.TOOL, "t", float("inf"), Period.DAY), "positive finite"),
    (Budget(BudgetScope.TOOL, "t", 1.0, Period.DAY, soft=0.0), "soft"),
    (Budget(BudgetScope.TOOL, "t", 1.0, Period.DAY, soft=1.01), "soft"),
    (Budget(BudgetScope.TOOL, "t", 1.0, Period.DAY, soft=float("nan")), "soft"),
    (Budget(BudgetScope.TOOL, "", 1.0, Period.DAY), "subject"),
    (Budget(BudgetScope.TOOL, "x" * 201, 1.0, Period.DAY), "subject"),
    (Budget(BudgetScope.OWNER, "alice", 1.0, Period.DAY), "uid"),
    (Budget(BudgetScope.OWNER, "0100", 1.0, Period.DAY), "uid"),
])
def test_an_invalid_budget_is_refused_with_a_reason(budget: Budget, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        budget.validate()


@pytest.mark.parametrize("budget, past_the_edge, message", [
    (Budget(BudgetScope.TOOL, "x" * 200, 0.01, Period.MONTH, soft=1.0), {"subject": "x" * 201}, "subject"),
    (Budget(BudgetScope.TOOL, "x" * 200, 0.01, Period.MONTH, soft=1.0), {"soft": 1.0 + 1e-9}, "soft"),
    (Budget(BudgetScope.OWNER, "1000", 5.0, Period.WEEK), {"subject": "01000"}, "uid"),
    (Budget(BudgetScope.POOL, "gpus", 5e-9, Period.DAY, soft=1e-9), {"limit": 0.0}, "positive finite"),
    (Budget(BudgetScope.POOL, "gpus", 5e-9, Period.DAY, soft=1e-9), {"soft": 0.0}, "soft"),
])
def test_a_budget_at_each_bound_passes_and_one_step_past_it_is_refused(
        budget: Budget, past_the_edge: dict[str, Any], message: str) -> None:
    budget.validate()

    with pytest.raises(ValueError, match=message):
        replace(budget, **past_the_edge).validate()


NOON = at("2024-05-10T12:00+00:00")
MIDNIGHT = at("2024-05-10T00:00+00:00")
TODAY = [
    record("straddles", cpu(1, rate=1.0), granted=MIDNIGHT - 2 * H, released=MIDNIGHT + 2 * H),  # 2 of 4 h today
    record("yesterday", cpu(1, rate=1.0), granted=MIDNIGHT - 5 * H, released=MIDNIGHT - H),
    record("running", cpu(1, rate=3.0), granted=NOON - 2 * H),                                   # 6.0
    record("queued", cpu(1, rate=3.0), granted=None),
    record("other", cpu(1, rate=100.0), tool="lint", uid=1001, granted=MIDNIGHT),
    record("pooled", gpu(0, rate=2.0, pool="gpus"), cpu(1, rate=1.0), tool="lint", granted=NOON - H),
]


@pytest.mark.parametrize("budget, expected", [
    (Budget(BudgetScope.TOOL, "train", 100.0, Period.DAY), 8.0),
    (Budget(BudgetScope.TOOL, "train", 100.0, Period.WEEK), 2 * 4.0 + 6.0),
    (Budget(BudgetScope.OWNER, "1000", 100.0, Period.DAY), 8.0 + 3.0),
    (Budget(BudgetScope.OWNER, "1001", 100.0, Period.DAY), 1200.0),
    (Budget(BudgetScope.POOL, "gpus", 100.0, Period.DAY), 2.0),   # not the cpu charge beside it
    (Budget(BudgetScope.POOL, "none", 100.0, Period.DAY), 0.0),
])
def test_spent_counts_the_current_period_of_applicable_records_only(budget: Budget, expected: float) -> None:
    assert spent(budget, TODAY, NOON, UTC) == expected


@pytest.mark.parametrize("spent_, remaining, fraction, state", [
    (8.5, 1.5, 0.85, "soft"),
    (12.0, 0.0, 1.2, "exceeded"),
    (1 / 3, 9.666667, 0.033333, "ok"),
])
def test_budget_dict_shows_the_period_and_what_is_left(spent_: float, remaining: float, fraction: float,
                                                      state: str) -> None:
    budget = Budget(BudgetScope.POOL, "gpus", 10.0, Period.DAY)
    assert budget_dict(budget, spent_, NOON, UTC) == {
        "scope": "pool", "subject": "gpus", "period": "day", "limit": 10.0, "soft": 0.8,
        "spent": round(spent_, 6), "remaining": remaining, "fraction": fraction, "state": state,
        "period_start": MIDNIGHT, "period_end": MIDNIGHT + 24 * H,
    }


# -- usage (sacct) ------------------------------------------------------------

NOW = T0 + 600 + 2 * H
HISTORY = [
    # 2 h on 4 cores (2 used) and a GPU half used.
    record("A", cpu(4, rate=0.4), gpu(0, rate=2.0, pool="gpus"), uid=1000, created=T0, granted=T0 + 600,
           released=T0 + 600 + 2 * H, cpu_seconds=2 * 2 * H, gpu_utilisation=0.5),
    # running 2 h on a pool slot and 8 GiB, of which 2 GiB used; no CPU measurement.
    record("B", cpu(1, resource="build/0", pool="build"), memory(8 * GIB), uid=1001, created=T0 + 600,
           granted=T0 + 600, memory_peak=2 * GIB),
    # queued for 5 minutes, then withdrawn.
    record("C", tool=None, uid=1000, created=T0 + H, granted=None, released=T0 + H + 300),
]
EMPTY: dict[str, float] = {}


def row(key: str, allocations: int, active: int, resource_hours: dict[str, float], cost: float, waited: float,
        requested: dict[str, float], measured: dict[str, float], efficiency: dict[str, float]) -> dict[str, object]:
    return {"key": key, "allocations": allocations, "active": active, "resource_hours": resource_hours,
            "cost": cost, "waited_s": waited, "mean_wait_s": waited / allocations if allocations else 0.0,
            "requested": requested, "measured": measured, "efficiency": efficiency}


@pytest.mark.parametrize("by, expected", [
    ("tool", [
        row("train", 2, 1, {"cpu": 10.0, "gpu": 2.0, "memory": 16 * GIB}, 4.8, 600.0,
            {"cpu": 8.0, "gpu": 2.0, "memory": 16 * GIB}, {"cpu": 4.0, "gpu": 1.0, "memory": 4 * GIB},
            {"cpu": 0.5, "gpu": 0.5, "memory": 0.25}),
        row("-", 1, 0, EMPTY, 0.0, 300.0, EMPTY, EMPTY, EMPTY),
    ]),
    ("owner", [
        row("1000", 2, 0, {"cpu": 8.0, "gpu": 2.0}, 4.8, 900.0, {"cpu": 8.0, "gpu": 2.0}, {"cpu": 4.0, "gpu": 1.0},
            {"cpu": 0.5, "gpu": 0.5}),
        row("1001", 1, 1, {"cpu": 2.0, "memory": 16 * GIB}, 0.0, 0.0, {"memory": 16 * GIB}, {"memory": 4 * GIB},
            {"memory": 0.25}),
    ]),
    ("pool", [
        row("gpus", 1, 0, {"gpu": 2.0}, 4.0, 600.0, {"gpu": 2.0}, {"gpu": 1.0}, {"gpu": 0.5}),
        row("build", 1, 1, {"cpu": 2.0}, 0.0, 0.0, EMPTY, EMPTY, EMPTY),
    ]),
    ("resource", [
        row("gpu:0", 1, 0, {"gpu": 2.0}, 4.0, 600.0, {"gpu": 2.0}, {"gpu": 1.0}, {"gpu": 0.5}),
        row("cpu", 1, 0, {"cpu": 8.0}, 0.8, 600.0, {"cpu": 8.0}, {"cpu": 4.0}, {"cpu": 0.5}),
        row("build/0", 1, 1, {"cpu": 2.0}, 0.0, 0.0, EMPTY, EMPTY, EMPTY),
        row("memory", 1, 1, {"memory": 16 * GIB}, 0.0, 0.0, {"memory": 16 * GIB}, {"memory": 4 * GIB},
            {"memory": 0.25}),
    ]),
])
def test_usage_rows_by_each_key_are_exact(by: str, expected: list[dict[str, object]]) -> None:
    assert usage_rows(HISTORY, by, since=T0, now=NOW) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize("by", ["tool", "owner", "resource"])
def test_usage_totals_do_not_depend_on_the_grouping_of_whole_records(by: str) -> None:
    totals = usage_totals(usage_rows(HISTORY, by, since=T0, now=NOW))  # type: ignore[arg-type]
    assert totals == row("total", totals["allocations"], 2 if by == "resource" else 1, {"cpu": 10.0, "gpu": 2.0, "memory": 16 * GIB}, 4.8,
                         900.0 if by != "resource" else 1200.0, {"cpu": 8.0, "gpu": 2.0, "memory": 16 * GIB},
                         {"cpu": 4.0, "gpu": 1.0, "memory": 4 * GIB}, {"cpu": 0.5, "gpu": 0.5, "memory": 0.25})
    assert totals["allocations"] == {"tool": 3, "owner": 3, "resource": 4}[by]
    assert usage_totals([])["allocations"] == 0


def test_a_window_counts_only_the_held_time_inside_it() -> None:
    since = T0 + 600 + H  # the second hour of A, the second hour of B
    [train] = usage_rows(HISTORY, "tool", since=since, now=NOW)  # C was withdrawn before the window
    assert train == row("train", 2, 1, {"cpu": 5.0, "gpu": 1.0, "memory": 8 * GIB}, 2.4, 600.0,
                        {"cpu": 4.0, "gpu": 1.0, "memory": 8 * GIB}, {"cpu": 2.0, "gpu": 0.5, "memory": 2 * GIB},
                        {"cpu": 0.5, "gpu": 0.5, "memory": 0.25})


@pytest.mark.parametrize("since, now, allocations", [
    (T0 + H + 300, NOW, {"train": 2, "-": 1}),       # C was withdrawn at the start of the window: it counts
    (T0 + H + 301, NOW, {"train": 2}),               # C withdrawn before it
    (NOW + 1, NOW + H, {"train": 1}),                # A released before it too
    (T0 - H, T0 + 599, {"train": 1}),                # B and C not yet created; A still queued
])
def test_records_outside_the_window_are_left_out(since: float, now: float, allocations: dict[str, int]) -> None:
    rows = usage_rows(HISTORY, "tool", since=since, now=now)
    assert {r["key"]: r["allocations"] for r in rows} == allocations


def test_a_window_ending_before_a_release_counts_the_record_as_running_until_then() -> None:
    [train] = usage_rows(HISTORY[:1], "tool", since=T0, now=T0 + 600 + H)
    assert (train["active"], train["resource_hours"], train["measured"]) == (1, {"cpu": 4.0, "gpu": 1.0},
                                                                              {"cpu": 2.0, "gpu": 0.5})


def test_measured_use_is_shared_among_items_of_a_kind_by_amount() -> None:
    split = record("S", cpu(1, resource="build/0", pool="build"), cpu(3, resource="build/1", pool="build"),
                   granted=T0, released=T0 + H, cpu_seconds=2 * H)
    by_resource = {r["key"]: (r["requested"], r["measured"], r["efficiency"])
                   for r in usage_rows([split], "resource", since=T0, now=NOW)}
    assert by_resource == {"build/0": ({"cpu": 1.0}, {"cpu": 0.5}, {"cpu": 0.5}),
                           "build/1": ({"cpu": 3.0}, {"cpu": 1.5}, {"cpu": 0.5})}
    [pool] = usage_rows([split], "pool", since=T0, now=NOW)
    assert (pool["allocations"], pool["requested"], pool["measured"]) == (1, {"cpu": 4.0}, {"cpu": 2.0})


# -- percentiles and rounding up ----------------------------------------------


@pytest.mark.parametrize("values, q, expected", [  # numpy.percentile's own results
    ([1, 2, 3, 4], 0, 1.0),
    ([1, 2, 3, 4], 50, 2.5),
    ([1, 2, 3, 4], 90, 3.7),
    ([1, 2, 3, 4], 95, 3.8499999999999996),
    ([1, 2, 3, 4], 100, 4.0),
    ([3, 1, 2], 25, 1.5),
    ([3, 1, 2], 75, 2.5),
    ([1, 1, 2, 2, 2.5], 90, 2.3),
    ([1, 1, 2, 2, 2.5], 95, 2.4),
    ([0.2, 0.25, 0.3], 95, 0.295),
    ([1e9, 3e9, 2e9, 4e9, 1.5e9], 10, 1.2e9),
    ([7], 0, 7.0),
    ([7], 50, 7.0),
    ([7], 100, 7.0),
])
def test_percentile_matches_numpy_linear(values: list[float], q: float, expected: float) -> None:
    assert percentile(values, q) == expected


@pytest.mark.parametrize("values, q", [([], 50), ([1.0], -1), ([1.0], 100.5), ([1.0], float("nan"))])
def test_percentile_refuses_no_values_and_out_of_range_q(values: list[float], q: float) -> None:
    with pytest.raises(ValueError):
        percentile(values, q)


@pytest.mark.parametrize("value, step, expected", [
    (1.2 * 2.5, 0.5, 3.0),        # 3.0000000000000004
    (2.88, 0.5, 3.0),
    (3.01, 0.5, 3.5),
    (0.3 * 3, 0.1, 0.9),          # 0.8999999999999999
    (0.354, 0.1, 0.4),
    (0.0, 0.5, 0.0),
    (4050.0, 60, 4080.0),
    (float(1 << 30), 64 << 20, float(1 << 30)),
    ((1 << 30) + 1.0, 64 << 20, float((1 << 30) + (64 << 20))),
])
def test_ceil_to_rounds_up_to_a_step_without_float_error(value: float, step: float, expected: float) -> None:
    assert ceil_to(value, step) == expected


# -- recommendations ----------------------------------------------------------


def run(aid: str, start: float, duration: float, charges: tuple[Charge, ...], tool: str = "build",
        **measured: float) -> UsageRecord:
    return UsageRecord(aid, tool, 1000, start, start, start + duration, charges, measured)


BUILD_CHARGES = (cpu(4), memory(8 * GIB), gpu(0))
BUILD_RUNS = [  # cores used, peak memory, GPU utilisation, duration
    run(f"r{i}", T0 + i * H, seconds, BUILD_CHARGES, cpu_seconds=cores * seconds, memory_peak=peak,
        gpu_utilisation=util)
    for i, (cores, peak, util, seconds) in enumerate([
        (1.0, 1 * GIB, 0.2, 600.0), (1.0, 2 * GIB, 0.4, 900.0), (2.0, 2 * GIB, 0.6, 1200.0),
        (2.0, 3 * GIB, 0.8, 1500.0), (2.5, 4 * GIB, 0.9, 3000.0),
    ])
]


def test_recommend_asks_for_the_p95_with_headroom() -> None:
    result = recommend("build", BUILD_RUNS, now=T0 + 10 * H)
    assert result["evidence"] == {
        "cpu": {"requested_p50": 4.0, "p50": 2.0, "p90": 2.3, "p95": 2.4, "max": 2.5, "samples": 5},
        "memory": {"requested_p50": 8 * GIB, "p50": 2 * GIB, "p90": 3.6 * GIB, "p95": 3.8 * GIB, "max": 4 * GIB,
                   "samples": 5},
        "gpu": {"requested_p50": 1.0, "p50": 0.6, "p90": 0.86, "p95": 0.88, "max": 0.9, "samples": 5},
        "duration_s": {"requested_p50": None, "p50": 1200.0, "p90": 2400.0, "p95": 2700.0, "max": 3000.0,
                       "samples": 5},
    }
    # cpu 2.4 * 1.2 = 2.88 -> 3; memory 3.8G * 1.2 = 72.96 * 64M -> 73 * 64M; whole GPU; 2700 s * 1.5 -> 4080 s.
    assert result["recommendation"] == {"cpu": 3.0, "memory": 73 * (64 << 20), "gpu": 1.0, "ttl_s": 4080.0}
    assert result["args"] == ["--cpu", "3", "--mem", "4.6G", "--gpu", "1", "--ttl", "68m"]
    assert (result["tool_id"], result["runs"], result["enough"]) == ("build", 5, True)
    assert result["basis"] == "5 runs from 2023-11-14T22:13:20+00:00 to 2023-11-15T03:03:20+00:00"


def test_recommend_uses_only_the_newest_ended_measured_runs_of_the_tool() -> None:
    others = [
        run("other-tool", T0, 600.0, (cpu(1),), tool="lint", cpu_seconds=60000.0),
        run("unmeasured", T0 + 20 * H, 600.0, (cpu(1),)),
        record("running", cpu(1), tool="build", granted=T0 + 20 * H, cpu_seconds=1e6),
    ]
    result = recommend("build", BUILD_RUNS + others, now=T0 + 30 * H, runs=2)
    assert (result["runs"], result["enough"], result["evidence"]["cpu"]["max"]) == (2, False, 2.5)
    assert result["evidence"]["cpu"]["p50"] == 2.25  # runs r3 (2.0) and r4 (2.5)
    assert result["basis"].startswith("2 runs from 2023-11-15T01:13:20+00:00")


@pytest.mark.parametrize("cores, expected", [(0.01, 0.5), (2.5, 3.0), (2.6, 3.5)])
def test_recommended_cpu_has_a_floor_and_is_not_fooled_by_float_error(cores: float, expected: float) -> None:
    runs = [run(f"r{i}", T0 + i * H, 1000.0, (cpu(4),), cpu_seconds=cores * 1000) for i in range(3)]
    assert recommend("build", runs, now=T0 + 10 * H)["recommendation"]["cpu"] == expected


@pytest.mark.parametrize("held, utilisation, expected", [
    (0.5, (0.4, 0.5, 0.6), 0.4),   # uses 0.2..0.3 of a GPU: p95 0.295 * 1.2 -> 0.4
    (0.9, (1.0, 1.0, 1.0), 1.0),   # 0.9 * 1.2 = 1.08: a share is at most one GPU
    (0.5, (0.0, 0.0, 0.0), 0.1),
    (2.0, (0.9, 0.95, 1.0), 2.0),  # whole devices: ceil(p95)
    (2.0, (0.1, 0.1, 0.1), 1.0),
])
def test_recommended_gpus_are_whole_or_a_share_as_they_were_asked_for(held: float, utilisation: tuple[float, ...],
                                                                     expected: float) -> None:
    runs = [run(f"r{i}", T0 + i * H, 1000.0, (gpu(0, amount=held),), gpu_utilisation=u)
            for i, u in enumerate(utilisation)]
    assert recommend("build", runs, now=T0 + 10 * H)["recommendation"]["gpu"] == expected


def test_too_few_runs_are_not_enough() -> None:
    result = recommend("build", BUILD_RUNS[:2], now=T0 + 10 * H)
    assert (result["runs"], result["enough"]) == (2, False)
    assert result["recommendation"]["cpu"] == 1.5  # 1.0 * 1.2 -> 1.5


def test_no_measured_runs_give_no_recommendation() -> None:
    result = recommend("build", [run("r", T0, 600.0, (cpu(1),))], now=T0 + H)
    assert result == {"tool_id": "build", "runs": 0, "basis": "no measured runs", "evidence": {},
                      "recommendation": {}, "args": [], "enough": False}


def test_only_measured_kinds_are_recommended() -> None:
    runs = [run(f"r{i}", T0 + i * H, 600.0, (cpu(1),), memory_peak=100e6) for i in range(3)]
    result = recommend("build", runs, now=T0 + 10 * H)
    assert set(result["recommendation"]) == {"memory", "ttl_s"}
    assert result["args"] == ["--mem", "128M", "--ttl", "15m"]


# -- oversized allocations ----------------------------------------------------

LATER = T0 + 1200


@pytest.mark.parametrize("charges, measured, expected", [
    ((cpu(8),), {"cpu_seconds": 600.0}, [("cpu", 8, 0.5, 0.0625, "holds 8 cores, uses 0.5: ask for 1")]),
    ((memory(16 * GIB),), {"memory_peak": GIB}, [("memory", 16 * GIB, GIB, 0.0625,
                                                 "holds 16G, uses 1G: ask for 1.3G")]),
    ((gpu(0), gpu(1)), {"gpu_utilisation": 0.1}, [("gpu", 2, 0.2, 0.1, "holds 2 GPUs, uses 0.2: ask for 1")]),
    ((gpu(0),), {"gpu_utilisation": 0.1}, [("gpu", 1, 0.1, 0.1, "holds 1 GPU, uses 0.1: ask for 0.2")]),
    ((cpu(8),), {"cpu_seconds": 2400.0}, []),              # uses 2 of 8: exactly the ratio is not below it
    ((cpu(0.5),), {"cpu_seconds": 12.0}, []),              # could not ask for less than 0.5
    ((cpu(8), memory(16 * GIB)), {}, []),                  # nothing measured
    ((cpu(8),), {"memory_peak": GIB}, []),                 # measured, but not what it holds
])
def test_oversized_running_allocations_are_pointed_at_what_they_use(
        charges: tuple[Charge, ...], measured: dict[str, float],
        expected: list[tuple[str, float, float, float, str]]) -> None:
    held = UsageRecord("a1", "train", 1000, T0, T0, None, charges, measured)
    assert oversized([held], LATER) == [
        {"allocation_id": "a1", "tool_id": "train", "kind": kind, "held": amount, "used": used, "ratio": ratio,
         "since": T0, "suggestion": suggestion + " (see `mcpctl recommend train`)"}
        for kind, amount, used, ratio, suggestion in expected
    ]


@pytest.mark.parametrize("held", [
    record("young", cpu(8), granted=LATER - 599, cpu_seconds=1.0),
    record("released", cpu(8), granted=T0, released=LATER, cpu_seconds=1.0),
    record("queued", cpu(8), granted=None, cpu_seconds=1.0),
])
def test_only_running_allocations_of_some_age_are_oversized(held: UsageRecord) -> None:
    assert oversized([held], LATER) == []


def test_oversized_lists_the_least_used_first_and_needs_no_tool() -> None:
    found = oversized([record("a", cpu(8), cpu_seconds=1200.0), record("b", cpu(8), tool=None, cpu_seconds=120.0)],
                      LATER, min_age_s=60, ratio=0.5)
    assert [(f["allocation_id"], f["ratio"]) for f in found] == [("b", 0.0125), ("a", 0.125)]
    assert found[0]["suggestion"] == "holds 8 cores, uses 0.1: ask for 0.5"


def test_a_few_seconds_of_use_keeps_its_efficiency_in_the_rows_and_the_totals() -> None:
    short = record("s1", cpu(0.5), granted=T0, released=T0 + 3.0, cpu_seconds=1.07)
    rows = usage_rows([short], "tool", T0 - H, T0 + H)
    assert rows[0]["efficiency"]["cpu"] == pytest.approx(1.07 / 1.5, rel=1e-5)
    assert usage_totals(rows)["efficiency"]["cpu"] == pytest.approx(rows[0]["efficiency"]["cpu"], rel=1e-4)
