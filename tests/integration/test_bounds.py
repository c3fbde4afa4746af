"""Hangs and exhaustion (issue 13, items 9, 10 and 12): numbers that overflow, clients that do not read,
file descriptors. A real daemon on a temporary socket; every reply is read with a timeout, so a hang fails."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any

import pytest

from mcpresd.params import SetBudgetCommand, BudgetKey
from mcpresd.protocol import MAX_QUANTITY, MIN_QUANTITY, BudgetScope, ErrorCode, Period
from mcpresd.service import Caller
from tests.live import LiveDaemon, live  # noqa: F401 - a fixture

HOUR = 3600.0


def big_config(capacity: float) -> str:
    return f"""
memory_reserve = "0"

[[resources]]
name = "vast-a"
capacity = {capacity!r}
unit = "units"
cost_per_unit_hour = {MAX_QUANTITY!r}

[[resources]]
name = "vast-b"
capacity = {capacity!r}
unit = "units"
"""


class Line:
    """One raw connection: send JSON lines, read reply lines, each read bounded by a timeout."""

    def __init__(self, path: str, timeout: float = 10.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.buffer = b""

    def send(self, message: Any) -> None:
        self.sock.sendall(json.dumps(message).encode() + b"\n")

    def read(self) -> Any:
        while b"\n" not in self.buffer:
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise EOFError("the daemon closed the connection")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return json.loads(line)

    def call(self, id: int, method: str, params: dict[str, Any] | None = None) -> Any:
        self.send({"jsonrpc": "2.0", "id": id, "method": method, **({"params": params} if params else {})})
        reply = self.read()
        assert reply["id"] == id
        return reply

    def close(self) -> None:
        self.sock.close()


# -- item 9: numbers are bounded where they enter, and every reply is sent --------------------------------------


@pytest.mark.parametrize(("method", "params", "field"), [
    ("resources.add", {"name": "huge", "capacity": 1e308}, "capacity"),
    ("resources.add", {"name": "huge", "capacity": MAX_QUANTITY * 2}, "capacity"),
    ("resources.add", {"name": "tiny", "capacity": 5e-324}, "capacity"),
    ("resources.add", {"name": "tiny", "capacity": MIN_QUANTITY / 2}, "capacity"),
    ("resources.add", {"name": "dear", "capacity": 1, "cost_per_unit_hour": 1e308}, "cost_per_unit_hour"),
    ("resources.set_cost", {"name": "slot", "cost_per_unit_hour": 1e308}, "cost_per_unit_hour"),
    ("allocate", {"resources": [{"resource": "slot", "amount": 1e308}]}, "resources[0].amount"),
    ("allocate", {"resources": [{"resource": "slot", "amount": 5e-324}]}, "resources[0].amount"),
    ("allocate", {"resources": [{"resource": "slot", "amount": 1, "max": 1e308}]}, "resources[0].max"),
    ("allocate", {"resources": [{"resource": "slot", "amount": 1}], "max_cost": 1e308}, "max_cost"),
    ("budgets.set", {"scope": "owner", "subject": "0", "period": "day", "limit": 5e-324}, "limit"),
    ("budgets.set", {"scope": "owner", "subject": "0", "period": "day", "limit": 1e308}, "limit"),
    ("release", {"id": "x", "measured": {"cpu_seconds": 1e308}}, "measured.cpu_seconds"),
    ("pools.create", {"name": "p", "factory": "slots", "parent": "slot", "slot_size": 5e-324, "max": 2},
     "slot_size"),
])
def test_numbers_past_the_bounds_are_invalid_params_naming_the_field(live: LiveDaemon, method: str,
                                                                     params: dict[str, Any], field: str) -> None:
    error = live.error(method, params)
    assert error.code == ErrorCode.INVALID_PARAMS
    assert error.data.get("field") == field


@pytest.mark.parametrize("capacity", [1e308, 5e-324, "1e-10"])
def test_a_config_capacity_past_the_bounds_is_refused(tmp_path: Path, capacity: Any) -> None:
    from mcpresd.config import ConfigError, load

    path = tmp_path / "mcpresd.toml"
    path.write_text(big_config(capacity).replace("'1e-10'", "1e-10"))
    with pytest.raises(ConfigError, match="capacity must be from"):
        load(path, socket=str(tmp_path / "s.sock"), database=str(tmp_path / "db"))


def test_capacities_and_costs_at_the_bounds_are_served_everywhere(tmp_path: Path) -> None:
    """The largest capacity and cost and the smallest budget limit: typed allocation, metrics, budgets, usage."""
    live = LiveDaemon(tmp_path, big_config(MAX_QUANTITY)).start()
    holder = Line(live.socket)
    try:
        granted = holder.call(1, "allocate", {"resources": [{"resource": "custom", "amount": MAX_QUANTITY}]})
        assert granted["result"]["state"] == "active"
        both = holder.call(2, "allocate", {"resources": [{"resource": "custom", "amount": MAX_QUANTITY}]})
        assert both["result"]["state"] == "active"
        live.call("budgets.set", {"scope": "owner", "subject": "0", "period": "day", "limit": MIN_QUANTITY})
        live.advance(HOUR)
        live.on_store(lambda broker: broker.record_samples({}, {}))  # one sampling round: rates of custom resources
        rates = live.call("metrics.current")["resources"]
        assert rates["vast-a"]["utilisation_rate"] == 100.0 and rates["vast-b"]["utilisation_rate"] == 100.0
        (budget,) = live.call("budgets.list")
        assert budget["state"] == "exceeded" and budget["fraction"] > 1
        assert live.call("usage", {"by": "resource"})["totals"]["cost"] > 0
    finally:
        holder.close()
        live.close()


def test_a_result_that_cannot_be_written_as_json_gets_an_internal_error_and_the_connection_goes_on(
        tmp_path: Path) -> None:
    """A budget limit of 5e-324 (written before the bounds) makes spent/limit infinite: -32603, not a hang."""
    live = LiveDaemon(tmp_path).start()
    line = Line(live.socket)
    try:
        root = Caller(uid=0, gid=0, pid=None, admin=True)
        key = BudgetKey(BudgetScope.OWNER, "0", Period.DAY)
        held = line.call(1, "allocate", {"resources": [{"resource": "licence", "amount": 1}], "holder_pid": os.getpid()})
        assert held["result"]["state"] == "active"
        live.on_store(lambda broker: broker.budgets_set(root, SetBudgetCommand(key, 5e-324, 0.8)))
        live.advance(HOUR)
        line.send([{"jsonrpc": "2.0", "id": 2, "method": "budgets.list"},
                   {"jsonrpc": "2.0", "id": 3, "method": "daemon.status"}])
        line.send({"jsonrpc": "2.0", "id": 4, "method": "budgets.list"})
        batch, alone = line.read(), line.read()
        assert [reply["id"] for reply in batch] == [2, 3]
        assert batch[0]["error"]["code"] == ErrorCode.INTERNAL_ERROR and "result" in batch[1]
        assert alone["id"] == 4 and alone["error"]["code"] == ErrorCode.INTERNAL_ERROR
        assert line.call(5, "daemon.status")["result"]["version"]
    finally:
        line.close()
        live.close()
