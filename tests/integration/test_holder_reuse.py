"""A holder is a (pid, start time) pair: a new process that gets a dead holder's pid keeps nothing alive.

The pid is really reused: while the daemon is down the holder dies, and the kernel is asked for that pid again
(/proc/sys/kernel/ns_last_pid, root only) for a new process that then runs while the daemon starts and
reconciles. Other processes on the machine may take the pid first; the test tries again, a bounded number of
times.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import DaemonProcess

NS_LAST_PID = Path("/proc/sys/kernel/ns_last_pid")
TRIES = 200

pytestmark = pytest.mark.skipif(os.getuid() != 0 or not os.access(NS_LAST_PID, os.W_OK),
                                reason="needs root to choose the pid of a new process")


@pytest.fixture
def children() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    try:
        yield started
    finally:
        for child in started:
            if child.poll() is None:
                child.kill()
            child.wait(10)


def process_with_pid(pid: int, children: list[subprocess.Popen[bytes]]) -> subprocess.Popen[bytes]:
    """A new `sleep` whose pid is `pid` (a pid no process holds now)."""
    for _ in range(TRIES):
        NS_LAST_PID.write_text(str(pid - 1))
        child = subprocess.Popen(["sleep", "600"])
        children.append(child)
        if child.pid == pid:
            return child
        child.kill()
        child.wait(10)
    pytest.fail(f"no new process got pid {pid} in {TRIES} tries (a busy machine takes pids first)")


def test_a_new_process_with_a_dead_holders_pid_does_not_keep_its_allocation(
        tmp_path: Path, children: list[subprocess.Popen[bytes]]) -> None:
    daemon = DaemonProcess(tmp_path)
    daemon.start()
    holder = subprocess.Popen(["sleep", "600"])
    children.append(holder)
    survivor = subprocess.Popen(["sleep", "600"])
    children.append(survivor)
    try:
        reused = daemon.call("allocate", {"resources": [{"resource": "licence", "amount": 1}],
                                          "holder_pid": holder.pid})["id"]
        kept = daemon.call("allocate", {"resources": [{"resource": "licence", "amount": 1}],
                                        "holder_pid": survivor.pid})["id"]
        assert daemon.stop() == 0
        holder.kill()
        holder.wait(10)
        impostor = process_with_pid(holder.pid, children)

        daemon.start()

        assert impostor.poll() is None  # the pid names a running process throughout
        released = daemon.call("allocations.get", {"id": reused})
        assert (released["state"], released["release_reason"]) == ("released", "holder_exited"), released
        assert daemon.call("allocations.get", {"id": kept})["state"] == "active"
        [free] = [r["free"] for r in daemon.call("resources.list") if r["name"] == "licence"]
        assert free == 1.0
    finally:
        daemon.stop()
