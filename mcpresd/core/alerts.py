"""Alert rules and the state machine of one alert per (rule, resource).

Rules:
- A rule names a metric, a selector (a resource type such as `gpu`, a resource
  name, or a glob such as `disk:*`) and thresholds per level. An above-rule is
  crossed when value >= threshold, a below-rule when value <= threshold; the
  level is the most severe one crossed. Thresholds rise with severity for
  above-rules and fall with it for below-rules.
- inactive -> pending when a threshold is crossed. pending -> firing once it
  has been crossed for `pending_for` seconds; dropping under every threshold
  while pending cancels it quietly (back to inactive, nothing to notify).
- Hysteresis: a firing alert is cleared only by a value past `clear` (below it
  for above-rules, above it for below-rules; default: the least severe
  threshold). Between `clear` and that threshold it stays firing at the least
  severe level.
- `keep_firing_for`: a firing alert resolves only once the value has stayed
  cleared that long, counted from the first cleared value; a value back over
  `clear` restarts the count.
- Levels have the same hysteresis: a pending or firing alert rises to a more severe level
  at once, but falls to a less severe one only once the value has stayed below
  its level's threshold for `keep_firing_for`, counted from the first value
  below it; a value back at the level restarts the count. So a value
  oscillating around the critical threshold stays critical rather than
  flapping warning<->critical every sample.
- Missing data (None or NaN) marks the alert `unknown` and changes nothing
  else: it never resolves, cancels or fires an alert, and it restarts the
  `keep_firing_for` count, since nobody saw the value stay clear.
- A resolved alert keeps its record: fired_at, resolved_at, duration and the
  min/max/avg of the values seen while it was pending or firing (the value
  that resolves it is not part of its life). Crossing again starts a new alert.
- Transitions are returned only on changes: "pending" and level changes while
  pending (notify=False), "firing", level changes while firing, "resolved"
  (notify=True).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from enum import StrEnum
from functools import lru_cache
from typing import Literal

from mcpresd.core.errors import InvalidRequest


class Level(StrEnum):
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"
    CRITICAL = "critical"


RANK = {Level.INFO: 0, Level.WARNING: 1, Level.ERROR: 2, Level.CRITICAL: 3}


class State(StrEnum):
    INACTIVE = "inactive"
    PENDING = "pending"
    FIRING = "firing"
    RESOLVED = "resolved"


TransitionKind = Literal["pending", "firing", "level", "resolved"]


@dataclass(frozen=True)
class AlertRule:
    name: str
    metric: str
    selector: str
    thresholds: tuple[tuple[Level, float], ...]
    above: bool = True
    clear: float | None = None
    pending_for: float = 0.0
    keep_firing_for: float = 0.0

    def __post_init__(self) -> None:
        _check_thresholds(self)
        _check_clear(self)
        for key, seconds in (("for", self.pending_for), ("keep_firing_for", self.keep_firing_for)):
            if not (math.isfinite(seconds) and seconds >= 0):
                raise _invalid(self.name, key, "must be a number of seconds >= 0")

    @property
    def least_severe(self) -> tuple[Level, float]:
        return min(self.thresholds, key=lambda t: RANK[t[0]])

    @property
    def clear_at(self) -> float:
        return self.least_severe[1] if self.clear is None else self.clear


def _invalid(rule: str, key: str, problem: str) -> InvalidRequest:
    return InvalidRequest(f"alert rule {rule!r}: {key!r} {problem}", rule=rule, key=key)


def _check_thresholds(rule: AlertRule) -> None:
    if not rule.thresholds:
        raise _invalid(rule.name, "thresholds", "needs at least one of info, warning, error, critical")
    levels = [level for level, _ in rule.thresholds]
    if len(set(levels)) != len(levels):
        raise _invalid(rule.name, "thresholds", "names a level twice")
    ordered = sorted(rule.thresholds, key=lambda t: RANK[t[0]])
    for level, value in ordered:
        if not math.isfinite(value):
            raise _invalid(rule.name, level.value, "must be a finite number")
    for (lower, low), (higher, high) in zip(ordered, ordered[1:]):
        if rule.above and not high > low:
            raise _invalid(rule.name, higher.value, f"must be above {lower.value} ({low:g}) in an above-rule")
        if not rule.above and not high < low:
            raise _invalid(rule.name, higher.value, f"must be below {lower.value} ({low:g}) in a below-rule")


def _check_clear(rule: AlertRule) -> None:
    if rule.clear is None:
        return
    level, threshold = rule.least_severe
    if not math.isfinite(rule.clear):
        raise _invalid(rule.name, "clear", "must be a finite number")
    if rule.above and rule.clear > threshold:
        raise _invalid(rule.name, "clear", f"must not be above {level.value} ({threshold:g}) in an above-rule")
    if not rule.above and rule.clear < threshold:
        raise _invalid(rule.name, "clear", f"must not be below {level.value} ({threshold:g}) in a below-rule")


@lru_cache(maxsize=256)
def _glob(pattern: str) -> re.Pattern[str]:
    """`*`, `?` and `[...]` (with `[!...]`) as in shell globs; everything else is literal."""
    parts: list[str] = []
    i = 0
    while i < len(pattern):
        char = pattern[i]
        end = pattern.find("]", i + 2) if char == "[" else -1
        if char == "*":
            parts.append(".*")
        elif char == "?":
            parts.append(".")
        elif end != -1:
            body = pattern[i + 1:end]
            negate = body.startswith("!")
            body = body[1:] if negate else body
            parts.append("[" + ("^" if negate else "") + body.replace("\\", "\\\\").replace("^", "\\^") + "]")
            i = end
        else:
            parts.append(re.escape(char))
        i += 1
    return re.compile("".join(parts), re.DOTALL)


def selects(rule: AlertRule, resource_name: str, resource_type: str) -> bool:
    """Whether the rule watches this resource: its type, its name, or a glob over its name."""
    return rule.selector == resource_type or _glob(rule.selector).fullmatch(resource_name) is not None


def crossed(rule: AlertRule, value: float) -> Level | None:
    """The most severe level whose threshold the value crosses, or None."""
    hit = [level for level, threshold in rule.thresholds if (value >= threshold if rule.above else value <= threshold)]
    return max(hit, key=RANK.__getitem__) if hit else None


def cleared(rule: AlertRule, value: float) -> bool:
    """Whether the value is past `clear`, on the safe side."""
    return value < rule.clear_at if rule.above else value > rule.clear_at


@dataclass(frozen=True)
class Alert:
    rule: str
    resource: str
    state: State = State.INACTIVE
    level: Level | None = None
    since: float | None = None
    fired_at: float | None = None
    resolved_at: float | None = None
    last_value: float | None = None
    min: float | None = None
    max: float | None = None
    total: float = 0.0
    count: int = 0
    unknown: bool = False
    clear_since: float | None = None
    lower_since: float | None = None
    """Since when the value has been below the firing level's threshold (counts toward falling a level)."""

    @property
    def avg(self) -> float | None:
        return self.total / self.count if self.count else None

    @property
    def duration(self) -> float | None:
        """Seconds from firing to resolution, once resolved."""
        if self.fired_at is None or self.resolved_at is None:
            return None
        return self.resolved_at - self.fired_at


