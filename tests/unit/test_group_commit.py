"""GroupCommitter: grouped transactions on the loop's thread, replies after COMMIT, and what a failure leaves.

A fake broker and store stand in for SQLite: they record what ran inside which transaction, and can be told to
fail a statement or the rebuild that follows a failed group.
"""

from __future__ import annotations

import asyncio
import sqlite3
from typing import Any

import pytest

from mcpresd import server
from mcpresd.server import GroupCommitter
from mcpresd.service import Outbox
from mcpresd.store import StorageError


class FakeStore:
    path = "/fake/mcpresd.db"

    def __init__(self) -> None:
        self.log: list[str] = []
        self.in_transaction = False
        self.closed = False

    def begin(self) -> None:
        assert not self.in_transaction
        self.in_transaction = True
        self.log.append("BEGIN")

    def commit(self) -> None:
        self.in_transaction = False
        self.log.append("COMMIT")

    def rollback(self) -> None:
        self.in_transaction = False
        self.log.append("ROLLBACK")

    def close(self) -> None:
        self.closed = True


class FakeBroker:
    def __init__(self) -> None:
        self.store = FakeStore()
        self.outbox = Outbox()
        self.reload_fails = False

    def take_outbox(self) -> Outbox:
        outbox, self.outbox = self.outbox, Outbox()
        return outbox

    def reload(self) -> None:
        self.outbox = Outbox()
        if self.reload_fails:
            raise sqlite3.OperationalError("disk I/O error")


class Rig:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.broker = FakeBroker()
        self.delivered: list[dict[str, Any]] = []
        self.broken: list[BaseException] = []
        self.committer = GroupCommitter(lambda: self.broker, self._on_commit,  # type: ignore[arg-type,return-value]
                                        on_broken=self.broken.append)
        self.committer.start(self.loop)

    def _on_commit(self, outbox: Outbox) -> None:
        self.delivered += outbox.events

    def job(self, name: str, fails: Exception | None = None) -> Any:
        def run(broker: FakeBroker) -> str:
            broker.store.log.append(name)
            broker.outbox.events.append({"kind": name})
            if fails is not None:
                raise fails
            return name
        return run

    def turn(self) -> None:
        self.loop.run_until_complete(asyncio.sleep(0))
        self.loop.run_until_complete(asyncio.sleep(0))

    def close(self) -> None:
        self.loop.close()


@pytest.fixture
def rig() -> Any:
    made = Rig()
    yield made
    made.close()


def test_jobs_submitted_in_one_round_share_one_transaction_and_resolve_after_its_commit(rig: Rig) -> None:
    futures = [rig.committer.submit(rig.job(name)) for name in ("a", "b", "c")]
    assert not any(f.done() for f in futures) and rig.broker.store.log == []  # nothing runs inside submit

    rig.turn()

    assert rig.broker.store.log == ["BEGIN", "a", "b", "c", "COMMIT"]
    assert [f.result() for f in futures] == ["a", "b", "c"]
    assert rig.delivered == [{"kind": "a"}, {"kind": "b"}, {"kind": "c"}]


def test_a_call_is_answered_in_the_committing_round_after_the_outbox_is_handed_on(rig: Rig) -> None:
    """`call` (the dispatcher's path) hands the outcome to its callback right after the commit's outbox: no
    future, no callback left for a later round of the loop, and never before what the commit hands on."""
    seen: list[tuple[str, Any, int]] = []
    for name in ("a", "b"):
        rig.committer.call(rig.job(name), 1000, lambda outcome: seen.append(
            ("answered", outcome.result(), len(rig.delivered))))
    rig.committer.call(rig.job("bad", fails=ValueError("boom")), 1000,
                       lambda outcome: seen.append(("failed", outcome.exception(), len(rig.delivered))))
    assert seen == [] and rig.broker.store.log == []  # nothing runs inside call

    rig.loop.run_until_complete(asyncio.sleep(0))  # one round: the group's flush

    assert rig.broker.store.log[:5] == ["BEGIN", "a", "b", "bad", "ROLLBACK"]
    assert [(what, getattr(value, "args", value)) for what, value, _ in seen] == \
        [("answered", "a"), ("answered", "b"), ("failed", ("boom",))]
    assert all(delivered >= 1 for what, _, delivered in seen if what == "answered")  # after its own outbox


