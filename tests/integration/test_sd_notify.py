"""mcpresd speaks systemd's notify protocol: READY, STATUS, WATCHDOG, RELOADING and STOPPING, as datagrams."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from mcpresd.notify import Notifier
from tests.conftest import ROOT, DaemonProcess

Message = dict[str, str]


class NotifySocket:
    """What systemd listens on: a datagram socket; every datagram is one message of KEY=value lines."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.received: list[Message] = []

    def wait_for(self, done: Callable[[list[Message]], bool], timeout: float = 15.0) -> list[Message]:
        deadline = time.monotonic() + timeout
        while not done(self.received):
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"not received in {timeout}s; got {self.received}")
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            self.received.append(dict(line.split("=", 1) for line in data.decode().splitlines()))
        return self.received

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifySocket]:
    receiver = NotifySocket(tmp_path / "notify.sock")
    try:
        yield receiver
    finally:
        receiver.close()


def count(messages: list[Message], key: str) -> int:
    return sum(1 for m in messages if key in m)


def test_the_daemon_is_ready_once_it_listens_then_pings_the_watchdog_with_its_status(
        tmp_path: Path, notify: NotifySocket) -> None:
    daemon = DaemonProcess(tmp_path, env={"NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "200000"})
    with open(daemon.log_path, "ab") as log:
        daemon.proc = subprocess.Popen(daemon.args, stdout=log, stderr=log, cwd=ROOT,
                                       env={**os.environ, **(daemon.env or {})})
    try:
        (first,) = notify.wait_for(lambda got: len(got) >= 1)
        assert first.get("READY") == "1", first
        with socket.socket(socket.AF_UNIX) as probe:
            probe.connect(daemon.socket)  # READY=1 comes after the socket listens, never before
        assert first["STATUS"].startswith("serving ") and " resources, 0 allocations" in first["STATUS"]

        daemon.call("allocate", {"resources": [{"resource": "licence", "amount": 1}], "holder_pid": os.getpid()})
        messages = notify.wait_for(lambda got: count(got, "WATCHDOG") >= 2
                                   and any("1 allocations" in m.get("STATUS", "") for m in got))

        pings = [m for m in messages if "WATCHDOG" in m]
        assert all(m["WATCHDOG"] == "1" and m["STATUS"].startswith("serving ") for m in pings)

        assert daemon.stop(signal.SIGTERM) == 0
        messages = notify.wait_for(lambda got: count(got, "STOPPING") == 1)
        assert messages[-1]["STOPPING"] == "1"
    finally:
        daemon.stop()


def test_a_reload_is_announced_with_its_monotonic_time_then_ready_again(tmp_path: Path, notify: NotifySocket) -> None:
    daemon = DaemonProcess(tmp_path, env={"NOTIFY_SOCKET": notify.path})
    daemon.start()
    try:
        notify.wait_for(lambda got: count(got, "READY") == 1)
        assert daemon.proc is not None
        before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000

        daemon.proc.send_signal(signal.SIGHUP)
        messages = notify.wait_for(lambda got: count(got, "READY") == 2)

        reloading = next(m for m in messages if "RELOADING" in m)
        assert reloading["RELOADING"] == "1"
        assert before <= int(reloading["MONOTONIC_USEC"]) <= time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        assert messages.index(reloading) < len(messages) - 1 and "READY" in messages[-1]
        assert count(messages, "WATCHDOG") == 0  # no WATCHDOG_USEC: no pings
    finally:
        daemon.stop()


def test_an_abstract_notify_socket_is_reached_by_its_at_name() -> None:
    name = f"mcpres-test-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
        receiver.bind("\0" + name)
        receiver.settimeout(5)
        notifier = Notifier({"NOTIFY_SOCKET": "@" + name})

        assert notifier.ready("serving 3 resources\nand a second line")

        assert receiver.recv(4096) == b"READY=1\nSTATUS=serving 3 resources and a second line"
        notifier.close()


@pytest.mark.parametrize(("environ", "interval"), [
    ({}, None),
    ({"WATCHDOG_USEC": "30000000"}, 15.0),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1234"}, 15.0),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "999"}, None),
    ({"WATCHDOG_USEC": "0"}, None),
    ({"WATCHDOG_USEC": "soon"}, None),
])
def test_the_watchdog_is_on_only_when_systemd_watches_this_process(environ: dict[str, str],
                                                                    interval: float | None) -> None:
    assert Notifier({"NOTIFY_SOCKET": "/run/systemd/notify", **environ}, pid=1234).watchdog_interval == interval


def test_without_notify_socket_nothing_is_sent() -> None:
    notifier = Notifier({"WATCHDOG_USEC": "200000"})

    assert not notifier.enabled
    assert not notifier.ready("serving") and not notifier.alive("serving") and not notifier.stopping()


def test_a_vanished_notify_socket_never_stops_the_daemon(tmp_path: Path) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})

    assert notifier.enabled
    assert not notifier.ready() and not notifier.stopping()


