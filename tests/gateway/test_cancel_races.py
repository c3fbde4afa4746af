"""A grant that reaches the gateway after its call was cancelled is released, and the call never runs.

The race is made exact, not timed: the daemon is stopped (SIGSTOP) while the gateway asks for the call's
allocation, so the cancel is read while the gateway still waits for that answer; then the daemon goes on
(SIGCONT), grants the request (the GPU is free) and the grant arrives for a call that no longer exists.
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
