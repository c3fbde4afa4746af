"""Pools, in store jobs: members, draining, autoscaling and factories. The decisions are `core.pools`'.

Rules:
- How a pool gets members is its `Factory` (the plug point): `StaticFactory` (listed or selected resources),
  `SlotsFactory` (shares of a parent), `CommandFactory` (the user's commands). The keeper does the rest.
- A member a factory made (a slot, a command's worker) is a resource of source "pool". A slot holds its share
  of the parent in the ledger for as long as it exists, so slots and direct allocations never over-commit it.
- Static pools list or select existing resources; their membership follows the resources as they come and go.
- Scaling is evaluated on every broker tick; every decision is an event with its reason (`pool events`).
- Scale-down touches only idle members: each is closed (draining) first, then removed.
- Command factories run outside the store's transactions (the daemon runs them, with a timeout, in their own process
  group), so they never block it; the outcome comes back through `factory_done`. A factory that keeps failing
  is paused for a cooldown (a circuit breaker), with an event and a `pool-factory` alert.
- A made member whose resource or parent is unhealthy (blocked by the monitor) is replaced when idle, where
  the factory can make one elsewhere.
- Creating, draining and deleting pools is for root, the daemon's own user and the admin group: a command
  factory runs with the daemon's rights.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal, Protocol

from mcpresd.core import alerts as alerting
from mcpresd.core.constraints import Selector, matches_all, parse_selector
from mcpresd.core.errors import (
    DomainError,
    NeverFits,
    PermissionDenied,
    PoolExists,
    ResourceExists,
    ResourceInUse,
    UnknownPool,
    UnknownResource,
)
from mcpresd.core.ledger import EPSILON
from mcpresd.core.model import AllocationItem, Resource
from mcpresd.core.pools import (
    Pool,
    PoolLoad,
    PoolSpec,
    ScalePolicy,
    decide_scale,
    factory_failed,
    factory_paused,
    factory_succeeded,
    parse_member,
    settle_state,
    slot_member,
    utilisation,
)
from mcpresd.protocol import POOL_PREFIX, FactoryKind, PoolState, ResourceType, Strategy

if TYPE_CHECKING:
    from mcpresd.service import Broker, Caller


class PoolNotApplied(Exception):
    """A pool declared in the config cannot be served on this host (at start-up, a config error)."""


@dataclass(frozen=True)
class FactoryRun:
    """A command factory run for the daemon to carry out outside the store's transactions."""

    pool: str
    action: Literal["create", "destroy"]
    command: str
    timeout_s: float
    index: int
    member: str | None = None
    handle: str = "{}"
    """The member's description (JSON), given to a destroy command on its stdin."""


@dataclass(frozen=True)
class Member:
    """A member a factory made."""

    resource: str
    pool: str
    parent: str | None
    parent_amount: float | None
    handle: dict[str, Any]
    draining: bool
    created_at: float


