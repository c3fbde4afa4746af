"""The cluster site: allocations served by a Slurm cluster, kept in the store and in step with Slurm.

Rules:
- A cluster allocation is a row of `cluster_allocations`, never an item of the host's ledger: the cluster's
  capacity is Slurm's to grant. The partitions are shown beside the host's resources (`resources.list`),
  refreshed every sampling interval and marked stale when Slurm does not answer.
- Durability: the row is committed (queued, no job yet) before salloc starts, so a crash in between leaves a
  row the start-up reconcile finds; every reply goes out after the commit that it reports.
- A failure to submit (Slurm unreachable, an invalid or refused request) deletes the row it committed and
  answers with Slurm's message (ClusterFailed): nothing changes locally.
- Every ending cancels the job (release, lease expiry, the holder's death, a wait that ran out); a job Slurm
  ends itself ends its allocation at the next poll, with Slurm's state and reason. After a restart the daemon
  reconciles with squeue by job name (`mcpres-<id>`): jobs of ended allocations are cancelled, allocations
  whose job is gone end, saying so. Jobs whose names match no row of this database are someone else's: left.
- Jobs belong to the requester: a root daemon submits with `--uid`/`--gid` of the caller; a per-user daemon
  submits only for its own user.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import pwd
import sqlite3
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import asdict, dataclass, replace
from typing import Any

from mcpresd import params as p
from mcpresd.cluster.slurm import Cluster, ClusterConfig, ClusterError, ClusterErrorKind, Submission
from mcpresd.core.cluster import JOB_PREFIX, ClusterJob, ClusterRequest, JobState, Partition
from mcpresd.core.errors import (AllocationNotFound, AlreadyReleased, ClusterFailed, DomainError,
                                 InsufficientCapacity, InvalidRequest, LimitExceeded, NeverFits, PermissionDenied,
                                 WaitTimeout, Withdrawn)
from mcpresd.protocol import AllocationState, Method

log = logging.getLogger("mcpresd.cluster")


_COLUMNS = ("id", "owner_uid", "owner_gid", "state", "created_at", "granted_at", "released_at", "release_reason",
            "job_id", "nodes", "slurm_state", "slurm_reason", "request", "holder_pid", "holder_start",
            "idempotency_key", "tool_id", "ttl_s", "expires_at", "wait_until")
_SELECT = f"SELECT {', '.join(_COLUMNS)} FROM cluster_allocations"

_WHY = {"timeout": "its wait ran out", "cancelled": "it was cancelled", "holder_exited": "its holder process exited",
        "disconnected": "the waiting client disconnected", "cluster_job_gone": "its Slurm job is gone",
        "connection_closed": "the connection that held it closed",
        "cluster_job_ended": "Slurm ended its job"}


@dataclass(frozen=True)
class ClusterAllocation:
    id: str
    owner_uid: int
    owner_gid: int
    state: AllocationState
    created_at: float
    request: ClusterRequest
    granted_at: float | None = None
    released_at: float | None = None
    release_reason: str | None = None
    job_id: int | None = None
    nodes: str | None = None
    slurm_state: str | None = None
    slurm_reason: str | None = None
    holder_pid: int | None = None
    holder_start: int | None = None
    idempotency_key: str | None = None
    tool_id: str | None = None
    ttl_s: float | None = None
    expires_at: float | None = None
    wait_until: float | None = None

    @property
    def live(self) -> bool:
        return self.state in (AllocationState.QUEUED, AllocationState.ACTIVE)


def save(conn: sqlite3.Connection, allocation: ClusterAllocation) -> None:
    values = [getattr(allocation, column) for column in _COLUMNS]
    values[_COLUMNS.index("state")] = allocation.state.value
    values[_COLUMNS.index("request")] = json.dumps(asdict(allocation.request))
    conn.execute(f"INSERT OR REPLACE INTO cluster_allocations ({', '.join(_COLUMNS)}) VALUES "
                 f"({', '.join('?' * len(_COLUMNS))})", values)


def _check_limit(broker: Any, uid: int) -> None:
    """[limits] max_allocations_per_uid for the cluster, as on the host (root has no limit): each queued or
    active cluster allocation is an salloc the daemon runs and follows, and a Slurm job."""
    if uid == 0:
        return
    limit = broker.policy.max_allocations_per_uid
    (held,), = broker.store.conn.execute(  # the states as written: the live rows' partial index serves it
        "SELECT count(*) FROM cluster_allocations WHERE state IN ('queued', 'active') AND owner_uid = ?", (uid,))
    if held >= limit:
        raise LimitExceeded(f"uid {uid} already has {held} cluster allocations queued or active (the limit,"
                            " [limits] max_allocations_per_uid); release some first", limit=limit)


def forget(conn: sqlite3.Connection, allocation_id: str) -> None:
    conn.execute("DELETE FROM cluster_allocations WHERE id = ?", (allocation_id,))


def _from_row(row: tuple[Any, ...]) -> ClusterAllocation:
    data = dict(zip(_COLUMNS, row))
    request = json.loads(data.pop("request"))
    request["extra"] = tuple(request.get("extra", ()))
    return ClusterAllocation(**{**data, "state": AllocationState(data["state"]),
                                "request": ClusterRequest(**request)})


def load(conn: sqlite3.Connection, where: str = "", args: tuple[Any, ...] = ()) -> list[ClusterAllocation]:
    return [_from_row(row) for row in conn.execute(f"{_SELECT} {where}", args)]


Local = Callable[..., Awaitable[Any]]
"""Serve the request (or the command given) at the host, as if no cluster were configured."""
StoreJob = Callable[[Any], Any]
Submit = Callable[[StoreJob], "asyncio.Future[Any]"]


class ClusterSite:
    """The cluster beside the host: its partitions, its allocations, and the Slurm jobs behind them."""

    def __init__(self, cluster: Cluster, config: ClusterConfig, submit: Submit,
                 watch_holder: Callable[[int, int | None], None], clock: Callable[[], float],
                 is_alive: Callable[[int, int | None], bool], resolve_holder: Callable[..., tuple[int, int | None]],
                 daemon_uid: int | None = None, connection_open: Callable[[int], bool] = lambda connection: True) \
            -> None:
        self.cluster = cluster
        self._connection_open = connection_open
        """Whether a client connection is still open (the server's, as the broker asks it)."""
        self.config = config
        self._submit = submit
        self._watch_holder = watch_holder
        self._clock = clock
        self._is_alive = is_alive
        self._resolve_holder = resolve_holder
        self.daemon_uid = os.geteuid() if daemon_uid is None else daemon_uid
        self.live: dict[str, ClusterAllocation] = {}
        self.known: set[str] = set()
        """The ids of every cluster allocation in the store: requests naming one are served here."""
        self.partitions: list[Partition] = []
        self.partitions_at: float | None = None
        self.stale: str | None = "not read yet"
        self._submissions: dict[str, Submission] = {}
        """The salloc each allocation's request is followed by, until it is granted or ends; the poll leaves
        those allocations to it (and those whose salloc is starting, in `_submitting`)."""
        self._submitting: set[str] = set()
        self._waiters: dict[str, list[asyncio.Future[dict[str, Any]]]] = {}
        self._attended: dict[str, int] = {}
        self._holding: dict[str, int] = {}
        """The live allocations made without holder_pid, and the connection that holds each (ended when it
        closes; an allocation that ends otherwise leaves at once)."""
        self._restarted: set[str] = set()
        """Connection-held allocations found at start: their connections died with the old daemon."""
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._starting = False
        """Until the first squeue after a start: a live allocation whose job is not listed has lost it."""
        self._lock = asyncio.Lock()
        """Serialises the poll's reconcile with requests that change the same allocations."""

    # -- the store --------------------------------------------------------

    async def _commit(self, allocation: ClusterAllocation, event: str | None = None,
                      detail: dict[str, Any] | None = None) -> None:
        def job(broker: Any) -> None:
            save(broker.store.conn, allocation)
            if event is not None:
                broker._event(self._clock(), event, allocation_id=allocation.id, uid=allocation.owner_uid,
                              detail={"site": "cluster", "job_id": allocation.job_id, **(detail or {})})

        await self._submit(job)
        self.known.add(allocation.id)
        if allocation.live:
            self.live[allocation.id] = allocation
        else:
            self.live.pop(allocation.id, None)

    async def _find(self, allocation_id: str) -> ClusterAllocation | None:
        if allocation_id in self.live:
            return self.live[allocation_id]
        found: list[ClusterAllocation] = await self._submit(
            lambda broker: load(broker.store.conn, "WHERE id = ?", (allocation_id,)))
        return found[0] if found else None

    # -- start-up: reconcile with Slurm -----------------------------------

    async def start(self) -> None:
        """Load the rows (before requests are served); `poll` then reconciles them with squeue."""
        self.known = set(await self._submit(lambda broker: [row[0] for row in broker.store.conn.execute(
            "SELECT id FROM cluster_allocations")]))
        for allocation in await self._submit(
                lambda broker: load(broker.store.conn, "WHERE state IN ('queued', 'active')")):
            self.live[allocation.id] = allocation
            if allocation.holder_pid is not None:
                self._watch_holder(allocation.holder_pid, allocation.holder_start)
            else:
                self._restarted.add(allocation.id)
            self._arm_timers(allocation)
        self._starting = True

    async def reconcile(self, jobs: list[ClusterJob], listed_at: float | None = None) -> None:
        """Bring the live allocations in step with Slurm's jobs (as squeue listed them at `listed_at`); cancel the
        jobs of ended allocations."""
        named: dict[str, list[ClusterJob]] = {}
        for listed in jobs:
            if listed.allocation_id is not None:
                named.setdefault(listed.allocation_id, []).append(listed)
        async with self._lock:
            live_before = set(self.live)
            ending: list[tuple[ClusterAllocation, str, ClusterJob | None, str | None]] = []
            for allocation in list(self.live.values()):
                if allocation.id in self._submissions or allocation.id in self._submitting:
                    continue  # its salloc is still ours to follow
                if listed_at is not None and (allocation.granted_at or allocation.created_at) >= listed_at:
                    # Granted (or made) after squeue ran: the listing predates its job, which would look gone
                    # (ended as cluster_job_gone, its job left running). The next poll judges it.
                    continue
                job = _job_of(allocation, named.get(allocation.id, []))
                if allocation.id in self._restarted:
                    self._restarted.discard(allocation.id)
                    ending.append((allocation, "connection_closed", job, "the daemon restarted"))
                elif allocation.holder_pid is not None and not self._is_alive(allocation.holder_pid,
                                                                              allocation.holder_start):
                    ending.append((allocation, "holder_exited", job, None))
                elif job is None:
                    if allocation.job_id is None or self._starting or allocation.state is AllocationState.ACTIVE \
                            or self.clock() - allocation.created_at > 10:
                        ending.append((allocation, "cluster_job_gone", None, None))
                elif job.state.ended:
                    ending.append((allocation, "cluster_job_ended", job, None))
                elif job.state.holding and allocation.state is AllocationState.QUEUED:
                    await self._grant(allocation, job.id, job.nodes)
                elif job.state.holding and not allocation.nodes and job.nodes:
                    await self._commit(replace(allocation, nodes=job.nodes))
                elif (job.reason, job.id) != (allocation.slurm_reason, allocation.job_id):
                    updated = replace(allocation, job_id=job.id, slurm_state=job.state.value, slurm_reason=job.reason)
                    await self._commit(updated)
            # One scancel for every job this pass ends (after a restart that may be many), not one each while
            # the lock keeps releases and grants waiting.
            cancelled = await self._cancel([allocation.job_id for allocation, reason, job, _ in ending
                                            if allocation.job_id is not None and _to_cancel(reason, job)])
            for allocation, reason, job, note in ending:
                await self._end(allocation, reason, job, note=note, cancelled=cancelled)
            ended: list[ClusterAllocation] = await self._submit(lambda broker: load(
                broker.store.conn, "WHERE state IN ('released', 'withdrawn') AND id IN (%s)" % ",".join(
                    "?" * len(named)), tuple(named)) if named else [])
            # Those this pass ended had their jobs cancelled by _end (the listing predates it): not twice.
            orphans = [job.id for allocation in ended if allocation.id not in live_before
                       and (job := _job_of(allocation, named[allocation.id])) is not None and not job.state.ended]
            if orphans:
                log.info("cluster: cancelling jobs %s of ended allocations", orphans)
                with contextlib.suppress(ClusterError):
                    await self.cluster.cancel(orphans)

    def clock(self) -> float:
        return self._clock()

    # -- the poll: partitions and jobs, every sampling interval -------------

    async def poll(self) -> None:
        try:
            self.partitions = await self.cluster.partitions()
            self.partitions_at = self._clock()
            self.stale = None
            listed_at = self._clock()
            jobs = await self.cluster.jobs()
        except ClusterError as error:
            self.stale = error.message
            log.warning("cluster: Slurm did not answer: %s", error.message)
            return
        await self.reconcile(jobs, listed_at)
        self._starting = False

    async def poll_every(self, interval: float, stop: asyncio.Event) -> None:
        """The sampling loop's cluster step: partitions and jobs every `interval` (the first at once)."""
        while not stop.is_set():
            try:
                await self.poll()
            except Exception:  # noqa: BLE001 - the cluster's failures must never stop the daemon
                log.exception("cluster: the poll failed")
            try:
                await asyncio.wait_for(stop.wait(), interval)
            except TimeoutError:
                pass

    def resources(self) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        for partition in self.partitions:
            labels = {"site": "cluster", "partition": partition.name, "nodes": ",".join(partition.nodes),
                      "default": partition.default, "up": partition.up, "stale": self.stale is not None,
                      **({"why_stale": self.stale} if self.stale else {}), "updated_at": self.partitions_at}
            for kind, unit, total, free in (("cpu", "cores", partition.cpus, partition.cpus_free),
                                            ("memory", "bytes", partition.memory, partition.memory_free),
                                            ("gpu", "GPUs", partition.gpus, partition.gpus_free)):
                rows.append({"name": f"cluster:{partition.name}:{kind}", "type": kind, "capacity": total,
                             "unit": unit, "labels": labels, "uuid": None, "cost_per_unit_hour": None,
                             "source": "discovered", "allocated": total - free, "free": free, "health": None})
        return rows

    # -- requests -----------------------------------------------------------

    def route(self, method: str, command: Any, caller: Any, local: Local) \
            -> Coroutine[Any, Any, Any] | None:
        """The coroutine that serves this request at the cluster site; None: the host serves it alone."""
        if method == Method.ALLOCATE and getattr(command, "site", None) in ("cluster", "spill"):
            return self.allocate(caller, command, local)
        if method == Method.RESOURCES_LIST:
            return self._resources_with(command, local)
        if method == Method.ALLOCATIONS_LIST:
            return self._list_with(caller, command, local)
        if method == Method.DAEMON_STATUS:
            return self._status_with(local)
        by_id = {Method.RELEASE.value: self.release, Method.ALLOCATIONS_GET.value: self.get,
                 Method.ALLOCATIONS_WAIT.value: self.wait, Method.ALLOCATIONS_EXPLAIN.value: self.explain,
                 Method.ALLOCATIONS_ATTACH.value: self.attach, Method.ALLOCATIONS_RENEW.value: self.renew}
        if method in by_id and getattr(command, "id", None) in self.known:
            return self._by_id(by_id[method], caller, command)
        return None

    async def _resources_with(self, command: Any, local: Local) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = list(await local())
        wanted = getattr(command, "type", None)
        return rows + [r for r in self.resources() if wanted is None or r["type"] == getattr(wanted, "value", wanted)]

    async def _status_with(self, local: Local) -> dict[str, Any]:
        status = dict(await local())
        states = [allocation.state for allocation in self.live.values()]
        status["cluster"] = {"backend": self.config.backend, "command": list(self.config.command),
                             "partition": self.config.partition, "active": states.count(AllocationState.ACTIVE),
                             "queued": states.count(AllocationState.QUEUED), "stale": self.stale,
                             "partitions_at": self.partitions_at}
        return status

    async def _list_with(self, caller: Any, command: Any, local: Local) -> list[dict[str, Any]]:
        """The host's allocations and the caller's cluster ones (all of them for root and admins), newest first."""
        rows: list[dict[str, Any]] = list(await local())
        where, args = ["1"], []
        if command.state is not None:
            where.append("state = ?")
            args.append(command.state.value)
        if command.before_id is not None:
            where.append("id < ?")
            args.append(command.before_id)
        if not (caller.uid == 0 or getattr(caller, "admin", False)):
            where.append("owner_uid = ?")
            args.append(caller.uid)
        clause = f"WHERE {' AND '.join(where)} ORDER BY id DESC LIMIT ?"
        found = await self._submit(lambda broker: load(broker.store.conn, clause, (*args, command.limit)))
        rows += [self.allocation_dict(self.live.get(a.id, a)) for a in found]
        rows.sort(key=lambda row: row["id"], reverse=True)
        return rows[: command.limit]

    async def _by_id(self, serve: Callable[[Any, ClusterAllocation, Any], Awaitable[dict[str, Any]]], caller: Any,
                     command: Any) -> Any:
        allocation = await self._find(command.id)
        if allocation is None or not _may_manage(caller, allocation):
            raise AllocationNotFound(f"no allocation with id {command.id!r}", id=command.id)
        return await serve(caller, allocation, command)

    def allocate(self, caller: Any, command: p.AllocateCommand, local: Local) -> Coroutine[Any, Any, dict[str, Any]]:
        """A cluster allocation; without holder_pid its connection holds it, as on the host (docs/api.md)."""
        return self._allocate(caller, command, local, caller.connection if command.holder_pid is None else None)

    async def _allocate(self, caller: Any, command: p.AllocateCommand, local: Local, held_by: int | None) \
            -> dict[str, Any]:
        request = self._request_of(command)
        as_user = self._submitter(caller)
        if command.site == "spill":
            try:
                return dict(await local(replace(command, wait=0, site=None)))
            except (InsufficientCapacity, NeverFits):
                pass
        if command.idempotency_key is not None:
            key = command.idempotency_key
            earlier = await self._submit(lambda broker: load(
                broker.store.conn, "WHERE owner_uid = ? AND idempotency_key = ?", (caller.uid, key)))
            if earlier:
                return self.allocation_dict(self.live.get(earlier[0].id, earlier[0]))
        holder_pid = holder_start = None
        if command.holder_pid is not None:
            holder_pid, holder_start = self._resolve_holder(command.holder_pid, caller.pid, caller.uid,
                                                            caller.administers)
        now = self._clock()

        def insert(broker: Any) -> tuple[ClusterAllocation, bool]:
            if command.idempotency_key is not None:
                # Again, in the job that writes the row: the same key sent on another connection at once had its
                # look-up above in the same group, before either row was written (two Slurm jobs for one key).
                earlier = load(broker.store.conn, "WHERE owner_uid = ? AND idempotency_key = ?",
                               (caller.uid, command.idempotency_key))
                if earlier:
                    return earlier[0], False
            _check_limit(broker, caller.uid)
            allocation_id = broker.new_id()
            row = ClusterAllocation(
                id=allocation_id, owner_uid=caller.uid, owner_gid=caller.gid, state=AllocationState.QUEUED,
                created_at=now, request=replace(request, allocation_id=allocation_id), holder_pid=holder_pid,
                holder_start=holder_start, idempotency_key=command.idempotency_key, tool_id=command.tool_id,
                ttl_s=command.ttl, wait_until=None if not command.wait else now + command.wait)
            save(broker.store.conn, row)
            return row, True

        # Committed before salloc starts: a crash from here on leaves a row the reconcile finds.
        allocation, new = await self._submit(insert)
        if not new:
            return self.allocation_dict(self.live.get(allocation.id, allocation))
        self.known.add(allocation.id)
        self.live[allocation.id] = allocation
        if held_by is not None:
            self._holding[allocation.id] = held_by
            if not self._connection_open(held_by):  # it closed before this (its close found nothing to end)
                self._spawn(self._end_live(allocation.id, "connection_closed"))
        self._submitting.add(allocation.id)
        try:
            submission = await self.cluster.submit(allocation.request, as_user)
        except ClusterError as error:
            await self._forget(allocation)
            raise _failure(error) from None
        finally:
            self._submitting.discard(allocation.id)
        if allocation.id not in self.live:
            # Ended while salloc started (its connection closed, or a release or cancel by id): nothing follows
            # it now, and what comes next would save it again (queued, held by no one). Its job is not wanted.
            submission.stop()
            if submission.job_id is not None:
                with contextlib.suppress(ClusterError):
                    await self.cluster.cancel([submission.job_id])
            raise Withdrawn(f"request {allocation.id} was withdrawn while Slurm started it", id=allocation.id)
        self._submissions[allocation.id] = submission
        if submission.job_id is None:  # salloc ended without naming a job: refused at once
            self._submissions.pop(allocation.id, None)
            try:
                await submission.outcome()
            except ClusterError as error:
                await self._forget(allocation)
                if command.wait == 0 and error.kind is ClusterErrorKind.REFUSED and "busy" in error.message:
                    raise InsufficientCapacity(f"the cluster cannot start it now: {error.message}", shortfalls=[],
                                               queued=0, site="cluster") from None
                raise _failure(error) from None
        allocation = replace(allocation, job_id=submission.job_id, slurm_state=JobState.PENDING.value)
        if allocation.id in self.live:
            self.live[allocation.id] = allocation  # its job id known (committed with the grant or as queued)
        if allocation.holder_pid is not None:
            self._watch_holder(allocation.holder_pid, allocation.holder_start)
        if submission.granted and not command.detach:
            # Granted at once (salloc's first word): straight to active, one commit, no follower.
            try:
                try:
                    job_id = await submission.outcome()
                except ClusterError as error:
                    async with self._lock:
                        await self._end(allocation, "cluster_job_ended", None, why=error.message)
                    raise _failure(error) from None
                nodes = await self._nodes_of(job_id, allocation.request.partition)
                async with self._lock:
                    current = self.live.get(allocation.id)
                    if current is None:
                        raise Withdrawn(f"request {allocation.id} was withdrawn while Slurm granted it",
                                        id=allocation.id)
                    return await self._grant(current, job_id, nodes)
            finally:
                if self._submissions.get(allocation.id) is submission:
                    self._submissions.pop(allocation.id, None)
        waiter: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(allocation.id, []).append(waiter)
        if caller.connection is not None and not command.detach:
            self._attended[allocation.id] = caller.connection
        await self._commit(allocation, "queued")
        self._arm_timers(allocation)
        task = asyncio.get_running_loop().create_task(self._follow(allocation.id, submission))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        if command.detach:
            waiter.cancel()
            return self.allocation_dict(self.live.get(allocation.id, allocation))
        try:
            return await asyncio.shield(waiter)
        finally:
            self._attended.pop(allocation.id, None)

    async def _forget(self, allocation: ClusterAllocation) -> None:
        await self._submit(lambda broker: forget(broker.store.conn, allocation.id))
        self.live.pop(allocation.id, None)
        self.known.discard(allocation.id)

    async def _follow(self, allocation_id: str, submission: Submission) -> None:
        """Wait for salloc: granted -> active; refused or cancelled -> the allocation ends."""
        try:
            job_id = await submission.outcome()
        except ClusterError as error:
            if self._submissions.get(allocation_id) is submission:
                self._submissions.pop(allocation_id, None)
            async with self._lock:
                allocation = self.live.get(allocation_id)  # read under the lock: an ending in flight wins
                if allocation is not None and not submission.stopped:
                    await self._end(allocation, "cluster_job_ended", None, why=error.message)
            return
        try:
            known = self.live.get(allocation_id)
            nodes = await self._nodes_of(job_id, known.request.partition if known else None)
            if self.live.get(allocation_id) is None:  # it ended while salloc waited
                with contextlib.suppress(ClusterError):
                    await self.cluster.cancel([job_id])
                return
            async with self._lock:
                allocation = self.live.get(allocation_id)
                if allocation is not None and allocation.state is AllocationState.QUEUED:
                    await self._grant(allocation, job_id, nodes)
        finally:
            if self._submissions.get(allocation_id) is submission:
                self._submissions.pop(allocation_id, None)

    async def _nodes_of(self, job_id: int, partition: str | None = None) -> str:
        """The granted job's nodes: its partition's one node where it has one (no call), else squeue's."""
        named = [p for p in self.partitions if (p.name == partition if partition else p.default)]
        if len(named) == 1 and len(named[0].nodes) == 1:
            return named[0].nodes[0]
        try:
            return await self.cluster.nodes_of(job_id)
        except ClusterError as error:
            log.warning("cluster: job %s granted, its nodes unknown until the next poll: %s", job_id, error)
            return ""

    async def _grant(self, allocation: ClusterAllocation, job_id: int, nodes: str) -> dict[str, Any]:
        now = self._clock()
        granted = replace(allocation, state=AllocationState.ACTIVE, job_id=job_id, nodes=nodes or None,
                          granted_at=now, slurm_state=JobState.RUNNING.value, slurm_reason=None, wait_until=None,
                          expires_at=None if allocation.ttl_s is None else now + allocation.ttl_s)
        await self._commit(granted, "allocated", {"nodes": nodes})
        self._arm_timers(granted)
        result = self.allocation_dict(granted)
        self._settle(granted.id, result)
        return result

    def _settle(self, allocation_id: str, outcome: dict[str, Any] | DomainError) -> None:
        for waiter in self._waiters.pop(allocation_id, []):
            if not waiter.done():
                if isinstance(outcome, DomainError):
                    waiter.set_exception(outcome)
                else:
                    waiter.set_result(outcome)

    async def _cancel(self, job_ids: list[int]) -> bool:
        """scancel `job_ids` in one call; False (logged) where Slurm did not do it: the next reconcile cancels
        the jobs of ended allocations."""
        if not job_ids:
            return True
        try:
            await self.cluster.cancel(job_ids)
            return True
        except ClusterError as error:
            log.warning("cluster: cannot cancel jobs %s (%s); the next reconcile cancels them", job_ids,
                        error.message)
            return False

    async def _end(self, allocation: ClusterAllocation, reason: str, job: ClusterJob | None,
                   why: str | None = None, note: str | None = None, cancelled: bool | None = None) \
            -> ClusterAllocation:
        """Cancel its job (unless Slurm ended it) and end the allocation, recording Slurm's final state. `why`
        is Slurm's reason where it gave one; `note` the daemon's own (the event's `detail.why`). `cancelled`:
        whether the caller's scancel of the job (with others) was done; None: this cancels it."""
        if allocation.id not in self.live:
            return allocation  # ended already (the callers hold the lock, so not twice)
        allocation = self.live[allocation.id]
        self._holding.pop(allocation.id, None)
        timer = self._timers.pop(allocation.id, None)
        if timer is not None:
            timer.cancel()
        submission = self._submissions.pop(allocation.id, None)
        if submission is not None:
            submission.stop()
        slurm_state, slurm_reason = allocation.slurm_state, why or allocation.slurm_reason
        if job is not None:
            slurm_state, slurm_reason = job.state.value, why or job.reason
        if allocation.job_id is not None and _to_cancel(reason, job):
            if cancelled is None:
                cancelled = await self._cancel([allocation.job_id])
            if cancelled:
                slurm_state = JobState.CANCELLED.value
        state = AllocationState.RELEASED if allocation.state is AllocationState.ACTIVE else AllocationState.WITHDRAWN
        ended = replace(allocation, state=state, released_at=self._clock(), release_reason=reason,
                        slurm_state=slurm_state, slurm_reason=slurm_reason)
        kind = "released" if reason == "released" else reason if state is AllocationState.RELEASED else "withdrawn"
        await self._commit(ended, kind, {"reason": reason, "slurm_state": slurm_state, "slurm_reason": slurm_reason,
                                         **({"why": note} if note else {})})
        if state is AllocationState.WITHDRAWN:
            error_class = WaitTimeout if reason == "timeout" else Withdrawn
            message = f"request {allocation.id} was withdrawn: {_WHY.get(reason, reason)}"
            if why:
                message += f" ({why})"
            self._settle(allocation.id, error_class(message, id=allocation.id, reason=reason))
        return ended

    def _arm_timers(self, allocation: ClusterAllocation) -> None:
        """The wait's end for a queued allocation, the lease's for an active one."""
        old = self._timers.pop(allocation.id, None)
        if old is not None:
            old.cancel()
        deadline, reason = ((allocation.wait_until, "timeout") if allocation.state is AllocationState.QUEUED
                            else (allocation.expires_at, "expired"))
        if deadline is None:
            return
        loop = asyncio.get_running_loop()
        allocation_id = allocation.id
        self._timers[allocation_id] = loop.call_later(max(0.0, deadline - self._clock()),
                                                       lambda: self._spawn(self._timed_out(allocation_id, reason)))

    def _spawn(self, coroutine: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _timed_out(self, allocation_id: str, reason: str) -> None:
        self._timers.pop(allocation_id, None)
        async with self._lock:
            allocation = self.live.get(allocation_id)
            if allocation is not None and (allocation.state is AllocationState.QUEUED) == (reason == "timeout"):
                await self._end(allocation, reason, None)

    async def release(self, caller: Any, allocation: ClusterAllocation, command: Any) -> dict[str, Any]:
        async with self._lock:
            allocation = self.live.get(allocation.id, allocation)
            if not allocation.live:
                why = "" if allocation.release_reason == "released" else f" ({allocation.release_reason})"
                raise AlreadyReleased(f"allocation {allocation.id} was already {allocation.state.value}{why}",
                                      id=allocation.id, released_at=allocation.released_at)
            reason = "released" if allocation.state is AllocationState.ACTIVE else "cancelled"
            return self.allocation_dict(await self._end(allocation, reason, None))

    async def renew(self, caller: Any, allocation: ClusterAllocation, command: Any) -> dict[str, Any]:
        """A new lease from now (the job's Slurm time limit still holds)."""
        async with self._lock:
            allocation = self.live.get(allocation.id, allocation)
            if not allocation.live:
                raise AlreadyReleased(f"allocation {allocation.id} was already {allocation.state.value}",
                                      id=allocation.id)
            ttl = command.ttl or allocation.ttl_s
            if ttl is None:
                raise InvalidRequest(f"allocation {allocation.id} has no TTL; give one to set it", field="ttl")
            now = self._clock()
            renewed = replace(allocation, ttl_s=ttl,
                              expires_at=now + ttl if allocation.state is AllocationState.ACTIVE else None)
            await self._commit(renewed, "renewed", {"ttl_s": ttl, "expires_at": renewed.expires_at})
            self._arm_timers(renewed)
            return self.allocation_dict(renewed)

    async def get(self, caller: Any, allocation: ClusterAllocation, command: Any) -> dict[str, Any]:
        return self.allocation_dict(allocation)

    async def attach(self, caller: Any, allocation: ClusterAllocation, command: Any) -> dict[str, Any]:
        if allocation.state is not AllocationState.ACTIVE:
            raise AlreadyReleased(f"allocation {allocation.id} is {allocation.state.value}, not active",
                                  id=allocation.id)
        return self.allocation_dict(allocation)

    async def wait(self, caller: Any, allocation: ClusterAllocation, command: Any) -> dict[str, Any]:
        if allocation.state is AllocationState.WITHDRAWN:
            raise (WaitTimeout if allocation.release_reason == "timeout" else Withdrawn)(
                f"request {allocation.id} was withdrawn: {_WHY.get(allocation.release_reason or '', '')}",
                id=allocation.id, reason=allocation.release_reason)
        if allocation.state is not AllocationState.QUEUED:
            return self.allocation_dict(allocation)
        waiter: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(allocation.id, []).append(waiter)
        timeout = getattr(command, "timeout", None)
        try:
            return await asyncio.wait_for(asyncio.shield(waiter), timeout)
        except TimeoutError:
            raise WaitTimeout(f"still queued after the wait's timeout; {allocation.id} stays queued",
                              id=allocation.id) from None

    async def explain(self, caller: Any, allocation: ClusterAllocation, command: Any) -> dict[str, Any]:
        base = {"id": allocation.id, "state": allocation.state.value, "site": "cluster", "job_id": allocation.job_id,
                "slurm_state": allocation.slurm_state, "slurm_reason": allocation.slurm_reason}
        if allocation.state is not AllocationState.QUEUED:
            return {**base, "queued": False, "summary": f"allocation {allocation.id} is {allocation.state.value}, "
                                                        f"not queued (Slurm job {allocation.job_id})"}
        if allocation.job_id is not None:
            with contextlib.suppress(ClusterError):
                job = next((j for j in await self.cluster.jobs() if j.id == allocation.job_id), None)
                if job is not None:
                    base.update(slurm_state=job.state.value, slurm_reason=job.reason)
        return {**base, "queued": True, "waited_s": round(self._clock() - allocation.created_at, 3),
                "wait_until": allocation.wait_until,
                "summary": f"allocation {allocation.id} is queued on the cluster: Slurm job {allocation.job_id} is "
                           f"{base['slurm_state'] or 'PENDING'} (reason: {base['slurm_reason'] or 'None'})"}

    # -- holders and connections -------------------------------------------

    def holder_exited(self, pid: int, start: int | None) -> None:
        for allocation in list(self.live.values()):
            if allocation.holder_pid == pid and (start is None or allocation.holder_start in (None, start)) \
                    and not self._is_alive(pid, allocation.holder_start):
                self._spawn(self._end_live(allocation.id, "holder_exited"))

    def connection_closed(self, connection: int) -> None:
        """Withdraw what only it waited for ("disconnected"), then end what it held ("connection_closed")."""
        for allocation_id, attending in list(self._attended.items()):
            if attending == connection:
                self._attended.pop(allocation_id, None)
                self._spawn(self._end_live(allocation_id, "disconnected", queued_only=True))
        for allocation_id in sorted(a for a, holding in self._holding.items() if holding == connection):
            self._holding.pop(allocation_id)
            self._spawn(self._end_live(allocation_id, "connection_closed"))

    async def _end_live(self, allocation_id: str, reason: str, queued_only: bool = False) -> None:
        async with self._lock:
            allocation = self.live.get(allocation_id)
            if allocation is not None and (not queued_only or allocation.state is AllocationState.QUEUED):
                await self._end(allocation, reason, None)

    async def close(self) -> None:
        """At shutdown: stop following (salloc processes are left: their jobs are found again at the start)."""
        for timer in self._timers.values():
            timer.cancel()
        for task in list(self._tasks):
            task.cancel()

    # -- values -------------------------------------------------------------

    def _request_of(self, command: p.AllocateCommand) -> ClusterRequest:
        cpus, memory, gpus = 1.0, None, 0
        for demand in command.request.demands:
            if demand.selector == "cpu":
                cpus = demand.most or demand.amount
            elif demand.selector == "memory":
                memory = int(demand.most or demand.amount)
            elif demand.selector == "gpu":
                amount = demand.most or demand.amount
                if amount != int(amount):
                    raise InvalidRequest("the cluster grants whole GPUs: ask for --gpu 1, 2, ...", field="resources")
                gpus = int(amount)
            else:
                raise InvalidRequest(f"the cluster grants cpu, memory and gpu; {demand.selector!r} is the host's "
                                     f"(drop --cluster, or the resource)", field="resources")
        if command.request.where:
            raise InvalidRequest("the cluster takes no --where selectors other than site=cluster", field="where")
        return ClusterRequest(allocation_id="", cpus=cpus, memory=memory, gpus=gpus,
                              time_limit=self.config.time_limit, partition=self.config.partition,
                              account=self.config.account, immediate=command.wait == 0)

    def _submitter(self, caller: Any) -> tuple[int, int] | None:
        """Whom salloc runs for: None (the daemon's own user) or (uid, gid) for a root daemon serving a user."""
        if caller.uid == self.daemon_uid:
            return None
        if self.daemon_uid == 0:
            return (caller.uid, caller.gid)
        raise PermissionDenied(f"this daemon runs as uid {self.daemon_uid} and submits cluster jobs only as that "
                               f"user; uid {caller.uid} needs its own daemon (or a system one)")

    def allocation_dict(self, allocation: ClusterAllocation) -> dict[str, Any]:
        request = allocation.request
        items: list[dict[str, Any]] = []
        if allocation.state is AllocationState.ACTIVE or allocation.granted_at is not None:
            where = f"cluster:{allocation.nodes or '?'}"
            items.append({"resource": f"{where}:job:{allocation.job_id}", "type": "cluster_job", "amount": 1,
                          "unit": "job", "uuid": None})
            for kind, amount, unit in (("cpu", request.cpus, "cores"), ("memory", request.memory, "bytes"),
                                       ("gpu", request.gpus, "GPUs")):
                if amount:
                    items.append({"resource": f"{where}:{kind}", "type": kind, "amount": amount, "unit": unit,
                                  "uuid": None})
        return {
            "id": allocation.id, "state": allocation.state.value, "items": items, "priority": "normal",
            "tool_id": allocation.tool_id, "execution_id": None, "idempotency_key": allocation.idempotency_key,
            "owner_uid": allocation.owner_uid, "requester_pid": None, "holder_pid": allocation.holder_pid,
            "holder": "pid" if allocation.holder_pid is not None else "connection", "created_at": allocation.created_at,
            "granted_at": allocation.granted_at, "released_at": allocation.released_at,
            "release_reason": allocation.release_reason, "wait_until": allocation.wait_until,
            "ttl_s": allocation.ttl_s, "expires_at": allocation.expires_at, "preemptible": False,
            "preempt_at": None, "risks": [], "cost": None, "cost_per_hour": None, "pools": [], "measured": None,
            "enforce": "off", "request": None,
            "site": "cluster",
            "cluster": {"job_id": allocation.job_id, "job_name": JOB_PREFIX + allocation.id, "nodes": allocation.nodes,
                        "partition": request.partition, "slurm_state": allocation.slurm_state,
                        "slurm_reason": allocation.slurm_reason,
                        "step_command": None if allocation.job_id is None
                        else self.cluster.step_argv(allocation.job_id, [])},
        }


def _failure(error: ClusterError) -> ClusterFailed:
    return ClusterFailed(f"the cluster refused the request: {error.message}", kind=error.kind.value, site="cluster")


def _to_cancel(reason: str, job: ClusterJob | None) -> bool:
    """Whether ending an allocation for `reason` cancels its job: not one Slurm ended or no longer lists."""
    return (job is None or not job.state.ended) and reason != "cluster_job_gone"


def _job_of(allocation: ClusterAllocation, named: list[ClusterJob]) -> ClusterJob | None:
    """The job behind `allocation` among the jobs carrying its name: the one whose id it recorded; before salloc
    named one, a job of its owner's (a job name is anyone's to choose: another user's job named
    mcpres-<id> is neither granted to the allocation nor cancelled with it)."""
    if allocation.job_id is not None:
        return next((job for job in named if job.id == allocation.job_id), None)
    try:
        owner = pwd.getpwuid(allocation.owner_uid).pw_name
    except KeyError:
        return None
    mine = [job for job in named if job.user == owner]
    return next((job for job in mine if not job.state.ended), mine[0] if mine else None)


def _may_manage(caller: Any, allocation: ClusterAllocation) -> bool:
    return bool(caller.uid == 0 or getattr(caller, "admin", False) or caller.uid == allocation.owner_uid)
