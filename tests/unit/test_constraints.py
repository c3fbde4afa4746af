"""Label selectors, locality and cost: what a request may ask of a resource beyond an amount."""

from __future__ import annotations

import pytest

from mcpresd.core.constraints import (
    Selector,
    matches,
    matches_all,
    parse_selector,
    pick_local,
    request_cost,
)
from mcpresd.core.errors import InvalidRequest
from mcpresd.core.model import LabelValue, Resource
from mcpresd.protocol import ResourceType as T

GIB = 1 << 30

H100 = Resource(
    "gpu:0", T.GPU, 1.0, "device",
    {
        "index": 0,
        "name": "NVIDIA H100 80GB HBM3",
        "memory": 85520809984,
        "pci_bus_id": "00000000:00:06.0",
        "mig": False,
        "numa_node": None,
    },
    uuid="GPU-ba485a4c-f4ba-e6ae-4d48-e42a77690a6e",
    source="discovered",
)
LICENCE = Resource(
    "licence", T.CUSTOM, 2.0, "seats", {"vendor": "acme", "seats_text": "40", "floating": True},
    cost_per_unit_hour=3.5, source="config",
)


@pytest.mark.parametrize(("text", "key", "op", "value"), [
    ("memory>=40G", "memory", ">=", 40.0 * GIB),
    ("memory>=512m", "memory", ">=", 512.0 * (1 << 20)),
    ("memory<=8GiB", "memory", "<=", 8.0 * GIB),
    (" memory >= 1.5T ", "memory", ">=", 1.5 * (1 << 40)),
    ("name~H100", "name", "~", "H100"),
    ("name!~MIG", "name", "!~", "MIG"),
    ("name~^nvidia .*80gb", "name", "~", "^nvidia .*80gb"),
    ("index~0", "index", "~", "0"),
    ("index=0", "index", "=", 0.0),
    ("offset=-1.5", "offset", "=", -1.5),
    ("numa_node!=1", "numa_node", "!=", 1.0),
    ("capacity<2", "capacity", "<", 2.0),
    ("cost>0.5", "cost", ">", 0.5),
    ("mig=false", "mig", "=", False),
    ("mig = True", "mig", "=", True),
    ("fstype=ext4", "fstype", "=", "ext4"),
    ("seats_text=40x", "seats_text", "=", "40x"),
    ("mountpoint=/data", "mountpoint", "=", "/data"),
    ("pci_bus_id=00000000:00:06.0", "pci_bus_id", "=", "00000000:00:06.0"),
    ("name=NVIDIA H100 80GB HBM3", "name", "=", "NVIDIA H100 80GB HBM3"),
])
def test_a_selector_is_key_operator_value(text: str, key: str, op: str, value: object) -> None:
    selector = parse_selector(text)
    assert (selector.key, selector.op, selector.value, selector.text) == (key, op, value, text)
    assert type(selector.value) is type(value)


@pytest.mark.parametrize(("text", "reason"), [
    ("xx", ""),
    ("", ""),
    ("memory", ""),
    ("memory!40G", ""),
    ("=1", "the key is empty"),
    ("  >= 4", "the key is empty"),
    ("memory>=", "the value is empty"),
    ("name~  ", "the value is empty"),
    ("numa node=1", "a key has no spaces"),
    ("index==0", "'==' is not an operator"),
    ("index=>0", "'=>' is not an operator"),
    ("name~[", "not a regular expression"),
    ("name!~(a", "not a regular expression"),
    ("name~" + "a" * 201, "a pattern is at most 200 characters"),
    ("memory>=0G", "a size must be positive"),
    ("memory>=1e999", "a number must be finite"),
])
def test_a_bad_selector_is_refused_with_the_accepted_forms(text: str, reason: str) -> None:
    with pytest.raises(InvalidRequest) as refused:
        parse_selector(text)
    message = refused.value.message
    assert message.startswith("--where takes KEY OP VALUE with OP one of = != >= <= > < ~ !~ (e.g. 'memory>=40G'")
    assert f"got {text!r}" in message
    assert reason in message
    assert refused.value.data == {"selector": text}


