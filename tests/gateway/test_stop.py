"""The server never outlives its gateway, and a call's allocation never ends while the server's processes run.

Agent hosts on the TypeScript SDK (the MCP Inspector among them) end a session
by closing the server's stdin, then SIGTERM 2 s later, then SIGKILL 2 s after
that. `host_closes` replays that sequence against the real gateway; a watcher
reads the allocation and then checks the server's processes, over and over, and
records any moment the allocation had ended while one of them still ran.
"""

from __future__ import annotations

import signal
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import DaemonProcess
from tests.gateway.conftest import (
    FIXTURE,
    PY,
    SCRIPTED,
    GatewayProcess,
    alive,
    allocations,
    parent_of,
    server_pid,
    tool_call,
    until,
)

TOOLS = """
[server]
name = "stop"

[[tool]]
match = "*"
gpu = 1
"""
STUBBORN = {"SCRIPTED_IGNORE_EOF": "1", "SCRIPTED_IGNORE_TERM": "1"}
"""The worst server: it stays when its stdin ends and ignores SIGTERM, so only SIGKILL ends it."""


class ReleaseWatch:
    """Reads an allocation, then whether any of `pids` runs; a violation is an ended allocation beside a live one."""

    def __init__(self, daemon: DaemonProcess, allocation_id: str, pids: list[int]) -> None:
        self.daemon, self.allocation_id, self.pids = daemon, allocation_id, pids
        self.violations: list[str] = []
        self.rounds = 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._done.is_set() and self.rounds < 5000:
            state = self.daemon.call("allocations.get", {"id": self.allocation_id})["state"]
            running = [pid for pid in self.pids if alive(pid)]
            if state != "active" and running:
                self.violations.append(f"allocation {state} while pids {running} run")
            self.rounds += 1
            if state != "active" and not running:
                return
            self._done.wait(0.005)

    def stop(self) -> list[str]:
        self._done.set()
        self._thread.join(10)
        assert self.rounds > 0
        return self.violations


def host_closes(gateway: GatewayProcess) -> int | None:
    """Close stdin; SIGTERM 2 s later, SIGKILL 2 s after that, each only if the gateway still runs. Its status."""
    gateway.close_stdin()
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            return gateway.proc.wait(2.0)
        except subprocess.TimeoutExpired:
            gateway.proc.send_signal(sig)
    return gateway.proc.wait(5)


def start_call(gateways: Any, daemon: DaemonProcess, tmp_path: Path, command: list[str],
               env: dict[str, str]) -> tuple[GatewayProcess, str, list[int]]:
    """A gateway with a gated call running in its server: (gateway, allocation id, the server's pids)."""
    gateway: GatewayProcess = gateways(TOOLS, command, env=env)
    gateway.initialize()
    gateway.send(tool_call(1, "hang"))
    [running] = until(lambda: allocations(daemon, "active", "stop/"))
    keeper = running["holder_pid"]
    assert parent_of(keeper) == gateway.proc.pid
    scripted = server_pid(tmp_path / "server.tap") if SCRIPTED in " ".join(command) else None
    pids = until(lambda: descendants(keeper) if scripted is None or scripted in descendants(keeper) else None)
    return gateway, running["id"], pids


def descendants(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            found += [int(child), *descendants(int(child))]
    return found


COMMANDS = {
    "server": lambda tap: [PY, SCRIPTED, tap],
    "server-under-a-shell": lambda tap: ["/bin/sh", "-c", f"'{PY}' '{SCRIPTED}' '{tap}'; echo gone >&2"],
    "python-sdk-server": lambda tap: [PY, FIXTURE],  # its hang blocks its event loop: it sees neither EOF nor cancel
}


@pytest.mark.parametrize("how", COMMANDS)
def test_the_hosts_close_sequence_stops_the_server_before_the_gateway_exits_and_releases_after(
        gateways: Any, mcpresd: DaemonProcess, tmp_path: Path, how: str) -> None:
    command = COMMANDS[how](str(tmp_path / "server.tap"))
    gateway, allocation_id, pids = start_call(gateways, mcpresd, tmp_path, command, STUBBORN)
    watch = ReleaseWatch(mcpresd, allocation_id, pids)
    status = host_closes(gateway)
    still = [pid for pid in pids if alive(pid)]
    assert still == []  # gone by the time the gateway is
    assert status != -signal.SIGKILL  # the gateway stopped the server and exited before the host's SIGKILL
    until(lambda: mcpresd.call("allocations.get", {"id": allocation_id})["state"] == "released")
    assert watch.stop() == []
    if how != "python-sdk-server":
        assert "SIGKILL" in gateway.stderr()  # it took SIGKILL: the server ignored its stdin closing and SIGTERM


@pytest.mark.parametrize("env", [{}, STUBBORN], ids=["plain", "stubborn"])
def test_a_sigkilled_gateways_server_is_stopped_and_only_then_its_allocation_released(
        gateways: Any, mcpresd: DaemonProcess, tmp_path: Path, env: dict[str, str]) -> None:
    command = COMMANDS["server"](str(tmp_path / "server.tap"))
    gateway, allocation_id, pids = start_call(gateways, mcpresd, tmp_path, command, env)
    watch = ReleaseWatch(mcpresd, allocation_id, pids)
    gateway.kill(signal.SIGKILL)
    gateway.wait(5)
    until(lambda: not any(alive(pid) for pid in pids), timeout=5)  # the keeper's parent-death signal
    shown = until(lambda: (lambda a: a if a["state"] == "released" else None)(
        mcpresd.call("allocations.get", {"id": allocation_id})), timeout=5)
    assert shown["release_reason"] == "holder_exited"
    assert watch.stop() == []
