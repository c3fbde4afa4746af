"""What a request may demand beyond an amount: label selectors, locality, cost.

Rules:
- A selector is `KEY OP VALUE`, OP one of = != >= <= > < ~ !~. The value is a
  number where it reads as one (`40G` is 40 GiB, `0` is 0.0), a bool for
  `true`/`false`, else a string; after `~` and `!~` it is always a
  case-insensitive regular expression, checked when parsed.
- Keys are `name`, `type`, `uuid`, `unit`, `capacity`, `cost` and any label.
  Where a label has a built-in key's name (a GPU's `name` label is its model),
  both values count: `name~H100` matches the model, `name=gpu:0` the resource.
- `!=` and `!~` are the exact negations of `=` and `~`, so a missing key or a
  None value matches only them. Nothing is coerced: the label "40" is not the
  number 40, a bool is not a number, and ordering a non-number is False.
- Locality prefers devices on one NUMA node, then on one PCI root (the
  domain:bus of `pci_bus_id`), and otherwise keeps the given preference order.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from mcpresd.core.errors import InvalidRequest
from mcpresd.core.model import LabelValue, Resource
from mcpresd.protocol import UnitError, parse_size

MAX_PATTERN_LENGTH = 200
OPERATORS = ("=", "!=", ">=", "<=", ">", "<", "~", "!~")
FORMS = "--where takes KEY OP VALUE with OP one of = != >= <= > < ~ !~ (e.g. 'memory>=40G', 'name~H100')"

_SELECTOR = re.compile(r"(?P<key>[^=!<>~]*?)(?P<op>!~|!=|>=|<=|=|>|<|~)(?P<value>.*)", re.DOTALL)
_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
_SIZE = re.compile(r"(?:\d+(?:\.\d*)?|\.\d+)\s*[KMGTP](?:i?B)?", re.IGNORECASE)
_NEGATIONS = {"!=": "=", "!~": "~"}
_OPERATOR_CHARACTERS = "=!<>~"

Value = str | float | bool


@dataclass(frozen=True)
class Selector:
    key: str
    op: str
    value: Value
    text: str


def _refuse(text: str, reason: str = "") -> InvalidRequest:
    return InvalidRequest(f"{FORMS}; got {text!r}" + (f": {reason}" if reason else ""), selector=text)


def parse_selector(text: str) -> Selector:
    """Parse `memory>=40G`, `name~H100`, `mig=false`, `name!~MIG`; raise InvalidRequest on anything else."""
    found = _SELECTOR.fullmatch(text)
    if found is None:
        raise _refuse(text)
    key, op, raw = found["key"].strip(), found["op"], found["value"].strip()
    if not key:
        raise _refuse(text, "the key is empty")
    if any(c.isspace() for c in key):
        raise _refuse(text, f"a key has no spaces, got {key!r}")
    if not raw:
        raise _refuse(text, "the value is empty")
    if op in ("~", "!~"):
        return Selector(key, op, _pattern(text, raw), text)
    if raw[0] in _OPERATOR_CHARACTERS:
        written = op + raw[: len(raw) - len(raw.lstrip(_OPERATOR_CHARACTERS))]
        raise _refuse(text, f"{written!r} is not an operator")
    return Selector(key, op, _value(text, raw), text)


def _pattern(text: str, raw: str) -> str:
    if len(raw) > MAX_PATTERN_LENGTH:
        raise _refuse(text, f"a pattern is at most {MAX_PATTERN_LENGTH} characters")
    try:
        re.compile(raw, re.IGNORECASE)
    except re.error as exc:
        raise _refuse(text, f"not a regular expression ({exc})") from None
    return raw


def _value(text: str, raw: str) -> Value:
    if raw.lower() in ("true", "false"):
        return raw.lower() == "true"
    if _NUMBER.fullmatch(raw):
        number = float(raw)
        if not math.isfinite(number):
            raise _refuse(text, "a number must be finite")
        return number
    if _SIZE.fullmatch(raw):
        try:
            return float(parse_size(raw))
        except UnitError as exc:
            raise _refuse(text, str(exc)) from None
    return raw


_BUILT_IN: dict[str, Callable[[Resource], LabelValue]] = {
    "name": lambda r: r.name,
    "type": lambda r: r.type.value,
    "uuid": lambda r: r.uuid,
    "unit": lambda r: r.unit,
    "capacity": lambda r: r.capacity,
    "cost": lambda r: r.cost_per_unit_hour,
}


def _values(key: str, resource: Resource) -> list[str | int | float | bool]:
    found: list[LabelValue] = []
    if key in _BUILT_IN:
        found.append(_BUILT_IN[key](resource))
    if key in resource.labels:
        found.append(resource.labels[key])
    return [v for v in found if v is not None]


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _equal(actual: object, wanted: object) -> bool:
    if isinstance(actual, bool) or isinstance(wanted, bool):
        return isinstance(actual, bool) and isinstance(wanted, bool) and actual == wanted
    if _is_number(actual) and _is_number(wanted):
        return actual == wanted
    return isinstance(actual, str) and isinstance(wanted, str) and actual == wanted


def _search(actual: object, pattern: object) -> bool:
    return re.search(str(pattern), str(actual), re.IGNORECASE) is not None


def _ordered(compare: Callable[[float, float], bool]) -> Callable[[object, object], bool]:
    def test(actual: object, wanted: object) -> bool:
        if isinstance(actual, bool) or isinstance(wanted, bool):
            return False
        return isinstance(actual, (int, float)) and isinstance(wanted, (int, float)) and compare(actual, wanted)
    return test


_TESTS: dict[str, Callable[[object, object], bool]] = {
    "=": _equal,
    "~": _search,
    ">=": _ordered(lambda a, b: a >= b),
    "<=": _ordered(lambda a, b: a <= b),
    ">": _ordered(lambda a, b: a > b),
    "<": _ordered(lambda a, b: a < b),
}


def matches(selector: Selector, resource: Resource) -> bool:
    """Whether the resource satisfies one selector (see the module's rules)."""
    return selects(selector, _values(selector.key, resource))


def selects(selector: Selector, values: Iterable[object]) -> bool:
    """Whether a thing with these values for the selector's key satisfies it (a pool's fields, a resource's)."""
    test = _TESTS[_NEGATIONS.get(selector.op, selector.op)]
    hit = any(test(actual, selector.value) for actual in values)
    return not hit if selector.op in _NEGATIONS else hit


def matches_all(selectors: Sequence[Selector], resource: Resource) -> bool:
    return all(matches(s, resource) for s in selectors)


def _numa_node(resource: Resource) -> int | None:
    node = resource.labels.get("numa_node")
    return node if isinstance(node, int) and not isinstance(node, bool) else None


def _pci_root(resource: Resource) -> str | None:
    bus_id = resource.labels.get("pci_bus_id")
    if not isinstance(bus_id, str):
        return None
    parts = bus_id.strip().lower().split(":")
    return ":".join(parts[:2]) if len(parts) >= 3 and all(parts[:2]) else None


def _first_group(
    preferred: Sequence[Resource], count: int, place: Callable[[Resource], int | str | None]
) -> list[Resource] | None:
    groups: dict[int | str, list[Resource]] = {}
    for resource in preferred:
        where = place(resource)
        if where is not None:
            groups.setdefault(where, []).append(resource)
    # Groups are in the order of their earliest-preferred member.
    for members in groups.values():
        if len(members) >= count:
            return members[:count]
    return None


def pick_local(preferred: Sequence[Resource], count: int) -> list[Resource] | None:
    """Choose `count` of `preferred` close together, keeping preference order; None if too few are given."""
    if count < 0:
        raise ValueError(f"count must not be negative, got {count}")
    if count > len(preferred):
        return None
    if count <= 1:
        return list(preferred[:count])
    for place in (_numa_node, _pci_root):
        group = _first_group(preferred, count, place)
        if group is not None:
            return group
    return list(preferred[:count])


def request_cost(items: Sequence[tuple[Resource, float]]) -> float:
    """What a grant costs per hour: the sum of amount * cost_per_unit_hour (no cost counts as 0)."""
    return math.fsum(amount * (resource.cost_per_unit_hour or 0.0) for resource, amount in items)
