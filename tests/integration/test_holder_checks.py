"""Who may be named as an allocation's holder: a process (not a thread) that the caller owns, unless it administers.

Two real uids: the daemon runs as root and a forked child drops to `nobody` before it connects; the processes
named as holders are real ones of each user.
"""

from __future__ import annotations

import json
import os
import shutil
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
from tests.live import LiveDaemon
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



NAMESPACE_CLIENT = """
import json, socket, sys
sock = socket.socket(socket.AF_UNIX)
sock.connect(sys.argv[1])
batch = [{"jsonrpc": "2.0", "id": n, "method": "allocate",
          "params": {"resources": [{"resource": "slot", "amount": 1}], "holder_pid": 30000 + n}} for n in range(200)]
sock.sendall(json.dumps(batch).encode() + b"\\n")
print(sock.makefile("rb").readline().decode())
"""


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare(1)")
def test_pids_that_do_not_exist_named_from_a_pid_namespace_walk_proc_once_not_per_request(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each walk of /proc (a stat per host process) ran on the event loop: a batch of 1000 such names from an
    `unshare --pid` froze the daemon for everyone (1.5 s with 87 processes; past systemd's watchdog on a host
    with thousands)."""
    walks: list[str] = []
    listdir = os.listdir

    def counted(path: Any = ".") -> list[str]:
        if str(path) == "/proc":
            walks.append(threading.current_thread().name)
        return listdir(path)

    live = LiveDaemon(tmp_path).start()
    try:
        monkeypatch.setattr(os, "listdir", counted)
        done = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c", NAMESPACE_CLIENT,
                               live.socket], capture_output=True, text=True, timeout=60)
        monkeypatch.undo()
        replies = json.loads(done.stdout)
        assert len(replies) == 200
        assert {(r["error"]["code"], r["error"]["data"]["reason"]) for r in replies} == {
            (ErrorCode.INVALID_HOLDER, "not_found")}
        assert len(walks) <= 1, f"{len(walks)} walks of /proc for one batch"
        assert live.call("daemon.status")["allocations"]["active"] == 0
    finally:
        monkeypatch.undo()
        live.close()
