"""A failed commit must not lose a waiting client: what the rolled-back work settled waits again.

The broker runs on a real SQLite store; the daemon's recovery after a failed transaction (ROLLBACK, then
`Broker.reload()`) is driven by hand, as GroupCommitter does it.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from mcpresd import params as p
from mcpresd.core.errors import LimitExceeded
from mcpresd.service import Broker, Caller
from mcpresd.store import Store

ME = Caller(uid=os.getuid(), gid=os.getgid(), pid=os.getpid(), connection=1)
OTHER = Caller(uid=os.getuid(), gid=os.getgid(), pid=os.getpid(), connection=2)


def rig(tmp_path: Path) -> Broker:
    broker = Broker(Store(tmp_path / "state.db"))
    with broker.store.transaction():
        broker.resources_add(ME, p.add_resource({"name": "one", "capacity": 1}))
    broker.take_outbox()
    return broker


def allocate(broker: Broker, caller: Caller, waiter: Any = None, **extra: Any) -> dict[str, Any]:
    command = p.allocate({"resources": [{"resource": "one", "amount": 1}], **extra})
    with broker.store.transaction():
        reply = dict(broker.allocate(caller, command, waiter))
    broker.take_outbox()
    return reply


def fail_and_recover(broker: Broker) -> None:
    """What GroupCommitter does when COMMIT fails: roll back, rebuild the state in memory from the database."""
    broker.store.rollback()
    broker.reload()


def test_a_grant_rolled_back_still_reaches_its_waiter_when_it_is_granted_again(tmp_path: Path) -> None:
    broker = rig(tmp_path)
    held = allocate(broker, ME)
    waiter = object()
    queued = allocate(broker, OTHER, waiter, wait=60)
    assert queued["state"] == "queued"

    broker.store.begin()
    broker.release(ME, p.release({"id": held["id"]}))  # grants the queued request and settles its waiter...
    assert [w for w, _ in broker.outbox.settled] == [waiter]
    fail_and_recover(broker)  # ...but COMMIT failed: nothing of it happened

    assert broker.live[queued["id"]].is_queued
    with broker.store.transaction():  # the retry, alone, commits
        broker.release(ME, p.release({"id": held["id"]}))
    settled = broker.take_outbox().settled
    assert [(w, outcome["id"], outcome["state"]) for w, outcome in settled] == [(waiter, queued["id"], "active")]


def test_a_withdrawal_rolled_back_keeps_the_connection_that_waits(tmp_path: Path) -> None:
    broker = rig(tmp_path)
    allocate(broker, ME)
    waiter = object()
    queued = allocate(broker, OTHER, waiter, wait=60)

    broker.store.begin()
    broker.connection_closed(2)  # the waiting client left: its request is withdrawn...
    fail_and_recover(broker)  # ...but that was rolled back
    assert broker.live[queued["id"]].is_queued

    with broker.store.transaction():  # the retry: nobody waits for it any more, so it is withdrawn
        assert broker.connection_closed(2) == [queued["id"]]
    assert broker.live.get(queued["id"]) is None


def test_waiters_of_requests_the_rollback_erased_are_forgotten(tmp_path: Path) -> None:
    broker = rig(tmp_path)
    allocate(broker, ME)
    broker.store.begin()
    queued = dict(broker.allocate(OTHER, p.allocate({"resources": [{"resource": "one", "amount": 1}], "wait": 60}),
                                  object()))
    fail_and_recover(broker)  # the request itself was never stored: its client got the error, nobody waits

    assert queued["id"] not in broker.live
    assert not broker._waiters and not broker._attended  # nothing kept for it (a leak, one per failed commit)


def test_a_wait_retried_after_a_rollback_is_answered_once(tmp_path: Path) -> None:
    broker = rig(tmp_path)
    held = allocate(broker, ME)
    first, second = object(), object()
    queued = allocate(broker, OTHER, first, wait=60)

    broker.store.begin()
    broker.allocations_wait(ME, p.wait_for({"id": queued["id"]}), second)
    fail_and_recover(broker)
    with broker.store.transaction():  # the retry attaches the same waiter again
        broker.allocations_wait(ME, p.wait_for({"id": queued["id"]}), second)
    broker.take_outbox()

    with broker.store.transaction():
        broker.release(ME, p.release({"id": held["id"]}))
    assert [w for w, _ in broker.take_outbox().settled] == [first, second]


def test_a_rolled_back_allocate_or_release_leaves_the_per_uid_limit_as_committed(tmp_path: Path) -> None:
    broker = rig(tmp_path)
    broker.policy = replace(broker.policy, max_allocations_per_uid=2)
    user = Caller(uid=1000, gid=1000, pid=os.getpid(), connection=3)
    with broker.store.transaction():
        broker.resources_add(ME, p.add_resource({"name": "many", "capacity": 10}))
    many = p.allocate({"resources": [{"resource": "many", "amount": 1}]})

    def allocate_many() -> dict[str, Any]:
        with broker.store.transaction():
            return dict(broker.allocate(user, many))

    first = allocate_many()
    broker.store.begin()
    broker.allocate(user, many)  # the second, and the limit reached...
    with pytest.raises(LimitExceeded):
        broker.allocate(user, many)
    fail_and_recover(broker)  # ...but none of it happened

    second = allocate_many()  # one live: one more fits, and then no more
    with pytest.raises(LimitExceeded):
        allocate_many()
    broker.store.begin()
    broker.release(user, p.release({"id": first["id"]}))
    fail_and_recover(broker)  # a release rolled back: both are live still
    with pytest.raises(LimitExceeded):
        allocate_many()
    with broker.store.transaction():
        broker.release(user, p.release({"id": second["id"]}))
    allocate_many()