@dataclass(frozen=True)
class Transition:
    kind: TransitionKind
    rule: str
    resource: str
    level: Level
    previous: Level | None
    value: float
    at: float
    notify: bool


def evaluate(rule: AlertRule, alert: Alert | None, value: float | None, now: float, *,
             resource: str | None = None) -> tuple[Alert | None, list[Transition]]:
    """The alert after one reading at `now`, and what changed. `resource` names a new alert (when `alert` is None)."""
    if value is None or math.isnan(value):
        return (None if alert is None else _missing(alert)), []
    if alert is None:
        if resource is None:
            raise ValueError("evaluate needs `resource` to start a new alert")
        alert = Alert(rule.name, resource)
    if alert.state is State.PENDING:
        return _while_pending(rule, alert, value, now)
    if alert.state is State.FIRING:
        return _while_firing(rule, alert, value, now)
    return _while_idle(rule, alert, value, now)


def _missing(alert: Alert) -> Alert:
    return replace(alert, unknown=True, clear_since=None, lower_since=None)


def _observed(alert: Alert, value: float) -> Alert:
    return replace(alert, last_value=value, unknown=False, count=alert.count + 1, total=alert.total + value,
                   min=value if alert.min is None else min(alert.min, value),
                   max=value if alert.max is None else max(alert.max, value))


def _transition(kind: TransitionKind, alert: Alert, value: float, now: float, *,
                previous: Level | None = None, notify: bool = True) -> Transition:
    assert alert.level is not None
    return Transition(kind, alert.rule, alert.resource, alert.level, previous, value, now, notify)


def _while_idle(rule: AlertRule, alert: Alert, value: float, now: float) -> tuple[Alert, list[Transition]]:
    level = crossed(rule, value)
    if level is None:
        return (replace(alert, unknown=False) if alert.unknown else alert), []
    started = _observed(Alert(rule.name, alert.resource, State.PENDING, level, since=now), value)
    transitions = [_transition("pending", started, value, now, notify=False)]
    if rule.pending_for <= 0:
        started = replace(started, state=State.FIRING, fired_at=now)
        transitions.append(_transition("firing", started, value, now))
    return started, transitions


def _while_pending(rule: AlertRule, alert: Alert, value: float, now: float) -> tuple[Alert, list[Transition]]:
    level = crossed(rule, value)
    if level is None:
        return Alert(rule.name, alert.resource, last_value=value), []
    transitions: list[Transition] = []
    previous = alert.level
    alert = _settle(rule, _observed(alert, value), level, now)
    if alert.level is not previous:
        transitions.append(_transition("level", alert, value, now, previous=previous, notify=False))
    assert alert.since is not None
    if now - alert.since >= rule.pending_for:
        alert = replace(alert, state=State.FIRING, fired_at=now)
        transitions.append(_transition("firing", alert, value, now))
    return alert, transitions


