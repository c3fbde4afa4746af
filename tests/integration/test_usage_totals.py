"""`usage` and budgets read hourly totals kept as allocations end, not every ended allocation (issue 13, item 11)."""

from __future__ import annotations

import os
import sqlite3
from dataclasses import replace
from typing import Any

import pytest

from mcpresd.core import accounting
from mcpresd.core.accounting import Charge
from mcpresd.core.model import Allocation, AllocationItem, HolderKind
from mcpresd.protocol import AllocationState, Priority
from tests.live import T0, LiveDaemon, live  # noqa: F401 - a fixture

MINUTE = 60.0
HOUR = 3600.0
ENDED = 6_000


def ended_allocation(n: int, start: float, every: float = 7.0) -> Allocation:
    granted = start + n * every
    return Allocation(
        id=f"bulk{n:012x}", state=AllocationState.RELEASED, items=(AllocationItem("licence", 1.0),),
        priority=Priority.NORMAL, owner_uid=os.getuid(), created_at=granted - 2.0, tool_id=f"tool{n % 3}",
        holder_kind=HolderKind.NONE, granted_at=granted, released_at=granted + 360.0, release_reason="released",
        charges=(Charge("licence", "custom", 1.0, 1.5, None),), measured={"cpu_seconds": 36.0})


def bulk_end(live: LiveDaemon, count: int, start: float) -> None:
    """`count` ended allocations written through the store, as ending them would write them."""
    def job(first: int) -> Any:
        def end(broker: Any) -> None:
            for n in range(first, min(count, first + 1000)):
                allocation = ended_allocation(n, start)
                broker.store.insert_allocation(allocation)
                broker.store.add_usage(broker.accounts.record(allocation))
        return end

    for first in range(0, count, 1000):
        live.on_store(job(first))


def sqlite_steps(live: LiveDaemon, work: Any) -> int:
    """How many times SQLite's progress handler fired (every 100 VM steps) on the store's connection during
    `work()`."""
    steps = [0]

    def count() -> int:
        steps[0] += 1
        return 0

    live.on_store(lambda broker: broker.store.conn.set_progress_handler(count, 100))
    try:
        work()
    finally:
        live.on_store(lambda broker: broker.store.conn.set_progress_handler(None, 100))
    return steps[0]


def test_usage_reads_totals_not_every_ended_allocation(live: LiveDaemon) -> None:
    start = T0 - 2 * 86400
    bulk_end(live, ENDED, start)
    live.clock.now = start + ENDED * 7.0 + HOUR
    one_pass = sqlite_steps(live, lambda: live.on_store(lambda broker: broker.store.ended_since(start)))
    shown: dict[str, Any] = {}
    usage_steps = sqlite_steps(live, lambda: shown.update(live.call("usage", {"by": "tool", "since": 30 * 86400})))
    totals = shown["totals"]
    assert totals["allocations"] == ENDED
    assert totals["cost"] == pytest.approx(ENDED * 1.5 * 0.1, abs=1e-6), "each held 6 minutes at 1.5 an hour"
    assert totals["resource_hours"]["custom"] == pytest.approx(ENDED * 0.1, abs=1e-6)
    assert totals["waited_s"] == pytest.approx(ENDED * 2.0)
    assert {row["key"] for row in shown["rows"]} == {"tool0", "tool1", "tool2"}
    assert usage_steps * 10 < one_pass, f"usage took {usage_steps} steps; one pass over the history {one_pass}"


