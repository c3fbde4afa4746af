"""Foreign GPU use, against the recorded H100 replay with its compute process mapped to a live process.

The daemon samples every 0.5 s; `capture_with_process` (tests/conftest.py) writes a variant of the capture
whose one compute process is a process this test started, with the load held. The monitor attributes that
process by its ancestors (holders) and by the cgroup it is in, and raises `foreign_gpu_use` once per spell.
Every wait polls the daemon against a deadline; "nothing happened" is checked over rounds the daemon says it
sampled, counting a full lineage scan (every 5th round).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.cgroups import cgroup_subtree, v1_mounts  # noqa: F401 - fixture
from tests.conftest import DaemonProcess, capture_with_process, cli

CONFIG = """
memory_reserve = "0"

[monitor]
interval = "0.5s"

[[resources]]
name = "slot"
capacity = 10
unit = "slots"
"""
WAIT_S = 40.0


def eventually(check: Callable[[], Any], timeout: float = WAIT_S, what: str = "the condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        time.sleep(0.1)


def sleeper() -> subprocess.Popen[bytes]:
    return subprocess.Popen(["sleep", "600"])


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    try:
        yield started
    finally:
        for process in started:
            process.kill()
            process.wait()


def daemon_on(tmp_path: Path, gpu_pid: int, config: str = CONFIG) -> DaemonProcess:
    daemon = DaemonProcess(tmp_path, config=config, gpu_replay=capture_with_process(tmp_path, gpu_pid))
    daemon.start()
    return daemon


@pytest.fixture
def cleanup() -> Iterator[list[DaemonProcess]]:
    daemons: list[DaemonProcess] = []
    try:
        yield daemons
    finally:
        for daemon in daemons:
            daemon.stop()


def foreign_events(daemon: DaemonProcess) -> list[dict[str, Any]]:
    return [e for e in daemon.call("events.list", {"limit": 1000}) if e["kind"] == "foreign_gpu_use"]


def foreign_alert(daemon: DaemonProcess, state: str = "firing") -> dict[str, Any] | None:
    alerts = daemon.call("alerts.list", {"all": True})
    return next((a for a in alerts if a["rule"] == "foreign-gpu-use" and a["state"] == state), None)


def rounds_pass(daemon: DaemonProcess, rounds: int) -> None:
    """Wait until the daemon has recorded `rounds` more sampling rounds."""
    start = daemon.call("metrics.current")["ts"] or 0.0
    eventually(lambda: (daemon.call("metrics.current")["ts"] or 0.0) >= start + rounds * 0.5,
               what=f"{rounds} sampling rounds")


def allocate(daemon: DaemonProcess, resource: str, holder: int, **extra: Any) -> str:
    allocation = daemon.call("allocate", {"resources": [{"resource": resource, "amount": 1}],
                                          "holder_pid": holder, **extra})
    assert allocation["state"] == "active", allocation
    return str(allocation["id"])


def test_a_process_outside_every_allocation_on_an_allocated_gpu_is_reported_once_per_spell(
        tmp_path: Path, processes: list[subprocess.Popen[bytes]], cleanup: list[DaemonProcess]) -> None:
    stranger, holder = sleeper(), sleeper()
    processes += [stranger, holder]
    daemon = daemon_on(tmp_path, stranger.pid)
    cleanup.append(daemon)
    held = allocate(daemon, "gpu:0", holder.pid)

    event = eventually(lambda: foreign_events(daemon), what="a foreign_gpu_use event")[0]
    assert event["resource"] == "gpu:0"
    detail = event["detail"]
    assert (detail["gpu"], detail["pid"], detail["allocation"], detail["granted_to"]) == \
        ("gpu:0", stranger.pid, None, held)
    assert detail["used_memory"] > 0
    assert f"pid {stranger.pid}, outside every allocation, uses gpu:0 (gpu:0 is allocated to {held})" \
        == detail["why"]
    alert = eventually(lambda: foreign_alert(daemon), what="the foreign-gpu-use alert")
    assert alert["resource"] == "gpu:0" and alert["last_value"] == 1
    assert [(a["id"], a["gpu_pids"]) for a in alert["allocations"]] == [(held, [stranger.pid])]

    rounds_pass(daemon, 12)  # two lineage scans more: still one spell
    assert len(foreign_events(daemon)) == 1

    shown = cli(daemon, "alerts")
    assert shown.returncode == 0, shown.stderr
    line = next(line for line in shown.stdout.splitlines() if "foreign-gpu-use" in line)
    assert "gpu:0" in line and held in line and f"gpu pid {stranger.pid}" in line
    events = cli(daemon, "events")
    assert events.returncode == 0, events.stderr
    line = next(line for line in events.stdout.splitlines() if "foreign_gpu_use" in line)
    assert f"pid={stranger.pid}" in line and f"granted_to={held}" in line and "outside every allocation" in line
    filed = cli(daemon, "events", "--allocation", held, "--json")
    assert filed.returncode == 0, filed.stderr
    assert "foreign_gpu_use" in [e["kind"] for e in json.loads(filed.stdout)]


def test_a_process_of_an_allocation_not_granted_the_gpu_is_foreign_and_a_holders_own_is_not(
        tmp_path: Path, processes: list[subprocess.Popen[bytes]], cleanup: list[DaemonProcess]) -> None:
    holder = subprocess.Popen(["sh", "-c", "sleep 600 & echo $!; wait"], stdout=subprocess.PIPE)
    processes.append(holder)
    assert holder.stdout is not None
    child = int(holder.stdout.readline())
    daemon = daemon_on(tmp_path, child)
    cleanup.append(daemon)

    on_gpu = allocate(daemon, "gpu:0", holder.pid)
    eventually(lambda: daemon.call("metrics.current")["resources"].get("gpu:0", {}).get("processes") == 1,
               what="the replayed process on gpu:0")
    rounds_pass(daemon, 12)
    assert foreign_events(daemon) == [] and foreign_alert(daemon) is None  # the holder's child uses its GPU

    daemon.call("release", {"id": on_gpu})
    on_slot = allocate(daemon, "slot", holder.pid)
    event = eventually(lambda: foreign_events(daemon), what="a foreign_gpu_use event")[0]
    assert (event["detail"]["pid"], event["detail"]["allocation"], event["detail"]["granted_to"]) == \
        (child, on_slot, None)
    assert event["allocation_id"] == on_slot
    assert event["detail"]["why"] == f"pid {child} of allocation {on_slot} uses gpu:0, which {on_slot} was not " \
                                     "granted (gpu:0 is allocated to nobody)"
    alert = eventually(lambda: foreign_alert(daemon), what="the foreign-gpu-use alert")
    assert [(a["id"], a["amount"], a["gpu_pids"]) for a in alert["allocations"]] == [(on_slot, 0, [child])]

    daemon.call("release", {"id": on_slot})
    resolved = eventually(lambda: foreign_alert(daemon, "resolved"), what="the alert to resolve")
    assert resolved["id"] == alert["id"]
    assert foreign_alert(daemon) is None


def test_a_process_in_an_allocations_cgroup_belongs_to_it_whoever_started_it(
        tmp_path: Path, processes: list[subprocess.Popen[bytes]], cleanup: list[DaemonProcess],
        cgroup_subtree: str) -> None:  # noqa: F811 - fixture
    escaped, holder, gpu_holder = sleeper(), sleeper(), sleeper()
    processes += [escaped, holder, gpu_holder]
    daemon = daemon_on(tmp_path, escaped.pid, CONFIG + f'\n[enforce]\nmode = "soft"\ncgroup = "{cgroup_subtree}"\n')
    cleanup.append(daemon)
    confined = allocate(daemon, "slot", holder.pid, enforce="soft", confine_holder=True)
    memory = v1_mounts()["memory"] / cgroup_subtree / f"alloc-{confined}"
    eventually(lambda: str(holder.pid) in (memory / "cgroup.procs").read_text().split() if memory.exists() else False,
               what="the holder in its allocation's cgroup")
    # A process its tree no longer shows (double-forked and re-parented) that stayed in the allocation's cgroup.
    # It is on the GPU from the start (the replay), so it is moved in before anyone holds the GPU: the other order
    # would let a round between the two see it as nobody's process on an allocated GPU.
    (memory / "cgroup.procs").write_text(str(escaped.pid))
    on_gpu = allocate(daemon, "gpu:0", gpu_holder.pid)

    event = eventually(lambda: foreign_events(daemon), what="a foreign_gpu_use event")[0]
    assert (event["detail"]["pid"], event["detail"]["allocation"]) == (escaped.pid, confined)
    # A round may fall between the move and the GPU's grant: the spell's one event then says nobody held it.
    assert event["detail"]["granted_to"] in (on_gpu, None)
    alert = eventually(lambda: (lambda a: a if a and len(a["allocations"]) == 2 else None)(foreign_alert(daemon)),
                       what="the foreign-gpu-use alert naming both allocations")
    assert sorted(a["id"] for a in alert["allocations"]) == sorted([confined, on_gpu])
    assert os.path.exists(f"/proc/{escaped.pid}")