def _while_firing(rule: AlertRule, alert: Alert, value: float, now: float) -> tuple[Alert, list[Transition]]:
    lower_since = now if alert.lower_since is None else alert.lower_since
    if cleared(rule, value):
        clear_since = now if alert.clear_since is None else alert.clear_since
        if now - clear_since >= rule.keep_firing_for:
            resolved = replace(alert, state=State.RESOLVED, resolved_at=now, last_value=value, unknown=False,
                               clear_since=clear_since, lower_since=None)
            return resolved, [_transition("resolved", resolved, value, now)]
        return replace(_observed(alert, value), clear_since=clear_since, lower_since=lower_since), []
    previous = alert.level
    alert = _settle(rule, replace(_observed(alert, value), clear_since=None), crossed(rule, value)
                    or rule.least_severe[0], now)
    if alert.level is previous:
        return alert, []
    return alert, [_transition("level", alert, value, now, previous=previous)]


def _settle(rule: AlertRule, alert: Alert, level: Level, now: float) -> Alert:
    """The alert at `level`, the level the value crosses now: up at once, down only after `keep_firing_for`."""
    assert alert.level is not None
    if RANK[level] >= RANK[alert.level]:
        return replace(alert, level=level, lower_since=None)
    lower_since = now if alert.lower_since is None else alert.lower_since
    if now - lower_since < rule.keep_firing_for:
        return replace(alert, lower_since=lower_since)
    return replace(alert, level=level, lower_since=None)


def default_rules() -> tuple[AlertRule, ...]:
    """The rules the daemon watches when the config names none."""
    return (
        AlertRule("cpu-busy", "cpu.utilisation", "cpu",
                  ((Level.WARNING, 80.0), (Level.CRITICAL, 90.0)), pending_for=60.0, keep_firing_for=30.0),
        AlertRule("memory-full", "memory.utilisation", "memory",
                  ((Level.WARNING, 80.0), (Level.CRITICAL, 95.0)), pending_for=60.0, keep_firing_for=30.0),
        AlertRule("disk-full", "disk.utilisation", "disk:*",
                  ((Level.WARNING, 90.0), (Level.CRITICAL, 98.0)), pending_for=60.0, keep_firing_for=30.0),
        AlertRule("gpu-hot", "gpu.temperature_c", "gpu",
                  ((Level.WARNING, 83.0), (Level.CRITICAL, 90.0)), pending_for=30.0, keep_firing_for=30.0),
        AlertRule("gpu-memory-full", "gpu.memory_utilisation", "gpu",
                  ((Level.WARNING, 90.0), (Level.CRITICAL, 98.0)), pending_for=30.0, keep_firing_for=30.0),
    )


CONFIG_KEYS = frozenset({"name", "metric", "selector", "below", "clear", "for", "keep_firing_for",
                         *(level.value for level in Level)})
_METRIC = re.compile(r"[a-z0-9_]+(\.[a-z0-9_]+)*")


def rule_from_config(table: Mapping[str, object]) -> AlertRule:
    """One `[[alerts]]` table as a rule. Durations are numbers of seconds here; the config layer converts strings."""
    name = _text(table, "name", "?")
    unknown = sorted(set(table) - CONFIG_KEYS)
    if unknown:
        raise _invalid(name, unknown[0], f"is not an alert rule key (known: {', '.join(sorted(CONFIG_KEYS))})")
    metric = _text(table, "metric", name)
    if not _METRIC.fullmatch(metric):
        raise _invalid(name, "metric", "must be dotted lower-case words, like gpu.temperature_c")
    below = table.get("below", False)
    if not isinstance(below, bool):
        raise _invalid(name, "below", "must be true or false")
    thresholds = tuple((level, number) for level in Level
                       if (number := _number(table, level.value, name)) is not None)
    return AlertRule(name, metric, _text(table, "selector", name), thresholds, above=not below,
                     clear=_number(table, "clear", name),
                     pending_for=_seconds(table, "for", name), keep_firing_for=_seconds(table, "keep_firing_for", name))


def _text(table: Mapping[str, object], key: str, rule: str) -> str:
    value = table.get(key)
    if not isinstance(value, str) or not value.strip():
        raise _invalid(rule, key, "must be a non-empty string")
    return value


def _number(table: Mapping[str, object], key: str, rule: str) -> float | None:
    value = table.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _invalid(rule, key, "must be a finite number")
    return float(value)


def _seconds(table: Mapping[str, object], key: str, rule: str) -> float:
    value = _number(table, key, rule)
    if value is not None and value < 0:
        raise _invalid(rule, key, "must be a number of seconds >= 0")
    return 0.0 if value is None else value