def test_a_budget_check_reads_totals_not_the_periods_allocations(live: LiveDaemon) -> None:
    start = T0 - 6 * HOUR
    bulk_end(live, ENDED // 4, start)
    live.call("budgets.set", {"scope": "tool", "subject": "tool1", "limit": 1e6, "period": "month"})
    other = live.call("allocate", {"resources": [{"resource": "slot", "amount": 1}], "holder_pid": os.getpid()})
    live.call("release", {"id": other["id"]})  # an allocation ended since the budget was last summed
    one_pass = sqlite_steps(live, lambda: live.on_store(lambda broker: broker.store.ended_since(start)))
    granted: dict[str, Any] = {}
    steps = sqlite_steps(live, lambda: granted.update(live.call("allocate", {
        "resources": [{"resource": "slot", "amount": 1}], "tool_id": "tool1", "holder_pid": os.getpid()})))
    assert granted["state"] == "active"
    [budget] = live.call("budgets.list")
    assert budget["spent"] == pytest.approx(len(range(1, ENDED // 4, 3)) * 1.5 * 0.1, abs=1e-6)
    assert steps * 10 < one_pass, f"allocate took {steps} steps; one pass over the period {one_pass}"


SPANS = [  # (minutes after the previous event, action); g is held through more than a day: a span
    (0, "a"), (0.5, "g"), (7, "b"), (50, "release a"), (13, "c"), (95, "release b"), (1, "d"), (61, "release c"),
    (200, "release d"), (3, "e"), (30, "release e measured"), (1700, "release g measured"), (2, "f"),
]


@pytest.mark.parametrize("since_minutes", [1, 17, 59.5, 60, 61, 125, 247, 301, 1000, 1999.5, 10_000])
@pytest.mark.parametrize("by", ["tool", "owner", "pool", "resource"])
def test_usage_from_hourly_totals_equals_a_full_scan(live: LiveDaemon, by: str, since_minutes: float) -> None:
    live.call("pools.create", {"name": "builds", "factory": "slots", "parent": "slot", "slot_size": 2, "min": 2,
                               "max": 2, "cost_per_unit_hour": 0.25})
    live.clock.now = T0 + 23 * MINUTE + 11.5  # not on the hour
    held: dict[str, str] = {}
    for minutes, action in SPANS:
        live.clock.now += minutes * MINUTE
        if action.startswith("release"):
            name = action.split()[1]
            measured = {"cpu_seconds": 900.0, "memory_peak": 1e6} if "measured" in action else None
            live.call("release", {"id": held[name], **({"measured": measured} if measured else {})})
            continue
        resources = ([{"resource": "licence", "amount": 1}] if action in "ace"
                     else [{"resource": "pool:builds", "amount": 1}, {"resource": "slot", "amount": 2}])
        held[action] = live.call("allocate", {"resources": resources, "tool_id": f"t-{action}",
                                              "holder_pid": os.getpid()})["id"]
    live.call("release", {"id": held["a"], "measured": {"cpu_seconds": 60.0}})  # a report after the end
    now = live.clock.now
    shown = live.call("usage", {"by": by, "since": since_minutes * MINUTE})

    def scan(broker: Any, grouping: str = by) -> list[dict[str, Any]]:
        records = [broker.accounts.record(a) for a in broker.store.ended_since(0)]
        records += [broker.accounts.record(a) for a in broker.live.values()]
        return accounting.usage_rows(records, grouping, now - since_minutes * MINUTE, now)

    expected = live.on_store(scan)
    assert shown["since"] == now - since_minutes * MINUTE
    assert [row["key"] for row in shown["rows"]] == [row["key"] for row in expected]
    for row, want in zip(shown["rows"], expected):
        assert row == approx_row(want)
    totals = accounting.usage_totals(expected)
    if by == "resource":  # an allocation is in every resource's row: its total counts it once, as the tool rows do
        once = accounting.usage_totals(live.on_store(lambda broker: scan(broker, "tool")))
        totals.update({field: once[field] for field in ("allocations", "active", "waited_s", "mean_wait_s")})
    assert shown["totals"] == approx_row(totals)


def approx_row(row: dict[str, Any]) -> dict[str, Any]:
    return {k: (pytest.approx(v, rel=1e-9, abs=1e-9) if isinstance(v, (int, float)) else
                {kind: pytest.approx(x, rel=1e-9, abs=1e-9) for kind, x in v.items()} if isinstance(v, dict) else v)
            for k, v in row.items()}


def test_the_migrations_sum_and_count_the_allocations_that_ended_before_them(tmp_path: Any) -> None:
    from mcpresd.store import Store

    def hours(store: Store) -> list[tuple[Any, ...]]:
        return store.conn.execute("SELECT * FROM usage_hours ORDER BY grouping, hour, owner_uid, key, kind,"
                                  " through").fetchall()

    path = tmp_path / "state.db"
    store = Store(path)
    with store.transaction():
        for n in range(200):
            allocation = ended_allocation(n, T0 + 11.0, every=97.0)  # 6 minutes each, over 5.4 hours
            store.insert_allocation(allocation)
            store.add_usage(store_record(allocation))
    kept = hours(store)
    with store.transaction():
        store.conn.execute("DROP TABLE usage_hours")
        store.conn.execute("DROP TABLE usage_spans")
        store.conn.execute("DROP INDEX allocations_by_grant")
        store.conn.execute("DELETE FROM _sqlite_migrations WHERE name = 'm004_usage_hours'")
        for trigger in ("insert", "change", "delete"):
            store.conn.execute(f"DROP TRIGGER IF EXISTS allocations_counted_on_{trigger}")  # gone since m008
        store.conn.execute("DROP TABLE allocation_counts")
        store.conn.execute("DELETE FROM _sqlite_migrations WHERE name = 'm005_allocation_counts'")
    store.close()
    store = Store(path)  # migrates: the hourly totals and the counts of what ended before
    try:
        backfilled = hours(store)
        assert len(backfilled) == len(kept) > 4 * 6
        for row, want in zip(backfilled, kept):
            assert row[:6] == want[:6]
            assert [v is None for v in row[6:]] == [v is None for v in want[6:]]
            assert [v for v in row[6:] if v is not None] == pytest.approx([v for v in want[6:] if v is not None],
                                                                          rel=1e-12)
        assert sum(row[2] for row in store.usage_totals("tool", 0)) == 200
        assert store.count_allocations() == {"queued": 0, "active": 0, "released": 200, "withdrawn": 0}
    finally:
        store.close()


def store_record(allocation: Allocation) -> accounting.UsageRecord:
    return accounting.UsageRecord(allocation.id, allocation.tool_id, allocation.owner_uid, allocation.created_at,
                                  allocation.granted_at, allocation.released_at, allocation.charges,
                                  allocation.measured or {})


def test_status_counts_allocations_by_state_without_reading_them(live: LiveDaemon) -> None:
    bulk_end(live, ENDED, T0 - 2 * 86400)
    held = live.call("allocate", {"resources": [{"resource": "licence", "amount": 2}], "holder_pid": os.getpid()})
    waiting = live.call("allocate", {"resources": [{"resource": "licence", "amount": 1}], "holder_pid": os.getpid(),
                                     "wait": 600, "detach": True})
    cancelled = live.call("allocate", {"resources": [{"resource": "licence", "amount": 1}],
                                       "holder_pid": os.getpid(), "wait": 600, "detach": True})
    live.call("release", {"id": cancelled["id"]})
    assert waiting["state"] == "queued" and held["state"] == "active"
    one_pass = sqlite_steps(live, lambda: live.on_store(lambda broker: broker.store.conn.execute(
        "SELECT state, count(*) FROM allocations GROUP BY state").fetchall()))
    shown: dict[str, Any] = {}
    steps = sqlite_steps(live, lambda: shown.update(live.call("daemon.status")))
    assert shown["allocations"] == {"active": 1, "queued": 1, "released": ENDED, "withdrawn": 1}
    live.call("release", {"id": held["id"]})
    assert live.call("daemon.status")["allocations"] == {"active": 1, "queued": 0, "released": ENDED + 1,
                                                         "withdrawn": 1}
    assert steps * 10 < one_pass, f"daemon.status took {steps} steps; counting the allocations {one_pass}"


def test_recommend_reads_only_measured_runs(live: LiveDaemon) -> None:
    def job(broker: Any) -> None:
        for n in range(3):  # measured, before the rest
            broker.store.insert_allocation(replace(ended_allocation(n, T0 - 3 * 86400), tool_id="sim"))
        for n in range(3, ENDED):
            broker.store.insert_allocation(replace(ended_allocation(n, T0 - 2 * 86400), tool_id="sim",
                                                   measured=None))

    live.on_store(job)
    one_pass = sqlite_steps(live, lambda: live.on_store(lambda broker: broker.store.conn.execute(
        "SELECT count(*) FROM allocations WHERE tool_id = 'sim' AND measured IS NULL").fetchall()))
    shown: dict[str, Any] = {}
    steps = sqlite_steps(live, lambda: shown.update(live.call("recommend", {"tool_id": "sim", "runs": 3})))
    assert shown["runs"] == 3 and shown["evidence"]["cpu"]["p50"] == pytest.approx(0.1)
    assert steps * 10 < one_pass, f"recommend took {steps} steps; one pass over the tool's runs {one_pass}"


def test_a_long_hold_is_summed_as_a_span_not_an_hour_at_a_time(live: LiveDaemon) -> None:
    held = live.call("allocate", {"resources": [{"resource": "licence", "amount": 2}], "tool_id": "service",
                                  "holder_pid": os.getpid()})
    live.clock.now += 365 * 86400 + 17 * MINUTE
    live.call("release", {"id": held["id"], "measured": {"cpu_seconds": 3600.0}})
    rows = live.on_store(lambda broker: broker.store.conn.execute(
        "SELECT (SELECT count(*) FROM usage_hours) + (SELECT count(*) FROM usage_spans)").fetchone()[0])
    assert rows < 100, f"{rows} rows for one allocation"
    usage = live.call("usage", {"by": "tool", "since": 366 * 86400})
    [row] = usage["rows"]
    assert row["cost"] == pytest.approx(2 * 1.5 * (365 * 24 + 17 / 60), rel=1e-12)
    part = live.call("usage", {"by": "tool", "since": 50 * 86400 + 7.5})["rows"][0]  # within what is kept
    assert part["cost"] == pytest.approx(2 * 1.5 * (50 * 24 + 7.5 / 3600), rel=1e-12)


def test_a_list_of_one_state_reads_only_that_states_allocations(live: LiveDaemon) -> None:
    bulk_end(live, ENDED, T0 - 2 * 86400)
    live.call("allocate", {"resources": [{"resource": "licence", "amount": 2}], "holder_pid": os.getpid()})
    cancelled = live.call("allocate", {"resources": [{"resource": "licence", "amount": 1}], "wait": 600,
                                       "detach": True, "holder_pid": os.getpid()})
    live.call("release", {"id": cancelled["id"]})
    one_pass = sqlite_steps(live, lambda: live.on_store(lambda broker: broker.store.conn.execute(
        "SELECT count(*) FROM allocations WHERE +state = 'withdrawn'").fetchall()))
    shown: list[Any] = []
    steps = sqlite_steps(live, lambda: shown.extend(live.call("allocations.list", {"state": "withdrawn"})))
    assert [a["id"] for a in shown] == [cancelled["id"]]
    assert steps * 10 < one_pass, f"allocations.list took {steps} steps; one pass over the history {one_pass}"


def test_a_budgets_spending_kept_as_allocations_end_equals_a_fresh_sum(live: LiveDaemon) -> None:
    live.call("pools.create", {"name": "builds", "factory": "slots", "parent": "slot", "slot_size": 2, "min": 2,
                               "max": 2, "cost_per_unit_hour": 0.25})
    for scope, subject in [("tool", "t-b"), ("owner", str(os.getuid())), ("pool", "builds")]:
        live.call("budgets.set", {"scope": scope, "subject": subject, "limit": 1e6, "period": "week"})
    live.clock.now = T0 + 23 * MINUTE + 11.5
    held: dict[str, str] = {}
    for minutes, action in SPANS:
        live.clock.now += minutes * MINUTE
        if action.startswith("release"):
            live.call("release", {"id": held[action.split()[1]]})
            continue
        resources = ([{"resource": "licence", "amount": 1}] if action in "ace"
                     else [{"resource": "pool:builds", "amount": 1}, {"resource": "slot", "amount": 2}])
        held[action] = live.call("allocate", {"resources": resources, "tool_id": f"t-{action}"[:3],
                                              "holder_pid": os.getpid()})["id"]
    kept = {(b["scope"], b["subject"]): b["spent"] for b in live.call("budgets.list")}
    live.on_store(lambda broker: broker.accounts.load())  # forgets what it kept: sums the week afresh
    fresh = {(b["scope"], b["subject"]): b["spent"] for b in live.call("budgets.list")}
    assert kept == pytest.approx(fresh, abs=1e-6) and len(kept) == 3
    assert all(spent > 0 for spent in kept.values())


def test_usage_summed_in_memory_survives_sigkill_counted_once(tmp_path: Any) -> None:
    """Usage (and the count of allocations by state) is written at the next tick or read; a kill -9 before it
    loses nothing, and what was written before it is not counted again at start-up."""
    from tests.conftest import CONFIG, DaemonProcess

    daemon = DaemonProcess(tmp_path, config=CONFIG + '[scheduler]\ntick_interval = "60s"\n')
    daemon.start()
    try:
        def release(count: int, tool: str) -> None:
            with daemon.client() as client:
                for _ in range(count):
                    held = client.call("allocate", {"resources": [{"resource": "licence", "amount": 2},
                                                                  {"resource": "slot", "amount": 1}],
                                                    "tool_id": tool, "holder_pid": os.getpid()})
                    client.call("release", {"id": held["id"], "measured": {"cpu_seconds": 1.0}})

        def usage(by: str) -> dict[str, dict[str, Any]]:
            with daemon.client() as client:
                return {row["key"]: row for row in client.call("usage", {"by": by, "since": 86400})["rows"]}

        release(3, "written")
        before = usage("tool")  # the read writes what was summed in memory
        assert before["written"]["allocations"] == 3
        release(5, "unwritten")
        release(2, "written")
        with daemon.client() as client:
            client.call("allocate", {"resources": [{"resource": "slot", "amount": 1}], "holder_pid": os.getpid()})
            counted = client.call("daemon.status")["allocations"]
        assert counted == {"queued": 0, "active": 1, "released": 10, "withdrawn": 0}
        with sqlite3.connect(f"file:{daemon.db}?mode=ro", uri=True) as db:
            unflushed = db.execute("SELECT count(*) FROM usage_unflushed").fetchone()[0]
        assert unflushed == 7  # no tick and no read since: their usage is only in memory (and named there)
        daemon.kill()
        daemon.start()
        by_tool, by_resource = usage("tool"), usage("resource")
        with daemon.client() as client:
            assert client.call("daemon.status")["allocations"] == counted  # counted in memory, as usage is
        assert by_tool["written"]["allocations"] == 5 and by_tool["unwritten"]["allocations"] == 7 - 2
        assert by_resource["licence"]["allocations"] == 10 and by_resource["slot"]["allocations"] == 10 + 1  # live
        assert by_resource["licence"]["cost"] == pytest.approx(sum(  # each row's cost is rounded to 6 places
            row["cost"] for row in by_tool.values()), abs=1e-5)
        daemon.kill()  # after the read wrote it all: nothing is summed again
        daemon.start()
        again = usage("tool")
        assert again["written"] == by_tool["written"] and again["unwritten"] == by_tool["unwritten"]
        with daemon.client() as client:
            assert client.call("daemon.status")["allocations"] == counted
    finally:
        daemon.stop()


def test_usage_summed_in_memory_follows_the_transactions_that_commit(tmp_path: Any) -> None:
    """An end rolled back is not summed; a flush rolled back leaves its usage to the next one; counts alike."""
    from mcpresd.store import Store

    store = Store(tmp_path / "state.db")
    try:
        def end(n: int) -> None:
            allocation = ended_allocation(n, T0)
            store.insert_allocation(replace(allocation, state=AllocationState.ACTIVE, released_at=None,
                                            release_reason=None))
            store.end_usage(store_record(allocation))
            store.mark_ended(allocation)

        with store.transaction():
            end(0)
        store.begin()
        end(1)
        store.rollback()
        assert store.count_allocations()["released"] == 1
        assert store.metric_counters()[0] == {"grants": 1, "releases": 1, "withdrawals": 0, "timeouts": 0,
                                              "wait_sum": 2.0}
        store.begin()
        store.flush_usage()
        assert sum(row[2] for row in store.usage_totals("tool", 0)) == 1
        store.rollback()
        assert store.conn.execute("SELECT grants, releases FROM metric_totals").fetchone() == (0, 0)
        with store.transaction():
            end(2)
        assert store.count_allocations() == {"queued": 0, "active": 0, "released": 2, "withdrawn": 0}
        assert sum(row[2] for row in store.usage_totals("tool", 0)) == 2
        assert store.conn.execute("SELECT grants, releases, wait_sum FROM metric_totals").fetchone() == (2, 2, 4.0)
        assert store.conn.execute("SELECT count(*) FROM usage_unflushed").fetchone()[0] == 0
    finally:
        store.close()
    store = Store(tmp_path / "state.db")
    try:
        assert sum(row[2] for row in store.usage_totals("tool", 0)) == 2
        assert store.count_allocations() == {"queued": 0, "active": 0, "released": 2, "withdrawn": 0}
        counters, buckets = store.metric_counters()
        assert counters == {"grants": 2, "releases": 2, "withdrawals": 0, "timeouts": 0, "wait_sum": 4.0}
        assert buckets[2:4] == [(1.0, 0), (10.0, 2)]  # each waited 2 s
    finally:
        store.close()
