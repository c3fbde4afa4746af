"""The gateway's test rig: one real mcpresd for the folder, real gateways as subprocesses, raw-line taps.

A test drives a gateway's stdin and reads its stdout line by line (GatewayProcess),
or hands it to the SDK's clients as a stdio server (gateway_params). Wrapped
servers record every line they read (servers/scripted.py, or servers/tap.py in
front of any command), so a test can compare both sides of the gateway byte for byte.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from mcpctl.client import Client, RpcError
from tests.conftest import DaemonProcess

PY = sys.executable
SERVERS = Path(__file__).resolve().parent / "servers"
SCRIPTED = str(SERVERS / "scripted.py")
FIXTURE = str(SERVERS / "fixture_server.py")
TAP = str(SERVERS / "tap.py")
BIN = Path(sys.executable).parent

INIT = {"jsonrpc": "2.0", "id": 0, "method": "initialize",
        "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "raw", "version": "1"}}}
_numbers = itertools.count()


def line(message: dict[str, Any] | bytes) -> bytes:
    return message if isinstance(message, bytes) else json.dumps(message, separators=(",", ":")).encode() + b"\n"


def tool_call(request_id: Any, name: str, arguments: dict[str, Any] | None = None, token: Any = None,
              **params: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"name": name, "arguments": arguments or {}, **params}
    if token is not None:
        body["_meta"] = {"progressToken": token}
    return {"jsonrpc": "2.0", "id": request_id, "method": "tools/call", "params": body}


def tap_lines(path: Path | str) -> list[bytes]:
    """The lines a tap or the scripted server recorded, byte for byte."""
    data = Path(path).read_bytes() if Path(path).exists() else b""
    return data.splitlines(keepends=True)


def tap_times(path: Path | str) -> list[float]:
    text = Path(str(path) + ".times").read_text() if Path(str(path) + ".times").exists() else ""
    return [float(row.split()[0]) for row in text.splitlines()]


def until(predicate: Any, timeout: float = 5.0, interval: float = 0.01) -> Any:
    """Poll `predicate` until it returns something true; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {timeout}s: {getattr(predicate, '__name__', predicate)}")
        time.sleep(interval)


def server_pid(tap: Path | str, timeout: float = 5.0) -> int:
    """The pid servers/scripted.py wrote beside its tap."""
    pid_file = Path(str(tap) + ".pid")
    return int(until(lambda: pid_file.exists() and pid_file.read_text(), timeout))


def parent_of(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat[stat.rindex(")") + 2:].split()[1])


