"""Allocations and calls that part ways: a grant that reaches the gateway after its call was cancelled is
released and the call never runs; an allocation that ends while its call runs is not released twice, and the
call's answer still reaches the client. (A gateway not subscribed to events, as here where the call was
granted at once, does not learn of the end before the call finishes; it is only logged when it is.)

Races are made exact, not timed. For the cancel, the daemon is stopped (SIGSTOP) while the gateway asks for
the call's allocation, so the cancel is read while the gateway still waits for that answer; then the daemon
goes on (SIGCONT), grants the request (the GPU is free) and the grant arrives for a call that no longer exists.
For the running call, the server's `ask` tool runs until the client answers its sampling request, so the
allocation is ended (by root) while the call certainly runs.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import DaemonProcess
from tests.gateway.conftest import allocations, tap_lines, tool_call, until
from tests.gateway.test_proxy import gated


@pytest.fixture
def paused(mcpresd: DaemonProcess) -> Iterator[Any]:
    """pause() stops the shared daemon until resume(); it is always resumed at the end."""
    assert mcpresd.proc is not None
    pid = mcpresd.proc.pid

    class Pause:
        def pause(self) -> None:
            os.kill(pid, signal.SIGSTOP)

        def resume(self) -> None:
            os.kill(pid, signal.SIGCONT)

    pause = Pause()
    try:
        yield pause
    finally:
        pause.resume()


def test_a_grant_that_arrives_after_the_cancel_is_released_and_the_call_never_runs(
        gateways: Any, mcpresd: DaemonProcess, tmp_path: Path, paused: Any) -> None:
    gateway = gateways(gated())
    gateway.initialize()
    before = {a["id"] for a in allocations(mcpresd, "all", "raw/")}

    paused.pause()
    gateway.send(tool_call(1, "echo", {"n": 1}))
    gateway.send({"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": 1}})
    gateway.send({"jsonrpc": "2.0", "id": 2, "method": "ping"})
    gateway.response(2)  # the gateway has read the cancel (lines are handled in order) and still waits
    paused.resume()

    def granted_then_released() -> list[dict[str, Any]]:
        return [a for a in allocations(mcpresd, "all", "raw/") if a["id"] not in before]

    [allocation] = until(granted_then_released, timeout=30)
    until(lambda: [a for a in granted_then_released() if a["state"] == "released"], timeout=30)
    released = mcpresd.call("allocations.get", {"id": allocation["id"]})
    assert released["granted_at"] is not None  # it was granted, after the cancel...
    assert released["release_reason"] == "released"  # ...and the gateway gave it back
    assert not allocations(mcpresd, "active", "raw/")
    gateway.send({"jsonrpc": "2.0", "id": 3, "method": "ping"})
    gateway.response(3)
    assert not any(m.get("id") == 1 for m in gateway.messages())  # no answer to a cancelled request
    methods = [json.loads(raw).get("method") for raw in tap_lines(tmp_path / "server.tap")]
    assert "tools/call" not in methods, methods


def test_an_allocation_ended_while_its_call_runs_is_not_released_again_and_the_answer_passes(
        gateways: Any, mcpresd: DaemonProcess) -> None:
    gateway = gateways(gated())
    gateway.initialize()
    gateway.send(tool_call(1, "ask"))
    [running] = until(lambda: allocations(mcpresd, "active", "raw/"), timeout=30)
    asked = gateway.wait_for(lambda m: m.get("method") == "sampling/createMessage", timeout=30)

    mcpresd.call("release", {"id": running["id"]})  # root ends it under the running call
    gateway.send({"jsonrpc": "2.0", "id": asked["id"], "result": {"role": "assistant", "model": "m",
                                                                   "content": {"type": "text", "text": "ok"}}})

    answer = gateway.response(1, timeout=30)
    gateway.send({"jsonrpc": "2.0", "id": 9, "method": "ping"})
    gateway.response(9)  # the gateway has handled the end of the call, and lives
    assert answer["result"]["content"][0]["text"].startswith("client said ")
    kinds = [e["kind"] for e in mcpresd.call("events.list", {"allocation_id": running["id"]})]
    assert kinds == ["allocated", "released"]  # root's release only: nothing released twice, nothing held
    assert "AlreadyReleased" not in gateway.stderr() and "already released" not in gateway.stderr()
    assert not allocations(mcpresd, "active", "raw/")