class PoolKeeper:
    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.pools: dict[str, Pool] = {}
        self.made: dict[str, Member] = {}
        self._creating: dict[str, int] = {}
        self._stuck: dict[str, str] = {}
        self.load()

    # -- state ----------------------------------------------------------------

    def load(self) -> None:
        """From the database into the broker's (new) ledger: pools, made members and the parents' shares."""
        store, ledger = self.broker.store, self.broker.ledger
        self.pools = {row[0]: _pool_from_row(row) for row in store.load_pools()}
        self.made = {}
        self._creating = {}  # runs asked for by a rolled-back transaction never start
        for resource, pool, parent, amount, handle, draining, created in store.load_members():
            self.made[resource] = Member(resource, pool, parent, amount, json.loads(handle), bool(draining), created)
            if parent is not None and parent in ledger:
                ledger.hold([AllocationItem(parent, amount)])
        self.sync()

    def sync(self) -> None:
        """Tell the ledger each pool's members and which are closed."""
        closed = {m.resource: f"pool {m.pool} is draining it" for m in self.made.values()
                  if m.draining or self.pools[m.pool].state is not PoolState.ACTIVE}
        self.broker.ledger.set_pools(self.pools.values(), {name: self._members_of(pool)
                                                          for name, pool in self.pools.items()}, closed)

    def any_joins_a_pool(self, resources: Iterable[Resource]) -> bool:
        """Whether any of these resources, just registered, is a member of some pool (see joins_a_pool)."""
        static = [pool for pool in self.pools.values() if pool.spec.factory is FactoryKind.STATIC]
        return bool(static) and any(StaticFactory.takes(pool, resource) for resource in resources for pool in static)

    def joins_a_pool(self, resource: Resource) -> bool:
        """Whether a resource just registered is a member of some pool: a static pool lists it or selects it.

        Only then must the pools be synced: a sync rebuilds every pool's member list, which for a pool of
        1,000 made 100,000 registrations take 148 s instead of 15.
        """
        return any(pool.spec.factory is FactoryKind.STATIC and StaticFactory.takes(pool, resource)
                   for pool in self.pools.values())  # slots and command pools make their own members

    def _members_of(self, pool: Pool) -> list[str]:
        return FACTORIES[pool.spec.factory].members(self, pool)

    def made_by(self, pool: str) -> list[str]:
        return [m.resource for m in self.made.values() if m.pool == pool]

    def _save(self, pool: Pool) -> None:
        self.pools[pool.name] = pool
        self.broker.store.save_pool(_pool_row(pool))

    def _event(self, now: float, pool: str, kind: str, **detail: Any) -> None:
        self.broker._event(now, f"pool.{kind}", resource=POOL_PREFIX + pool, detail=detail)

    def load_of(self, pool: Pool, queued: dict[str, int] | None = None) -> PoolLoad:
        ledger = self.broker.ledger
        names = ledger.members(pool.name)
        serving = [n for n in names if not (n in self.made and self.made[n].draining)]
        busy = [n for n in serving if ledger.used(n) > EPSILON]
        idle = [n for n in serving if ledger.used(n) <= EPSILON]
        demand = (queued if queued is not None else self.queued_demand()).get(pool.name, 0)
        return PoolLoad(size=len(serving) + self._creating.get(pool.name, 0), busy=len(busy), queued=demand,
                        idle=tuple(reversed(idle)))

    def queued_demand(self) -> dict[str, int]:
        """Members that queued requests ask of each pool they name."""
        demand: dict[str, int] = {}
        ledger = self.broker.ledger
        for allocation in self.broker._queued.values():
            assert allocation.request is not None
            for wanted in allocation.request.demands:
                if not wanted.selector.startswith(POOL_PREFIX):
                    continue
                try:
                    matched = ledger.matched_pools(wanted.selector)
                except DomainError:
                    continue
                for pool in matched:
                    demand[pool.name] = demand.get(pool.name, 0) + round(wanted.amount)
        return demand

    def wants_ticks(self) -> bool:
        return any(pool.makes_members or pool.state is PoolState.DRAINING for pool in self.pools.values())

    # -- the tick -------------------------------------------------------------

    def tick(self, now: float) -> bool:
        """Finish draining, replace unhealthy members, scale; True if anything changed."""
        queued = self.queued_demand()
        self.broker.ledger.set_queued_demand(queued)
        changed = False
        for name in list(self.pools):
            changed |= self._retire_drained_members(name, now)
            changed |= self._settle(name, now)
            changed |= self._replace_unhealthy(name, now)
            changed |= self._scale(name, now, queued)
        if changed:
            self.sync()
        return changed

    def _retire_drained_members(self, name: str, now: float) -> bool:
        ledger = self.broker.ledger
        done = [m for m in self.made.values() if m.pool == name and m.draining and ledger.used(m.resource) <= EPSILON]
        for member in done:
            self._remove_member(member, now, "drained")
        return bool(done)

    def _settle(self, name: str, now: float) -> bool:
        pool = self.pools[name]
        ledger = self.broker.ledger
        busy = sum(1 for m in ledger.members(name) if ledger.used(m) > EPSILON)
        settled = settle_state(pool, busy)
        if settled == pool:
            return False
        self._save(settled)
        self._event(now, name, "drained", reason="the last allocation from it ended")
        return True

    def _replace_unhealthy(self, name: str, now: float) -> bool:
        pool = self.pools[name]
        factory = FACTORIES[pool.spec.factory]
        if pool.state is not PoolState.ACTIVE or not pool.makes_members:
            return False
        ledger = self.broker.ledger
        changed = False
        for member in [m for m in self.made.values() if m.pool == name and not m.draining]:
            why = ledger.blocked.get(member.resource) or (ledger.blocked.get(member.parent) if member.parent else None)
            if why is None or ledger.used(member.resource) > EPSILON:
                continue
            made = factory.replace(self, self.pools[name], member, now)
            if made is None:
                continue  # nowhere healthy to put it: keep it (closed to grants by its health) until there is
            self._remove_member(member, now, f"replaced by {made}: {why}")
            self._event(now, name, "member_replaced", member=member.resource, replacement=made, reason=why)
            changed = True
        return changed

    def _scale(self, name: str, now: float, queued: dict[str, int]) -> bool:
        pool = self.pools[name]
        if not pool.makes_members or pool.state is not PoolState.ACTIVE:
            return False
        if factory_paused(pool, now):
            return False
        load = self.load_of(pool, queued)
        decision = decide_scale(pool, load, now)
        if not decision.changed:
            return False
        added: list[str] = []
        pending = 0
        if decision.add:
            added, pending = self._add_members(name, decision.add, now)
            if not added and not pending:
                reason = FACTORIES[pool.spec.factory].no_room(pool)
                if self._stuck.get(name) != reason:
                    self._stuck[name] = reason
                    self._event(now, name, "scale_blocked", reason=f"{decision.reason}; but {reason}")
                return False
        self._stuck.pop(name, None)
        for member in decision.remove:
            self._close(self.made[member], now)
        after = load.size + len(added) + pending - len(decision.remove)
        self._save(replace(self.pools[name], last_scaled_at=now))
        self._event(now, name, "scaled_up" if decision.add else "scaled_down", reason=decision.reason,
                    size_before=load.size, size_after=after, utilisation=round(min(utilisation(load), 1e9), 4),
                    busy=load.busy, queued=load.queued, added=added, removed=list(decision.remove))
        for member in decision.remove:
            self._remove_member(self.made[member], now, "scaled down")
        return True

    # -- members ----------------------------------------------------------------

    def _add_members(self, name: str, count: int, now: float) -> tuple[list[str], int]:
        """Up to `count` new members: those made at once, and how many are being made (command runs)."""
        factory = FACTORIES[self.pools[name].spec.factory]
        added: list[str] = []
        pending = 0
        for _ in range(count):
            made = factory.make(self, self.pools[name], now)
            if made is None:
                break
            if made is PENDING:
                pending += 1
            else:
                added.append(made)
        return added, pending

    def add_slot(self, name: str, now: float, parent: Resource) -> str:
        pool = self.pools[name]
        spec = pool.spec
        assert spec.slot_size is not None
        member = slot_member(spec, pool.next_index, parent)
        self._add_member_resource(member, now)
        self.broker.ledger.hold([AllocationItem(parent.name, spec.slot_size)])
        self._keep(Member(member.name, name, parent.name, spec.slot_size, {}, False, now))
        self._save(replace(pool, next_index=pool.next_index + 1))
        self._event(now, name, "member_added", member=member.name, parent=parent.name, share=spec.slot_size)
        return member.name

    def _add_member_resource(self, member: Resource, now: float) -> None:
        self.broker.ledger.add(member)
        self.broker.store.insert_resource(member, now)

    def _keep(self, member: Member) -> None:
        self.made[member.resource] = member
        self.broker.store.save_member((member.resource, member.pool, member.parent, member.parent_amount,
                                       json.dumps(member.handle), int(member.draining), member.created_at))

    def request_member(self, name: str) -> None:
        pool = self.pools[name]
        assert pool.spec.create is not None
        self._creating[name] = self._creating.get(name, 0) + 1
        self.broker.outbox.factory.append(FactoryRun(name, "create", pool.spec.create, pool.spec.timeout_s,
                                                     pool.next_index))
        self._save(replace(pool, next_index=pool.next_index + 1))

    def _close(self, member: Member, now: float) -> None:
        if not member.draining:
            self._keep(replace(member, draining=True))
            self._event(now, member.pool, "member_draining", member=member.resource)

    def _remove_member(self, member: Member, now: float, reason: str) -> None:
        ledger, store = self.broker.ledger, self.broker.store
        ledger.remove(member.resource)
        del self.made[member.resource]
        store.delete_member(member.resource)
        store.delete_resource(member.resource)
        self._event(now, member.pool, "member_removed", member=member.resource, reason=reason)
        pool = self.pools.get(member.pool)
        if pool is not None:
            FACTORIES[pool.spec.factory].unmake(self, pool, member)

    def factory_done(self, run: FactoryRun, ok: bool, output: str, error: str) -> None:
        """A command factory run finished (on the daemon's side): take its member, or count its failure."""
        now = self.broker.clock()
        if run.action == "destroy":
            if not ok:
                self._event(now, run.pool, "factory_failed", action="destroy", member=run.member, error=error)
            return
        self._creating[run.pool] = max(0, self._creating.get(run.pool, 0) - 1)
        pool = self.pools.get(run.pool)
        if pool is None:
            return
        member: Resource | None = None
        description = None
        if ok:
            try:
                description = parse_member(output, pool.spec, run.index)
                if self.broker.ledger.find(description.name) is not None:
                    raise ResourceExists(f"the factory named a member {description.name!r}, which exists already")
                member = Resource(
                    name=description.name, type=ResourceType.CUSTOM, capacity=description.capacity,
                    unit=description.unit, labels={**pool.spec.labels, **description.labels, "pool": pool.name},
                    cost_per_unit_hour=pool.spec.cost_per_unit_hour, source="pool")
            except DomainError as problem:
                ok, error = False, problem.message
        if not ok or member is None or description is None:
            self._factory_failed(pool, now, error)
            return
        self._add_member_resource(member, now)
        self._keep(Member(member.name, pool.name, None, None, dict(description.handle), False, now))
        if pool.failures or pool.paused_until is not None:
            self.broker.monitor.condition("pool-factory", POOL_PREFIX + pool.name, None, 0.0, now,
                                          {"why": "the factory made a member again"})
        self._save(factory_succeeded(self.pools[pool.name]))
        self._event(now, pool.name, "member_added", member=member.name, capacity=member.capacity)
        if pool.state is not PoolState.ACTIVE:
            self._close(self.made[member.name], now)
        self.sync()
        self.broker.schedule()

    def _factory_failed(self, pool: Pool, now: float, error: str) -> None:
        failed = factory_failed(pool, now)
        self._save(failed)
        self._event(now, pool.name, "factory_failed", action="create", error=error, failures=failed.failures)
        if factory_paused(failed, now) and not factory_paused(pool, now):
            self._event(now, pool.name, "factory_paused", until=failed.paused_until, failures=failed.failures,
                        reason=f"{failed.failures} failures in a row; paused for {pool.spec.scale.pause_s:g}s")
            self.broker.monitor.condition("pool-factory", POOL_PREFIX + pool.name, alerting.Level.ERROR,
                                          float(failed.failures), now,
                                          {"why": f"the factory of pool {pool.name} failed {failed.failures} times"
                                                  f" in a row: {error}", "until": failed.paused_until})

    # -- the pools.* methods ------------------------------------------------------

    def create(self, caller: Caller, spec: PoolSpec, source: Literal["config", "api"] = "api") -> dict[str, Any]:
        _administer(caller, "create pools")
        if spec.name in self.pools:
            raise PoolExists(f"a pool named {spec.name!r} already exists", pool=spec.name)
        self._check(spec)
        now = self.broker.clock()
        self._save(Pool(spec, source=source, created_at=now))
        self._event(now, spec.name, "created", factory=spec.factory.value, min=spec.min_size, max=spec.max_size,
                    strategy=spec.strategy.value)
        self.sync()
        self.tick(now)
        self.broker.schedule()
        return self.pool_dict(spec.name)

    def _check(self, spec: PoolSpec) -> None:
        FACTORIES[spec.factory].check(self, spec)

    def get(self, name: str) -> Pool:
        pool = self.pools.get(name)
        if pool is None:
            raise UnknownPool(f"no pool named {name!r} (see `mcpctl pools`)", pool=name)
        return pool

    def drain(self, caller: Caller, name: str) -> dict[str, Any]:
        _administer(caller, "drain pools")
        pool = self.get(name)
        if pool.state is PoolState.ACTIVE:
            now = self.broker.clock()
            self._save(replace(pool, state=PoolState.DRAINING))
            busy = sum(1 for m in self.broker.ledger.members(name) if self.broker.ledger.used(m) > EPSILON)
            self._event(now, name, "draining", reason="asked to drain", busy=busy)
            self._settle(name, now)
            self.sync()
            self.broker.schedule()
        return self.pool_dict(name)

    def undrain(self, caller: Caller, name: str) -> dict[str, Any]:
        _administer(caller, "undrain pools")
        pool = self.get(name)
        if pool.state is not PoolState.ACTIVE:
            now = self.broker.clock()
            self._save(replace(pool, state=PoolState.ACTIVE))
            for member in [m for m in self.made.values() if m.pool == name and m.draining]:
                self._keep(replace(member, draining=False))
            self._event(now, name, "undrained", reason="asked to undrain")
            self.sync()
            self.tick(now)
            self.broker.schedule()
        return self.pool_dict(name)

    def delete(self, caller: Caller, name: str) -> dict[str, Any]:
        _administer(caller, "delete pools")
        self.get(name)
        ledger = self.broker.ledger
        busy = [m for m in ledger.members(name) if ledger.used(m) > EPSILON and m in self.made]
        if not busy:  # a static pool's members outlive it: in use means taken through this pool
            busy = sorted({c.resource for a in self.broker.active for c in a.charges if c.pool == name})
        if busy:
            raise ResourceInUse(f"pool {name} has {len(busy)} member(s) in use ({', '.join(busy[:5])});"
                                " drain it and wait for them, or release them", pool=name, members=busy)
        shown = self.pool_dict(name)
        now = self.broker.clock()
        for member in [m for m in self.made.values() if m.pool == name]:
            self._remove_member(member, now, "pool deleted")
        del self.pools[name]
        self._creating.pop(name, None)
        self.broker.store.delete_pool(name)
        self.broker.monitor.condition("pool-factory", POOL_PREFIX + name, None, 0.0, now,
                                      {"why": "the pool was deleted"})
        self._event(now, name, "deleted", reason="asked to delete")
        self.sync()
        self.broker.schedule()
        shown["state"] = "deleted"
        return shown

    def reconcile(self, declared: Iterable[PoolSpec], *, strict: bool = False) -> list[str]:
        """Pools from the config: create the new, update the changed, delete those no longer declared.

        `strict` (at start-up): a declared pool this host cannot serve (an unknown member or parent) raises
        PoolNotApplied instead of being reported as not applied (a reload keeps serving and reports it).
        """
        from mcpresd.service import SYSTEM

        changes: list[str] = []
        wanted = {spec.name: spec for spec in declared}
        now = self.broker.clock()
        for name, spec in wanted.items():
            pool = self.pools.get(name)
            try:
                if pool is None:
                    self.create(SYSTEM, spec, source="config")
                    changes.append(f"pool {name} created")
                elif pool.spec != spec:
                    self._check(spec)
                    self._save(replace(pool, spec=spec))
                    self._event(now, name, "changed", reason="the config changed")
                    changes.append(f"pool {name} changed")
            except DomainError as error:
                if strict:
                    raise PoolNotApplied(f"pool {name} cannot be served: {error.message}") from None
                changes.append(f"pool {name} not applied: {error.message}")
        for name in [n for n, p in self.pools.items() if p.source == "config" and n not in wanted]:
            try:
                self.delete(SYSTEM, name)
                changes.append(f"pool {name} deleted (gone from the config)")
            except DomainError as error:
                changes.append(f"kept pool {name}: {error.message}")
        if changes:
            self.sync()
        return changes

    def events(self, name: str, limit: int) -> list[dict[str, Any]]:
        if name not in self.pools and not self.broker.store.list_events(0, 1, pool=name):
            raise UnknownPool(f"no pool named {name!r} (see `mcpctl pools`)", pool=name)
        return self.broker.store.list_events(0, limit, pool=name)

    def pool_dict(self, name: str) -> dict[str, Any]:
        pool = self.get(name)
        spec = pool.spec
        ledger = self.broker.ledger
        load = self.load_of(pool)
        holders: dict[str, list[str]] = {}
        for allocation in self.broker.active:
            for item in allocation.items:
                holders.setdefault(item.resource, []).append(allocation.id)
        members = []
        for member_name in ledger.members(name):
            resource = ledger.get(member_name)
            made = self.made.get(member_name)
            state = "draining" if made and made.draining else ("busy" if ledger.used(member_name) > EPSILON
                                                              else "idle")
            health = self.broker.monitor.health_of(made.parent if made and made.parent else member_name)
            members.append({"name": member_name, "state": state, "capacity": resource.capacity, "unit": resource.unit,
                            "allocations": holders.get(member_name, []), "parent": made.parent if made else None,
                            "cost_per_unit_hour": resource.cost_per_unit_hour,
                            "health": None if health is None else health.get("score")})
        scale: ScalePolicy = spec.scale
        return {
            "name": name, "factory": spec.factory.value, "state": pool.state.value, "source": pool.source,
            "min": spec.min_size, "max": spec.max_size, "strategy": spec.strategy.value,
            "cost_per_unit_hour": spec.cost_per_unit_hour, "parent": spec.parent, "slot_size": spec.slot_size,
            "members_listed": list(spec.members), "select": list(spec.select), "create": spec.create,
            "destroy": spec.destroy, "timeout_s": spec.timeout_s, "labels": dict(spec.labels),
            "scale": {"up_at": scale.up_at, "down_at": scale.down_at, "target": scale.target,
                      "cooldown_s": scale.cooldown_s, "failure_limit": scale.failure_limit, "pause_s": scale.pause_s},
            "size": load.size, "busy": load.busy, "idle": len(load.idle), "queued": load.queued,
            "creating": self._creating.get(name, 0),
            "draining_members": sum(1 for m in members if m["state"] == "draining"),
            "utilisation": round(min(utilisation(load), 1e9), 4),
            "members": members, "created_at": pool.created_at, "last_scaled_at": pool.last_scaled_at,
            "factory_failures": pool.failures, "factory_paused_until": pool.paused_until,
        }


