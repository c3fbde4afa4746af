"""Parameter validation: raw JSON-RPC params in, typed commands out.

Rules:
- Runs on the event loop before anything is queued for the store, so a bad
  request never opens a transaction.
- Rejects unknown fields, wrong types, NaN, infinities, negative or zero
  amounts, strings that are not valid Unicode, and oversize values, each with a
  message that names the field.
- Every number is at most MAX_QUANTITY and every positive quantity (capacity,
  amount, budget limit) at least MIN_QUANTITY, so no sum, product or ratio the
  daemon computes from them overflows to infinity (which JSON cannot carry).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from mcpresd.core.constraints import parse_selector
from mcpresd.core.errors import DomainError
from mcpresd.core.model import Demand, Request, Resource, custom_resource
from mcpresd.core.pools import PoolSpec, ScalePolicy
from mcpresd.protocol import (
    ALLOCATIONS_PAGE,
    MAX_ADD,
    MAX_DEMANDS,
    MAX_QUANTITY,
    MIN_QUANTITY,
    POOL_PREFIX,
    BudgetScope,
    FactoryKind,
    Objective,
    Period,
    Strategy,
    MAX_NAME_LENGTH,
    MAX_TEXT_LENGTH,
    AllocationState,
    EnforceMode,
    Priority,
    ResourceType,
    is_valid_number,
)

RESERVED_PREFIXES = ("disk:", "net:", "gpu:")
RESERVED_NAMES = frozenset({"cpu", "memory", *(t.value for t in ResourceType)})


class InvalidParams(ValueError):
    """Parameters do not match the method's shape."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


@dataclass(frozen=True)
class NoParams:
    pass


@dataclass(frozen=True)
class AllocateCommand:
    request: Request
    priority: Priority
    tool_id: str | None
    execution_id: str | None
    idempotency_key: str | None
    holder_pid: int | None
    wait: float | None = 0.0
    detach: bool = False
    ttl: float | None = None
    preemptible: bool = False
    signal_holder: bool = False
    enforce: EnforceMode | None = None
    """None: the daemon's [enforce] mode."""
    site: str | None = None
    """None or "host": this host; "cluster": the configured cluster; "spill": the host if it fits now, else the
    cluster. `where` naming site=cluster means "cluster" too."""

    @property
    def demands(self) -> tuple[Demand, ...]:
        return self.request.demands


@dataclass(frozen=True)
class AttachCommand:
    id: str
    pid: int


@dataclass(frozen=True)
class WaitCommand:
    id: str
    timeout: float | None


@dataclass(frozen=True)
class RenewCommand:
    id: str
    ttl: float | None


@dataclass(frozen=True)
class ExplainCommand:
    id: str


@dataclass(frozen=True)
class SubscribeCommand:
    after_id: int | None


@dataclass(frozen=True)
class ReleaseCommand:
    id: str
    measured: dict[str, float] | None = None


@dataclass(frozen=True)
class GetAllocationCommand:
    id: str


@dataclass(frozen=True)
class ListAllocationsCommand:
    state: AllocationState | None
    limit: int
    before_id: str | None = None


@dataclass(frozen=True)
class ListResourcesCommand:
    type: ResourceType | None


@dataclass(frozen=True)
class AddResourceCommand:
    name: str
    capacity: float
    unit: str
    labels: dict[str, str | int | float | bool | None]
    cost_per_unit_hour: float | None


@dataclass(frozen=True)
class AddResourcesCommand:
    """`resources.add` with a `resources` list: all of them are added, in one transaction, or none. Made here
    as the custom resources they add (100,000 at once: a second value for each costs)."""

    resources: tuple[Resource, ...]


@dataclass(frozen=True)
class RemoveResourceCommand:
    name: str


@dataclass(frozen=True)
class ListEventsCommand:
    after_id: int
    limit: int
    allocation_id: str | None


