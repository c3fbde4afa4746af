"""Retention of events, ended allocations and idempotency keys, with a fake clock (issue 13, item 13)."""

from __future__ import annotations

import os
from pathlib import Path
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import CONFIG
from mcpresd.core.accounting import UsageRecord
from mcpresd.store import Store
from tests.integration.test_usage_totals import ended_allocation
from tests.live import T0, LiveDaemon

DAY = 86400.0
HOUR = 3600.0
OLD = 1200

RETAINED = CONFIG + """
[scheduler]
tick_interval = "60s"  # the test ticks

[retention]
events_days = 1
ended_allocations_days = 2
key_expiry = "1h"
"""


@pytest.fixture
def kept(tmp_path: Path) -> Iterator[LiveDaemon]:
    """A daemon keeping 1 day of events, 2 of ended allocations and keys for 1 hour, on a database that
    already holds OLD events from 3 days ago and OLD allocations that ended 5 days ago."""
    store = Store(tmp_path / "state.db")
    with store.transaction():
        for n in range(OLD):
            store.insert_event(T0 - 3 * DAY + n, "test.old", detail={"n": n})
            allocation = ended_allocation(n, T0 - 5 * DAY)
            store.insert_allocation(allocation)
            store.add_usage(UsageRecord(allocation.id, allocation.tool_id, allocation.owner_uid,
                                        allocation.created_at, allocation.granted_at, allocation.released_at,
                                        allocation.charges, allocation.measured or {}))
    store.close()
    daemon = LiveDaemon(tmp_path, RETAINED).start()
    try:
        yield daemon
    finally:
        daemon.close()


def counts(live: LiveDaemon) -> tuple[int, int, int]:
    """Old events, allocations, allocation items."""
    def count(broker: Any) -> tuple[int, int, int]:
        conn = broker.store.conn
        return tuple(conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]  # type: ignore[return-value]
                     for table in ("events WHERE kind = 'test.old'", "allocations", "allocation_items"))
    result: tuple[int, int, int] = live.on_store(count)
    return result


def test_old_events_and_ended_allocations_are_pruned_in_batches_and_usage_keeps_their_totals(
        kept: LiveDaemon) -> None:
    live = kept
    recent = live.call("allocate", {"resources": [{"resource": "licence", "amount": 1}], "tool_id": "tool0",
                                    "holder_pid": os.getpid()})
    live.clock.now += HOUR
    live.call("release", {"id": recent["id"]})
    events, allocations, items = counts(live)
    assert (events, allocations, items) == (OLD, OLD + 1, OLD + 1)
    before = live.call("usage", {"by": "tool", "since": 30 * DAY})

    live.tick()
    assert counts(live) == (events - 500, allocations - 500, items - 500), "one batch of each per tick"
    for _ in range(3):
        live.tick()
    assert counts(live) == (0, 1, 1), "the recent allocation is kept"
    assert live.call("allocations.get", {"id": recent["id"]})["state"] == "released"
    assert live.call("daemon.status")["allocations"]["released"] == 1
    kinds = {e["kind"] for e in live.call("events.list", {"limit": 10_000})}
    assert "test.old" not in kinds and "released" in kinds

    after = live.call("usage", {"by": "tool", "since": 30 * DAY})
    assert after["rows"] == before["rows"] and after["totals"] == before["totals"]
    assert after["since"] == (live.clock.now - 30 * DAY) // HOUR * HOUR, "past what is kept: from the hour"


def test_a_key_past_its_expiry_makes_a_new_allocation_once_the_old_one_ended(kept: LiveDaemon) -> None:
    live = kept
    request = {"resources": [{"resource": "licence", "amount": 1}], "holder_pid": os.getpid(),
               "idempotency_key": "nightly"}
    first = live.call("allocate", request)
    live.clock.now += 2 * HOUR
    assert live.call("allocate", request)["id"] == first["id"], "still held: the key keeps its allocation"
    live.call("release", {"id": first["id"]})
    again = live.call("allocate", request)
    assert again["id"] != first["id"] and again["state"] == "active"
    assert live.call("allocate", request)["id"] == again["id"], "the key now names the new allocation"
    assert live.call("allocations.get", {"id": first["id"]})["idempotency_key"] is None
    live.call("release", {"id": again["id"]})
    assert live.call("allocate", request)["id"] == again["id"], "within its expiry it returns the ended one"
    live.clock.now += HOUR
    different = {**request, "resources": [{"resource": "slot", "amount": 1}]}
    assert live.call("allocate", different)["state"] == "active", "an expired key is no conflict"


def test_event_ids_keep_rising_after_every_event_was_old_enough_to_prune(tmp_path: Path) -> None:
    """A quiet daemon prunes every event it has; the next event must not reuse id 1 (subscribers resume
    with after_id, and the lock file's high-water mark would call the restart a loss of commits)."""
    live = LiveDaemon(tmp_path, RETAINED).start()
    try:
        held = live.call("allocate", {"resources": [{"resource": "licence", "amount": 1}],
                                      "holder_pid": os.getpid()})
        live.call("release", {"id": held["id"]})
        newest = max(event["id"] for event in live.call("events.list", {"limit": 10_000}))
        live.clock.now += 3 * DAY
        for _ in range(3):
            live.tick()
        later = live.call("allocate", {"resources": [{"resource": "licence", "amount": 1}],
                                       "holder_pid": os.getpid()})
        ids = [event["id"] for event in live.call("events.list", {"limit": 10_000})
               if event.get("allocation_id") == later["id"]]
        assert ids and min(ids) > newest, f"event ids reused: {ids} after #{newest}"
    finally:
        live.close()
    restarted = LiveDaemon(tmp_path, RETAINED).start()
    try:
        assert restarted.call("daemon.status").get("lost_commits") is None, "a restart after pruning lost nothing"
    finally:
        restarted.close()
