"""The placement strategies: which of the resources that fit comes first, and why."""

from __future__ import annotations

import pytest

from mcpresd.core.model import Resource
from mcpresd.core.strategies import PREFERENCES, Candidate, next_cursor, rank
from mcpresd.protocol import Strategy
from mcpresd.protocol import ResourceType as T

GIB = 1 << 30


def candidate(
    name: str,
    free: float,
    capacity: float = 1.0,
    position: int = 0,
    *,
    load: float | None = None,
    memory_free: int | None = None,
    cost: float | None = None,
    memory: int | None = None,
) -> Candidate:
    labels = {} if memory is None else {"memory": memory}
    resource = Resource(name, T.CUSTOM, capacity, "units", labels, cost_per_unit_hour=cost)
    return Candidate(resource, free, load=load, memory_free=memory_free, position=position)


def names(ranked: list[Candidate]) -> list[str]:
    return [c.resource.name for c in ranked]


# a: half loaded and dear; b: roomy, busy and free of charge; c: big but nearly full, load unknown;
# d: cannot take the 20 asked by any strategy.
HOST = [
    candidate("a", 30, 100, 0, load=0.5, cost=2.0, memory_free=1000),
    candidate("b", 80, 100, 1, load=0.9),
    candidate("c", 70, 1000, 2, cost=1.0),
    candidate("d", 10, 100, 3, load=0.0, cost=0.0, memory_free=10**9),
]


@pytest.mark.parametrize(("strategy", "expected"), [
    (Strategy.FIRST_FIT, ["a", "b", "c"]),
    (Strategy.BEST_FIT, ["a", "c", "b"]),
    (Strategy.WORST_FIT, ["b", "c", "a"]),
    (Strategy.ROUND_ROBIN, ["c", "a", "b"]),
    (Strategy.LEAST_LOADED, ["a", "b", "c"]),
    (Strategy.COST_OPTIMISED, ["b", "c", "a"]),
    (Strategy.PERFORMANCE_OPTIMISED, ["a", "b", "c"]),
    (Strategy.BALANCED, ["b", "a", "c"]),
    (Strategy.LOCALITY_AWARE, ["a", "b", "c"]),
])
def test_each_strategy_orders_the_candidates_that_fit_by_its_rule(strategy: Strategy, expected: list[str]) -> None:
    assert names(rank(strategy, HOST, 20, cursor=2)) == expected


def test_every_strategy_has_a_rule() -> None:
    assert set(PREFERENCES) == set(Strategy)


def test_strategies_are_spelled_as_on_the_wire() -> None:
    assert [s.value for s in Strategy] == [
        "first-fit", "best-fit", "worst-fit", "round-robin", "least-loaded",
        "cost-optimised", "performance-optimised", "balanced", "locality-aware",
    ]


@pytest.mark.parametrize("strategy", list(Strategy))
@pytest.mark.parametrize(("amount", "expected"), [
    (0.5, ["half", "whole"]),
    (0.1 + 0.2, ["half", "tight", "whole"]),
    (0.6, ["whole"]),
    (1.0, ["whole"]),
    (1.5, []),
])
def test_only_candidates_with_room_for_the_amount_are_ranked(
    strategy: Strategy, amount: float, expected: list[str]
) -> None:
    tight = candidate("tight", 0.3, position=0)
    half = candidate("half", 0.5, position=1)
    whole = candidate("whole", 1.0, position=2)
    ranked = rank(strategy, [whole, tight, half], amount)
    assert sorted(names(ranked)) == expected


def test_a_candidate_whose_room_is_the_amount_up_to_rounding_fits() -> None:
    assert names(rank(Strategy.FIRST_FIT, [candidate("exact", 0.3)], 0.1 + 0.2)) == ["exact"]