class _Fields:
    """Reads fields off a params object, remembering which were used."""

    def __init__(self, params: Any, allowed: frozenset[str]) -> None:
        if params is None or params == []:
            params = {}
        if not isinstance(params, dict):
            raise InvalidParams("params must be an object with named fields")
        unknown = [] if allowed.issuperset(params) else sorted(set(params) - allowed)  # no set or sort per request
        if unknown:
            raise InvalidParams(
                f"unknown field(s): {', '.join(unknown)} (allowed: {', '.join(sorted(allowed)) or 'none'})",
                unknown[0],
            )
        self.params: dict[str, Any] = params

    def text(self, name: str, *, required: bool = False, limit: int = MAX_TEXT_LENGTH) -> str | None:
        value = self.params.get(name)
        if value is None:
            if required:
                raise InvalidParams(f"{name} is required", name)
            return None
        return check_text(value, name, limit)

    def number(self, name: str, *, required: bool = False, minimum: float | None = None,
               maximum: float = MAX_QUANTITY) -> float | None:
        value = self.params.get(name)
        if value is None:
            if required:
                raise InvalidParams(f"{name} is required", name)
            return None
        if not is_valid_number(value):
            raise InvalidParams(f"{name} must be a finite number, got {_describe(value)}", name)
        if minimum is not None and value < minimum:
            raise InvalidParams(f"{name} must be at least {minimum:g}, got {value!r}", name)
        if value > maximum:
            raise InvalidParams(f"{name} must be at most {maximum:g}, got {value!r}", name)
        return float(value)

    def quantity(self, name: str) -> float:
        """A required positive quantity (a capacity, a limit): from MIN_QUANTITY to MAX_QUANTITY."""
        return check_quantity(self.params.get(name), name)

    def flag(self, name: str) -> bool:
        value = self.params.get(name, False)
        if not isinstance(value, bool):
            raise InvalidParams(f"{name} must be true or false, got {_describe(value)}", name)
        return value

    def integer(self, name: str, default: int, *, minimum: int, maximum: int) -> int:
        value = self.params.get(name, default)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidParams(f"{name} must be an integer, got {_describe(value)}", name)
        if not minimum <= value <= maximum:
            raise InvalidParams(f"{name} must be between {minimum} and {maximum}, got {value}", name)
        return value


def check_text(value: Any, field: str, limit: int = MAX_TEXT_LENGTH) -> str:
    if not isinstance(value, str):
        raise InvalidParams(f"{field} must be a string, got {_describe(value)}", field)
    if not value:
        raise InvalidParams(f"{field} must not be empty", field)
    if len(value) > limit:
        raise InvalidParams(f"{field} is longer than {limit} characters", field)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidParams(f"{field} is not valid Unicode (lone surrogate)", field) from None
    if not value.isprintable() and any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise InvalidParams(f"{field} must not contain control characters", field)
    return value


def check_quantity(value: Any, field: str) -> float:
    """A positive amount, capacity or limit, bounded both ways (see MAX_QUANTITY and MIN_QUANTITY)."""
    if value is None:
        raise InvalidParams(f"{field} is required", field)
    if not is_valid_number(value):
        raise InvalidParams(f"{field} must be a finite number, got {_describe(value)}", field)
    if value <= 0:
        raise InvalidParams(f"{field} must be greater than 0, got {value!r}", field)
    if not MIN_QUANTITY <= value <= MAX_QUANTITY:
        raise InvalidParams(f"{field} must be from {MIN_QUANTITY:g} to {MAX_QUANTITY:g}, got {value!r}", field)
    return float(value)


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def no_params(params: Any) -> NoParams:
    _Fields(params, frozenset())
    return NoParams()


_ALLOCATE_FIELDS = frozenset({"resources", "priority", "tool_id", "execution_id", "idempotency_key", "holder_pid",
                              "wait", "detach", "ttl", "strategy", "where", "max_cost", "preemptible",
                              "signal_holder", "objective", "enforce", "keep_processes", "confine_holder",
                              "site"})
_DEMAND_FIELDS = frozenset({"resource", "amount", "max"})
_STRATEGIES = {s.value: s for s in Strategy}
MAX_WAIT_S = 365 * 86400.0
_PRIORITIES = {p.value: p for p in Priority}


