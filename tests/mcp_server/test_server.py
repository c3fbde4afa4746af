"""`mcpctl mcp-server` as an agent meets it: a real mcpresd, the server as a subprocess, both eras of SDK client."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from typing import Any

import anyio
import pytest
from mcp_types import CallToolResult, TextResourceContents

from mcpctl.client import RpcError
from mcpresd.protocol import ErrorCode
from tests.conftest import H100_UUID, DaemonProcess
from tests.mcp_server.conftest import ERAS, LEGACY, ROOT, Era, agent, eventually, first_sample, server_command

pytestmark = pytest.mark.anyio
TOOLS = {"host_status", "list_allocations", "allocate", "release", "explain"}
BOUND_S = 30.0
"""No test here runs longer than this, whatever goes wrong."""


def text(result: CallToolResult) -> str:
    return "\n".join(block.text for block in result.content if block.type == "text")


def structured(result: CallToolResult) -> dict[str, Any]:
    assert not result.is_error, text(result)
    assert result.structured_content is not None
    content: dict[str, Any] = result.structured_content
    return content


def hold_licences(daemon: DaemonProcess, seats: int) -> dict[str, Any]:
    """Seats of the licence held by this test process, as a script would hold them."""
    allocation: dict[str, Any] = daemon.call("allocate", {
        "resources": [{"resource": "licence", "amount": seats}], "holder_pid": os.getpid(), "tool_id": "script"})
    return allocation


def daemon_error(daemon: DaemonProcess, params: dict[str, Any]) -> RpcError:
    with pytest.raises(RpcError) as caught:
        daemon.call("allocate", params)
    return caught.value


@pytest.mark.parametrize("era", ERAS)
async def test_the_tools_are_listed_with_input_and_output_schemas(daemon: DaemonProcess, era: Era) -> None:
    with anyio.fail_after(BOUND_S):
        async with agent(daemon.socket, era) as session:
            tools = {tool.name: tool for tool in (await session.list_tools()).tools}
    assert set(tools) == TOOLS
    allocate = tools["allocate"]
    assert {"cpu", "mem", "gpu", "resources", "pool", "priority", "wait", "detach", "ttl", "tool_id"} \
        <= set(allocate.input_schema["properties"])
    assert allocate.input_schema.get("required", []) == []
    assert tools["release"].input_schema["required"] == ["handle"]
    assert tools["explain"].input_schema["required"] == ["handle"]
    for tool in tools.values():
        assert tool.description and tool.output_schema is not None, tool.name
    assert allocate.output_schema is not None
    assert {"handle", "granted", "env", "allocation"} <= set(allocate.output_schema["properties"])
    hints = {name: tool.annotations for name, tool in tools.items()}
    assert {name for name, hint in hints.items() if hint is not None and hint.read_only_hint} == {
        "host_status", "list_allocations", "explain"}
    assert {name for name, hint in hints.items() if hint is not None and hint.destructive_hint} == {"release"}


@pytest.mark.parametrize("era", ERAS)
async def test_host_status_shows_resources_with_what_is_allocated_free_and_measured(
        daemon: DaemonProcess, era: Era) -> None:
    await first_sample(daemon)
    hold_licences(daemon, 1)
    with anyio.fail_after(BOUND_S):
        async with agent(daemon.socket, era) as session:
            result = await session.call_tool("host_status", {})
    status = structured(result)
    by_name = {r["name"]: r for r in status["resources"]}
    assert by_name["licence"]["capacity"] == 2 and by_name["licence"]["allocated"] == 1
    assert by_name["licence"]["free"] == 1 and "utilisation_rate" in by_name["licence"]["metrics"]
    assert isinstance(by_name["cpu"]["metrics"]["utilisation"], float)
    assert isinstance(by_name["gpu:0"]["metrics"]["temperature_c"], float)
    assert status["sampled_at"] is not None and status["daemon"]["allocations"]["active"] == 1
    assert status["alerts"] == [] and status["held_by_this_session"] == []
    words = text(result)
    assert "licence: 1 of 2 seats allocated, 1 free" in words
    assert "gpu:0 (NVIDIA H100 80GB HBM3): 0 of 1 device allocated, 1 free; measured busy" in words
    assert "cpu: " in words and "memory: " in words and "no alerts firing" in words


@pytest.mark.parametrize("era", ERAS)
async def test_allocate_returns_a_handle_the_daemon_shows_active_held_by_the_server_with_its_tool_id(
        daemon: DaemonProcess, era: Era) -> None:
    with anyio.fail_after(BOUND_S):
        async with agent(daemon.socket, era) as session:
            result = await session.call_tool("allocate", {"gpu": 1, "resources": {"licence": 1}, "mem": "1G",
                                                          "ttl": 600, "tool_id": "agent/train"})
            handle = structured(result)
            shown = daemon.call("allocations.get", {"id": handle["handle"]})
            listed = structured(await session.call_tool("list_allocations", {}))
    assert shown["state"] == "active" and shown["tool_id"] == "agent/train" and shown["ttl_s"] == 600
    assert shown["holder"] == "connection" and shown["holder_pid"] is None
    assert {i["resource"]: i["amount"] for i in shown["items"]} == {"gpu:0": 1, "licence": 1, "memory": 2 ** 30}
    assert handle["state"] == "active" and handle["expires_at"] == shown["expires_at"]
    assert {g["resource"] for g in handle["granted"]} == {"gpu:0", "licence", "memory"}
    assert handle["env"] == {"MCPRES_ALLOCATION_ID": handle["handle"], "CUDA_VISIBLE_DEVICES": H100_UUID,
                             "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    assert f"CUDA_VISIBLE_DEVICES={H100_UUID}" in text(result) and handle["handle"] in text(result)
    assert listed["held_by_this_session"] == [handle["handle"]]
    assert [a["id"] for a in listed["allocations"]] == [handle["handle"]]


@pytest.mark.parametrize("era", ERAS)
async def test_release_frees_the_handle_at_once(daemon: DaemonProcess, era: Era) -> None:
    with anyio.fail_after(BOUND_S):
        async with agent(daemon.socket, era) as session:
            handle = structured(await session.call_tool("allocate", {"resources": {"licence": 2}}))["handle"]
            released = await session.call_tool("release", {"handle": handle})
            shown = daemon.call("allocations.get", {"id": handle})
            again = await session.call_tool("release", {"handle": handle})
    assert structured(released)["state"] == "released" and f"released {handle}" in text(released)
    assert shown["state"] == "released" and shown["release_reason"] == "released"
    assert {r["name"]: r["allocated"] for r in daemon.call("resources.list", {"type": "custom"})}["licence"] == 0
    assert again.is_error and f"allocation {handle} was already released" in text(again)


async def test_release_refuses_what_this_session_did_not_allocate(daemon: DaemonProcess) -> None:
    script = hold_licences(daemon, 1)
    with anyio.fail_after(BOUND_S):
        async with agent(daemon.socket, LEGACY) as session:
            refused = await session.call_tool("release", {"handle": script["id"]})
    assert refused.is_error and "not an allocation of this session" in text(refused)
    assert daemon.call("allocations.get", {"id": script["id"]})["state"] == "active"


@pytest.mark.parametrize("era", ERAS)
async def test_explain_says_why_a_queued_request_waits_and_who_holds_what_it_needs(
        daemon: DaemonProcess, era: Era) -> None:
    blocker = hold_licences(daemon, 2)
    with anyio.fail_after(BOUND_S):
        async with agent(daemon.socket, era) as session:
            queued = structured(await session.call_tool(
                "allocate", {"resources": {"licence": 1}, "wait": 60, "detach": True}))
            result = await session.call_tool("explain", {"handle": queued["handle"]})
            why = structured(result)
            state = daemon.call("allocations.get", {"id": queued["handle"]})["state"]
    assert queued["state"] == "queued" and queued["granted"] == [] and queued["env"] == {}
    assert state == "queued"
    assert why["queued"] and why["state"] == "queued" and why["detail"]["position"] == 1
    assert [b["id"] for b in why["detail"]["blockers"]] == [blocker["id"]]
    assert why["summary"].startswith(f"{queued['handle']} is queued, position 1 of 1")
    words = text(result)
    assert f"allocation {queued['handle']} is queued: position 1 of 1" in words
    assert "licence: asks 1, free 0 of 2" in words and blocker["id"] in words


@pytest.mark.parametrize("era", ERAS)
async def test_a_waiting_allocate_reports_progress_and_is_granted_when_the_blocker_goes(
        daemon: DaemonProcess, era: Era) -> None:
    blocker = hold_licences(daemon, 2)
    reports: list[tuple[float, float | None, str | None]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        reports.append((progress, total, message))

    async def release_blocker_once_queued() -> None:
        await eventually(lambda: daemon.call("allocations.list", {"state": "queued"}), within=10)
        daemon.call("release", {"id": blocker["id"]})

    with anyio.fail_after(BOUND_S):
        async with agent(daemon.socket, era) as session, anyio.create_task_group() as tasks:
            tasks.start_soon(release_blocker_once_queued)
            result = await session.call_tool("allocate", {"resources": {"licence": 1}, "wait": 20},
                                             progress_callback=on_progress)
    granted = structured(result)
    assert granted["state"] == "active" and granted["granted"][0]["resource"] == "licence"
    assert reports, "no progress while queued"
    value, total, message = reports[0]
    assert value >= 0 and total == 20
    assert message is not None and message.startswith(f"{granted['handle']} is queued, position 1 of 1")


@pytest.mark.parametrize("era", ERAS)
async def test_a_refused_allocation_is_a_tool_error_with_the_daemons_message(daemon: DaemonProcess, era: Era) -> None:
    never = daemon_error(daemon, {"resources": [{"resource": "licence", "amount": 3}]})
    unknown = daemon_error(daemon, {"resources": [{"resource": "fpga", "amount": 1}]})
    hold_licences(daemon, 2)
    busy = daemon_error(daemon, {"resources": [{"resource": "licence", "amount": 1}]})
    assert (never.code, unknown.code, busy.code) == (ErrorCode.NEVER_FITS, ErrorCode.UNKNOWN_RESOURCE,
                                                     ErrorCode.INSUFFICIENT_CAPACITY)
    with anyio.fail_after(BOUND_S):
        async with agent(daemon.socket, era) as session:
            results = [await session.call_tool("allocate", {"resources": {name: amount}})
                       for name, amount in (("licence", 3), ("fpga", 1), ("licence", 1))]
    for result, error in zip(results, (never, unknown, busy)):
        assert result.is_error and text(result).startswith(error.message), (text(result), error.message)
    assert "pass wait (seconds) to queue" in text(results[2])
    assert [a["tool_id"] for a in daemon.call("allocations.list", {"state": "all"})] == ["script"]  # nothing made


async def test_a_wait_that_runs_out_is_a_tool_error_and_leaves_nothing_held(daemon: DaemonProcess) -> None:
    hold_licences(daemon, 2)
    with anyio.fail_after(BOUND_S):
        async with agent(daemon.socket, LEGACY) as session:
            result = await session.call_tool("allocate", {"resources": {"licence": 1}, "wait": 0.5})
    assert result.is_error and "its wait ran out" in text(result)
    [withdrawn] = daemon.call("allocations.list", {"state": "withdrawn"})
    assert withdrawn["release_reason"] == "timeout"


@pytest.mark.parametrize("era", ERAS)
async def test_cancelling_a_waiting_allocate_withdraws_the_request(daemon: DaemonProcess, era: Era) -> None:
    hold_licences(daemon, 2)
    with anyio.fail_after(BOUND_S):
        async with agent(daemon.socket, era) as session:
            with anyio.move_on_after(1.0):
                await session.call_tool("allocate", {"resources": {"licence": 1}, "wait": 60})
            withdrawn = await eventually(lambda: daemon.call("allocations.list", {"state": "withdrawn"}))
    assert withdrawn[0]["release_reason"] == "cancelled"
    assert daemon.call("allocations.list", {"state": "queued"}) == []


@pytest.mark.parametrize("era", ERAS)
async def test_utilisation_and_resources_are_readable_as_json(daemon: DaemonProcess, era: Era) -> None:
    await first_sample(daemon)
    with anyio.fail_after(BOUND_S):
        async with agent(daemon.socket, era) as session:
            listed = {str(r.uri): r for r in (await session.list_resources()).resources}
            utilisation = (await session.read_resource("mcpres://host/utilisation")).contents
            resources = (await session.read_resource("mcpres://resources")).contents
    assert set(listed) == {"mcpres://host/utilisation", "mcpres://resources"}
    assert all(r.mime_type == "application/json" and r.description for r in listed.values())
    assert isinstance(utilisation[0], TextResourceContents) and isinstance(resources[0], TextResourceContents)
    current = json.loads(utilisation[0].text)
    assert current["ts"] is not None and "utilisation" in current["resources"]["cpu"]
    assert "temperature_c" in current["resources"]["gpu:0"]
    assert {r["name"]: r["capacity"] for r in json.loads(resources[0].text)}["slot"] == 10


@pytest.mark.parametrize("era", ERAS)
async def test_the_server_exiting_releases_what_it_held(daemon: DaemonProcess, era: Era) -> None:
    with anyio.fail_after(BOUND_S):
        async with agent(daemon.socket, era) as session:
            active = structured(await session.call_tool("allocate", {"resources": {"licence": 2}}))["handle"]
            queued = structured(await session.call_tool(
                "allocate", {"resources": {"licence": 1}, "wait": "forever", "detach": True}))["handle"]
            assert daemon.call("allocations.get", {"id": active})["state"] == "active"
        ended = await eventually(lambda: [a for a in daemon.call("allocations.list", {"state": "all"})
                                          if a["state"] in ("released", "withdrawn")], within=1.0)
    assert {a["id"]: (a["state"], a["release_reason"]) for a in ended} == {
        active: ("released", "connection_closed"), queued: ("withdrawn", "connection_closed")}


async def test_a_killed_server_releases_what_it_held(daemon: DaemonProcess) -> None:
    """SIGKILL leaves no time to clean up: the daemon sees the holding connection close."""
    lines = [
        {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": LEGACY, "capabilities": {}, "clientInfo": {"name": "raw", "version": "0"}}},
        {"jsonrpc": "2.0", "method": "notifications/initialized"},
        {"jsonrpc": "2.0", "id": 2, "method": "tools/call",
         "params": {"name": "allocate", "arguments": {"resources": {"slot": 3}}}},
    ]
    server = subprocess.Popen(server_command(daemon.socket), cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL)
    try:
        assert server.stdin is not None and server.stdout is not None
        server.stdin.write(b"".join(json.dumps(line).encode() + b"\n" for line in lines))
        server.stdin.flush()
        with anyio.fail_after(BOUND_S):
            replies = [json.loads(await anyio.to_thread.run_sync(server.stdout.readline)) for _ in range(2)]
        handle = replies[1]["result"]["structuredContent"]["handle"]
        assert daemon.call("allocations.get", {"id": handle})["state"] == "active"
        server.send_signal(signal.SIGKILL)
        server.wait(5)
        shown = await eventually(lambda: (lambda a: a if a["state"] == "released" else None)(
            daemon.call("allocations.get", {"id": handle})), within=1.0)
        assert shown["release_reason"] == "connection_closed"
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


async def test_an_absent_daemon_is_a_tool_error_not_a_dead_server(daemon: DaemonProcess) -> None:
    with anyio.fail_after(BOUND_S):
        async with agent(daemon.socket + ".missing", LEGACY) as session:
            status = await session.call_tool("host_status", {})
            allocation = await session.call_tool("allocate", {"cpu": 1})
    for result in (status, allocation):
        assert result.is_error and "cannot reach mcpresd at" in text(result) and "is mcpresd running?" in text(result)


async def test_after_a_daemon_restart_the_agent_hears_its_allocations_are_gone_and_carries_on(
        daemon: DaemonProcess) -> None:
    with anyio.fail_after(BOUND_S):
        async with agent(daemon.socket, LEGACY) as session:
            handle = structured(await session.call_tool("allocate", {"resources": {"licence": 1}}))["handle"]
            daemon.restart()
            lost = await session.call_tool("host_status", {})
            again = await session.call_tool("host_status", {})
            regranted = await session.call_tool("allocate", {"resources": {"licence": 2}})
    assert lost.is_error and f"the daemon released what this session held on that connection ({handle})" in text(lost)
    assert not again.is_error and structured(regranted)["state"] == "active"
    assert daemon.call("allocations.get", {"id": handle})["release_reason"] == "connection_closed"


@pytest.mark.parametrize("era", ERAS)
async def test_released_expired_and_timed_out_handles_leave_the_sessions_list(daemon: DaemonProcess, era: Era) -> None:
    with anyio.fail_after(BOUND_S):
        async with agent(daemon.socket, era) as session:
            kept = structured(await session.call_tool("allocate", {"resources": {"licence": 2}}))["handle"]
            released = structured(await session.call_tool("allocate", {"resources": {"slot": 1}}))["handle"]
            await session.call_tool("release", {"handle": released})
            expired = structured(await session.call_tool("allocate", {"resources": {"slot": 2}, "ttl": 0.2}))["handle"]
            timed_out = structured(await session.call_tool(
                "allocate", {"resources": {"licence": 1}, "wait": 0.2, "detach": True}))["handle"]
            await eventually(lambda: daemon.call("allocations.get", {"id": expired})["state"] == "released"
                             and daemon.call("allocations.get", {"id": timed_out})["state"] == "withdrawn", within=5)
            status = await session.call_tool("host_status", {})
            listing = await session.call_tool("list_allocations", {"state": "all"})
            again = await session.call_tool("release", {"handle": expired})
    assert structured(status)["held_by_this_session"] == [kept] and "this session holds 1." in text(status)
    assert structured(listing)["held_by_this_session"] == [kept]
    assert [row.split()[0] for row in text(listing).splitlines() if "held by this session" in row] == [kept]
    assert again.is_error and f"allocation {expired} was already released" in text(again)


async def test_after_a_daemon_restart_only_what_the_connection_held_is_said_to_be_released(
        daemon: DaemonProcess) -> None:
    with anyio.fail_after(BOUND_S):
        async with agent(daemon.socket, LEGACY) as session:
            released = structured(await session.call_tool("allocate", {"resources": {"slot": 1}}))["handle"]
            await session.call_tool("release", {"handle": released})
            expired = structured(await session.call_tool("allocate", {"resources": {"slot": 2}, "ttl": 0.2}))["handle"]
            held = structured(await session.call_tool("allocate", {"resources": {"licence": 1}}))["handle"]
            await eventually(lambda: daemon.call("allocations.get", {"id": expired})["state"] == "released", within=5)
            daemon.restart()
            lost = await session.call_tool("host_status", {})
            again = structured(await session.call_tool("host_status", {}))
    assert lost.is_error and f"the daemon released what this session held on that connection ({held})" in text(lost)
    assert again["held_by_this_session"] == []
