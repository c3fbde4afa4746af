"""A `resources.add` list is read with a quick check for plainly valid entries (issue 15, target 5: 100,000 in
at most 2 s) and the full checks for anything else: both must read an entry the same way, and the quick one
must never let through what the full ones refuse."""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mcpresd import params
from mcpresd.core.model import Resource, custom_resource
from mcpresd.protocol import MAX_NAME_LENGTH, MAX_QUANTITY, MIN_QUANTITY, ResourceType

TRICKY_NAMES = ["seat-1", "licence:cad", "ü-λ", "a" * MAX_NAME_LENGTH, "a" * (MAX_NAME_LENGTH + 1), "", "a b",
                "a\u00a0b", "a\tb", "a\nb", "a\x7fb", "a\u200bb", "a\u2028b", "a,b", "a=b", "\ud800", "x\udfff",
                "cpu", "memory", "custom", "gpu", "gpu:0", "disk:/", "net:eth0", "pool:a", "pool", "gpus", 7, None,
                ["a"], {"a": 1}]
TRICKY_NUMBERS = [1, 4, 2.5, MIN_QUANTITY, MIN_QUANTITY / 2, MAX_QUANTITY, int(MAX_QUANTITY), int(MAX_QUANTITY) + 1,
                  MAX_QUANTITY * 2, 10 ** 400, 0, 0.0, -1, math.nan, math.inf, -math.inf, True, False, "3", None]
TRICKY_UNITS = ["seats", "GiB", "", " ", "a b", "u" * MAX_NAME_LENGTH, "u" * (MAX_NAME_LENGTH + 1), "a\x00",
                "\ud800", 3, None]

names = st.one_of(st.sampled_from(TRICKY_NAMES), st.text(max_size=8))
numbers = st.one_of(st.sampled_from(TRICKY_NUMBERS), st.floats(), st.integers())
units = st.one_of(st.sampled_from(TRICKY_UNITS), st.text(max_size=4))
entries = st.one_of(
    st.fixed_dictionaries({"name": names, "capacity": numbers}, optional={
        "unit": units, "labels": st.sampled_from([None, {}, {"rack": "a"}, {"bad": [1]}]),
        "cost_per_unit_hour": st.sampled_from([None, 1.5, -1, math.nan]), "colour": st.just("red")}),
    st.sampled_from([None, [], "seat", 3, {}]),
)


def fully_checked(entry: Any) -> Resource | params.InvalidParams:
    try:
        one = params._one_resource(entry)
    except params.InvalidParams as error:
        return error
    return Resource(name=one.name, type=ResourceType.CUSTOM, capacity=one.capacity, unit=one.unit,
                    labels=one.labels, cost_per_unit_hour=one.cost_per_unit_hour, source="api")


@settings(max_examples=1000, deadline=None)
@given(entries)
def test_the_quick_check_accepts_only_what_the_full_checks_accept_and_reads_it_the_same(entry: Any) -> None:
    quick = params._plain_resource(entry)
    full = fully_checked(entry)
    if quick is not None:
        assert quick == full
        assert type(quick.capacity) is float and type(quick.labels) is dict


@pytest.mark.parametrize("entry", [{"name": "seat-1", "capacity": 4}, {"name": "licence:cad", "capacity": 2.5,
                                                                          "unit": "seats"}])
def test_plain_entries_take_the_quick_check(entry: dict[str, Any]) -> None:
    assert params._plain_resource(entry) == fully_checked(entry)


@pytest.mark.parametrize("entry", [{"name": name, "capacity": 1} for name in TRICKY_NAMES]
                         + [{"name": "x", "capacity": number} for number in TRICKY_NUMBERS]
                         + [{"name": "x", "capacity": 1, "unit": unit} for unit in TRICKY_UNITS])
def test_an_entry_in_a_list_is_refused_as_it_is_alone_and_named_by_its_place(entry: dict[str, Any]) -> None:
    alone = fully_checked(entry)
    listed: Resource | params.InvalidParams
    try:
        listed = params.add_resource({"resources": [{"name": "first", "capacity": 1}, entry]}).resources[1]
    except params.InvalidParams as error:
        listed = error
    if isinstance(alone, params.InvalidParams):
        assert isinstance(listed, params.InvalidParams)
        assert (listed.message, listed.field) == (f"resources[1]: {alone.message}",
                                                  f"resources[1].{alone.field}" if alone.field else "resources[1]")
    else:
        assert listed == alone


def test_custom_resource_is_the_value_the_constructor_makes() -> None:
    made = custom_resource("licence:cad", 3.0, "seats", {"vendor": "acme"}, 1.5)
    assert made == Resource(name="licence:cad", type=ResourceType.CUSTOM, capacity=3.0, unit="seats",
                            labels={"vendor": "acme"}, cost_per_unit_hour=1.5, source="api")
    with pytest.raises(AttributeError):
        made.capacity = 4.0  # type: ignore[misc]
