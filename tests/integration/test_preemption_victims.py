"""Preemption that needs several victims (docs/scheduling.md: "the fewest victims that make room, lowest
priority first and, among equals, the newest"), checked through a real daemon.

Every wait polls for the state it expects, with a generous deadline; nothing is timed.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import CONFIG, DaemonProcess

DEADLINE_S = 30.0

PREEMPTING = CONFIG + """
[[resources]]
name = "pair"
capacity = 2

[[resources]]
name = "three"
capacity = 3

[scheduler]
tick_interval = "50ms"
preemption = true
preempt_grace = "0.5s"
"""


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[DaemonProcess]:
    process = DaemonProcess(tmp_path, config=PREEMPTING)
    process.start()
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture
def holder() -> Iterator[int]:
    """The pid of a process that holds the high request while it waits."""
    child = subprocess.Popen(["sleep", "600"])
    try:
        yield child.pid
    finally:
        child.kill()
        child.wait(10)


def hold(daemon: DaemonProcess, resource: str, amount: float, **fields: Any) -> str:
    granted = daemon.call("allocate", {"resources": [{"resource": resource, "amount": amount}],
                                       "holder_pid": os.getpid(), **fields})
    assert granted["state"] == "active", granted
    return str(granted["id"])


def ask(daemon: DaemonProcess, resource: str, amount: float, holder: int) -> str:
    queued = daemon.call("allocate", {"resources": [{"resource": resource, "amount": amount}], "holder_pid": holder,
                                      "priority": "high", "wait": 60, "detach": True})
    assert queued["state"] == "queued", queued
    return str(queued["id"])


def get(daemon: DaemonProcess, allocation_id: str) -> dict[str, Any]:
    allocation: dict[str, Any] = daemon.call("allocations.get", {"id": allocation_id})
    return allocation


def eventually(check: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {DEADLINE_S}s: {what}")
        time.sleep(0.02)


def preempted_for(daemon: DaemonProcess, request: str) -> set[str]:
    """The allocations chosen as victims for `request` (their `preempted` events)."""
    events = daemon.call("events.list", {"limit": 10_000})
    return {e["allocation_id"] for e in events if e["kind"] == "preempted" and e["detail"]["for"] == request}


def test_a_request_that_needs_two_victims_preempts_both_and_is_granted_after_the_grace(
        daemon: DaemonProcess, holder: int) -> None:
    first = hold(daemon, "pair", 1, priority="low", preemptible=True)
    second = hold(daemon, "pair", 1, priority="low", preemptible=True)

    high = ask(daemon, "pair", 2, holder)

    assert preempted_for(daemon, high) == {first, second}
    eventually(lambda: get(daemon, high)["state"] == "active", "the high request granted")
    for victim in (first, second):
        revoked = get(daemon, victim)
        assert (revoked["state"], revoked["release_reason"]) == ("released", "revoked"), revoked


def test_when_the_preemptible_ones_cannot_make_room_no_one_is_preempted(daemon: DaemonProcess, holder: int) -> None:
    preemptible = hold(daemon, "pair", 1, priority="low", preemptible=True)
    protected = hold(daemon, "pair", 1, priority="low")

    high = ask(daemon, "pair", 2, holder)
    daemon.call("daemon.status")  # a round trip after the request: its scheduling pass has run

    assert preempted_for(daemon, high) == set()
    assert get(daemon, preemptible)["preempt_at"] is None
    assert (get(daemon, preemptible)["state"], get(daemon, protected)["state"]) == ("active", "active")
    assert get(daemon, high)["state"] == "queued"


def test_the_fewest_victims_are_chosen(daemon: DaemonProcess, holder: int) -> None:
    small_a = hold(daemon, "three", 1, priority="low", preemptible=True)
    big = hold(daemon, "three", 2, priority="low", preemptible=True)

    high = ask(daemon, "three", 2, holder)

    assert preempted_for(daemon, high) == {big}  # one victim makes room; two would not be fewer
    eventually(lambda: get(daemon, high)["state"] == "active", "the high request granted")
    assert get(daemon, small_a)["state"] == "active"


def test_the_lowest_priority_victims_are_chosen_first(daemon: DaemonProcess, holder: int) -> None:
    normal = hold(daemon, "three", 1, priority="normal", preemptible=True)
    low_a = hold(daemon, "three", 1, priority="low", preemptible=True)
    low_b = hold(daemon, "three", 1, priority="low", preemptible=True)

    high = ask(daemon, "three", 2, holder)

    assert preempted_for(daemon, high) == {low_a, low_b}
    assert get(daemon, normal)["preempt_at"] is None
    eventually(lambda: get(daemon, high)["state"] == "active", "the high request granted")
    assert get(daemon, normal)["state"] == "active"


def test_among_equal_priorities_the_newest_is_chosen(daemon: DaemonProcess, holder: int) -> None:
    oldest = hold(daemon, "three", 1, priority="low", preemptible=True)
    middle = hold(daemon, "three", 1, priority="low", preemptible=True)
    newest = hold(daemon, "three", 1, priority="low", preemptible=True)

    high = ask(daemon, "three", 1, holder)

    assert preempted_for(daemon, high) == {newest}
    eventually(lambda: get(daemon, high)["state"] == "active", "the high request granted")
    assert (get(daemon, oldest)["state"], get(daemon, middle)["state"]) == ("active", "active")