def allocate(params: Any) -> AllocateCommand:
    fields = _Fields(params, _ALLOCATE_FIELDS)
    raw = fields.params.get("resources")
    if not isinstance(raw, list) or not raw:
        raise InvalidParams("resources must be a non-empty array of {resource, amount}", "resources")
    if len(raw) > MAX_DEMANDS:
        raise InvalidParams(f"at most {MAX_DEMANDS} resources per request", "resources")
    demands = []
    for index, entry in enumerate(raw):
        where = f"resources[{index}]"
        if not isinstance(entry, dict) or not _DEMAND_FIELDS.issuperset(entry):
            raise InvalidParams(f"{where} must be an object with fields resource and amount", where)
        selector = check_text(entry.get("resource"), f"{where}.resource", MAX_NAME_LENGTH)
        amount = check_quantity(entry.get("amount"), f"{where}.amount")
        most = entry.get("max")
        if most is not None and (not is_valid_number(most) or most < amount or most > MAX_QUANTITY):
            raise InvalidParams(f"{where}.max must be a finite number no less than amount and at most {MAX_QUANTITY:g},"
                                f" got {_describe(most)}",
                                f"{where}.max")
        if selector.startswith(POOL_PREFIX):
            _check_pool_demand(selector, amount, most, where)
        demands.append(Demand(selector, amount, None if most is None else float(most)))
    priority_text = fields.text("priority") or Priority.NORMAL.value
    priority = _PRIORITIES.get(priority_text)
    if priority is None:
        raise InvalidParams(f"priority must be one of {', '.join(_PRIORITIES)}, got {priority_text!r}", "priority")
    holder = fields.params.get("holder_pid")
    if holder is not None and (isinstance(holder, bool) or not isinstance(holder, int) or not 0 < holder < 1 << 31):
        raise InvalidParams(f"holder_pid must be a positive process id, got {_describe(holder)}", "holder_pid")
    strategy_text = fields.text("strategy")
    if strategy_text is not None and strategy_text not in _STRATEGIES:
        raise InvalidParams(f"strategy must be one of {', '.join(_STRATEGIES)}, got {strategy_text!r}", "strategy")
    selectors = fields.params.get("where") or []
    if not isinstance(selectors, list) or len(selectors) > MAX_DEMANDS:
        raise InvalidParams(f"where must be an array of at most {MAX_DEMANDS} selectors", "where")
    for index, text in enumerate(selectors):
        check_text(text, f"where[{index}]", MAX_NAME_LENGTH)
        try:
            parse_selector(text)
        except DomainError as error:
            raise InvalidParams(error.message, f"where[{index}]") from None
    ttl = fields.number("ttl")
    if ttl is not None and not 0 < ttl <= MAX_WAIT_S:
        raise InvalidParams(f"ttl must be more than 0 seconds and at most {MAX_WAIT_S:.0f} (365 days), got "
                            f"{_describe(ttl)}", "ttl")
    objective = fields.text("objective")
    if objective is not None and objective not in _OBJECTIVES:
        raise InvalidParams(f"objective must be one of {', '.join(_OBJECTIVES)}, got {objective!r}", "objective")
    enforce = fields.text("enforce")
    if enforce is not None and enforce not in _ENFORCE_MODES:
        raise InvalidParams(f"enforce must be one of {', '.join(_ENFORCE_MODES)}, got {enforce!r}", "enforce")
    site = fields.text("site")
    if site is not None and site not in SITES:
        raise InvalidParams(f"site must be one of {', '.join(SITES)}, got {site!r}", "site")
    if CLUSTER_SELECTOR in selectors:
        if site == "host":
            raise InvalidParams("site host and where site=cluster contradict each other", "where")
        site = site if site == "spill" else "cluster"
        selectors = [text for text in selectors if text != CLUSTER_SELECTOR]
    confine_holder = fields.flag("confine_holder")
    if confine_holder and holder is None:
        raise InvalidParams("confine_holder needs a holder_pid", "confine_holder")
    return AllocateCommand(
        request=Request(tuple(demands), strategy_text, tuple(selectors), fields.number("max_cost", minimum=0),
                        objective, keep_processes=fields.flag("keep_processes"), confine_holder=confine_holder),
        enforce=None if enforce is None else _ENFORCE_MODES[enforce],
        priority=priority,
        tool_id=fields.text("tool_id", limit=MAX_NAME_LENGTH),
        execution_id=fields.text("execution_id", limit=MAX_NAME_LENGTH),
        idempotency_key=fields.text("idempotency_key", limit=MAX_NAME_LENGTH),
        holder_pid=holder,
        wait=_wait(fields, "wait"),
        detach=fields.flag("detach"),
        ttl=ttl,
        preemptible=fields.flag("preemptible"),
        signal_holder=fields.flag("signal_holder"),
        site=None if site == "host" else site,
    )


