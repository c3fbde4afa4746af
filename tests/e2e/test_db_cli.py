"""`mcpctl db backup` as a user runs it, restoring from the copy, and `mcpresd` refusing a damaged database."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, DaemonProcess, run_cli

pytestmark = pytest.mark.e2e

BIN = Path(sys.executable).parent


def allocate(daemon: DaemonProcess) -> str:
    done = run_cli("allocate", "--res", "slot=1", "--holder-pid", str(os.getpid()), socket_path=daemon.socket)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def backup(daemon: DaemonProcess, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, MCPRES_SOCKET=daemon.socket)
    return subprocess.run([str(BIN / "mcpctl"), "db", "backup", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=60)


def test_a_backup_restored_over_the_database_brings_back_its_allocations(daemon: DaemonProcess,
                                                                        tmp_path: Path) -> None:
    held = allocate(daemon)

    done = backup(daemon, "copy.db", cwd=tmp_path)

    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"backed up to {tmp_path / 'copy.db'} (")
    allocate(daemon)  # after the backup: gone once it is restored
    daemon.stop()
    for suffix in ("-wal", "-shm"):
        Path(daemon.db + suffix).unlink(missing_ok=True)
    shutil.copy(tmp_path / "copy.db", daemon.db)
    daemon.start()
    active = run_cli("allocations", "--json", socket_path=daemon.socket)
    assert [a["id"] for a in json.loads(active.stdout)] == [held]


def test_an_existing_target_needs_overwrite(daemon: DaemonProcess, tmp_path: Path) -> None:
    (tmp_path / "copy.db").write_text("keep me")

    refused = backup(daemon, "copy.db", cwd=tmp_path)

    assert refused.returncode == 2
    assert "exists" in refused.stderr and "--overwrite" in refused.stderr
    assert (tmp_path / "copy.db").read_text() == "keep me"

    done = backup(daemon, str(tmp_path / "copy.db"), "--overwrite", "--json", cwd=ROOT)

    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["path"] == str(tmp_path / "copy.db") and result["bytes"] == (tmp_path / "copy.db").stat().st_size


def test_the_daemon_refuses_a_damaged_database_and_says_what_to_do(daemon: DaemonProcess, tmp_path: Path) -> None:
    allocate(daemon)
    copy = tmp_path / "copy.db"
    assert backup(daemon, str(copy), cwd=tmp_path).returncode == 0
    size = copy.stat().st_size
    with open(copy, "r+b") as file:  # leave the header page whole: the file opens, its tables do not add up
        file.seek(size // 4)
        file.write(b"\xa5" * (size // 2))

    done = subprocess.run([str(BIN / "mcpresd"), "--db", str(copy), "--socket", str(tmp_path / "other.sock"),
                           "--gpu-replay", str(ROOT / "tests" / "fixtures" / "h100-nvml-capture.json")],
                          capture_output=True, text=True, timeout=60)

    assert done.returncode != 0
    assert f"database {copy} failed its integrity check" in done.stderr
    assert "mcpctl db backup" in done.stderr and f"cp BACKUP {copy}" in done.stderr
    assert f"mv {copy} {copy}.corrupt" in done.stderr
    assert "refusing to start on it.\n    To restore a copy made with `mcpctl db backup`:\n" in done.stderr
    assert "\\n" not in done.stderr  # real newlines, not escaped ones
    assert not (tmp_path / "other.sock").exists()