def alive(pid: int) -> bool:
    """Whether the process runs (a zombie does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


MCPCTL = str(Path(PY).parent / "mcpctl")


class GatewayProcess:
    """The installed `mcpctl gateway` as an agent host runs it, with its stdin and stdout in the test's hands."""

    def __init__(self, tmp: Path, socket: str, tools: str, command: list[str], *, name: str | None = None,
                 env: dict[str, str] | None = None, environ: dict[str, str] | None = None,
                 wrapper: list[str] | None = None) -> None:
        number = next(_numbers)
        self.tools_path = tmp / f"tools-{number}.toml"
        self.tools_path.write_text(tools)
        self.stderr_path = tmp / f"gateway-{number}.err"
        args = [MCPCTL, "--socket", socket, "gateway", "--tools", str(self.tools_path)]
        if name is not None:
            args += ["--name", name]
        self.args = [*(wrapper or []), *args, "--", *command]
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(self.args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
                                         env=environ if environ is not None else {**os.environ, **(env or {})})
        self.received: list[bytes] = []
        self.arrivals: list[float] = []
        self._lines: queue.Queue[bytes | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in iter(self.proc.stdout.readline, b""):
            self._lines.put(raw)
        self._lines.put(None)

    def send(self, *messages: dict[str, Any] | bytes) -> None:
        assert self.proc.stdin is not None
        for message in messages:
            self.proc.stdin.write(line(message))
        self.proc.stdin.flush()

    def recv(self, timeout: float = 5.0) -> bytes:
        try:
            raw = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no line from the gateway within {timeout}s; stderr:\n{self.stderr()}") from None
        if raw is None:
            self._lines.put(None)
            raise AssertionError(f"the gateway closed its stdout; stderr:\n{self.stderr()}")
        self.received.append(raw)
        self.arrivals.append(time.time())
        return raw

    def recv_json(self, timeout: float = 5.0) -> Any:
        return json.loads(self.recv(timeout))

    def wait_for(self, match: Callable[[dict[str, Any]], bool], timeout: float = 5.0) -> dict[str, Any]:
        """Read lines until a message matches; the others stay in `received`."""
        deadline = time.monotonic() + timeout
        while True:
            raw = self.recv(max(0.01, deadline - time.monotonic()))
            try:
                message = json.loads(raw)
            except ValueError:
                continue
            if isinstance(message, dict) and match(message):
                return message

    def response(self, request_id: Any, timeout: float = 5.0) -> dict[str, Any]:
        """Read lines until the response to `request_id`."""
        return self.wait_for(lambda m: "method" not in m and m.get("id") == request_id, timeout)

    def quiet(self, seconds: float) -> list[bytes]:
        """Whatever arrives within `seconds` (expected: nothing)."""
        got = []
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            try:
                raw = self._lines.get(timeout=left)
            except queue.Empty:
                break
            if raw is None:
                self._lines.put(None)
                break
            got.append(raw)
            self.received.append(raw)
            self.arrivals.append(time.time())
        return got

    def messages(self) -> list[Any]:
        """What the gateway wrote so far that is JSON."""
        found = []
        for raw in self.received:
            try:
                found.append(json.loads(raw))
            except ValueError:
                pass
        return found

    def initialize(self) -> None:
        self.send(INIT)
        self.response(0)
        self.send({"jsonrpc": "2.0", "method": "notifications/initialized"})

    def close_stdin(self) -> None:
        assert self.proc.stdin is not None
        with contextlib.suppress(OSError):
            self.proc.stdin.close()

    def wait(self, timeout: float = 10.0) -> int:
        return self.proc.wait(timeout)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""

    def stop(self) -> None:
        self.close_stdin()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="session")
def mcpresd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    """One daemon for the folder (CONFIG: licence cap 2, slot cap 10, a replayed gpu:0)."""
    process = DaemonProcess(tmp_path_factory.mktemp("gateway-daemon"))
    process.start()
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture(autouse=True)
def _nothing_left_behind(request: pytest.FixtureRequest) -> Iterator[None]:
    """Each test starts from a free machine, whatever an earlier one left."""
    yield
    if "mcpresd" not in request.fixturenames:
        return
    daemon: DaemonProcess = request.getfixturevalue("mcpresd")
    with daemon.client() as client:
        for state in ("queued", "active"):
            for allocation in client.call("allocations.list", {"state": state}):
                with contextlib.suppress(RpcError):
                    client.call("release", {"id": allocation["id"]})


@pytest.fixture
def gateways(tmp_path: Path, mcpresd: DaemonProcess) -> Iterator[Any]:
    """A factory of gateways on the shared daemon; each is stopped at the end of the test."""
    started: list[GatewayProcess] = []

    def start(tools: str, command: list[str] | None = None, *, tap: str = "server", name: str | None = None,
              socket: str | None = None, env: dict[str, str] | None = None,
              environ: dict[str, str] | None = None, wrapper: list[str] | None = None) -> GatewayProcess:
        command = command or [PY, SCRIPTED, str(tmp_path / f"{tap}.tap")]
        gateway = GatewayProcess(tmp_path, socket or mcpresd.socket, tools, command, name=name, env=env,
                                 environ=environ, wrapper=wrapper)
        started.append(gateway)
        return gateway

    yield start
    for gateway in started:
        gateway.stop()


@contextlib.contextmanager
def holding(daemon: DaemonProcess, resource: str = "gpu", amount: float = 1,
            tool_id: str = "test/holder") -> Iterator[dict[str, Any]]:
    """Hold a resource on a connection of the test's own, for the length of the block."""
    client = Client(daemon.socket, timeout=10.0)
    try:
        yield client.call("allocate", {"resources": [{"resource": resource, "amount": amount}],
                                       "tool_id": tool_id})
    finally:
        client.close()


def allocations(daemon: DaemonProcess, state: str = "all", tool_prefix: str = "") -> list[dict[str, Any]]:
    rows = daemon.call("allocations.list", {"state": state})
    return [row for row in rows if (row.get("tool_id") or "").startswith(tool_prefix)]
