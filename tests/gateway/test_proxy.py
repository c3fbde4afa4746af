"""The gateway as a proxy, driven with raw lines: fidelity, admission, release, cancellation, tasks, shutdown.

Every test runs the real gateway (`python -m mcpctl.gateway`) against the shared
daemon, wrapping servers/scripted.py, which records every line it reads.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import DaemonProcess
from tests.gateway.conftest import (
    INIT,
    PY,
    SCRIPTED,
    TAP,
    allocations,
    holding,
    line,
    parent_of,
    server_pid,
    tap_lines,
    tap_times,
    tool_call,
    until,
)

SLOT_TOOLS = """
[[tool]]
match = "slow"
res = ["slot=1"]
"""
GATED = """
[server]
name = "raw"
progress_interval = "200ms"

[[tool]]
match = "free_*"

[[tool]]
match = "*"
gpu = 1
wait = "{wait}"
priority = "{priority}"
"""


def gated(wait: str = "30s", priority: str = "normal") -> str:
    return GATED.format(wait=wait, priority=priority)


def text_of(response: dict[str, Any]) -> str:
    return str(response["result"]["content"][0]["text"])


def test_every_ungated_message_passes_byte_for_byte_both_ways(gateways: Any, tmp_path: Path) -> None:
    server_out = tmp_path / "server-side"
    gateway = gateways(gated(), [PY, TAP, str(server_out), "--", PY, SCRIPTED, str(tmp_path / "server.tap")])
    odd_lines = ['{"jsonrpc":"2.0","method":"notifications/message","params":{"data":"caf\\u00e9 \\n \\u2028"}}',
                 "this is not JSON {", '{  "spaced" :  [1, 2.50, 1e3] , "key":"日本語"  }']
    sent = [
        line(INIT),
        b'{"jsonrpc":"2.0","method":"notifications/initialized"}\n',
        b'{ "jsonrpc" : "2.0", "id" : "p1", "method" : "ping" }\n',
        b"not json at all, passed on\n",
        b'{"jsonrpc":"2.0","id":7,"method":"tools/list","params":{"_meta":{"x":"\xc3\xa9\\u00e9"}}}\n',
        line(tool_call(8, "free_echo", {"s": "\u00e9\\n"})),
        line(tool_call(9, "raw", {"lines": odd_lines})),  # gated
        line(tool_call(10, "ask")),  # gated: it waits for 9 to finish
    ]
    gateway.send(*sent)
    for request_id in ("p1", 7, 8, 9):
        gateway.response(request_id)
    ask = gateway.wait_for(lambda m: m.get("method") == "sampling/createMessage")
    assert ask["id"] == 10  # the server's own request, in its own id space, numbered like the client's call
    answer = b'{"jsonrpc":"2.0","id":10,"result":{"role":"assistant","content":{"type":"text","text":"hi"}}}\n'
    gateway.send(answer)
    assert "client said" in text_of(gateway.response(10))
    assert tap_lines(tmp_path / "server.tap") == [*sent, answer]  # what the client sent, as it sent it
    assert gateway.received == tap_lines(server_out / "out.log")  # what the server wrote, as it wrote it
    assert b"this is not JSON {\n" in gateway.received
    assert not any(b"notifications/progress" in raw for raw in gateway.received)


def test_a_gated_call_holds_an_allocation_while_it_runs_and_releases_it_within_100ms(
        gateways: Any, mcpresd: DaemonProcess, tmp_path: Path) -> None:
    gateway = gateways(gated())
    gateway.initialize()
    gateway.send(tool_call(1, "slow", {"seconds": 0.5}))
    running = until(lambda: allocations(mcpresd, "active", "raw/"))
    assert running[0]["tool_id"] == "raw/slow"
    assert running[0]["execution_id"].endswith("/1")
    assert running[0]["holder"] == "pid"  # the server's keeper: the server's parent, the gateway's child
    assert running[0]["holder_pid"] == parent_of(server_pid(tmp_path / "server.tap"))
    assert parent_of(running[0]["holder_pid"]) == gateway.proc.pid
    assert [i["resource"] for i in running[0]["items"]] == ["gpu:0"]
    response = gateway.response(1)
    answered = time.time()
    assert text_of(response) == "slow done"
    released = until(lambda: [a for a in allocations(mcpresd, "released", "raw/") if a["id"] == running[0]["id"]])
    assert released[0]["released_at"] - answered < 0.1
    assert released[0]["release_reason"] == "released"


def test_list_ping_and_ungated_calls_pass_at_once_while_gated_calls_wait(
        gateways: Any, mcpresd: DaemonProcess, tmp_path: Path) -> None:
    gateway = gateways(gated())
    gateway.initialize()
    with holding(mcpresd):
        gateway.send(tool_call(1, "echo", {"n": 1}))
        until(lambda: allocations(mcpresd, "queued", "raw/"))
        started = time.monotonic()
        gateway.send({"jsonrpc": "2.0", "id": 2, "method": "ping"},
                     {"jsonrpc": "2.0", "id": 3, "method": "tools/list"}, tool_call(4, "free_x"))
        gateway.response(2)
        gateway.response(3)
        gateway.response(4)
        assert time.monotonic() - started < 0.5
        gateway.send(tool_call(5, "echo", {"n": 5}))  # queued after the gateway subscribed to events
        until(lambda: len(allocations(mcpresd, "queued", "raw/")) == 2)
        assert not any(json.loads(raw).get("id") in (1, 5) for raw in gateway.received)
    assert json.loads(text_of(gateway.response(1))) == {"n": 1}
    assert json.loads(text_of(gateway.response(5))) == {"n": 5}
    calls = [json.loads(raw)["id"] for raw in tap_lines(tmp_path / "server.tap") if b"tools/call" in raw]
    assert calls == [4, 1, 5]


def test_a_queued_call_gets_progress_that_strictly_increases_into_the_servers_own(
        gateways: Any, mcpresd: DaemonProcess) -> None:
    gateway = gateways(gated())
    gateway.initialize()
    with holding(mcpresd):
        gateway.send(tool_call(1, "slow", {"seconds": 0.1}, token="tok"))
        gateway.quiet(0.7)
    assert text_of(gateway.response(1)) == "slow done"
    progress = [m["params"] for m in gateway.messages() if m.get("method") == "notifications/progress"]
    assert all(p["progressToken"] == "tok" for p in progress)
    injected = [p for p in progress if p.get("message", "").startswith("mcpres: ")]
    assert len(injected) >= 3
    assert "raw/slow waits for gpu 1" in injected[0]["message"]
    assert "1 of 1 in the queue" in injected[0]["message"]
    assert "held by test/holder" in injected[0]["message"]
    values = [p["progress"] for p in progress]
    assert all(a < b for a, b in zip(values, values[1:])), values  # strictly, across the hand-off
    n = len(injected)
    assert [p["progress"] for p in injected] == list(range(1, n + 1))
    server = progress[n:]  # the server sent 0, 1, 2 of 2: moved up by n + 1, total too
    assert [(p["progress"], p["total"]) for p in server] == [(n + 1 + k, n + 1 + 2) for k in range(3)]


def test_a_queued_calls_progress_shows_what_others_named_escaped(gateways: Any, mcpresd: DaemonProcess) -> None:
    # The tool id of the allocation a call waits for is another's (an admin's gateway sees it): a bidi override
    # or an 8-bit CSI in it reaches the MCP client's reader as its escape, not obeyed.
    gateway = gateways(gated())
    gateway.initialize()
    with holding(mcpresd, tool_id="evil\u202e\x9b2Jtool"):
        gateway.send(tool_call(1, "slow", {"seconds": 0.1}, token="tok"))
        gateway.quiet(0.7)
    assert text_of(gateway.response(1)) == "slow done"
    injected = [m["params"]["message"] for m in gateway.messages()
                if m.get("method") == "notifications/progress" and m["params"].get("message", "").startswith("mcpres: ")]
    assert injected and "held by evil\\u202e\\x9b2Jtool" in injected[0], injected


def test_no_progress_is_injected_without_a_progress_token(gateways: Any, mcpresd: DaemonProcess) -> None:
    gateway = gateways(gated())
    gateway.initialize()
    with holding(mcpresd):
        gateway.send(tool_call(1, "echo"))
        assert gateway.quiet(0.5) == []


def test_cancel_while_queued_withdraws_and_the_server_never_sees_the_call(
        gateways: Any, mcpresd: DaemonProcess, tmp_path: Path) -> None:
    gateway = gateways(gated())
    gateway.initialize()
    with holding(mcpresd):
        gateway.send(tool_call(1, "echo", token=1))
        queued = until(lambda: allocations(mcpresd, "queued", "raw/"))
        gateway.send({"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": 1}})
        withdrawn = until(lambda: [a for a in allocations(mcpresd, "withdrawn") if a["id"] == queued[0]["id"]])
        assert withdrawn[0]["release_reason"] == "cancelled"
    gateway.send({"jsonrpc": "2.0", "id": 2, "method": "ping"})
    gateway.response(2)
    assert [json.loads(raw).get("id") for raw in gateway.quiet(0.3)] == []
    assert not any(m.get("id") == 1 and "method" not in m for m in gateway.messages())
    methods = [json.loads(raw).get("method") for raw in tap_lines(tmp_path / "server.tap")]
    assert methods == ["initialize", "notifications/initialized", "ping"]


def test_cancel_while_running_is_forwarded_and_keeps_the_allocation_until_the_server_answers(
        gateways: Any, mcpresd: DaemonProcess, tmp_path: Path) -> None:
    gateway = gateways(gated())
    gateway.initialize()
    gateway.send(tool_call(1, "slow", {"seconds": 3, "late": True, "keep_on": True}))
    [running] = until(lambda: allocations(mcpresd, "active", "raw/"))
    cancel = b'{"jsonrpc":"2.0","method":"notifications/cancelled","params":{"requestId":1,"reason":"user"}}\n'
    gateway.send(cancel, tool_call(2, "echo", {"n": 2}))  # gpu 1 too: it must wait for the cancelled call's answer
    until(lambda: tap_lines(tmp_path / "server.tap")[-1] == cancel)
    assert mcpresd.call("allocations.get", {"id": running["id"]})["state"] == "active"
    assert text_of(gateway.response(1)) == "slow done (late)"  # the server's answer still passes
    assert json.loads(text_of(gateway.response(2))) == {"n": 2}
    answers = [m.get("id") for m in gateway.messages() if "method" not in m and m.get("id") in (1, 2)]
    assert answers == [1, 2]  # call 2 reached the server only after it answered the cancelled call 1
    assert mcpresd.call("allocations.get", {"id": running["id"]})["release_reason"] == "released"


def test_a_cancelled_call_the_server_never_answers_is_released_when_cancel_grace_runs_out(
        gateways: Any, mcpresd: DaemonProcess, tmp_path: Path) -> None:
    gateway = gateways(gated().replace('name = "raw"', 'name = "raw"\ncancel_grace = "300ms"'))
    gateway.initialize()
    gateway.send(tool_call(1, "slow", {"seconds": 30}))
    [running] = until(lambda: allocations(mcpresd, "active", "raw/"))
    gateway.send({"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": 1}},
                 tool_call(2, "echo", {"n": 2}))
    assert json.loads(text_of(gateway.response(2))) == {"n": 2}
    assert mcpresd.call("allocations.get", {"id": running["id"]})["release_reason"] == "released"
    assert "no answer from the server 0.3s after its cancellation: releasing" in gateway.stderr()


def test_a_wait_that_runs_out_answers_with_a_readable_tool_error_and_holds_nothing(
        gateways: Any, mcpresd: DaemonProcess, tmp_path: Path) -> None:
    gateway = gateways(gated(wait="500ms"))
    gateway.initialize()
    with holding(mcpresd):
        gateway.send(tool_call(1, "echo"))
        response = gateway.response(1, timeout=5)
    result = response["result"]
    assert result["isError"] is True
    assert result["content"][0]["text"].startswith("mcpres: raw/echo did not run: it waited 0.5s for gpu 1")
    assert allocations(mcpresd, "withdrawn", "raw/")[0]["release_reason"] == "timeout"
    assert not allocations(mcpresd, "active", "raw/") and not allocations(mcpresd, "queued", "raw/")
    assert [json.loads(raw)["method"] for raw in tap_lines(tmp_path / "server.tap")] == \
        ["initialize", "notifications/initialized"]


def test_a_request_that_can_never_fit_is_answered_at_once_with_the_daemons_reason(gateways: Any) -> None:
    gateway = gateways(GATED.replace("gpu = 1", "gpu = 2").format(wait="1m", priority="normal"))
    gateway.initialize()
    started = time.monotonic()
    gateway.send(tool_call(1, "echo"))
    result = gateway.response(1)["result"]
    assert time.monotonic() - started < 2
    assert result["isError"] is True
    assert result["content"][0]["text"].startswith("mcpres: raw/echo did not run: ")
    assert "1 matching GPU(s), fewer than the 2 asked" in result["content"][0]["text"]


def test_the_higher_priority_call_reaches_its_server_first(gateways: Any, mcpresd: DaemonProcess,
                                                           tmp_path: Path) -> None:
    low = gateways(gated(priority="low"), tap="low", name="low")
    high = gateways(gated(priority="high"), tap="high", name="high")
    low.initialize()
    high.initialize()
    with holding(mcpresd):
        low.send(tool_call(1, "echo"))
        until(lambda: allocations(mcpresd, "queued", "low/"))
        high.send(tool_call(1, "echo"))
        until(lambda: allocations(mcpresd, "queued", "high/"))
    high.response(1)
    low.response(1)

    def both_released() -> dict[str, Any] | None:
        rows = {a["tool_id"]: a for a in allocations(mcpresd, "released") if a["tool_id"] in ("low/echo", "high/echo")}
        return rows if len(rows) == 2 else None

    ended = until(both_released)
    assert ended["high/echo"]["granted_at"] < ended["low/echo"]["granted_at"]
    assert tap_times(tmp_path / "high.tap")[-1] < tap_times(tmp_path / "low.tap")[-1]


def test_two_servers_with_same_named_tools_get_different_tool_ids(gateways: Any, mcpresd: DaemonProcess) -> None:
    alpha = gateways(SLOT_TOOLS, tap="alpha", name="alpha")
    beta = gateways(SLOT_TOOLS, tap="beta", name="beta")
    for gateway in (alpha, beta):
        gateway.initialize()
        gateway.send(tool_call(1, "slow", {"seconds": 0.5}))
    both = until(lambda: {a["tool_id"] for a in allocations(mcpresd, "active")} >= {"alpha/slow", "beta/slow"})
    assert both
    executions = {a["execution_id"] for a in allocations(mcpresd, "active")}
    assert len(executions) == 2 and all(e.endswith("/1") for e in executions)
    alpha.response(1)
    beta.response(1)


def test_input_required_releases_and_the_retry_is_admitted_again(gateways: Any, mcpresd: DaemonProcess) -> None:
    gateway = gateways(gated())
    gateway.initialize()
    gateway.send(tool_call(1, "input"))
    assert gateway.response(1)["result"]["resultType"] == "input_required"
    until(lambda: len(allocations(mcpresd, "released", "raw/input")) == 1)
    gateway.send(tool_call(2, "input", inputResponses={"confirm": {"action": "accept"}}))
    gateway.response(2)
    until(lambda: len(allocations(mcpresd, "released", "raw/input")) == 2)
    assert not allocations(mcpresd, "active", "raw/")


def test_a_task_keeps_its_allocation_until_the_task_completes(gateways: Any, mcpresd: DaemonProcess) -> None:
    gateway = gateways(gated())
    gateway.initialize()
    gateway.send(tool_call(1, "task", {"task_id": "t-1", "finish_after": 0.6}, task={"ttl": 60000}))
    assert gateway.response(1)["result"]["task"]["status"] == "working"
    assert allocations(mcpresd, "active", "raw/task")
    status = gateway.wait_for(lambda m: m.get("method") == "notifications/tasks/status")
    assert status["params"]["status"] == "completed"
    until(lambda: not allocations(mcpresd, "active", "raw/task"), timeout=1)


def test_a_task_is_released_when_the_client_learns_it_has_ended(gateways: Any, mcpresd: DaemonProcess) -> None:
    gateway = gateways(gated())
    gateway.initialize()
    gateway.send(tool_call(1, "task", {"task_id": "t-3"}))
    gateway.response(1)
    time.sleep(0.1)
    assert allocations(mcpresd, "active", "raw/task")
    gateway.send({"jsonrpc": "2.0", "id": 2, "method": "tasks/get", "params": {"taskId": "t-3"}})
    assert gateway.response(2)["result"]["status"] == "completed"
    until(lambda: not allocations(mcpresd, "active", "raw/task"), timeout=1)


def test_a_task_without_news_is_released_when_its_ttl_runs_out(gateways: Any, mcpresd: DaemonProcess) -> None:
    gateway = gateways(gated())
    gateway.initialize()
    gateway.send(tool_call(1, "task", {"task_id": "t-2", "ttl": 400, "modern": True}))
    assert gateway.response(1)["result"]["resultType"] == "task"
    assert allocations(mcpresd, "active", "raw/task")
    time.sleep(0.2)
    assert allocations(mcpresd, "active", "raw/task")
    until(lambda: not allocations(mcpresd, "active", "raw/task"), timeout=2)


def test_closing_stdin_stops_the_server_withdraws_and_releases_and_exits_with_its_status(
        gateways: Any, mcpresd: DaemonProcess) -> None:
    gateway = gateways(gated().replace('name = "raw"', 'name = "raw"\nstop_grace = "300ms"'),
                       env={"SCRIPTED_IGNORE_EOF": "1", "SCRIPTED_IGNORE_TERM": "1"})
    gateway.initialize()
    gateway.send(tool_call(1, "hang"))
    until(lambda: allocations(mcpresd, "active", "raw/"))
    gateway.send(tool_call(2, "echo"))
    until(lambda: allocations(mcpresd, "queued", "raw/"))
    gateway.close_stdin()
    assert gateway.wait(10) == 128 + signal.SIGKILL  # it ignored both its stdin closing and SIGTERM
    assert not allocations(mcpresd, "active", "raw/") and not allocations(mcpresd, "queued", "raw/")
    assert gateway.response(2)["error"]["code"] == 1103
    stderr = gateway.stderr()
    assert "SIGTERM" in stderr and "SIGKILL" in stderr
    assert all(row.startswith("mcpctl gateway: ") for row in stderr.splitlines())


def test_a_server_that_exits_on_end_of_input_gives_the_gateway_its_status(gateways: Any) -> None:
    gateway = gateways(gated())
    gateway.initialize()
    gateway.close_stdin()
    assert gateway.wait(5) == 0


def test_a_crashing_server_ends_the_gateway_with_its_status_and_releases(gateways: Any,
                                                                         mcpresd: DaemonProcess) -> None:
    gateway = gateways(gated())
    gateway.initialize()
    with holding(mcpresd, "licence", 2):
        gateway.send(tool_call(1, "crash", {"code": 7}))
        assert gateway.wait(5) == 7
    assert not allocations(mcpresd, "active", "raw/")


def test_broker_down_open_passes_calls_through_with_one_warning(gateways: Any, tmp_path: Path) -> None:
    gateway = gateways(gated(), socket=str(tmp_path / "nobody.sock"))
    gateway.initialize()
    for number in (1, 2):
        gateway.send(tool_call(number, "echo", {"n": number}))
        assert json.loads(text_of(gateway.response(number))) == {"n": number}
    warnings = [row for row in gateway.stderr().splitlines() if "cannot reach mcpresd" in row]
    assert len(warnings) == 1 and "ungated" in warnings[0]


def test_broker_down_closed_refuses_gated_calls_with_a_gateway_error(gateways: Any, tmp_path: Path) -> None:
    tools = gated().replace('name = "raw"', 'name = "raw"\non_broker_down = "closed"')
    gateway = gateways(tools, socket=str(tmp_path / "nobody.sock"))
    gateway.initialize()
    gateway.send(tool_call(1, "echo"), tool_call(2, "free_echo"))
    error = gateway.response(1)["error"]
    assert error["code"] == 1101 and not -32768 <= error["code"] <= -32000
    assert "mcpresd is unreachable" in error["message"]
    assert "result" in gateway.response(2)  # an ungated tool still works


@pytest.mark.parametrize("mode", ["open", "closed"])
def test_losing_the_broker_while_a_call_waits_follows_on_broker_down_and_reconnects(
        gateways: Any, tmp_path: Path, mode: str) -> None:
    (tmp_path / "own").mkdir()
    daemon = DaemonProcess(tmp_path / "own")
    daemon.start()
    try:
        tools = gated().replace('name = "raw"', f'name = "raw"\non_broker_down = "{mode}"\n'
                                                 'reconnect_interval = "200ms"')
        gateway = gateways(tools, socket=daemon.socket)
        gateway.initialize()
        with holding(daemon):
            gateway.send(tool_call(1, "echo", {"n": 1}))
            until(lambda: daemon.call("allocations.list", {"state": "queued"}))
            daemon.kill()
        if mode == "closed":
            assert gateway.response(1)["error"]["code"] == 1101
        else:
            assert json.loads(text_of(gateway.response(1))) == {"n": 1}  # sent on, ungated
        daemon.start()
        until(lambda: "reachable again" in gateway.stderr(), timeout=5)
        gateway.send(tool_call(2, "slow", {"seconds": 0.3}))
        until(lambda: [a for a in daemon.call("allocations.list") if a["tool_id"] == "raw/slow"])
        assert text_of(gateway.response(2)) == "slow done"
    finally:
        daemon.stop()


def test_sigterm_answers_waiting_calls_and_stops_the_server_at_once(gateways: Any, mcpresd: DaemonProcess) -> None:
    gateway = gateways(gated(), env={"SCRIPTED_IGNORE_EOF": "1"})  # it would stay for an hour after its stdin ends
    gateway.initialize()
    with holding(mcpresd):
        gateway.send(tool_call(1, "echo"))
        until(lambda: allocations(mcpresd, "queued", "raw/"))
        gateway.kill(signal.SIGTERM)
        assert gateway.response(1)["error"]["code"] == 1103
        assert gateway.wait(5) == 128 + signal.SIGTERM  # not stop_grace later: SIGTERM went to the server at once
    assert "SIGTERM: stopping the server" in gateway.stderr()
    assert not allocations(mcpresd, "queued", "raw/")


def test_a_line_of_several_mebibytes_passes_both_ways(gateways: Any, tmp_path: Path) -> None:
    gateway = gateways(gated())
    gateway.initialize()
    payload = "é" * (3 * 1024 * 1024)
    request = line(tool_call(1, "free_echo", {"payload": payload}))
    gateway.send(request)
    assert json.loads(text_of(gateway.response(1, timeout=10)))["payload"] == payload
    assert tap_lines(tmp_path / "server.tap")[-1] == request
    gateway.send(tool_call(2, "big", {"size": 5 * 1024 * 1024}))
    assert len(text_of(gateway.response(2, timeout=10))) == 5 * 1024 * 1024


@pytest.mark.parametrize("id_last", [False, True], ids=["id-first", "id-last"])
def test_a_result_over_32_mib_is_delivered_and_releases_its_allocation(
        gateways: Any, mcpresd: DaemonProcess, id_last: bool) -> None:
    gateway = gateways(gated())
    gateway.initialize()
    size = 33 * 1024 * 1024
    gateway.send(tool_call(1, "big", {"size": size, "id_last": id_last}))
    response = gateway.response(1, timeout=30)
    assert text_of(response) == "x" * size
    until(lambda: not allocations(mcpresd, "active", "raw/"), timeout=5)
    assert [a["release_reason"] for a in allocations(mcpresd, "released", "raw/big")][:1] == ["released"]
    gateway.send(tool_call(2, "echo", {"n": 2}))  # gpu 1 again: it runs only if the big call's gpu was released
    assert json.loads(text_of(gateway.response(2))) == {"n": 2}


@pytest.mark.parametrize("id_last", [False, True], ids=["id-first", "id-last"])
def test_a_tools_call_over_32_mib_is_refused_not_passed_on_ungated(
        gateways: Any, mcpresd: DaemonProcess, tmp_path: Path, id_last: bool) -> None:
    gateway = gateways(gated())
    gateway.initialize()
    before = {a["id"] for a in allocations(mcpresd, "all", "raw/")}
    payload = "x" * (33 * 1024 * 1024)
    call = tool_call(1, "echo", {"payload": payload})  # gated: it takes a GPU
    if id_last:
        call = {"method": call["method"], "params": call["params"], "jsonrpc": "2.0", "id": 1}
    gateway.send(call)
    refused = gateway.response(1, timeout=30)
    assert refused["error"]["code"] == 1104
    assert "over 32M" in refused["error"]["message"] and "not passed on" in refused["error"]["message"]
    assert not [raw for raw in tap_lines(tmp_path / "server.tap") if b"payload" in raw]  # the server never saw it
    assert {a["id"] for a in allocations(mcpresd, "all", "raw/")} == before  # nothing allocated for it
    assert "too long to examine" in gateway.stderr()
    gateway.send(tool_call(2, "echo", {"n": 2}))  # the next line is examined as usual: gated
    assert json.loads(text_of(gateway.response(2))) == {"n": 2}
    assert [a["tool_id"] for a in allocations(mcpresd, "all", "raw/") if a["id"] not in before] == ["raw/echo"]


def test_a_client_answer_over_32_mib_to_the_servers_request_is_passed_on(gateways: Any, tmp_path: Path) -> None:
    gateway = gateways(gated())
    gateway.initialize()
    gateway.send(tool_call(1, "ask"))
    ask = gateway.wait_for(lambda m: m.get("method") == "sampling/createMessage")
    size = 33 * 1024 * 1024
    gateway.send({"jsonrpc": "2.0", "id": ask["id"],
                  "result": {"role": "assistant", "content": {"type": "text", "text": "q" * size}}})
    said = text_of(gateway.response(1, timeout=30))
    assert said.startswith("client said ") and said.count("q") == size


def test_a_batch_holding_a_gated_call_is_refused_whole_and_other_batches_pass(
        gateways: Any, mcpresd: DaemonProcess, tmp_path: Path) -> None:
    gateway = gateways(gated())
    gateway.initialize()
    before = {a["id"] for a in allocations(mcpresd, "all", "raw/")}
    batch = [tool_call(1, "echo", {"n": 1}), {"jsonrpc": "2.0", "id": "p", "method": "ping"},
             {"jsonrpc": "2.0", "method": "notifications/progress", "params": {"progressToken": 1, "progress": 1}}]
    gateway.send(json.dumps(batch).encode() + b"\n")
    raw = gateway.recv(timeout=10)
    answers = json.loads(raw)
    assert [(a["id"], a["error"]["code"]) for a in answers] == [(1, 1104), ("p", 1104)]
    assert "send the call alone" in answers[0]["error"]["message"]
    assert not [line for line in tap_lines(tmp_path / "server.tap") if line.startswith(b"[")]
    assert {a["id"] for a in allocations(mcpresd, "all", "raw/")} == before
    ungated = json.dumps([{"jsonrpc": "2.0", "id": "q", "method": "ping"}]).encode() + b"\n"
    gateway.send(ungated)
    until(lambda: ungated in tap_lines(tmp_path / "server.tap"), timeout=10)  # passed on as it was


@pytest.mark.parametrize("locale", [{}, {"LANG": "C"}, {"LC_CTYPE": "C"}, {"LC_CTYPE": "C.UTF-8"}],
                         ids=["no-locale", "LANG=C", "LC_CTYPE=C", "LC_CTYPE=C.UTF-8"])
def test_the_server_gets_the_gateways_environment_unchanged(gateways: Any, locale: dict[str, str]) -> None:
    environ = {"PATH": "/usr/bin:/bin", "MCPRES_TEST_MARK": "é x", **locale}
    gateway = gateways(gated(), environ=environ)
    gateway.initialize()
    gateway.send(tool_call(1, "free_environ"))
    assert json.loads(text_of(gateway.response(1))) == environ  # no LC_CTYPE=C.UTF-8 from Python's coercion


def test_a_call_running_when_the_daemon_restarts_keeps_its_allocation_and_releases_it_once_back(
        gateways: Any, tmp_path: Path) -> None:
    (tmp_path / "own").mkdir()
    daemon = DaemonProcess(tmp_path / "own")
    daemon.start()
    try:
        tools = gated().replace('name = "raw"', 'name = "raw"\nreconnect_interval = "200ms"')
        gateway = gateways(tools, socket=daemon.socket)
        gateway.initialize()
        gateway.send(tool_call(1, "slow", {"seconds": 3600, "late": True}))
        [running] = until(lambda: daemon.call("allocations.list", {"state": "active"}))
        daemon.restart()
        # the server still works, and its keeper still holds what it uses
        assert daemon.call("allocations.get", {"id": running["id"]})["state"] == "active"
        gateway.send({"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": 1}})
        assert text_of(gateway.response(1)) == "slow done (late)"  # the call ends: its release goes out once back
        shown = until(lambda: (lambda a: a if a["state"] == "released" else None)(
            daemon.call("allocations.get", {"id": running["id"]})), timeout=5)
        assert shown["release_reason"] == "released"
    finally:
        daemon.stop()


def test_a_cancelled_call_that_works_on_without_answering_is_released_when_its_progress_completes(
        gateways: Any, mcpresd: DaemonProcess) -> None:
    gateway = gateways(gated())  # cancel_grace: 30s, far beyond this test's bounds
    gateway.initialize()
    gateway.send(tool_call(1, "slow", {"seconds": 1.5, "steps": 3, "keep_on": True}, token="t1"))
    gateway.wait_for(lambda m: m.get("method") == "notifications/progress")
    gateway.send({"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": 1}},
                 tool_call(2, "echo", {"n": 2}))
    assert json.loads(text_of(gateway.response(2, timeout=10))) == {"n": 2}
    progress = [m["params"]["progress"] for m in gateway.messages()
                if m.get("method") == "notifications/progress" and m["params"]["progressToken"] == "t1"]
    assert progress == [1, 2, 3]  # call 2 ran only once call 1's work was done, by its own account
    assert not any(m.get("id") == 1 and "method" not in m for m in gateway.messages())


UNSHARE = ["unshare", "--pid", "--fork", "--mount-proc"]


@pytest.mark.skipif(subprocess.run([*UNSHARE, "true"], capture_output=True).returncode != 0,
                    reason="needs unshare --pid (root, or user namespaces)")
def test_a_gateway_in_another_pid_namespace_has_its_connection_hold_what_it_takes(
        gateways: Any, mcpresd: DaemonProcess) -> None:
    gateway = gateways(gated(), wrapper=UNSHARE)  # its pids name other processes, or none, in the daemon's namespace
    gateway.initialize()
    gateway.send(tool_call(1, "slow", {"seconds": 0.5}))
    [running] = until(lambda: allocations(mcpresd, "active", "raw/"))
    assert (running["holder"], running["holder_pid"]) == ("connection", None)
    assert text_of(gateway.response(1)) == "slow done"
    until(lambda: mcpresd.call("allocations.get", {"id": running["id"]})["state"] == "released")
