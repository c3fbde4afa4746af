"""Real agents through the gateway: the SDK's ClientSession (2025-11-25) and Client in auto mode (2026-07-28).

Wrapped servers: servers/fixture_server.py (built with the SDK's MCPServer) and
the unmodified `mcp-server-time` and `mcp-server-git` from PyPI. A tap on each
side of the gateway (servers/tap.py) records the raw lines, so each test can
check that every message crossed it unchanged.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client, ClientSession, StdioServerParameters, stdio_client

from tests.conftest import DaemonProcess
from tests.gateway.conftest import BIN, FIXTURE, MCPCTL, PY, TAP, allocations, tap_lines, tap_times, until
from tests.gateway.servers.fixture_server import UNICODE_TEXT

pytestmark = pytest.mark.anyio
TIMEOUT = 30


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def gateway(tmp: Path, socket: str, tools: str, server: list[str], label: str) -> StdioServerParameters:
    """The gateway named `label`, with a tap on each side: tmp/<label>-client and tmp/<label>-server.

    The daemon is shared by the folder's tests: a name of the test's own keeps its tool ids apart.
    """
    tools_path = tmp / f"{label}.toml"
    tools_path.write_text(tools)
    command = [MCPCTL, "--socket", socket, "gateway", "--tools", str(tools_path),
               "--name", label, "--", PY, TAP, str(tmp / f"{label}-server"), "--", *server]
    return StdioServerParameters(command=PY, args=[TAP, str(tmp / f"{label}-client"), "--", *command])


def assert_identical_both_ways(tmp: Path, label: str) -> None:
    client_side, server_side = tmp / f"{label}-client", tmp / f"{label}-server"
    sent = tap_lines(client_side / "in.log")
    assert sent and sent == tap_lines(server_side / "in.log")
    received = tap_lines(server_side / "out.log")
    assert received and received == tap_lines(client_side / "out.log")


async def released(daemon: DaemonProcess, tool_id: str, count: int = 1) -> list[dict[str, Any]]:
    def check() -> list[dict[str, Any]]:
        rows = [a for a in allocations(daemon, "all") if a["tool_id"] == tool_id]
        return rows if len(rows) == count and all(a["state"] == "released" for a in rows) else []
    return await anyio.to_thread.run_sync(lambda: until(check, timeout=5))


FIXTURE_TOOLS = """
[[tool]]
match = "noise"

[[tool]]
match = "*"
res = ["slot=1"]
"""


async def test_a_2025_11_25_session_gets_every_message_unchanged(mcpresd: DaemonProcess, tmp_path: Path) -> None:
    params = gateway(tmp_path, mcpresd.socket, FIXTURE_TOOLS, [PY, FIXTURE], "legacy")
    progress: list[tuple[float, float | None, str | None]] = []

    async def on_progress(value: float, total: float | None, message: str | None) -> None:
        progress.append((value, total, message))

    with anyio.fail_after(TIMEOUT):
        async with stdio_client(params) as (read, write), ClientSession(read, write) as session:
            assert (await session.initialize()).protocol_version == "2025-11-25"
            names = {tool.name for tool in (await session.list_tools()).tools}
            assert {"sleep", "progress", "big", "unicode", "noise", "crash", "hang"} <= names
            big = await session.call_tool("big", {"size": 1024 * 1024})
            unicode = await session.call_tool("unicode", {})
            noise = await session.call_tool("noise", {"lines": 5})
            steps = await session.call_tool("progress", {"steps": 3}, progress_callback=on_progress)
            await session.send_ping()
    assert len(big.content[0].text) == 1024 * 1024
    assert unicode.content[0].text == UNICODE_TEXT
    assert noise.content[0].text == "5 lines of noise"
    assert steps.content[0].text == "3 steps"
    assert progress == [(1, 3, "step 1"), (2, 3, "step 2"), (3, 3, "step 3")]
    for tool in ("big", "unicode", "progress"):
        await released(mcpresd, f"legacy/{tool}")
    assert not [a for a in allocations(mcpresd) if a["tool_id"] == "legacy/noise"]
    assert_identical_both_ways(tmp_path, "legacy")


async def test_a_2026_07_28_client_gets_every_message_unchanged(mcpresd: DaemonProcess, tmp_path: Path) -> None:
    params = gateway(tmp_path, mcpresd.socket, FIXTURE_TOOLS, [PY, FIXTURE], "modern")
    with anyio.fail_after(TIMEOUT):
        async with Client(params, mode="auto") as client:
            assert client.protocol_version == "2026-07-28"
            unicode = await client.call_tool("unicode", {})
            big = await client.call_tool("big", {"size": 1024 * 1024})
    assert unicode.content[0].text == UNICODE_TEXT
    assert len(big.content[0].text) == 1024 * 1024
    await released(mcpresd, "modern/unicode")
    await released(mcpresd, "modern/big")
    first = json.loads(tap_lines(tmp_path / "modern-server" / "in.log")[0])
    assert first["method"] == "server/discover"
    assert_identical_both_ways(tmp_path, "modern")


GPU_TOOLS = """
[server]
progress_interval = "200ms"