def test_a_start_that_is_slow_but_progressing_asks_for_more_time(notify: NotifySocket) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": notify.path})

    assert notifier.extend_start(30, "migrating the database (10 s so far)")

    [message] = notify.wait_for(lambda got: len(got) >= 1)
    assert message == {"EXTEND_TIMEOUT_USEC": "30000000", "STATUS": "migrating the database (10 s so far)"}


def test_a_migration_run_in_a_child_is_reported_while_it_runs(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    # The daemon migrates in a child process and hears every MIGRATION_HEARTBEAT_S how long it has run (and
    # extends systemd's start timeout with it); the child's start alone outlasts this test's interval.
    import mcpresd.store
    from mcpresd.store import MIGRATIONS, Store

    beats: list[float] = []
    monkeypatch.setattr(mcpresd.store, "MIGRATION_HEARTBEAT_S", 0.01)
    monkeypatch.setattr(Store, "migrate_in_child", True)
    monkeypatch.setattr(Store, "migration_heartbeat", lambda elapsed, progressing: beats.append(elapsed))

    store = Store(tmp_path / "db.sqlite")
    try:
        assert store._applied_migrations() == {m.__name__ for m in MIGRATIONS}
    finally:
        store.close()
    assert beats and beats == sorted(beats) and beats[0] > 0


def test_a_migration_that_stops_progressing_is_reported_as_stalled(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    # A child that uses no CPU for a heartbeat (here: stopped; in life, a hung disk) is reported as not
    # progressing, so the daemon stops extending systemd's start timeout; once it runs again, it progresses.
    import psutil

    import mcpresd.store
    from mcpresd.store import MIGRATIONS, Store

    beats: list[bool] = []

    others = {process.pid for process in psutil.Process().children()}

    def migrating_child() -> psutil.Process:
        # The one child Store() started: this process's others (a session's daemons, servers) were there
        # before; not by its command line, which is still pytest's until the child has exec'd.
        [child] = [process for process in psutil.Process().children() if process.pid not in others]
        return child

    def heartbeat(elapsed: float, progressing: bool) -> None:
        child = migrating_child()
        beats.append(progressing)
        if len(beats) == 1:
            child.suspend()
        elif not progressing or len(beats) > 20:  # bounded: a child reported progressing while stopped fails below
            child.resume()

    monkeypatch.setattr(mcpresd.store, "MIGRATION_HEARTBEAT_S", 0.01)
    monkeypatch.setattr(Store, "migrate_in_child", True)
    monkeypatch.setattr(Store, "migration_heartbeat", heartbeat)

    store = Store(tmp_path / "db.sqlite")
    try:
        assert store._applied_migrations() == {m.__name__ for m in MIGRATIONS}
    finally:
        store.close()
    assert False in beats[1:3], beats  # the beat after it stopped (or the next, if a tick was still counting)
