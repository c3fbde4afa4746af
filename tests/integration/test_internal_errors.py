"""An unexpected exception in a method becomes one INTERNAL_ERROR (-32603) reply, logged with its traceback, and
the daemon goes on serving; a request whose line never ends is cut off without holding up anyone else.

The broken method is a fake handler put in the real dispatch table of a real in-process daemon (tests/live.py),
for one test: a function that raises, where a bug would.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mcpresd import rpc
from mcpresd.protocol import MAX_MESSAGE_BYTES, ErrorCode
from tests.conftest import CONFIG, DaemonProcess
from tests.live import LiveDaemon

BROKEN = "daemon.status"


class Bug(Exception):
    """What a bug raises: no domain error, no storage error."""


def raises_in_the_store_job(broker: Any, caller: Any, command: Any) -> Any:
    raise Bug("a bug in a method")


def raises_while_parsing(raw: Any) -> Any:
    raise Bug("a bug in a parser")


@pytest.fixture
def live(tmp_path: Path) -> Iterator[LiveDaemon]:
    daemon = LiveDaemon(tmp_path).start()
    try:
        yield daemon
    finally:
        daemon.close()


def exchange(live: LiveDaemon, lines: list[bytes]) -> list[Any]:
    """Send lines on one connection, half-close it, and return every reply line as JSON."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(live.socket)
        sock.sendall(b"".join(lines))
        sock.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return [json.loads(line) for line in data.splitlines()]


def request(id: int, method: str, params: dict[str, Any] | None = None) -> bytes:
    return json.dumps({"jsonrpc": "2.0", "id": id, "method": method, "params": params or {}}).encode() + b"\n"


@pytest.mark.parametrize("broken", [
    pytest.param(rpc.Handler(rpc.params.no_params, raises_in_the_store_job), id="in the method"),
    pytest.param(rpc.Handler(raises_while_parsing, raises_in_the_store_job), id="in its parser"),
])
def test_an_unexpected_exception_is_one_internal_error_reply_and_the_daemon_serves_on(
        live: LiveDaemon, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
        broken: rpc.Handler) -> None:
    monkeypatch.setitem(rpc._BY_NAME, BROKEN, broken)
    caplog.set_level(logging.ERROR)

    replies = exchange(live, [request(1, BROKEN), request(2, "resources.list"),
                              b"[" + request(3, BROKEN).rstrip() + b"," + request(4, "resources.list").rstrip() + b"]\n"])

    first, second, batch = replies
    assert (first["id"], first["error"]["code"], first["error"]["data"]) == \
        (1, ErrorCode.INTERNAL_ERROR, {"type": "InternalError"})
    assert "a bug" not in first["error"]["message"]  # the traceback goes to the log, not to the client
    assert second["id"] == 2 and "licence" in {r["name"] for r in second["result"]}
    assert [(r["id"], "error" in r) for r in batch] == [(3, True), (4, False)]
    assert batch[0]["error"]["code"] == ErrorCode.INTERNAL_ERROR
    assert any(record.exc_info and record.exc_info[0] is Bug for record in caplog.records), caplog.text


def test_the_daemon_still_grants_after_a_method_raised(live: LiveDaemon, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(rpc._BY_NAME, BROKEN, rpc.Handler(rpc.params.no_params, raises_in_the_store_job))
    exchange(live, [request(1, BROKEN)])
    monkeypatch.undo()

    granted = live.call("allocate", {"resources": [{"resource": "licence", "amount": 2}], "holder_pid": 1})

    assert granted["state"] == "active"
    assert live.call("daemon.status")["allocations"]["active"] == 1


# -- a line that never ends -------------------------------------------------------------


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[DaemonProcess]:
    process = DaemonProcess(tmp_path, config=CONFIG + '\n[limits]\nidle_timeout = "2s"\n')
    process.start()
    try:
        yield process
    finally:
        process.stop()


def test_a_line_over_the_size_limit_without_a_newline_is_cut_off_and_others_are_served(
        daemon: DaemonProcess) -> None:
    with socket.socket(socket.AF_UNIX) as endless:
        endless.settimeout(10)
        endless.connect(daemon.socket)
        sent = 0
        chunk = b"x" * 65536
        try:
            while sent <= 2 * MAX_MESSAGE_BYTES:
                endless.sendall(chunk)
                sent += len(chunk)
                if sent == 8 * len(chunk):  # mid-line: another client is served meanwhile
                    assert daemon.call("daemon.status")["version"]
        except (BrokenPipeError, ConnectionResetError):
            pass  # the daemon stopped reading and closed it
        data = b""
        try:
            while chunk := endless.recv(65536):
                data += chunk
        except ConnectionResetError:
            pass
    [reply] = [json.loads(line) for line in data.splitlines()]
    assert reply["id"] is None and reply["error"]["code"] == ErrorCode.INVALID_REQUEST
    assert f"longer than {MAX_MESSAGE_BYTES} bytes" in reply["error"]["message"]
    assert daemon.call("daemon.status")["version"]


def test_a_client_that_never_finishes_its_line_is_closed_while_others_are_served(daemon: DaemonProcess) -> None:
    """Bytes keep coming, a few at a time, but no newline: the idle timeout counts from the line's start."""
    with socket.socket(socket.AF_UNIX) as trickle:
        trickle.connect(daemon.socket)
        trickle.sendall(b'{"jsonrpc":"2.0","id":1,"method":"daemon.status","params":{"pad":"')
        closed = threading.Event()
        received: list[bytes] = []

        def read() -> None:
            trickle.settimeout(30)
            data = b""
            try:
                while chunk := trickle.recv(65536):
                    data += chunk
            except (ConnectionResetError, TimeoutError):
                pass
            received.append(data)
            closed.set()

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        served = 0
        while not closed.is_set():
            try:
                trickle.sendall(b"x")
            except (BrokenPipeError, ConnectionResetError):
                break
            assert daemon.call("daemon.status")["version"]  # others are served meanwhile
            served += 1
            closed.wait(0.05)
        assert closed.wait(30), "the daemon never closed a line that does not end"
        reader.join(10)
    [reply] = [json.loads(line) for line in received[0].splitlines()]
    assert reply["error"]["code"] == ErrorCode.INVALID_REQUEST and "not finished within" in reply["error"]["message"]
    assert served > 0
