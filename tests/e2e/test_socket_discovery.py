"""mcpctl finds the daemon without flags: --socket, $MCPRES_SOCKET, this user's socket, the system socket; the
Typer commands and the fast path (allocate, release) by the same rule; `status` says which and why. No daemon:
exit 5 at once, saying what was looked at and how to start one; a retry wait only when asked, and announced."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from mcpctl import exitcodes
from tests.conftest import DaemonProcess, run_cli

pytestmark = pytest.mark.e2e

NOBODY = 65534
AT_ONCE_S = 8.0
"""Well under the 10 s a restarting daemon is waited for: a command given no daemon must not wait that long."""


@pytest.fixture
def runtime(tmp_path: Path) -> Path:
    path = tmp_path / "run"
    path.mkdir(mode=0o700)
    return path


@pytest.fixture
def user_daemon(tmp_path: Path, runtime: Path) -> Iterator[DaemonProcess]:
    """A daemon serving this user's socket, $XDG_RUNTIME_DIR/mcpres/mcpresd.sock, as `mcpresd` alone does;
    stopped after the test (if the test has not stopped it)."""
    (runtime / "mcpres").mkdir(mode=0o700)
    process = DaemonProcess(tmp_path, extra_args=("--socket", str(runtime / "mcpres" / "mcpresd.sock")))
    process.socket = str(runtime / "mcpres" / "mcpresd.sock")
    process.start()
    try:
        yield process
    finally:
        process.stop()


def test_status_finds_the_user_socket_and_says_why(user_daemon: DaemonProcess, runtime: Path) -> None:
    try:
        result = run_cli("status", "--json", env={"XDG_RUNTIME_DIR": str(runtime)})
        text = run_cli("status", env={"XDG_RUNTIME_DIR": str(runtime)})
    finally:
        user_daemon.stop()

    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout)["found"]
    assert found["path"] == user_daemon.socket and found["source"] == "user"
    assert "$XDG_RUNTIME_DIR" in found["why"]
    assert found["tried"] == [user_daemon.socket, "/run/mcpres/mcpresd.sock"]
    assert f"socket: {user_daemon.socket} (user: your daemon's socket exists" in text.stdout


def test_the_fast_path_finds_the_same_socket(user_daemon: DaemonProcess, runtime: Path) -> None:
    env = {"XDG_RUNTIME_DIR": str(runtime)}
    try:
        allocated = run_cli("allocate", "--res", "slot=1", env=env)
        listed = run_cli("allocations", "--json", env=env)
        released = run_cli("release", allocated.stdout.strip(), env=env)
    finally:
        user_daemon.stop()

    assert allocated.returncode == 0, allocated.stderr
    assert [a["id"] for a in json.loads(listed.stdout)] == [allocated.stdout.strip()]
    assert released.returncode == 0, released.stderr


def test_mcpres_socket_comes_before_the_user_socket(user_daemon: DaemonProcess, tmp_path: Path,
                                                     runtime: Path) -> None:
    elsewhere = str(tmp_path / "elsewhere.sock")
    try:
        result = run_cli("status", socket_path=elsewhere, env={"XDG_RUNTIME_DIR": str(runtime)},
                         timeout=AT_ONCE_S)
    finally:
        user_daemon.stop()

    assert result.returncode == exitcodes.UNREACHABLE
    assert elsewhere in result.stderr and "looked for" not in result.stderr


def test_no_daemon_exits_5_at_once_saying_where_it_looked_and_how_to_start_one(runtime: Path) -> None:
    result = run_cli("status", env={"XDG_RUNTIME_DIR": str(runtime)}, timeout=AT_ONCE_S)
    fast = run_cli("allocate", "--res", "slot=1", env={"XDG_RUNTIME_DIR": str(runtime)}, timeout=AT_ONCE_S)

    for done in (result, fast):
        assert done.returncode == exitcodes.UNREACHABLE, done.stderr
        assert done.stdout == ""
        assert "retrying" not in done.stderr
        assert f"looked for: {runtime}/mcpres/mcpresd.sock and /run/mcpres/mcpresd.sock" in done.stderr
        assert "start it with `mcpresd`" in done.stderr and "mcpresd install --user" in done.stderr


def test_under_env_i_it_looks_where_a_login_would_have_put_the_socket() -> None:
    """cron and `env -i` give no $XDG_RUNTIME_DIR: the login runtime directory /run/user/UID, else /tmp."""
    mcpctl = str(Path(sys.executable).parent / "mcpctl")
    done = subprocess.run(["env", "-i", mcpctl, "status"], capture_output=True, text=True, timeout=AT_ONCE_S)
    uid = os.getuid()
    user = (f"/run/user/{uid}/mcpres/mcpresd.sock" if os.path.isdir(f"/run/user/{uid}")
            else f"/tmp/mcpres-{uid}/mcpresd.sock")
    if os.path.exists(user) or os.path.exists("/run/mcpres/mcpresd.sock"):
        pytest.skip("a daemon serves this host's default sockets")

    assert done.returncode == exitcodes.UNREACHABLE, done.stderr
    assert f"looked for: {user} and /run/mcpres/mcpresd.sock" in done.stderr
    assert "retrying" not in done.stderr


def test_a_runtime_dir_of_another_user_is_not_taken_for_ours(tmp_path: Path) -> None:
    """sudo may keep the invoking user's $XDG_RUNTIME_DIR: root looks in its own places instead."""
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, NOBODY, NOBODY)

    result = run_cli("status", env={"XDG_RUNTIME_DIR": str(theirs)}, timeout=AT_ONCE_S)

    assert result.returncode == exitcodes.UNREACHABLE
    assert f"$XDG_RUNTIME_DIR={theirs} ignored: it belongs to uid {NOBODY}" in result.stderr
    assert f"{theirs}/mcpres" not in result.stderr


