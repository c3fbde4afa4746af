"""Resource pools: what they are made of, when they grow or shrink, and which pool a request gets.

Rules:
- A static pool serves fixed members (listed names and/or selectors over
  resources) and never scales. A slots pool carves members of `slot_size`
  from a parent; a command pool makes members by running `create`. Both make
  members named `POOL/N` and scale between `min_size` and `max_size`. A
  field of another factory (a static pool's `create`) is refused. A pool name
  has no spaces and none of , * ? [ ] : / = < > ~, so it never reads as a
  glob, a selector or a member.
- A `create` command prints its member as a JSON object on the last
  non-blank line of stdout; NaN and infinities are refused.
- Utilisation is (busy + queued) / size over the members that serve; a pool of
  no members is unbounded when anything is wanted and 0 otherwise.
- Scaling, first rule that applies wins:
  1. a static pool, or one not active, never scales;
  2. below `min_size`: add up to it, whatever the cooldown or pause;
  3. above `max_size`: remove idle members down to it, whatever the cooldown;
  4. within `cooldown_s` of the last scaling decision: no change;
  5. utilisation strictly above `up_at`: grow to ceil(demand / target), at
     most `max_size`;
  6. utilisation strictly below `down_at`: shrink to ceil(demand / target), at
     least `min_size`, removing only idle members, newest first;
  7. otherwise: no change.
- Circuit breaker: each failed factory run counts; at `failure_limit`
  consecutive failures the factory is paused for `pause_s`. The count is kept,
  so one more failure after the pause pauses it again; a success clears it.
- A draining pool grants nothing new and becomes drained once no member is busy.
- A request names pools by exact name, glob (`build-*`) or selector
  (`cost<1`, `kind=gpu`) over name, factory, strategy, state, cost, kind and
  labels, with the selector semantics of `core.constraints`.
"""

from __future__ import annotations

import fnmatch
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal, NoReturn

from mcpresd.core.constraints import OPERATORS, Selector, parse_selector, selects
from mcpresd.core.errors import InvalidRequest, UnknownPool
from mcpresd.core.model import LabelValue, Resource
from mcpresd.protocol import FactoryKind, Objective, PoolState, ResourceType, Strategy

MAX_NAME_LENGTH = 100
MAX_TIMEOUT_S = 3600.0
MAX_QUOTED_OUTPUT = 200
# Selector operators and glob characters too: a pool name must never read as a pattern.
_NAME_FORBIDDEN = set(",*?[]:/=<>~")
_MEMBER_FORBIDDEN = set(",/")
_EPSILON = 1e-9
# The type a discovered resource's name prefix tells (`gpu:0`, `disk:/data`, `net:eth0`).
_NAME_PREFIX_TYPES = {"gpu": "gpu", "disk": "disk", "net": "network"}


