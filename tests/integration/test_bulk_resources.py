"""`resources.add` with a `resources` list: many custom resources in one request, all of them or none
(issue 15, target 5: 100,000 registered in seconds; bench/bench_register.py measures it)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from mcpctl.client import RpcError
from mcpresd.protocol import MAX_ADD, ErrorCode, Method
from tests.conftest import DaemonProcess
from tests.integration.test_access import as_nobody, shared_daemon, shared_dir  # noqa: F401 - a fixture


def names(daemon: DaemonProcess) -> set[str]:
    return {r["name"] for r in daemon.call(Method.RESOURCES_LIST)}


def refused(daemon: DaemonProcess, params: dict[str, Any]) -> RpcError:
    before = daemon.snapshot()
    with pytest.raises(RpcError) as raised:
        daemon.call(Method.RESOURCES_ADD, params)
    assert daemon.snapshot() == before  # nothing written: no resource, no event
    return raised.value


def test_a_list_registers_every_resource_each_with_its_event(daemon: DaemonProcess) -> None:
    entries = [{"name": f"seat-{i}", "capacity": i + 1} for i in range(2000)]
    entries[7] = {"name": "licence:cad", "capacity": 3, "unit": "seats", "cost_per_unit_hour": 2.0,
                  "labels": {"vendor": "acme", "index": 1}}

    assert daemon.call(Method.RESOURCES_ADD, {"resources": entries}) == {"added": 2000}

    listed = {r["name"]: r for r in daemon.call(Method.RESOURCES_LIST)}
    assert {e["name"] for e in entries} <= listed.keys()
    cad = listed["licence:cad"]
    assert (cad["type"], cad["capacity"], cad["unit"], cad["cost_per_unit_hour"], cad["labels"], cad["source"]) == (
        "custom", 3, "seats", 2.0, {"vendor": "acme", "index": 1}, "api")
    assert listed["seat-1999"]["capacity"] == 2000 and listed["seat-1999"]["free"] == 2000
    events = daemon.call(Method.EVENTS_LIST, {"limit": 10_000})
    added = [e for e in events if e["kind"] == "resource.added" and e["resource"] in listed]
    assert [e["resource"] for e in added[-2000:]] == [e["name"] for e in entries]
    assert added[-1]["detail"] == {"capacity": 2000, "unit": "units"} and added[-1]["uid"] == os.getuid()
    ids = [e["id"] for e in added[-2000:]]
    assert ids == list(range(ids[0], ids[0] + 2000))


def test_resources_added_in_a_list_are_allocated_in_their_order_and_survive_a_restart(daemon: DaemonProcess) -> None:
    daemon.call(Method.RESOURCES_ADD, {"resources": [{"name": f"gpu-{i}", "capacity": 1, "labels": {"index": 9 - i}}
                                                     for i in range(10)]})
    daemon.call(Method.RESOURCES_ADD, {"resources": [{"name": "tokens", "capacity": 100}]})
    daemon.kill()
    daemon.start()

    held = daemon.call(Method.ALLOCATE, {"resources": [{"resource": "gpu-3", "amount": 1}, {"resource": "tokens",
                                                                                             "amount": 40}],
                                         "holder_pid": os.getpid()})
    assert held["state"] == "active"
    free = {r["name"]: r["free"] for r in daemon.call(Method.RESOURCES_LIST)}
    assert free["gpu-3"] == 0 and free["tokens"] == 60 and free["gpu-9"] == 1


@pytest.mark.parametrize(("entries", "field"), [
    ([{"name": "ok-1", "capacity": 1}, {"name": "bad name", "capacity": 1}], "resources[1].name"),
    ([{"name": "ok-1", "capacity": 1}, {"name": "ok-2", "capacity": -1}], "resources[1].capacity"),
    ([{"name": "ok-1", "capacity": 1}, {"name": "ok-2", "capacity": "4"}], "resources[1].capacity"),
    ([{"name": "ok-1", "capacity": 1}, {"name": "gpu:0", "capacity": 1}], "resources[1].name"),
    ([{"name": "ok-1", "capacity": 1}, {"name": "ok-2", "capacity": 1, "colour": "red"}], "resources[1].colour"),
    ([{"name": "ok-1", "capacity": 1}, "ok-2"], "resources[1]"),
    ([{"name": "ok-1", "capacity": 1}, {"name": "ok-1", "capacity": 2}], "resources[1].name"),
    ([], "resources"),
    ([{"name": f"r-{i}", "capacity": 1} for i in range(MAX_ADD + 1)], "resources"),
])
def test_one_bad_entry_refuses_the_whole_list_and_says_which(daemon: DaemonProcess, entries: list[Any],
                                                               field: str) -> None:
    error = refused(daemon, {"resources": entries})

    assert error.code == ErrorCode.INVALID_PARAMS
    assert error.data["field"] == field
    assert "ok-1" not in names(daemon)


def test_a_list_is_not_mixed_with_the_fields_of_one_resource(daemon: DaemonProcess) -> None:
    error = refused(daemon, {"resources": [{"name": "ok-1", "capacity": 1}], "name": "ok-2", "capacity": 1})

    assert error.code == ErrorCode.INVALID_PARAMS


def test_a_name_already_taken_refuses_the_whole_list(daemon: DaemonProcess) -> None:
    daemon.call(Method.RESOURCES_ADD, {"name": "taken", "capacity": 1})

    for entries in ([{"name": "new-1", "capacity": 1}, {"name": "taken", "capacity": 1}],
                    [{"name": "new-1", "capacity": 1}, {"name": "licence", "capacity": 1}]):
        error = refused(daemon, {"resources": entries})
        assert error.code == ErrorCode.RESOURCE_EXISTS
        assert "new-1" not in names(daemon)


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to act as a second user")
def test_another_user_may_not_add_a_list(tmp_path: Path, shared_dir: Path) -> None:
    daemon = shared_daemon(tmp_path, shared_dir)
    try:
        [reply] = as_nobody(daemon.socket, [{"method": "resources.add", "params": {"resources": [
            {"name": "mine-1", "capacity": 1}, {"name": "mine-2", "capacity": 1}]}}])
        assert reply["error"]["code"] == ErrorCode.PERMISSION_DENIED
        assert not {"mine-1", "mine-2"} & names(daemon)
    finally:
        daemon.stop()
