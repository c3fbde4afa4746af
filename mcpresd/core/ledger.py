"""The ledger: every resource's capacity and what active allocations hold of it.

Rules:
- Nothing is ever over-committed: `plan` grants a whole request or raises, and
  the daemon applies plans one at a time on the store's thread.
- A GPU is a device of capacity 1: a request for `gpu` is either a whole number
  of distinct idle devices or one fraction below 1 of a single device, packed
  onto the device with the least room that still fits (two 0.5 share one).
- Several demands on one resource in a request add up.
"""

from __future__ import annotations

import math
from bisect import insort
from collections.abc import Callable, Iterable, Sequence

from mcpresd.core.errors import (
    InsufficientCapacity,
    InvalidRequest,
    NeverFits,
    ResourceExists,
    ResourceInUse,
    UnknownResource,
)
from mcpresd.core.model import AllocationItem, Demand, Resource
from mcpresd.protocol import ResourceType

EPSILON = 1e-9

_Room = Callable[[Resource], float]


def _order_key(resource: Resource) -> tuple[int, str]:
    index = resource.labels.get("index")
    return (index if isinstance(index, int) and not isinstance(index, bool) else 1 << 30, resource.name)


class Ledger:
    """Capacity and holdings of every resource, kept in memory for fast fitting."""

    def __init__(self, resources: Iterable[Resource] = (), held: Iterable[AllocationItem] = ()) -> None:
        self._resources: dict[str, Resource] = {}
        self._by_uuid: dict[str, str] = {}
        self._used: dict[str, float] = {}
        self._by_type: dict[ResourceType, list[str]] = {}
        for resource in resources:
            self.add(resource)
        self.hold(held)

    # -- resources --------------------------------------------------------

    def __contains__(self, name: str) -> bool:
        return name in self._resources

    def __len__(self) -> int:
        return len(self._resources)

    def resources(self) -> list[Resource]:
        return list(self._resources.values())

    def get(self, name: str) -> Resource:
        resource = self.find(name)
        if resource is None:
            raise UnknownResource(f"no resource named {name!r}", resource=name)
        return resource

    def find(self, name_or_uuid: str) -> Resource | None:
        resource = self._resources.get(name_or_uuid)
        if resource is None and name_or_uuid in self._by_uuid:
            resource = self._resources[self._by_uuid[name_or_uuid]]
        return resource

    def used(self, name: str) -> float:
        return self._used.get(name, 0.0)

    def free(self, name: str) -> float:
        return max(0.0, self._resources[name].capacity - self.used(name))

    def add(self, resource: Resource) -> None:
        if resource.name in self._resources or resource.name in self._by_uuid:
            raise ResourceExists(f"a resource named {resource.name!r} already exists", resource=resource.name)
        if resource.uuid is not None and (resource.uuid in self._by_uuid or resource.uuid in self._resources):
            raise ResourceExists(f"a resource with UUID {resource.uuid!r} already exists", resource=resource.name)
        self._resources[resource.name] = resource
        if resource.uuid is not None:
            self._by_uuid[resource.uuid] = resource.name
        insort(self._by_type.setdefault(resource.type, []), resource.name,
               key=lambda name: _order_key(self._resources[name]))

    def check_removable(self, name: str) -> Resource:
        resource = self.get(name)
        if self.used(resource.name) > EPSILON:
            raise ResourceInUse(
                f"resource {resource.name!r} is held by active allocations; release them first",
                resource=resource.name,
                allocated=self.used(resource.name),
            )
        return resource

    def remove(self, name: str) -> Resource:
        resource = self.check_removable(name)
        del self._resources[resource.name]
        self._used.pop(resource.name, None)
        if resource.uuid is not None:
            self._by_uuid.pop(resource.uuid, None)
        self._by_type[resource.type].remove(resource.name)
        return resource

    def replace(self, resource: Resource) -> None:
        """Update a resource's facts in place (capacity may not drop below what is held)."""
        old = self.get(resource.name)
        if resource.capacity + EPSILON < self.used(old.name):
            raise ResourceInUse(
                f"resource {old.name!r} has {self.used(old.name):g} allocated, more than the new capacity",
                resource=old.name,
            )
        if old.uuid is not None:
            self._by_uuid.pop(old.uuid, None)
        self._resources[old.name] = resource
        if resource.uuid is not None:
            self._by_uuid[resource.uuid] = resource.name
        self._by_type[old.type].remove(old.name)
        insort(self._by_type.setdefault(resource.type, []), resource.name,
               key=lambda name: _order_key(self._resources[name]))

    # -- holdings ---------------------------------------------------------

    def hold(self, items: Iterable[AllocationItem]) -> None:
        for item in items:
            self._used[item.resource] = self._used.get(item.resource, 0.0) + item.amount

    def unhold(self, items: Iterable[AllocationItem]) -> None:
        for item in items:
            left = self._used.get(item.resource, 0.0) - item.amount
            self._used[item.resource] = 0.0 if left < EPSILON else left

    # -- fitting ----------------------------------------------------------

    def plan(self, demands: Sequence[Demand]) -> tuple[AllocationItem, ...]:
        """Choose what to grant for all demands at once, or raise without changing anything."""
        if not demands:
            raise InvalidRequest("a request must ask for at least one resource")
        tentative: dict[str, float] = {}
        shortfalls: list[dict[str, object]] = []
        granted: list[AllocationItem] = []

        def room(resource: Resource) -> float:
            return resource.capacity - self.used(resource.name) - tentative.get(resource.name, 0.0)

        for demand in demands:
            if not (math.isfinite(demand.amount) and demand.amount > 0):
                raise InvalidRequest(
                    f"amount for {demand.selector!r} must be a positive finite number", resource=demand.selector
                )
            resource = self.find(demand.selector)
            if resource is not None:
                chosen = self._plan_named(resource, demand, room)
            else:
                chosen = self._plan_typed(demand, room)
            if chosen is None:
                shortfalls.append(self._shortfall(demand, room))
                continue
            for item in chosen:
                tentative[item.resource] = tentative.get(item.resource, 0.0) + item.amount
                granted.append(item)
        if shortfalls:
            parts = ", ".join(f"{s['resource']}: asked {s['requested']:g}, free {s['free']:g}" for s in shortfalls)
            raise InsufficientCapacity(f"not enough free now ({parts})", shortfalls=shortfalls)
        return tuple(_merge(granted))

    def _plan_named(self, resource: Resource, demand: Demand, room: _Room) -> list[AllocationItem] | None:
        if resource.is_device and demand.amount > resource.capacity + EPSILON:
            raise InvalidRequest(
                f"{resource.name} is one device: ask for at most 1 of it, or for {demand.amount:g} of 'gpu'",
                resource=resource.name,
            )
        if demand.amount > resource.capacity + EPSILON:
            raise NeverFits(
                f"{resource.name} has a capacity of {resource.capacity:g}, less than the {demand.amount:g} asked",
                shortfalls=[self._shortfall(demand, room)],
            )
        if demand.amount <= room(resource) + EPSILON:
            return [AllocationItem(resource.name, demand.amount)]
        return None

    def _plan_typed(self, demand: Demand, room: _Room) -> list[AllocationItem] | None:
        try:
            kind = ResourceType(demand.selector)
        except ValueError:
            raise UnknownResource(
                f"no resource named {demand.selector!r} (see `mcpctl resources`)", resource=demand.selector
            ) from None
        names = self._by_type.get(kind, [])
        if not names:
            raise UnknownResource(f"this host has no {kind.value} resource", resource=demand.selector)
        candidates = [self._resources[name] for name in names]
        if kind is ResourceType.GPU:
            return _plan_devices(candidates, demand.amount, room)
        for resource in candidates:
            if demand.amount <= room(resource) + EPSILON:
                return [AllocationItem(resource.name, demand.amount)]
        if all(demand.amount > r.capacity + EPSILON for r in candidates):
            raise NeverFits(
                f"no {kind.value} resource is large enough for {demand.amount:g}",
                shortfalls=[self._shortfall(demand, room)],
            )
        return None

    def _shortfall(self, demand: Demand, room: _Room) -> dict[str, object]:
        resource = self.find(demand.selector)
        if resource is not None:
            return {
                "resource": resource.name,
                "requested": demand.amount,
                "free": max(0.0, room(resource)),
                "capacity": resource.capacity,
            }
        members = [self._resources[n] for n in self._by_type.get(ResourceType(demand.selector), [])]
        if demand.selector == ResourceType.GPU.value and demand.amount >= 1:
            free = float(sum(1 for r in members if room(r) >= r.capacity - EPSILON))
        else:
            free = max((room(r) for r in members), default=0.0)
        return {
            "resource": demand.selector,
            "requested": demand.amount,
            "free": max(0.0, free),
            "capacity": float(sum(r.capacity for r in members)),
        }


