"""`mcpctl events --follow` whose output nobody reads for a while: the daemon unsubscribes it (its unread
events passed [limits] subscriber_buffer), and it catches up on its own without skipping an event."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from mcpctl.client import Client
from tests.conftest import CONFIG, DaemonProcess

MCPCTL = str(Path(sys.executable).parent / "mcpctl")


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[DaemonProcess]:
    process = DaemonProcess(tmp_path, config=CONFIG + '\n[limits]\nsubscriber_buffer = "64K"\n')
    process.start()
    try:
        yield process
    finally:
        process.stop()


def make_events(daemon: DaemonProcess, count: int, tag: str) -> None:
    """`count` events: resources added, then removed, 250 to a batch."""
    with Client(daemon.socket, timeout=30) as client:
        for first in range(0, count // 2, 250):
            names = [f"{tag}{n}" for n in range(first, min(first + 250, count // 2))]
            client.batch([("resources.add", {"name": name, "capacity": 1}) for name in names])
            client.batch([("resources.remove", {"name": name}) for name in names])


def last_event_id(daemon: DaemonProcess) -> int:
    (newest,) = daemon.call("events.list", {"limit": 1})
    return int(newest["id"])


def test_a_follower_whose_output_is_not_read_is_unsubscribed_then_catches_up_without_a_gap(
        daemon: DaemonProcess) -> None:
    follower = subprocess.Popen([MCPCTL, "events", "--follow", "--json", "--limit", "1"], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=dict(os.environ, MCPRES_SOCKET=daemon.socket))
    assert follower.stdout is not None
    try:
        make_events(daemon, 2, "first-")
        first = json.loads(follower.stdout.readline())  # subscribed: from here on, every event reaches it
        for round in range(40):  # nobody reads its stdout: the pipe fills, then its socket, then the daemon's buffer
            make_events(daemon, 1000, f"r{round}-")
            if "unsubscribed it" in daemon.log():
                break
        else:
            raise AssertionError(f"the follower was never unsubscribed:\n{daemon.log()}")
        make_events(daemon, 10, "after-")
        last = last_event_id(daemon)
        shown = [first["id"]]
        while shown[-1] < last:
            line = follower.stdout.readline()
            assert line, f"mcpctl stopped: {follower.stderr.read() if follower.poll() is not None else ''}"
            shown.append(json.loads(line)["id"])
        assert shown == list(range(first["id"], last + 1))  # every event once, in order, across the lag
    finally:
        follower.send_signal(signal.SIGTERM)
        follower.communicate(timeout=60)  # read what it still writes: a full pipe must not keep it from exiting
        assert follower.returncode == 0
