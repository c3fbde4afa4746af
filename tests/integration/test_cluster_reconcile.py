"""The cluster site's reconcile against a real store and a fake Slurm whose squeue lists other users' jobs too:
a job name is anyone's to choose, so only the job an allocation recorded (or, before salloc named one, a job of
its owner's) is granted to it or cancelled for it."""

from __future__ import annotations

import asyncio
import os
import pwd
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from mcpresd.cluster.site import ClusterAllocation, ClusterSite, load, save
from mcpresd.cluster.slurm import ClusterConfig, ClusterError, ClusterErrorKind
from mcpresd.core.cluster import ClusterJob, ClusterRequest, JobState, Partition, job_name
from mcpresd.protocol import AllocationState
from mcpresd.store import Store

ME = pwd.getpwuid(os.geteuid()).pw_name


class ListingCluster:
    """squeue answers `listed`; what scancel is asked is kept in `cancelled`, each call's jobs in `calls`; with
    `refuse`, scancel fails as when Slurm does not answer."""

    def __init__(self, listed: list[ClusterJob], refuse: bool = False) -> None:
        self.listed = listed
        self.refuse = refuse
        self.cancelled: list[int] = []
        self.calls: list[list[int]] = []

    async def partitions(self) -> list[Partition]:
        return []

    async def jobs(self) -> list[ClusterJob]:
        return self.listed

    async def submit(self, request: ClusterRequest, as_user: tuple[int, int] | None = None) -> Any:
        raise AssertionError("nothing is submitted here")

    async def cancel(self, job_ids: Sequence[int]) -> None:
        self.calls.append(list(job_ids))
        if self.refuse:
            raise ClusterError(ClusterErrorKind.UNREACHABLE, "scancel: Unable to contact slurm controller")
        self.cancelled.extend(job_ids)

    async def nodes_of(self, job_id: int) -> str:
        return "node1"

    def step_argv(self, job_id: int, argv: Sequence[str]) -> list[str]:
        return []


class Broker:
    def __init__(self, path: Path) -> None:
        self.store = Store(path)
        self.events: list[str] = []

    def _event(self, now: float, kind: str, **fields: Any) -> None:
        self.events.append(kind)


def job(job_id: int, allocation_id: str, state: JobState, user: str) -> ClusterJob:
    return ClusterJob(job_id, job_name(allocation_id), state, "None", "node1", user, "")


def poll_once(tmp_path: Path, rows: list[ClusterAllocation], listed: list[ClusterJob], refuse: bool = False) \
        -> tuple[ListingCluster, dict[str, ClusterAllocation]]:
    broker = Broker(tmp_path / "db.sqlite")
    for row in rows:
        save(broker.store.conn, row)
    cluster = ListingCluster(listed, refuse)

    async def submit(work: Any) -> Any:
        return work(broker)

    site = ClusterSite(cluster, ClusterConfig(), submit, lambda pid, start: None, lambda: 1000.0,
                       lambda pid, start: True, lambda *args: (1, None), daemon_uid=os.geteuid())

    async def main() -> None:
        await site.start()
        await site.poll()

    asyncio.run(main())
    return cluster, {a.id: a for a in load(broker.store.conn)}


def allocation(allocation_id: str, state: AllocationState, job_id: int | None,
               holder_pid: int | None = os.getpid()) -> ClusterAllocation:
    """A row as the daemon saved it; held by this (live) process unless `holder_pid` is None: then by the
    connection that made it, which a restart closed."""
    return ClusterAllocation(id=allocation_id, owner_uid=os.geteuid(), owner_gid=os.getegid(), state=state,
                             created_at=999.0, request=ClusterRequest(allocation_id), job_id=job_id,
                             released_at=999.5 if state is AllocationState.RELEASED else None,
                             release_reason="released" if state is AllocationState.RELEASED else None,
                             holder_pid=holder_pid)


