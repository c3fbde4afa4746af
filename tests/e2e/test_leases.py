"""Leases as a user meets them: a killed script or command never keeps its resources, and preemption warns first."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import CONFIG, DaemonProcess

pytestmark = pytest.mark.e2e

BIN = Path(sys.executable).parent
BOUND_S = 10.0


def env(daemon: DaemonProcess) -> dict[str, str]:
    return dict(os.environ, MCPRES_SOCKET=daemon.socket, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")


def active(daemon: DaemonProcess) -> list[dict[str, Any]]:
    result: list[dict[str, Any]] = daemon.call("allocations.list", {"state": "active"})
    return result


def until(predicate: Any, what: str) -> None:
    deadline = time.monotonic() + BOUND_S
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"gave up waiting for {what}")


def waiter(daemon: DaemonProcess, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([str(BIN / "mcpctl"), "allocate", *args, "--wait", "20s"], text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env(daemon))


def test_a_sigkilled_bash_script_frees_its_licences_for_the_next_in_line(daemon: DaemonProcess) -> None:
    script = subprocess.Popen(["bash", "-c", 'id=$(mcpctl allocate --res licence=2); echo "$id"; sleep 30'],
                              text=True, stdout=subprocess.PIPE, env=env(daemon))
    next_in_line = None
    try:
        assert script.stdout is not None
        held = script.stdout.readline().strip()
        assert [a["id"] for a in active(daemon)] == [held]
        assert active(daemon)[0]["holder_pid"] == script.pid
        next_in_line = waiter(daemon, "--res", "licence=1")
        until(lambda: daemon.call("allocations.list", {"state": "queued"}), "the second request to queue")
        script.kill()
        out, err = next_in_line.communicate(timeout=BOUND_S)
        assert next_in_line.returncode == 0, err
        assert daemon.call("allocations.get", {"id": held})["release_reason"] == "holder_exited"
        assert out.strip() in [a["id"] for a in active(daemon)]
    finally:
        script.kill()
        script.wait()
        if next_in_line is not None and next_in_line.poll() is None:
            next_in_line.kill()


def test_a_sigkilled_mcpctl_run_command_frees_its_resources(daemon: DaemonProcess) -> None:
    run = subprocess.Popen([str(BIN / "mcpctl"), "run", "--res", "licence=2", "--", "sleep", "30"], text=True,
                           env=env(daemon))
    next_in_line = None
    try:
        until(lambda: active(daemon), "the run to hold the licences")
        child = active(daemon)[0]["holder_pid"]
        assert child != run.pid  # the command itself holds them
        next_in_line = waiter(daemon, "--res", "licence=2")
        until(lambda: daemon.call("allocations.list", {"state": "queued"}), "the second request to queue")
        os.kill(child, signal.SIGKILL)
        assert run.wait(BOUND_S) == 128 + signal.SIGKILL
        out, err = next_in_line.communicate(timeout=BOUND_S)
        assert next_in_line.returncode == 0, err
    finally:
        run.kill()
        run.wait()
        if next_in_line is not None and next_in_line.poll() is None:
            next_in_line.kill()


PREEMPTING = CONFIG + '\n[scheduler]\npreemption = true\npreempt_grace = "1s"\n'


@pytest.mark.parametrize("command, expected_exit", [
    pytest.param("trap 'exit 0' TERM; touch \"$TRAPPED\"; sleep 30 & wait", 0, id="leaves on SIGTERM"),
    pytest.param("trap '' TERM; touch \"$TRAPPED\"; sleep 30", 128 + signal.SIGKILL, id="ignores SIGTERM, gets SIGKILL"),
])
def test_a_preempted_run_is_warned_with_sigterm_then_killed_after_the_grace(
        tmp_path: Path, command: str, expected_exit: int) -> None:
    daemon = DaemonProcess(tmp_path, config=PREEMPTING)
    daemon.start()
    run = subprocess.Popen([str(BIN / "mcpctl"), "run", "--res", "licence=2", "--priority", "low", "--preemptible",
                            "--", "sh", "-c", command], text=True,
                           env=dict(env(daemon), TRAPPED=str(tmp_path / "trapped")))
    urgent = None
    try:
        until(lambda: active(daemon), "the low-priority run to start")
        low = active(daemon)[0]["id"]
        until((tmp_path / "trapped").exists, "the shell to set its trap")
        urgent = waiter(daemon, "--res", "licence=1", "--priority", "critical")
        assert run.wait(BOUND_S) == expected_exit
        out, err = urgent.communicate(timeout=BOUND_S)
        assert urgent.returncode == 0, err
        kinds = [e["kind"] for e in daemon.call("events.list", {"allocation_id": low})]
        assert kinds[:2] == ["allocated", "preempted"]
    finally:
        run.kill()
        run.wait()
        if urgent is not None and urgent.poll() is None:
            urgent.kill()
        daemon.stop()


def test_an_unpreemptible_allocation_is_never_revoked(tmp_path: Path) -> None:
    daemon = DaemonProcess(tmp_path, config=PREEMPTING)
    daemon.start()
    run = subprocess.Popen([str(BIN / "mcpctl"), "run", "--res", "licence=2", "--priority", "low", "--", "sleep",
                            "30"], text=True, env=env(daemon))
    try:
        until(lambda: active(daemon), "the run to start")
        urgent = subprocess.run([str(BIN / "mcpctl"), "allocate", "--res", "licence=1", "--priority", "critical",
                                 "--wait", "2s"], text=True, capture_output=True, env=env(daemon), timeout=BOUND_S)
        assert urgent.returncode == 3
        assert run.poll() is None
    finally:
        run.kill()
        run.wait()
        daemon.stop()


def test_json_shows_the_holder_of_every_allocation(daemon: DaemonProcess) -> None:
    done = subprocess.run([str(BIN / "mcpctl"), "allocate", "--res", "licence=1", "--json"], text=True,
                          capture_output=True, env=env(daemon), timeout=BOUND_S)
    allocation = json.loads(done.stdout)
    assert (allocation["holder"], allocation["holder_pid"]) == ("pid", os.getpid())