[[tool]]
match = "*"
gpu = 1
"""


async def test_two_agents_contending_for_one_gpu_take_turns_with_progress_while_waiting(
        mcpresd: DaemonProcess, tmp_path: Path) -> None:
    first = gateway(tmp_path, mcpresd.socket, GPU_TOOLS, [PY, FIXTURE], "first")
    second = gateway(tmp_path, mcpresd.socket, GPU_TOOLS, [PY, FIXTURE], "second")
    progress: list[tuple[float, float | None, str | None]] = []

    async def on_progress(value: float, total: float | None, message: str | None) -> None:
        progress.append((value, total, message))

    with anyio.fail_after(TIMEOUT):
        async with Client(first, mode="auto") as a, Client(second, mode="auto") as b:
            async def first_agent() -> None:
                assert (await a.call_tool("sleep", {"seconds": 1.2})).content[0].text == "slept 1.2"

            async with anyio.create_task_group() as group:
                group.start_soon(first_agent)
                await anyio.to_thread.run_sync(lambda: until(lambda: allocations(mcpresd, "active", "first/")))
                result = await b.call_tool("progress", {"steps": 3}, progress_callback=on_progress)
            assert result.content[0].text == "3 steps"
    answered = [t for raw, t in zip(tap_lines(tmp_path / "first-client" / "out.log"),
                                    tap_times(tmp_path / "first-client" / "out.log"))
                if json.loads(raw).get("result", {}).get("structuredContent") == {"result": "slept 1.2"}]
    reached = [t for raw, t in zip(tap_lines(tmp_path / "second-server" / "in.log"),
                                   tap_times(tmp_path / "second-server" / "in.log"))
               if json.loads(raw).get("method") == "tools/call"]
    assert len(answered) == 1 and len(reached) == 1
    assert reached[0] > answered[0]  # the second call reached its server only after the first's response
    values = [value for value, _, _ in progress]
    assert all(x < y for x, y in zip(values, values[1:])), values
    injected = [p for p in progress if (p[2] or "").startswith("mcpres: second/progress waits for gpu 1")]
    assert len(injected) >= 2 and "held by first/sleep" in str(injected[0][2])
    n = len(injected)
    assert progress[n:] == [(n + 1 + k, n + 1 + 3, f"step {k}") for k in (1, 2, 3)]
    await released(mcpresd, "first/sleep")
    await released(mcpresd, "second/progress")


async def test_unmodified_mcp_server_time_through_the_gateway(mcpresd: DaemonProcess, tmp_path: Path) -> None:
    tools = '[[tool]]\nmatch = "get_*"\nres = { licence = 1 }\n'
    params = gateway(tmp_path, mcpresd.socket, tools, [str(BIN / "mcp-server-time")], "time")
    with anyio.fail_after(TIMEOUT):
        async with stdio_client(params) as (read, write), ClientSession(read, write) as session:
            await session.initialize()
            now = await session.call_tool("get_current_time", {"timezone": "UTC"})
            converted = await session.call_tool("convert_time", {"source_timezone": "UTC", "time": "12:00",
                                                                 "target_timezone": "Asia/Tokyo"})
    assert json.loads(now.content[0].text)["timezone"] == "UTC"
    assert "21:00" in converted.content[0].text
    [held] = await released(mcpresd, "time/get_current_time")
    assert [i["resource"] for i in held["items"]] == ["licence"]
    assert not [a for a in allocations(mcpresd) if a["tool_id"] == "time/convert_time"]
    assert_identical_both_ways(tmp_path, "time")


async def test_unmodified_mcp_server_git_through_the_gateway(mcpresd: DaemonProcess, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    (repo / "new.txt").write_text("hello\n")
    tools = '[[tool]]\nmatch = "git_*"\ncpu = 0.5\npriority = "high"\n'
    params = gateway(tmp_path, mcpresd.socket, tools, [str(BIN / "mcp-server-git"), "--repository", str(repo)], "git")
    with anyio.fail_after(TIMEOUT):
        async with Client(params, mode="auto") as client:
            status = await client.call_tool("git_status", {"repo_path": str(repo)})
    assert "new.txt" in status.content[0].text
    [held] = await released(mcpresd, "git/git_status")
    assert held["priority"] == "high"
    assert_identical_both_ways(tmp_path, "git")


async def test_a_server_that_crashes_mid_call_ends_the_gateway_and_releases(mcpresd: DaemonProcess,
                                                                           tmp_path: Path) -> None:
    tools_path = tmp_path / "crash.toml"
    tools_path.write_text(FIXTURE_TOOLS)
    proc = await anyio.open_process([PY, "-m", "mcpctl.gateway", "--socket", mcpresd.socket, "--tools",
                                     str(tools_path), "--name", "crash", "--", PY, FIXTURE])
    assert proc.stdin is not None and proc.stdout is not None
    init = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
            "params": {"protocolVersion": "2025-11-25", "capabilities": {},
                       "clientInfo": {"name": "t", "version": "1"}}}
    call = {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "crash", "arguments": {"code": 9}}}
    with anyio.fail_after(TIMEOUT):
        await proc.stdin.send(json.dumps(init).encode() + b"\n")
        assert b'"id":1' in await proc.stdout.receive()
        await proc.stdin.send(b'{"jsonrpc":"2.0","method":"notifications/initialized"}\n' + json.dumps(call).encode()
                              + b"\n")
        assert await proc.wait() == 9
    [held] = await released(mcpresd, "crash/crash")
    assert held["release_reason"] in ("released", "holder_exited")  # by the gateway, or as its keeper exited