def test_a_connection_held_allocation_found_at_start_ends_and_its_job_is_cancelled(tmp_path: Path) -> None:
    active = allocation("a5", AllocationState.ACTIVE, job_id=505, holder_pid=None)
    queued = allocation("a6", AllocationState.QUEUED, job_id=606, holder_pid=None)
    kept = allocation("a7", AllocationState.ACTIVE, job_id=707)

    cluster, rows = poll_once(tmp_path, [active, queued, kept], [job(505, "a5", JobState.RUNNING, ME),
                                                                 job(606, "a6", JobState.PENDING, ME),
                                                                 job(707, "a7", JobState.RUNNING, ME)])

    assert sorted(cluster.cancelled) == [505, 606]
    assert (rows["a5"].state, rows["a5"].release_reason) == (AllocationState.RELEASED, "connection_closed")
    assert (rows["a6"].state, rows["a6"].release_reason) == (AllocationState.WITHDRAWN, "connection_closed")
    assert rows["a7"].state is AllocationState.ACTIVE


def test_the_jobs_a_reconcile_ends_are_cancelled_in_one_scancel(tmp_path: Path) -> None:
    # After a restart every connection-held allocation ends: one scancel for all, not one each under the lock.
    rows = [allocation(f"c{n}", AllocationState.ACTIVE, job_id=800 + n, holder_pid=None) for n in range(5)]
    listed = [job(800 + n, f"c{n}", JobState.RUNNING, ME) for n in range(5)]

    cluster, ended = poll_once(tmp_path, rows, listed)

    assert [sorted(call) for call in cluster.calls] == [[800, 801, 802, 803, 804]]
    assert all((ended[f"c{n}"].state, ended[f"c{n}"].slurm_state) == (AllocationState.RELEASED, "CANCELLED")
               for n in range(5))


def test_allocations_a_reconcile_ends_while_scancel_fails_still_end_and_their_jobs_are_cancelled_later(
        tmp_path: Path) -> None:
    rows = [allocation(f"d{n}", AllocationState.ACTIVE, job_id=900 + n, holder_pid=None) for n in range(3)]
    listed = [job(900 + n, f"d{n}", JobState.RUNNING, ME) for n in range(3)]

    cluster, ended = poll_once(tmp_path, rows, listed, refuse=True)

    assert [sorted(call) for call in cluster.calls] == [[900, 901, 902]]
    assert all(ended[f"d{n}"].state is AllocationState.RELEASED and ended[f"d{n}"].slurm_state != "CANCELLED"
               for n in range(3))
    # The next pass (Slurm back; the same database) finds the jobs of ended allocations running and cancels them.
    cluster, _ = poll_once(tmp_path, [], listed)
    assert sorted(cluster.cancelled) == [900, 901, 902]


def test_an_allocation_granted_after_squeue_listed_the_jobs_is_judged_at_the_next_poll(tmp_path: Path) -> None:
    # squeue ran (at the clock's 1000.0), then salloc granted this one (at 1000.0 too): the listing predates its
    # job. It must not look gone: that ended it as cluster_job_gone and left its job running.
    granted_late = replace(allocation("g1", AllocationState.ACTIVE, job_id=707), granted_at=1000.0)
    earlier = replace(allocation("g2", AllocationState.ACTIVE, job_id=808), granted_at=999.0)

    cluster, rows = poll_once(tmp_path, [granted_late, earlier], [])

    assert rows["g1"].state is AllocationState.ACTIVE and cluster.cancelled == []
    assert (rows["g2"].state, rows["g2"].release_reason) == (AllocationState.RELEASED, "cluster_job_gone")


def test_another_users_job_named_after_an_ended_allocation_is_not_cancelled(tmp_path: Path) -> None:
    ended = allocation("a1", AllocationState.RELEASED, job_id=101)

    cluster, _ = poll_once(tmp_path, [ended], [job(101, "a1", JobState.RUNNING, ME),
                                               job(202, "a1", JobState.RUNNING, "mallory")])

    assert cluster.cancelled == [101]


def test_another_users_running_job_named_after_a_queued_allocation_does_not_grant_it(tmp_path: Path) -> None:
    queued = allocation("a2", AllocationState.QUEUED, job_id=303)

    cluster, rows = poll_once(tmp_path, [queued], [job(303, "a2", JobState.PENDING, ME),
                                                   job(404, "a2", JobState.RUNNING, "mallory")])

    assert rows["a2"].state is AllocationState.QUEUED and rows["a2"].job_id == 303
    assert cluster.cancelled == []