SITES = ("host", "cluster", "spill")
CLUSTER_SELECTOR = "site=cluster"


_OBJECTIVES = tuple(o.value for o in Objective)
_ENFORCE_MODES = {m.value: m for m in EnforceMode}


def _check_pool_demand(selector: str, amount: float, most: Any, where: str) -> None:
    patterns = selector[len(POOL_PREFIX):].split(",")
    if not all(p.strip() for p in patterns):
        raise InvalidParams(f"{where}.resource names no pool: use pool:NAME or pool:A,B", f"{where}.resource")
    for count, name in ((amount, "amount"), (most, "max")):
        if count is not None and (count < 1 or count != int(count)):
            raise InvalidParams(f"{where}.{name} counts whole pool members: a whole number of 1 or more, got {count!r}",
                                f"{where}.{name}")


def _wait(fields: _Fields, name: str) -> float | None:
    """Seconds to wait, 0 by default; the string "forever" for no limit."""
    value = fields.params.get(name, 0)
    if value == "forever":
        return None
    if not is_valid_number(value) or not 0 <= value <= MAX_WAIT_S:
        raise InvalidParams(f'{name} must be seconds between 0 and {MAX_WAIT_S:.0f} (365 days), or "forever"; got '
                            f'{_describe(value)}',
                            name)
    return float(value)


def wait_for(params: Any) -> WaitCommand:
    fields = _Fields(params, frozenset({"id", "timeout"}))
    return WaitCommand(id=_required_text(fields, "id"), timeout=_wait(fields, "timeout") if "timeout" in fields.params
                       else None)


def renew(params: Any) -> RenewCommand:
    fields = _Fields(params, frozenset({"id", "ttl"}))
    ttl = fields.number("ttl")
    if ttl is not None and not 0 < ttl <= MAX_WAIT_S:
        raise InvalidParams(f"ttl must be more than 0 seconds and at most {MAX_WAIT_S:.0f} (365 days), got "
                            f"{_describe(ttl)}", "ttl")
    return RenewCommand(id=_required_text(fields, "id"), ttl=ttl)


def attach(params: Any) -> AttachCommand:
    fields = _Fields(params, frozenset({"id", "pid"}))
    pid = fields.params.get("pid")
    if isinstance(pid, bool) or not isinstance(pid, int) or not 0 < pid < 1 << 31:
        raise InvalidParams(f"pid must be a positive process id, got {_describe(pid)}", "pid")
    return AttachCommand(id=_required_text(fields, "id"), pid=pid)


def explain(params: Any) -> ExplainCommand:
    fields = _Fields(params, frozenset({"id"}))
    return ExplainCommand(id=_required_text(fields, "id"))


def subscribe(params: Any) -> SubscribeCommand:
    fields = _Fields(params, frozenset({"after_id"}))
    after = fields.params.get("after_id")
    if after is None:
        return SubscribeCommand(after_id=None)
    return SubscribeCommand(after_id=fields.integer("after_id", 0, minimum=0, maximum=1 << 62))


def release(params: Any) -> ReleaseCommand:
    fields = _Fields(params, frozenset({"id", "measured"}))
    return ReleaseCommand(id=_required_text(fields, "id"), measured=measured(fields.params.get("measured")))


_MEASURED_LIMITS = {"cpu_seconds": None, "memory_peak": None, "gpu_utilisation": 1.0, "gpu_memory_peak": None}


