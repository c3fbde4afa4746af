"""Socket activation: mcpresd serves the listening socket systemd passes as fd 3, and leaves its file alone."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mcpresd.server import inherited_socket
from tests.conftest import ROOT, DaemonProcess

# What systemd does between fork and exec: the socket becomes fd 3, LISTEN_PID names the process itself.
WRAPPER = """
import os, sys
fd = int(sys.argv[1])
if fd != 3:
    os.dup2(fd, 3)
    os.close(fd)
os.set_inheritable(3, True)
env = dict(os.environ, LISTEN_FDS="1", LISTEN_FDNAMES="mcpresd.socket", LISTEN_PID=str(os.getpid()))
os.execve(sys.argv[2], sys.argv[2:], env)
"""


class Activated:
    """mcpresd started the way systemd starts it for mcpresd.socket: the test plays systemd and owns the socket."""

    def __init__(self, tmp: Path) -> None:
        self.daemon = DaemonProcess(tmp)  # its --socket is mcpresd.sock: ignored when a socket is passed
        self.path = str(tmp / "activated.sock")
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.path)
        self.listener.listen(16)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        fd = self.listener.fileno()
        with open(self.daemon.log_path, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-c", WRAPPER, str(fd), *self.daemon.args],
                                         pass_fds=(fd,), stdout=log, stderr=log, cwd=ROOT)

    def stop(self) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(10)


@pytest.fixture
def activated(tmp_path: Path) -> Iterator[Activated]:
    service = Activated(tmp_path)
    try:
        yield service
    finally:
        if service.proc is not None and service.proc.poll() is None:
            service.proc.kill()
            service.proc.wait()
        service.listener.close()


def request(sock: socket.socket, method: str, id: int = 1) -> None:
    sock.sendall(json.dumps({"jsonrpc": "2.0", "id": id, "method": method}).encode() + b"\n")


def answer(sock: socket.socket) -> Any:
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(65536)
        assert chunk, "the daemon closed the connection without answering"
        data += chunk
    return json.loads(data)


def status_via(path: str, timeout: float = 15.0) -> Any:
    with socket.socket(socket.AF_UNIX) as client:
        client.settimeout(timeout)
        client.connect(path)  # accepted by the kernel into the backlog even before the daemon runs
        request(client, "daemon.status")
        return answer(client)["result"]


def test_the_daemon_serves_the_passed_socket_and_binds_none_of_its_own(activated: Activated) -> None:
    activated.start()

    status = status_via(activated.path)

    assert status["socket"] == activated.path
    assert not os.path.exists(activated.daemon.socket)
    assert "serving on " + activated.path in activated.daemon.log()


def test_the_socket_file_outlives_the_daemon_and_a_client_waiting_during_a_restart_is_answered(
        activated: Activated) -> None:
    activated.start()
    first = status_via(activated.path)["pid"]

    assert activated.stop() == 0
    assert os.path.exists(activated.path), "systemd owns the socket file: the daemon must not remove it"

    with socket.socket(socket.AF_UNIX) as waiting:
        waiting.settimeout(15)
        waiting.connect(activated.path)  # no daemon now: the connection waits in the socket's backlog
        request(waiting, "daemon.status", id=7)
        activated.start()
        reply = answer(waiting)

    assert reply["id"] == 7 and reply["result"]["pid"] != first


def test_a_passed_descriptor_that_is_no_listening_socket_is_refused(tmp_path: Path) -> None:
    daemon = DaemonProcess(tmp_path)
    not_listening = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        fd = not_listening.fileno()
        done = subprocess.run([sys.executable, "-c", WRAPPER, str(fd), *daemon.args], pass_fds=(fd,),
                              capture_output=True, text=True, timeout=30, cwd=ROOT)
    finally:
        not_listening.close()

    assert done.returncode == 1
    assert "not a listening Unix stream socket" in done.stderr
    assert not os.path.exists(daemon.socket)


@pytest.mark.parametrize("environ", [
    {},
    {"LISTEN_FDS": "1"},
    {"LISTEN_FDS": "1", "LISTEN_PID": "1"},
])
def test_sockets_passed_to_another_process_are_not_ours(environ: dict[str, str]) -> None:
    before = dict(environ)

    assert inherited_socket(environ) is None
    assert environ == before
