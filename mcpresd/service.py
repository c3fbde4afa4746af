"""The broker's operations: one method per JSON-RPC method, load -> core -> save.

Rules:
- Every method runs in a store job, inside a transaction the caller opened
  (`mcpresd.server.GroupCommitter` groups several requests into one). A method
  validates everything through the core before its first write, so a domain
  error leaves nothing to roll back.
- The ledger mirrors the committed database. After a failed commit the owner
  calls `reload()`, which rebuilds it from the database.
- `now` comes from the injected clock; ids from the injected id source.
- What the event loop must act on after the commit (replies to waiting callers,
  events for subscribers, holders to watch, signals to send) is collected in
  `outbox` and handed over by `GroupCommitter` only after the COMMIT.
- After every change that can free capacity, `schedule()` serves the queue.
"""

from __future__ import annotations

import gc
import json
import os
import signal
import sqlite3
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any

from mcpresd import params as p
from mcpresd.core import queue
from mcpresd.core.errors import (
    AllocationNotFound,
    AlreadyReleased,
    BackupFailed,
    DomainError,
    IdempotencyConflict,
    InsufficientCapacity,
    InvalidRequest,
    LimitExceeded,
    NeverFits,
    PermissionDenied,
    ResourceExists,
    ResourceInUse,
    UnknownResource,
    WaitTimeout,
    Withdrawn,
)
from mcpresd.core.enforcement import (
    EnforcePolicy,
    Grant,
    Limits,
    Overuse,
    effective_mode,
    grant_of,
    limits_for,
    over_grant,
)
from mcpresd.core.ledger import Ledger
from mcpresd.core.model import Allocation, AllocationItem, HolderKind, Resource
from mcpresd.holders import is_alive, resolve_holder
from mcpresd.accounts import BUDGET_CHECK_INTERVAL_S, Accounts
from mcpresd.core.pools import PoolSpec
from mcpresd.core.alerts import Level as AlertLevel
from mcpresd.monitor import Monitor, MonitorPolicy
from mcpresd.enforce import Enforcer, NoEnforcement, StepScopes
from mcpresd.exposition import RpcTotals, Snapshot
from mcpresd.pooling import FactoryRun, PoolKeeper
from mcpresd.retention import Retention, prune
from mcpresd.protocol import VERSION, AllocationState, EnforceMode, ResourceType
from mcpresd.store import Store

if TYPE_CHECKING:
    from mcpresd.protocol import AllocationDict, BackupDict, ItemDict, ResourceDict, StatusDict


@dataclass(frozen=True)
class Caller:
    """Who sent a request, from SO_PEERCRED."""

    uid: int
    gid: int
    pid: int | None
    connection: int | None = None
    admin: bool = False
    """Root or a member of the configured admin group: sees and manages every user's allocations."""

    @property
    def administers(self) -> bool:
        """Root, the daemon's own user or the admin group: may change pools, budgets and prices, see all usage."""
        return self.uid in (0, os.getuid()) or self.admin


SYSTEM = Caller(uid=os.getuid(), gid=os.getgid(), pid=None)
BULK_FREEZE = 1000
"""A resources.add list this long ends with gc.freeze(): cycles alive then are never collected, so not after
every small one."""


@dataclass(frozen=True)
class Policy:
    """Scheduling settings from the config."""

    aging_interval: float = 300.0
    preemption: bool = False
    preempt_grace: float = 10.0
    default_strategy: str = "first-fit"
    max_queued_per_uid: int = 256
    max_allocations_per_uid: int = 10_000
    """Allocations one uid may have queued or active at once (root: no limit): each costs the daemon memory, a
    holder watch, often a cgroup, and every sampling round's work."""
    pool_interval: float = 1.0
    """How often pools are evaluated for scaling (their tick)."""
    retention: Retention = Retention()


@dataclass(frozen=True)
class Confine:
    """Make an allocation's cgroup with its limits (if it has none yet) and move `pid` into it."""

    allocation_id: str
    limits: Limits
    pid: int | None


@dataclass
class Outbox:
    """What the event loop must do once the transaction that produced it has committed."""

    events: list[dict[str, Any]] = field(default_factory=list)
    settled: list[tuple[Any, Any]] = field(default_factory=list)
    watch: list[tuple[int, int | None]] = field(default_factory=list)
    signals: list[tuple[int, int | None, int]] = field(default_factory=list)
    factory: list[FactoryRun] = field(default_factory=list)
    """Pool factory commands to run outside the store's transactions."""
    confine: list[Confine] = field(default_factory=list)
    unconfine: list[tuple[str, bool]] = field(default_factory=list)
    """Allocations whose cgroups go: (id, keep_processes); without keep, their processes are stopped first."""
    sweep: list[str] = field(default_factory=list)
    """Cgroups this daemon's database does not know (a lost database, another daemon's): removed if empty."""
    wake_at: float | None = None
    """When the broker next has timed work (a deadline, a TTL, a grace period, aging); None for nothing."""

    def __bool__(self) -> bool:
        return bool(self.events or self.settled or self.watch or self.signals or self.factory
                    or self.confine or self.unconfine or self.sweep or self.wake_at is not None)


class AllocationIds:
    """Time-ordered 64-bit ids in hex: 44 bits of milliseconds, then a 20-bit sequence from a random start.

    Ordered ids append at the end of the primary-key B-tree (random ones cost ~2x per insert) and sort by
    creation; the random start keeps them hard to guess across restarts.
    """

    def __init__(self, clock: Callable[[], float] = time.time, after: str | None = None) -> None:
        self._clock = clock
        self._last_ms = -1
        self._sequence = 0
        if after is not None and len(after) == 16:
            # Continue after the newest stored id, so ids stay unique even if the clock went back.
            try:
                self._last_ms, self._sequence = int(after[:11], 16), int(after[11:], 16)
            except ValueError:
                pass

    def __call__(self) -> str:
        ms = max(int(self._clock() * 1000), self._last_ms)
        if ms != self._last_ms:
            self._last_ms = ms
            self._sequence = int.from_bytes(os.urandom(3), "big") >> 5
        else:
            self._sequence += 1
            if self._sequence >= 1 << 20:
                self._last_ms += 1
                self._sequence = 0
        return f"{self._last_ms & ((1 << 44) - 1):011x}{self._sequence:05x}"


_OFF = EnforceMode.OFF.value


