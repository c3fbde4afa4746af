"""db.backup: a consistent copy of the live database, taken while clients keep allocating."""

from __future__ import annotations

import os
import sqlite3
import threading
from pathlib import Path

import pytest

from mcpctl.client import RpcError
from tests.conftest import DaemonProcess


def allocate_slot(daemon: DaemonProcess) -> str:
    allocation = daemon.call("allocate", {"resources": [{"resource": "slot", "amount": 1}],
                                          "holder_pid": os.getpid()})
    allocation_id: str = allocation["id"]
    return allocation_id


def rows(path: Path, query: str) -> list[tuple[object, ...]]:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return conn.execute(query).fetchall()
    finally:
        conn.close()


def test_a_backup_taken_while_another_client_allocates_is_whole_and_holds_every_acknowledged_allocation(
        daemon: DaemonProcess, tmp_path: Path) -> None:
    held = [allocate_slot(daemon) for _ in range(3)]
    stop = threading.Event()
    churned: list[str] = []
    failures: list[BaseException] = []

    def churn() -> None:
        try:
            with daemon.client() as client:
                while not stop.is_set():
                    allocation = client.call("allocate", {"resources": [{"resource": "slot", "amount": 1}],
                                                          "holder_pid": os.getpid()})
                    churned.append(allocation["id"])
                    client.call("release", {"id": allocation["id"]})
        except BaseException as error:  # noqa: BLE001 - reported by the test below
            failures.append(error)

    worker = threading.Thread(target=churn)
    worker.start()
    try:
        while len(churned) < 20 and worker.is_alive():
            threading.Event().wait(0.01)
        acknowledged = list(churned)
        target = tmp_path / "backups" / "mcpresd.db"
        target.parent.mkdir()
        result = daemon.call("db.backup", {"path": str(target)})
        after_backup = len(churned)
        while len(churned) < after_backup + 20 and worker.is_alive():
            threading.Event().wait(0.01)
    finally:
        stop.set()
        worker.join(30)

    assert not failures
    assert len(churned) >= after_backup + 20  # the other client is still served
    assert result == {"path": str(target), "bytes": target.stat().st_size, "pages": result["pages"]}
    assert result["pages"] * 4096 >= result["bytes"] > 0
    assert rows(target, "PRAGMA integrity_check") == [("ok",)]
    assert rows(target, "PRAGMA journal_mode") == [("delete",)]  # one file: no -wal needed beside it
    assert not any(p.name.endswith(".tmp") for p in target.parent.iterdir())
    active = {row[0] for row in rows(target, "SELECT id FROM allocations WHERE state = 'active'")}
    assert set(held) <= active
    stored = {row[0] for row in rows(target, "SELECT id FROM allocations")}
    assert set(acknowledged) <= stored
    items = rows(target, "SELECT allocation_id, resource, amount FROM allocation_items")
    assert sorted(i for i in items if i[0] in held) == sorted((allocation_id, "slot", 1.0) for allocation_id in held)


def test_an_existing_file_is_kept_unless_overwrite_is_given(daemon: DaemonProcess, tmp_path: Path) -> None:
    target = tmp_path / "copy.db"
    target.write_bytes(b"precious")

    with pytest.raises(RpcError) as refused:
        daemon.call("db.backup", {"path": str(target)})

    assert refused.value.code == -32602 and "exists" in refused.value.message
    assert target.read_bytes() == b"precious"
    held = allocate_slot(daemon)

    daemon.call("db.backup", {"path": str(target), "overwrite": True})

    assert rows(target, "SELECT id FROM allocations") == [(held,)]


@pytest.mark.parametrize(("path", "says"), [
    ("relative/copy.db", "must be absolute"),
    ("/no/such/directory/copy.db", "does not exist"),
    ("{db}", "the daemon's own files"),
    ("{tmp}/", "must name a file"),
])
def test_a_backup_to_a_bad_path_is_refused(daemon: DaemonProcess, tmp_path: Path, path: str, says: str) -> None:
    with pytest.raises(RpcError) as refused:
        daemon.call("db.backup", {"path": path.format(db=daemon.db, tmp=tmp_path)})

    assert refused.value.code == -32602 and says in refused.value.message


def test_a_backup_that_cannot_be_written_is_a_storage_error(daemon: DaemonProcess, tmp_path: Path) -> None:
    not_a_directory = tmp_path / "plain-file"
    not_a_directory.write_text("")
    target = not_a_directory / "copy.db"  # ENOTDIR, for root too

    with pytest.raises(RpcError) as failed:
        daemon.call("db.backup", {"path": str(target)})

    assert failed.value.code == 1010 and failed.value.data["type"] == "BackupFailed"
    assert daemon.call("daemon.status")["allocations"] is not None  # still serving


@pytest.mark.parametrize("path", ["{db}.lock", "{db}-wal", "{socket}"])
def test_a_backup_over_the_daemons_own_files_is_refused_and_it_keeps_serving(daemon: DaemonProcess,
                                                                             path: str) -> None:
    """`--overwrite` onto the lock file replaced the file the daemon holds: its next commit stopped it."""
    target = path.format(db=daemon.db, socket=daemon.socket)
    with pytest.raises(RpcError) as refused:
        daemon.call("db.backup", {"path": target, "overwrite": True})

    assert refused.value.code == -32602 and "daemon's own" in refused.value.message
    allocate_slot(daemon)
    assert daemon.proc.poll() is None
