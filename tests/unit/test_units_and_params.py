"""Sizes, amounts and request parameters: what is accepted and what is refused, by name."""

from __future__ import annotations

import math

import pytest

from mcpresd import params
from mcpresd.protocol import Priority, UnitError, format_size, parse_amount, parse_size


@pytest.mark.parametrize("text, expected", [
    ("512M", 512 << 20), ("8G", 8 << 30), ("1.5T", int(1.5 * (1 << 40))), ("1024", 1024),
    ("8GiB", 8 << 30), ("8gb", 8 << 30), ("512B", 512), ("1k", 1024), (" 2G ", 2 << 30),
])
def test_sizes_accept_binary_suffixes_and_plain_bytes(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "0", "-1", "nan", "inf", "G", "12Q", "1e400", "abc", "0.0001"])
def test_bad_sizes_are_refused(text: str) -> None:
    with pytest.raises(UnitError):
        parse_size(text)


@pytest.mark.parametrize("text, expected", [("2", 2.0), ("0.5", 0.5), ("4G", float(4 << 30))])
def test_amounts_are_numbers_or_sizes(text: str, expected: float) -> None:
    assert parse_amount(text) == expected


@pytest.mark.parametrize("value, text", [(8 << 30, "8G"), (1536, "1.5K"), (100, "100")])
def test_sizes_print_short(value: int, text: str) -> None:
    assert format_size(value) == text


def demand(amount: object) -> dict[str, object]:
    return {"resources": [{"resource": "cpu", "amount": amount}]}


@pytest.mark.parametrize("raw, field", [
    (demand(0), "resources[0].amount"),
    (demand(-1), "resources[0].amount"),
    (demand(math.nan), "resources[0].amount"),
    (demand(math.inf), "resources[0].amount"),
    (demand(True), "resources[0].amount"),
    (demand("1"), "resources[0].amount"),
    ({"resources": []}, "resources"),
    ({}, "resources"),
    ({"resources": [{"resource": "cpu"}]}, "resources[0].amount"),
    ({"resources": [{"resource": "\ud800", "amount": 1}]}, "resources[0].resource"),
    ({"resources": [{"resource": "cpu", "amount": 1, "extra": 1}]}, "resources[0]"),
    ({**demand(1), "priority": "urgent"}, "priority"),
    ({**demand(1), "holder_pid": -5}, "holder_pid"),
    ({**demand(1), "holder_pid": True}, "holder_pid"),
    ({**demand(1), "tool_id": "x" * 1000}, "tool_id"),
    ({**demand(1), "tool_id": "a\nb"}, "tool_id"),
    ({**demand(1), "surprise": 1}, "surprise"),
])
def test_bad_allocate_params_name_the_field(raw: dict[str, object], field: str) -> None:
    with pytest.raises(params.InvalidParams) as raised:
        params.allocate(raw)
    assert raised.value.field == field


def test_a_good_allocate_request_parses_with_defaults() -> None:
    command = params.allocate({"resources": [{"resource": "gpu", "amount": 0.5}]})
    assert command.priority is Priority.NORMAL
    assert command.demands[0].amount == 0.5 and command.holder_pid is None


@pytest.mark.parametrize("name", ["cpu", "memory", "gpu", "gpu:0", "disk:/", "net:eth0", "a b", "a=b"])
def test_custom_resources_cannot_take_reserved_or_unparseable_names(name: str) -> None:
    with pytest.raises(params.InvalidParams):
        params.add_resource({"name": name, "capacity": 1})


@pytest.mark.parametrize("capacity", [0, -1, math.nan, None, "3"])
def test_custom_resources_need_a_positive_capacity(capacity: object) -> None:
    with pytest.raises(params.InvalidParams):
        params.add_resource({"name": "licence:x", "capacity": capacity})