def measured(raw: Any) -> dict[str, float] | None:
    """What a holder reports it used: {cpu_seconds, memory_peak, gpu_utilisation (0..1), gpu_memory_peak}."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise InvalidParams(f"measured must be an object with any of {', '.join(_MEASURED_LIMITS)}", "measured")
    values: dict[str, float] = {}
    for key, value in raw.items():
        if key not in _MEASURED_LIMITS:
            raise InvalidParams(f"measured.{key} is not a measurement (use {', '.join(_MEASURED_LIMITS)})",
                                f"measured.{key}")
        limit = _MEASURED_LIMITS[key]
        if not is_valid_number(value) or value < 0 or value > (MAX_QUANTITY if limit is None else limit):
            bound = f"between 0 and {MAX_QUANTITY if limit is None else limit:g}"
            raise InvalidParams(f"measured.{key} must be {bound}, got {_describe(value)}", f"measured.{key}")
        values[key] = float(value)
    return values


def get_allocation(params: Any) -> GetAllocationCommand:
    fields = _Fields(params, frozenset({"id"}))
    return GetAllocationCommand(id=_required_text(fields, "id"))


def list_allocations(params: Any) -> ListAllocationsCommand:
    fields = _Fields(params, frozenset({"state", "limit", "before_id"}))
    state_text = fields.text("state") or AllocationState.ACTIVE.value
    state: AllocationState | None
    if state_text == "all":
        state = None
    else:
        try:
            state = AllocationState(state_text)
        except ValueError:
            raise InvalidParams(f"state must be one of {', '.join(s.value for s in AllocationState)} or all,"
                                f" got {state_text!r}", "state") from None
    return ListAllocationsCommand(state=state, limit=fields.integer("limit", 1000, minimum=1, maximum=ALLOCATIONS_PAGE),
                                  before_id=fields.text("before_id", limit=MAX_NAME_LENGTH))


def list_resources(params: Any) -> ListResourcesCommand:
    fields = _Fields(params, frozenset({"type"}))
    kind = fields.text("type")
    if kind is None:
        return ListResourcesCommand(type=None)
    try:
        return ListResourcesCommand(type=ResourceType(kind))
    except ValueError:
        raise InvalidParams(
            f"type must be one of {', '.join(t.value for t in ResourceType)}, got {kind!r}", "type"
        ) from None


def add_resource(params: Any) -> AddResourceCommand | AddResourcesCommand:
    """One resource (its fields as params), or several (`resources`: a list of such objects)."""
    if isinstance(params, dict) and "resources" in params:
        return _add_resources(params)
    return _one_resource(params)


def _add_resources(params: dict[str, Any]) -> AddResourcesCommand:
    _Fields(params, frozenset({"resources"}))
    entries = params["resources"]
    if not isinstance(entries, list) or not 1 <= len(entries) <= MAX_ADD:
        raise InvalidParams(f"resources must be a list of 1 to {MAX_ADD} resources, got {_describe(entries)}"
                            + (f" of {len(entries)}" if isinstance(entries, list) else ""), "resources")
    resources: list[Resource] = []
    names: set[str] = set()
    for index, entry in enumerate(entries):
        resource = _plain_resource(entry)
        if resource is None:
            try:
                command = _one_resource(entry)
            except InvalidParams as error:
                raise InvalidParams(f"resources[{index}]: {error.message}",
                                    f"resources[{index}]" + (f".{error.field}" if error.field else "")) from None
            resource = custom_resource(command.name, command.capacity, command.unit, command.labels,
                                       command.cost_per_unit_hour)
        if resource.name in names:
            raise InvalidParams(f"resources[{index}]: {resource.name!r} is named twice in this request",
                                f"resources[{index}].name")
        names.add(resource.name)
        resources.append(resource)
    return AddResourcesCommand(tuple(resources))


_PLAIN_FIELDS = frozenset({"name", "capacity", "unit"})
_TAKEN_STARTS = (*RESERVED_PREFIXES, POOL_PREFIX)


def _plain_resource(entry: Any) -> Resource | None:
    """The entry's resource when it is plainly valid: a printable name that is not reserved, a capacity in
    range, at most a printable unit. Else None, and _one_resource's checks decide, with their messages.
    A fifth of the cost of those checks (100,000 in one go); it accepts nothing they refuse: a printable
    string is valid Unicode with no control character, and the only space isprintable() allows is ' '."""
    if type(entry) is not dict or not _PLAIN_FIELDS.issuperset(entry):
        return None
    name, capacity, unit = entry.get("name"), entry.get("capacity"), entry.get("unit")
    if (type(name) is not str or not 0 < len(name) <= MAX_NAME_LENGTH or not name.isprintable()
            or name in RESERVED_NAMES or name.startswith(_TAKEN_STARTS)
            or " " in name or "," in name or "=" in name):
        return None
    if (type(capacity) is not float and type(capacity) is not int) or not MIN_QUANTITY <= capacity <= MAX_QUANTITY:
        return None
    if unit is None:
        unit = "units"
    elif type(unit) is not str or not 0 < len(unit) <= MAX_NAME_LENGTH or not unit.isprintable():
        return None
    return custom_resource(name, float(capacity), unit, {}, None)


_RESOURCE_FIELDS = frozenset({"name", "capacity", "unit", "labels", "cost_per_unit_hour"})


def _one_resource(params: Any) -> AddResourceCommand:
    fields = _Fields(params, _RESOURCE_FIELDS)
    name = _required_text(fields, "name")
    check_custom_name(name)
    capacity = fields.quantity("capacity")
    return AddResourceCommand(
        name=name,
        capacity=capacity,
        unit=fields.text("unit", limit=MAX_NAME_LENGTH) or "units",
        labels=_labels(fields),
        cost_per_unit_hour=fields.number("cost_per_unit_hour", minimum=0),
    )


def check_custom_name(name: str) -> None:
    if name in RESERVED_NAMES or name.startswith(RESERVED_PREFIXES):
        raise InvalidParams(
            f"{name!r} is reserved for discovered resources; pick another name (e.g. licence:{name})", "name"
        )
    if name.startswith(POOL_PREFIX):
        raise InvalidParams(f"{name!r}: names starting {POOL_PREFIX!r} name pools in requests; pick another", "name")
    if "," in name or "=" in name or name.split() != [name]:  # split() breaks at what isspace() calls space
        raise InvalidParams(f"resource name {name!r} must not contain spaces, ',' or '='", "name")


def remove_resource(params: Any) -> RemoveResourceCommand:
    fields = _Fields(params, frozenset({"name"}))
    return RemoveResourceCommand(name=_required_text(fields, "name"))


def list_events(params: Any) -> ListEventsCommand:
    fields = _Fields(params, frozenset({"after_id", "limit", "allocation_id"}))
    return ListEventsCommand(
        after_id=fields.integer("after_id", 0, minimum=0, maximum=1 << 62),
        limit=fields.integer("limit", 100, minimum=1, maximum=10_000),
        allocation_id=fields.text("allocation_id", limit=MAX_NAME_LENGTH),
    )


def _required_text(fields: _Fields, name: str) -> str:
    value = fields.text(name, required=True, limit=MAX_NAME_LENGTH)
    assert value is not None
    return value


@dataclass(frozen=True)
class MetricsCommand:
    resource: str | None


@dataclass(frozen=True)
class HistoryCommand:
    resource: str
    metric: str
    since: float


@dataclass(frozen=True)
class AlertsCommand:
    all: bool


@dataclass(frozen=True)
class PredictCommand:
    resource: str
    metric: str
    horizon: float


def metrics_current(params: Any) -> MetricsCommand:
    fields = _Fields(params, frozenset({"resource"}))
    return MetricsCommand(resource=fields.text("resource", limit=MAX_NAME_LENGTH))


def metrics_history(params: Any) -> HistoryCommand:
    fields = _Fields(params, frozenset({"resource", "metric", "since"}))
    since = fields.number("since") or 3600.0
    if not 0 < since <= 30 * 86400:
        raise InvalidParams(f"since must be seconds between 0 and 30 days, got {since:g}", "since")
    return HistoryCommand(resource=_required_text(fields, "resource"),
                          metric=fields.text("metric", limit=MAX_NAME_LENGTH) or "utilisation", since=since)


def alerts_list(params: Any) -> AlertsCommand:
    fields = _Fields(params, frozenset({"all"}))
    return AlertsCommand(all=fields.flag("all"))


def predict(params: Any) -> PredictCommand:
    fields = _Fields(params, frozenset({"resource", "metric", "in"}))
    horizon = fields.number("in") or 1800.0
    if not 0 < horizon <= 30 * 86400:
        raise InvalidParams(f"in must be seconds between 0 and 30 days, got {horizon:g}", "in")
    return PredictCommand(resource=_required_text(fields, "resource"),
                          metric=fields.text("metric", limit=MAX_NAME_LENGTH) or "utilisation", horizon=horizon)


MAX_PATH_LENGTH = 4096


@dataclass(frozen=True)
class BackupCommand:
    path: str
    overwrite: bool


def db_backup(params: Any) -> BackupCommand:
    fields = _Fields(params, frozenset({"path", "overwrite"}))
    path = fields.text("path", required=True, limit=MAX_PATH_LENGTH)
    assert path is not None
    if not path.startswith("/"):
        raise InvalidParams(f"path must be absolute (the daemon does not share your working directory), got {path!r}",
                            "path")
    if path.endswith("/"):
        raise InvalidParams(f"path must name a file, not a directory, got {path!r}", "path")
    return BackupCommand(path=path, overwrite=fields.flag("overwrite"))


# -- cost, pools, budgets, accounting -----------------------------------------


@dataclass(frozen=True)
class SetCostCommand:
    name: str
    cost_per_unit_hour: float | None


def set_cost(params: Any) -> SetCostCommand:
    fields = _Fields(params, frozenset({"name", "cost_per_unit_hour"}))
    if "cost_per_unit_hour" not in fields.params:
        raise InvalidParams("cost_per_unit_hour is required (null clears it)", "cost_per_unit_hour")
    return SetCostCommand(_required_text(fields, "name"), fields.number("cost_per_unit_hour", minimum=0))


@dataclass(frozen=True)
class PoolCommand:
    name: str


def pool_name(params: Any) -> PoolCommand:
    fields = _Fields(params, frozenset({"name"}))
    return PoolCommand(_required_text(fields, "name"))


@dataclass(frozen=True)
class PoolEventsCommand:
    name: str
    limit: int


def pool_events(params: Any) -> PoolEventsCommand:
    fields = _Fields(params, frozenset({"name", "limit"}))
    return PoolEventsCommand(_required_text(fields, "name"), fields.integer("limit", 100, minimum=1, maximum=10_000))


@dataclass(frozen=True)
class CreatePoolCommand:
    spec: PoolSpec


_POOL_FIELDS = frozenset({"name", "factory", "members", "select", "parent", "slot_size", "create", "destroy",
                          "timeout", "min", "max", "strategy", "cost_per_unit_hour", "scale_up_at", "scale_down_at",
                          "target", "cooldown", "labels"})


def pool_spec(raw: Any) -> PoolSpec:
    """A pool's declaration, from pools.create params or a config [[pools]] table (same field names)."""
    fields = _Fields(raw, _POOL_FIELDS)
    name = _required_text(fields, "name")
    factory_text = _required_text(fields, "factory")
    try:
        factory = FactoryKind(factory_text)
    except ValueError:
        raise InvalidParams(f"factory must be one of {', '.join(k.value for k in FactoryKind)}, got {factory_text!r}",
                            "factory") from None
    strategy_text = fields.text("strategy") or Strategy.FIRST_FIT.value
    if strategy_text not in _POOL_STRATEGIES:
        raise InvalidParams(f"a pool's strategy is one of {', '.join(_POOL_STRATEGIES)}, got {strategy_text!r}",
                            "strategy")
    defaults = ScalePolicy()
    scale = ScalePolicy(
        up_at=_or(fields.number("scale_up_at"), defaults.up_at),
        down_at=_or(fields.number("scale_down_at"), defaults.down_at),
        target=_or(fields.number("target"), defaults.target),
        cooldown_s=_or(fields.number("cooldown", minimum=0), defaults.cooldown_s),
    )
    maximum = fields.params.get("max")
    spec = PoolSpec(
        name=name,
        factory=factory,
        min_size=fields.integer("min", 0, minimum=0, maximum=100_000),
        max_size=None if maximum is None else fields.integer("max", 0, minimum=0, maximum=100_000),
        strategy=Strategy(strategy_text),
        members=_texts(fields, "members"),
        select=_texts(fields, "select"),
        parent=fields.text("parent", limit=MAX_NAME_LENGTH),
        slot_size=None if fields.params.get("slot_size") is None else fields.quantity("slot_size"),
        create=fields.text("create", limit=4096),
        destroy=fields.text("destroy", limit=4096),
        timeout_s=_or(fields.number("timeout"), 30.0),
        cost_per_unit_hour=fields.number("cost_per_unit_hour", minimum=0),
        scale=scale,
        labels=_labels(fields),
    )
    try:
        spec.validate()
    except DomainError as error:
        raise InvalidParams(error.message, str(error.data.get("field", "")) or None) from None
    return spec


