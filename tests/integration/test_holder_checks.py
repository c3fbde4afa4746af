"""Who may be named as an allocation's holder: a process (not a thread) that the caller owns, unless it administers.

Two real uids: the daemon runs as root and a forked child drops to `nobody` before it connects; the processes
named as holders are real ones of each user.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mcpresd.protocol import ErrorCode
from tests.conftest import DaemonProcess
from tests.integration.test_access import NOBODY, as_nobody, nobodys_process, shared_daemon, shared_dir

__all__ = ["nobodys_process", "shared_dir"]  # fixtures, used by name

pytestmark = pytest.mark.skipif(os.getuid() != 0, reason="needs root to act as a second user")

BOUND_S = 10.0
LICENCE = [{"resource": "licence", "amount": 1}]


@pytest.fixture
def daemon(tmp_path: Path, shared_dir: Path) -> Iterator[DaemonProcess]:
    process = shared_daemon(tmp_path, shared_dir)
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture
def roots_process() -> Iterator[int]:
    proc = subprocess.Popen(["sleep", "60"])
    try:
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()


def nobody_allocates(daemon: DaemonProcess, holder: int) -> dict[str, Any]:
    (reply,) = as_nobody(daemon.socket, [{"method": "allocate", "params": {"resources": LICENCE,
                                                                           "holder_pid": holder}}])
    return reply


@pytest.mark.parametrize("whose", ["init", "a root process"])
def test_a_user_cannot_hold_an_allocation_with_another_users_process(
        daemon: DaemonProcess, roots_process: int, whose: str) -> None:
    holder = 1 if whose == "init" else roots_process
    reply = nobody_allocates(daemon, holder)
    assert reply["error"]["code"] == ErrorCode.INVALID_HOLDER, reply
    assert reply["error"]["data"] == {"type": "InvalidHolder", "holder_pid": holder, "reason": "not_yours"}
    assert "not yours" in reply["error"]["message"]
    assert daemon.call("allocations.list", {"state": "active"}) == []


def test_a_user_holds_with_their_own_process_and_its_exit_releases_it(
        daemon: DaemonProcess, nobodys_process: int) -> None:
    reply = nobody_allocates(daemon, nobodys_process)
    allocation = reply["result"]
    assert allocation["state"] == "active" and allocation["holder_pid"] == nobodys_process
    assert allocation["owner_uid"] == NOBODY
    os.kill(nobodys_process, 9)
    deadline = time.monotonic() + BOUND_S
    while daemon.call("allocations.get", {"id": allocation["id"]})["state"] == "active":
        assert time.monotonic() < deadline, "the allocation outlived its holder"
        time.sleep(0.02)
    assert daemon.call("allocations.get", {"id": allocation["id"]})["release_reason"] == "holder_exited"


def test_an_administrator_may_name_another_users_process(daemon: DaemonProcess, nobodys_process: int) -> None:
    allocation = daemon.call("allocate", {"resources": LICENCE, "holder_pid": nobodys_process})
    assert allocation["state"] == "active" and allocation["holder_pid"] == nobodys_process


def test_a_thread_that_leads_no_thread_group_is_refused_even_for_root(daemon: DaemonProcess) -> None:
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait)
    thread.start()
    try:
        assert thread.native_id is not None
        replies = daemon.raw(("{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"allocate\",\"params\":{\"resources\":"
                              "[{\"resource\":\"licence\",\"amount\":1}],\"holder_pid\":%d}}\n"
                              % thread.native_id).encode())
    finally:
        stop.set()
        thread.join()
    (reply,) = replies
    assert reply["error"]["code"] == ErrorCode.INVALID_HOLDER, reply
    assert reply["error"]["data"] == {"type": "InvalidHolder", "holder_pid": thread.native_id, "reason": "thread"}
    assert f"name its process ({os.getpid()})" in reply["error"]["message"]
    assert daemon.call("allocations.list", {"state": "active"}) == []


AS_NOBODY = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]


def mcpctl_env(daemon: DaemonProcess) -> dict[str, str]:
    return dict(os.environ, MCPRES_SOCKET=daemon.socket, HOME="/nonexistent",
                PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")


def test_mcpctl_run_by_another_user_cannot_name_init_as_holder(daemon: DaemonProcess) -> None:
    refused = subprocess.run([*AS_NOBODY, "mcpctl", "allocate", "--res", "licence=1", "--holder-pid", "1"],
                             text=True, capture_output=True, env=mcpctl_env(daemon), timeout=BOUND_S)
    assert refused.returncode == 1, refused.stderr
    assert "holder process 1 is not yours" in refused.stderr
    assert daemon.call("allocations.list", {"state": "active"}) == []

