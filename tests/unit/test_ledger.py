"""The ledger's fitting rules: all or nothing, never over-committed, GPUs whole or shared."""

from __future__ import annotations

import pytest

from mcpresd.core.errors import InsufficientCapacity, InvalidRequest, NeverFits, ResourceInUse, UnknownResource
from mcpresd.core.ledger import Ledger
from mcpresd.core.model import AllocationItem, Demand, Resource
from mcpresd.protocol import ResourceType as T


def gpu(index: int) -> Resource:
    return Resource(f"gpu:{index}", T.GPU, 1.0, "device", {"index": index}, uuid=f"GPU-{index}")


def host(gpus: int = 2) -> Ledger:
    return Ledger([
        Resource("cpu", T.CPU, 4, "cores"),
        Resource("memory", T.MEMORY, 16 << 30, "bytes"),
        Resource("licence", T.CUSTOM, 2, "seats"),
        *(gpu(i) for i in range(gpus)),
    ])


def grant(ledger: Ledger, *demands: tuple[str, float]) -> tuple[AllocationItem, ...]:
    items = ledger.plan([Demand(s, a) for s, a in demands])
    ledger.hold(items)
    return items


def test_a_request_for_several_resources_is_granted_whole() -> None:
    ledger = host()
    items = grant(ledger, ("cpu", 2), ("memory", 8 << 30), ("gpu", 1), ("licence", 1))
    assert [i.resource for i in items] == sorted(i.resource for i in items)
    assert {i.resource: i.amount for i in items} == {"cpu": 2, "memory": 8 << 30, "gpu:0": 1, "licence": 1}
    assert ledger.free("cpu") == 2 and ledger.free("licence") == 1


def test_a_request_that_does_not_fit_changes_nothing() -> None:
    ledger = host()
    grant(ledger, ("licence", 2))
    with pytest.raises(InsufficientCapacity) as raised:
        ledger.plan([Demand("cpu", 1), Demand("licence", 1)])
    assert raised.value.data["shortfalls"] == [{"resource": "licence", "requested": 1, "free": 0.0, "capacity": 2}]
    assert ledger.used("cpu") == 0


@pytest.mark.parametrize("amounts, fits", [
    ((1.5, 2.5), True),
    ((2.5, 1.6), False),
    ((0.1,) * 40, True),
    ((0.1,) * 41, False),
])
def test_fractional_cpu_never_exceeds_capacity(amounts: tuple[float, ...], fits: bool) -> None:
    ledger = host()
    outcomes = []
    for amount in amounts:
        try:
            grant(ledger, ("cpu", amount))
            outcomes.append(True)
        except InsufficientCapacity:
            outcomes.append(False)
    assert all(outcomes) is fits
    assert ledger.used("cpu") <= 4 + 1e-9


def test_two_half_gpu_requests_share_one_device() -> None:
    ledger = host()
    first = grant(ledger, ("gpu", 0.5))
    second = grant(ledger, ("gpu", 0.5))
    assert first[0].resource == second[0].resource == "gpu:0"
    assert ledger.free("gpu:1") == 1


def test_whole_gpus_are_distinct_idle_devices() -> None:
    ledger = host(gpus=3)
    grant(ledger, ("gpu", 0.25))
    items = grant(ledger, ("gpu", 2))
    assert sorted(i.resource for i in items) == ["gpu:1", "gpu:2"]
    with pytest.raises(InsufficientCapacity):
        ledger.plan([Demand("gpu", 1)])


@pytest.mark.parametrize("amount", [1.5, 2.25])
def test_a_gpu_request_is_whole_devices_or_a_fraction_below_one(amount: float) -> None:
    with pytest.raises(InvalidRequest):
        host().plan([Demand("gpu", amount)])


def test_more_gpus_than_the_host_has_never_fits() -> None:
    with pytest.raises(NeverFits):
        host(gpus=2).plan([Demand("gpu", 3)])


def test_more_than_a_resource_s_capacity_never_fits() -> None:
    with pytest.raises(NeverFits):
        host().plan([Demand("licence", 3)])


def test_a_gpu_uuid_is_accepted_wherever_its_name_is() -> None:
    ledger = host()
    assert grant(ledger, ("GPU-1", 1)) == (AllocationItem("gpu:1", 1.0),)


def test_one_device_by_name_takes_at_most_one() -> None:
    with pytest.raises(InvalidRequest):
        host().plan([Demand("gpu:0", 2)])


@pytest.mark.parametrize("selector", ["nope", "disk", "gpu:9"])
def test_unknown_resources_are_named_in_the_error(selector: str) -> None:
    with pytest.raises(UnknownResource) as raised:
        host().plan([Demand(selector, 1)])
    assert raised.value.data["resource"] == selector


def test_demands_on_one_resource_add_up() -> None:
    ledger = host()
    with pytest.raises(InsufficientCapacity):
        ledger.plan([Demand("licence", 1), Demand("licence", 1.5)])
    assert grant(ledger, ("licence", 1), ("licence", 1)) == (AllocationItem("licence", 2.0),)


def test_release_returns_capacity_exactly() -> None:
    ledger = host()
    held = [grant(ledger, ("cpu", 0.1)) for _ in range(10)]
    for items in held:
        ledger.unhold(items)
    assert ledger.used("cpu") == 0.0
    assert grant(ledger, ("gpu", 2))