@pytest.mark.parametrize("strategy", list(Strategy))
def test_equal_preferences_fall_back_to_natural_order(strategy: Strategy) -> None:
    twins = [candidate(name, 0.5, 1.0, position) for position, name in enumerate("wxyz")]
    assert names(rank(strategy, list(reversed(twins)), 0.25)) == ["w", "x", "y", "z"]


def test_best_fit_prefers_the_tightest_room() -> None:
    shared = candidate("gpu:1", 0.5, position=1)
    idle = candidate("gpu:0", 1.0, position=0)
    assert names(rank(Strategy.BEST_FIT, [idle, shared], 0.5)) == ["gpu:1", "gpu:0"]


def test_worst_fit_prefers_the_most_room() -> None:
    small = candidate("disk:/", 10 * GIB, 100 * GIB, 0)
    large = candidate("disk:/data", 400 * GIB, 1000 * GIB, 1)
    assert names(rank(Strategy.WORST_FIT, [small, large], GIB)) == ["disk:/data", "disk:/"]


@pytest.mark.parametrize(("positions", "cursor", "expected"), [
    ([0, 1, 2], 0, [0, 1, 2]),
    ([0, 1, 2], 1, [1, 2, 0]),
    ([0, 1, 2], 2, [2, 0, 1]),
    ([0, 1, 2], 3, [0, 1, 2]),
    ([0, 2, 3], 1, [2, 3, 0]),
    ([5, 7], 6, [7, 5]),
])
def test_round_robin_starts_at_the_cursor_and_wraps_around(
    positions: list[int], cursor: int, expected: list[int]
) -> None:
    pool = [candidate(f"m{p}", 1.0, position=p) for p in positions]
    assert [c.position for c in rank(Strategy.ROUND_ROBIN, pool, 1.0, cursor)] == expected


def test_round_robin_with_next_cursor_visits_every_member_in_turn() -> None:
    pool = [candidate(f"m{p}", 1.0, position=p) for p in range(3)]
    cursor, visited = 0, []
    for _ in range(4):
        chosen = rank(Strategy.ROUND_ROBIN, pool, 1.0, cursor)[0]
        visited.append(chosen.position)
        cursor = next_cursor(chosen.position)
    assert visited == [0, 1, 2, 0]


def test_next_cursor_is_the_position_after_the_chosen_one() -> None:
    assert next_cursor(3) == 4


@pytest.mark.parametrize(("measured", "expected"), [
    (0.5, ["unknown", "measured"]),
    (0.1, ["measured", "unknown"]),
    (0.25, ["measured", "unknown"]),  # equal: natural order
])
def test_least_loaded_counts_an_unknown_load_as_the_allocated_fraction(measured: float, expected: list[str]) -> None:
    unknown = candidate("unknown", 0.75, position=1)  # 0.25 allocated
    pool = [candidate("measured", 1.0, position=0, load=measured), unknown]
    assert names(rank(Strategy.LEAST_LOADED, pool, 0.1)) == expected


def test_a_load_that_is_not_a_number_counts_as_unknown() -> None:
    half_allocated = candidate("nan", 0.5, position=0, load=float("nan"))
    quarter_loaded = candidate("measured", 1.0, position=1, load=0.25)
    assert names(rank(Strategy.LEAST_LOADED, [half_allocated, quarter_loaded], 0.1)) == ["measured", "nan"]


def test_cost_optimised_prefers_the_cheapest_and_counts_no_cost_as_free() -> None:
    pool = [
        candidate("dear", 1.0, position=0, cost=3.0),
        candidate("cheap", 1.0, position=1, cost=0.5),
        candidate("unpriced", 1.0, position=2),
    ]
    assert names(rank(Strategy.COST_OPTIMISED, pool, 1.0)) == ["unpriced", "cheap", "dear"]


