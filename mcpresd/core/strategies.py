"""How to choose among the resources that fit: which GPU, which disk, which pool member.

Rules:
- A strategy only orders; it never changes what fits. A candidate fits when
  `free + EPSILON >= amount`, whatever the strategy.
- Each strategy is a preference key over one candidate; `rank` sorts by it
  and then by `position`, so equal preferences always come out in natural
  order (GPU index, then name).
- Measurements are optional. An unknown (or non-finite) load counts as the
  allocated fraction; unknown free device memory counts as the free share of
  the device's memory label.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from mcpresd.core.model import Resource
from mcpresd.protocol import Strategy

EPSILON = 1e-9


@dataclass(frozen=True)
class Candidate:
    """A resource that might take a request, with what is free of it now."""

    resource: Resource
    free: float
    load: float | None = None
    memory_free: int | None = None
    position: int = 0


class Preference(Protocol):
    """A strategy's key: smaller sorts first."""

    def __call__(self, candidate: Candidate, amount: float, cursor: int) -> tuple[float, ...]: ...


def _fraction(used: float, capacity: float) -> float:
    # A resource of no capacity is never less full than one with some.
    return used / capacity if capacity > 0 else math.inf


def _allocated_fraction(candidate: Candidate) -> float:
    return _fraction(candidate.resource.capacity - candidate.free, candidate.resource.capacity)


def _load(candidate: Candidate) -> float:
    if candidate.load is not None and math.isfinite(candidate.load):
        return candidate.load
    return _allocated_fraction(candidate)


def _memory_free(candidate: Candidate) -> float:
    if candidate.memory_free is not None:
        return float(candidate.memory_free)
    memory = candidate.resource.labels.get("memory")
    if isinstance(memory, int) and not isinstance(memory, bool):
        capacity = candidate.resource.capacity
        return memory * candidate.free / capacity if capacity > 0 else 0.0
    return candidate.free


def first_fit(candidate: Candidate, amount: float, cursor: int) -> tuple[float, ...]:
    return ()


def best_fit(candidate: Candidate, amount: float, cursor: int) -> tuple[float, ...]:
    return (candidate.free - amount,)


def worst_fit(candidate: Candidate, amount: float, cursor: int) -> tuple[float, ...]:
    return (amount - candidate.free,)


def round_robin(candidate: Candidate, amount: float, cursor: int) -> tuple[float, ...]:
    return (candidate.position < cursor,)


def least_loaded(candidate: Candidate, amount: float, cursor: int) -> tuple[float, ...]:
    return (_load(candidate),)


def cost_optimised(candidate: Candidate, amount: float, cursor: int) -> tuple[float, ...]:
    return (candidate.resource.cost_per_unit_hour or 0.0,)


def performance_optimised(candidate: Candidate, amount: float, cursor: int) -> tuple[float, ...]:
    return (-_memory_free(candidate), _load(candidate))


def balanced(candidate: Candidate, amount: float, cursor: int) -> tuple[float, ...]:
    resource = candidate.resource
    return (_fraction(resource.capacity - candidate.free + amount, resource.capacity),)


def locality_aware(candidate: Candidate, amount: float, cursor: int) -> tuple[float, ...]:
    node = candidate.resource.labels.get("numa_node")
    return (float(node) if isinstance(node, int) and not isinstance(node, bool) else math.inf,)


PREFERENCES: dict[Strategy, Preference] = {
    Strategy.FIRST_FIT: first_fit,
    Strategy.BEST_FIT: best_fit,
    Strategy.WORST_FIT: worst_fit,
    Strategy.ROUND_ROBIN: round_robin,
    Strategy.LEAST_LOADED: least_loaded,
    Strategy.COST_OPTIMISED: cost_optimised,
    Strategy.PERFORMANCE_OPTIMISED: performance_optimised,
    Strategy.BALANCED: balanced,
    Strategy.LOCALITY_AWARE: locality_aware,
}


def rank(strategy: Strategy, candidates: Sequence[Candidate], amount: float, cursor: int = 0) -> list[Candidate]:
    """The candidates that can take `amount`, most preferred first; ties go to the lower `position`.

    first-fit: natural order (position).
    best-fit: least free left after the grant first (packs work tightly).
    worst-fit: most free left after the grant first.
    round-robin: natural order rotated so the first candidate with position >= cursor leads, wrapping around.
    least-loaded: lowest measured load first; an unknown load counts as the allocated fraction 1 - free/capacity.
    cost-optimised: lowest cost_per_unit_hour first; no cost counts as 0.
    performance-optimised: most free device memory first (measured, else labels["memory"] * free/capacity,
        else free), then lowest load as in least-loaded.
    balanced: lowest allocated fraction after the grant, (capacity - free + amount)/capacity, first (spreads work).
    locality-aware: grouped by NUMA node (lowest first, unknown last), natural order within; the ledger then
        keeps several devices or pool members on one node or PCI root (constraints.pick_local).
    """
    preference = PREFERENCES[strategy]
    fitting = [c for c in candidates if c.free + EPSILON >= amount]
    return sorted(fitting, key=lambda c: (*preference(c, amount, cursor), c.position))


def next_cursor(chosen_position: int) -> int:
    """Where round-robin starts next time: just after the candidate it chose."""
    return chosen_position + 1