def test_before_salloc_named_its_job_only_a_job_of_the_owners_is_taken(tmp_path: Path) -> None:
    unnamed = allocation("a3", AllocationState.QUEUED, job_id=None)
    ended = allocation("a4", AllocationState.RELEASED, job_id=None)

    cluster, rows = poll_once(tmp_path, [unnamed, ended], [job(506, "a3", JobState.PENDING, ME),
                                                           job(505, "a3", JobState.RUNNING, "mallory"),
                                                           job(508, "a4", JobState.RUNNING, ME),
                                                           job(507, "a4", JobState.RUNNING, "mallory")])

    assert rows["a3"].state is AllocationState.QUEUED and rows["a3"].job_id == 506
    assert cluster.cancelled == [508]


class SubmitOnce(ListingCluster):
    """salloc for the first request only: it stays pending (never granted, never refused); a second is a failure."""

    def __init__(self) -> None:
        super().__init__([])
        self.submitted: list[str] = []

    async def submit(self, request: ClusterRequest, as_user: tuple[int, int] | None = None) -> Any:
        self.submitted.append(request.allocation_id)
        if len(self.submitted) > 1:
            raise AssertionError(f"salloc started twice: {self.submitted}")
        await asyncio.Event().wait()  # pending until the test ends


def test_one_idempotency_key_sent_on_two_connections_at_once_makes_one_allocation(tmp_path: Path) -> None:
    # Two connections of one user send the same keyed request in the same loop round: their key look-ups ran in
    # one group, before either row was written, and each made an allocation (two Slurm jobs for one key).
    from mcpresd import params
    from mcpresd.service import Caller

    broker = Broker(tmp_path / "db.sqlite")
    ids = iter(["k1", "k2"])
    broker.new_id = lambda: next(ids)  # type: ignore[attr-defined]
    cluster = SubmitOnce()

    async def submit(work: Any) -> Any:
        await asyncio.sleep(0)  # the committer runs jobs in a later loop round, several in one group
        return work(broker)

    site = ClusterSite(cluster, ClusterConfig(), submit, lambda pid, start: None, lambda: 1000.0,
                       lambda pid, start: True, lambda *args: (1, None), daemon_uid=os.geteuid())
    command = params.allocate({"resources": [{"resource": "cpu", "amount": 1}], "site": "cluster",
                               "idempotency_key": "once", "detach": True})

    async def main() -> dict[str, Any]:
        first = asyncio.create_task(site.allocate(Caller(os.geteuid(), os.getegid(), os.getpid(), 1), command, None))
        second = asyncio.create_task(site.allocate(Caller(os.geteuid(), os.getegid(), os.getpid(), 2), command,
                                                   None))
        done, _ = await asyncio.wait({first, second}, timeout=60, return_when=asyncio.FIRST_COMPLETED)
        assert len(done) == 1, "neither request was answered"
        result = done.pop().result()
        first.cancel()
        second.cancel()
        return result

    replayed = asyncio.run(main())
    assert cluster.submitted == ["k1"]
    assert replayed["id"] == "k1"
    assert [(a.id, a.idempotency_key) for a in load(broker.store.conn)] == [("k1", "once")]


