"""The broker's operations: one method per JSON-RPC method, load -> core -> save.

Rules:
- Every method runs on the store thread, inside a transaction the caller opened
  (`mcpresd.server.StoreThread` groups several requests into one). A method
  validates everything through the core before its first write, so a domain
  error leaves nothing to roll back.
- The ledger mirrors the committed database. After a failed commit the owner
  calls `reload()`, which rebuilds it from the database.
- `now` comes from the injected clock; ids from the injected id source.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mcpresd import params as p
from mcpresd.core.errors import (
    AllocationNotFound,
    AlreadyReleased,
    IdempotencyConflict,
    InvalidHolder,
    ResourceExists,
    ResourceInUse,
)
from mcpresd.core.ledger import Ledger
from mcpresd.core.model import Allocation, Resource
from mcpresd.holders import is_alive, process_start_time
from mcpresd.protocol import VERSION, AllocationState, ResourceType
from mcpresd.store import Store, items_of

if TYPE_CHECKING:
    from mcpresd.protocol import AllocationDict, ItemDict, ResourceDict, StatusDict


@dataclass(frozen=True)
class Caller:
    """Who sent a request, from SO_PEERCRED."""

    uid: int
    gid: int
    pid: int | None


SYSTEM = Caller(uid=os.getuid(), gid=os.getgid(), pid=None)


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
    ) -> None:
        self.store = store
        self.clock = clock
        self.new_id = new_id or AllocationIds(clock, after=store.last_allocation_id())
        self.socket_path = socket_path
        self.gpu_source = gpu_source
        self.started_at = clock()
        self.ledger = Ledger()
        self.active: dict[str, Allocation] = {}
        self.reload()

    def reload(self) -> None:
        """Rebuild the in-memory ledger and active allocations from committed state."""
        active = self.store.load_active()
        self.active = {allocation.id: allocation for allocation in active}
        self.ledger = Ledger(self.store.load_resources(), items_of(active))

    # -- start-up ---------------------------------------------------------

    def reconcile_resources(self, discovered: Iterable[Resource], declared: Iterable[Resource]) -> list[str]:
        """Bring discovered and config-declared resources in line with stored ones; return what changed."""
        now = self.clock()
        changes: list[str] = []
        for source, wanted in (("discovered", list(discovered)), ("config", list(declared))):
            names = {r.name for r in wanted}
            for resource in wanted:
                existing = self.ledger.find(resource.name)
                if existing is None:
                    self._add_resource(resource, now)
                    changes.append(f"added {resource.name}")
                elif existing.source != resource.source and existing.source == "api":
                    changes.append(f"kept {resource.name}: registered through the API, also in the {source} set")
                elif existing != resource:
                    try:
                        self.ledger.replace(resource)
                    except ResourceInUse as error:
                        changes.append(f"kept {resource.name}: {error.message}")
                        continue
                    self.store.update_resource(resource)
                    self.store.insert_event(now, "resource.changed", resource=resource.name)
                    changes.append(f"changed {resource.name}")
            for stale in [r for r in self.ledger.resources() if r.source == source and r.name not in names]:
                try:
                    self.ledger.remove(stale.name)
                except ResourceInUse:
                    changes.append(f"kept {stale.name}: gone from the {source} set but still allocated")
                    continue
                self.store.delete_resource(stale.name)
                self.store.insert_event(now, "resource.removed", resource=stale.name, detail={"reason": source})
                changes.append(f"removed {stale.name}")
        return changes

    def reap_dead_holders(self, reason: str) -> list[str]:
        """Release active allocations whose holder process is gone (pid reuse included)."""
        released = []
        for allocation in list(self.active.values()):
            if allocation.holder_pid is not None and not is_alive(allocation.holder_pid, allocation.holder_start):
                self._release(allocation, "holder_exited", SYSTEM, detail={"holder_pid": allocation.holder_pid,
                                                                             "why": reason})
                released.append(allocation.id)
        return released

    # -- daemon -----------------------------------------------------------

    def daemon_status(self, caller: Caller, command: p.NoParams) -> StatusDict:
        return {
            "version": VERSION,
            "pid": os.getpid(),
            "uptime_s": round(self.clock() - self.started_at, 3),
            "socket": self.socket_path,
            "database": self.store.path,
            "resources": len(self.ledger),
            "allocations": self.store.count_allocations(),
            "gpu_source": self.gpu_source,
        }

    # -- resources --------------------------------------------------------

    def resources_list(self, caller: Caller, command: p.ListResourcesCommand) -> list[ResourceDict]:
        return [
            self.resource_dict(r)
            for r in self.ledger.resources()
            if command.type is None or r.type is command.type
        ]

    def resources_add(self, caller: Caller, command: p.AddResourceCommand) -> ResourceDict:
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
        return self.resource_dict(resource)

    def resources_remove(self, caller: Caller, command: p.RemoveResourceCommand) -> ResourceDict:
        resource = self.ledger.check_removable(command.name)
        self.store.delete_resource(resource.name)
        self.store.insert_event(self.clock(), "resource.removed", resource=resource.name, uid=caller.uid)
        self.ledger.remove(resource.name)
        return self.resource_dict(resource)

    def resources_refresh(self, caller: Caller, discovered: list[Resource]) -> dict[str, list[str]]:
        return {"changes": self.reconcile_resources(discovered, self._declared())}

    def _declared(self) -> list[Resource]:
        return [r for r in self.ledger.resources() if r.source == "config"]

    def _add_resource(self, resource: Resource, now: float, uid: int | None = None) -> None:
        self.ledger.add(resource)
        self.store.insert_resource(resource, now)
        self.store.insert_event(now, "resource.added", resource=resource.name, uid=uid,
                                detail={"capacity": resource.capacity, "unit": resource.unit})

    def resource_dict(self, resource: Resource) -> ResourceDict:
        used = self.ledger.used(resource.name)
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
        }

    # -- allocations ------------------------------------------------------

    def allocate(self, caller: Caller, command: p.AllocateCommand) -> AllocationDict:
        digest = None
        if command.idempotency_key is not None:
            digest = _digest(command)
            earlier = self.store.find_by_key(caller.uid, command.idempotency_key)
            if earlier is not None:
                if self._digest_of(earlier.id) != digest:
                    raise IdempotencyConflict(
                        f"idempotency key {command.idempotency_key!r} was used for a different request",
                        id=earlier.id,
                    )
                return self.allocation_dict(earlier)
        holder_start = None
        if command.holder_pid is not None:
            holder_start = process_start_time(command.holder_pid)
            if holder_start is None:
                raise InvalidHolder(f"holder process {command.holder_pid} does not exist", holder_pid=command.holder_pid)
        items = self.ledger.plan(command.demands)
        now = self.clock()
        allocation = Allocation(
            id=self.new_id(),
            state=AllocationState.ACTIVE,
            items=items,
            priority=command.priority,
            owner_uid=caller.uid,
            created_at=now,
            tool_id=command.tool_id,
            execution_id=command.execution_id,
            idempotency_key=command.idempotency_key,
            requester_pid=caller.pid,
            holder_pid=command.holder_pid,
            holder_start=holder_start,
        )
        self.store.insert_allocation(allocation, digest)
        self.store.insert_event(now, "allocated", allocation_id=allocation.id, uid=caller.uid)
        self.ledger.hold(items)
        self.active[allocation.id] = allocation
        return self.allocation_dict(allocation)

    def _digest_of(self, allocation_id: str) -> str | None:
        return self.store.request_digest(allocation_id)

    def release(self, caller: Caller, command: p.ReleaseCommand) -> AllocationDict:
        allocation = self._visible(caller, command.id)
        if not allocation.is_active:
            why = "" if allocation.release_reason == "released" else f" ({allocation.release_reason})"
            raise AlreadyReleased(
                f"allocation {allocation.id} was already released{why}",
                id=allocation.id,
                released_at=allocation.released_at,
            )
        return self.allocation_dict(self._release(allocation, "released", caller))

    def _release(self, allocation: Allocation, reason: str, caller: Caller,
                 detail: dict[str, Any] | None = None) -> Allocation:
        now = self.clock()
        self.store.mark_released(allocation.id, now, reason)
        self.store.insert_event(now, reason, allocation_id=allocation.id, uid=caller.uid, detail=detail)
        self.ledger.unhold(allocation.items)
        del self.active[allocation.id]
        return allocation.released(now, reason)

    def allocations_get(self, caller: Caller, command: p.GetAllocationCommand) -> AllocationDict:
        return self.allocation_dict(self._visible(caller, command.id))

    def allocations_list(self, caller: Caller, command: p.ListAllocationsCommand) -> list[AllocationDict]:
        state = None if command.state is None else command.state.value
        return [self.allocation_dict(a) for a in self.store.list_allocations(state, command.limit)]

    def events_list(self, caller: Caller, command: p.ListEventsCommand) -> list[dict[str, Any]]:
        return self.store.list_events(command.after_id, command.limit, command.allocation_id)

    def _visible(self, caller: Caller, allocation_id: str) -> Allocation:
        allocation = self.active.get(allocation_id) or self.store.get_allocation(allocation_id)
        if allocation is None or not _may_manage(caller, allocation):
            raise AllocationNotFound(f"no allocation with id {allocation_id!r}", id=allocation_id)
        return allocation

    def allocation_dict(self, allocation: Allocation) -> AllocationDict:
        items: list[ItemDict] = []
        for item in allocation.items:
            resource = self.ledger.find(item.resource)
            items.append(
                {
                    "resource": item.resource,
                    "type": resource.type.value if resource else "unknown",
                    "amount": item.amount,
                    "unit": resource.unit if resource else "",
                    "uuid": resource.uuid if resource else None,
                }
            )
        return {
            "id": allocation.id,
            "state": allocation.state.value,
            "items": items,
            "priority": allocation.priority.value,
            "tool_id": allocation.tool_id,
            "execution_id": allocation.execution_id,
            "idempotency_key": allocation.idempotency_key,
            "owner_uid": allocation.owner_uid,
            "requester_pid": allocation.requester_pid,
            "holder_pid": allocation.holder_pid,
            "created_at": allocation.created_at,
            "released_at": allocation.released_at,
            "release_reason": allocation.release_reason,
        }


def _may_manage(caller: Caller, allocation: Allocation) -> bool:
    return caller.uid == 0 or caller.uid == allocation.owner_uid


def _digest(command: p.AllocateCommand) -> str:
    """The request in canonical form, kept beside its idempotency key to spot a key reused for another request."""
    return json.dumps(
        [
            sorted((d.selector, d.amount) for d in command.demands),
            command.priority.value,
            command.tool_id,
            command.execution_id,
        ],
        separators=(",", ":"),
    )
