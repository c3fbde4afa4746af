"""The ledger: every resource's capacity and what active allocations hold of it.

Rules:
- Nothing is ever over-committed: `plan` grants a whole request or raises, and
  the daemon applies plans one at a time on the store's thread.
- A GPU is a device of capacity 1: a request for `gpu` is either a whole number
  of distinct idle devices or one fraction below 1 of a single device.
- Several demands on one resource in a request add up. A demand with `most`
  gets the most that fits between its amount and `most`.
- Which resource a typed demand (`gpu`, `disk`, ...) gets is the strategy's
  choice among those matching the request's `where` selectors; several GPUs are
  kept close (same NUMA node, then same PCI root) where that is known.
- An equal request against unchanged state reuses the previous decision.
- A demand on `pool:A,B` asks for whole idle members of those pools (names,
  globs or selectors): all from one pool, the first in objective order (or in
  the order named) that has enough, chosen inside it by the pool's strategy.
  Draining pools grant nothing; a member closed for draining is never granted.
"""

from __future__ import annotations

import math
from bisect import insort
from collections.abc import Callable, Iterable, Mapping, Sequence
from itertools import chain, filterfalse, islice
from dataclasses import dataclass

from mcpresd.core.constraints import Selector, matches_all, parse_selector, pick_local, request_cost
from mcpresd.core.errors import (
    DomainError,
    InsufficientCapacity,
    InvalidRequest,
    NeverFits,
    PoolDraining,
    ResourceExists,
    ResourceInUse,
    UnknownResource,
)
from mcpresd.core.model import AllocationItem, Demand, Request, Resource
from mcpresd.core.pools import Pool, PoolChoice, match_pools, rank_pools
from mcpresd.core.strategies import Candidate, rank
from mcpresd.protocol import POOL_PREFIX, FactoryKind, Objective, PoolState, ResourceType, Strategy, format_amount

EPSILON = 1e-9
CACHE_SIZE = 256

_Room = Callable[[Resource], float]


@dataclass(frozen=True)
class Observation:
    """What a sampler measured of a resource: utilisation 0..1 and free device memory in bytes."""

    load: float | None = None
    memory_free: int | None = None


_UNINDEXED = 1 << 30


def _order_key(resource: Resource) -> tuple[int, str]:
    index = resource.labels.get("index")
    return (index if isinstance(index, int) and not isinstance(index, bool) else _UNINDEXED, resource.name)


def quantity(value: float, unit: str) -> str:
    """An amount as the tables print it: sizes for bytes (8G, 2.5G), else the number (2, 0.5)."""
    return format_amount(value, unit) if unit in ("bytes", "bytes/s") else f"{value:g}"


def parse_where(where: Sequence[str]) -> tuple[Selector, ...]:
    return tuple(parse_selector(text) for text in where)