class Broker:
    """The resource manager's state and operations, bound to one store."""

    def __init__(
        self,
        store: Store,
        *,
        socket_path: str = "",
        gpu_source: str = "none",
        clock: Callable[[], float] = time.time,
        new_id: Callable[[], str] | None = None,
        policy: Policy = Policy(),
        monitor: MonitorPolicy | None = None,
        enforce: EnforcePolicy = EnforcePolicy(),
        enforcer: Enforcer | None = None,
        config_origin: tuple[str | None, str] = (None, "embedded defaults"),
    ) -> None:
        self.store = store
        self.connection_open: Callable[[int], bool] = lambda connection: True
        """Whether a client connection is still open (the server's; the daemon sets it). A connection's close
        is a job of the daemon's own, which the committer may run before a job of that connection's still
        waiting its turn (submitters take turns)."""
        self.config_origin = config_origin
        """The config file read (None: none) and how it was chosen, for daemon.status."""
        self.enforce = enforce
        self.enforcer: Enforcer = enforcer or NoEnforcement("no enforcement backend was given")
        self._gpu_minors: tuple[Ledger, int, dict[str, int]] | None = None
        self.confined: set[str] = set()
        """Allocations given a cgroup (asked of the event loop, or found at start): only these are read, and
        let go when they end. Most allocations (a script's reservation) never have one: no cgroup I/O for them."""
        self.overuse = Overuse()
        self._oom_seen: dict[str, int] = {}
        self._cpu_seen: dict[str, tuple[float, float]] = {}
        self._figures_seen: dict[str, dict[str, float]] = {}
        """The cgroup figures each confined allocation was last judged on (a backend hands back the same dict for
        a cgroup that did not change)."""
        self._enforced_terms: dict[str, tuple[Allocation, Limits, Grant]] = {}
        """Each confined allocation's limits and grant, worked out once (for that Allocation value)."""
        self.clock = clock
        self.new_id = new_id or AllocationIds(clock, after=store.last_allocation_id())
        self.socket_path = socket_path
        self.gpu_source = gpu_source
        self.policy = policy
        self.started_at = clock()
        self.ledger = Ledger()
        self.live: dict[str, Allocation] = {}
        self.outbox = Outbox()
        self._last_pass: tuple[int, Allocation | None, tuple[AllocationItem, ...]] | None = None
        self.risks: dict[str, list[str]] = {}
        # Loop-side futures of callers waiting for a queued request, and the connections that wait.
        self._waiters: dict[str, list[Any]] = {}
        self._attended: dict[str, set[int]] = {}
        self._unsettled: list[tuple[str, list[Any], set[int] | None]] = []
        """What the open transaction settled (popped from the two above): put back if it rolls back."""
        self.reload()
        self.monitor = Monitor(self, monitor or MonitorPolicy())
        self.pools = PoolKeeper(self)
        self.accounts = Accounts(self)
        self.rpc_totals: Callable[[], RpcTotals] | None = None
        """The daemon's RPC figures since it started (set by the daemon: the dispatcher counts them)."""

    def reload(self) -> None:
        """Rebuild the in-memory state from committed state; forget what the rolled-back work meant to send."""
        live = self.store.load_live()
        self.live = {}
        self._live_by_uid: dict[int, int] = {}  # live allocations per owner: max_allocations_per_uid
        self._queued: dict[str, Allocation] = {}
        self._by_connection: dict[int, set[str]] = {}
        self._by_holder: dict[int, set[str]] = {}
        self._timed: set[str] = set()
        self._on_gpus: set[str] = set()  # live allocations with a GPU item or charge: what each round's GPU steps read
        self._held_by_pid: dict[str, int] = {}  # active allocations held by a process: what each round samples
        for allocation in live:
            self._put(allocation)
        self._keep_waiters()
        self.ledger = Ledger(self.store.load_resources(),
                             (item for allocation in live if allocation.is_active for item in allocation.items))
        self.ledger.default_strategy = self.policy.default_strategy
        self.outbox = Outbox()
        self._last_pass = None  # the new ledger restarts its version count: an old pass could look current
        if "pools" in self.__dict__:  # a rebuild after a failed commit (at start-up they load themselves)
            self.pools.load()
            self.accounts.load()
            self.monitor.block_unhealthy(self.ledger)
            # What the committed work confined has been done by now; a rolled-back end must not forget its cgroup.
            self.confined = {allocation_id for allocation_id in self.enforcer.existing() if allocation_id in self.live}

    def _keep_waiters(self) -> None:
        """After a rollback: waiters live on the event loop, not in the database, so they survive it.

        A request the rolled-back work granted or withdrew is queued again, and so are its waiters. The
        waiters of a request the rollback erased (it was never stored) are dropped: its job is retried alone,
        which stores it under a new id and attaches the same waiter, or answers its client with the error.
        """
        for allocation_id, waiters, attended in self._unsettled:
            self._waiters.setdefault(allocation_id, []).extend(waiters)
            if attended is not None:
                self._attended.setdefault(allocation_id, set()).update(attended)
        self._unsettled = []
        self._waiters = {i: w for i, w in self._waiters.items() if i in self._queued}
        self._attended = {i: c for i, c in self._attended.items() if i in self._queued}

    def take_outbox(self) -> Outbox:
        """What the transaction that just committed asks of the event loop."""
        self._unsettled = []
        outbox, self.outbox = self.outbox, Outbox()
        outbox.wake_at = self.next_wake()
        return outbox

    def next_wake(self) -> float | None:
        """The earliest time `tick()` has something to do, so the daemon sleeps until then instead of polling."""
        times = [t for i in self._timed for t in (self.live[i].wait_until, self.live[i].expires_at,
                                                    self.live[i].preempt_at) if t is not None]
        if self._queued and self.policy.aging_interval > 0:
            times.append(self.clock() + min(1.0, self.policy.aging_interval))  # aging reorders the queue over time
        if self.pools.wants_ticks():
            times.append(self.clock() + self.policy.pool_interval)
        if self.accounts.budgets:
            times.append(self.clock() + BUDGET_CHECK_INTERVAL_S)
        return min(times) if times else None

    @property
    def queued(self) -> list[Allocation]:
        return list(self._queued.values())

    def _put(self, allocation: Allocation) -> None:
        """Keep `live` (queued and active) and `_queued` in step with an allocation's new value."""
        if allocation.id not in self.live:
            self._live_by_uid[allocation.owner_uid] = self._live_by_uid.get(allocation.owner_uid, 0) + 1
        self.live[allocation.id] = allocation
        if allocation.is_queued:
            self._queued[allocation.id] = allocation
        else:
            self._queued.pop(allocation.id, None)
        if allocation.holder_kind is HolderKind.CONNECTION and allocation.connection_id is not None:
            self._by_connection.setdefault(allocation.connection_id, set()).add(allocation.id)
        if allocation.holder_pid is not None:
            self._by_holder.setdefault(allocation.holder_pid, set()).add(allocation.id)
        if allocation.wait_until is not None or allocation.expires_at is not None or allocation.preempt_at is not None:
            self._timed.add(allocation.id)
        else:
            self._timed.discard(allocation.id)
        if allocation.holder_pid is not None and allocation.is_active:
            self._held_by_pid[allocation.id] = allocation.holder_pid
        else:
            self._held_by_pid.pop(allocation.id, None)
        on_gpus = False  # loops, not any() over generators: this is on every grant
        for item in allocation.items:
            if item.resource.startswith("gpu:"):
                on_gpus = True
                break
        else:
            for charge in allocation.charges:
                if charge.kind == "gpu":
                    on_gpus = True
                    break
        if on_gpus:
            self._on_gpus.add(allocation.id)
        else:
            self._on_gpus.discard(allocation.id)

    def _drop(self, allocation: Allocation) -> None:
        if self.live.pop(allocation.id, None) is not None:
            left = self._live_by_uid[allocation.owner_uid] - 1
            if left:
                self._live_by_uid[allocation.owner_uid] = left
            else:
                del self._live_by_uid[allocation.owner_uid]
        self._queued.pop(allocation.id, None)
        self._timed.discard(allocation.id)
        self._on_gpus.discard(allocation.id)
        self._held_by_pid.pop(allocation.id, None)
        for index, key in ((self._by_connection, allocation.connection_id), (self._by_holder, allocation.holder_pid)):
            if key is not None and key in index:
                index[key].discard(allocation.id)
                if not index[key]:
                    del index[key]

    @property
    def active(self) -> list[Allocation]:
        return [a for a in self.live.values() if a.is_active]

    def held_by_pid(self) -> dict[str, int]:
        """{allocation id: holder pid} of the active allocations held by a process (an index, copied)."""
        return dict(self._held_by_pid)

    def active_held_by(self, pid: int) -> set[str]:
        """The active allocations `pid` holds (an index: not a pass over every allocation)."""
        return {i for i in self._by_holder.get(pid, ()) if self.live[i].is_active}

    def active_on_gpus(self) -> list[Allocation]:
        """Active allocations with a `gpu:` item or a GPU charge (an index: not a pass over every allocation)."""
        return [a for a in map(self.live.__getitem__, self._on_gpus) if a.is_active]

    # -- start-up ---------------------------------------------------------

    def reconcile_resources(self, discovered: Iterable[Resource], declared: Iterable[Resource]) -> list[str]:
        """Bring discovered and config-declared resources in line with stored ones; return what changed."""
        now = self.clock()
        changes: list[str] = []
        for source, wanted in (("discovered", list(discovered)), ("config", list(declared))):
            names = {r.name for r in wanted}
            for resource in wanted:
                existing = self.ledger.find(resource.name)
                if existing is None and resource.uuid is not None:
                    changes += self._displace_api(resource.uuid, source, now)
                if existing is None:
                    self._add_resource(resource, now)
                    changes.append(f"added {resource.name}")
                elif existing.source == "api" and existing.name == resource.name:
                    # The config and the host are the truth: a row added through the API never shadows them,
                    # even when it holds more than the declared capacity (what is held stays, nothing more fits).
                    self.ledger.replace(resource, over_held=True)
                    self.store.update_resource(resource)
                    self._event(now, "resource.changed", resource=resource.name,
                                detail={"reason": f"the {source} definition replaces the one added through the API"})
                    changes.append(f"replaced {resource.name}: the {source} definition wins over the one added"
                                   " through the API")
                elif existing != resource:
                    try:
                        self.ledger.replace(resource)
                    except ResourceInUse as error:
                        changes.append(f"kept {resource.name}: {error.message}")
                        continue
                    self.store.update_resource(resource)
                    self._event(now, "resource.changed", resource=resource.name)
                    changes.append(f"changed {resource.name}")
            for stale in [r for r in self.ledger.resources() if r.source == source and r.name not in names]:
                try:
                    self.ledger.remove(stale.name)
                except ResourceInUse:
                    changes.append(f"kept {stale.name}: gone from the {source} set but still allocated")
                    continue
                self.store.delete_resource(stale.name)
                self._event(now, "resource.removed", resource=stale.name, detail={"reason": source})
                changes.append(f"removed {stale.name}")
        if changes:
            if "pools" in self.__dict__:
                self.pools.sync()
            self.schedule()
        return changes

    def _displace_api(self, name: str, source: str, now: float) -> list[str]:
        """Remove an API resource named like a GPU UUID the host (or config) now has: it must not stop the real one."""
        clash = self.ledger.find(name)
        if clash is None or clash.source != "api":
            return []
        if self.ledger.used(clash.name) > 0:
            # Still held: drop it from the ledger anyway; its allocations keep their items and end as usual.
            self.ledger.unhold([i for a in self.active for i in a.items if i.resource == clash.name])
        self.ledger.remove(clash.name)
        self.store.delete_resource(clash.name)
        self._event(now, "resource.removed", resource=clash.name,
                    detail={"reason": f"its name is a UUID of a {source} resource"})
        return [f"removed {clash.name}: added through the API, its name is the UUID of a {source} resource"]

    def reconfigure(self, declared: Iterable[Resource], policy: Policy, monitor: MonitorPolicy,
                    pools: Iterable[PoolSpec] = ()) -> list[str]:
        """A reload: the config's resources, pools and policies; discovered resources and allocations stay."""
        discovered = [r for r in self.ledger.resources() if r.source == "discovered"]
        changes = self.reconcile_resources(discovered, declared)
        changes += self.pools.reconcile(pools)
        if policy != self.policy:
            changes += [f"scheduler {f.name}: {getattr(self.policy, f.name)} -> {getattr(policy, f.name)}"
                        for f in fields(Policy) if getattr(self.policy, f.name) != getattr(policy, f.name)]
            self.policy = policy
            self.ledger.default_strategy = policy.default_strategy
            self.schedule()
        return changes + self.monitor.reconfigure(monitor, self.clock())

    def recover(self) -> list[str]:
        """On start: end what lost its holder while the daemon was down, then watch the rest."""
        ended = []
        for allocation in list(self.live.values()):
            if allocation.holder_kind is HolderKind.CONNECTION:
                self._end(allocation, "connection_closed", detail={"why": "the daemon restarted"})
                ended.append(allocation.id)
            elif allocation.holder_pid is not None and not is_alive(allocation.holder_pid, allocation.holder_start):
                self._end(allocation, "holder_exited", detail={"holder_pid": allocation.holder_pid,
                                                               "why": "holder exited while the daemon was down"})
                ended.append(allocation.id)
            elif allocation.holder_pid is not None:
                self.outbox.watch.append((allocation.holder_pid, allocation.holder_start))
                request = allocation.request
                if (allocation.is_active and request is not None and request.enforce and request.confine_holder
                        and not self.enforcer.exists(allocation.id)):
                    self._confine(allocation, allocation.holder_pid)  # granted, then a crash before the move
        for allocation_id in sorted(self.enforcer.existing()):
            if allocation_id in self.live:
                self.confined.add(allocation_id)
                continue
            stored = self.store.get_allocation(allocation_id)
            if stored is not None:
                # Its allocation ended while the daemon was down (or before it could remove the cgroup).
                self.outbox.unconfine.append((allocation_id, stored.request is not None
                                              and stored.request.keep_processes))
            else:
                self.outbox.sweep.append(allocation_id)
        self.schedule()
        return ended

    # -- daemon -----------------------------------------------------------

    def daemon_status(self, caller: Caller, command: p.NoParams) -> StatusDict:
        return {
            "version": VERSION,
            "pid": os.getpid(),
            "uptime_s": round(self.clock() - self.started_at, 3),
            "socket": self.socket_path,
            "config": {"path": self.config_origin[0], "source": self.config_origin[1]},
            "database": self.store.path,
            "resources": len(self.ledger),
            "allocations": self.store.count_allocations(),
            "gpu_source": self.gpu_source,
            "decision_cache": {"hits": self.ledger.cache_hits, "misses": self.ledger.cache_misses},
            "lost_commits": self.store.lost_commits,
            "enforcement": {**self.enforcer.describe(), "mode": self.enforce.mode.value if self.enforcer.enforces
                            else EnforceMode.OFF.value, "max_mode": self.enforce.max_mode.value,
                            "kill_grace_s": self.enforce.kill_grace},
        }

    def summary(self) -> str:
        """One line for systemd's STATUS=."""
        active = sum(1 for a in self.live.values() if a.is_active)
        line = f"serving {len(self.ledger)} resources, {active} allocations"
        return f"{line}, {len(self._queued)} queued" if self._queued else line

    def db_backup(self, caller: Caller, command: p.BackupCommand) -> BackupDict:
        # The copy is written with the daemon's rights: for a root daemon, a path from any socket user would do harm.
        if caller.uid not in (0, os.getuid()):
            raise PermissionDenied("only root and the daemon's own user may back up its database", uid=caller.uid)
        target = command.path
        if self.store.path == ":memory:":
            raise InvalidRequest("the daemon's database is in memory; there is no file to back up")
        # Replacing any of them stops the daemon (the lock and database paths are checked after each commit).
        own = {os.path.realpath(self.store.path + suffix) for suffix in ("", "-wal", "-shm", "-journal", ".lock")}
        if self.socket_path and not self.socket_path.startswith("@"):
            own.add(os.path.realpath(self.socket_path))
        if os.path.realpath(target) in own:
            raise InvalidRequest(f"{target} is one of the daemon's own files (the live database, its -wal, -shm, "
                                 "-journal or .lock, or its socket); choose another path", field="path")
        try:
            size, pages = self.store.backup(target, overwrite=command.overwrite)
        except FileExistsError:
            raise InvalidRequest(f"{target} exists; pass overwrite (mcpctl db backup --overwrite) to replace it",
                                 field="path") from None
        except FileNotFoundError:
            raise InvalidRequest(f"directory {os.path.dirname(target)} does not exist", field="path") from None
        except (OSError, sqlite3.Error) as error:
            raise BackupFailed(f"cannot back up the database to {target}: {error}", path=target) from None
        self._event(self.clock(), "db.backup", uid=caller.uid, detail={"path": target, "bytes": size, "pages": pages})
        return {"path": target, "bytes": size, "pages": pages}

    # -- resources --------------------------------------------------------

    def resources_list(self, caller: Caller, command: p.ListResourcesCommand) -> list[ResourceDict]:
        shares = self.ledger.pool_shares()
        return [
            self.resource_dict(r, shares)
            for r in self.ledger.resources()
            if command.type is None or r.type is command.type
        ]

    def resources_add(self, caller: Caller,
                      command: p.AddResourceCommand | p.AddResourcesCommand) -> ResourceDict | dict[str, int]:
        _administer(caller, "add resources")
        if isinstance(command, p.AddResourcesCommand):
            return self._resources_add_many(caller, command)
        if self.ledger.find(command.name) is not None:
            raise ResourceExists(f"a resource named {command.name!r} already exists", resource=command.name)
        resource = Resource(
            name=command.name,
            type=ResourceType.CUSTOM,
            capacity=command.capacity,
            unit=command.unit,
            labels=command.labels,
            cost_per_unit_hour=command.cost_per_unit_hour,
            source="api",
        )
        self._add_resource(resource, self.clock(), uid=caller.uid)
        if self.pools.joins_a_pool(resource):
            self.pools.sync()
        self.schedule()
        return self.resource_dict(resource)

    def _resources_add_many(self, caller: Caller, command: p.AddResourcesCommand) -> dict[str, int]:
        """All of them or none, each with its resource.added event, in bulk: one sort of the ledger's order,
        few INSERTs for the rows and the events (see store.RUN_BY_NAME), one pool check and one pass of the queue."""
        resources = command.resources
        self.ledger.add_many(resources)  # raises ResourceExists, changing nothing, if one name is taken
        now = self.clock()
        self.store.insert_resources(resources, now)
        # Resources of one capacity and unit share one detail (read-only from here on): encoded once.
        details: dict[tuple[float, str], dict[str, Any]] = {}
        rows: list[tuple[str | None, dict[str, Any]]] = []
        for resource in resources:
            detail = details.get((resource.capacity, resource.unit))
            if detail is None:
                detail = details[resource.capacity, resource.unit] = {"capacity": resource.capacity,
                                                                       "unit": resource.unit}
            rows.append((resource.name, detail))
        ids = self.store.insert_events(now, "resource.added", rows, uid=caller.uid)
        uid = caller.uid
        self.outbox.events.extend(
            {"id": event_id, "ts": now, "kind": "resource.added", "allocation_id": None, "resource": name,
             "uid": uid, "detail": detail}
            for event_id, (name, detail) in zip(ids, rows))
        if self.pools.any_joins_a_pool(resources):
            self.pools.sync()
        self.schedule()
        if len(resources) >= BULK_FREEZE:
            # What lives on (the resources, their ledger entries) leaves the cyclic collector's sight: each full
            # collection went over every resource added before, 0.8 of 2.1 s of CPU for 100,000.
            gc.freeze()
        return {"added": len(resources)}

    def resources_remove(self, caller: Caller, command: p.RemoveResourceCommand) -> ResourceDict:
        _administer(caller, "remove resources")
        declared = self.ledger.get(command.name)
        if declared.source == "config":
            raise PermissionDenied(f"{declared.name} is declared in the config file; remove it there and reload the"
                                   " daemon (`systemctl reload mcpresd` or SIGHUP)", resource=declared.name)
        if declared.source == "discovered":
            raise PermissionDenied(f"{declared.name} was discovered on this host; it goes when the host no longer"
                                   " has it (`mcpctl resource refresh`)", resource=declared.name)
        resource = self.ledger.check_removable(command.name)
        if resource.source == "pool":
            raise ResourceInUse(f"{resource.name} is a member of pool {self.ledger.pool_of(resource.name)};"
                                " the pool removes its members (scale it down or delete it)", resource=resource.name)
        self.store.delete_resource(resource.name)
        self._event(self.clock(), "resource.removed", resource=resource.name, uid=caller.uid)
        member = self.ledger.pool_of(resource.name) is not None
        self.ledger.remove(resource.name)
        if member:
            self.pools.sync()
        self.schedule()
        return self.resource_dict(resource)

    def resources_set_cost(self, caller: Caller, command: p.SetCostCommand) -> ResourceDict:
        _administer(caller, "set costs")
        resource = self.ledger.get(command.name)
        changed = replace(resource, cost_per_unit_hour=command.cost_per_unit_hour)
        self.ledger.replace(changed)
        self.store.set_cost(resource.name, command.cost_per_unit_hour)
        self._event(self.clock(), "resource.cost", resource=resource.name, uid=caller.uid,
                    detail={"before": resource.cost_per_unit_hour, "after": command.cost_per_unit_hour})
        return self.resource_dict(changed)

    @staticmethod
    def check_refresh(caller: Caller) -> None:
        """Who may refresh: checked before the host is scanned too, so that nobody else makes it rescan."""
        _administer(caller, "refresh resources")

    def resources_refresh(self, caller: Caller, discovered: list[Resource]) -> dict[str, list[str]]:
        self.check_refresh(caller)
        return {"changes": self.reconcile_resources(discovered, self._declared())}

    def _declared(self) -> list[Resource]:
        return [r for r in self.ledger.resources() if r.source == "config"]

    def _add_resource(self, resource: Resource, now: float, uid: int | None = None) -> None:
        self.ledger.add(resource)
        self.store.insert_resource(resource, now)
        self._event(now, "resource.added", resource=resource.name, uid=uid,
                    detail={"capacity": resource.capacity, "unit": resource.unit})

    def resource_dict(self, resource: Resource, shares: dict[str, dict[str, float]] | None = None) -> ResourceDict:
        """`shares`: the ledger's pool_shares(), when a caller makes many of these."""
        used = self.ledger.used(resource.name)
        pools = (self.ledger.pool_shares() if shares is None else shares).get(resource.name, {})
        return {
            "name": resource.name,
            "type": resource.type.value,
            "capacity": resource.capacity,
            "unit": resource.unit,
            "labels": dict(resource.labels),
            "uuid": resource.uuid,
            "cost_per_unit_hour": resource.cost_per_unit_hour,
            "source": resource.source,
            "allocated": used,
            "free": max(0.0, resource.capacity - used),
            "pools": dict(pools),
            "health": self.monitor.health_of(resource.name),
        }

    # -- allocating and the queue -----------------------------------------

    def allocate(self, caller: Caller, command: p.AllocateCommand, waiter: Any = None) -> AllocationDict:
        """Grant now, queue, or refuse. A queued, attended request answers `waiter` when it settles."""
        if command.site is not None:  # the cluster site routes its requests before they come here: there is none
            if command.site == "cluster":
                raise NeverFits("this daemon has no cluster ([cluster] in its config), so a cluster request can "
                                "never be granted here; ask the host (no --cluster), or configure the cluster",
                                site="cluster")
            command = replace(command, site=None)  # spill: the host, as when the cluster is there but not needed
        if (caller.connection is not None
                and (command.holder_pid is None or (waiter is not None and not command.detach and command.wait != 0))
                and not self.connection_open(caller.connection)):
            # Its connection closed before the request had its turn, and that close has been handled already: an
            # allocation made now would be held by no one (until a restart), or wait attended by no one (never
            # withdrawn as "disconnected", granted later with no client to know); a repeated key's too.
            raise Withdrawn("the connection that sent this request closed before it ran; nothing was allocated")
        digest = None
        if command.idempotency_key is not None:
            digest = _digest(command)
            earlier = self.store.find_by_key(caller.uid, command.idempotency_key)
            if earlier is not None and self.policy.retention.key_expired(earlier, self.clock()):
                self.store.forget_key(earlier.id)
                earlier = None
            if earlier is not None:
                if self.store.request_digest(earlier.id) != digest:
                    raise IdempotencyConflict(
                        f"idempotency key {command.idempotency_key!r} was used for a different request",
                        id=earlier.id,
                    )
                earlier = self.live.get(earlier.id, earlier)
                if earlier.is_queued and waiter is not None and not command.detach and command.wait != 0:
                    self._attend(earlier.id, caller, waiter)
                return self.allocation_dict(earlier)
        self.accounts.check(caller.uid, command.tool_id, command.demands)
        held = self._live_by_uid.get(caller.uid, 0)
        if held >= self.policy.max_allocations_per_uid and caller.uid != 0:
            raise LimitExceeded(f"uid {caller.uid} already has {held} allocations queued or active (the limit,"
                                " [limits] max_allocations_per_uid); release some first",
                                limit=self.policy.max_allocations_per_uid)
        holder_pid = holder_start = None
        if command.holder_pid is not None:
            holder_pid, holder_start = resolve_holder(command.holder_pid, caller.pid, caller.uid, caller.administers)
        if command.signal_holder and command.holder_pid is None:
            raise InvalidRequest("signal_holder needs a holder_pid", field="signal_holder")
        mode = effective_mode(command.enforce, self.enforce.mode, self.enforce.max_mode)
        if not self.enforcer.enforces:
            mode = EnforceMode.OFF  # no usable cgroup controller: a reservation, as `mcpctl status` says
        enforce = None if mode is EnforceMode.OFF else mode.value
        request = command.request  # dataclasses.replace walks every field: only where the mode changes it
        if request.enforce != enforce:
            request = replace(request, enforce=enforce)
        now = self.clock()
        allocation = Allocation(
            id=self.new_id(),
            state=AllocationState.QUEUED,
            items=(),
            priority=command.priority,
            owner_uid=caller.uid,
            created_at=now,
            tool_id=command.tool_id,
            execution_id=command.execution_id,
            idempotency_key=command.idempotency_key,
            requester_pid=caller.pid,
            holder_pid=holder_pid,
            holder_start=holder_start,
            request=request,
            holder_kind=HolderKind.PID if command.holder_pid is not None else HolderKind.CONNECTION,
            connection_id=caller.connection,
            wait_until=None if command.wait is None else now + command.wait,
            ttl_s=command.ttl,
            preemptible=command.preemptible,
            signal_holder=command.signal_holder,
        )
        items = self._grant_now(allocation)
        if items is not None:
            granted = allocation.granted(items, now, self.accounts.charges(items))
            self.store.insert_allocation(granted, digest)
            self._start(granted, "allocated")
            return self.allocation_dict(granted)
        if command.wait == 0:
            self.ledger.plan_request(command.request)  # raises why it does not fit (or never can)
            raise InsufficientCapacity("it fits, but requests queued before it keep what it needs",
                                       shortfalls=[], queued=len(self.queued))
        try:
            self.ledger.plan_request(command.request)  # a request that can never fit is refused, not queued
        except InsufficientCapacity:
            pass
        queued_by_caller = sum(1 for a in self._queued.values() if a.owner_uid == caller.uid)
        if queued_by_caller >= self.policy.max_queued_per_uid:
            raise LimitExceeded(f"uid {caller.uid} already has {queued_by_caller} queued requests (the limit);"
                                " wait for some or cancel them", limit=self.policy.max_queued_per_uid)
        self.store.insert_allocation(allocation, digest)
        self._put(allocation)
        self._event(now, "queued", allocation_id=allocation.id, uid=caller.uid,
                    detail={"queue_length": len(self._queued)})
        if allocation.holder_pid is not None:
            self.outbox.watch.append((allocation.holder_pid, holder_start))
        if waiter is not None and not command.detach:
            self._attend(allocation.id, caller, waiter)
        self.schedule()
        return self.allocation_dict(self.live.get(allocation.id, allocation))

    def _grant_now(self, allocation: Allocation) -> tuple[AllocationItem, ...] | None:
        """Items if the request may be granted at once: it fits and no queued request is served before it."""
        assert allocation.request is not None
        if self._queued and self._last_pass is not None and self._last_pass[0] == self.ledger.version:
            # Nothing changed since the last pass: the queue would come out the same, so only the head's
            # reservation (if the head goes before this request) decides.
            _, head, reservation = self._last_pass
            now = self.clock()
            ahead = head is not None and queue.effective_rank(head, now, self.policy.aging_interval) >= \
                queue.effective_rank(allocation, now, self.policy.aging_interval)
            try:
                return self.ledger.plan_request(allocation.request, reservation if ahead else ())
            except InsufficientCapacity:
                return None
        if self._queued:
            ledger, now = self.ledger, self.clock()
            result = queue.schedule(ledger, [*self.queued, allocation], now, self.policy.aging_interval)
            for grant in result.grants:
                ledger.unhold(grant.items)  # a dry run: schedule() below applies the others for real
            mine = [g.items for g in result.grants if g.allocation.id == allocation.id]
            return mine[0] if mine else None
        try:
            return self.ledger.plan_request(allocation.request)
        except InsufficientCapacity:
            return None

    def _attend(self, allocation_id: str, caller: Caller, waiter: Any) -> None:
        self._add_waiter(allocation_id, waiter)
        if caller.connection is not None:
            self._attended.setdefault(allocation_id, set()).add(caller.connection)

    def _add_waiter(self, allocation_id: str, waiter: Any) -> None:
        waiters = self._waiters.setdefault(allocation_id, [])
        if waiter not in waiters:  # a job retried after a rollback attaches the same waiter again
            waiters.append(waiter)

    def _start(self, allocation: Allocation, kind: str) -> None:
        self.ledger.hold(allocation.items)
        self._put(allocation)
        self._event(self.clock(), kind, allocation_id=allocation.id, uid=allocation.owner_uid,
                    detail={"items": {i.resource: i.amount for i in allocation.items}})
        if allocation.holder_pid is not None:
            self.outbox.watch.append((allocation.holder_pid, allocation.holder_start))
            if allocation.request is not None and allocation.request.confine_holder:
                self._confine(allocation, allocation.holder_pid)

    def _confine(self, allocation: Allocation, pid: int | None) -> bool:
        """Ask the event loop to put `pid` (None: nobody yet) in the allocation's cgroup; False where it has none."""
        limits = self.limits_of(allocation)
        if not limits.contained:
            return False
        self.outbox.confine.append(Confine(allocation.id, limits, pid))
        self.confined.add(allocation.id)
        return True

    def limits_of(self, allocation: Allocation) -> Limits:
        mode = EnforceMode(allocation.request.enforce) if allocation.request and allocation.request.enforce \
            else EnforceMode.OFF
        return limits_for(mode, grant_of((i.resource, i.amount) for i in allocation.items), self.enforce.tasks_max,
                          self._gpu_devices() if mode is EnforceMode.HARD else None)

    def _gpu_devices(self) -> dict[str, int]:
        """{GPU resource: its device node's minor} for the host's GPUs whose minor NVML gave (looked at again only
        when resources came or went)."""
        ledger = self.ledger
        if self._gpu_minors is None or self._gpu_minors[0] is not ledger \
                or self._gpu_minors[1] != ledger.catalogue_version:
            # Only discovered GPUs (named gpu:N, as grant_of reads a grant): a label on a declared resource is
            # not a device node this host has.
            minors = {r.name: minor for r in ledger.resources()
                      if r.type is ResourceType.GPU and r.source == "discovered" and r.name.startswith("gpu:")
                      and isinstance(minor := r.labels.get("minor"), int) and not isinstance(minor, bool)}
            self._gpu_minors = (ledger, ledger.catalogue_version, minors)
        return self._gpu_minors[2]

    def schedule(self) -> None:
        """Serve the queue: grant what may be granted, drop what never can be, preempt if enabled."""
        if not self._queued:
            return
        now = self.clock()
        result = queue.schedule(self.ledger, self.queued, now, self.policy.aging_interval)
        self._last_pass = None
        for grant in result.grants:
            granted = grant.allocation.granted(grant.items, now, self.accounts.charges(grant.items))
            self.ledger.unhold(grant.items)  # _start holds them again, with the event
            self.store.mark_granted(granted)
            self._start(granted, "allocated")
            self._settle(granted.id, self.allocation_dict(granted))
        for rejection in result.rejections:
            self._end(rejection.allocation, "rejected", detail={"why": rejection.error.message})
        if self.policy.preemption and result.head is not None:
            self._preempt_for(result.head, now)
        if self._queued and not result.grants and not result.rejections:
            self._last_pass = (self.ledger.version, result.head, result.reservation)

    def _preempt_for(self, head: Allocation, now: float) -> None:
        victims = queue.choose_victims(self.ledger, head, self.active, now, self.policy.aging_interval)
        for victim in victims:
            marked = victim.changed(preempt_at=now + self.policy.preempt_grace)
            self._put(marked)
            self.store.update_lease(marked)
            self._event(now, "preempted", allocation_id=victim.id, uid=victim.owner_uid,
                        detail={"for": head.id, "grace_s": self.policy.preempt_grace})
            if victim.signal_holder and victim.holder_pid is not None:
                self.outbox.signals.append((victim.holder_pid, victim.holder_start, signal.SIGTERM))

    def _settle(self, allocation_id: str, outcome: Any) -> None:
        waiters = self._waiters.pop(allocation_id, [])
        attended = self._attended.pop(allocation_id, None)
        for waiter in waiters:
            self.outbox.settled.append((waiter, outcome))
        if waiters or attended is not None:
            self._unsettled.append((allocation_id, waiters, attended))

    def _end(self, allocation: Allocation, reason: str, caller: Caller = SYSTEM,
             detail: dict[str, Any] | None = None, measured: dict[str, float] | None = None) -> Allocation:
        """Release an active allocation or withdraw a queued one, with an event saying why."""
        now = self.clock()
        state = AllocationState.RELEASED if allocation.is_active else AllocationState.WITHDRAWN
        ended = self.accounts.ended(allocation.ended(state, now, reason), measured)
        self.store.mark_ended(ended)
        self._event(now, reason if state is AllocationState.RELEASED or reason == "withdrawn" else "withdrawn",
                    allocation_id=allocation.id, uid=caller.uid,
                    detail={**(detail or {}), **({"reason": reason} if state is AllocationState.WITHDRAWN else {})})
        self._drop(allocation)
        if allocation.is_active:
            self.ledger.unhold(allocation.items)
            if allocation.id in self.confined:
                self._unconfine(allocation, now)
        else:
            error: DomainError = (WaitTimeout if reason == "timeout" else Withdrawn)(
                f"request {allocation.id} was withdrawn: {_WHY.get(reason, reason)}", id=allocation.id, reason=reason)
            self._settle(allocation.id, error)
        return ended

    def _unconfine(self, allocation: Allocation, now: float) -> None:
        """An enforced allocation ended: say if the kernel killed in it for memory, then let its cgroup go."""
        self.confined.discard(allocation.id)
        usage = self.enforcer.usage(allocation.id)
        if usage is not None:
            self._note_oom(allocation, usage.figures(), now)
        self.overuse.forget(allocation.id)
        for kind in OVERUSE_KINDS:
            self._overuse_resolved(allocation.id, kind, now, "the allocation ended")
        self._oom_seen.pop(allocation.id, None)
        self._cpu_seen.pop(allocation.id, None)
        self._figures_seen.pop(allocation.id, None)
        self._enforced_terms.pop(allocation.id, None)
        self.outbox.unconfine.append((allocation.id, allocation.request is not None
                                      and allocation.request.keep_processes))

    def _note_oom(self, allocation: Allocation, figures: dict[str, float], now: float) -> None:
        """An `oom_killed` event for OOM kills in the allocation's cgroup not reported yet."""
        kills = int(figures.get("oom_kills", 0))
        if kills > self._oom_seen.get(allocation.id, 0):
            granted = grant_of((i.resource, i.amount) for i in allocation.items).memory
            self._event(now, "oom_killed", allocation_id=allocation.id, uid=allocation.owner_uid,
                        detail={"oom_kills": kills - self._oom_seen.get(allocation.id, 0), "memory_granted": granted,
                                "memory_peak": int(figures.get("memory_peak", 0)),
                                "mode": allocation.request.enforce if allocation.request else None})
            self._oom_seen[allocation.id] = kills

    def _enforcement_sampled(self, usage: dict[str, dict[str, float]], now: float) -> None:
        """Measured use from cgroups: OOM kills, and soft allocations over their grant (an `overuse` event and
        alert, resolved once use is back under the grant or the allocation ended)."""
        seen = self._figures_seen
        for allocation_id, figures in usage.items():
            if "memory_current" not in figures:
                continue  # only cgroups report memory_current
            allocation = self.live.get(allocation_id)
            if allocation is None or not allocation.is_active:
                continue
            cpu = figures.get("cpu_seconds", 0.0)
            if seen.get(allocation_id) is figures and self.overuse.quiet(allocation_id):
                # The same figures as the round before (the backend hands back what it read then), and nothing
                # was over: no OOM kill, no CPU used, the same memory, so nothing to find or to report.
                self._cpu_seen[allocation_id] = (now, cpu)
                continue
            seen[allocation_id] = figures
            self._note_oom(allocation, figures, now)
            previous = self._cpu_seen.get(allocation_id)
            self._cpu_seen[allocation_id] = (now, cpu)
            rate = None if previous is None or now <= previous[0] else (cpu - previous[1]) / (now - previous[0])
            terms = self._enforced_terms.get(allocation_id)
            if terms is None or terms[0] is not allocation:
                terms = self._enforced_terms[allocation_id] = (
                    allocation, self.limits_of(allocation), grant_of((i.resource, i.amount) for i in allocation.items))
            _, limits, grant = terms
            if limits.mode is not EnforceMode.SOFT:
                continue
            over = over_grant(limits, grant, figures["memory_current"], rate)
            for fresh in self.overuse.observe(allocation_id, over):
                self._event(now, "overuse", allocation_id=allocation_id, uid=allocation.owner_uid, detail=fresh)
                self._overuse_alert(allocation, fresh, now)
            for kind in OVERUSE_KINDS:
                if not any(o["kind"] == kind for o in over):
                    self._overuse_resolved(allocation_id, kind, now, "its use fell back under the grant")
        for rule, resource in [key for key in self.monitor.alerts if key[0] == OVERUSE_RULE]:
            allocation_id, _, kind = resource.removeprefix(OVERUSE_PREFIX).partition("/")
            if allocation_id not in self.live or not self.live[allocation_id].is_active:  # ended while down
                self._overuse_resolved(allocation_id, kind, now, "the allocation ended")

    def _overuse_alert(self, allocation: Allocation, over: dict[str, float | str], now: float) -> None:
        """A warning alert on the allocation (`mcpctl alerts`, `mcpctl top`) while its use is over the grant."""
        self.monitor.condition(
            OVERUSE_RULE, f"{OVERUSE_PREFIX}{allocation.id}/{over['kind']}", AlertLevel.WARNING, float(over["used"]),
            now, {**over, "allocation_id": allocation.id},
            allocations=[{"id": allocation.id, "amount": over["granted"], "tool_id": allocation.tool_id,
                          "holder_pid": allocation.holder_pid, "owner_uid": allocation.owner_uid}])

    def _overuse_resolved(self, allocation_id: str, kind: str, now: float, why: str) -> None:
        resource = f"{OVERUSE_PREFIX}{allocation_id}/{kind}"
        opened = self.monitor.alerts.get((OVERUSE_RULE, resource))
        if opened is not None:
            self.monitor.condition(OVERUSE_RULE, resource, None, opened.alert.last_value or 0.0, now,
                                   {"allocation_id": allocation_id, "kind": kind, "why": why})

    def processes_stopped(self, allocation_id: str, count: int) -> None:
        """The event loop stopped what was left in an ended allocation's cgroup."""
        if count:
            allocation = self.store.get_allocation(allocation_id)
            self._event(self.clock(), "processes_stopped", allocation_id=allocation_id,
                        uid=None if allocation is None else allocation.owner_uid, detail={"count": count})

    def release(self, caller: Caller, command: p.ReleaseCommand) -> AllocationDict:
        allocation = self._visible(caller, command.id)
        if command.measured and allocation.state is AllocationState.RELEASED:
            # A holder's report that arrives after the daemon saw it exit (`mcpctl run`): keep what it measured.
            reported = self.accounts.report(allocation, command.measured)
            return self.allocation_dict(reported)
        if allocation.state in (AllocationState.RELEASED, AllocationState.WITHDRAWN):
            why = "" if allocation.release_reason == "released" else f" ({allocation.release_reason})"
            raise AlreadyReleased(
                f"allocation {allocation.id} was already {allocation.state.value}{why}",
                id=allocation.id,
                released_at=allocation.released_at,
            )
        ended = self._end(allocation, "released" if allocation.is_active else "cancelled", caller,
                          measured=command.measured)
        self.schedule()
        return self.allocation_dict(ended)

    def allocations_wait(self, caller: Caller, command: p.WaitCommand, waiter: Any = None) -> AllocationDict:
        allocation = self._visible(caller, command.id)
        if allocation.is_queued and waiter is not None:
            self._add_waiter(allocation.id, waiter)
        elif allocation.state is AllocationState.WITHDRAWN:
            raise (WaitTimeout if allocation.release_reason == "timeout" else Withdrawn)(
                f"request {allocation.id} was withdrawn: {_WHY.get(allocation.release_reason or '', '')}",
                id=allocation.id, reason=allocation.release_reason)
        return self.allocation_dict(allocation)

    def allocations_renew(self, caller: Caller, command: p.RenewCommand) -> AllocationDict:
        allocation = self._visible(caller, command.id)
        if allocation.state in (AllocationState.RELEASED, AllocationState.WITHDRAWN):
            raise AlreadyReleased(f"allocation {allocation.id} was already {allocation.state.value}", id=allocation.id)
        ttl = command.ttl or allocation.ttl_s
        if ttl is None:
            raise InvalidRequest(f"allocation {allocation.id} has no TTL; give one to set it", field="ttl")
        now = self.clock()
        base = now if allocation.is_active else None
        renewed = allocation.changed(ttl_s=ttl, expires_at=None if base is None else base + ttl)
        self._put(renewed)
        self.store.update_lease(renewed)
        self._event(now, "renewed", allocation_id=allocation.id, uid=caller.uid,
                    detail={"ttl_s": ttl, "expires_at": renewed.expires_at})
        return self.allocation_dict(renewed)

    def allocations_attach(self, caller: Caller, command: p.AttachCommand) -> AllocationDict:
        """A step of an active allocation (`mcpctl run --allocation`): `pid` joins its cgroup, if it has one."""
        allocation = self._visible(caller, command.id)
        if not allocation.is_active:
            raise AlreadyReleased(f"allocation {allocation.id} is {allocation.state.value}, not active",
                                  id=allocation.id)
        pid, _ = resolve_holder(command.pid, caller.pid, caller.uid, caller.administers)
        self._confine(allocation, pid)
        result = self.allocation_dict(allocation)
        self._add_scope(result, allocation, pid)
        return result

    def allocations_explain(self, caller: Caller, command: p.ExplainCommand) -> dict[str, Any]:
        allocation = self._visible(caller, command.id)
        if not allocation.is_queued:
            return {"id": allocation.id, "state": allocation.state.value, "queued": False,
                    "summary": f"allocation {allocation.id} is {allocation.state.value}, not queued"}
        now = self.clock()

        def expected_end(blocker: Allocation) -> tuple[float | None, str]:
            return self.accounts.expected_end(blocker, named=_may_manage(caller, blocker))

        why = queue.explain(self.ledger, allocation, self.queued, self.active, now, self.policy.aging_interval,
                            expected_end)
        return {
            "id": allocation.id,
            "state": allocation.state.value,
            "queued": True,
            "position": why.position,
            "queue_length": why.queue_length,
            "effective_priority": list(queue.RANK)[queue.effective_rank(allocation, now, self.policy.aging_interval)],
            "waited_s": round(now - allocation.created_at, 3),
            "wait_until": allocation.wait_until,
            "fits_now": why.fits_now,
            "shortfalls": list(why.shortfalls),
            "blockers": [
                {**_blocker_for(caller, blocker, held),
                 "overuse": [_overuse_note(o) for o in self.overuse.current(blocker.id)]}  # everyone waiting sees it
                for blocker, held in why.blockers
            ],
            "ahead": why.head.id if why.head else None,
            "suggestion": why.suggestion,
            "estimate": why.estimate,
            "estimate_basis": why.basis,
        }

    def events_subscribe(self, caller: Caller, command: p.SubscribeCommand) -> dict[str, Any]:
        last = self.store.last_event_id()
        backlog = [] if command.after_id is None else self.events_list(
            caller, p.ListEventsCommand(after_id=command.after_id, limit=10_000, allocation_id=None))
        return {"subscribed": True, "last_id": last, "backlog": backlog}

    # -- leases: holders, connections, TTLs, deadlines ---------------------

    def holder_exited(self, pid: int, start: int | None) -> list[str]:
        """The watcher saw `pid` exit: end everything it held or waited for."""
        ended = []
        for allocation in [self.live[i] for i in sorted(self._by_holder.get(pid, ()))]:
            if start is None or allocation.holder_start in (None, start):
                if is_alive(pid, allocation.holder_start):
                    continue  # a reused pid: the watched process is gone, this one is not it
                self._end(allocation, "holder_exited", detail={"holder_pid": pid})
                ended.append(allocation.id)
        if ended:
            self.schedule()
        return ended

    def connection_closed(self, connection: int) -> list[str]:
        """A client went away: release what its connection held, withdraw what only it waited for."""
        ended = []
        # Waits first: a request its own connection both held and waited on was withdrawn because its client
        # disconnected (reason "disconnected", as docs/scheduling.md says), not released.
        for allocation_id, connections in list(self._attended.items()):
            connections.discard(connection)
            waiting = self.live.get(allocation_id)
            if not connections and waiting is not None and waiting.is_queued:
                self._end(waiting, "disconnected")
                ended.append(allocation_id)
        for allocation in [self.live[i] for i in sorted(self._by_connection.get(connection, ()))]:
            self._end(allocation, "connection_closed")
            ended.append(allocation.id)
        if ended:
            self.schedule()
        return ended

    def tick(self) -> None:
        """Expire TTLs, time out waits, revoke preempted allocations after their grace, re-run aging."""
        now = self.clock()
        changed = False
        for allocation in [self.live[i] for i in sorted(self._timed)]:
            if allocation.is_queued and allocation.wait_until is not None and allocation.wait_until <= now:
                self._end(allocation, "timeout")
                changed = True
            elif allocation.is_active and allocation.expires_at is not None and allocation.expires_at <= now:
                self._end(allocation, "expired", detail={"ttl_s": allocation.ttl_s})
                changed = True
            elif allocation.is_active and allocation.preempt_at is not None and allocation.preempt_at <= now:
                self._end(allocation, "revoked", detail={"why": "preempted; the grace period ran out"})
                if allocation.signal_holder and allocation.holder_pid is not None:
                    self.outbox.signals.append((allocation.holder_pid, allocation.holder_start, signal.SIGKILL))
                changed = True
        if self.pools.tick(now):
            changed = True
        if changed or (self.queued and self.policy.aging_interval > 0):
            self.schedule()
        self.accounts.tick(now)
        self.store.flush_usage()  # the usage of what ended since the last tick, summed in memory (Store.end_usage)
        prune(self.store, self.policy.retention, now)

    # -- reading ----------------------------------------------------------

    def allocations_get(self, caller: Caller, command: p.GetAllocationCommand) -> AllocationDict:
        allocation = self._visible(caller, command.id)
        if allocation.is_active and allocation.id in self.confined:
            usage = self.enforcer.usage(allocation.id)  # an OOM kill of a step is told at once, not next round
            if usage is not None:
                self._note_oom(allocation, usage.figures(), self.clock())
        return self.allocation_dict(allocation)

    def allocations_list(self, caller: Caller, command: p.ListAllocationsCommand) -> list[AllocationDict]:
        state = None if command.state is None else command.state.value
        before = command.before_id
        if state in ("active", "queued"):
            rows = sorted((a for a in self.live.values()
                           if a.state.value == state and (before is None or a.id < before)),
                          key=lambda a: a.id, reverse=True)[: command.limit]
        else:
            rows = [self.live.get(a.id, a) for a in self.store.list_allocations(state, command.limit, before)]
        return [self.allocation_dict(a) if _may_manage(caller, a) else redact(self.allocation_dict(a)) for a in rows]

    def events_list(self, caller: Caller, command: p.ListEventsCommand) -> list[dict[str, Any]]:
        events = self.store.list_events(command.after_id, command.limit, command.allocation_id)
        return [event_for(caller, e) for e in events]

    def _visible(self, caller: Caller, allocation_id: str) -> Allocation:
        allocation = self.live.get(allocation_id) or self.store.get_allocation(allocation_id)
        if allocation is None or not _may_manage(caller, allocation):
            raise AllocationNotFound(f"no allocation with id {allocation_id!r}", id=allocation_id)
        return allocation

    def emit(self, now: float, kind: str, *, resource: str | None = None, detail: dict[str, Any] | None = None,
             allocation_id: str | None = None) -> None:
        """Record an event from the monitor (alerts, health, foreign GPU use) and push it to subscribers."""
        self._event(now, kind, allocation_id=allocation_id, resource=resource, detail=detail)

    # -- pools, budgets, accounting -------------------------------------------

    def pools_list(self, caller: Caller, command: p.NoParams) -> list[dict[str, Any]]:
        return [self.pools.pool_dict(name) for name in self.pools.pools]

    def pools_get(self, caller: Caller, command: p.PoolCommand) -> dict[str, Any]:
        return self.pools.pool_dict(self.pools.get(command.name).name)

    def pools_create(self, caller: Caller, command: p.CreatePoolCommand) -> dict[str, Any]:
        return self.pools.create(caller, command.spec)

    def pools_delete(self, caller: Caller, command: p.PoolCommand) -> dict[str, Any]:
        return self.pools.delete(caller, command.name)

    def pools_drain(self, caller: Caller, command: p.PoolCommand) -> dict[str, Any]:
        return self.pools.drain(caller, command.name)

    def pools_undrain(self, caller: Caller, command: p.PoolCommand) -> dict[str, Any]:
        return self.pools.undrain(caller, command.name)

    def pools_events(self, caller: Caller, command: p.PoolEventsCommand) -> list[dict[str, Any]]:
        return self.pools.events(command.name, command.limit)

    def factory_done(self, run: FactoryRun, ok: bool, output: str, error: str) -> None:
        self.pools.factory_done(run, ok, output, error)

    def budgets_set(self, caller: Caller, command: p.SetBudgetCommand) -> dict[str, Any]:
        return self.accounts.set_budget(caller, command)

    def budgets_list(self, caller: Caller, command: p.NoParams) -> list[dict[str, Any]]:
        return self.accounts.list_budgets(caller)

    def budgets_delete(self, caller: Caller, command: p.BudgetKey) -> dict[str, Any]:
        return self.accounts.delete_budget(caller, command)

    def usage(self, caller: Caller, command: p.UsageCommand) -> dict[str, Any]:
        return self.accounts.usage(caller, command)

    def recommend(self, caller: Caller, command: p.RecommendCommand) -> dict[str, Any]:
        return self.accounts.recommend(caller, command)

    def optimise(self, caller: Caller, command: p.NoParams) -> dict[str, Any]:
        return self.accounts.optimise(caller)

    # -- monitoring ---------------------------------------------------------

    def record_samples(self, readings: dict[str, dict[str, float | str | None]],
                       gpu_processes: dict[str, list[tuple[int | None, int | None, tuple[int, ...]]]],
                       rpc: dict[str, dict[str, float]] | None = None,
                       usage: dict[str, dict[str, float]] | None = None,
                       members: dict[int, str] | None = None) -> None:
        """One sampling round; `members`: {GPU process pid: the allocation whose cgroup holds it}."""
        self.store.fit_wal_to_disk()  # a disk filling up gets SQLite's smaller WAL before the WAL fills it
        self.accounts.sampled(usage or {}, readings)
        self._enforcement_sampled(usage or {}, self.clock())
        if rpc:
            readings["daemon"] = {f"rpc.{method}.{name}": value
                                  for method, figures in rpc.items() for name, value in figures.items()}
        self.monitor.record(self.clock(), readings, gpu_processes, members)

    def metrics_current(self, caller: Caller, command: p.MetricsCommand) -> dict[str, Any]:
        latest = self.monitor.current()
        if command.resource is not None:
            resource = self.ledger.find(command.resource)
            name = resource.name if resource else command.resource
            if resource is None and name != "daemon":
                raise UnknownResource(f"no resource named {command.resource!r}", resource=command.resource)
            latest = {name: latest.get(name, {})}
        processes = {name: listed for name, listed in self.monitor.gpu_processes.items() if name in latest}
        return {"ts": self.monitor.latest_ts, "interval_s": self.monitor.policy.interval, "resources": latest,
                "processes": processes}

    def metrics_exposition(self, caller: Caller, command: p.NoParams) -> Snapshot:
        return self.exposition_snapshot()  # rendered by rpc off the store's thread (exposition_reply)

    def exposition_snapshot(self) -> Snapshot:
        """What the Prometheus exposition shows (`mcpresd.exposition`; docs/metrics.md), copied: it is rendered
        off the store's thread (10,000 measured allocations render in 0.2-0.3 s on 2 shared cores)."""
        now = self.clock()
        counters, buckets = self.store.metric_counters()
        queued_since, active, measured = [], 0, []
        for allocation in self.live.values():
            if allocation.is_queued:
                queued_since.append(allocation.created_at)
            elif allocation.is_active:
                active += 1
                figures = self.accounts.measured.get(allocation.id)
                if figures:
                    measured.append((allocation.id, allocation.owner_uid, dict(figures)))
        budgets = [(b.scope.value, b.subject, b.period.value, self.accounts.spent(b, now), b.limit)
                   for b in self.accounts.budgets.values()]
        return Snapshot(
            now=now, readings={name: dict(values) for name, values in self.monitor.latest.items()},
            sampled_at=self.monitor.latest_ts, resources=self.ledger.resources(), in_use=dict(self.ledger.in_use()),
            queued_since=queued_since,
            active=active, counters=counters, wait_buckets=buckets, measured=measured, budgets=budgets,
            rpc=self.rpc_totals() if self.rpc_totals is not None else None)

    def metrics_history(self, caller: Caller, command: p.HistoryCommand) -> dict[str, Any]:
        resource = self.ledger.find(command.resource)
        name = resource.name if resource else command.resource
        if resource is None and name != "daemon":
            raise UnknownResource(f"no resource named {command.resource!r}", resource=command.resource)
        now = self.clock()
        history = self.monitor.history(name, command.metric, now - command.since, now)
        history["metrics"] = self.monitor.metrics.metrics_of(name)
        return history

    def alerts_list(self, caller: Caller, command: p.AlertsCommand) -> list[dict[str, Any]]:
        alerts = self.monitor.alert_list(command.all)
        if _sees_all(caller):
            return alerts
        return [{**a, "allocations": [_held_for(caller, h) for h in a.get("allocations") or ()]} for a in alerts
                if not _others_budget(caller, a["resource"])]

    def predict(self, caller: Caller, command: p.PredictCommand) -> dict[str, Any]:
        resource = self.ledger.find(command.resource)
        if resource is None:
            raise UnknownResource(f"no resource named {command.resource!r}", resource=command.resource)
        return self.monitor.predict(resource.name, command.metric, command.horizon, self.clock())

    def _event(self, now: float, kind: str, *, allocation_id: str | None = None, resource: str | None = None,
               uid: int | None = None, detail: dict[str, Any] | None = None) -> None:
        event_id = self.store.insert_event(now, kind, allocation_id=allocation_id, resource=resource, uid=uid,
                                           detail=detail)
        self.outbox.events.append({"id": event_id, "ts": now, "kind": kind, "allocation_id": allocation_id,
                                   "resource": resource, "uid": uid, "detail": detail or {}})

    def _risks_of(self, allocation: Allocation) -> list[str]:
        """What NVML saw (foreign use, throttling) and poor health, for the resources this allocation holds."""
        risks, health_of = self.risks, self.monitor.health
        notes = [note for item in allocation.items for note in risks.get(item.resource, ())] if risks else []
        for over in self.overuse.current(allocation.id):
            notes.append(_overuse_note(over))
        if health_of:
            for item in allocation.items:
                health = health_of.get(item.resource)
                if health is not None and health.score < 100:
                    notes.append(f"{item.resource}: health {health.score}/100 ({'; '.join(health.reasons)})")
        return notes

    def allocation_dict(self, allocation: Allocation) -> AllocationDict:
        # On every allocate and release reply: an enum member's `_value_` is a plain attribute, where `.value`
        # is a descriptor call each (the member itself would not do: a StrEnum hashes by its name).
        find = self.ledger.find
        items: list[ItemDict] = []
        for item in allocation.items:
            resource = find(item.resource)
            items.append(
                {
                    "resource": item.resource,
                    "type": resource.type._value_ if resource else "unknown",
                    "amount": item.amount,
                    "unit": resource.unit if resource else "",
                    "uuid": resource.uuid if resource else None,
                }
            )
        request = allocation.request
        charges = allocation.charges
        active = allocation.state is AllocationState.ACTIVE
        measured = allocation.measured
        if measured is None:
            sampled = self.accounts.measured.get(allocation.id)
            measured_copy = None if sampled is None else dict(sampled)
        else:
            measured_copy = dict(measured)
        result: AllocationDict = {
            "id": allocation.id,
            "state": allocation.state._value_,
            "items": items,
            "priority": allocation.priority._value_,
            "tool_id": allocation.tool_id,
            "execution_id": allocation.execution_id,
            "idempotency_key": allocation.idempotency_key,
            "owner_uid": allocation.owner_uid,
            "requester_pid": allocation.requester_pid,
            "holder_pid": allocation.holder_pid,
            "holder": allocation.holder_kind._value_,
            "created_at": allocation.created_at,
            "granted_at": allocation.granted_at,
            "released_at": allocation.released_at,
            "release_reason": allocation.release_reason,
            "wait_until": allocation.wait_until,
            "ttl_s": allocation.ttl_s,
            "expires_at": allocation.expires_at,
            "preemptible": allocation.preemptible,
            "preempt_at": allocation.preempt_at,
            "risks": self._risks_of(allocation) if active else [],
            "cost": self.accounts.cost_of(allocation, self.clock()),
            "cost_per_hour": round(sum(c.rate for c in charges), 6) if charges else None,
            "pools": sorted({c.pool for c in charges if c.pool is not None}) if charges else [],
            "measured": measured_copy,
            "enforce": request.enforce if request is not None and request.enforce else _OFF,
            "request": None if request is None else {
                "resources": [{"resource": d.selector, "amount": d.amount, **({"max": d.most} if d.most else {})}
                              for d in request.demands],
                "strategy": request.strategy or self.policy.default_strategy,
                "where": list(request.where),
                "max_cost": request.max_cost,
                "objective": request.objective,
            },
        }
        if active and request is not None and request.confine_holder and allocation.holder_pid is not None:
            self._add_scope(result, allocation, allocation.holder_pid)
        return result

    def _add_scope(self, result: AllocationDict, allocation: Allocation, pid: int) -> None:
        """systemd-scope backend: the transient scope a step (`pid`) starts itself in, for `mcpctl run`."""
        if isinstance(self.enforcer, StepScopes):
            limits = self.limits_of(allocation)
            if limits.contained:
                result["scope"] = self.enforcer.step(allocation.id, pid, limits, self.enforce.kill_grace)