# -- factories: the plug point for how a pool gets and gives up members ---------------------------

def _selects(selectors: list[Selector], resource: Resource) -> bool:
    # Another pool's made members are that pool's to hand out: a selector never picks them (a list may).
    return resource.source != "pool" and matches_all(selectors, resource)


PENDING = "(pending)"
"""What `Factory.make` returns for a member that is being made outside the store's transactions."""


class Factory(Protocol):
    """How a pool of one kind gets its members, makes more, and gives them up."""

    def members(self, keeper: PoolKeeper, pool: Pool) -> list[str]:
        """The pool's members now, in order."""

    def check(self, keeper: PoolKeeper, spec: PoolSpec) -> None:
        """Refuse a spec this host cannot serve (a missing member or parent), before anything is stored."""

    def make(self, keeper: PoolKeeper, pool: Pool, now: float) -> str | None:
        """Add one member: its name, PENDING while it is being made, or None if there is no room for it."""

    def unmake(self, keeper: PoolKeeper, pool: Pool, member: Member) -> None:
        """Undo what making `member` did outside the ledger (its resource is already gone)."""

    def replace(self, keeper: PoolKeeper, pool: Pool, member: Member, now: float) -> str | None:
        """A healthy replacement for an unhealthy idle `member` (made now), or None where there can be none."""

    def no_room(self, pool: Pool) -> str:
        """Why `make` found no room, for the scale_blocked event."""