class Ledger:
    """Capacity and holdings of every resource, kept in memory for fast fitting."""

    def __init__(self, resources: Iterable[Resource] = (), held: Iterable[AllocationItem] = ()) -> None:
        self._resources: dict[str, Resource] = {}
        self._by_uuid: dict[str, str] = {}
        self._used: dict[str, float] = {}
        self._by_type: dict[ResourceType, list[str]] = {}
        self._order: dict[str, tuple[int, str]] = {}
        """Each resource's place in its type's list (_order_key), kept so that a sort reads it, not the labels."""
        self._cursor: dict[ResourceType, int] = {}
        self.observed: dict[str, Observation] = {}
        self.blocked: dict[str, str] = {}
        self.closed: dict[str, str] = {}
        """Pool members closed to new grants while they drain, with why."""
        self.pools: dict[str, Pool] = {}
        self._members: dict[str, list[str]] = {}
        self._pool_of: dict[str, str] = {}
        self._member_position: dict[str, int] = {}
        self._positions: dict[str, list[tuple[str, int]]] = {}
        """Every (pool, position) of each member: a member may stand in several pools."""
        self._held_prefix: dict[str, int] = {}
        """Per pool, a count of leading members known to be held: a scan for idle members starts there."""
        self._pool_cursor: dict[str, int] = {}
        self._queued_for: dict[str, int] = {}
        self.default_strategy = Strategy.FIRST_FIT.value
        self.version = 0
        self.catalogue_version = 0
        """Counts changes to the set of resources or their facts (add, remove, replace), not to holdings."""
        self._cache: dict[tuple[object, ...], tuple[int, tuple[AllocationItem, ...] | DomainError]] = {}
        self.cache_hits = 0
        self.cache_misses = 0
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
        self._order[resource.name] = _order_key(resource)
        insort(self._by_type.setdefault(resource.type, []), resource.name, key=self._order.__getitem__)
        self.version += 1
        self.catalogue_version += 1

    def add_many(self, resources: Sequence[Resource]) -> None:
        """Add several resources, or none if one cannot be added: one sort of each type's order, where adding
        them one by one inserts into a sorted list each time (100,000 took minutes)."""
        names = {resource.name for resource in resources}
        with_uuid = [resource for resource in resources if resource.uuid is not None]
        if (len(names) < len(resources) or not names.isdisjoint(self._resources)
                or not names.isdisjoint(self._by_uuid) or with_uuid):
            self._check_addable(resources)  # finds the first that cannot be added, and says why
        self._resources.update({resource.name: resource for resource in resources})
        self._by_uuid.update({resource.uuid: resource.name for resource in with_uuid if resource.uuid is not None})
        labelled = {resource.name: _order_key(resource) for resource in resources if resource.labels}
        self._order.update({resource.name: (_UNINDEXED, resource.name) for resource in resources})
        self._order.update(labelled)
        none_indexed = all(key[0] == _UNINDEXED for key in labelled.values())
        keys = self._order
        for kind in {resource.type for resource in resources}:
            order = self._by_type.setdefault(kind, [])
            added = [resource.name for resource in resources if resource.type is kind]
            # In key order, so when its first and last keys have no index, none of them has.
            unindexed = not order or keys[order[0]][0] == keys[order[-1]][0] == _UNINDEXED
            order.extend(added)
            if unindexed and none_indexed:
                order.sort()  # every key is (_UNINDEXED, name): the names' order, a twentieth of the cost
            else:
                order.sort(key=keys.__getitem__)  # two sorted runs, merged: linear
        self.version += 1
        self.catalogue_version += 1

    def _check_addable(self, resources: Sequence[Resource]) -> None:
        names: set[str] = set()
        for resource in resources:
            if resource.name in names:
                raise ResourceExists(f"a resource named {resource.name!r} is added twice", resource=resource.name)
            names.add(resource.name)
            if resource.name in self._resources or resource.name in self._by_uuid:
                raise ResourceExists(f"a resource named {resource.name!r} already exists", resource=resource.name)
            if resource.uuid is not None and (resource.uuid in self._by_uuid or resource.uuid in self._resources
                                              or resource.uuid in names):
                raise ResourceExists(f"a resource with UUID {resource.uuid!r} already exists",
                                     resource=resource.name)

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
        self._held_prefix.clear()
        if resource.uuid is not None:
            self._by_uuid.pop(resource.uuid, None)
        self._by_type[resource.type].remove(resource.name)
        del self._order[resource.name]
        self.version += 1
        self.catalogue_version += 1
        return resource

    def replace(self, resource: Resource, *, over_held: bool = False) -> None:
        """Update a resource's facts in place (capacity may not drop below what is held, unless `over_held`:
        then what is held stays held and nothing more is granted until it drops below the new capacity)."""
        old = self.get(resource.name)
        if not over_held and resource.capacity + EPSILON < self.used(old.name):
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
        self._order[resource.name] = _order_key(resource)
        insort(self._by_type.setdefault(resource.type, []), resource.name, key=self._order.__getitem__)
        self.version += 1
        self.catalogue_version += 1

    def block(self, name: str, reason: str | None) -> None:
        """Keep a resource out of new grants (an unhealthy one) until unblocked with None."""
        if reason is None:
            if self.blocked.pop(name, None) is not None:
                self.version += 1
        elif self.blocked.get(name) != reason:
            self.blocked[name] = reason
            self.version += 1

    def set_pools(self, pools: Iterable[Pool], members: dict[str, list[str]], closed: dict[str, str]) -> None:
        """The pools, each pool's members in order, and the members closed for draining."""
        self.pools = {pool.name: pool for pool in pools}
        self._members = {name: [m for m in members.get(name, []) if m in self._resources] for name in self.pools}
        self._pool_of = {}
        self._member_position = {}
        self._positions = {}
        self._held_prefix = {}
        for name, names in self._members.items():
            for position, member in enumerate(names):
                self._pool_of.setdefault(member, name)
                self._member_position.setdefault(member, position)
                self._positions.setdefault(member, []).append((name, position))
        self.closed = dict(closed)
        self.version += 1

    def members(self, pool: str) -> list[str]:
        return self._members.get(pool, [])

    def pool_of(self, resource: str) -> str | None:
        return self._pool_of.get(resource)

    def pool_shares(self) -> dict[str, dict[str, float]]:
        """What slot pools hold of each parent resource, by pool: {"cpu": {"builds": 2.0}}."""
        shares: dict[str, dict[str, float]] = {}
        for resource in self._resources.values():
            if resource.source != "pool":
                continue
            parent, pool, size = (resource.labels.get(k) for k in ("parent", "pool", "slot_size"))
            if isinstance(parent, str) and isinstance(pool, str) and isinstance(size, (int, float)):
                held = shares.setdefault(parent, {})
                held[pool] = held.get(pool, 0.0) + float(size)
        return shares

    def set_queued_demand(self, demand: dict[str, int]) -> None:
        """Members queued requests ask of each pool (the latency objective prefers short queues)."""
        self._queued_for = demand

    def unavailable(self, name: str) -> str | None:
        return self.blocked.get(name) or self.closed.get(name)

    def observe(self, name: str, observation: Observation) -> None:
        if self.observed.get(name) != observation:
            self.observed[name] = observation
            self.version += 1

    # -- holdings ---------------------------------------------------------

    def hold(self, items: Iterable[AllocationItem]) -> None:
        for item in items:
            total = self._used.get(item.resource, 0.0) + item.amount
            if total > EPSILON:
                self._used[item.resource] = total
            # else: within the tolerance every fit uses, so not kept. `_used` holds exactly the resources held
            # beyond EPSILON: a pool's scan for idle members treats its keys as busy, as `free()` would.
            resource = self._resources.get(item.resource)
            if resource is not None and resource.is_device:
                self._cursor[resource.type] = self._position(resource) + 1
            pool = self._pool_of.get(item.resource)
            if pool is not None:
                self._pool_cursor[pool] = self._member_position[item.resource] + 1
        self.version += 1

    def unhold(self, items: Iterable[AllocationItem]) -> None:
        for item in items:
            left = self._used.get(item.resource, 0.0) - item.amount
            if left < EPSILON:
                self._used.pop(item.resource, None)  # only held resources are kept: in_use() is their count
                for pool, position in self._positions.get(item.resource, ()):
                    if self._held_prefix.get(pool, 0) > position:
                        self._held_prefix[pool] = position  # idle again: scans start no later than here
            else:
                self._used[item.resource] = left
        self.version += 1

    def in_use(self) -> Mapping[str, float]:
        """The amount held of every resource that is held at all (idle ones are absent). Read it, never change it."""
        return self._used

    def _position(self, resource: Resource) -> int:
        return self._by_type[resource.type].index(resource.name)

    # -- fitting ----------------------------------------------------------

    def plan_request(self, request: Request,
                     reserved: Sequence[AllocationItem] = ()) -> tuple[AllocationItem, ...]:
        """Plan a stored request; `reserved` counts as held (without changing the ledger or its cache)."""
        if reserved:
            kept: dict[str, float] = {}
            for item in reserved:
                kept[item.resource] = kept.get(item.resource, 0.0) + item.amount
            return self._plan(request.demands, Strategy(request.strategy or self.default_strategy),
                              parse_where(request.where), request.max_cost, kept, request.objective)
        key = (request.key, self.default_strategy)
        cached = self._cache.get(key)
        if cached is not None and cached[0] == self.version:
            self.cache_hits += 1
            if isinstance(cached[1], DomainError):
                raise cached[1].with_traceback(None)
            return cached[1]
        try:
            items = self.plan(request.demands, strategy=Strategy(request.strategy or self.default_strategy),
                              where=parse_where(request.where), max_cost=request.max_cost,
                              objective=request.objective)
        except DomainError as error:
            self._cache[key] = (self.version, error)
            raise
        self._cache[key] = (self.version, items)
        return items

    def plan(
        self,
        demands: Sequence[Demand],
        *,
        strategy: Strategy = Strategy.FIRST_FIT,
        where: Sequence[Selector] = (),
        max_cost: float | None = None,
        objective: str | None = None,
    ) -> tuple[AllocationItem, ...]:
        """Choose what to grant for all demands at once, or raise without changing anything."""
        if not demands:
            raise InvalidRequest("a request must ask for at least one resource")
        key = (tuple(demands), strategy, tuple(s.text for s in where), max_cost, objective)
        cached = self._cache.get(key)
        if cached is not None and cached[0] == self.version:
            self.cache_hits += 1
            if isinstance(cached[1], DomainError):
                raise cached[1].with_traceback(None)
            return cached[1]
        self.cache_misses += 1
        if len(self._cache) >= CACHE_SIZE:
            self._cache.clear()
        try:
            items = self._plan(demands, strategy, where, max_cost, objective=objective)
        except DomainError as error:
            self._cache[key] = (self.version, error)  # "does not fit" is a decision too
            raise
        self._cache[key] = (self.version, items)
        return items

    def _plan(self, demands: Sequence[Demand], strategy: Strategy, where: Sequence[Selector],
              max_cost: float | None, reserved: dict[str, float] | None = None,
              objective: str | None = None) -> tuple[AllocationItem, ...]:
        tentative: dict[str, float] = dict(reserved) if reserved else {}
        shortfalls: list[dict[str, object]] = []
        granted: list[AllocationItem] = []

        def room(resource: Resource) -> float:
            return resource.capacity - self.used(resource.name) - tentative.get(resource.name, 0.0)

        for demand in demands:
            if not (math.isfinite(demand.amount) and demand.amount > 0):
                raise InvalidRequest(
                    f"amount for {demand.selector!r} must be a positive finite number", resource=demand.selector
                )
            if demand.most is not None and demand.most < demand.amount:
                raise InvalidRequest(f"the most asked of {demand.selector!r} is less than the least",
                                     resource=demand.selector)
            resource = self.find(demand.selector)
            if resource is not None:
                chosen = self._plan_named(resource, demand, room)
            elif demand.selector.startswith(POOL_PREFIX):
                chosen = self._plan_pool(demand, room, objective)
            else:
                chosen = self._plan_typed(demand, room, strategy, where)
            if chosen is None:
                shortfalls.append(self._shortfall(demand, room, where))
                continue
            for item in chosen:
                tentative[item.resource] = tentative.get(item.resource, 0.0) + item.amount
                granted.append(item)
        if shortfalls:
            shares = self.pool_shares()
            parts = ", ".join(self._shortfall_text(s, shares) for s in shortfalls)
            raise InsufficientCapacity(f"not enough free now ({parts})", shortfalls=shortfalls)
        items = tuple(_merge(granted))
        if max_cost is not None:
            cost = request_cost([(self._resources[i.resource], i.amount) for i in items])
            if cost > max_cost + EPSILON:
                raise InsufficientCapacity(
                    f"the grant would cost {cost:g} per hour, more than the maximum of {max_cost:g}",
                    shortfalls=[], cost=cost, max_cost=max_cost,
                )
        return items

    def _shortfall_text(self, shortfall: dict[str, object], shares: dict[str, dict[str, float]]) -> str:
        """`memory: asked 8G, free 2.5G`, in the units the tables print; naming the pools that hold a share."""
        name = str(shortfall["resource"])
        unit = self.unit_of(name)
        requested, free = shortfall["requested"], shortfall["free"]
        assert isinstance(requested, float | int) and isinstance(free, float | int)
        text = f"{name}: asked {quantity(requested, unit)}, free {quantity(free, unit)}"
        if shortfall.get("blocked"):
            text += f" but not granted ({shortfall['blocked']})"
        held = self._held_by_pools(name, shares)
        if held:
            text += "".join(f", pool {pool} holds {quantity(amount, unit)}" for pool, amount in held)
        return text

    def unit_of(self, selector: str) -> str:
        """The unit of the resource named, or of those of the type named; '' for a pool or an unknown name."""
        resource = self.find(selector)
        if resource is not None:
            return resource.unit
        try:
            names = self._by_type.get(ResourceType(selector), [])
        except ValueError:
            return ""
        return self._resources[names[0]].unit if names else ""

    def _held_by_pools(self, selector: str, shares: dict[str, dict[str, float]]) -> list[tuple[str, float]]:
        """The pools holding part of the resource named (or of those of the type named), largest first."""
        resource = self.find(selector)
        if resource is not None:
            names = [resource.name]
        else:
            try:
                names = self._by_type.get(ResourceType(selector), [])
            except ValueError:
                names = []
        held: dict[str, float] = {}
        for name in names:
            for pool, amount in shares.get(name, {}).items():
                held[pool] = held.get(pool, 0.0) + amount
        return sorted(held.items(), key=lambda pair: (-pair[1], pair[0]))

    def _plan_named(self, resource: Resource, demand: Demand, room: _Room) -> list[AllocationItem] | None:
        if resource.is_device and demand.amount > resource.capacity + EPSILON:
            raise InvalidRequest(
                f"{resource.name} is one device: ask for at most 1 of it, or for {demand.amount:g} of 'gpu'",
                resource=resource.name,
            )
        if demand.amount > resource.capacity + EPSILON:
            raise NeverFits(
                f"{resource.name} has a capacity of {quantity(resource.capacity, resource.unit)}, less than the "
                f"{quantity(demand.amount, resource.unit)} asked",
                shortfalls=[self._shortfall(demand, room, ())],
            )
        available = room(resource)
        if self.unavailable(resource.name):
            return None
        if demand.amount <= available + EPSILON:
            amount = demand.amount if demand.most is None else min(demand.most, max(demand.amount, available))
            return [AllocationItem(resource.name, amount)]
        return None

    def _candidates(self, kind: ResourceType, where: Sequence[Selector], room: _Room) -> list[Candidate]:
        candidates = []
        for position, name in enumerate(self._by_type.get(kind, [])):
            resource = self._resources[name]
            if where and not matches_all(where, resource):
                continue
            observed = self.observed.get(name)
            candidates.append(Candidate(
                resource=resource,
                free=0.0 if self.unavailable(name) else max(0.0, room(resource)),  # counted, not granted
                load=observed.load if observed else None,
                memory_free=observed.memory_free if observed else None,
                position=position,
            ))
        return candidates

    def _plan_typed(self, demand: Demand, room: _Room, strategy: Strategy,
                    where: Sequence[Selector]) -> list[AllocationItem] | None:
        try:
            kind = ResourceType(demand.selector)
        except ValueError:
            raise UnknownResource(
                f"no resource named {demand.selector!r} (see `mcpctl resources`)", resource=demand.selector
            ) from None
        if not self._by_type.get(kind):
            raise UnknownResource(f"this host has no {kind.value} resource", resource=demand.selector)
        candidates = self._candidates(kind, where, room)
        if not candidates:
            raise NeverFits(f"no {kind.value} resource matches {', '.join(s.text for s in where)}",
                            resource=demand.selector)
        cursor = self._cursor.get(kind, 0)
        if kind is ResourceType.GPU:
            return self._plan_devices(candidates, demand, strategy, cursor)
        if all(demand.amount > c.resource.capacity + EPSILON for c in candidates):
            raise NeverFits(f"no {kind.value} resource is large enough for "
                            f"{quantity(demand.amount, candidates[0].resource.unit)}",
                            shortfalls=[self._shortfall(demand, room, where)])
        ranked = rank(strategy, candidates, demand.amount, cursor)
        if not ranked:
            return None
        best = ranked[0]
        amount = demand.amount if demand.most is None else min(demand.most, max(demand.amount, best.free))
        return [AllocationItem(best.resource.name, amount)]

    def _plan_devices(self, candidates: list[Candidate], demand: Demand, strategy: Strategy,
                      cursor: int) -> list[AllocationItem] | None:
        amount = demand.amount
        if amount >= 1:
            if abs(amount - round(amount)) > EPSILON or (demand.most is not None
                                                          and abs(demand.most - round(demand.most)) > EPSILON):
                raise InvalidRequest(f"ask for a whole number of GPUs or a fraction below 1 of one, not {amount:g}",
                                     resource="gpu")
            count = round(amount)
            if count > len(candidates):
                raise NeverFits(
                    f"this host has {len(candidates)} matching GPU(s), fewer than the {count} asked",
                    shortfalls=[{"resource": "gpu", "requested": amount, "free": 0.0,
                                 "capacity": float(len(candidates))}],
                )
            idle = [c for c in candidates if c.free >= c.resource.capacity - EPSILON]
            most = count if demand.most is None else round(demand.most)
            ranked = [c.resource for c in rank(strategy, idle, 1.0, cursor)]
            take = min(most, len(ranked))
            if take < count:
                return None
            chosen = pick_local(ranked, take)
            if chosen is None:
                return None
            return [AllocationItem(d.name, d.capacity) for d in chosen]
        if demand.most is not None and demand.most >= 1:
            raise InvalidRequest("a GPU share is a fraction below 1 of one device; ask for whole GPUs otherwise",
                                 resource="gpu")
        ranked_shares = rank(strategy, candidates, amount, cursor)
        if not ranked_shares:
            return None
        best = ranked_shares[0]
        share = amount if demand.most is None else min(demand.most, max(amount, best.free))
        return [AllocationItem(best.resource.name, share)]

    # -- pools ------------------------------------------------------------

    def matched_pools(self, selector: str) -> list[Pool]:
        """The pools a `pool:...` demand names; raises UnknownPool for a name or pattern that matches none."""
        return match_pools(list(self.pools.values()), [p.strip() for p in selector[len(POOL_PREFIX):].split(",")])

    def idle_members(self, pool: str, room: _Room | None = None) -> list[Resource]:
        """Members of `pool` that could be granted whole now."""
        fits = room or (lambda r: self.free(r.name))
        return [self._resources[m] for m in self._members.get(pool, [])
                if not self.unavailable(m) and fits(self._resources[m]) >= self._resources[m].capacity - EPSILON]

    def pool_size_limit(self, pool: Pool) -> int:
        """The most members `pool` can ever have: its maximum if it makes members, else those it has."""
        if pool.makes_members and pool.spec.max_size is not None:
            return pool.spec.max_size
        return len(self._members.get(pool.name, []))

    def _plan_pool(self, demand: Demand, room: _Room, objective: str | None) -> list[AllocationItem] | None:
        matched = self.matched_pools(demand.selector)
        serving = [p for p in matched if p.state is PoolState.ACTIVE]
        if not serving:
            states = ", ".join(f"{p.name} is {p.state.value}" for p in matched)
            raise PoolDraining(f"no new grants from a draining pool ({states}); `mcpctl pool undrain` reopens it",
                               pools=[p.name for p in matched])
        count = round(demand.amount)
        if all(count > self.pool_size_limit(p) for p in serving):
            most = max(self.pool_size_limit(p) for p in serving)
            raise NeverFits(f"{demand.selector} can never have {count} members (at most {most})",
                            resource=demand.selector)
        if objective is not None and len(serving) > 1:
            choices = [PoolChoice(p.name, self._pool_cost(p), self._pool_utilisation(p), self._pool_load(p),
                                  self._queued_for.get(p.name, 0), len(self.idle_members(p.name, room)), position)
                       for position, p in enumerate(serving)]
            order = {c.name: i for i, c in enumerate(rank_pools(Objective(objective), choices))}
            serving.sort(key=lambda p: order[p.name])
        for pool in serving:
            take = count if demand.most is None else round(demand.most)
            if self._in_order(pool):
                scanned = self._scan_idle(pool, room, take)
                if len(scanned) >= count:
                    return [AllocationItem(r.name, r.capacity) for r in scanned]
                continue
            idle = self.idle_members(pool.name, room)
            if len(idle) < count:
                continue
            position = self._member_position
            candidates = [Candidate(resource=r, free=room(r), load=self._load_of(r.name),
                                    memory_free=self._memory_free_of(r.name), position=position[r.name])
                          for r in idle]
            ranked = [c.resource for c in rank(pool.spec.strategy, candidates, 0.0,
                                               self._pool_cursor.get(pool.name, 0))]
            take = min(len(ranked), take)
            chosen = pick_local(ranked, take) if pool.spec.strategy is Strategy.LOCALITY_AWARE else ranked[:take]
            if chosen is None:
                chosen = ranked[:take]
            return [AllocationItem(r.name, r.capacity) for r in chosen]
        return None

    def _in_order(self, pool: Pool) -> bool:
        """Whether the pool's strategy picks idle members in member order (from the cursor, for round-robin).

        First-fit and round-robin always do. Slots are alike and never measured, so best-fit, least-loaded and
        the rest come out in member order too; the ledger then scans instead of ranking every member.
        """
        strategy = pool.spec.strategy
        if strategy in (Strategy.FIRST_FIT, Strategy.ROUND_ROBIN):
            return True
        return strategy is not Strategy.LOCALITY_AWARE and pool.spec.factory is FactoryKind.SLOTS

    def _scan_idle(self, pool: Pool, room: _Room, most: int) -> list[Resource]:
        """Up to `most` idle members of `pool`, in member order (from the round-robin cursor).

        A pool of 1,000 with 990 busy must not cost a Python loop over the 990 on every grant. In member order
        the scan starts after the leading members known to be held (`_held_prefix`, moved back by `unhold`);
        from the cursor it skips held members with a C-level filter (`_used` keeps only held resources).
        """
        members = self._members.get(pool.name, [])
        if not members:
            return []
        used = self._used
        if pool.spec.strategy is Strategy.ROUND_ROBIN:
            start = self._pool_cursor.get(pool.name, 0) % len(members)
            order: Iterable[str] = chain(islice(members, start, None), islice(members, start))
        else:
            first = self._held_prefix.get(pool.name, 0)
            while first < len(members) and members[first] in used:
                first += 1
            self._held_prefix[pool.name] = first
            order = islice(members, first, None)
        blocked, closed, resources = self.blocked, self.closed, self._resources
        chosen: list[Resource] = []
        for name in filterfalse(used.__contains__, order):  # any holding at all makes a member busy
            if name in blocked or name in closed:
                continue
            resource = resources[name]
            if room(resource) >= resource.capacity - EPSILON:
                chosen.append(resource)
                if len(chosen) >= most:
                    break
        return chosen

    def _load_of(self, name: str) -> float | None:
        observed = self.observed.get(name)
        return observed.load if observed else None

    def _memory_free_of(self, name: str) -> int | None:
        observed = self.observed.get(name)
        return observed.memory_free if observed else None

    def _pool_cost(self, pool: Pool) -> float | None:
        if pool.spec.cost_per_unit_hour is not None:
            return pool.spec.cost_per_unit_hour
        costs = [self._resources[m].cost_per_unit_hour for m in self._members.get(pool.name, [])]
        known = [c for c in costs if c is not None]
        return min(known) if known else None

    def _pool_utilisation(self, pool: Pool) -> float:
        members = self._members.get(pool.name, [])
        if not members:
            return 1.0
        return sum(1 for m in members if self.used(m) > EPSILON) / len(members)

    def _pool_load(self, pool: Pool) -> float | None:
        loads = [load for m in self._members.get(pool.name, []) if (load := self._load_of(m)) is not None]
        return sum(loads) / len(loads) if loads else None

    def reserve(self, request: Request) -> tuple[AllocationItem, ...]:
        """What is free now towards a blocked request: held for it so smaller requests cannot take it."""
        where = parse_where(request.where)
        kept: list[AllocationItem] = []
        for demand in request.demands:
            resource = self.find(demand.selector)
            if resource is not None:
                if self.free(resource.name) > EPSILON:
                    kept.append(AllocationItem(resource.name, min(self.free(resource.name), demand.amount)))
                continue
            if demand.selector.startswith(POOL_PREFIX):
                try:
                    pools = [p for p in self.matched_pools(demand.selector) if p.state is PoolState.ACTIVE]
                except DomainError:
                    continue
                idle = max((self.idle_members(p.name) for p in pools), key=len, default=[])
                kept.extend(AllocationItem(r.name, r.capacity) for r in idle[: round(demand.amount)])
                continue
            try:
                kind = ResourceType(demand.selector)
            except ValueError:
                continue
            members = [self._resources[n] for n in self._by_type.get(kind, [])
                       if not where or matches_all(where, self._resources[n])]
            if kind is ResourceType.GPU and demand.amount >= 1:
                idle = [d for d in members if self.used(d.name) <= EPSILON]
                kept.extend(AllocationItem(d.name, d.capacity) for d in idle[: round(demand.amount)])
            elif members:
                roomiest = max(members, key=lambda r: (self.free(r.name), -_order_key(r)[0]))
                if self.free(roomiest.name) > EPSILON:
                    kept.append(AllocationItem(roomiest.name, min(self.free(roomiest.name), demand.amount)))
        return tuple(kept)

    def _shortfall(self, demand: Demand, room: _Room, where: Sequence[Selector]) -> dict[str, object]:
        resource = self.find(demand.selector)
        if resource is not None:
            shortfall: dict[str, object] = {
                "resource": resource.name,
                "requested": demand.amount,
                "free": max(0.0, room(resource)),
                "capacity": resource.capacity,
            }
            if self.unavailable(resource.name):
                shortfall["blocked"] = self.unavailable(resource.name)
            return shortfall
        if demand.selector.startswith(POOL_PREFIX):
            try:
                pools = self.matched_pools(demand.selector)
            except DomainError:
                pools = []
            return {
                "resource": demand.selector,
                "requested": demand.amount,
                "free": float(max((len(self.idle_members(p.name, room)) for p in pools
                                   if p.state is PoolState.ACTIVE), default=0)),
                "capacity": float(sum(len(self._members.get(p.name, [])) for p in pools)),
            }
        members = [self._resources[n] for n in self._by_type.get(ResourceType(demand.selector), [])
                   if not where or matches_all(where, self._resources[n])]
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


def _merge(items: list[AllocationItem]) -> list[AllocationItem]:
    totals: dict[str, float] = {}
    for item in items:
        totals[item.resource] = totals.get(item.resource, 0.0) + item.amount
    return [AllocationItem(name, totals[name]) for name in sorted(totals)]