def test_a_pattern_of_200_characters_is_accepted() -> None:
    assert parse_selector("name~" + "a" * 200).value == "a" * 200


@pytest.mark.parametrize(("resource", "text", "expected"), [
    # name: the resource's name and a GPU's model name both count
    (H100, "name~H100", True),
    (H100, "name~h100", True),
    (H100, "name=gpu:0", True),
    (H100, "name=NVIDIA H100 80GB HBM3", True),
    (H100, "name=nvidia h100 80gb hbm3", False),
    (H100, "name=H100", False),
    (H100, "name!=gpu:0", False),
    (H100, "name!=gpu:1", True),
    (H100, "name!~MIG", True),
    (H100, "name!~H100", False),
    # built-in keys
    (H100, "type=gpu", True),
    (H100, "type!=gpu", False),
    (H100, "uuid~^GPU-ba485a4c", True),
    (H100, "unit=device", True),
    (H100, "capacity>=1", True),
    (H100, "capacity>1", False),
    (H100, "capacity=1", True),
    # numbers and sizes: 85520809984 bytes is 79.6 GiB
    (H100, "memory>=40G", True),
    (H100, "memory>=80G", False),
    (H100, "memory<80G", True),
    (H100, "memory>85520809983", True),
    (H100, "memory<=85520809984", True),
    (H100, "index=0", True),
    (H100, "index!=0", False),
    (H100, "index>=1", False),
    (H100, "index~^0$", True),
    (H100, "pci_bus_id=00000000:00:06.0", True),
    (H100, "pci_bus_id~:06\\.0$", True),
    # bools compare to bools, with = and != only
    (H100, "mig=false", True),
    (H100, "mig!=false", False),
    (H100, "mig=true", False),
    (H100, "mig!=true", True),
    (H100, "mig=0", False),
    (H100, "mig>=false", False),
    (H100, "mig~false", True),
    (H100, "index=false", False),
    # a None label, a missing cost and a missing key match only != and !~
    (H100, "numa_node=1", False),
    (H100, "numa_node!=1", True),
    (H100, "numa_node>=0", False),
    (H100, "numa_node~.", False),
    (H100, "numa_node!~.", True),
    (H100, "cost=0", False),
    (H100, "cost!=0", True),
    (H100, "cost<1", False),
    (H100, "colour=red", False),
    (H100, "colour!=red", True),
    (H100, "colour~red", False),
    (H100, "colour!~red", True),
    # a custom resource: strings are exact, nothing is coerced
    (LICENCE, "type=custom", True),
    (LICENCE, "vendor=acme", True),
    (LICENCE, "vendor=ACME", False),
    (LICENCE, "vendor~ACME", True),
    (LICENCE, "seats_text=40", False),
    (LICENCE, "seats_text!=40", True),
    (LICENCE, "seats_text>=1", False),
    (LICENCE, "seats_text~^40$", True),
    (LICENCE, "floating=true", True),
    (LICENCE, "floating=1", False),
    (LICENCE, "name>=a", False),
    (LICENCE, "name<zzz", False),
    (LICENCE, "cost>3", True),
    (LICENCE, "cost<=3.5", True),
    (LICENCE, "cost=3.5", True),
    (LICENCE, "capacity=2", True),
    (LICENCE, "unit=seats", True),
    (LICENCE, "uuid!=x", True),
    (LICENCE, "uuid=x", False),
])
def test_a_selector_matches_by_its_rule(resource: Resource, text: str, expected: bool) -> None:
    assert matches(parse_selector(text), resource) is expected


def test_a_selector_built_directly_matches_like_a_parsed_one() -> None:
    assert matches(Selector("index", "<", 1.0, "index<1"), H100)


@pytest.mark.parametrize(("texts", "expected"), [
    ([], True),
    (["type=gpu"], True),
    (["type=gpu", "memory>=40G", "mig=false"], True),
    (["type=gpu", "memory>=100G"], False),
    (["name~H100", "name!~H100"], False),
])
def test_all_selectors_must_match(texts: list[str], expected: bool) -> None:
    assert matches_all([parse_selector(t) for t in texts], H100) is expected


