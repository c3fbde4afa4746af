"""Health scores and the grant gate, from facts given as values."""

from __future__ import annotations

import pytest

from mcpresd.core.alerts import Level
from mcpresd.core.health import HealthInput, gate, saturated, score

W, E, C, I = Level.WARNING, Level.ERROR, Level.CRITICAL, Level.INFO


def test_a_resource_with_nothing_wrong_scores_100() -> None:
    health = score(HealthInput("gpu0", utilisation=(50.0, 99.0)))
    assert (health.resource, health.score, health.reasons) == ("gpu0", 100, ())


@pytest.mark.parametrize("facts, expected", [
    (HealthInput("r", firing=(W,)), 90),
    (HealthInput("r", firing=(E,)), 75),
    (HealthInput("r", firing=(C,)), 60),
    (HealthInput("r", firing=(I,)), 100),
    (HealthInput("r", firing=(W, W, E)), 55),
    (HealthInput("r", sampler_errors=1), 80),
    (HealthInput("r", sampler_errors=7), 80),
    (HealthInput("r", foreign_use=True), 85),
    (HealthInput("r", throttled=True), 90),
    (HealthInput("r", utilisation=(95.0, 99.0, 100.0)), 90),
    (HealthInput("r", firing=(C,), sampler_errors=2, foreign_use=True, throttled=True,
                 utilisation=(100.0,)), 100 - 40 - 20 - 15 - 10 - 10),
])
def test_each_fact_deducts_its_documented_points(facts: HealthInput, expected: int) -> None:
    assert score(facts).score == expected


def test_the_score_never_goes_below_zero() -> None:
    assert score(HealthInput("r", firing=(C, C, C), sampler_errors=1)).score == 0


def test_every_deduction_is_named_in_the_reasons() -> None:
    reasons = score(HealthInput("r", firing=(W, C), sampler_errors=3, foreign_use=True, throttled=True,
                                utilisation=(97.0,))).reasons
    assert len(reasons) == 6
    assert reasons[0].startswith("warning alert") and "-10" in reasons[0]
    assert reasons[1].startswith("critical alert") and "-40" in reasons[1]
    assert "3 failed" in reasons[2]
    assert "outside the broker" in reasons[3] and "throttled" in reasons[4] and "saturated" in reasons[5]


@pytest.mark.parametrize("window, expected", [((), False), ((95.0,), True), ((100.0, 94.9, 100.0), False),
                                              ((95.0, 95.0), True)])
def test_saturation_means_at_least_95_percent_for_the_whole_window(window: tuple[float, ...],
                                                                   expected: bool) -> None:
    assert saturated(window) is expected


@pytest.mark.parametrize("previous_ok, value, expected", [
    (True, 70, True), (True, 69, False),
    (False, 70, False), (False, 74, False), (False, 75, True),
])
def test_a_refused_resource_is_granted_again_only_above_threshold_plus_margin(previous_ok: bool, value: int,
                                                                              expected: bool) -> None:
    assert gate(previous_ok, value, threshold=70) is expected


def test_the_gate_does_not_flap_around_its_threshold() -> None:
    ok = True
    seen = []
    for value in (71, 69, 71, 72, 74, 75, 71):
        ok = gate(ok, value, threshold=70, recover_margin=5)
        seen.append(ok)
    assert seen == [True, False, False, False, False, True, True]