OVERUSE_RULE = "overuse"
OVERUSE_PREFIX = "allocation:"
"""An overuse alert's resource: `allocation:<id>/<kind>` (kind `memory` or `cpu`), one alert per allocation and kind."""
OVERUSE_KINDS = ("memory", "cpu")

_WHY = {
    "timeout": "its wait ran out",
    "cancelled": "it was cancelled",
    "disconnected": "the waiting client disconnected",
    "holder_exited": "its holder process exited",
    "connection_closed": "its connection closed",
    "rejected": "it can no longer be served",
}


def _administer(caller: Caller, what: str) -> None:
    if not caller.administers:
        raise PermissionDenied(f"only root, the daemon's user and the admin group may {what}", uid=caller.uid)


def _overuse_note(over: dict[str, float | str]) -> str:
    if over["kind"] == "memory":
        return (f"overuse: memory {float(over['used']) / 1048576:.0f} MiB of a {float(over['granted']) / 1048576:.0f}"
                " MiB grant (soft: throttled, not killed)")
    return f"overuse: cpu {float(over['used']):.2f} of {float(over['granted']):g} cores (soft)"


def _may_manage(caller: Caller, allocation: Allocation) -> bool:
    return caller.uid == 0 or caller.admin or caller.uid == allocation.owner_uid


