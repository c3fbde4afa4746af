"""The gateway in front of the reference TypeScript server, `server-everything`, where it is installed.

Set SERVER_EVERYTHING to its `dist/index.js` (`npm install @modelcontextprotocol/server-everything`),
or put `mcp-server-everything` on PATH; without node and the server, these tests are skipped.
Its `trigger-long-running-operation` reports progress i of steps and, cancelled, works on to
its end without answering (the TypeScript SDK drops the response of a cancelled request).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import DaemonProcess
from tests.gateway.conftest import alive, allocations, tool_call, until

LONG = "trigger-long-running-operation"
TOOLS = f"""
[server]
name = "everything"

[[tool]]
match = "{LONG}"
gpu = 1
"""


def everything() -> list[str] | None:
    script = os.environ.get("SERVER_EVERYTHING")
    node = shutil.which("node")
    if script and node and Path(script).is_file():
        return [node, script, "stdio"]
    installed = shutil.which("mcp-server-everything")
    return [installed, "stdio"] if installed and node else None


COMMAND = everything()
pytestmark = pytest.mark.skipif(COMMAND is None, reason="server-everything is not installed (see the module doc)")


def children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(child) for child in (task / "children").read_text().split()]
    return found


def test_its_environment_is_the_gateways(gateways: Any) -> None:
    assert COMMAND is not None
    environ = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/root")}
    gateway = gateways(TOOLS, COMMAND, environ=environ)
    gateway.initialize()
    gateway.send(tool_call(1, "get-env"))
    assert json.loads(gateway.response(1, timeout=10)["result"]["content"][0]["text"]) == environ


def test_a_cancelled_operation_keeps_its_gpu_until_its_work_ends(gateways: Any, mcpresd: DaemonProcess) -> None:
    assert COMMAND is not None
    gateway = gateways(TOOLS, COMMAND)
    gateway.initialize()
    gateway.send(tool_call(1, LONG, {"duration": 2, "steps": 4}, token="first"))
    gateway.wait_for(lambda m: m.get("method") == "notifications/progress", timeout=10)
    gateway.send({"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": 1}},
                 tool_call(2, LONG, {"duration": 0.1, "steps": 1}, token="second"))
    gateway.response(2, timeout=20)
    first = [m["params"]["progress"] for m in gateway.messages()
             if m.get("method") == "notifications/progress" and m["params"]["progressToken"] == "first"]
    assert first == [1, 2, 3, 4]  # the second call started only once the first one's work had ended


def test_the_hosts_close_sequence_leaves_no_server_and_no_allocation(gateways: Any, mcpresd: DaemonProcess) -> None:
    assert COMMAND is not None
    gateway = gateways(TOOLS, COMMAND)
    gateway.initialize()
    gateway.send(tool_call(1, LONG, {"duration": 60, "steps": 6}, token="long"))
    [running] = until(lambda: allocations(mcpresd, "active", "everything/"), timeout=10)
    servers = children(running["holder_pid"])
    assert servers and all(alive(pid) for pid in servers)
    gateway.close_stdin()
    status = None
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            status = gateway.proc.wait(2.0)
            break
        except subprocess.TimeoutExpired:
            gateway.proc.send_signal(sig)
    if status is None:
        status = gateway.proc.wait(5)
    assert status != -signal.SIGKILL and not any(alive(pid) for pid in servers)
    until(lambda: mcpresd.call("allocations.get", {"id": running["id"]})["state"] == "released")