def _plan_devices(devices: list[Resource], amount: float, room: _Room) -> list[AllocationItem] | None:
    if amount >= 1:
        if abs(amount - round(amount)) > EPSILON:
            raise InvalidRequest(
                f"ask for a whole number of GPUs or a fraction below 1 of one, not {amount:g}", resource="gpu"
            )
        count = round(amount)
        if count > len(devices):
            raise NeverFits(
                f"this host has {len(devices)} GPU(s), fewer than the {count} asked",
                shortfalls=[{"resource": "gpu", "requested": amount, "free": 0.0, "capacity": float(len(devices))}],
            )
        idle = [d for d in devices if room(d) >= d.capacity - EPSILON]
        if len(idle) < count:
            return None
        return [AllocationItem(d.name, d.capacity) for d in idle[:count]]
    fitting = [d for d in devices if room(d) + EPSILON >= amount]
    if not fitting:
        return None
    tightest = min(fitting, key=lambda d: (room(d), _order_key(d)))
    return [AllocationItem(tightest.name, amount)]


def _merge(items: list[AllocationItem]) -> list[AllocationItem]:
    totals: dict[str, float] = {}
    for item in items:
        totals[item.resource] = totals.get(item.resource, 0.0) + item.amount
    return [AllocationItem(name, totals[name]) for name in sorted(totals)]