def _blocker_for(caller: Caller, blocker: Allocation, held: Iterable[AllocationItem]) -> dict[str, Any]:
    """An allocation a queued request waits for, as `explain` shows it: another user's without tool and holder."""
    shown: dict[str, Any] = {
        "id": blocker.id, "items": [{"resource": i.resource, "amount": i.amount} for i in held],
        "holder_pid": blocker.holder_pid, "owner_uid": blocker.owner_uid, "priority": blocker.priority.value,
        "expires_at": blocker.expires_at, "tool_id": blocker.tool_id}
    return shown if _may_manage(caller, blocker) else {**shown, "holder_pid": None, "tool_id": None, "redacted": True}


def _sees_all(caller: Caller) -> bool:
    """Root and the admin group see every user's allocations and events in full."""
    return caller.uid == 0 or caller.admin


_PRIVATE = ("tool_id", "execution_id", "idempotency_key", "requester_pid", "holder_pid", "request", "risks",
            "measured")


def redact(allocation: AllocationDict) -> AllocationDict:
    """Another user's allocation as a listing shows it: what it holds and its state, not who or why."""
    shown = dict(allocation)
    for key in _PRIVATE:
        shown[key] = [] if key == "risks" else None
    shown.pop("scope", None)  # its unit names the holder's pid
    shown["redacted"] = True
    return shown  # type: ignore[return-value]


