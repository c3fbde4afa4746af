"""SIGHUP re-reads the config file: resources and settings change, allocations stay; a bad file changes nothing."""

from __future__ import annotations

import os
import signal
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import CONFIG, DaemonProcess

GROWN = """
memory_reserve = "0"
log_level = "debug"

[[resources]]
name = "licence"
capacity = 4
unit = "seats"
cost_per_unit_hour = 1.5

[[resources]]
name = "slot"
capacity = 10
unit = "slots"

[[resources]]
name = "tool:render"
capacity = 3
unit = "slots"

[scheduler]
default_strategy = "best-fit"
"""


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[DaemonProcess]:
    process = DaemonProcess(tmp_path, config=CONFIG)
    process.start()
    try:
        yield process
    finally:
        process.stop()


def hangup(daemon: DaemonProcess, config: str, logged: str, timeout: float = 15.0) -> None:
    """Write `config`, send SIGHUP, and wait until the daemon's log says `logged` (after this reload)."""
    assert daemon.proc is not None
    daemon.config_path.write_text(config)
    already = daemon.log().count(logged)
    daemon.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: daemon.log().count(logged) > already, timeout, lambda: daemon.log())


def wait_until(done: Callable[[], bool], timeout: float, why: Callable[[], str]) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise AssertionError(why())
        time.sleep(0.02)


def resources(daemon: DaemonProcess) -> dict[str, dict[str, Any]]:
    """Each resource as configured and allocated; its health moves with the host's load, so it is left out."""
    return {r["name"]: {k: v for k, v in r.items() if k != "health"} for r in daemon.call("resources.list")}


def test_a_reload_changes_and_adds_resources_and_keeps_the_allocations(daemon: DaemonProcess) -> None:
    held = daemon.call("allocate", {"resources": [{"resource": "licence", "amount": 1}], "holder_pid": os.getpid()})
    discovered = {name: r for name, r in resources(daemon).items() if r["source"] == "discovered"}

    hangup(daemon, GROWN, "reloaded the configuration")

    after = resources(daemon)
    assert after["licence"]["capacity"] == 4 and after["licence"]["allocated"] == 1
    assert after["tool:render"]["capacity"] == 3 and after["tool:render"]["source"] == "config"
    assert {name: r for name, r in after.items() if r["source"] == "discovered"} == discovered
    assert daemon.call("allocations.get", {"id": held["id"]})["state"] == "active"
    log = daemon.log()
    for change in ("reload: changed licence", "reload: added tool:render", "reload: log_level: info -> debug",
                   "reload: scheduler default_strategy: first-fit -> best-fit"):
        assert change in log
    # The new capacity is real: three more seats fit now, where only one did before.
    daemon.call("allocate", {"resources": [{"resource": "licence", "amount": 3}], "holder_pid": os.getpid()})


def test_a_reload_removes_a_resource_no_longer_declared_but_keeps_one_still_held(daemon: DaemonProcess) -> None:
    daemon.call("allocate", {"resources": [{"resource": "licence", "amount": 1}], "holder_pid": os.getpid()})
    without_either = CONFIG.split("[[resources]]")[0]

    hangup(daemon, without_either, "reloaded the configuration")

    after = resources(daemon)
    assert "slot" not in after
    assert after["licence"]["allocated"] == 1
    assert "reload: removed slot" in daemon.log()
    assert "reload: kept licence: gone from the config set but still allocated" in daemon.log()


@pytest.mark.parametrize("broken", [
    'memory_reserve = "0"\n[[resources]\nname = "licence"',           # not TOML
    CONFIG + '\n[[resources]]\nname = "licence"\ncapacity = 5\n',      # declared twice
    'no_such_key = 1\n' + CONFIG,                                      # unknown key
])
def test_a_config_that_does_not_load_on_reload_changes_nothing(daemon: DaemonProcess, broken: str) -> None:
    held = daemon.call("allocate", {"resources": [{"resource": "licence", "amount": 1}], "holder_pid": os.getpid()})
    before = resources(daemon)

    hangup(daemon, broken, "keeping the current configuration")

    assert daemon.proc is not None and daemon.proc.poll() is None
    assert resources(daemon) == before
    assert daemon.call("allocations.get", {"id": held["id"]})["state"] == "active"
    # The daemon still reloads once the file is fixed.
    hangup(daemon, GROWN, "reloaded the configuration")
    assert resources(daemon)["licence"]["capacity"] == 4


def test_settings_that_need_a_restart_are_reported_and_left_as_they_are(daemon: DaemonProcess) -> None:
    hangup(daemon, 'socket_mode = "0660"\n' + CONFIG, "reloaded the configuration")

    assert "reload: socket_mode changed; it takes effect when the daemon restarts" in daemon.log()
    assert stat.S_IMODE(os.stat(daemon.socket).st_mode) == 0o600
