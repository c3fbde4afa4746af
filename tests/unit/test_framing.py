"""The clients' line framing (mcpresd.protocol.encode_line, decode_line): json.dumps's text, json.loads's values
and errors, without importing `json` on the common path."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest

from mcpresd.protocol import decode_line, encode_line

VALUES: list[Any] = [
    {"jsonrpc": "2.0", "id": 1, "method": "allocate", "params": {"resources": [{"resource": "slot", "amount": 1.5}],
                                                                 "holder_pid": 123, "wait": "forever"}},
    {"unicode": "µs – ✓ \U0001f600", "escapes": "\"\\\n\t\x00", "empty": {}, "list": [], "none": None,
     "bools": [True, False]},
    [1, -0.0, 1e-9, 2.0 ** 63, 10 ** 30, -(10 ** 30), 0.1 + 0.2],
    "plain",
    12,
]


@pytest.mark.parametrize("value", VALUES)
def test_a_line_is_json_dumps_compact_text_and_reads_back_as_json_loads(value: Any) -> None:
    line = encode_line(value)

    assert line == json.dumps(value, separators=(",", ":")).encode() + b"\n"
    assert decode_line(line) == json.loads(line) == value


@pytest.mark.parametrize("line", [b'{"a": NaN, "b": Infinity, "c": -Infinity}', b"  [1, 2]  \r\n",
                                  '\ufeff{"bom": 1}'.encode(), '{"x": "é"}'.encode("utf-16"),
                                  '{"x": "\u00e9"}'.encode()])
def test_odd_but_valid_lines_read_as_json_loads_reads_them(line: bytes) -> None:
    got, want = decode_line(line), json.loads(line)

    assert repr(got) == repr(want)
    if isinstance(got, dict) and "a" in got:
        assert math.isnan(got["a"]) and got["b"] == math.inf and got["c"] == -math.inf


@pytest.mark.parametrize("line", [b"", b"{", b'{"a": 1} {"b": 2}', b"[1,]", b"nul", b'"\\x"', b"\xff\xfe\xfd",
                                  b'{"a": "\x01"}'])
def test_a_bad_line_raises_what_json_loads_raises(line: bytes) -> None:
    with pytest.raises(ValueError) as by_json:
        json.loads(line)
    with pytest.raises(ValueError) as by_us:
        decode_line(line)

    assert type(by_us.value) is type(by_json.value)
    assert str(by_us.value) == str(by_json.value)


def test_what_json_cannot_write_raises_as_json_dumps_does() -> None:
    with pytest.raises(TypeError, match="Object of type set is not JSON serializable"):
        encode_line({"a": {1}})