def redact_event(event: dict[str, Any]) -> dict[str, Any]:
    return {**event, "detail": {}, "redacted": True}


def event_for(caller: Caller, event: dict[str, Any]) -> dict[str, Any]:
    """An event as `caller` may see it (the event itself when nothing is hidden): the same rule as the reads.

    Another user's event shows no detail. A system event (no uid) shows other users' allocations without who
    holds them and why (an alert's `allocations`), leaves out theirs from the optimise report, and hides the
    spending of another owner's budget.
    """
    if _sees_all(caller):
        return event
    uid = event.get("uid")
    if uid is not None:
        return event if uid == caller.uid else redact_event(event)
    detail = event.get("detail") or {}
    resource = event.get("resource")
    if isinstance(resource, str) and _others_budget(caller, resource):
        return redact_event(event)
    if detail.get("scope") == "owner" and detail.get("subject") != str(caller.uid):
        return redact_event(event)
    if "allocations" in detail:
        return {**event, "detail": {**detail, "allocations": [_held_for(caller, h) for h in detail["allocations"]]}}
    if "oversized" in detail:
        return {**event, "detail": {**detail, "oversized": [o for o in detail["oversized"]
                                                            if o.get("owner_uid") == caller.uid]}}
    return event


def _held_for(caller: Caller, held: dict[str, Any]) -> dict[str, Any]:
    """An allocation named by an alert: another user's without its tool and holder."""
    if held.get("owner_uid") == caller.uid:
        return held
    return {**held, "tool_id": None, "holder_pid": None, "redacted": True}


def _others_budget(caller: Caller, resource: str) -> bool:
    """Whether an alert's resource is the budget of an owner other than `caller` (its value is their spending)."""
    return resource.startswith("budget:owner/") and resource.split("/")[1] != str(caller.uid)


def _digest(command: p.AllocateCommand) -> str:
    """The request in canonical form, kept beside its idempotency key to spot a key reused for another request."""
    request = command.request
    return json.dumps(
        [
            sorted((d.selector, d.amount, d.most) for d in request.demands),
            command.priority.value,
            command.tool_id,
            command.execution_id,
            request.strategy or "",
            sorted(request.where),
            request.max_cost,
            *([request.objective] if request.objective else []),
            *([command.enforce.value, request.keep_processes, request.confine_holder] if command.enforce else []),
        ],
        separators=(",", ":"),
    )
