"""Access control between users and the limits that keep one client from starving the rest.

Two real uids: the daemon runs as root (as these tests do, in CI too) and a forked child
drops to uid 65534 before it connects (no user entry is needed for a bare uid). Only the
tests that change uid need root; the limits are tested as any user. The admin group is a
throwaway group made for the session (tests/conftest.py `throwaway_group`), so no test
depends on which groups the host happens to have.
"""

from __future__ import annotations

import grp
import json
import os
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mcpresd.protocol import ErrorCode
from tests.conftest import CONFIG, DaemonProcess

NOBODY = 65534

needs_root = pytest.mark.skipif(os.getuid() != 0, reason="needs root to act as a second user (uid 65534)")


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory other users may enter (but not write), for a 0666 socket."""
    path = Path(tempfile.mkdtemp(prefix="mcpres-shared-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        for child in path.iterdir():
            if child.is_dir():
                for inner in child.iterdir():
                    inner.unlink()
                child.rmdir()
            else:
                child.unlink()
        path.rmdir()


@pytest.fixture
def nobodys_process() -> Iterator[int]:
    """The pid of a process running as nobody (real and effective uid)."""
    proc = subprocess.Popen(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "sleep", "60"])
    try:
        deadline = time.monotonic() + 10.0
        while _uids(proc.pid)[:2] != [NOBODY, NOBODY]:  # until setpriv has dropped to nobody
            assert time.monotonic() < deadline, "setpriv did not become nobody"
            time.sleep(0.01)
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()


def _uids(pid: int) -> list[int]:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("Uid:"):
                return [int(part) for part in line.split()[1:]]
    return []


def shared_daemon(tmp_path: Path, shared_dir: Path, extra: str = "") -> DaemonProcess:
    daemon = DaemonProcess(tmp_path, config=CONFIG + extra, extra_args=("--socket-mode", "0666"))
    daemon.socket = str(shared_dir / "mcpresd.sock")
    daemon.args[daemon.args.index("--socket") + 1] = daemon.socket
    daemon.start()
    return daemon


def as_nobody(socket_path: str, requests: list[dict[str, Any]], groups: tuple[int, ...] = ()) -> list[dict[str, Any]]:
    """Send requests on one connection from a child process running as uid and gid 65534 with these supplementary
    groups; return the replies."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop privileges, talk, report, exit without running pytest's cleanup
        try:
            os.close(read_end)
            os.setgroups(list(groups))
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            with socket.socket(socket.AF_UNIX) as sock:
                sock.settimeout(10)
                sock.connect(socket_path)
                stream = sock.makefile("rwb")
                replies = []
                for number, request in enumerate(requests, 1):
                    stream.write(json.dumps({"jsonrpc": "2.0", "id": number, **request}).encode() + b"\n")
                    stream.flush()
                    replies.append(json.loads(stream.readline()))
            os.write(write_end, json.dumps(replies).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    data = b""
    while chunk := os.read(read_end, 65536):
        data += chunk
    os.close(read_end)
    os.waitpid(pid, 0)
    result: list[dict[str, Any]] = json.loads(data)
    return result


@needs_root
def test_another_users_allocation_looks_not_found_and_is_listed_without_details(
        tmp_path: Path, shared_dir: Path) -> None:
    daemon = shared_daemon(tmp_path, shared_dir)
    try:
        mine = daemon.call("allocate", {"resources": [{"resource": "licence", "amount": 1}], "tool_id": "secret-tool",
                                        "holder_pid": os.getpid()})
        release, get, listing = as_nobody(daemon.socket, [
            {"method": "release", "params": {"id": mine["id"]}},
            {"method": "allocations.get", "params": {"id": mine["id"]}},
            {"method": "allocations.list", "params": {}},
        ])
        assert release["error"]["code"] == ErrorCode.ALLOCATION_NOT_FOUND
        assert get["error"]["code"] == ErrorCode.ALLOCATION_NOT_FOUND
        (shown,) = listing["result"]
        assert shown["id"] == mine["id"] and shown["redacted"] is True
        assert shown["tool_id"] is None and shown["holder_pid"] is None and shown["owner_uid"] == 0
        assert daemon.call("allocations.get", {"id": mine["id"]})["state"] == "active"
    finally:
        daemon.stop()


@needs_root
def test_a_users_allocations_are_theirs_and_root_may_release_them(
        tmp_path: Path, shared_dir: Path, nobodys_process: int) -> None:
    daemon = shared_daemon(tmp_path, shared_dir)
    try:
        (theirs,) = as_nobody(daemon.socket, [{"method": "allocate", "params": {
            "resources": [{"resource": "licence", "amount": 1}], "holder_pid": nobodys_process}}])
        assert theirs["result"]["owner_uid"] == NOBODY
        assert daemon.call("release", {"id": theirs["result"]["id"]})["state"] == "released"
    finally:
        daemon.stop()


@needs_root
def test_members_of_the_admin_group_manage_every_allocation(tmp_path: Path, shared_dir: Path,
                                                            throwaway_group: grp.struct_group) -> None:
    daemon = shared_daemon(tmp_path, shared_dir, f'\n[access]\nadmin_group = "{throwaway_group.gr_name}"\n')
    try:
        mine = daemon.call("allocate", {"resources": [{"resource": "licence", "amount": 1}],
                                        "holder_pid": os.getpid()})
        (outsider,) = as_nobody(daemon.socket, [{"method": "release", "params": {"id": mine["id"]}}])
        assert outsider["error"]["code"] == ErrorCode.ALLOCATION_NOT_FOUND  # not in the group: not theirs
        (release,) = as_nobody(daemon.socket, [{"method": "release", "params": {"id": mine["id"]}}],
                               groups=(throwaway_group.gr_gid,))
        assert release["result"]["state"] == "released"
    finally:
        daemon.stop()


@needs_root
def test_connections_per_uid_are_limited_and_other_users_still_get_in(tmp_path: Path, shared_dir: Path) -> None:
    daemon = shared_daemon(tmp_path, shared_dir, '\n[limits]\nmax_connections_per_uid = 3\n')
    held = []
    try:
        for _ in range(3):
            conn = socket.socket(socket.AF_UNIX)
            conn.connect(daemon.socket)
            conn.sendall(b'{"jsonrpc":"2.0","id":1,"method":"daemon.status"}\n')
            assert b'"result"' in conn.recv(65536)  # served: the daemon has counted it
            held.append(conn)
        refused = daemon.raw(b'{"jsonrpc":"2.0","id":1,"method":"daemon.status"}\n')
        assert refused[0]["error"]["code"] == ErrorCode.LIMIT_EXCEEDED, refused
        (status,) = as_nobody(daemon.socket, [{"method": "daemon.status"}])
        assert "result" in status
    finally:
        for conn in held:
            conn.close()
        daemon.stop()


def test_a_half_sent_message_is_dropped_after_the_idle_timeout(tmp_path: Path) -> None:
    daemon = DaemonProcess(tmp_path, config=CONFIG + '\n[limits]\nidle_timeout = "0.5s"\n')
    daemon.start()
    try:
        with socket.socket(socket.AF_UNIX) as conn:
            conn.settimeout(60)  # a deadline for a broken daemon, not a timing
            conn.connect(daemon.socket)
            conn.sendall(b'{"jsonrpc":"2.0","id":1,"meth')
            started = time.monotonic()
            reply = conn.recv(65536)
            assert b"not finished within" in reply
            assert conn.recv(65536) == b""  # then closed
            assert time.monotonic() - started > 0.4  # not before the idle timeout (load only makes it later)
        assert daemon.call("daemon.status")["version"]
    finally:
        daemon.stop()


def test_queued_requests_per_uid_are_limited(tmp_path: Path) -> None:
    daemon = DaemonProcess(tmp_path, config=CONFIG + '\n[limits]\nmax_queued_per_uid = 2\n')
    daemon.start()
    try:
        daemon.call("allocate", {"resources": [{"resource": "licence", "amount": 2}], "holder_pid": os.getpid()})
        queued = {"resources": [{"resource": "licence", "amount": 1}], "holder_pid": os.getpid(), "wait": 60,
                  "detach": True}
        assert daemon.call("allocate", queued)["state"] == "queued"
        assert daemon.call("allocate", queued)["state"] == "queued"
        third = daemon.raw((json.dumps({"jsonrpc": "2.0", "id": 1, "method": "allocate", "params": queued})
                            + "\n").encode())
        assert third[0]["error"]["code"] == ErrorCode.LIMIT_EXCEEDED
    finally:
        daemon.stop()


def test_a_flood_of_idle_connections_does_not_stop_a_legitimate_client(daemon: DaemonProcess) -> None:
    flood = []
    try:
        for _ in range(300):
            conn = socket.socket(socket.AF_UNIX)
            conn.connect(daemon.socket)
            flood.append(conn)
        for _ in range(20):
            assert daemon.call("daemon.status")["version"]
    finally:
        for conn in flood:
            conn.close()