class StaticFactory:
    """Listed resources and those matching the selectors; it never makes or removes any."""

    def members(self, keeper: PoolKeeper, pool: Pool) -> list[str]:
        ledger = keeper.broker.ledger
        listed = [name for name in pool.spec.members if name in ledger]
        if not pool.spec.select:
            return listed
        selectors = [parse_selector(text) for text in pool.spec.select]
        chosen = set(listed)
        selected = sorted((r for r in ledger.resources() if r.name not in chosen and _selects(selectors, r)),
                          key=_natural)
        return listed + [r.name for r in selected]

    @staticmethod
    def takes(pool: Pool, resource: Resource) -> bool:
        """Whether `resource` is one of the static `pool`'s members: listed, or matched by its selectors."""
        return resource.name in pool.spec.members or (
            bool(pool.spec.select) and _selects([parse_selector(text) for text in pool.spec.select], resource))

    def check(self, keeper: PoolKeeper, spec: PoolSpec) -> None:
        for name in spec.members:
            if keeper.broker.ledger.find(name) is None:
                raise UnknownResource(f"pool member {name!r} is not a resource (see `mcpctl resources`)", resource=name)

    def make(self, keeper: PoolKeeper, pool: Pool, now: float) -> str | None:
        return None

    def unmake(self, keeper: PoolKeeper, pool: Pool, member: Member) -> None:
        pass

    def replace(self, keeper: PoolKeeper, pool: Pool, member: Member, now: float) -> str | None:
        return None

    def no_room(self, pool: Pool) -> str:
        return "a static pool has only the members it lists or selects"


