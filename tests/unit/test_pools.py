"""Pools: validation, the scaling rules, the factory circuit breaker, members, and choosing among pools."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from typing import Any

import pytest

from mcpresd.core.errors import InvalidRequest, UnknownPool
from mcpresd.core.model import Resource
from mcpresd.core.pools import (
    Pool,
    PoolChoice,
    PoolLoad,
    PoolSpec,
    ScaleDecision,
    ScalePolicy,
    decide_scale,
    factory_failed,
    factory_paused,
    factory_succeeded,
    match_pools,
    member_name,
    parse_member,
    rank_pools,
    settle_state,
    slot_member,
    utilisation,
)
from mcpresd.protocol import FactoryKind, Objective, PoolState, ResourceType, Strategy

COMMAND = PoolSpec("build", FactoryKind.COMMAND, min_size=0, max_size=20, create="make-runner")
SLOTS = PoolSpec("gpu-half", FactoryKind.SLOTS, max_size=4, parent="gpu", slot_size=0.5)
STATIC = PoolSpec("fast", FactoryKind.STATIC, members=("gpu:0", "gpu:1"))


def load(size: int, busy: int, queued: int = 0, idle: int | None = None) -> PoolLoad:
    """`idle` members (default: all not busy), listed newest first as the caller does."""
    count = size - busy if idle is None else idle
    return PoolLoad(size, busy, queued, tuple(member_name("build", i) for i in reversed(range(size)))[:count])


def pool(spec: PoolSpec = COMMAND, **changes: Any) -> Pool:
    return Pool(spec, **changes)


# -- validation ---------------------------------------------------------------

@pytest.mark.parametrize(("spec", "one_step_off", "field"), [
    (COMMAND, {"create": None}, "create"),
    (COMMAND, {"max_size": 0}, "max"),
    (SLOTS, {"parent": None}, "parent"),
    (STATIC, {"members": ()}, "members"),
    (PoolSpec("a100", FactoryKind.STATIC, select=("type=gpu", "name~A100")), {"select": ("type=",)}, "select"),
    (replace(SLOTS, name="cpu-pairs", parent="cpu", slot_size=2.0), {"parent": "gpu"}, "slot_size"),
    (replace(SLOTS, parent="gpu:0", slot_size=1.0), {"slot_size": 1.0 + 1e-9}, "slot_size"),
])
def test_well_formed_specs_validate_and_one_change_off_names_that_field(
        spec: PoolSpec, one_step_off: dict[str, Any], field: str) -> None:
    spec.validate()

    with pytest.raises(InvalidRequest) as raised:
        replace(spec, **one_step_off).validate()
    assert raised.value.data["field"] == field


@pytest.mark.parametrize(("spec", "changes", "field"), [
    (COMMAND, {"name": ""}, "name"),
    (COMMAND, {"name": "x" * 101}, "name"),
    (COMMAND, {"name": "my pool"}, "name"),
    (COMMAND, {"name": "a,b"}, "name"),
    (COMMAND, {"name": "build-*"}, "name"),
    (COMMAND, {"name": "what?"}, "name"),
    (COMMAND, {"name": "gpu:0"}, "name"),
    (COMMAND, {"name": "a/b"}, "name"),
    (COMMAND, {"name": "cost<1"}, "name"),
    (COMMAND, {"min_size": -1}, "min"),
    (COMMAND, {"min_size": 5, "max_size": 4}, "max"),
    (COMMAND, {"max_size": None}, "max"),
    (COMMAND, {"max_size": 0}, "max"),
    (SLOTS, {"max_size": None}, "max"),
    (STATIC, {"members": ()}, "members"),
    (STATIC, {"members": ("",)}, "members"),
    (STATIC, {"parent": "gpu"}, "parent"),
    (STATIC, {"slot_size": 0.5}, "slot_size"),
    (STATIC, {"create": "make"}, "create"),
    (STATIC, {"members": (), "select": ("memory>=",)}, "select"),
    (SLOTS, {"parent": None}, "parent"),
    (SLOTS, {"slot_size": None}, "slot_size"),
    (SLOTS, {"slot_size": 0.0}, "slot_size"),
    (SLOTS, {"slot_size": math.inf}, "slot_size"),
    (SLOTS, {"slot_size": 2.0}, "slot_size"),
    (SLOTS, {"parent": "gpu:3", "slot_size": 1.5}, "slot_size"),
    (SLOTS, {"create": "make"}, "create"),
    (COMMAND, {"create": None}, "create"),
    (COMMAND, {"create": "  "}, "create"),
    (COMMAND, {"members": ("gpu:0",)}, "members"),
    (COMMAND, {"timeout_s": 0.0}, "timeout"),
    (COMMAND, {"timeout_s": 3601.0}, "timeout"),
    (COMMAND, {"timeout_s": math.nan}, "timeout"),
    (COMMAND, {"cost_per_unit_hour": -0.1}, "cost_per_unit_hour"),
    (COMMAND, {"cost_per_unit_hour": math.inf}, "cost_per_unit_hour"),
    (COMMAND, {"labels": {"team": math.nan}}, "labels"),
    (COMMAND, {"labels": {"team": ["a"]}}, "labels"),
    (COMMAND, {"scale": ScalePolicy(up_at=1.1)}, "scale_up_at"),
    (COMMAND, {"scale": ScalePolicy(up_at=0.7, target=0.7)}, "target"),
    (COMMAND, {"scale": ScalePolicy(down_at=0.7, target=0.7)}, "scale_down_at"),
    (COMMAND, {"scale": ScalePolicy(down_at=-0.1)}, "scale_down_at"),
    (COMMAND, {"scale": ScalePolicy(target=math.nan)}, "target"),
    (COMMAND, {"scale": ScalePolicy(cooldown_s=-1.0)}, "cooldown"),
    (COMMAND, {"scale": ScalePolicy(cooldown_s=math.inf)}, "cooldown"),
    (COMMAND, {"scale": ScalePolicy(failure_limit=0)}, "scale.failure_limit"),
    (COMMAND, {"scale": ScalePolicy(pause_s=-1.0)}, "scale.pause_s"),
])
def test_validate_names_the_bad_field(spec: PoolSpec, changes: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidRequest) as raised:
        replace(spec, **changes).validate()
    assert raised.value.data["field"] == field
    assert field in raised.value.message


# -- scaling ------------------------------------------------------------------

def test_utilisation_is_demand_over_serving_members() -> None:
    assert utilisation(load(10, 6, queued=3)) == pytest.approx(0.9)
    assert utilisation(load(0, 0, queued=1)) == math.inf
    assert utilisation(load(0, 0)) == 0.0


@pytest.mark.parametrize(("case", "subject", "now_load", "add", "removed"), [
    ("static pools never scale", pool(STATIC), load(0, 5), 0, 0),
    ("draining pools never scale", pool(state=PoolState.DRAINING), load(10, 10), 0, 0),
    ("drained pools never scale", pool(state=PoolState.DRAINED), load(0, 0, queued=3), 0, 0),
    ("exactly at up_at does not scale up", pool(), load(10, 8), 0, 0),
    ("just above up_at scales up", pool(replace(COMMAND, max_size=200)), load(100, 81), 16, 0),
    ("queued demand counts toward scaling up", pool(), load(10, 6, queued=3), 3, 0),
    ("demand 7 at target 0.7 wants 10", pool(), load(8, 7), 2, 0),
    ("demand 21 at target 0.7 wants 30, not 31 (21 / 0.7 is 30.000000000000004)",
     pool(replace(COMMAND, max_size=100)), load(24, 21), 6, 0),
    ("an empty pool with demand grows", pool(), load(0, 0, queued=2), 3, 0),
    ("growth stops at max_size", pool(), load(18, 18), 2, 0),
    ("a full pool at max_size stays", pool(), load(20, 20), 0, 0),
    ("exactly at down_at does not scale down", pool(), load(10, 3), 0, 0),
    ("below down_at shrinks toward target", pool(), load(10, 2), 0, 7),
    ("shrinking stops at min_size", pool(replace(COMMAND, min_size=5)), load(10, 2), 0, 5),
    ("shrinking removes only idle members", pool(), load(10, 2, idle=3), 0, 3),
    ("an idle empty pool stays empty", pool(), load(0, 0), 0, 0),
    ("cooldown blocks scaling up", pool(last_scaled_at=950.0), load(10, 10), 0, 0),
    ("cooldown blocks scaling down", pool(last_scaled_at=950.0), load(10, 0), 0, 0),
    ("after the cooldown it scales", pool(last_scaled_at=940.0), load(10, 10), 5, 0),
    ("below min adds up to it despite the cooldown", pool(replace(COMMAND, min_size=4), last_scaled_at=999.0),
     load(1, 0), 3, 0),
    ("above max removes idle down to it despite the cooldown", pool(last_scaled_at=999.0), load(23, 1), 0, 3),
    ("above max removes no busy member", pool(), load(23, 22), 0, 1),
])
def test_scaling_rules(case: str, subject: Pool, now_load: PoolLoad, add: int, removed: int) -> None:
    decision = decide_scale(subject, now_load, now=1000.0)
    assert (decision.add, len(decision.remove)) == (add, removed)
    assert decision.changed == bool(add or removed)
    assert set(decision.remove) <= set(now_load.idle)
    low, high = subject.spec.min_size, subject.spec.max_size or 0
    if low <= now_load.size <= high:
        assert low <= now_load.size + decision.add - len(decision.remove) <= high


def test_scaling_down_removes_the_newest_idle_members_first() -> None:
    decision = decide_scale(pool(), load(5, 0), now=0.0)
    assert decision.remove == ("build/4", "build/3", "build/2", "build/1", "build/0")
    decision = decide_scale(pool(replace(COMMAND, min_size=2)), load(5, 0), now=0.0)
    assert decision.remove == ("build/4", "build/3", "build/2")


def test_pools_that_cannot_scale_return_no_decision() -> None:
    assert decide_scale(pool(STATIC), load(0, 5), now=0.0) == ScaleDecision()


@pytest.mark.parametrize(("subject", "now_load", "reason"), [
    (pool(), load(10, 9), "utilisation 90% (9 busy, 0 queued of 10) above 80%: 10 -> 13 members to aim at 70%"),
    (pool(), load(10, 2), "utilisation 20% (2 busy, 0 queued of 10) below 30%: 10 -> 3 members"),
    (pool(replace(COMMAND, min_size=3)), load(1, 1), "below the minimum of 3"),
    (pool(), load(21, 0), "above the maximum of 20"),
])
def test_a_decision_says_why(subject: Pool, now_load: PoolLoad, reason: str) -> None:
    assert decide_scale(subject, now_load, now=0.0).reason == reason


def test_makes_members_only_for_slots_and_command_pools() -> None:
    assert (pool(COMMAND).makes_members, pool(SLOTS).makes_members, pool(STATIC).makes_members) == (True, True, False)
    assert pool(COMMAND).name == "build"


# -- the factory circuit breaker and draining -----------------------------------

def test_factory_failures_open_the_circuit_at_the_limit() -> None:
    subject = pool(replace(COMMAND, scale=ScalePolicy(failure_limit=3, pause_s=300.0)))
    for now in (10.0, 20.0):
        subject = factory_failed(subject, now)
        assert not factory_paused(subject, now)
    subject = factory_failed(subject, 30.0)
    assert (subject.failures, subject.paused_until) == (3, 330.0)
    assert factory_paused(subject, 30.0) and factory_paused(subject, 329.9)
    assert not factory_paused(subject, 330.0)


def test_one_more_failure_after_the_pause_reopens_the_circuit_and_a_success_closes_it() -> None:
    subject = pool(replace(COMMAND, scale=ScalePolicy(failure_limit=2, pause_s=60.0)), failures=2, paused_until=100.0)
    reopened = factory_failed(subject, 200.0)
    assert (reopened.failures, reopened.paused_until) == (3, 260.0)
    closed = factory_succeeded(reopened)
    assert (closed.failures, closed.paused_until) == (0, None)
    assert not factory_paused(closed, 200.0)


@pytest.mark.parametrize(("state", "busy", "expected"), [
    (PoolState.DRAINING, 0, PoolState.DRAINED),
    (PoolState.DRAINING, 1, PoolState.DRAINING),
    (PoolState.ACTIVE, 0, PoolState.ACTIVE),
    (PoolState.DRAINED, 0, PoolState.DRAINED),
])
def test_a_draining_pool_is_drained_once_no_member_is_busy(state: PoolState, busy: int, expected: PoolState) -> None:
    assert settle_state(pool(state=state), busy).state is expected


# -- members ------------------------------------------------------------------

@pytest.mark.parametrize(("stdout", "name", "capacity", "unit", "labels"), [
    ('{}', "build/7", 1.0, "slot", {}),
    ('starting runner\n\n{"name": "r-abc", "capacity": 4, "unit": "cores", "labels": {"zone": "a", "n": 1}}\n  \n',
     "build/r-abc", 4.0, "cores", {"zone": "a", "n": 1}),
    ('{"capacity": 0.5, "labels": {"spot": true, "x": null}, "id": "i-123"}', "build/7", 0.5, "slot",
     {"spot": True, "x": None}),
])
def test_parse_member_reads_the_last_line_as_json(
    stdout: str, name: str, capacity: float, unit: str, labels: dict[str, Any]
) -> None:
    member = parse_member(stdout, COMMAND, 7)
    assert (member.name, member.capacity, member.unit, dict(member.labels)) == (name, capacity, unit, labels)
    assert member.handle == json.loads(stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("stdout", [
    "", "  \n\n", "not json", '{"name": "a"}\nnot json', "[1, 2]", '"r-1"',
    '{"name": ""}', '{"name": "a b"}', '{"name": "a/b"}', '{"name": "a,b"}', '{"name": 5}',
    '{"name": "' + "x" * 101 + '"}',
    '{"capacity": 0}', '{"capacity": -1}', '{"capacity": "4"}', '{"capacity": true}', '{"capacity": NaN}',
    '{"capacity": Infinity}', '{"unit": 3}', '{"unit": ""}', '{"labels": [1]}', '{"labels": {"a": {"b": 1}}}',
    '{"labels": {"a": [1]}}', '{"id": NaN}', '{"id": -Infinity}',
])
def test_parse_member_refuses_malformed_output(stdout: str) -> None:
    with pytest.raises(InvalidRequest):
        parse_member(stdout, COMMAND, 0)


def test_parse_member_quotes_at_most_200_characters_of_bad_output() -> None:
    with pytest.raises(InvalidRequest) as raised:
        parse_member("y" * 5000, COMMAND, 0)
    assert "y" * 200 in raised.value.message and "y" * 201 not in raised.value.message


GPU0 = Resource("gpu:0", ResourceType.GPU, 1.0, "device",
                {"name": "H100", "numa_node": 1, "pci_bus_id": "0000:17:00.0"}, cost_per_unit_hour=4.0,
                source="discovered")
CPU = Resource("cpu", ResourceType.CPU, 32.0, "cores")


def test_a_slot_member_stands_for_part_of_its_parent() -> None:
    member = slot_member(replace(SLOTS, labels={"team": "ml"}), 3, GPU0)
    assert (member.name, member.type, member.capacity, member.unit, member.source) == (
        "gpu-half/3", ResourceType.CUSTOM, 1.0, "slot", "pool")
    assert dict(member.labels) == {"team": "ml", "pool": "gpu-half", "parent": "gpu:0", "slot_size": 0.5,
                                   "kind": "gpu", "numa_node": 1, "pci_bus_id": "0000:17:00.0"}


@pytest.mark.parametrize(("cost", "parent", "expected"), [
    (None, GPU0, 2.0),
    (1.5, GPU0, 1.5),
    (None, CPU, None),
    (0.0, GPU0, 0.0),
])
def test_a_slot_costs_its_pools_price_else_its_share_of_the_parents(
    cost: float | None, parent: Resource, expected: float | None
) -> None:
    assert slot_member(replace(SLOTS, cost_per_unit_hour=cost), 0, parent).cost_per_unit_hour == expected


def test_a_slot_member_has_only_the_locality_labels_its_parent_has() -> None:
    member = slot_member(replace(SLOTS, name="cpu-pairs", parent="cpu", slot_size=2.0), 0, CPU)
    assert "numa_node" not in member.labels and member.labels["kind"] == "cpu"


# -- choosing pools -------------------------------------------------------------

POOLS = [
    pool(replace(COMMAND, name="build-small", cost_per_unit_hour=0.5, labels={"team": "ci"})),
    pool(replace(COMMAND, name="build-large", cost_per_unit_hour=2.0, strategy=Strategy.BEST_FIT)),
    pool(SLOTS, state=PoolState.DRAINING),
    pool(replace(SLOTS, name="cpu-pairs", parent="cpu", slot_size=2.0)),
    pool(STATIC),
    pool(replace(SLOTS, name="gpu1-quarters", parent="gpu:1", slot_size=0.25)),
]


def names(pools: list[Pool]) -> list[str]:
    return [p.name for p in pools]


@pytest.mark.parametrize(("patterns", "expected"), [
    (["fast"], ["fast"]),
    (["build-*"], ["build-small", "build-large"]),
    (["fast", "build-*", "build-small"], ["fast", "build-small", "build-large"]),
    (["*-pairs", "gpu-?alf"], ["cpu-pairs", "gpu-half"]),
    (["BUILD-*", "fast"], None),
    (["cost<1"], ["build-small"]),
    (["cost>=0.5"], ["build-small", "build-large"]),
    (["factory=slots"], ["gpu-half", "cpu-pairs", "gpu1-quarters"]),
    (["kind=gpu"], ["gpu-half", "gpu1-quarters"]),
    (["kind=cpu"], ["cpu-pairs"]),
    (["kind!=gpu"], ["build-small", "build-large", "cpu-pairs", "fast"]),
    (["state=draining"], ["gpu-half"]),
    (["strategy=best-fit"], ["build-large"]),
    (["team=ci"], ["build-small"]),
    (["name~^build"], ["build-small", "build-large"]),
    (["name!~build"], ["gpu-half", "cpu-pairs", "fast", "gpu1-quarters"]),
    ([], []),
])
def test_match_pools_by_name_glob_or_selector(patterns: list[str], expected: list[str] | None) -> None:
    if expected is None:
        with pytest.raises(UnknownPool):
            match_pools(POOLS, patterns)
    else:
        assert names(match_pools(POOLS, patterns)) == expected


@pytest.mark.parametrize("pattern", ["nope", "nope-*", "cost>100", "team=web"])
def test_a_pattern_that_matches_no_pool_is_an_unknown_pool(pattern: str) -> None:
    with pytest.raises(UnknownPool) as raised:
        match_pools(POOLS, ["fast", pattern])
    assert pattern in raised.value.message


@pytest.mark.parametrize("pools", [POOLS, []])
def test_a_malformed_selector_is_an_invalid_request(pools: list[Pool]) -> None:
    with pytest.raises(InvalidRequest):
        match_pools(pools, ["cost<"])


# a: dear, half used, loaded; b: free of charge, nearly full, queue; c: cheap, empty, load unknown.
CHOICES = [
    PoolChoice("a", cost=2.0, utilisation=0.5, load=0.9, queued=0, idle=2, position=0),
    PoolChoice("b", cost=None, utilisation=1.4, load=0.2, queued=3, idle=0, position=1),
    PoolChoice("c", cost=0.5, utilisation=0.0, load=None, queued=0, idle=5, position=2),
]


@pytest.mark.parametrize(("objective", "expected"), [
    (Objective.COST, ["b", "c", "a"]),
    (Objective.PERFORMANCE, ["c", "b", "a"]),
    (Objective.LATENCY, ["c", "a", "b"]),
    (Objective.UTILISATION, ["b", "a", "c"]),
    (Objective.BALANCED, ["c", "a", "b"]),
])
def test_rank_pools_orders_every_choice_by_the_objective(objective: Objective, expected: list[str]) -> None:
    assert [c.name for c in rank_pools(objective, CHOICES)] == expected


@pytest.mark.parametrize("objective", list(Objective))
def test_equal_choices_keep_request_order(objective: Objective) -> None:
    twins = [PoolChoice(n, 1.0, 0.5, 0.5, 1, 1, position=i) for i, n in enumerate("xyz")]
    assert [c.name for c in rank_pools(objective, list(reversed(twins)))] == ["x", "y", "z"]


def test_utilisation_over_one_ranks_as_full() -> None:
    over = [PoolChoice("over", None, 3.0, None, 0, 0, 0), PoolChoice("full", None, 1.0, None, 0, 0, 1)]
    assert [c.name for c in rank_pools(Objective.BALANCED, over)] == ["over", "full"]