def test_an_allocated_resource_cannot_be_removed() -> None:
    ledger = host()
    items = grant(ledger, ("licence", 1))
    with pytest.raises(ResourceInUse):
        ledger.remove("licence")
    ledger.unhold(items)
    assert ledger.remove("licence").name == "licence"
    assert "licence" not in ledger


def test_capacity_may_not_shrink_below_what_is_held() -> None:
    ledger = host()
    grant(ledger, ("licence", 2))
    with pytest.raises(ResourceInUse):
        ledger.replace(Resource("licence", T.CUSTOM, 1, "seats"))


# -- pools: idle members in member order -------------------------------------------------------------------


def pooled(members: int = 6) -> Ledger:
    from mcpresd.core.pools import Pool, PoolSpec
    from mcpresd.protocol import FactoryKind

    ledger = Ledger([Resource(f"m{i}", T.CUSTOM, 1, "slots") for i in range(members)])
    names = [f"m{i}" for i in range(members)]
    ledger.set_pools([Pool(PoolSpec("all", FactoryKind.STATIC, members=tuple(names))),
                      Pool(PoolSpec("tail", FactoryKind.STATIC, members=tuple(reversed(names[3:]))))],
                     {"all": names, "tail": list(reversed(names[3:]))}, {})
    return ledger


def test_a_pool_grants_its_first_idle_member_after_any_run_of_busy_and_released_ones() -> None:
    ledger = pooled()
    held = [grant(ledger, ("pool:all", 1)) for _ in range(5)]
    assert [items[0].resource for items in held] == ["m0", "m1", "m2", "m3", "m4"]
    ledger.unhold(held[1])  # m1 idle again, behind busy m0: the next grant finds it, not m5
    assert grant(ledger, ("pool:all", 1))[0].resource == "m1"
    assert grant(ledger, ("pool:all", 1))[0].resource == "m5"
    with pytest.raises(InsufficientCapacity):
        grant(ledger, ("pool:all", 1))
    ledger.unhold(held[0])
    ledger.unhold(held[3])
    assert [i.resource for i in grant(ledger, ("pool:all", 2))] == ["m0", "m3"]


def test_a_member_released_through_one_pool_is_idle_in_every_pool_it_stands_in() -> None:
    ledger = pooled()
    assert [grant(ledger, ("pool:tail", 1))[0].resource for _ in range(3)] == ["m5", "m4", "m3"]
    ledger.unhold([AllocationItem("m5", 1)])
    assert grant(ledger, ("pool:tail", 1))[0].resource == "m5"
    ledger.unhold([AllocationItem("m4", 1)])
    assert [i.resource for i in grant(ledger, ("pool:all", 4))] == ["m0", "m1", "m2", "m4"]


def test_a_blocked_or_closed_member_is_skipped_and_found_again_when_open() -> None:
    ledger = pooled(3)
    ledger.block("m0", "unhealthy")
    assert grant(ledger, ("pool:all", 1))[0].resource == "m1"
    ledger.block("m0", None)
    assert grant(ledger, ("pool:all", 1))[0].resource == "m0"


def test_a_holding_within_the_tolerance_leaves_a_pool_member_idle_everywhere() -> None:
    ledger = pooled(2)
    ledger.hold([AllocationItem("m0", 1e-12)])
    assert [r.name for r in ledger.idle_members("all")] == ["m0", "m1"]
    assert grant(ledger, ("pool:all", 2))  # the scan agrees: both are idle


@pytest.mark.parametrize("demands, message", [
    ([("memory", 8 << 30)], "not enough free now (memory: asked 8G, free 2.5G)"),
    ([("cpu", 3), ("licence", 2)], "not enough free now (cpu: asked 3, free 1, licence: asked 2, free 1)"),
])
def test_a_shortfall_is_written_in_the_units_the_tables_print(demands: list[tuple[str, float]],
                                                                message: str) -> None:
    ledger = host()
    grant(ledger, ("memory", int(13.5 * (1 << 30))), ("cpu", 3), ("licence", 1))
    with pytest.raises(InsufficientCapacity) as raised:
        ledger.plan([Demand(s, a) for s, a in demands])
    assert str(raised.value) == message
    assert raised.value.data["shortfalls"][0]["requested"] == demands[0][1]  # the data keeps the numbers


def test_a_request_larger_than_a_resource_says_both_sizes_in_its_units() -> None:
    with pytest.raises(NeverFits, match=r"^memory has a capacity of 16G, less than the 800G asked$"):
        host().plan([Demand("memory", 800 << 30)])


def test_a_shortfall_names_the_pool_whose_slots_hold_the_resource() -> None:
    ledger = host()
    for index in range(2):
        ledger.add(Resource(f"builds/{index}", T.CUSTOM, 1.0, "slot",
                            {"pool": "builds", "parent": "cpu", "slot_size": 2.0}, source="pool"))
        ledger.hold([AllocationItem("cpu", 2.0)])

    assert ledger.pool_shares() == {"cpu": {"builds": 4.0}}
    with pytest.raises(InsufficientCapacity, match=r"^not enough free now \(cpu: asked 1, free 0, "
                                                   r"pool builds holds 4\)$"):
        ledger.plan([Demand("cpu", 1)])
