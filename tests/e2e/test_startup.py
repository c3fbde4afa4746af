"""Starting `mcpresd`: one daemon per database, nothing touched before the lock and the socket are ours,
paths that are not followed through other users' links, and start-up errors that say what to do.

The installed `mcpresd` runs as a user runs it; its exit statuses are the documented ones (README, "The
daemon"): 2 config, 3 database or socket in use, 4 a path that cannot be used.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mcpctl.client import Client, RpcError
from mcpresd.protocol import ErrorCode
from tests.conftest import CONFIG, DaemonProcess, as_json, ok
from tests.integration.test_disk_full import _fill, _mount

pytestmark = pytest.mark.e2e

MCPRESD = str(Path(sys.executable).parent / "mcpresd")
NOBODY = 65534
BOUND_S = 30.0


def mcpresd(*args: str, env: dict[str, str] | None = None, user: int | None = None,
            cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run the installed mcpresd to its end (a refused start ends at once); as `user` through setpriv."""
    command = [MCPRESD, *args]
    if user is not None:
        command = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *command]
    return subprocess.run(command, capture_output=True, text=True, timeout=BOUND_S, env=env, cwd=cwd)


def untimed(line: str) -> str:
    """A log line without the timestamp it starts with where stderr is not the journal."""
    return line.split(" ", 1)[1] if line[:1].isdigit() else line


def error_line(result: subprocess.CompletedProcess[str]) -> str:
    """The one line a refused start prints (and check that it is one line, with no traceback)."""
    assert "Traceback" not in result.stderr, result.stderr
    errors = [untimed(line) for line in result.stderr.splitlines() if not untimed(line).startswith("INFO ")]
    assert len(errors) == 1, result.stderr
    return errors[0]


