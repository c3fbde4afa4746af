"""What mcpresd refuses to start on: a damaged database (README: "A database that fails its integrity check is
refused, with what to do") and a socket directory another user could change. Each refusal is a non-zero exit
with one message that names the path and the fix, before any socket exists and without writing the database.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT, DaemonProcess


def refused(daemon: DaemonProcess) -> tuple[int, str]:
    """Run the daemon to its exit (it must not start); its exit status and what it printed."""
    done = subprocess.run(daemon.args, capture_output=True, text=True, timeout=60, cwd=ROOT)
    return done.returncode, done.stdout + done.stderr


def made_database(tmp_path: Path) -> DaemonProcess:
    """A daemon that ran once, made an allocation and stopped, its WAL folded into the database file."""
    daemon = DaemonProcess(tmp_path)
    daemon.start()
    daemon.call("allocate", {"resources": [{"resource": "licence", "amount": 1}], "holder_pid": os.getpid()})
    assert daemon.stop() == 0
    conn = sqlite3.connect(daemon.db)
    try:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()
    return daemon


def overwrite_page_of(database: str, table: str) -> None:
    """Fill the b-tree root page of `table` with garbage: the file still opens, PRAGMA quick_check fails."""
    conn = sqlite3.connect(database)
    try:
        (root,) = conn.execute("SELECT rootpage FROM sqlite_master WHERE name = ?", (table,)).fetchone()
        (page_size,) = conn.execute("PRAGMA page_size").fetchone()
    finally:
        conn.close()
    with open(database, "r+b") as file:
        file.seek((root - 1) * page_size)
        file.write(b"\xa5" * page_size)


def damage_header(database: str) -> None:
    with open(database, "r+b") as file:
        file.write(b"this is no SQLite file, not at all")


@pytest.mark.parametrize("damage", [
    pytest.param(lambda db: overwrite_page_of(db, "allocations"), id="a damaged table page"),
    pytest.param(damage_header, id="a damaged header"),
])
def test_a_damaged_database_is_refused_with_what_to_do(tmp_path: Path, damage: object) -> None:
    daemon = made_database(tmp_path)
    assert callable(damage)
    damage(daemon.db)
    before = Path(daemon.db).read_bytes()

    status, output = refused(daemon)

    assert status != 0
    assert f"database {daemon.db} failed its integrity check" in output, output
    assert "mcpctl db backup" in output and f"mv {daemon.db} {daemon.db}.corrupt" in output, output
    assert "Traceback" not in output, output
    assert not os.path.exists(daemon.socket)
    assert Path(daemon.db).read_bytes() == before  # nothing migrated or recovered into the damaged file


def test_an_undamaged_database_of_the_same_making_is_served(tmp_path: Path) -> None:
    """The control for the test above: the same steps without the damage start and keep the allocation."""
    daemon = made_database(tmp_path)
    daemon.start()
    try:
        assert daemon.call("daemon.status")["allocations"]["active"] == 1  # its holder, this process, lives
    finally:
        daemon.stop()


def socket_in(tmp_path: Path, directory: Path) -> DaemonProcess:
    daemon = DaemonProcess(tmp_path)
    daemon.socket = str(directory / "mcpresd.sock")
    daemon.args[daemon.args.index("--socket") + 1] = daemon.socket
    return daemon


def test_a_socket_directory_others_may_write_is_refused(tmp_path: Path) -> None:
    directory = tmp_path / "open"
    directory.mkdir()
    directory.chmod(0o777)  # no sticky bit: anyone could replace the socket
    daemon = socket_in(tmp_path, directory)

    status, output = refused(daemon)

    assert status != 0
    assert f"{directory} is writable by other users (mode 0777)" in output, output
    assert f"chmod go-w {directory}" in output
    assert os.listdir(directory) == []


def test_a_sticky_shared_directory_is_accepted(tmp_path: Path) -> None:
    """The control: /tmp-like (1777) directories cannot have another user's entries replaced."""
    directory = tmp_path / "sticky"
    directory.mkdir()
    directory.chmod(0o1777)
    daemon = socket_in(tmp_path, directory)
    daemon.start()
    try:
        assert daemon.call("daemon.status")["socket"] == daemon.socket
    finally:
        daemon.stop()


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to give a directory to another uid")
def test_a_socket_directory_of_another_user_is_refused(tmp_path: Path) -> None:
    directory = tmp_path / "theirs"
    directory.mkdir(mode=0o755)
    os.chown(directory, 65534, 65534)
    daemon = socket_in(tmp_path, directory)

    status, output = refused(daemon)

    assert status != 0
    assert f"{directory} belongs to uid 65534" in output, output
    assert os.listdir(directory) == []