def create_pool(params: Any) -> CreatePoolCommand:
    return CreatePoolCommand(pool_spec(params))


_POOL_STRATEGIES = tuple(s.value for s in (Strategy.FIRST_FIT, Strategy.BEST_FIT, Strategy.ROUND_ROBIN,
                                           Strategy.LEAST_LOADED, Strategy.LOCALITY_AWARE))


def _or(value: float | None, default: float) -> float:
    return default if value is None else value


def _texts(fields: _Fields, name: str) -> tuple[str, ...]:
    raw = fields.params.get(name)
    if raw is None:
        return ()
    if not isinstance(raw, list) or len(raw) > 10_000:
        raise InvalidParams(f"{name} must be an array of strings", name)
    return tuple(check_text(item, f"{name}[{index}]", MAX_NAME_LENGTH) for index, item in enumerate(raw))


def _labels(fields: _Fields) -> dict[str, str | int | float | bool | None]:
    labels = fields.params.get("labels")
    if labels is None:
        return {}
    if not isinstance(labels, dict):
        raise InvalidParams("labels must be an object of simple values", "labels")
    for key, value in labels.items():
        check_text(key, "labels key", MAX_NAME_LENGTH)
        if isinstance(value, str):
            check_text(value, f"labels.{key}")
        elif value is not None and not isinstance(value, bool) and not is_valid_number(value):
            raise InvalidParams(f"labels.{key} must be a string, number, boolean or null", f"labels.{key}")
    return labels