class SlotsFactory:
    """Equal slots carved from a parent; each holds its share of the parent in the ledger while it exists."""

    def members(self, keeper: PoolKeeper, pool: Pool) -> list[str]:
        return keeper.made_by(pool.name)

    def check(self, keeper: PoolKeeper, spec: PoolSpec) -> None:
        ledger = keeper.broker.ledger
        assert spec.parent is not None and spec.slot_size is not None
        parent = ledger.find(spec.parent)
        if parent is None:
            try:
                kind = ResourceType(spec.parent)
            except ValueError:
                raise UnknownResource(f"no resource or type named {spec.parent!r} to carve slots from",
                                      resource=spec.parent) from None
            parents = [r for r in ledger.resources() if r.type is kind and r.source != "pool"]
            if not parents:
                raise UnknownResource(f"this host has no {kind.value} resource to carve slots from",
                                      resource=spec.parent)
        else:
            if parent.source == "pool":
                raise UnknownResource(f"{parent.name} is a pool member; carve slots from a host resource",
                                      resource=parent.name)
            parents = [parent]
        largest = max(r.capacity for r in parents)
        if spec.slot_size > largest + EPSILON:
            raise NeverFits(f"a slot of {spec.slot_size:g} is larger than {spec.parent} ({largest:g})",
                            resource=spec.parent)

    def parent(self, keeper: PoolKeeper, spec: PoolSpec) -> Resource | None:
        """Where the next slot goes: the named parent, or the fullest resource of that type that still fits one."""
        ledger = keeper.broker.ledger
        assert spec.parent is not None and spec.slot_size is not None
        named = ledger.find(spec.parent)
        if named is not None:
            candidates = [named]
        else:
            kind = ResourceType(spec.parent)
            candidates = [r for r in ledger.resources() if r.type is kind and r.source != "pool"]
        fitting = [r for r in candidates if not ledger.unavailable(r.name)
                   and ledger.free(r.name) + EPSILON >= spec.slot_size]
        return min(fitting, key=lambda r: (ledger.free(r.name), _natural(r))) if fitting else None

    def make(self, keeper: PoolKeeper, pool: Pool, now: float) -> str | None:
        parent = self.parent(keeper, pool.spec)
        return None if parent is None else keeper.add_slot(pool.name, now, parent)

    def unmake(self, keeper: PoolKeeper, pool: Pool, member: Member) -> None:
        ledger = keeper.broker.ledger
        if member.parent is not None and member.parent_amount is not None and member.parent in ledger:
            ledger.unhold([AllocationItem(member.parent, member.parent_amount)])

    def replace(self, keeper: PoolKeeper, pool: Pool, member: Member, now: float) -> str | None:
        parent = self.parent(keeper, pool.spec)
        if parent is None or parent.name == member.parent:
            return None
        return keeper.add_slot(pool.name, now, parent)

    def no_room(self, pool: Pool) -> str:
        return f"no {pool.spec.parent} has {pool.spec.slot_size:g} free for another slot"