def test_the_retry_wait_is_announced_when_asked_for(runtime: Path) -> None:
    result = run_cli("--retry-for", "300ms", "status", env={"XDG_RUNTIME_DIR": str(runtime)}, timeout=30)

    assert result.returncode == exitcodes.UNREACHABLE
    assert result.stderr.count("retrying for up to 0.3s") == 1, result.stderr
    assert "gave up after retrying for 0.3s" in result.stderr


def test_a_refused_socket_fails_at_once_unless_a_retry_time_is_asked_for(tmp_path: Path) -> None:
    """A socket left by a daemon that died (refused): no daemon is running, so exit 5 at once, saying so; with
    --retry-for it is waited for (a daemon being restarted by hand), and the wait is announced."""
    path = str(tmp_path / "stale.sock")
    with socket.socket(socket.AF_UNIX) as stale:
        stale.bind(path)
    env = dict(os.environ, MCPRES_SOCKET=path)
    env.pop("MCPRES_RETRY_FOR", None)
    mcpctl = str(Path(sys.executable).parent / "mcpctl")

    at_once = subprocess.run([mcpctl, "status"], env=env, capture_output=True, text=True, timeout=AT_ONCE_S)
    assert at_once.returncode == exitcodes.UNREACHABLE, at_once.stderr
    assert "connection refused" in at_once.stderr and "retrying" not in at_once.stderr

    waiting = subprocess.Popen([mcpctl, "--retry-for", "30s", "status"], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        assert waiting.stderr is not None
        line = waiting.stderr.readline()  # blocks until the announcement: no timing involved
    finally:
        waiting.kill()
        waiting.communicate()

    assert f"cannot reach mcpresd at {path}" in line and "retrying for up to 30s" in line


def test_status_says_once_that_mcpres_socket_chose_the_socket(user_daemon: DaemonProcess, runtime: Path) -> None:
    text = run_cli("status", socket_path=user_daemon.socket, env={"XDG_RUNTIME_DIR": str(runtime)})

    assert text.returncode == 0, text.stderr
    assert f"socket: {user_daemon.socket} ($MCPRES_SOCKET is set)" in text.stdout


def test_status_names_the_user_socket_as_its_source_where_the_reason_mentions_run_user() -> None:
    # No $XDG_RUNTIME_DIR: the reason names /run/user/UID, which holds the word "user"; the source is still said.
    from mcpctl.render import socket_line

    found = {"path": "/tmp/mcpres-0/mcpresd.sock", "source": "user",
             "why": "your daemon's socket exists (in no runtime directory (no $XDG_RUNTIME_DIR, no /run/user/0))"}

    assert socket_line({"socket": found["path"], "found": found}).startswith(
        "/tmp/mcpres-0/mcpresd.sock (user: your daemon's socket exists")
