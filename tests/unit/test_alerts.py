"""Alert rules and the alert state machine, on a fake clock (plain numbers)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import pytest

from mcpresd.core.alerts import (Alert, AlertRule, Level, State, Transition, crossed, default_rules, evaluate,
                                 rule_from_config, selects)
from mcpresd.core.errors import InvalidRequest

W, E, C = Level.WARNING, Level.ERROR, Level.CRITICAL


def hot(pending_for: float = 0.0, keep_firing_for: float = 0.0, clear: float | None = None) -> AlertRule:
    return AlertRule("hot", "gpu.temperature_c", "gpu", ((W, 80.0), (C, 90.0)), clear=clear,
                     pending_for=pending_for, keep_firing_for=keep_firing_for)


def replay(rule: AlertRule, readings: Sequence[tuple[float, float | None]],
           alert: Alert | None = None) -> tuple[Alert | None, list[Transition]]:
    seen: list[Transition] = []
    for now, value in readings:
        alert, transitions = evaluate(rule, alert, value, now, resource="gpu0")
        seen.extend(transitions)
    return alert, seen


def kinds(transitions: list[Transition]) -> list[tuple[float, str, str]]:
    return [(t.at, t.kind, t.level.value) for t in transitions]


def ticks(values: Sequence[float | None], step: float = 1.0, start: float = 0.0) -> list[tuple[float, float | None]]:
    return [(start + i * step, v) for i, v in enumerate(values)]


def test_an_alert_fires_only_after_its_pending_duration() -> None:
    alert, seen = replay(hot(pending_for=3), [(0, 85), (1, 85), (2.999, 85)])
    assert alert is not None and alert.state is State.PENDING
    assert kinds(seen) == [(0, "pending", "warning")]
    alert, seen = replay(hot(pending_for=3), [(3, 85)], alert=alert)
    assert alert is not None and alert.state is State.FIRING and alert.fired_at == 3
    assert kinds(seen) == [(3, "firing", "warning")]


def test_a_pending_alert_fires_on_the_first_reading_at_its_pending_duration() -> None:
    alert, seen = replay(hot(pending_for=3), ticks([85, 86, 87, 88]))
    assert kinds(seen) == [(0, "pending", "warning"), (3, "firing", "warning")]
    assert alert is not None and alert.since == 0 and alert.fired_at == 3


def test_without_a_pending_duration_an_alert_fires_at_once() -> None:
    alert, seen = replay(hot(), ticks([95]))
    assert kinds(seen) == [(0, "pending", "critical"), (0, "firing", "critical")]
    assert [t.notify for t in seen] == [False, True]


def test_pending_is_reported_but_not_notified() -> None:
    _, seen = replay(hot(pending_for=10), ticks([85]))
    assert [(t.kind, t.notify) for t in seen] == [("pending", False)]


def test_dropping_back_while_pending_cancels_quietly() -> None:
    alert, seen = replay(hot(pending_for=3), ticks([85, 85, 50, 50, 50]))
    assert alert is not None and alert.state is State.INACTIVE and alert.level is None
    assert kinds(seen) == [(0, "pending", "warning")]


def test_pending_needs_the_threshold_crossed_not_just_above_clear() -> None:
    alert, seen = replay(hot(pending_for=2, clear=70), ticks([85, 75, 85, 85]))
    assert kinds(seen) == [(0, "pending", "warning"), (2, "pending", "warning")]
    assert alert is not None and alert.state is State.PENDING and alert.since == 2


def test_missing_data_never_resolves_a_firing_alert() -> None:
    alert, seen = replay(hot(), ticks([95, None, None, None]))
    assert alert is not None and alert.state is State.FIRING and alert.unknown
    assert [t.kind for t in seen] == ["pending", "firing"]


def test_missing_data_never_fires_or_cancels_a_pending_alert() -> None:
    alert, seen = replay(hot(pending_for=2), ticks([85, None, None, None, None]))
    assert alert is not None and alert.state is State.PENDING and alert.unknown
    assert [t.kind for t in seen] == ["pending"]


def test_a_reading_after_missing_data_clears_the_unknown_flag() -> None:
    alert, _ = replay(hot(), ticks([95, None, 96]))
    assert alert is not None and not alert.unknown and alert.last_value == 96


def test_nan_is_missing_data() -> None:
    alert, seen = replay(hot(), ticks([95, float("nan")]))
    assert alert is not None and alert.state is State.FIRING and alert.unknown and alert.last_value == 95


def test_missing_data_before_any_alert_creates_none() -> None:
    assert evaluate(hot(), None, None, 0.0, resource="gpu0") == (None, [])


def test_missing_data_restarts_the_keep_firing_for_count() -> None:
    alert, seen = replay(hot(keep_firing_for=3), ticks([95, 50, None, 50, 50, 50, 50]))
    assert kinds(seen)[-1] == (6, "resolved", "critical")


@pytest.mark.parametrize("values, state", [
    ([95, 75], State.FIRING),
    ([95, 71, 70, 85], State.FIRING),
    ([95, 69.9], State.RESOLVED),
])
def test_hysteresis_keeps_an_alert_firing_until_below_clear(values: list[float], state: State) -> None:
    alert, _ = replay(hot(clear=70), ticks(values))
    assert alert is not None and alert.state is state


def test_between_clear_and_the_threshold_a_firing_alert_is_at_its_least_severe_level() -> None:
    alert, seen = replay(hot(clear=70), ticks([95, 75]))
    assert alert is not None and alert.level is W
    assert kinds(seen)[-1] == (1, "level", "warning")


def test_without_clear_the_least_severe_threshold_clears() -> None:
    alert, _ = replay(hot(), ticks([95, 80]))
    assert alert is not None and alert.state is State.FIRING
    alert, _ = replay(hot(), ticks([95, 79.99]))
    assert alert is not None and alert.state is State.RESOLVED


def test_keep_firing_for_delays_resolution() -> None:
    alert, seen = replay(hot(keep_firing_for=3), ticks([95, 50, 50, 50, 50]))
    assert kinds(seen) == [(0, "pending", "critical"), (0, "firing", "critical"), (4, "resolved", "critical")]
    assert alert is not None and alert.resolved_at == 4 and alert.clear_since == 1


def test_a_value_back_over_clear_restarts_keep_firing_for() -> None:
    _, seen = replay(hot(keep_firing_for=2), ticks([95, 50, 85, 50, 50, 50]))
    assert seen[-1].kind == "resolved" and seen[-1].at == 5


def test_a_level_change_while_firing_is_one_transition() -> None:
    alert, seen = replay(hot(), ticks([85, 85, 95, 95, 95]))
    level_changes = [t for t in seen if t.kind == "level"]
    assert len(level_changes) == 1
    change = level_changes[0]
    assert (change.at, change.previous, change.level, change.value, change.notify) == (2, W, C, 95, True)
    assert alert is not None and alert.level is C


def test_a_level_change_while_pending_is_not_notified() -> None:
    alert, seen = replay(hot(pending_for=5), ticks([85, 95]))
    assert [(t.kind, t.previous, t.level, t.notify) for t in seen][-1] == ("level", W, C, False)
    assert alert is not None and alert.level is C and alert.state is State.PENDING


def test_a_steady_firing_alert_reports_nothing() -> None:
    alert, _ = replay(hot(), ticks([95]))
    _, seen = replay(hot(), ticks([96, 97, 98], start=1), alert=alert)
    assert seen == []


def test_a_resolved_alert_records_its_duration_and_values() -> None:
    alert, _ = replay(hot(pending_for=1), ticks([85, 90, 95, 10]))
    assert alert is not None and alert.state is State.RESOLVED
    assert (alert.since, alert.fired_at, alert.resolved_at, alert.duration) == (0, 1, 3, 2)
    assert (alert.min, alert.max, alert.avg, alert.count, alert.last_value) == (85, 95, 90, 3, 10)


def test_going_over_again_after_resolution_starts_a_new_alert() -> None:
    alert, seen = replay(hot(pending_for=1), ticks([95, 95, 10, 85, 85]))
    assert kinds(seen) == [(0, "pending", "critical"), (1, "firing", "critical"), (2, "resolved", "critical"),
                           (3, "pending", "warning"), (4, "firing", "warning")]
    assert alert is not None and (alert.since, alert.fired_at, alert.resolved_at, alert.min, alert.count) == (
        3, 4, None, 85, 2)


def test_a_resolved_alert_stays_resolved_while_the_value_is_fine() -> None:
    alert, _ = replay(hot(), ticks([95, 10]))
    again, seen = replay(hot(), ticks([10, 20], start=2), alert=alert)
    assert again == alert and seen == []


def test_gpu_utilisation_going_from_0_to_100_percent_fires_and_resolves_on_exact_ticks() -> None:
    rule = AlertRule("gpu-busy", "gpu.utilisation", "gpu", ((W, 90.0), (C, 99.0)), pending_for=1.0)
    values: list[float] = [0, 0, 5, 40, 99, 100, 100, 100, 100, 30, 0, 0]
    alert, seen = replay(rule, ticks(values, step=0.5))
    assert kinds(seen) == [(2.0, "pending", "critical"), (3.0, "firing", "critical"), (4.5, "resolved", "critical")]
    assert alert is not None and alert.duration == 1.5 and alert.max == 100 and alert.min == 99


def test_below_rules_fire_when_the_value_falls() -> None:
    rule = AlertRule("free-low", "disk.free_gb", "disk:*", ((W, 10.0), (C, 2.0)), above=False, clear=15.0)
    alert, seen = replay(rule, ticks([20, 9, 1, 12, 16]))
    assert kinds(seen) == [(1, "pending", "warning"), (1, "firing", "warning"), (2, "level", "critical"),
                           (3, "level", "warning"), (4, "resolved", "warning")]


@pytest.mark.parametrize("value, level", [(79.9, None), (80, W), (89.9, W), (90, C), (1e9, C)])
def test_the_level_is_the_most_severe_threshold_crossed(value: float, level: Level | None) -> None:
    assert crossed(hot(), value) is level


@pytest.mark.parametrize("selector, name, type_, selected", [
    ("gpu", "gpu0", "gpu", True),
    ("gpu", "cpu", "cpu", False),
    ("gpu0", "gpu0", "gpu", True),
    ("gpu0", "gpu1", "gpu", False),
    ("disk:*", "disk:/", "disk", True),
    ("disk:*", "disk:/home", "disk", True),
    ("disk:*", "gpu0", "gpu", False),
    ("gpu?", "gpu1", "gpu", True),
    ("gpu?", "gpu10", "gpu", False),
    ("gpu[01]", "gpu1", "gpu", True),
    ("gpu[!01]", "gpu1", "gpu", False),
    ("gpu[!01]", "gpu2", "gpu", True),
    ("a.b", "axb", "custom", False),
    ("disk:(x)", "disk:(x)", "disk", True),
])
def test_a_rule_selects_by_type_name_or_glob(selector: str, name: str, type_: str, selected: bool) -> None:
    rule = AlertRule("r", "m", selector, ((W, 1.0),))
    assert selects(rule, name, type_) is selected


def test_the_default_rules_are_valid_and_named_once() -> None:
    rules = default_rules()
    assert len({r.name for r in rules}) == len(rules)
    by_metric = {r.metric: r for r in rules}
    assert set(by_metric) == {"cpu.utilisation", "memory.utilisation", "disk.utilisation", "gpu.temperature_c",
                              "gpu.memory_utilisation"}
    assert dict(by_metric["gpu.temperature_c"].thresholds) == {W: 83.0, C: 90.0}
    assert dict(by_metric["cpu.utilisation"].thresholds) == {W: 80.0, C: 90.0}
    assert by_metric["cpu.utilisation"].pending_for == 60
    assert all(r.pending_for > 0 and r.keep_firing_for > 0 for r in rules)
    assert selects(by_metric["disk.utilisation"], "disk:/", "disk")


def test_a_rule_is_read_from_a_config_table() -> None:
    rule = rule_from_config({"name": "hot", "metric": "gpu.temperature_c", "selector": "gpu", "warning": 80,
                             "critical": 90.5, "clear": 75, "for": 30, "keep_firing_for": 10.5})
    assert rule == AlertRule("hot", "gpu.temperature_c", "gpu", ((W, 80.0), (C, 90.5)), clear=75.0,
                             pending_for=30.0, keep_firing_for=10.5)


def test_a_below_rule_is_read_from_a_config_table() -> None:
    rule = rule_from_config({"name": "free", "metric": "disk.free_gb", "selector": "disk:*", "below": True,
                             "warning": 10, "error": 5, "critical": 1})
    assert not rule.above and rule.clear_at == 10


BASE: dict[str, object] = {"name": "r", "metric": "cpu.utilisation", "selector": "cpu", "warning": 80}


@pytest.mark.parametrize("changes, key", [
    ({"name": ""}, "name"),
    ({"metric": 3}, "metric"),
    ({"metric": "CPU Load"}, "metric"),
    ({"selector": None}, "selector"),
    ({"warning": None}, "thresholds"),
    ({"warning": "80"}, "warning"),
    ({"warning": True}, "warning"),
    ({"warning": float("nan")}, "warning"),
    ({"critical": 70}, "critical"),
    ({"critical": 80}, "critical"),
    ({"below": True, "critical": 90}, "critical"),
    ({"below": "yes"}, "below"),
    ({"clear": 85}, "clear"),
    ({"for": -1}, "for"),
    ({"for": "30s"}, "for"),
    ({"keep_firing_for": float("inf")}, "keep_firing_for"),
    ({"treshold": 3}, "treshold"),
])
def test_a_bad_config_table_is_refused_naming_the_key(changes: dict[str, object], key: str) -> None:
    table = {k: v for k, v in {**BASE, **changes}.items() if v is not None}
    with pytest.raises(InvalidRequest) as raised:
        rule_from_config(table)
    assert raised.value.data["key"] == key
    assert repr(key) in raised.value.message


def test_a_new_alert_needs_its_resource() -> None:
    with pytest.raises(ValueError):
        evaluate(hot(), None, 95.0, 0.0)


def test_a_value_oscillating_around_the_critical_threshold_does_not_flap_the_level() -> None:
    """The busy host: cpu-busy at 5 s samples for 18 minutes, 89 and 91 % by turns around its critical 90."""
    [rule] = [r for r in default_rules() if r.name == "cpu-busy"]
    trace = ticks([89.0 if i % 2 else 91.0 for i in range(18 * 60 // 5)], step=5.0)

    alert, seen = replay(rule, trace)

    assert [t for t in seen if t.kind == "level"] == []
    assert kinds(seen) == [(0, "pending", "critical"), (60, "firing", "critical")]
    assert alert is not None and alert.state is State.FIRING and alert.level is C


def test_a_level_falls_once_the_value_stays_below_it_for_keep_firing_for() -> None:
    alert, seen = replay(hot(keep_firing_for=3), ticks([95, 85, 85, 85, 85, 85]))

    assert kinds(seen) == [(0, "pending", "critical"), (0, "firing", "critical"), (4, "level", "warning")]
    assert alert is not None and alert.level is W and alert.lower_since is None


def test_a_value_back_at_the_level_restarts_the_count_to_fall() -> None:
    _, seen = replay(hot(keep_firing_for=3), ticks([95, 85, 85, 91, 85, 85, 85, 85]))

    assert [(t.at, t.previous, t.level) for t in seen if t.kind == "level"] == [(7, C, W)]


def test_missing_data_restarts_the_count_to_fall() -> None:
    _, seen = replay(hot(keep_firing_for=2), ticks([95, 85, 85, None, 85, 85, 85]))

    assert [(t.at, t.level) for t in seen if t.kind == "level"] == [(6, W)]


def test_a_level_rises_at_once_while_firing() -> None:
    _, seen = replay(hot(keep_firing_for=30), ticks([85, 85, 95]))

    assert kinds(seen)[-1] == (2, "level", "critical")