class CommandFactory:
    """Members made and destroyed by the user's commands, run by the daemon outside the store's transactions."""

    def members(self, keeper: PoolKeeper, pool: Pool) -> list[str]:
        return keeper.made_by(pool.name)

    def check(self, keeper: PoolKeeper, spec: PoolSpec) -> None:
        pass

    def make(self, keeper: PoolKeeper, pool: Pool, now: float) -> str | None:
        keeper.request_member(pool.name)
        return PENDING

    def unmake(self, keeper: PoolKeeper, pool: Pool, member: Member) -> None:
        if pool.spec.destroy:
            keeper.broker.outbox.factory.append(FactoryRun(
                pool.name, "destroy", pool.spec.destroy, pool.spec.timeout_s, -1, member.resource,
                json.dumps(member.handle)))

    def replace(self, keeper: PoolKeeper, pool: Pool, member: Member, now: float) -> str | None:
        return None  # the daemon has no health figures of a command's members

    def no_room(self, pool: Pool) -> str:
        return "the factory made nothing"


FACTORIES: dict[FactoryKind, Factory] = {
    FactoryKind.STATIC: StaticFactory(),
    FactoryKind.SLOTS: SlotsFactory(),
    FactoryKind.COMMAND: CommandFactory(),
}


def _administer(caller: Caller, what: str) -> None:
    if not caller.administers:
        raise PermissionDenied(f"only root, the daemon's user and the admin group may {what}", uid=caller.uid)