@dataclass(frozen=True)
class ScalePolicy:
    up_at: float = 0.8
    down_at: float = 0.3
    target: float = 0.7
    cooldown_s: float = 60.0
    failure_limit: int = 3
    pause_s: float = 300.0


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _whole(value: object, least: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def _valid_name(name: object, forbidden: set[str]) -> bool:
    return (isinstance(name, str) and 1 <= len(name) <= MAX_NAME_LENGTH
            and not any(c.isspace() or c in forbidden for c in name))


def _valid_labels(labels: object) -> bool:
    return isinstance(labels, Mapping) and all(
        isinstance(k, str) and k and (v is None or isinstance(v, (str, bool)) or _finite(v))
        for k, v in labels.items())


def _parent_kind(parent: str | None) -> str | None:
    if parent is None:
        return None
    if parent in {t.value for t in ResourceType}:
        return parent
    return _NAME_PREFIX_TYPES.get(parent.partition(":")[0]) if ":" in parent else None


@dataclass(frozen=True)
class PoolSpec:
    name: str
    factory: FactoryKind
    min_size: int = 0
    max_size: int | None = None
    strategy: Strategy = Strategy.FIRST_FIT
    members: tuple[str, ...] = ()
    select: tuple[str, ...] = ()
    parent: str | None = None
    slot_size: float | None = None
    create: str | None = None
    destroy: str | None = None
    timeout_s: float = 30.0
    cost_per_unit_hour: float | None = None
    scale: ScalePolicy = ScalePolicy()
    labels: Mapping[str, LabelValue] = field(default_factory=dict)

    def _invalid(self, name: str, message: str) -> InvalidRequest:
        return InvalidRequest(f"pool {self.name!r}: {name} {message}", field=name, pool=self.name)

    def _require(self, ok: bool, name: str, message: str) -> None:
        if not ok:
            raise self._invalid(name, message)

    def validate(self) -> None:
        """Raise InvalidRequest naming the first bad field (data `field`) as pools.create and a config [[pools]]
        table spell it (`max`, `cooldown`), not as this class does (`max_size`, `scale.cooldown_s`)."""
        need = self._require
        need(_valid_name(self.name, _NAME_FORBIDDEN), "name", f"must be 1..{MAX_NAME_LENGTH} characters without "
             f"spaces or any of {' '.join(sorted(_NAME_FORBIDDEN))}, got {self.name!r}")
        need(_whole(self.min_size, 0), "min", f"must be a whole number >= 0, got {self.min_size!r}")
        need(self.max_size is None or _whole(self.max_size, max(self.min_size, 1)), "max",
             f"must be a whole number >= 1 and >= min ({self.min_size}), got {self.max_size!r}")
        owned = {FactoryKind.STATIC: ("members", "select"), FactoryKind.SLOTS: ("parent", "slot_size"),
                 FactoryKind.COMMAND: ("create", "destroy")}
        for kind, names in owned.items():
            for name in names:
                need(kind is self.factory or getattr(self, name) in (None, ()), name,
                     f"belongs to {kind.value} pools, not {self.factory.value} ones")
        if self.factory is FactoryKind.STATIC:
            need(bool(self.members or self.select), "members", "or select is required for static pools")
            for member in self.members:
                need(isinstance(member, str) and bool(member.strip()), "members", f"are resource names, got {member!r}")
            for text in self.select:
                try:
                    parse_selector(text)
                except InvalidRequest as exc:
                    raise self._invalid("select", exc.message) from None
        else:
            need(self.max_size is not None, "max", f"is required for {self.factory.value} pools")
        if self.factory is FactoryKind.SLOTS:
            need(isinstance(self.parent, str) and bool(self.parent.strip()), "parent",
                 "is required for slots pools: a resource name or type")
            need(_finite(self.slot_size) and (self.slot_size or 0) > 0, "slot_size",
                 f"must be a finite number > 0, got {self.slot_size!r}")
            need(_parent_kind(self.parent) != ResourceType.GPU.value or (self.slot_size or 0) <= 1, "slot_size",
                 f"of a GPU is at most 1 (one whole device), got {self.slot_size!r}")
        if self.factory is FactoryKind.COMMAND:
            need(isinstance(self.create, str) and bool(self.create.strip()), "create",
                 "is required for command pools: a command that prints a member's JSON")
        need(_finite(self.timeout_s) and 0 < self.timeout_s <= MAX_TIMEOUT_S, "timeout",
             f"must be > 0 and <= {MAX_TIMEOUT_S:g}, got {self.timeout_s!r}")
        need(self.cost_per_unit_hour is None or (_finite(self.cost_per_unit_hour) and self.cost_per_unit_hour >= 0),
             "cost_per_unit_hour", f"must be a finite number >= 0, got {self.cost_per_unit_hour!r}")
        need(_valid_labels(self.labels), "labels", "must map names to strings, finite numbers, booleans or null")
        scale = self.scale
        for name, wire in (("down_at", "scale_down_at"), ("target", "target"), ("up_at", "scale_up_at"),
                           ("cooldown_s", "cooldown"), ("pause_s", "scale.pause_s")):
            value = getattr(scale, name)
            need(_finite(value) and value >= 0, wire, f"must be a finite number >= 0, got {value!r}")
        need(scale.up_at <= 1, "scale_up_at", f"must be at most 1, got {scale.up_at!r}")
        need(scale.target < scale.up_at, "target", f"must be below scale_up_at ({scale.up_at}), got {scale.target}")
        need(scale.down_at < scale.target, "scale_down_at",
             f"must be below target ({scale.target}), got {scale.down_at}")
        need(_whole(scale.failure_limit, 1), "scale.failure_limit",
             f"must be a whole number >= 1, got {scale.failure_limit!r}")


@dataclass(frozen=True)
class Pool:
    spec: PoolSpec
    state: PoolState = PoolState.ACTIVE
    source: Literal["config", "api"] = "api"
    created_at: float = 0.0
    last_scaled_at: float | None = None
    failures: int = 0
    paused_until: float | None = None
    next_index: int = 0

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def makes_members(self) -> bool:
        return self.spec.factory is not FactoryKind.STATIC


@dataclass(frozen=True)
class PoolLoad:
    size: int
    busy: int
    queued: int
    idle: tuple[str, ...]


@dataclass(frozen=True)
class ScaleDecision:
    add: int = 0
    remove: tuple[str, ...] = ()
    reason: str = ""

    @property
    def changed(self) -> bool:
        return self.add > 0 or bool(self.remove)


def utilisation(load: PoolLoad) -> float:
    demand = load.busy + load.queued
    if load.size == 0:
        return math.inf if demand > 0 else 0.0
    return demand / load.size


def _percent(fraction: float) -> str:
    return "unbounded" if math.isinf(fraction) else f"{fraction:.0%}"


def decide_scale(pool: Pool, load: PoolLoad, now: float) -> ScaleDecision:
    """What to add or remove now, by the module's scaling rules."""
    spec, policy = pool.spec, pool.spec.scale
    if not pool.makes_members or pool.state is not PoolState.ACTIVE:
        return ScaleDecision()
    if load.size < spec.min_size:
        return ScaleDecision(add=spec.min_size - load.size, reason=f"below the minimum of {spec.min_size}")
    maximum = math.inf if spec.max_size is None else spec.max_size
    if load.size > maximum:
        return ScaleDecision(remove=load.idle[: load.size - int(maximum)],
                             reason=f"above the maximum of {spec.max_size}")
    if pool.last_scaled_at is not None and now - pool.last_scaled_at < policy.cooldown_s:
        return ScaleDecision(reason=f"cooldown until {pool.last_scaled_at + policy.cooldown_s:g}")
    demand = load.busy + load.queued
    used = utilisation(load)
    # Without the epsilon, 21 / 0.7 = 30.000000000000004 would ask for 31 members.
    wanted = math.ceil(demand / policy.target - _EPSILON)
    seen = f"utilisation {_percent(used)} ({load.busy} busy, {load.queued} queued of {load.size})"
    if used > policy.up_at and min(wanted, maximum) > load.size:
        desired = int(min(wanted, maximum))
        return ScaleDecision(add=desired - load.size, reason=f"{seen} above {policy.up_at:.0%}: "
                             f"{load.size} -> {desired} members to aim at {policy.target:.0%}")
    remove = load.idle[: max(0, load.size - max(spec.min_size, wanted))]
    if used < policy.down_at and remove:
        return ScaleDecision(remove=remove, reason=f"{seen} below {policy.down_at:.0%}: "
                             f"{load.size} -> {load.size - len(remove)} members")
    return ScaleDecision(reason=f"{seen}: no change (scale at {policy.down_at:.0%}..{policy.up_at:.0%}, "
                                f"{spec.min_size}..{spec.max_size} members)")


def factory_paused(pool: Pool, now: float) -> bool:
    return pool.paused_until is not None and now < pool.paused_until


def factory_failed(pool: Pool, now: float) -> Pool:
    failures = pool.failures + 1
    if failures >= pool.spec.scale.failure_limit:
        return replace(pool, failures=failures, paused_until=now + pool.spec.scale.pause_s)
    return replace(pool, failures=failures)


def factory_succeeded(pool: Pool) -> Pool:
    return replace(pool, failures=0, paused_until=None)


def settle_state(pool: Pool, busy_members: int) -> Pool:
    if pool.state is PoolState.DRAINING and busy_members == 0:
        return replace(pool, state=PoolState.DRAINED)
    return pool


def member_name(pool_name: str, index: int) -> str:
    return f"{pool_name}/{index}"


@dataclass(frozen=True)
class MemberDescription:
    name: str
    capacity: float
    unit: str
    labels: Mapping[str, LabelValue]
    handle: Mapping[str, object]


def _refuse_constant(constant: str) -> NoReturn:
    raise ValueError(f"{constant} is not a number")


def parse_member(stdout: str, spec: PoolSpec, index: int) -> MemberDescription:
    """The member a `create` command describes on the last non-blank line of its stdout, as a JSON object."""
    lines = [line.strip() for line in stdout.splitlines() if line.strip()]
    line = lines[-1] if lines else ""
    quoted = repr(line[:MAX_QUOTED_OUTPUT]) + ("..." if len(line) > MAX_QUOTED_OUTPUT else "")

    def refuse(why: str) -> InvalidRequest:
        return InvalidRequest(f"pool {spec.name!r}: create printed {quoted}: {why}", pool=spec.name,
                              output=line[:MAX_QUOTED_OUTPUT])

    if not lines:
        raise refuse("expected a JSON object on the last line, got nothing")
    try:
        handle = json.loads(line, parse_constant=_refuse_constant)
    except ValueError as exc:
        raise refuse(f"not JSON ({exc})") from None
    if not isinstance(handle, dict):
        raise refuse("expected a JSON object")
    name = handle.get("name", str(index))
    if not _valid_name(name, _MEMBER_FORBIDDEN):
        raise refuse(f"\"name\" must be 1..{MAX_NAME_LENGTH} characters without spaces, ',' or '/'")
    capacity = handle.get("capacity", 1)
    if not _finite(capacity) or capacity <= 0:
        raise refuse("\"capacity\" must be a finite number > 0")
    unit = handle.get("unit", "slot")
    if not isinstance(unit, str) or not unit.strip():
        raise refuse("\"unit\" must be a non-empty string")
    labels = handle.get("labels", {})
    if not _valid_labels(labels):
        raise refuse("\"labels\" must be an object of strings, numbers, booleans or null")
    return MemberDescription(f"{spec.name}/{name}", float(capacity), unit, dict(labels), handle)


def slot_member(spec: PoolSpec, index: int, parent: Resource) -> Resource:
    """The resource for one slot of `parent`: one unit that stands for `slot_size` of the parent."""
    labels: dict[str, LabelValue] = {**spec.labels, "pool": spec.name, "parent": parent.name,
                                     "slot_size": spec.slot_size, "kind": parent.type.value}
    for key in ("numa_node", "pci_bus_id"):
        if key in parent.labels:
            labels[key] = parent.labels[key]
    cost = spec.cost_per_unit_hour
    if cost is None and parent.cost_per_unit_hour is not None and spec.slot_size is not None:
        cost = parent.cost_per_unit_hour * spec.slot_size
    return Resource(member_name(spec.name, index), ResourceType.CUSTOM, 1.0, "slot", labels,
                    cost_per_unit_hour=cost, source="pool")


def _pool_values(pool: Pool, key: str) -> list[str | int | float | bool]:
    spec = pool.spec
    built_in: dict[str, LabelValue] = {
        "name": spec.name, "factory": spec.factory.value, "strategy": spec.strategy.value,
        "state": pool.state.value, "cost": spec.cost_per_unit_hour,
        "kind": _parent_kind(spec.parent) if spec.factory is FactoryKind.SLOTS else None,
    }
    found = [built_in.get(key), spec.labels.get(key)]
    return [v for v in found if v is not None]


def _selects(selector: Selector, pool: Pool) -> bool:
    return selects(selector, _pool_values(pool, selector.key))


def match_pools(pools: Sequence[Pool], patterns: Sequence[str]) -> list[Pool]:
    """The pools the patterns name, each once, in the order first matched; UnknownPool for a pattern matching none."""
    chosen: dict[str, Pool] = {}
    for pattern in patterns:
        if any(pool.name == pattern for pool in pools):
            hits = [pool for pool in pools if pool.name == pattern]
        elif any(op in pattern for op in OPERATORS):
            selector = parse_selector(pattern)
            hits = [pool for pool in pools if _selects(selector, pool)]
        else:
            hits = [pool for pool in pools if fnmatch.fnmatchcase(pool.name, pattern)]
        if not hits:
            raise UnknownPool(f"no pool matches {pattern!r}", pool=pattern)
        for pool in hits:
            chosen.setdefault(pool.name, pool)
    return list(chosen.values())


@dataclass(frozen=True)
class PoolChoice:
    name: str
    cost: float | None
    utilisation: float
    load: float | None
    queued: int
    idle: int
    position: int


def _used(choice: PoolChoice) -> float:
    return min(choice.utilisation, 1.0) if not math.isnan(choice.utilisation) else 1.0


def _pool_key(objective: Objective, choice: PoolChoice) -> tuple[float, ...]:
    if objective is Objective.COST:
        return (choice.cost or 0.0,)
    if objective is Objective.PERFORMANCE:
        load = choice.load if choice.load is not None and math.isfinite(choice.load) else _used(choice)
        return (load, _used(choice))
    if objective is Objective.LATENCY:
        return (choice.queued, -choice.idle)
    if objective is Objective.UTILISATION:
        return (-_used(choice),)
    return (_used(choice),)


def rank_pools(objective: Objective, choices: Sequence[PoolChoice]) -> list[PoolChoice]:
    """All choices, most preferred first; ties go to the lower `position`.

    cost: cheapest per member-hour first (no cost counts as 0).
    performance: lowest measured load first (unknown counts as utilisation), then lowest utilisation.
    latency: fewest queued first, then most idle.
    utilisation: fullest first, to pack work into busy pools.
    balanced: emptiest first, to spread work.
    """
    return sorted(choices, key=lambda c: (*_pool_key(objective, c), c.position))