@dataclass(frozen=True)
class BudgetKey:
    scope: BudgetScope
    subject: str
    period: Period


@dataclass(frozen=True)
class SetBudgetCommand:
    key: BudgetKey
    limit: float
    soft: float


def _budget_key(fields: _Fields) -> BudgetKey:
    scope_text, period_text = _required_text(fields, "scope"), _required_text(fields, "period")
    try:
        scope = BudgetScope(scope_text)
    except ValueError:
        raise InvalidParams(f"scope must be one of {', '.join(s.value for s in BudgetScope)}, got {scope_text!r}",
                            "scope") from None
    try:
        period = Period(period_text)
    except ValueError:
        raise InvalidParams(f"period must be one of {', '.join(p.value for p in Period)}, got {period_text!r}",
                            "period") from None
    subject = _required_text(fields, "subject")
    if scope is BudgetScope.OWNER and not subject.isdigit():
        raise InvalidParams(f"an owner budget's subject is a uid (decimal), got {subject!r}", "subject")
    return BudgetKey(scope, subject, period)


def set_budget(params: Any) -> SetBudgetCommand:
    fields = _Fields(params, frozenset({"scope", "subject", "period", "limit", "soft"}))
    key = _budget_key(fields)
    limit = fields.quantity("limit")
    soft = _or(fields.number("soft"), 0.8)
    if not 0 < soft <= 1:
        raise InvalidParams(f"soft is a fraction of the limit, above 0 and at most 1; got {soft:g}", "soft")
    return SetBudgetCommand(key, limit, soft)


def budget_key(params: Any) -> BudgetKey:
    return _budget_key(_Fields(params, frozenset({"scope", "subject", "period"})))


@dataclass(frozen=True)
class UsageCommand:
    by: str
    since: float


_USAGE_BY = ("tool", "owner", "pool", "resource")


def usage(params: Any) -> UsageCommand:
    fields = _Fields(params, frozenset({"by", "since"}))
    by = fields.text("by") or "tool"
    if by not in _USAGE_BY:
        raise InvalidParams(f"by must be one of {', '.join(_USAGE_BY)}, got {by!r}", "by")
    since = _or(fields.number("since", minimum=0), 7 * 86400.0)
    if since > 10 * 365 * 86400:
        raise InvalidParams("since is at most ten years", "since")
    return UsageCommand(by, since)


@dataclass(frozen=True)
class RecommendCommand:
    tool_id: str
    runs: int


def recommend(params: Any) -> RecommendCommand:
    fields = _Fields(params, frozenset({"tool_id", "runs"}))
    tool = _required_text(fields, "tool_id")
    return RecommendCommand(tool, fields.integer("runs", 50, minimum=1, maximum=10_000))
