"""A health score of 0..100 per resource, and the gate that keeps unhealthy resources out of grants.

Rules (each deduction is named in the reasons; the score never goes below 0):
- Firing alerts: warning -10, error -25, critical -40 each; info costs nothing.
- Sampler errors: -20 if any read of the resource failed in the window.
- Foreign use: -15 if a GPU is used by processes that hold no allocation on it.
- Throttling: -10 if the device slowed itself down (thermal, power) in the window.
- Sustained saturation: -10 if utilisation was >= 95 % for every sample of the window.
- Gate with hysteresis: a resource that was refused is granted again only once
  its score is back at threshold + recover_margin, so it does not flap.
"""

from __future__ import annotations

from dataclasses import dataclass

from mcpresd.core.alerts import Level

ALERT_COST = {Level.INFO: 0, Level.WARNING: 10, Level.ERROR: 25, Level.CRITICAL: 40}
SAMPLER_ERROR_COST = 20
FOREIGN_USE_COST = 15
THROTTLING_COST = 10
SATURATION_COST = 10
SATURATED_AT = 95.0


@dataclass(frozen=True)
class HealthInput:
    """What was seen of one resource over the window."""

    resource: str
    firing: tuple[Level, ...] = ()
    """The level of each firing alert on the resource."""
    sampler_errors: int = 0
    foreign_use: bool = False
    throttled: bool = False
    utilisation: tuple[float, ...] = ()
    """Utilisation samples (percent) over the window, oldest first."""


@dataclass(frozen=True)
class Deduction:
    points: int
    reason: str


@dataclass(frozen=True)
class Health:
    resource: str
    score: int
    reasons: tuple[str, ...]


def firing_alerts(h: HealthInput) -> list[Deduction]:
    return [Deduction(ALERT_COST[level], f"{level.value} alert firing (-{ALERT_COST[level]})")
            for level in h.firing if ALERT_COST[level]]


def sampler_errors(h: HealthInput) -> list[Deduction]:
    if h.sampler_errors <= 0:
        return []
    return [Deduction(SAMPLER_ERROR_COST, f"{h.sampler_errors} failed read(s) (-{SAMPLER_ERROR_COST})")]


def foreign_use(h: HealthInput) -> list[Deduction]:
    return [Deduction(FOREIGN_USE_COST, f"used outside the broker (-{FOREIGN_USE_COST})")] if h.foreign_use else []


def throttling(h: HealthInput) -> list[Deduction]:
    return [Deduction(THROTTLING_COST, f"throttled (-{THROTTLING_COST})")] if h.throttled else []


def saturated(utilisation: tuple[float, ...]) -> bool:
    """At or above 95 % for the whole window (an empty window is not saturated)."""
    return bool(utilisation) and all(u >= SATURATED_AT for u in utilisation)


def saturation(h: HealthInput) -> list[Deduction]:
    if not saturated(h.utilisation):
        return []
    return [Deduction(SATURATION_COST, f"saturated (>= {SATURATED_AT:g} % all window) (-{SATURATION_COST})")]


FACTORS = (firing_alerts, sampler_errors, foreign_use, throttling, saturation)


def score(h: HealthInput) -> Health:
    deductions = [d for factor in FACTORS for d in factor(h)]
    return Health(h.resource, max(0, 100 - sum(d.points for d in deductions)), tuple(d.reason for d in deductions))


def gate(previous_ok: bool, score: int, threshold: int, recover_margin: int = 5) -> bool:
    """Whether the resource may be granted now, given whether it could be before."""
    return score >= (threshold if previous_ok else threshold + recover_margin)