def device(index: int, numa: LabelValue = None, bus: LabelValue = None) -> Resource:
    return Resource(f"gpu:{index}", T.GPU, 1.0, "device", {"index": index, "numa_node": numa, "pci_bus_id": bus})


def pci(bus: int, slot: int) -> str:
    return f"00000000:{bus:02X}:{slot:02X}.0"


@pytest.mark.parametrize(("preferred", "count", "expected"), [
    pytest.param(
        [device(2, 1), device(0, 0), device(3, 1), device(1, 0)], 2, ["gpu:2", "gpu:3"],
        id="numa-group-of-the-first-preferred"),
    pytest.param(
        [device(0, 0), device(1, 1), device(2, 1), device(3, 1)], 2, ["gpu:1", "gpu:2"],
        id="numa-group-too-small-is-passed-over"),
    pytest.param(
        [device(0, 0), device(1, 1), device(2, 1), device(3, 1)], 3, ["gpu:1", "gpu:2", "gpu:3"],
        id="numa-group-keeps-preference-order"),
    pytest.param(
        [device(0, None), device(1, 0), device(2, 0)], 2, ["gpu:1", "gpu:2"],
        id="unknown-numa-is-passed-over-for-a-local-pair"),
    pytest.param(
        [device(0, 0, pci(0, 6)), device(1, 1, pci(0, 7)), device(2, 0, pci(1, 0))], 2, ["gpu:0", "gpu:2"],
        id="numa-before-pci"),
    pytest.param(
        [device(0, None, pci(0, 6)), device(1, None, pci(1, 0)), device(2, None, pci(0, 7))], 2, ["gpu:0", "gpu:2"],
        id="pci-root-when-numa-is-unknown"),
    pytest.param(
        [device(0, 0, pci(0, 6)), device(1, 1, pci(1, 0)), device(2, 2, pci(0, 7))], 2, ["gpu:0", "gpu:2"],
        id="pci-root-when-no-numa-group-is-big-enough"),
    pytest.param(
        [device(0, None, "0000:00:06.0"), device(1, None, "0000:00:07.0")], 2, ["gpu:0", "gpu:1"],
        id="short-pci-domain"),
    pytest.param(
        [device(3), device(1), device(2)], 2, ["gpu:3", "gpu:1"],
        id="unknown-locality-keeps-preference"),
    pytest.param(
        [device(0, True, "garbage"), device(1, "0", ""), device(2, 1.0, 7)], 2, ["gpu:0", "gpu:1"],
        id="malformed-locality-is-unknown"),
    pytest.param(
        [device(0, 0), device(1, 1), device(2, 2)], 2, ["gpu:0", "gpu:1"],
        id="no-group-big-enough"),
    pytest.param(
        [device(0, None), device(1, 0), device(2, 0)], 1, ["gpu:0"],
        id="one-device-is-the-first-preferred"),
    pytest.param([device(0, 0)], 0, [], id="none-asked"),
    pytest.param([device(0, 0), device(1, 0)], 3, None, id="too-few-given"),
    pytest.param([], 1, None, id="nothing-given"),
])
def test_pick_local_keeps_devices_close(preferred: list[Resource], count: int, expected: list[str] | None) -> None:
    picked = pick_local(preferred, count)
    assert (None if picked is None else [r.name for r in picked]) == expected


def test_pick_local_refuses_a_negative_count() -> None:
    with pytest.raises(ValueError, match="negative"):
        pick_local([device(0)], -1)


def priced(name: str, cost: float | None) -> Resource:
    return Resource(name, T.CUSTOM, 10.0, "units", cost_per_unit_hour=cost)


@pytest.mark.parametrize(("items", "expected"), [
    ([], 0.0),
    ([(priced("cpu", 0.5), 4.0)], 2.0),
    ([(priced("cpu", 0.5), 4.0), (priced("gpu:0", 2.0), 0.5)], 3.0),
    ([(priced("cpu", 0.5), 4.0), (priced("free", None), 8.0)], 2.0),
    ([(priced("x", 0.1), 1.0)] * 10, 1.0),
])
def test_request_cost_is_amount_times_hourly_cost(items: list[tuple[Resource, float]], expected: float) -> None:
    assert request_cost(items) == expected
