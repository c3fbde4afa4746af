"""mcpctl talks only to a daemon it trusts: the socket's directory and the process serving it must belong to
the user, root, or a uid in $MCPRES_TRUSTED_UID. Otherwise it exits 6 before sending a byte.

The attacker is real: `nobody` (via setpriv) runs tests/fixtures/impostor_daemon.py, which grants its own
GPU to whatever asks; the installed mcpctl runs as root (this test's user).
"""

from __future__ import annotations

import os
import selectors
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from mcpctl import exitcodes
from tests.conftest import FIXTURES, run_cli

NOBODY = 65534
IMPOSTOR = (FIXTURES / "impostor_daemon.py").read_text()

pytestmark = pytest.mark.skipif(os.getuid() != 0 or shutil.which("setpriv") is None,
                                reason="needs root and setpriv to run a second user's server")


class Impostor:
    """impostor_daemon.py run as nobody at `socket_path`; `received()` is every byte it was sent."""

    def __init__(self, socket_path: Path, log: Path) -> None:
        self.log = log
        log.touch()
        os.chown(log, NOBODY, NOBODY)
        self.proc = subprocess.Popen(
            ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "/usr/bin/python3", "-c",
             IMPOSTOR, str(socket_path), str(log)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd="/")
        assert self.proc.stdout is not None
        with selectors.DefaultSelector() as selector:
            selector.register(self.proc.stdout, selectors.EVENT_READ)
            ready = selector.select(timeout=15)
        line = self.proc.stdout.readline() if ready else b""
        if line != b"listening\n":
            self.proc.kill()
            raise AssertionError(f"the impostor did not start: {line!r} {self.proc.communicate()[1]!r}")

    def received(self) -> bytes:
        self.proc.kill()
        self.proc.wait()
        return self.log.read_bytes()


@pytest.fixture
def base() -> Iterator[Path]:
    """A directory both users may enter, outside the default socket paths."""
    path = Path(tempfile.mkdtemp(prefix="trust-test-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path)


COMMANDS = [["allocate", "--gpu", "1", "--env"], ["status"], ["release", "00000000000000aa"]]


@pytest.mark.parametrize("args", COMMANDS, ids=lambda args: args[0])
def test_a_default_socket_directory_made_by_another_user_is_refused_before_connecting(
        base: Path, args: list[str]) -> None:
    """As under cron, su or ssh: nobody made the directory the default socket path lies in."""
    runtime = base / "run"
    runtime.mkdir(mode=0o755)
    planted = runtime / "mcpres"
    planted.mkdir(mode=0o755)
    os.chown(planted, NOBODY, NOBODY)
    impostor = Impostor(planted / "mcpresd.sock", base / "impostor.log")
    try:
        result = run_cli(*args, env={"XDG_RUNTIME_DIR": str(runtime), "MCPRES_RETRY_FOR": "0"})
    finally:
        received = impostor.received()

    assert result.returncode == exitcodes.UNTRUSTED, result
    assert result.stdout == ("(exit 6)\n" if "--env" in args else "")  # for eval: the eval fails too
    assert f"{planted} belongs to uid {NOBODY}" in result.stderr
    assert "MCPRES_TRUSTED_UID" in result.stderr
    assert received == b""


@pytest.mark.parametrize("args", COMMANDS, ids=lambda args: args[0])
def test_a_socket_another_user_serves_in_a_sticky_directory_is_refused_before_a_request(
        base: Path, args: list[str]) -> None:
    """A shared sticky directory such as /tmp passes the directory check; who serves the socket does not."""
    sticky = base / "tmp"
    sticky.mkdir()
    sticky.chmod(0o1777)
    impostor = Impostor(sticky / "mcpresd.sock", base / "impostor.log")
    try:
        result = run_cli(*args, socket_path=str(sticky / "mcpresd.sock"), env={"MCPRES_RETRY_FOR": "0"})
    finally:
        received = impostor.received()

    assert result.returncode == exitcodes.UNTRUSTED, result
    assert result.stdout == ("(exit 6)\n" if "--env" in args else "")  # for eval: the eval fails too
    assert f"runs as uid {NOBODY}" in result.stderr
    assert received == b""


@pytest.mark.parametrize("trusted", [str(NOBODY), "nobody", f"1234, nobody"])
def test_a_daemon_run_by_a_user_named_in_mcpres_trusted_uid_is_used(base: Path, trusted: str) -> None:
    sticky = base / "tmp"
    sticky.mkdir()
    sticky.chmod(0o1777)
    impostor = Impostor(sticky / "mcpresd.sock", base / "impostor.log")
    try:
        result = run_cli("allocate", "--gpu", "1", "--env", socket_path=str(sticky / "mcpresd.sock"),
                         env={"MCPRES_TRUSTED_UID": trusted})
    finally:
        received = impostor.received()

    assert result.returncode == 0, result.stderr
    assert "export CUDA_VISIBLE_DEVICES=GPU-impostor" in result.stdout
    assert b'"method":"allocate"' in received


def test_an_unknown_user_in_mcpres_trusted_uid_is_an_error_not_ignored(base: Path) -> None:
    result = run_cli("status", socket_path=str(base / "mcpresd.sock"),
                     env={"MCPRES_TRUSTED_UID": "no-such-user-here", "MCPRES_RETRY_FOR": "0"})

    assert result.returncode == exitcodes.UNREACHABLE
    assert "'no-such-user-here'" in result.stderr


def test_the_gateway_and_the_mcp_server_refuse_a_server_another_user_runs(base: Path) -> None:
    """Their own connections (asyncio, anyio) make the same checks as `Client` before their first request."""
    import anyio

    from mcpctl.client import UntrustedDaemon
    from mcpctl.gateway.broker import Broker
    from mcpctl.mcp_server import DaemonConnection

    sticky = base / "tmp"
    sticky.mkdir()
    sticky.chmod(0o1777)
    path = str(sticky / "mcpresd.sock")
    impostor = Impostor(sticky / "mcpresd.sock", base / "impostor.log")
    refusals = []

    async def connect_both() -> None:
        gateway = Broker(path, on_event=lambda _: None, on_lost=lambda _: None)
        for attempt in (gateway.connect(timeout=5.0), DaemonConnection(path).call("daemon.status", timeout=5.0)):
            try:
                await attempt
            except UntrustedDaemon as error:
                refusals.append(str(error))

    try:
        anyio.run(connect_both)
    finally:
        received = impostor.received()

    assert len(refusals) == 2 and all(f"runs as uid {NOBODY}" in r for r in refusals), refusals
    assert received == b""
