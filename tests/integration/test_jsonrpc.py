"""JSON-RPC 2.0 as mcpresd speaks it, checked against the real daemon.

The rules are those of https://www.jsonrpc.org/specification plus mcpres's own
(framing, limits and error codes in `mcpresd.protocol`). Requests are written
as raw JSON text, so a test can send what `json.dumps` never would: 1e400,
lone surrogates, NaN, truncated or oversize lines. Replies are decoded as
strict UTF-8. Tests that leave the daemon's state as they found it share one
seeded daemon; the rest get their own.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from mcpresd import __version__
from mcpresd.protocol import MAX_BATCH, MAX_DEMANDS, MAX_MESSAGE_BYTES, ErrorCode
from tests.conftest import DaemonProcess

BIG_INT = "1" + "0" * 400
STATUS = b'{"jsonrpc":"2.0","id":"sentinel","method":"daemon.status"}'


def req(method: str, params: str | None = None, id: str | None = "1") -> bytes:
    """One request as JSON text; `params` and `id` are JSON text too; `id=None` makes a notification."""
    members = ['"jsonrpc":"2.0"']
    if id is not None:
        members.append(f'"id":{id}')
    members.append(f'"method":{json.dumps(method)}')
    if params is not None:
        members.append(f'"params":{params}')
    return ("{" + ",".join(members) + "}").encode()


def demand(resource: str = "slot", amount: str = "1") -> str:
    return f'{{"resources":[{{"resource":{json.dumps(resource)},"amount":{amount}}}]}}'


def padded(message: bytes, size: int) -> bytes:
    """`message` padded with JSON whitespace to exactly `size` bytes."""
    return message + b" " * (size - len(message))


class Connection:
    """One client connection, kept open across exchanges; replies are strict UTF-8 JSON lines."""

    def __init__(self, path: str, timeout: float = 5.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.buffer = b""

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the daemon may hang up mid-message; what it said first is still to be read

    def finish_sending(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def reply(self) -> Any:
        while b"\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError(f"the daemon closed the connection; unanswered bytes: {self.buffer[:200]!r}")
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        return json.loads(line.decode("utf-8"))

    def replies_until_closed(self) -> list[Any]:
        while True:
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            self.buffer += chunk
        lines, self.buffer = self.buffer.split(b"\n"), b""
        assert lines[-1] == b"", f"a reply without its newline: {lines[-1][:200]!r}"
        return [json.loads(line.decode("utf-8")) for line in lines[:-1]]

    def closed_by_daemon(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True


def exchange(daemon: DaemonProcess, data: bytes) -> list[Any]:
    """Send `data` on a fresh connection, close our side, return every reply line."""
    with Connection(daemon.socket) as connection:
        connection.send(data)
        connection.finish_sending()
        return connection.replies_until_closed()


def only_reply(daemon: DaemonProcess, data: bytes) -> Any:
    replies = exchange(daemon, data + b"\n")
    assert len(replies) == 1, replies
    return replies[0]


def error_of(reply: Any) -> dict[str, Any]:
    """The one error shape: a response with exactly jsonrpc, id and error {code, message[, data]}."""
    assert isinstance(reply, dict) and set(reply) == {"jsonrpc", "id", "error"}, reply
    assert reply["jsonrpc"] == "2.0"
    error = reply["error"]
    assert {"code", "message"} <= set(error) <= {"code", "message", "data"}, error
    assert type(error["code"]) is int
    assert isinstance(error["message"], str) and error["message"].strip()
    if "data" in error:
        assert isinstance(error["data"], dict)
    return error


def result_of(reply: Any) -> Any:
    assert isinstance(reply, dict) and set(reply) == {"jsonrpc", "id", "result"}, reply
    assert reply["jsonrpc"] == "2.0"
    return reply["result"]


@dataclass(frozen=True)
class Seed:
    held: str  # all of `licence`, active
    keyed: str  # one `slot`, active, idempotency key "seed-key"
    released: str  # one `slot`, released


def seed(daemon: DaemonProcess) -> Seed:
    """Allocations held by this test process: one made without a holder_pid would end with its connection."""
    me = os.getpid()
    held = daemon.call("allocate", {"resources": [{"resource": "licence", "amount": 2}], "holder_pid": me})["id"]
    keyed = daemon.call("allocate", {"resources": [{"resource": "slot", "amount": 1}],
                                     "idempotency_key": "seed-key", "holder_pid": me})["id"]
    released = daemon.call("allocate", {"resources": [{"resource": "slot", "amount": 1}], "holder_pid": me})["id"]
    daemon.call("release", {"id": released})
    return Seed(held=held, keyed=keyed, released=released)


def with_seed(template: bytes, ids: Seed) -> bytes:
    return (template.replace(b"@held", ids.held.encode()).replace(b"@keyed", ids.keyed.encode())
            .replace(b"@released", ids.released.encode()))


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    """A seeded daemon for the tests that leave its state as they found it."""
    process = DaemonProcess(tmp_path_factory.mktemp("shared-daemon"))
    process.start()
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture(scope="module")
def seeded(shared: DaemonProcess) -> Seed:
    return seed(shared)


# -- tables -----------------------------------------------------------------

PARSE_ERRORS = [
    pytest.param(b"{", id="a lone brace"),
    pytest.param(req("daemon.status")[:-1], id="truncated object"),
    pytest.param(req("daemon.status") + b"}", id="trailing garbage"),
    pytest.param(b'{"jsonrpc":"2.0","id":1,"method":"daemon.status",}', id="trailing comma"),
    pytest.param(b"{'jsonrpc':'2.0','id':1,'method':'daemon.status'}", id="single quotes"),
    pytest.param(b"NaN", id="NaN"),
    pytest.param(b"Infinity", id="Infinity"),
    pytest.param(b"-Infinity", id="-Infinity"),
    pytest.param(req("allocate", demand(amount="NaN")), id="NaN inside params"),
    pytest.param(req("daemon.status", id="Infinity"), id="Infinity as id"),
    pytest.param(b"\xff\xfe", id="invalid UTF-8"),
    pytest.param(b'{"jsonrpc":"2.0","id":1,"method":"daemon.st\xffatus"}', id="invalid UTF-8 inside a string"),
    pytest.param(b'"\xed\xa0\x80"', id="UTF-8-encoded surrogate"),
    pytest.param(b'"\xc0\xaf"', id="overlong UTF-8"),
    pytest.param(b"\x00", id="NUL byte"),
    pytest.param(b"[" + req("daemon.status") + b',{"jsonrpc":"2.0","method"]', id="batch that is not JSON"),
]

INVALID_REQUESTS = [
    pytest.param(b"1", None, id="a number"),
    pytest.param(b'"daemon.status"', None, id="a string"),
    pytest.param(b"null", None, id="null"),
    pytest.param(b"true", None, id="a boolean"),
    pytest.param(b'{"id":1,"method":"daemon.status"}', 1, id="no jsonrpc"),
    pytest.param(b'{"jsonrpc":"1.0","id":1,"method":"daemon.status"}', 1, id="jsonrpc 1.0"),
    pytest.param(b'{"jsonrpc":2.0,"id":1,"method":"daemon.status"}', 1, id="jsonrpc as a number"),
    pytest.param(b'{"jsonrpc":"2.0","id":1}', 1, id="no method"),
    pytest.param(b'{"jsonrpc":"2.0","id":1,"method":1}', 1, id="method a number"),
    pytest.param(b'{"jsonrpc":"2.0","id":1,"method":null}', 1, id="method null"),
    pytest.param(b'{"jsonrpc":"2.0","id":1,"method":["daemon.status"]}', 1, id="method an array"),
    pytest.param(req("daemon.status", id="{}"), None, id="id an object"),
    pytest.param(req("daemon.status", id="[1]"), None, id="id an array"),
    pytest.param(req("daemon.status", id="true"), None, id="id true"),
    pytest.param(req("daemon.status", id="false"), None, id="id false"),
    pytest.param(req("daemon.status", id="1e400"), None, id="id overflowing to infinity"),
    pytest.param(req("daemon.status", params='"x"'), 1, id="params a string"),
    pytest.param(req("daemon.status", params="1"), 1, id="params a number"),
    pytest.param(req("daemon.status", params="true"), 1, id="params a boolean"),
    pytest.param(req("daemon.status", params="null"), 1, id="params null"),
    pytest.param(b'{"jsonrpc":"2.0","method":1,"params":"bar"}', None, id="invalid and without id"),
]

UNKNOWN_METHODS = ["nope", "", "Daemon.Status", "daemon.status ", "rpc.discover", "\ud800"]

INVALID_PARAMS = [
    pytest.param("allocate", '{"resources":[{"resource":"slot","amount":1}],"colour":"red"}', "colour",
                 id="unknown field"),
    pytest.param("allocate", "{}", "resources", id="resources missing"),
    pytest.param("allocate", '{"resources":[]}', "resources", id="resources empty"),
    pytest.param("allocate", '{"resources":{"resource":"slot","amount":1}}', "resources", id="resources an object"),
    pytest.param("allocate", "{\"resources\":[" + ",".join(['{"resource":"slot","amount":1}'] * (MAX_DEMANDS + 1))
                 + "]}", "resources", id="too many resources"),
    pytest.param("allocate", demand(amount="0"), "resources[0].amount", id="amount 0"),
    pytest.param("allocate", demand(amount="-1"), "resources[0].amount", id="amount negative"),
    pytest.param("allocate", demand(amount='"NaN"'), "resources[0].amount", id="amount NaN as a string"),
    pytest.param("allocate", demand(amount='"1"'), "resources[0].amount", id="amount a numeric string"),
    pytest.param("allocate", demand(amount="1e400"), "resources[0].amount", id="amount 1e400"),
    pytest.param("allocate", demand(amount=BIG_INT), "resources[0].amount", id="amount a 400-digit integer"),
    pytest.param("allocate", demand(amount="true"), "resources[0].amount", id="amount a boolean"),
    pytest.param("allocate", '{"resources":[{"resource":"slot"}]}', "resources[0].amount", id="amount missing"),
    pytest.param("allocate", '{"resources":[{"resource":"slot","amount":1},{"resource":"slot","amount":0}]}',
                 "resources[1].amount", id="second amount bad"),
    pytest.param("allocate", '{"resources":[{"resource":"slot","amount":1,"x":1}]}', "resources[0]",
                 id="demand with an extra field"),
    pytest.param("allocate", '{"resources":[5]}', "resources[0]", id="demand not an object"),
    pytest.param("allocate", '{"resources":[{"resource":5,"amount":1}]}', "resources[0].resource",
                 id="resource a number"),
    pytest.param("allocate", '{"resources":[{"resource":"\\ud800","amount":1}]}', "resources[0].resource",
                 id="resource a lone surrogate"),
    pytest.param("allocate", '{"resources":[{"resource":"sl\\u0000ot","amount":1}]}', "resources[0].resource",
                 id="resource with NUL"),
    pytest.param("allocate", '{"resources":[{"resource":"slot\\n","amount":1}]}', "resources[0].resource",
                 id="resource with newline"),
    pytest.param("allocate", '{"resources":[{"resource":"","amount":1}]}', "resources[0].resource",
                 id="resource empty"),
    pytest.param("allocate", '{"resources":[{"resource":"slot","amount":1}],"priority":"urgent"}', "priority",
                 id="priority unknown"),
    pytest.param("allocate", '{"resources":[{"resource":"slot","amount":1}],"priority":1}', "priority",
                 id="priority a number"),
    pytest.param("allocate", '{"resources":[{"resource":"slot","amount":1}],"tool_id":"\\ud800"}', "tool_id",
                 id="tool_id a lone surrogate"),
    pytest.param("allocate", '{"resources":[{"resource":"slot","amount":1}],"tool_id":"a\\u001fb"}', "tool_id",
                 id="tool_id with a control character"),
    pytest.param("allocate", '{"resources":[{"resource":"slot","amount":1}],"holder_pid":true}', "holder_pid",
                 id="holder_pid a boolean"),
    pytest.param("allocate", '{"resources":[{"resource":"slot","amount":1}],"holder_pid":-1}', "holder_pid",
                 id="holder_pid negative"),
    pytest.param("allocate", '{"resources":[{"resource":"slot","amount":1}],"holder_pid":1.5}', "holder_pid",
                 id="holder_pid fractional"),
    pytest.param("release", "{}", "id", id="release without id"),
    pytest.param("release", '{"id":5}', "id", id="release id a number"),
    pytest.param("release", '{"id":"\\ud800"}', "id", id="release id a lone surrogate"),
    pytest.param("release", '{"id":"x","force":true}', "force", id="release unknown field"),
    pytest.param("allocations.get", '{"id":null}', "id", id="get id null"),
    pytest.param("allocations.list", '{"limit":0}', "limit", id="list limit 0"),
    pytest.param("allocations.list", '{"limit":true}', "limit", id="list limit a boolean"),
    pytest.param("allocations.list", '{"limit":1.5}', "limit", id="list limit fractional"),
    pytest.param("allocations.list", '{"state":"gone"}', "state", id="list state unknown"),
    pytest.param("events.list", '{"after_id":-1}', "after_id", id="events after_id negative"),
    pytest.param("resources.list", '{"type":"tpu"}', "type", id="resources type unknown"),
    pytest.param("resources.add", '{"name":"x","capacity":0}', "capacity", id="capacity 0"),
    pytest.param("resources.add", '{"name":"x","capacity":-1}', "capacity", id="capacity negative"),
    pytest.param("resources.add", '{"name":"x","capacity":"NaN"}', "capacity", id="capacity NaN as a string"),
    pytest.param("resources.add", '{"name":"x","capacity":1e400}', "capacity", id="capacity 1e400"),
    pytest.param("resources.add", '{"name":"x","capacity":true}', "capacity", id="capacity a boolean"),
    pytest.param("resources.add", '{"capacity":1}', "name", id="name missing"),
    pytest.param("resources.add", '{"name":"gpu:9","capacity":1}', "name", id="name reserved"),
    pytest.param("resources.add", '{"name":"a b","capacity":1}', "name", id="name with a space"),
    pytest.param("resources.add", '{"name":"a\\tb","capacity":1}', "name", id="name with a tab"),
    pytest.param("resources.add", '{"name":"x","capacity":1,"labels":"k"}', "labels", id="labels a string"),
    pytest.param("resources.add", '{"name":"x","capacity":1,"labels":{"k":[1]}}', "labels.k",
                 id="label value an array"),
    pytest.param("resources.add", '{"name":"x","capacity":1,"cost_per_unit_hour":-1}', "cost_per_unit_hour",
                 id="cost negative"),
    pytest.param("daemon.status", '{"verbose":true}', "verbose", id="status unknown field"),
    pytest.param("daemon.status", '{"\\ud800":1}', "\ud800", id="unknown field a lone surrogate"),
]

APPLICATION_ERRORS = [
    pytest.param(req("allocate", demand("nope")), ErrorCode.UNKNOWN_RESOURCE, "UnknownResource",
                 id="unknown resource"),
    pytest.param(req("allocate", demand("licence")), ErrorCode.INSUFFICIENT_CAPACITY, "InsufficientCapacity",
                 id="insufficient capacity"),
    pytest.param(req("allocate", demand("slot", "11")), ErrorCode.NEVER_FITS, "NeverFits", id="never fits"),
    pytest.param(req("release", '{"id":"0000000000000000"}'), ErrorCode.ALLOCATION_NOT_FOUND,
                 "AllocationNotFound", id="allocation not found"),
    pytest.param(req("release", '{"id":"@released"}'), ErrorCode.ALREADY_RELEASED, "AlreadyReleased",
                 id="already released"),
    pytest.param(req("resources.add", '{"name":"licence","capacity":1}'), ErrorCode.RESOURCE_EXISTS,
                 "ResourceExists", id="resource exists"),
    pytest.param(req("resources.remove", '{"name":"licence"}'), ErrorCode.PERMISSION_DENIED, "PermissionDenied",
                 id="remove a config resource"),
    pytest.param(req("allocate", '{"resources":[{"resource":"slot","amount":2}],"idempotency_key":"seed-key"}'),
                 ErrorCode.IDEMPOTENCY_CONFLICT, "IdempotencyConflict", id="idempotency conflict"),
    pytest.param(req("allocate", '{"resources":[{"resource":"slot","amount":1}],"holder_pid":2147483647}'),
                 ErrorCode.INVALID_HOLDER, "InvalidHolder", id="holder does not exist"),
]

NOTIFICATIONS = [
    pytest.param(req("daemon.status", id=None), id="valid"),
    pytest.param(req("no.such.method", id=None), id="unknown method"),
    pytest.param(req("allocate", "{}", id=None), id="invalid params"),
    pytest.param(req("allocate", demand(amount="1e400"), id=None), id="amount 1e400"),
    pytest.param(req("daemon.status", '{"\\ud800":1}', id=None), id="unknown field a lone surrogate"),
    pytest.param(req("allocate", '[{"resource":"slot","amount":1}]', id=None), id="positional params"),
    pytest.param(req("allocate", demand("slot", "11"), id=None), id="application error"),
    pytest.param(req("release", '{"id":"0000000000000000"}', id=None), id="unknown allocation"),
]

NESTING = [
    pytest.param(b"[" * 100_000, id="100k open brackets"),
    pytest.param(b'{"a":' * 100_000, id="100k open objects"),
    pytest.param(b"[" * 100_000 + b"]" * 100_000, id="100k balanced brackets"),
    pytest.param(req("daemon.status", "[" * 100_000 + "]" * 100_000), id="params nested 100k deep"),
]

VALID_ALLOCATE = req("allocate", demand())

BAD_WRITES = [
    pytest.param(VALID_ALLOCATE[:-3], id="truncated"),
    pytest.param(req("allocate", demand(amount="NaN")), id="NaN literal"),
    pytest.param(req("allocate", demand(amount="Infinity")), id="Infinity literal"),
    pytest.param(VALID_ALLOCATE.replace(b'"slot"', b'"sl\xffot"'), id="invalid UTF-8"),
    pytest.param(VALID_ALLOCATE.replace(b'"jsonrpc":"2.0",', b""), id="no jsonrpc"),
    pytest.param(VALID_ALLOCATE.replace(b'"2.0"', b'"1.0"'), id="jsonrpc 1.0"),
    pytest.param(req("allocate", demand(), id="{}"), id="id an object"),
    pytest.param(req("allocate", demand(), id="true"), id="id a boolean"),
    pytest.param(req("allocate", demand(), id="1e400"), id="id 1e400"),
    pytest.param(req("allocate", '"slot"'), id="params a string"),
    pytest.param(req("allocate", '[{"resource":"slot","amount":1}]'), id="positional params"),
    pytest.param(req("allocate", '{"resources":[{"resource":"slot","amount":1}],"colour":"red"}'),
                 id="unknown field"),
    pytest.param(req("allocate", demand(amount="0")), id="amount 0"),
    pytest.param(req("allocate", demand(amount="-1")), id="amount negative"),
    pytest.param(req("allocate", demand(amount='"NaN"')), id="amount NaN as a string"),
    pytest.param(req("allocate", demand(amount="1e400")), id="amount 1e400"),
    pytest.param(req("allocate", demand(amount=BIG_INT)), id="amount a 400-digit integer"),
    pytest.param(req("allocate", demand(amount="true")), id="amount a boolean"),
    pytest.param(req("allocate", '{"resources":[{"resource":"\\ud800","amount":1}]}'), id="lone surrogate"),
    pytest.param(req("allocate", '{"resources":[{"resource":"slot","amount":1},{"resource":"slot","amount":-1}]}'),
                 id="good demand then bad demand"),
    pytest.param(req("allocate", '{"resources":[{"resource":"slot","amount":1}],"holder_pid":true}'),
                 id="holder_pid a boolean"),
    pytest.param(req("allocate", demand(amount="0"), id=None), id="notification with bad params"),
    pytest.param(b"[" + req("allocate", demand(amount="0")) + b"," + req("allocate", "{}", id="2") + b"]",
                 id="batch of bad allocations"),
    pytest.param(b"[" + VALID_ALLOCATE + b',{"jsonrpc"]', id="batch that is not JSON"),
    pytest.param(b"[" + b",".join([req("allocate", demand(), id=None)] * (MAX_BATCH + 1)) + b"]",
                 id="batch over MAX_BATCH"),
    pytest.param(req("allocate", "[" * 100_000), id="params nested 100k deep"),
    pytest.param(padded(VALID_ALLOCATE, MAX_MESSAGE_BYTES + 1), id="valid allocate over the size limit"),
    pytest.param(req("allocate", demand("nope")), id="unknown resource"),
    pytest.param(req("allocate", demand("licence")), id="insufficient capacity"),
    pytest.param(req("allocate", demand("slot", "11")), id="never fits"),
    pytest.param(req("allocate", '{"resources":[{"resource":"slot","amount":2}],"idempotency_key":"seed-key"}'),
                 id="idempotency conflict"),
    pytest.param(req("allocate", '{"resources":[{"resource":"slot","amount":1}],"holder_pid":2147483647}'),
                 id="holder does not exist"),
    pytest.param(req("release", '{"id":"0000000000000000"}'), id="release unknown"),
    pytest.param(req("release", '{"id":"@released"}'), id="release released"),
    pytest.param(req("release", '{"id":5}'), id="release id a number"),
    pytest.param(req("release", '{"id":"@held","force":true}'), id="release with unknown field"),
    pytest.param(req("release", '{"id":"@held"}', id="[]"), id="release with an array id"),
    pytest.param(req("resources.add", '{"name":"licence","capacity":1}'), id="add existing"),
    pytest.param(req("resources.add", '{"name":"gpu:9","capacity":1}'), id="add reserved name"),
    pytest.param(req("resources.add", '{"name":"x","capacity":0}'), id="add capacity 0"),
    pytest.param(req("resources.add", '{"name":"x","capacity":1e400}'), id="add capacity 1e400"),
    pytest.param(req("resources.add", '{"name":"x\\ud800","capacity":1}'), id="add lone surrogate name"),
    pytest.param(req("resources.remove", '{"name":"licence"}'), id="remove held"),
    pytest.param(req("resources.remove", '{"name":"nope"}'), id="remove unknown"),
]


# -- success ------------------------------------------------------------------

@pytest.mark.parametrize(("id_text", "expected"), [
    pytest.param('"req-1"', "req-1", id="string"),
    pytest.param('""', "", id="empty string"),
    pytest.param('"\\u00fcn\\u00efcode"', "\u00fcn\u00efcode", id="non-ASCII string"),
    pytest.param('"\\ud800"', "\ud800", id="lone surrogate string"),
    pytest.param("42", 42, id="integer"),
    pytest.param("0", 0, id="zero"),
    pytest.param("-7", -7, id="negative"),
    pytest.param("1.5", 1.5, id="fractional"),
    pytest.param(BIG_INT, int(BIG_INT), id="400-digit integer"),
    pytest.param("null", None, id="null"),
])
def test_a_success_reply_has_jsonrpc_the_same_id_and_a_result(shared: DaemonProcess, id_text: str,
                                                               expected: Any) -> None:
    reply = only_reply(shared, req("daemon.status", id=id_text))
    assert result_of(reply)["version"] == __version__
    assert reply["id"] == expected and type(reply["id"]) is type(expected)


def test_daemon_status_without_params_reports_version_uptime_and_counts(daemon: DaemonProcess) -> None:
    status = daemon.call("daemon.status")
    assert status["version"] == __version__
    assert isinstance(status["uptime_s"], (int, float)) and status["uptime_s"] >= 0
    assert status["resources"] == len(daemon.call("resources.list")) > 0
    assert status["allocations"] == {"active": 0, "queued": 0, "released": 0, "withdrawn": 0}
    assert set(status["decision_cache"]) == {"hits", "misses"}
    assert all(type(count) is int and count >= 0 for count in status["decision_cache"].values())

    me = os.getpid()
    gone = daemon.call("allocate", {"resources": [{"resource": "slot", "amount": 1}], "holder_pid": me})["id"]
    daemon.call("release", {"id": gone})
    daemon.call("allocate", {"resources": [{"resource": "slot", "amount": 1}], "holder_pid": me})
    assert daemon.call("daemon.status")["allocations"] == {"active": 1, "queued": 0, "released": 1, "withdrawn": 0}


@pytest.mark.parametrize("params", ["{}", "[]"])
def test_a_method_without_params_accepts_empty_params(shared: DaemonProcess, params: str) -> None:
    assert result_of(only_reply(shared, req("daemon.status", params)))["version"] == __version__


# -- -32700 parse error -------------------------------------------------------

@pytest.mark.parametrize("data", PARSE_ERRORS)
def test_text_that_is_not_json_is_a_parse_error_with_id_null(shared: DaemonProcess, data: bytes) -> None:
    reply = only_reply(shared, data)
    assert error_of(reply)["code"] == ErrorCode.PARSE_ERROR
    assert reply["id"] is None


# -- -32600 invalid request -----------------------------------------------------

@pytest.mark.parametrize(("data", "expected_id"), INVALID_REQUESTS)
def test_json_that_is_not_a_request_is_an_invalid_request(shared: DaemonProcess, data: bytes,
                                                          expected_id: Any) -> None:
    reply = only_reply(shared, data)
    assert error_of(reply)["code"] == ErrorCode.INVALID_REQUEST
    assert reply["id"] == expected_id


def test_an_empty_batch_gets_one_invalid_request_object_not_an_array(shared: DaemonProcess) -> None:
    reply = only_reply(shared, b"[]")
    assert error_of(reply)["code"] == ErrorCode.INVALID_REQUEST
    assert reply["id"] is None


def test_a_batch_of_non_objects_gets_one_invalid_request_per_entry(shared: DaemonProcess) -> None:
    replies = only_reply(shared, b"[1,2,3]")
    assert isinstance(replies, list) and len(replies) == 3
    for reply in replies:
        assert error_of(reply)["code"] == ErrorCode.INVALID_REQUEST
        assert reply["id"] is None


def test_a_batch_inside_a_batch_is_one_invalid_request(shared: DaemonProcess) -> None:
    replies = only_reply(shared, b"[[" + req("daemon.status") + b"]]")
    assert isinstance(replies, list) and len(replies) == 1
    assert error_of(replies[0])["code"] == ErrorCode.INVALID_REQUEST


def test_a_batch_over_max_batch_gets_one_invalid_request(shared: DaemonProcess) -> None:
    batch = b"[" + b",".join([req("daemon.status", id=None)] * (MAX_BATCH + 1)) + b"]"
    reply = only_reply(shared, batch)
    assert error_of(reply)["code"] == ErrorCode.INVALID_REQUEST
    assert str(MAX_BATCH) in reply["error"]["message"]


# -- batches and notifications --------------------------------------------------

def test_a_mixed_batch_gets_an_array_of_replies_for_its_requests_only(shared: DaemonProcess) -> None:
    batch = b"[" + b",".join([
        req("daemon.status", id="1"),
        req("daemon.status", id=None),
        b'{"foo":"boo"}',
        req("no.such.method", id='"5"'),
        req("no.such.method", id=None),
        req("allocate", "{}", id="9"),
    ]) + b"]"
    replies = only_reply(shared, batch)
    assert isinstance(replies, list) and len(replies) == 4
    by_id = {reply["id"]: reply for reply in replies}
    assert set(by_id) == {1, "5", None, 9}
    assert result_of(by_id[1])["version"] == __version__
    assert error_of(by_id["5"])["code"] == ErrorCode.METHOD_NOT_FOUND
    assert error_of(by_id[None])["code"] == ErrorCode.INVALID_REQUEST
    assert error_of(by_id[9])["code"] == ErrorCode.INVALID_PARAMS


def test_a_batch_of_one_request_gets_an_array_of_one_reply(shared: DaemonProcess) -> None:
    replies = only_reply(shared, b"[" + req("daemon.status", id="3") + b"]")
    assert isinstance(replies, list) and len(replies) == 1
    assert replies[0]["id"] == 3 and result_of(replies[0])["version"] == __version__


def test_a_full_batch_gets_every_reply(shared: DaemonProcess) -> None:
    batch = b"[" + b",".join(req("daemon.status", id=str(n)) for n in range(MAX_BATCH)) + b"]"
    replies = only_reply(shared, batch)
    assert sorted(reply["id"] for reply in replies) == list(range(MAX_BATCH))
    assert all("result" in reply for reply in replies)


def test_a_batch_of_only_notifications_gets_no_reply(shared: DaemonProcess) -> None:
    batch = b"[" + b",".join([req("daemon.status", id=None), req("no.such.method", id=None),
                             req("allocate", "{}", id=None)]) + b"]"
    with Connection(shared.socket) as connection:
        connection.send(batch + b"\n" + STATUS + b"\n")
        assert connection.reply()["id"] == "sentinel"
        connection.send(req("daemon.status", id='"after"') + b"\n")
        assert result_of(connection.reply())["version"] == __version__
        connection.finish_sending()
        assert connection.replies_until_closed() == []


@pytest.mark.parametrize("notification", NOTIFICATIONS)
def test_a_notification_never_gets_a_reply(shared: DaemonProcess, notification: bytes) -> None:
    replies = exchange(shared, notification + b"\n" + STATUS + b"\n")
    assert [reply["id"] for reply in replies] == ["sentinel"]


def test_a_notification_is_still_carried_out(daemon: DaemonProcess) -> None:
    replies = exchange(daemon, req("allocate", demand(), id=None) + b"\n" + req("allocations.list") + b"\n")
    assert len(replies) == 1
    [allocation] = result_of(replies[0])
    assert allocation["items"][0]["resource"] == "slot"


# -- -32601 and -32602 ----------------------------------------------------------

@pytest.mark.parametrize("method", UNKNOWN_METHODS)
def test_an_unknown_method_is_method_not_found(shared: DaemonProcess, method: str) -> None:
    reply = only_reply(shared, req(method, id='"m"'))
    assert error_of(reply)["code"] == ErrorCode.METHOD_NOT_FOUND
    assert reply["id"] == "m"


@pytest.mark.parametrize(("method", "params", "field"), INVALID_PARAMS)
def test_bad_params_are_invalid_params_naming_the_field(shared: DaemonProcess, method: str, params: str,
                                                        field: str) -> None:
    reply = only_reply(shared, req(method, params, id="7"))
    error = error_of(reply)
    assert error["code"] == ErrorCode.INVALID_PARAMS
    assert error["data"] == {"type": "InvalidParams", "field": field}
    assert reply["id"] == 7


def test_positional_params_are_invalid_params(shared: DaemonProcess) -> None:
    reply = only_reply(shared, req("allocate", '[{"resource":"slot","amount":1}]'))
    assert error_of(reply)["code"] == ErrorCode.INVALID_PARAMS
    assert reply["error"]["data"]["type"] == "InvalidParams"


# -- application errors and the one error shape -----------------------------------

@pytest.mark.parametrize(("data", "code", "kind"), APPLICATION_ERRORS)
def test_application_errors_use_codes_outside_the_reserved_range_and_name_their_type(
        shared: DaemonProcess, seeded: Seed, data: bytes, code: ErrorCode, kind: str) -> None:
    error = error_of(only_reply(shared, with_seed(data, seeded)))
    assert error["code"] == code
    assert not -32768 <= error["code"] <= -32000
    assert error["data"]["type"] == kind


@pytest.mark.parametrize("data", [
    pytest.param(b"{", id="parse error"),
    pytest.param(b"[]", id="invalid request"),
    pytest.param(req("nope"), id="method not found"),
    pytest.param(req("allocate", "{}"), id="invalid params"),
    pytest.param(b"[" * 100_000, id="too deep"),
    pytest.param(req("allocate", demand("nope")), id="application error"),
    pytest.param(req("release", '{"id":"@released"}'), id="already released"),
])
def test_every_error_has_exactly_code_message_and_optional_data(shared: DaemonProcess, seeded: Seed,
                                                                 data: bytes) -> None:
    replies = only_reply(shared, with_seed(data, seeded))
    for reply in replies if isinstance(replies, list) else [replies]:
        error_of(reply)


# -- framing --------------------------------------------------------------------

@pytest.mark.parametrize("blank", [b"\n\n", b"\r\n", b"   \n\t\n", b"\n" * 1000])
def test_blank_lines_are_ignored(shared: DaemonProcess, blank: bytes) -> None:
    replies = exchange(shared, blank + STATUS + b"\n" + blank)
    assert [reply["id"] for reply in replies] == ["sentinel"]


def test_requests_on_one_connection_are_answered_in_order(shared: DaemonProcess) -> None:
    methods = ["daemon.status", "resources.list", "nope", "allocations.list", "events.list", "daemon.status"]
    stream = b"".join(req(method, id=str(n)) + b"\n" for n, method in enumerate(methods))
    replies = exchange(shared, stream)
    assert [reply["id"] for reply in replies] == list(range(len(methods)))


def test_a_last_line_without_newline_is_answered_at_eof(shared: DaemonProcess) -> None:
    replies = exchange(shared, STATUS + b"\n" + req("daemon.status", id='"last"'))
    assert [reply["id"] for reply in replies] == ["sentinel", "last"]


def test_a_message_of_exactly_max_message_bytes_is_served(shared: DaemonProcess) -> None:
    reply = only_reply(shared, padded(STATUS, MAX_MESSAGE_BYTES))
    assert reply["id"] == "sentinel" and result_of(reply)["version"] == __version__


def test_an_oversize_message_gets_an_error_and_its_connection_is_closed(daemon: DaemonProcess) -> None:
    with Connection(daemon.socket) as bystander:
        bystander.send(STATUS + b"\n")
        assert bystander.reply()["id"] == "sentinel"
        with Connection(daemon.socket) as sender:
            sender.send(padded(STATUS, MAX_MESSAGE_BYTES + 1) + b"\n")
            reply = sender.reply()
            assert error_of(reply)["code"] == ErrorCode.INVALID_REQUEST
            assert reply["id"] is None
            assert sender.closed_by_daemon()
        bystander.send(req("daemon.status", id='"still here"') + b"\n")
        assert result_of(bystander.reply())["version"] == __version__
    assert daemon.call("daemon.status")["version"] == __version__
    assert daemon.proc is not None and daemon.proc.poll() is None


@pytest.mark.parametrize("data", NESTING)
def test_deep_nesting_is_a_clear_error_and_the_daemon_stays_up(shared: DaemonProcess, data: bytes) -> None:
    reply = only_reply(shared, data)
    error = error_of(reply)
    assert error["code"] == ErrorCode.PARSE_ERROR
    assert "nested" in error["message"]
    assert shared.proc is not None and shared.proc.poll() is None
    assert shared.call("daemon.status")["version"] == __version__


def test_a_half_sent_line_does_not_block_other_clients(shared: DaemonProcess) -> None:
    with Connection(shared.socket) as stalled:
        stalled.send(STATUS + b"\n")
        assert stalled.reply()["id"] == "sentinel"
        stalled.send(b'{"jsonrpc":"2.0","id":"slow",')
        assert [reply["id"] for reply in exchange(shared, req("daemon.status", id='"other"') + b"\n")] == ["other"]
        stalled.send(b'"method":"daemon.status"}\n')
        assert stalled.reply()["id"] == "slow"


# -- state and survival -------------------------------------------------------------

def test_a_granted_allocation_shows_in_the_snapshot(daemon: DaemonProcess) -> None:
    before = daemon.snapshot()
    result_of(only_reply(daemon, VALID_ALLOCATE))
    assert daemon.snapshot() != before


@pytest.mark.parametrize("data", BAD_WRITES)
def test_bad_input_leaves_the_database_unchanged(shared: DaemonProcess, seeded: Seed, data: bytes) -> None:
    before = shared.snapshot()
    replies = exchange(shared, with_seed(data, seeded) + b"\n")
    for reply in replies:
        for one in reply if isinstance(reply, list) else [reply]:
            error_of(one)
    assert shared.snapshot() == before


def test_after_all_the_bad_input_the_daemon_still_serves(daemon: DaemonProcess) -> None:
    ids = seed(daemon)
    cases: list[bytes] = [case.values[0] for table in (PARSE_ERRORS, INVALID_REQUESTS, NOTIFICATIONS, NESTING,
                                                       APPLICATION_ERRORS, BAD_WRITES) for case in table]
    cases += [req(method, params) for method, params, _ in (case.values for case in INVALID_PARAMS)]
    cases += [req(method) for method in UNKNOWN_METHODS]
    for data in cases:
        exchange(daemon, with_seed(data, ids) + b"\n")
    assert daemon.proc is not None and daemon.proc.poll() is None
    assert daemon.call("daemon.status")["allocations"] == {"active": 2, "queued": 0, "released": 1, "withdrawn": 0}
    log = daemon.log()
    assert "Traceback" not in log and "Unhandled exception" not in log, log[-3000:]
