"""`mcpresd` across crashes, restarts and shutdowns, and started with no flags at all."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mcpresd.daemon import SHUTDOWN_GRACE_S
from tests.conftest import DaemonProcess, run_cli

pytestmark = pytest.mark.e2e

BIN = Path(sys.executable).parent


def cli_json(daemon: DaemonProcess, *args: str) -> Any:
    result = run_cli(*args, "--json", socket_path=daemon.socket)
    assert result.returncode == 0, f"mcpctl {' '.join(args)} exited {result.returncode}: {result.stderr}"
    return json.loads(result.stdout)


def allocate(daemon: DaemonProcess, *args: str) -> str:
    result = run_cli("allocate", *args, socket_path=daemon.socket)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def by_id(daemon: DaemonProcess) -> dict[str, dict[str, Any]]:
    return {a["id"]: a for a in cli_json(daemon, "allocations", "--all")}


def items(allocation: dict[str, Any]) -> list[tuple[str, float]]:
    return sorted((i["resource"], i["amount"]) for i in allocation["items"])


def held(daemon: DaemonProcess) -> dict[str, float]:
    return {r["name"]: r["allocated"] for r in cli_json(daemon, "resources")}


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    """A short-lived holder process, always killed and reaped."""
    proc = subprocess.Popen(["sleep", "30"])
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)


# -- crash and restart ------------------------------------------------------


def test_acknowledged_allocations_survive_kill_9(daemon: DaemonProcess) -> None:
    kept = allocate(daemon, "--cpu", "0.5", "--mem", "64M")
    shared_gpu = allocate(daemon, "--gpu", "0.5", "--res", "slot=3", "--priority", "high")
    gone = allocate(daemon, "--res", "licence=1")
    assert run_cli("release", gone, socket_path=daemon.socket).returncode == 0
    before = by_id(daemon)
    held_before = held(daemon)

    daemon.kill()
    daemon.start()

    after = by_id(daemon)
    assert after.keys() == before.keys() == {kept, shared_gpu, gone}
    for allocation_id in (kept, shared_gpu):
        assert after[allocation_id]["state"] == "active"
        assert items(after[allocation_id]) == items(before[allocation_id])
        assert after[allocation_id]["priority"] == before[allocation_id]["priority"]
    assert after[gone]["state"] == "released"
    assert after[gone]["released_at"] == before[gone]["released_at"]
    assert sorted(a["id"] for a in cli_json(daemon, "allocations")) == sorted([kept, shared_gpu])
    assert held(daemon) == held_before
    assert held(daemon)["licence"] == 0


def test_capacity_held_before_a_crash_is_still_held_after_it(daemon: DaemonProcess) -> None:
    allocate(daemon, "--res", "licence=2")

    daemon.kill()
    daemon.start()

    refused = run_cli("allocate", "--res", "licence=1", socket_path=daemon.socket)
    assert refused.returncode == 3, refused.stderr


def test_an_idempotency_key_maps_to_the_same_allocation_after_kill_9(daemon: DaemonProcess) -> None:
    first = allocate(daemon, "--res", "slot=2", "--key", "job-7")

    daemon.kill()
    daemon.start()

    again = allocate(daemon, "--res", "slot=2", "--key", "job-7")
    assert again == first
    assert [a["id"] for a in cli_json(daemon, "allocations")] == [first]
    assert held(daemon)["slot"] == 2


def test_an_allocation_whose_holder_exited_while_down_is_released_on_start(
    daemon: DaemonProcess, sleeper: subprocess.Popen[bytes]
) -> None:
    orphan = allocate(daemon, "--res", "slot=4", "--holder-pid", str(sleeper.pid))
    alive = allocate(daemon, "--res", "slot=1")  # held by this test process, which lives on

    daemon.kill()
    sleeper.kill()
    sleeper.wait(timeout=10)
    daemon.start()

    [released] = cli_json(daemon, "allocations", orphan)
    assert released["state"] == "released"
    assert released["release_reason"] == "holder_exited"
    assert [a["id"] for a in cli_json(daemon, "allocations")] == [alive]
    assert held(daemon)["slot"] == 1

    events = cli_json(daemon, "events", "--allocation", orphan)
    assert [e["kind"] for e in events] == ["allocated", "holder_exited"]
    assert events[-1]["detail"]["holder_pid"] == sleeper.pid


def test_a_holder_that_does_not_exist_is_refused_at_allocate_time(
    daemon: DaemonProcess, sleeper: subprocess.Popen[bytes]
) -> None:
    sleeper.kill()
    sleeper.wait(timeout=10)

    result = run_cli("allocate", "--res", "slot=1", "--holder-pid", str(sleeper.pid), socket_path=daemon.socket)

    assert result.returncode != 0
    assert result.stdout == ""
    assert str(sleeper.pid) in result.stderr


# -- shutdown ---------------------------------------------------------------


def test_sigterm_shuts_down_cleanly_and_removes_the_socket(daemon: DaemonProcess) -> None:
    allocation_id = allocate(daemon, "--res", "slot=1")

    assert daemon.stop(signal.SIGTERM) == 0

    assert not os.path.lexists(daemon.socket)
    assert "stopped" in daemon.log()
    daemon.start()
    assert [a["id"] for a in cli_json(daemon, "allocations")] == [allocation_id]


def test_sigterm_does_not_wait_on_an_idle_client(daemon: DaemonProcess) -> None:
    """Waiting on the idle client would take the whole shutdown grace (SHUTDOWN_GRACE_S) by construction, so that
    is the bound, not a guess at how fast a machine is; the idle client is told by its connection closing."""
    with daemon.client() as idle:
        idle.connect()
        assert idle._sock is not None
        idle._sock.settimeout(60)
        started = time.monotonic()

        assert daemon.stop(signal.SIGTERM, timeout=60) == 0
        assert idle._sock.recv(1) == b""  # closed by the daemon, not left hanging

    assert time.monotonic() - started < SHUTDOWN_GRACE_S
    assert not os.path.lexists(daemon.socket)


def test_a_stale_socket_left_by_kill_9_does_not_stop_a_restart(daemon: DaemonProcess) -> None:
    daemon.kill()
    assert os.path.lexists(daemon.socket)

    daemon.start()

    assert run_cli("status", socket_path=daemon.socket).returncode == 0


# -- the two-command contract -----------------------------------------------


def _wait_for(path: Path, proc: subprocess.Popen[bytes], log: Path, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"mcpresd exited with {proc.returncode}:\n{log.read_text(errors='replace')}")
        if path.exists():
            return
        time.sleep(0.05)
    pytest.fail(f"{path} did not appear in {timeout}s:\n{log.read_text(errors='replace')}")


def test_mcpresd_then_mcpctl_status_work_with_no_flags() -> None:
    base = Path(tempfile.mkdtemp(prefix="mcpres-e2e-"))  # short: socket paths are limited to ~107 bytes
    home, runtime, state = base / "home", base / "run", base / "state"
    for directory in (home, runtime, state):
        directory.mkdir(mode=0o700)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MCPRES_") and k != "STATE_DIRECTORY"}
    env.update(HOME=str(home), XDG_RUNTIME_DIR=str(runtime), XDG_STATE_HOME=str(state))
    log = base / "mcpresd.log"
    socket_path = runtime / "mcpres" / "mcpresd.sock"
    database = state / "mcpresd" / "mcpresd.db"
    proc: subprocess.Popen[bytes] | None = None
    try:
        with open(log, "wb") as out:
            proc = subprocess.Popen([str(BIN / "mcpresd")], stdout=out, stderr=out, env=env, cwd=base)
        _wait_for(socket_path, proc, log)

        status = subprocess.run([str(BIN / "mcpctl"), "status"], capture_output=True, text=True, env=env,
                                cwd=base, timeout=30)
        assert status.returncode == 0, status.stderr
        assert str(socket_path) in status.stdout
        assert str(database) in status.stdout

        assert database.is_file()
        mode = os.lstat(socket_path).st_mode
        assert stat.S_ISSOCK(mode)
        assert stat.S_IMODE(mode) == 0o600

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
        assert not os.path.lexists(socket_path)
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        shutil.rmtree(base, ignore_errors=True)