def table_rows(db: str, table: str) -> list[tuple[object, ...]]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return conn.execute(f"SELECT * FROM {table} ORDER BY 1").fetchall()
    finally:
        conn.close()


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A short directory (socket paths are limited to ~107 bytes) that other users may enter, not write."""
    base = Path(tempfile.mkdtemp(prefix="mcpres-st-"))
    base.chmod(0o755)
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(["sleep", "60"])
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)


def needs_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: another user plants the links (setpriv)")


def test_mcpresd_help_lists_the_exit_statuses() -> None:
    shown = mcpresd("--help")

    assert shown.returncode == 0
    for line in ("2  bad options or config file", "3  another daemon holds the database or serves the socket",
                 "4  a path cannot be used"):
        assert line in shown.stdout


# -- 1. one daemon per database ----------------------------------------------


@pytest.mark.parametrize("capture", ["missing.json", "broken.json"])
def test_a_gpu_capture_that_cannot_be_replayed_is_a_bad_option_status_2(tmp_path: Path, capture: str) -> None:
    (tmp_path / "broken.json").write_text("{")
    path = str(tmp_path / capture)
    for args in (["--socket", str(tmp_path / "s.sock"), "--db", str(tmp_path / "db")], ["--check-config"]):
        result = mcpresd(*args, "--gpu-replay", path)

        assert result.returncode == 2, result.stderr
        assert "--gpu-replay (gpu_replay): " in error_line(result) and path in error_line(result)
    assert not (tmp_path / "db").exists()


@pytest.mark.parametrize("same_socket", [False, True])
def test_a_second_daemon_on_the_same_database_is_refused_with_status_3(
        daemon: DaemonProcess, same_socket: bool) -> None:
    first = ok(daemon, "allocate", "--res", "licence=2").strip()
    other_socket = daemon.socket if same_socket else str(daemon.tmp / "second.sock")

    refused = mcpresd("--config", str(daemon.config_path), "--socket", other_socket, "--db", daemon.db)

    assert refused.returncode == 3, refused.stderr
    assert f"database {daemon.db} in use by pid {daemon.proc.pid}" in error_line(refused)  # type: ignore[union-attr]
    assert not os.path.lexists(daemon.tmp / "second.sock")
    assert [a["id"] for a in as_json(daemon, "allocations")] == [first]
    assert daemon.proc is not None and daemon.proc.poll() is None


def test_two_daemons_started_at_once_on_a_new_database_one_serves_the_other_is_refused(
        short_tmp: Path) -> None:
    config = short_tmp / "mcpresd.toml"
    config.write_text(CONFIG)
    for attempt in range(4):
        db = short_tmp / f"state{attempt}" / "mcpresd.db"
        sockets = [short_tmp / f"a{attempt}.sock", short_tmp / f"b{attempt}.sock"]
        procs = [subprocess.Popen([MCPRESD, "--config", str(config), "--socket", str(path), "--db", str(db)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for path in sockets]
        try:
            deadline = time.monotonic() + BOUND_S
            while all(p.poll() is None for p in procs):
                assert time.monotonic() < deadline, "neither daemon was refused"
                time.sleep(0.02)
            [loser] = [p for p in procs if p.poll() is not None]
            [winner] = [p for p in procs if p is not loser]
            _, err = loser.communicate(timeout=BOUND_S)
            assert loser.returncode == 3, err
            assert "already exists" not in err
            assert f"database {db} in use by pid {winner.pid}" in err
            serving = sockets[procs.index(winner)]
            with socket.socket(socket.AF_UNIX) as probe:
                probe.settimeout(BOUND_S)
                probe.connect(str(serving))
            assert not os.path.lexists(sockets[procs.index(loser)])
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
                proc.communicate(timeout=BOUND_S)
        assert winner.returncode == 0


# -- 2. nothing touches the database before the lock and the socket are ours ----


def test_a_daemon_refused_the_socket_runs_no_recovery_on_its_database(
        daemon: DaemonProcess, sleeper: subprocess.Popen[bytes]) -> None:
    held = ok(daemon, "allocate", "--res", "slot=3", "--holder-pid", str(sleeper.pid)).strip()
    copy = str(daemon.tmp / "copy" / "mcpresd.db")
    os.makedirs(os.path.dirname(copy), mode=0o700)
    ok(daemon, "db", "backup", copy)
    sleeper.kill()
    sleeper.wait(timeout=10)  # the copy's allocation now has a dead holder: recovery would end it
    before = {table: table_rows(copy, table) for table in ("allocations", "events", "resources")}

    refused = mcpresd("--config", str(daemon.config_path), "--socket", daemon.socket, "--db", copy)

    assert refused.returncode == 3, refused.stderr
    assert f"another daemon is serving {daemon.socket}" in error_line(refused)
    assert {table: table_rows(copy, table) for table in before} == before
    [row] = [r for r in before["allocations"] if r[0] == held]
    assert row[1] == "active"
    assert not os.path.exists(copy + "-wal")


# -- 15. paths are not followed through other users' links -----------------------


def test_a_database_in_a_directory_others_may_write_to_is_refused(short_tmp: Path) -> None:
    shared = short_tmp / "shared"
    shared.mkdir()
    shared.chmod(0o777)

    refused = mcpresd("--socket", str(short_tmp / "m.sock"), "--db", str(shared / "mcpresd.db"))

    assert refused.returncode == 4, refused.stderr
    line = error_line(refused)
    assert f"{shared} is writable by other users (mode 0777)" in line and "chmod go-w" in line
    assert os.listdir(shared) == []


def test_a_planted_link_as_the_database_is_refused_and_its_target_untouched(short_tmp: Path) -> None:
    needs_root()
    sticky = short_tmp / "tmp"
    sticky.mkdir()
    sticky.chmod(0o1777)  # like /tmp: anyone may create files, nobody may replace another's
    target = short_tmp / "precious"
    target.write_bytes(b"root's data\n")
    link = sticky / "mcpresd.db"
    subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "ln", "-s", str(target),
                    str(link)], check=True, timeout=BOUND_S)

    refused = mcpresd("--socket", str(short_tmp / "m.sock"), "--db", str(link))

    assert refused.returncode == 4, refused.stderr
    assert f"{link}: it is a symbolic link" in error_line(refused)
    assert target.read_bytes() == b"root's data\n"
    assert sorted(os.listdir(sticky)) == ["mcpresd.db", "mcpresd.db.lock"]
    assert os.path.islink(link)


@pytest.mark.parametrize("what", ["socket", "db"])
def test_a_directory_link_planted_by_another_user_is_not_followed(short_tmp: Path, what: str) -> None:
    needs_root()
    sticky = short_tmp / "tmp"
    sticky.mkdir()
    sticky.chmod(0o1777)
    etc = short_tmp / "etc"  # stands for /etc: root's, mode 0755
    etc.mkdir(mode=0o755)
    planted = sticky / "mcpres-0"
    subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "ln", "-s", str(etc),
                    str(planted)], check=True, timeout=BOUND_S)
    args = {"socket": ["--socket", str(planted / "mcpresd.sock"), "--db", str(short_tmp / "state" / "m.db")],
            "db": ["--socket", str(short_tmp / "m.sock"), "--db", str(planted / "mcpresd.db")]}[what]

    refused = mcpresd(*args)

    assert refused.returncode == 4, refused.stderr
    assert f"{planted} is a symbolic link made by uid {NOBODY}" in error_line(refused)
    assert os.listdir(etc) == []


def test_a_socket_path_that_is_not_a_socket_is_refused_with_status_4(short_tmp: Path) -> None:
    squatter = short_tmp / "m.sock"
    squatter.write_text("not a socket\n")

    refused = mcpresd("--socket", str(squatter), "--db", str(short_tmp / "state" / "m.db"))

    assert refused.returncode == 4, refused.stderr
    assert f"{squatter} exists and is not a socket" in error_line(refused)
    assert squatter.read_text() == "not a socket\n"
    assert not os.path.exists(short_tmp / "state" / "m.db")


def test_a_database_directory_reached_through_roots_own_link_is_served(short_tmp: Path) -> None:
    # systemd's DynamicUser=yes makes /var/lib/mcpresd root's link to /var/lib/private/mcpresd.
    private = short_tmp / "private" / "mcpresd"
    private.mkdir(parents=True, mode=0o700)
    (short_tmp / "mcpresd").symlink_to(private)
    daemon = DaemonProcess(short_tmp)
    daemon.db = str(short_tmp / "mcpresd" / "mcpresd.db")
    daemon.args[daemon.args.index("--db") + 1] = daemon.db
    daemon.start()
    try:
        ok(daemon, "allocate", "--res", "slot=1")
        assert (private / "mcpresd.db").is_file() and (private / "mcpresd.db.lock").is_file()
    finally:
        assert daemon.stop() == 0


# -- 17. start-up errors name the path and the fix -------------------------------


def test_an_unwritable_home_names_the_path_and_the_fix(short_tmp: Path) -> None:
    needs_root()
    assert not os.path.exists("/nonexistent")
    run_dir = short_tmp / "run"
    run_dir.mkdir(mode=0o700)
    os.chown(run_dir, NOBODY, NOBODY)
    env = {k: v for k, v in os.environ.items()
           if k not in ("XDG_STATE_HOME", "STATE_DIRECTORY") and not k.startswith("MCPRES_")}
    env["HOME"] = "/nonexistent"

    refused = mcpresd("--socket", str(run_dir / "m.sock"), env=env, user=NOBODY, cwd=run_dir)

    assert refused.returncode == 4, refused.stderr
    line = error_line(refused)
    assert "cannot create the database directory /nonexistent/.local/state/mcpresd: Permission denied" in line
    assert "--db" in line
    assert os.listdir(run_dir) == []


def test_a_deeply_nested_config_is_one_line_and_status_2(short_tmp: Path) -> None:
    config = short_tmp / "deep.toml"
    config.write_text("x = " + "[" * 100_000 + "]" * 100_000 + "\n")

    refused = mcpresd("--config", str(config), "--socket", str(short_tmp / "m.sock"),
                      "--db", str(short_tmp / "state" / "m.db"))

    assert refused.returncode == 2, refused.stderr[-2000:]
    assert f"{config} is nested too deeply" in error_line(refused)


def test_a_pool_with_an_unknown_parent_is_a_config_error(short_tmp: Path) -> None:
    config = short_tmp / "pools.toml"
    config.write_text(CONFIG + '\n[[pools]]\nname = "build"\nfactory = "slots"\nparent = "nosuch"\nslot_size = 1\n'
                      'max = 2\n')

    refused = mcpresd("--config", str(config), "--socket", str(short_tmp / "m.sock"),
                      "--db", str(short_tmp / "state" / "m.db"))

    assert refused.returncode == 2, refused.stderr
    assert "pool build cannot be served: no resource or type named 'nosuch'" in error_line(refused)
    assert not os.path.lexists(short_tmp / "m.sock")


# -- 7. the database deleted under a running daemon -------------------------------


def _remove_database(db: str) -> None:
    for suffix in ("", "-wal", "-shm"):
        os.unlink(db + suffix)


QUIET = CONFIG + '\n[monitor]\ninterval = "1h"\n[scheduler]\ntick_interval = "60s"\n'
"""No sampling round and no tick while a test runs: the request it sends is the first commit after its change."""

ALLOCATE_SLOT = {"resources": [{"resource": "slot", "amount": 1}], "holder_pid": os.getpid()}


def _quiet_daemon(tmp_path: Path, client_of: list[Client]) -> DaemonProcess:
    """A started daemon with nothing left to commit; `client_of` gets one open connection to it (closing a
    connection is a commit too, so the test keeps using this one)."""
    daemon = DaemonProcess(tmp_path, config=QUIET)
    daemon.start()
    client = daemon.client()
    client_of.append(client)
    client.call("allocate", ALLOCATE_SLOT)
    deadline = time.monotonic() + BOUND_S
    while client.call("metrics.current")["ts"] is None:  # the first sampling round has committed
        assert time.monotonic() < deadline, "no sampling round"
        time.sleep(0.02)
    return daemon


@pytest.mark.parametrize("removed, complaint", [
    (("", "-wal", "-shm"), "{db} no longer exists"),
    (("-wal",), "{db}-wal no longer exists"),
    ((".lock",), "{db}.lock no longer names the lock this daemon holds"),
    ((), "{db} now names another file"),
])
def test_a_deleted_database_or_lock_fails_the_write_in_flight_and_stops_the_daemon(
        tmp_path: Path, removed: tuple[str, ...], complaint: str) -> None:
    clients: list[Client] = []
    daemon = _quiet_daemon(tmp_path, clients)
    try:
        for suffix in removed:
            os.unlink(daemon.db + suffix)
        if not removed:  # replaced: an older copy renamed over it
            shutil.copyfile(daemon.db, daemon.db + ".copy")
            os.replace(daemon.db + ".copy", daemon.db)

        with pytest.raises(RpcError) as refused:
            clients[0].call("allocate", ALLOCATE_SLOT)

        assert refused.value.code == ErrorCode.STORAGE_ERROR
        assert complaint.format(db=daemon.db) in refused.value.message
        db = daemon.db
        assert f"`rm -f {db}-wal {db}-shm {db}.lock && cp BACKUP {db}`" in refused.value.message, \
            "the restore it advises leaves no old -wal to replay onto the copy"
        assert daemon.proc is not None and daemon.proc.wait(BOUND_S) == 1
        critical = [line for line in daemon.log().splitlines() if untimed(line).startswith("CRITICAL")]
        assert critical and complaint.format(db=daemon.db) in critical[0]
    finally:
        for client in clients:
            client.close()
        daemon.stop()


def test_an_idle_daemon_notices_its_deleted_database_within_a_sampling_round(tmp_path: Path) -> None:
    daemon = DaemonProcess(tmp_path, config=CONFIG + '\n[monitor]\ninterval = "0.5s"\n')
    daemon.start()
    try:
        ok(daemon, "allocate", "--res", "slot=1")
        _remove_database(daemon.db)

        assert daemon.proc is not None and daemon.proc.wait(BOUND_S) == 1
        assert any(untimed(line).startswith("CRITICAL") and f"{daemon.db} no longer exists" in line
                   for line in daemon.log().splitlines())
        # Started again on the same path: a fresh database, and the loss is reported, not silent.
        daemon.start()
        assert as_json(daemon, "status")["lost_commits"]["found_event"] == 0
    finally:
        daemon.stop()


# -- 8. a damaged WAL that drops acknowledged transactions --------------------------


def _allocate_many(daemon: DaemonProcess, holder: int, count: int, per_write: int) -> list[str]:
    ids = []
    for start in range(0, count, per_write):
        lines = b"".join(
            (f'{{"jsonrpc":"2.0","id":{n},"method":"allocate","params":{{"resources":[{{"resource":"slot",'
             f'"amount":0.01}}],"holder_pid":{holder},"tool_id":"wal-{n}"}}}}\n').encode()
            for n in range(start, min(count, start + per_write)))
        replies = daemon.raw(lines)
        assert all("result" in reply for reply in replies), replies
        ids += [reply["result"]["id"] for reply in replies]
    return ids


def _flip_a_byte_mid_wal(wal: Path) -> None:
    data = bytearray(wal.read_bytes())
    page_size = int.from_bytes(data[8:12], "big")
    frames = (len(data) - 32) // (24 + page_size)
    assert frames > 10, frames
    offset = 32 + (frames // 2) * (24 + page_size) + 24 + page_size // 2
    data[offset] ^= 0xFF
    wal.write_bytes(bytes(data))


@pytest.mark.parametrize("with_lock_file", [True, False])
def test_a_damaged_wal_that_lost_acknowledged_allocations_is_reported_loudly(
        daemon: DaemonProcess, sleeper: subprocess.Popen[bytes], short_tmp: Path, with_lock_file: bool) -> None:
    acknowledged = _allocate_many(daemon, sleeper.pid, 200, per_write=10)
    newest = as_json(daemon, "events", "--limit", "1")[0]["id"]
    daemon.kill()
    copy = DaemonProcess(short_tmp)
    Path(copy.db).parent.mkdir(mode=0o700)
    for suffix in ("", "-wal", ".lock") if with_lock_file else ("", "-wal"):
        shutil.copyfile(daemon.db + suffix, copy.db + suffix)
    _flip_a_byte_mid_wal(Path(copy.db + "-wal"))

    copy.start()
    try:
        kept = {a["id"] for a in as_json(copy, "allocations")}
        assert kept < set(acknowledged)  # the premise: SQLite dropped acknowledged allocations, silently
        lost = as_json(copy, "status")["lost_commits"]
        assert lost["found_event"] < newest and lost["wal_commits_dropped"] > 0
        # Without the lock file only the -wal tells what was lost; with it, also how far the events went.
        assert lost["expected_event"] == (newest if with_lock_file else lost["found_event"])
        assert "WARNING: the database lost committed transactions" in ok(copy, "status")
        [event] = [e for e in as_json(copy, "events", "--limit", "1000") if e["kind"] == "database.lost_commits"]
        assert event["detail"] == {key: lost[key] for key in ("expected_event", "found_event", "wal_commits_dropped")}
        assert any(untimed(line).startswith("CRITICAL") and "lost committed transactions" in line
                   for line in copy.log().splitlines())
    finally:
        copy.stop()


def test_a_restart_after_kill_9_reports_no_lost_transactions(
        daemon: DaemonProcess, sleeper: subprocess.Popen[bytes]) -> None:
    acknowledged = _allocate_many(daemon, sleeper.pid, 50, per_write=10)
    daemon.kill()
    daemon.start()

    assert {a["id"] for a in as_json(daemon, "allocations")} == set(acknowledged)
    assert as_json(daemon, "status")["lost_commits"] is None
    assert "CRITICAL" not in daemon.log()


@pytest.fixture
def tmpfs(short_tmp: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs to fill or remount read-only (needs root and mount(2))."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount_point = short_tmp / "state"
    mount_point.mkdir()
    _mount(mount_point, "size=1M,mode=0700")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False, timeout=BOUND_S)


def _stopped_daemon_left_a_database(db: Path, short_tmp: Path) -> None:
    proc = subprocess.Popen([MCPRESD, "--socket", str(short_tmp / "first.sock"), "--db", str(db)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + BOUND_S
        while not os.path.exists(short_tmp / "first.sock") or not db.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the first daemon did not start"
            time.sleep(0.02)
        with socket.socket(socket.AF_UNIX) as probe:
            probe.connect(str(short_tmp / "first.sock"))
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(BOUND_S) == 0


@pytest.mark.parametrize("database", ["new", "existing"])
def test_a_full_disk_at_start_names_the_path_and_the_fix(tmpfs: Path, short_tmp: Path, database: str) -> None:
    db = tmpfs / "mcpresd.db"
    if database == "existing":
        _stopped_daemon_left_a_database(db, short_tmp)
    _fill(tmpfs)

    refused = mcpresd("--socket", str(short_tmp / "m.sock"), "--db", str(db))

    assert refused.returncode == 4, refused.stderr
    line = error_line(refused)
    assert str(db) in line and "free some space there, or choose another --db" in line
    assert not os.path.lexists(short_tmp / "m.sock")


def test_a_read_only_file_system_at_start_names_the_path_and_the_fix(tmpfs: Path, short_tmp: Path) -> None:
    db = tmpfs / "mcpresd.db"
    _stopped_daemon_left_a_database(db, short_tmp)
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True, timeout=BOUND_S)

    refused = mcpresd("--socket", str(short_tmp / "m.sock"), "--db", str(db))

    assert refused.returncode == 4, refused.stderr
    line = error_line(refused)
    assert f"{db}.lock: Read-only file system; remount it read-write" in line
