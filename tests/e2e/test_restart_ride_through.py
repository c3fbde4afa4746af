"""A shell script's `mcpctl allocate` / `mcpctl release` loop rides through daemon crashes and restarts.

A script that must ride through restarts says so with $MCPRES_RETRY_FOR (or --retry-for): every mcpctl call then
retries a missing or refused socket and a broken connection for that long (a call whose connection breaks under it
retries for 10 s by default; a daemon missing at a command's first contact is waited for only when asked, since
most likely none is running). An allocate always carries
an idempotency key, so a resend after a lost reply returns the first allocation instead of a second one, and a
release that finds its allocation already released after a resend counts as done.
"""

from __future__ import annotations

import json
import os
import queue
import select
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.conftest import DaemonProcess

pytestmark = pytest.mark.e2e

ROUNDS = 30
KILL_AFTER_ROUNDS = (4, 12, 20)
SCRIPT = """
set -euo pipefail
for i in $(seq 1 {rounds}); do
    id=$(mcpctl allocate --res slot=1)
    mcpctl release "$id"
    echo "$i" >> "{progress}"
done
"""


def rounds_done(progress: Path) -> int:
    try:
        return len(progress.read_text().split())
    except FileNotFoundError:
        return 0


def test_a_script_loop_survives_three_daemon_kills(daemon: DaemonProcess, tmp_path: Path) -> None:
    progress = tmp_path / "progress"
    env = dict(os.environ, MCPRES_SOCKET=daemon.socket, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}",
               MCPRES_RETRY_FOR="10s")
    script = subprocess.Popen(["bash", "-c", SCRIPT.format(rounds=ROUNDS, progress=progress)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    kills = 0
    try:
        for after in KILL_AFTER_ROUNDS:
            deadline = time.monotonic() + 60
            while rounds_done(progress) < after and script.poll() is None and time.monotonic() < deadline:
                time.sleep(0.01)
            assert script.poll() is None, f"the script ended early: {script.communicate()}"
            daemon.kill()
            kills += 1
            # The script meets a dead daemon: a listener nobody serves takes the place of the killed one's
            # socket until an mcpctl of the script knocks (its connection waits in the backlog); then it closes
            # unanswered, and the socket file stays behind as after a kill -9: refused connections until the
            # daemon is back.
            os.unlink(daemon.socket)
            with socket.socket(socket.AF_UNIX) as dead:
                dead.bind(daemon.socket)
                dead.listen(16)
                assert select.select([dead], [], [], 60)[0], "no mcpctl of the script met the dead daemon"
            daemon.start()
        out, err = script.communicate(timeout=120)
    finally:
        if script.poll() is None:
            script.kill()
            script.wait()

    assert kills == 3
    assert script.returncode == 0, err
    assert rounds_done(progress) == ROUNDS
    rows = daemon.snapshot()["allocations"]
    columns = [c[1] for c in _columns(daemon)]
    state, key = columns.index("state"), columns.index("idempotency_key")
    assert [r for r in rows if r[state] in ("active", "queued")] == []
    keys = Counter(r[key] for r in rows)
    assert None not in keys, "every mcpctl allocate sends an idempotency key"
    assert [k for k, n in keys.items() if n > 1] == []
    assert len(rows) == ROUNDS
    assert daemon.call("allocations.list", {"state": "active"}) == []


def _columns(daemon: DaemonProcess) -> list[tuple[object, ...]]:
    import sqlite3

    conn = sqlite3.connect(f"file:{daemon.db}?mode=ro", uri=True)
    try:
        return conn.execute("PRAGMA table_info(allocations)").fetchall()
    finally:
        conn.close()



def _lines_until(lines: "queue.Queue[str]", wanted: str, timeout: float = 30.0) -> list[str]:
    """The follower's lines up to the first that holds `wanted` ("" once it exits); fails after `timeout` s."""
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while not any(wanted in line for line in seen):
        line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        assert line, f"the follower exited before {wanted!r}, after {seen}"
        seen.append(line)
    return seen


def test_events_follow_rides_through_a_daemon_restart_without_losing_or_repeating_an_event(
        daemon: DaemonProcess) -> None:
    follower = subprocess.Popen([str(Path(sys.executable).parent / "mcpctl"), "events", "--follow", "--json",
                                 "--limit", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=dict(os.environ, MCPRES_SOCKET=daemon.socket))
    lines: queue.Queue[str] = queue.Queue()
    assert follower.stdout is not None
    threading.Thread(target=lambda: [*map(lines.put, follower.stdout), lines.put("")], daemon=True).start()
    try:
        before = daemon.call("resources.add", {"name": "licence:before", "capacity": 1})["name"]
        shown = _lines_until(lines, before)
        daemon.restart()
        daemon.call("resources.add", {"name": "licence:during", "capacity": 1})  # likely before it is back
        after = daemon.call("resources.add", {"name": "licence:after", "capacity": 1})["name"]
        shown += _lines_until(lines, after)
    finally:
        follower.terminate()
        follower.wait(10)
    ids = [json.loads(line)["id"] for line in shown]
    assert ids == sorted(set(ids))
    assert [line for line in shown if "licence:during" in line]
    assert follower.returncode == 0
