"""What the gateway reads of a line too long to parse: the id of the response it is, from its two ends."""

from __future__ import annotations

import pytest

from mcpctl.gateway import wire

BODY = b'{"content":[{"type":"text","text":"' + b"x" * 10000 + b'"}]}'


def edges(line: bytes) -> tuple[bytes, bytes]:
    return line[:wire.EDGE_BYTES], line[-wire.EDGE_BYTES:]


@pytest.mark.parametrize(("line", "expected"), [
    (b'{"jsonrpc":"2.0","id":7,"result":' + BODY + b"}\n", "7"),
    (b'{"result":' + BODY + b',"jsonrpc":"2.0","id":"a\\"b"}\n', '"a\\"b"'),
    (b'{ "id" : -3 , "error" : {"code":1,"message":"' + b"y" * 9000 + b'"}}\n', "-3"),
    (b'{"result":' + BODY + b',"id":12,"jsonrpc":"2.0"}\n', "12"),
    # requests and notifications are never taken for responses, whatever their ends hold
    (b'{"method":"sampling/createMessage","params":' + BODY + b',"jsonrpc":"2.0","id":7}\n', None),
    (b'{"jsonrpc":"2.0","id":7,"method":"x","params":' + BODY + b"}\n", None),
    (b'{"jsonrpc":"2.0","method":"notifications/message","params":' + BODY + b"}\n", None),
    # an "id" inside the result is not the response's
    (b'{"result":{"text":"' + b"z" * 9000 + b'","id":5}}\n', None),
])
def test_an_over_long_response_is_known_by_the_id_at_either_end(line: bytes, expected: str | None) -> None:
    assert wire.long_response_id(*edges(line)) == expected


@pytest.mark.parametrize(("params", "complete"), [
    ({"progress": 3, "total": 3}, True),
    ({"progress": 3.5, "total": 3}, True),
    ({"progress": 2, "total": 3}, False),
    ({"progress": 3}, False),  # no total: nothing says the work is done
    ({"progress": True, "total": 1}, False),
    (None, False),
])
def test_progress_is_complete_only_when_it_reaches_its_total(params: object, complete: bool) -> None:
    assert wire.progress_complete(params) is complete


@pytest.mark.parametrize(("line", "expected"), [
    (b'{"jsonrpc":"2.0","id":7,"method":"tools/call","params":' + BODY + b"}\n", 7),
    (b'{"method":"tools/call","params":' + BODY + b',"jsonrpc":"2.0","id":"a"}\n', "a"),
    (b'{ "id" : -3 , "method" : "tools/call", "params":' + BODY + b"}\n", -3),
    # an "id" inside the params is not the request's; a notification has none
    (b'{"jsonrpc":"2.0","method":"tools/call","params":{"text":"' + b"z" * 9000 + b'","id":5}}\n', None),
    (b'{"jsonrpc":"2.0","method":"notifications/message","params":' + BODY + b"}\n", None),
])
def test_an_over_long_request_is_known_by_the_id_at_either_end(line: bytes, expected: object) -> None:
    assert wire.long_request_id(*edges(line)) == expected


@pytest.mark.parametrize(("line", "response"), [
    (b'{"jsonrpc":"2.0","id":7,"result":' + BODY + b"}\n", True),
    (b'{"result":' + BODY + b',"jsonrpc":"2.0","id":7}\n', True),
    (b'{"jsonrpc":"2.0","error":{"code":1,"message":"' + b"y" * 9000 + b'"},"id":2}\n', True),
    (b'{"jsonrpc":"2.0","id":7,"method":"tools/call","params":' + BODY + b"}\n", False),
    (b'{"method":"tools/call","params":' + BODY + b',"jsonrpc":"2.0","id":7}\n', False),
])
def test_a_response_is_known_by_its_first_members(line: bytes, response: bool) -> None:
    assert wire.is_response_head(line[:wire.EDGE_BYTES]) is response