def test_a_call_refused_or_cancelled_is_still_answered(rig: Rig) -> None:
    seen: list[Any] = []
    rig.committer.call(rig.job("last"), None, lambda outcome: seen.append(outcome.result()))
    rig.committer.stop()
    rig.committer.call(rig.job("after"), None, lambda outcome: seen.append(outcome.cancelled()))
    assert seen == ["last", True]


def test_a_failed_group_is_retried_one_by_one_and_what_committed_keeps_its_outbox(rig: Rig) -> None:
    good = rig.committer.submit(rig.job("good"))
    bad = rig.committer.submit(rig.job("bad", fails=sqlite3.OperationalError("no such table: x")))

    rig.turn()

    assert rig.broker.store.log == ["BEGIN", "good", "bad", "ROLLBACK",
                                    "BEGIN", "good", "COMMIT", "BEGIN", "bad", "ROLLBACK"]
    assert good.result() == "good"
    assert isinstance(bad.exception(), StorageError)
    assert rig.delivered == [{"kind": "good"}]  # the good job's event survived the bad job's rebuild
    assert rig.broken == []


def test_when_the_rebuild_fails_too_every_waiting_job_fails_and_the_daemon_is_told_to_stop(rig: Rig) -> None:
    rig.broker.reload_fails = True
    bad = rig.committer.submit(rig.job("bad", fails=sqlite3.OperationalError("disk I/O error")))

    rig.turn()

    assert isinstance(bad.exception(), StorageError)
    assert len(rig.broken) == 1 and rig.committer.broken is rig.broken[0]
    later = rig.committer.submit(rig.job("later"))
    assert isinstance(later.exception(), StorageError)  # refused at once: the state in memory is not trusted
    assert "later" not in rig.broker.store.log


def test_stop_runs_what_is_pending_then_closes_the_store(rig: Rig) -> None:
    pending = rig.committer.submit(rig.job("last"))

    rig.committer.stop()

    assert pending.result() == "last" and rig.broker.store.log == ["BEGIN", "last", "COMMIT"]
    assert rig.broker.store.closed
    assert rig.committer.submit(rig.job("after")).cancelled()


def test_one_submitters_flood_of_slow_jobs_neither_holds_the_loop_nor_keeps_others_waiting(
        rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch of 1000 heavy reads (events.list of 10,000, ~170 ms each) ran in one group: the loop was stuck
    for minutes, other users' requests and the watchdog's job waited behind all of them."""
    now = [0.0]
    monkeypatch.setattr(server.time, "monotonic", lambda: now[0])

    def slow(name: str) -> Any:
        def run(broker: FakeBroker) -> str:
            now[0] += 0.03
            broker.store.log.append(name)
            return name
        return run

    flood = [rig.committer.submit(slow(f"read{n}"), 65534) for n in range(100)]
    other = rig.committer.submit(rig.job("root's"), 0)
    daemon = rig.committer.submit(rig.job("watchdog"))

    rig.loop.run_until_complete(asyncio.sleep(0))

    first_group = rig.broker.store.log[:rig.broker.store.log.index("COMMIT") + 1]
    assert first_group == ["BEGIN", "read0", "root's", "watchdog", "read1", "COMMIT"], \
        "submitters take turns, and the group commits once its time is spent"
    assert other.done() and daemon.done() and not flood[-1].done()
    for _ in range(200):
        rig.loop.run_until_complete(asyncio.sleep(0))
    assert all(f.done() for f in flood) and rig.committer.pending == 0
