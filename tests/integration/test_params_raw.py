"""The daemon's own parameter checks, for a client other than mcpctl: raw JSON-RPC lines on the socket.

mcpctl checks most of these before it sends anything, so without these tests the daemon's checks would only
ever be run through mcpctl's. Each bad request gets -32602 naming its field, and changes nothing.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mcpresd.protocol import ErrorCode
from tests.conftest import DaemonProcess

LICENCE = [{"resource": "licence", "amount": 1}]
RELEASED = "the slot allocation"  # replaced by the id of a live allocation of the test


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    process = DaemonProcess(tmp_path_factory.mktemp("params"))
    process.start()
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture(scope="module")
def held(daemon: DaemonProcess) -> str:
    """An active allocation that the release cases try to release with bad `measured` values."""
    return str(daemon.call("allocate", {"resources": [{"resource": "slot", "amount": 1}],
                                        "holder_pid": os.getpid()})["id"])


def state(daemon: DaemonProcess) -> Any:
    """What a refused request must leave as it was: every allocation, with its measurements, and the budgets."""
    allocations = daemon.call("allocations.list", {"limit": 1000})
    return ([(a["id"], a["state"], a["measured"]) for a in allocations], daemon.call("budgets.list"))


@pytest.mark.parametrize(("method", "params", "field"), [
    ("allocate", {"resources": [{"resource": "licence", "amount": 2, "max": 1}]}, "resources[0].max"),
    ("allocate", {"resources": [{"resource": "slot", "amount": 1, "max": "all"}]}, "resources[0].max"),
    ("allocate", {"resources": LICENCE, "strategy": "fastest"}, "strategy"),
    ("allocate", {"resources": LICENCE, "strategy": 7}, "strategy"),
    ("allocate", {"resources": LICENCE, "where": ["memory>>1"]}, "where[0]"),
    ("allocate", {"resources": LICENCE, "where": "memory>=1"}, "where"),
    ("allocate", {"resources": LICENCE, "where": ["index=0"] * 65}, "where"),
    ("allocate", {"resources": LICENCE, "ttl": 0}, "ttl"),
    ("allocate", {"resources": LICENCE, "ttl": -1}, "ttl"),
    ("allocate", {"resources": LICENCE, "ttl": "1h"}, "ttl"),
    ("allocate", {"resources": LICENCE, "ttl": 365 * 86400 + 1}, "ttl"),
    ("allocate", {"resources": LICENCE, "objective": "cheapest"}, "objective"),
    ("allocate", {"resources": LICENCE, "objective": 1}, "objective"),
    ("release", {"id": RELEASED, "measured": {"cpu_seconds": -1}}, "measured.cpu_seconds"),
    ("release", {"id": RELEASED, "measured": {"gpu_utilisation": 1.5}}, "measured.gpu_utilisation"),
    ("release", {"id": RELEASED, "measured": {"memory_peak": "2G"}}, "measured.memory_peak"),
    ("release", {"id": RELEASED, "measured": {"watts": 3}}, "measured.watts"),
    ("release", {"id": RELEASED, "measured": [1]}, "measured"),
    ("budgets.set", {"scope": "tool", "subject": "t", "period": "day", "limit": 0}, "limit"),
    ("budgets.set", {"scope": "tool", "subject": "t", "period": "day"}, "limit"),
    ("budgets.set", {"scope": "team", "subject": "t", "period": "day", "limit": 1}, "scope"),
    ("budgets.set", {"scope": "tool", "subject": "t", "period": "year", "limit": 1}, "period"),
    ("budgets.set", {"scope": "tool", "subject": "t", "period": "day", "limit": 1, "soft": 0}, "soft"),
    ("budgets.set", {"scope": "tool", "subject": "t", "period": "day", "limit": 1, "soft": 1.5}, "soft"),
    ("budgets.set", {"scope": "owner", "subject": "alice", "period": "day", "limit": 1}, "subject"),
    ("budgets.set", {"scope": "tool", "subject": "t", "period": "day", "limit": 1, "owner": 0}, "owner"),
    ("budgets.delete", {"scope": "tool", "subject": "t"}, "period"),
    ("usage", {"by": "colour"}, "by"),
    ("usage", {"since": -1}, "since"),
    ("usage", {"since": 10 * 366 * 86400}, "since"),
    ("usage", {"since": "7d"}, "since"),
    ("usage", {"until": 5}, "until"),
])
def test_the_daemon_refuses_bad_params_naming_the_field_and_changes_nothing(
        daemon: DaemonProcess, held: str, method: str, params: dict[str, Any], field: str) -> None:
    params = {key: held if value == RELEASED else value for key, value in params.items()}
    before = state(daemon)
    line = json.dumps({"jsonrpc": "2.0", "id": 7, "method": method, "params": params}).encode() + b"\n"

    [reply] = daemon.raw(line)

    assert reply["id"] == 7 and "result" not in reply, reply
    assert reply["error"]["code"] == ErrorCode.INVALID_PARAMS, reply
    assert reply["error"]["data"] == {"type": "InvalidParams", "field": field}, reply
    assert state(daemon) == before


@pytest.mark.parametrize(("method", "params"), [
    ("allocate", {"resources": [{"resource": "licence", "amount": 1, "max": 2}], "strategy": "best-fit",
                  "where": ["index>=0"], "ttl": 365 * 86400, "objective": "cost"}),
    ("budgets.set", {"scope": "owner", "subject": "0", "period": "month", "limit": 1e-6, "soft": 1}),
    ("usage", {"by": "resource", "since": 0}),
])
def test_the_same_params_at_their_bounds_are_accepted(daemon: DaemonProcess, method: str,
                                                      params: dict[str, Any]) -> None:
    """The control for the refusals above: the checks stop exactly at the documented bounds."""
    line = json.dumps({"jsonrpc": "2.0", "id": 8, "method": method, "params": params}).encode() + b"\n"

    [reply] = daemon.raw(line)

    assert "result" in reply, reply
    if method == "allocate":  # held by its connection, already closed: released again
        assert reply["result"]["state"] == "active"
    if method == "budgets.set":
        daemon.call("budgets.delete", {"scope": "owner", "subject": "0", "period": "month"})


def test_a_release_with_valid_measurements_keeps_them(tmp_path: Path) -> None:
    daemon = DaemonProcess(tmp_path)
    daemon.start()
    try:
        granted = daemon.call("allocate", {"resources": LICENCE, "holder_pid": os.getpid()})
        measured = {"cpu_seconds": 0, "memory_peak": 2**30, "gpu_utilisation": 1, "gpu_memory_peak": 0}
        [reply] = daemon.raw(json.dumps({"jsonrpc": "2.0", "id": 9, "method": "release",
                                         "params": {"id": granted["id"], "measured": measured}}).encode() + b"\n")
        assert reply["result"]["state"] == "released", reply
        assert daemon.call("allocations.get", {"id": granted["id"]})["measured"] == measured
    finally:
        daemon.stop()