def test_a_connection_that_closes_before_its_allocate_starts_to_run_still_ends_what_it_made(tmp_path: Path) -> None:
    # The dispatcher makes a task of the routed request; the connection can close before that task first runs.
    # The close must still be seen by the allocation it goes on to make (no connection is left to end it).
    from mcpresd import params
    from mcpresd.service import Caller

    broker = Broker(tmp_path / "db.sqlite")
    broker.new_id = lambda: "c1"  # type: ignore[attr-defined]
    cluster = SubmitOnce()
    submitted = asyncio.Event()

    async def submit(work: Any) -> Any:
        await asyncio.sleep(0)
        return work(broker)

    async def pending(request: ClusterRequest, as_user: tuple[int, int] | None = None) -> Any:
        submitted.set()
        return await SubmitOnce.submit(cluster, request, as_user)

    cluster.submit = pending  # type: ignore[method-assign]
    closed: set[int] = set()  # the server's view: a connection closed is no longer open
    site = ClusterSite(cluster, ClusterConfig(), submit, lambda pid, start: None, lambda: 1000.0,
                       lambda pid, start: True, lambda *args: (1, None), daemon_uid=os.geteuid(),
                       connection_open=lambda connection: connection not in closed)
    command = params.allocate({"resources": [{"resource": "cpu", "amount": 1}], "site": "cluster", "detach": True})

    async def main() -> None:
        routed = site.route("allocate", command, Caller(os.geteuid(), os.getegid(), os.getpid(), 7), None)
        assert routed is not None
        task = asyncio.ensure_future(routed)  # as the dispatcher: it first runs in a later loop round
        closed.add(7)
        site.connection_closed(7)
        await asyncio.wait_for(submitted.wait(), 60)
        await asyncio.wait_for(asyncio.gather(*site._tasks), 60)  # the ending spawned for it, if any
        task.cancel()

    asyncio.run(main())
    [row] = load(broker.store.conn)
    assert (row.id, row.state, row.release_reason) == ("c1", AllocationState.WITHDRAWN, "connection_closed")


class PendingSubmission:
    """A salloc that named job 77 and waits (pending) until stopped; then it fails, as salloc does."""

    def __init__(self) -> None:
        self.job_id: int | None = 77
        self.granted = False
        self.stopped = False
        self._ended = asyncio.Event()

    async def outcome(self) -> int:
        from mcpresd.cluster.slurm import ClusterError, ClusterErrorKind

        await self._ended.wait()
        raise ClusterError(ClusterErrorKind.REFUSED, "salloc was stopped while job 77 was pending")

    def stop(self) -> None:
        self.stopped = True
        self._ended.set()


class SlowSalloc(ListingCluster):
    """salloc takes its time to name the job: `started` is set when it is run, `go` lets it answer."""

    def __init__(self) -> None:
        super().__init__([])
        self.started = asyncio.Event()
        self.go = asyncio.Event()
        self.submission = PendingSubmission()

    async def submit(self, request: ClusterRequest, as_user: tuple[int, int] | None = None) -> Any:
        self.started.set()
        await self.go.wait()
        return self.submission


def test_a_connection_that_closes_while_salloc_starts_leaves_no_job_and_no_allocation(tmp_path: Path) -> None:
    # The close ends the allocation at once (withdrawn, connection_closed); salloc then answers with its job.
    # That answer must not bring the allocation back (queued again, held by no one, its job left to run).
    from mcpresd import params
    from mcpresd.core.errors import DomainError
    from mcpresd.service import Caller

    broker = Broker(tmp_path / "db.sqlite")
    broker.new_id = lambda: "s1"  # type: ignore[attr-defined]
    cluster = SlowSalloc()

    async def submit(work: Any) -> Any:
        await asyncio.sleep(0)
        return work(broker)

    closed: set[int] = set()
    site = ClusterSite(cluster, ClusterConfig(), submit, lambda pid, start: None, lambda: 1000.0,
                       lambda pid, start: True, lambda *args: (1, None), daemon_uid=os.geteuid(),
                       connection_open=lambda connection: connection not in closed)
    command = params.allocate({"resources": [{"resource": "cpu", "amount": 1}], "site": "cluster", "detach": True})

    async def main() -> Any:
        task = asyncio.ensure_future(site.allocate(Caller(os.geteuid(), os.getegid(), os.getpid(), 9), command, None))
        await asyncio.wait_for(cluster.started.wait(), 60)
        closed.add(9)
        site.connection_closed(9)
        await asyncio.wait_for(asyncio.gather(*site._tasks), 60)  # the ending it spawned
        cluster.go.set()
        try:
            return await asyncio.wait_for(task, 60)
        except DomainError as error:
            return error
        finally:
            await site.close()  # a follower of its salloc, if one was started, is stopped here

    answer = asyncio.run(main())
    [row] = load(broker.store.conn)
    assert (row.state, row.release_reason) == (AllocationState.WITHDRAWN, "connection_closed"), answer
    assert "s1" not in site.live
    assert cluster.submission.stopped or 77 in cluster.cancelled