def _natural(resource: Resource) -> tuple[str, int, str]:
    index = resource.labels.get("index")
    return (resource.type.value, index if isinstance(index, int) and not isinstance(index, bool) else 1 << 30,
            resource.name)


def spec_to_json(spec: PoolSpec) -> str:
    scale = spec.scale
    return json.dumps({
        "factory": spec.factory.value, "min": spec.min_size, "max": spec.max_size, "strategy": spec.strategy.value,
        "members": list(spec.members), "select": list(spec.select), "parent": spec.parent,
        "slot_size": spec.slot_size, "create": spec.create, "destroy": spec.destroy, "timeout_s": spec.timeout_s,
        "cost_per_unit_hour": spec.cost_per_unit_hour, "labels": dict(spec.labels),
        "scale": {"up_at": scale.up_at, "down_at": scale.down_at, "target": scale.target,
                  "cooldown_s": scale.cooldown_s, "failure_limit": scale.failure_limit, "pause_s": scale.pause_s},
    }, separators=(",", ":"))


def spec_from_json(name: str, text: str) -> PoolSpec:
    data = json.loads(text)
    scale = data["scale"]
    return PoolSpec(
        name=name, factory=FactoryKind(data["factory"]), min_size=data["min"], max_size=data["max"],
        strategy=Strategy(data["strategy"]), members=tuple(data["members"]), select=tuple(data["select"]),
        parent=data["parent"], slot_size=data["slot_size"], create=data["create"], destroy=data["destroy"],
        timeout_s=data["timeout_s"], cost_per_unit_hour=data["cost_per_unit_hour"], labels=data["labels"],
        scale=ScalePolicy(up_at=scale["up_at"], down_at=scale["down_at"], target=scale["target"],
                          cooldown_s=scale["cooldown_s"], failure_limit=scale["failure_limit"],
                          pause_s=scale["pause_s"]),
    )


def _pool_row(pool: Pool) -> tuple[Any, ...]:
    return (pool.name, spec_to_json(pool.spec), pool.state.value, pool.source, pool.created_at, pool.last_scaled_at,
            pool.failures, pool.paused_until, pool.next_index)


def _pool_from_row(row: tuple[Any, ...]) -> Pool:
    name, spec, state, source, created, scaled, failures, paused, index = row
    return Pool(spec_from_json(name, spec), state=PoolState(state), source=source, created_at=created,
                last_scaled_at=scaled, failures=failures, paused_until=paused, next_index=index)