@pytest.mark.parametrize(("pool", "expected"), [
    pytest.param(
        [candidate("small", 1.0, 1.0, 0, memory_free=10 * GIB), candidate("big", 1.0, 1.0, 1, memory_free=70 * GIB)],
        ["big", "small"], id="measured-memory"),
    pytest.param(
        [candidate("h100", 0.25, 1.0, 0, memory=80 * GIB), candidate("a10", 1.0, 1.0, 1, memory=24 * GIB)],
        ["a10", "h100"], id="memory-label-times-free-share"),
    pytest.param(
        [candidate("h100", 0.5, 1.0, 0, memory=80 * GIB), candidate("a10", 1.0, 1.0, 1, memory=24 * GIB)],
        ["h100", "a10"], id="memory-label-bigger-share-wins"),
    pytest.param(
        [candidate("labelled", 1.0, 1.0, 0, memory=GIB), candidate("measured", 1.0, 1.0, 1, memory_free=2 * GIB)],
        ["measured", "labelled"], id="measured-and-labelled-compare-in-bytes"),
    pytest.param(
        [candidate("x", 2.0, 4.0, 0), candidate("y", 3.0, 4.0, 1)],
        ["y", "x"], id="no-memory-known-uses-free"),
    pytest.param(
        [candidate("busy", 1.0, 1.0, 0, memory_free=GIB, load=0.9),
         candidate("calm", 1.0, 1.0, 1, memory_free=GIB, load=0.1)],
        ["calm", "busy"], id="equal-memory-then-lowest-load"),
])
def test_performance_optimised_prefers_the_most_free_device_memory(pool: list[Candidate], expected: list[str]) -> None:
    assert names(rank(Strategy.PERFORMANCE_OPTIMISED, pool, 0.25)) == expected


def test_balanced_prefers_the_least_filled_after_the_grant() -> None:
    # worst-fit would pick the big pool (most free); balanced picks the one left emptiest in proportion.
    big_and_full = candidate("big", 50.0, 1000.0, 0)
    small_and_idle = candidate("small", 20.0, 20.0, 1)
    assert names(rank(Strategy.BALANCED, [big_and_full, small_and_idle], 10.0)) == ["small", "big"]
    assert names(rank(Strategy.WORST_FIT, [big_and_full, small_and_idle], 10.0)) == ["big", "small"]


def test_a_resource_of_no_capacity_sorts_last_rather_than_dividing_by_zero() -> None:
    empty = candidate("empty", 0.0, 0.0, 0)
    idle = candidate("idle", 1.0, 1.0, 1)
    assert names(rank(Strategy.BALANCED, [empty, idle], 0.0)) == ["idle", "empty"]
    assert names(rank(Strategy.LEAST_LOADED, [empty, idle], 0.0)) == ["idle", "empty"]


def test_locality_aware_groups_by_numa_node_with_unknown_nodes_last() -> None:
    def on(name: str, node: int | None, position: int) -> Candidate:
        labels = {} if node is None else {"numa_node": node}
        return Candidate(Resource(name, T.GPU, 1.0, "devices", labels), 1.0, position=position)

    pool = [on("x", None, 0), on("y", 1, 1), on("z", 0, 2), on("w", 1, 3)]
    assert names(rank(Strategy.LOCALITY_AWARE, pool, 1.0)) == ["z", "y", "w", "x"]


def test_every_strategy_an_allocate_takes_is_documented() -> None:
    from tests.conftest import ROOT

    api_row = next(line for line in (ROOT / "docs" / "api.md").read_text().splitlines()
                   if line.startswith("| `strategy` | string | the config's `default_strategy`"))
    choosing = (ROOT / "docs" / "scheduling.md").read_text().split("## Choosing resources", 1)[1].split("\n## ")[0]
    config = (ROOT / "config" / "mcpresd.toml").read_text().split("default_strategy =", 1)[0].rsplit("[scheduler]")[1]
    for strategy in Strategy:
        assert f"`{strategy.value}`" in api_row, strategy
        assert f"`{strategy.value}`" in choosing, strategy
        assert strategy.value in config, strategy
