"""Disk full and read-only database: writes fail with STORAGE_ERROR (1010) and say what to do, reads keep
working, nothing is corrupted, and writes work again once space returns.

The disk-full test puts the daemon's database on a 16 MiB tmpfs (needs root and mount(2); skipped otherwise).
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mcpresd.protocol import ErrorCode
from tests.conftest import DaemonProcess
from tests.fuzz_harness import InProcessDaemon, encode_line

ALLOCATE = {"jsonrpc": "2.0", "id": 1, "method": "allocate",
            "params": {"resources": [{"resource": "slot", "amount": 1}], "ttl": 3600, "tool_id": "t" * 200}}


def _mount(directory: Path, options: str) -> None:
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(directory)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root and mount permission): {result.stderr.strip()}")


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs to fill needs root")
    state = tmp_path / "state"
    state.mkdir()
    _mount(state, "size=16M,mode=0700")
    try:
        yield state
    finally:
        subprocess.run(["umount", "-l", str(state)], check=False)


def _fill(directory: Path) -> Path:
    filler = directory / "filler"
    handle = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (1 << 20, 4096, 512, 1):
            try:
                while os.write(handle, b"\0" * size):
                    pass
            except OSError:
                continue
    finally:
        os.close(handle)
    return filler


def _allocate(daemon: DaemonProcess) -> dict[str, Any]:
    (response,) = daemon.raw(json.dumps(ALLOCATE).encode() + b"\n")
    return response


def _integrity(db: str) -> str:
    conn = sqlite3.connect(db)
    try:
        return str(conn.execute("PRAGMA integrity_check").fetchone()[0])
    finally:
        conn.close()


def test_disk_full_fails_writes_cleanly_and_recovers(tmp_path: Path, small_disk: Path) -> None:
    daemon = DaemonProcess(tmp_path)
    daemon.start()
    try:
        assert "result" in _allocate(daemon)
        filler = _fill(small_disk)
        # SQLite reuses the WAL's pages: writing goes on until it needs a new block.
        for _ in range(2000):
            response = _allocate(daemon)
            if "error" in response:
                break
        else:
            pytest.fail("2000 allocations on a full disk all succeeded")
        error = response["error"]
        assert error["code"] == ErrorCode.STORAGE_ERROR, error
        assert "full" in error["message"] and "free some space" in error["message"], error["message"]
        assert error["data"]["type"] == "StorageError"

        # Reads keep working, and the daemon's books match the database.
        (listing,) = daemon.raw(b'{"jsonrpc":"2.0","id":2,"method":"resources.list"}\n')
        slot = next(r for r in listing["result"] if r["name"] == "slot")
        active = sqlite3.connect(daemon.db).execute(
            "SELECT coalesce(sum(i.amount), 0) FROM allocation_items i JOIN allocations a ON a.id = i.allocation_id"
            " WHERE a.state = 'active' AND i.resource = 'slot'").fetchone()[0]
        assert slot["allocated"] == active

        filler.unlink()
        response = _allocate(daemon)
        assert "result" in response, response
        assert _integrity(daemon.db) == "ok"
    finally:
        daemon.stop()
    assert _integrity(daemon.db) == "ok"


def test_a_disk_smaller_than_the_wal_between_checkpoints_fails_no_request(tmp_path: Path, small_disk: Path) -> None:
    """Where the disk has room, the WAL is checkpointed every 4,096 pages (~16 MiB), more than this whole 16 MiB
    disk: here the daemon keeps SQLite's 1,000 pages, and no request fails."""
    daemon = DaemonProcess(tmp_path)
    daemon.start()
    try:
        for index in range(1500):  # each an allocate and, when its connection closes, a release: ~20 MiB of WAL
            response = _allocate(daemon)
            assert "result" in response, (index, response)
        wal = Path(daemon.db + "-wal")
        assert wal.stat().st_size < 16 << 20
        assert _integrity(daemon.db) == "ok"
    finally:
        daemon.stop()


def test_the_wal_keeps_sqlites_checkpoint_mark_on_a_small_disk(tmp_path: Path, small_disk: Path) -> None:
    from mcpresd.store import WAL_CHECKPOINT_PAGES, WAL_SMALL_DISK_PAGES, Store

    small = Store(small_disk / "state.db")
    assert small.fit_wal_to_disk() == WAL_SMALL_DISK_PAGES
    assert small.conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == WAL_SMALL_DISK_PAGES
    small.close()
    roomy = Store(tmp_path / "roomy.db")  # the test machine's own disk has room for several 16 MiB WALs
    assert roomy.conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == WAL_CHECKPOINT_PAGES
    roomy.close()


def test_read_only_file_system_under_a_running_daemon(tmp_path: Path, small_disk: Path) -> None:
    daemon = DaemonProcess(tmp_path)
    daemon.start()
    try:
        result = subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip("Linux will not remount a file system read-only while the daemon has the database open"
                        f" for writing ({result.stderr.strip().splitlines()[0]}); chmod 0444 does not reach its"
                        " open descriptors either (and root ignores modes). See"
                        " test_read_only_database_connection for a real SQLITE_READONLY.")
        try:
            response = _allocate(daemon)
            assert response["error"]["code"] == ErrorCode.STORAGE_ERROR
            (listing,) = daemon.raw(b'{"jsonrpc":"2.0","id":2,"method":"resources.list"}\n')
            assert "result" in listing
        finally:
            subprocess.run(["mount", "-o", "remount,rw", str(small_disk)], check=False)
        assert "result" in _allocate(daemon)
    finally:
        daemon.stop()
    assert _integrity(daemon.db) == "ok"


def test_read_only_database_connection(tmp_path: Path) -> None:
    """A real SQLITE_READONLY: the store's connection opened read-only (as SQLite does for a file it may not
    write). Writes answer 1010 with what to do; reads keep working; the database and the books are unchanged."""
    daemon = InProcessDaemon(tmp_path / "state.db")
    try:
        peer = daemon.peer()
        replies, _ = daemon.send(encode_line(ALLOCATE), peer)
        assert "result" in json.loads(replies[0] or b"")
        before = daemon.snapshot()
        used = daemon.broker.ledger.used("slot")
        writable = daemon.store.conn
        daemon.store.conn = sqlite3.connect(f"file:{daemon.store.path}?mode=ro", uri=True, isolation_level=None,
                                            check_same_thread=False)
        try:
            replies, _ = daemon.send(encode_line({**ALLOCATE, "id": 2}), daemon.peer())
            error = json.loads(replies[0] or b"")["error"]
            assert error["code"] == ErrorCode.STORAGE_ERROR
            assert "readonly" in error["message"] and "writable" in error["message"], error["message"]
            replies, _ = daemon.send(b'{"jsonrpc":"2.0","id":3,"method":"allocations.list"}', peer)
            assert len(json.loads(replies[0] or b"")["result"]) == 1
            assert daemon.broker.ledger.used("slot") == used
        finally:
            daemon.store.conn.close()
            daemon.store.conn = writable
        assert daemon.snapshot() == before
        replies, _ = daemon.send(encode_line({**ALLOCATE, "id": 4}), peer)
        assert "result" in json.loads(replies[0] or b"")
        assert daemon.store.integrity_ok()
    finally:
        daemon.close()
