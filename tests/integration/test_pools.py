"""Pools through the real daemon with a fake clock: scaling, cooldown, bounds, draining, factories, health."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from mcpresd.protocol import ErrorCode
from tests.conftest import CONFIG
from tests.live import LiveDaemon, live  # noqa: F401 - a fixture

COOLDOWN = 60.0


def slots(live: LiveDaemon, name: str = "builds", *, parent: str = "slot", size: float = 1, least: int = 5,
          most: int = 10, **extra: Any) -> dict[str, Any]:
    params = {"name": name, "factory": "slots", "parent": parent, "slot_size": size, "min": least, "max": most,
              "cooldown": COOLDOWN, **extra}
    pool: dict[str, Any] = live.call("pools.create", params)
    return pool


def take(live: LiveDaemon, pool: str = "builds", members: int = 1, **extra: Any) -> dict[str, Any]:
    allocation: dict[str, Any] = live.call("allocate", {"resources": [{"resource": f"pool:{pool}", "amount": members}],
                                                         "holder_pid": os.getpid(), **extra})
    return allocation


def pool(live: LiveDaemon, name: str = "builds") -> dict[str, Any]:
    shown: dict[str, Any] = live.call("pools.get", {"name": name})
    return shown


def events(live: LiveDaemon, name: str = "builds") -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = live.call("pools.events", {"name": name, "limit": 1000})
    return found


def kinds(live: LiveDaemon, name: str = "builds") -> list[str]:
    return [e["kind"] for e in events(live, name)]


def test_a_new_pool_is_filled_to_its_minimum_at_once(live: LiveDaemon) -> None:
    created = slots(live)
    assert created["size"] == 5
    assert [m["name"] for m in created["members"]] == [f"builds/{i}" for i in range(5)]
    assert kinds(live) == ["pool.created", *["pool.member_added"] * 5, "pool.scaled_up"]
    assert events(live)[-1]["detail"]["reason"] == "below the minimum of 5"


def test_slots_hold_their_share_of_the_parent(live: LiveDaemon) -> None:
    slots(live, size=2, least=3)  # 3 slots of 2 from the 10-slot resource
    [parent] = [r for r in live.call("resources.list") if r["name"] == "slot"]
    assert parent["allocated"] == 6.0
    with pytest.raises(Exception):
        live.call("allocate", {"resources": [{"resource": "slot", "amount": 5}], "holder_pid": os.getpid()})


def test_scales_up_only_above_the_threshold(live: LiveDaemon) -> None:
    slots(live)
    live.advance(COOLDOWN + 1)
    for _ in range(4):
        take(live)
    live.advance(1)
    assert pool(live)["size"] == 5, "4 of 5 busy is 80%: at the threshold, not above it"
    take(live)
    live.advance(1)
    grown = pool(live)
    assert grown["size"] == 8, "5 busy / 0.7 target = 7.14 -> 8 members"
    scaled = [e for e in events(live) if e["kind"] == "pool.scaled_up"][-1]
    assert scaled["detail"]["size_before"] == 5 and scaled["detail"]["size_after"] == 8
    assert "above 80%" in scaled["detail"]["reason"]


def test_a_new_member_is_allocatable_within_the_tick_that_adds_it(live: LiveDaemon) -> None:
    slots(live, least=1, most=4)
    live.advance(COOLDOWN + 1)
    first = take(live)
    waiting = take(live, wait=600, detach=True)
    assert first["state"] == "active" and waiting["state"] == "queued"
    live.advance(1)
    assert live.call("allocations.get", {"id": waiting["id"]})["state"] == "active"


def test_queued_demand_counts_towards_scaling_up(live: LiveDaemon) -> None:
    slots(live, least=2, most=10)
    live.advance(COOLDOWN + 1)
    take(live)
    for _ in range(4):
        take(live, wait=600, detach=True)
    live.advance(1)
    # 2 members: 2 busy and 3 still queued after the grant -> demand 5 -> ceil(5 / 0.7) = 8
    assert pool(live)["size"] == 8
    assert pool(live)["queued"] == 0 and pool(live)["busy"] == 5


def test_no_scaling_within_the_cooldown(live: LiveDaemon) -> None:
    slots(live, least=1, most=10)
    take(live)
    live.advance(COOLDOWN - 1)
    assert pool(live)["size"] == 1, "the fill to the minimum started the cooldown"
    live.advance(2)
    assert pool(live)["size"] == 2


@pytest.mark.parametrize("wanted", [12, 30])
def test_never_above_the_maximum(live: LiveDaemon, wanted: int) -> None:
    slots(live, least=1, most=4)
    live.advance(COOLDOWN + 1)
    for _ in range(wanted):
        take(live, wait=600, detach=True)
    for _ in range(5):
        live.advance(COOLDOWN + 1)
    assert pool(live)["size"] == 4
    assert pool(live)["busy"] == 4


def test_never_below_the_minimum_and_scale_down_drains_only_idle_members(live: LiveDaemon) -> None:
    slots(live, least=2, most=10)
    live.advance(COOLDOWN + 1)
    held = [take(live) for _ in range(2)] + [take(live, wait=600, detach=True) for _ in range(4)]
    live.advance(1)
    assert pool(live)["size"] == 9
    busy_members = {i["resource"] for a in held for i in live.call("allocations.get", {"id": a["id"]})["items"]}
    for allocation in held[1:]:
        live.call("release", {"id": allocation["id"]})
    live.advance(COOLDOWN + 1)
    shrunk = pool(live)
    assert shrunk["size"] == 2, "1 busy / 0.7 -> 2, which is also the minimum"
    assert any(m["state"] == "busy" for m in shrunk["members"])
    still = {m["name"] for m in shrunk["members"]}
    first_member = next(iter(live.call("allocations.get", {"id": held[0]["id"]})["items"]))["resource"]
    assert first_member in still and first_member in busy_members
    sequence = [e for e in events(live) if e["kind"] in ("pool.scaled_down", "pool.member_draining",
                                                         "pool.member_removed")]
    assert sequence[0]["kind"] == "pool.member_draining", "a member is closed before it is removed"
    assert sequence[-1]["kind"] == "pool.member_removed"
    scaled = [e for e in events(live) if e["kind"] == "pool.scaled_down"][0]
    assert "below 30%" in scaled["detail"]["reason"]
    live.call("release", {"id": held[0]["id"]})
    for _ in range(3):
        live.advance(COOLDOWN + 1)
    assert pool(live)["size"] == 2, "never below the minimum, even idle"


def test_a_draining_pool_refuses_new_grants_and_finishes(live: LiveDaemon) -> None:
    slots(live, least=2, most=4)
    running = take(live)
    drained = live.call("pools.drain", {"name": "builds"})
    assert drained["state"] == "draining"
    refused = live.error("allocate", {"resources": [{"resource": "pool:builds", "amount": 1}]})
    assert refused.code == ErrorCode.POOL_DRAINING
    [member] = [i["resource"] for i in running["items"]]
    idle = next(m["name"] for m in pool(live)["members"] if m["name"] != member)
    assert live.error("allocate", {"resources": [{"resource": idle, "amount": 1}]}).code == \
        ErrorCode.INSUFFICIENT_CAPACITY, "its members are closed to direct requests too"
    live.advance(COOLDOWN * 3)
    assert pool(live)["size"] == 2, "a draining pool does not scale"
    live.call("release", {"id": running["id"]})
    live.advance(1)
    assert pool(live)["state"] == "drained"
    assert kinds(live)[-2:] == ["pool.draining", "pool.drained"]
    assert live.call("pools.undrain", {"name": "builds"})["state"] == "active"
    assert take(live)["state"] == "active"


def test_draining_withdraws_requests_queued_for_the_pool(live: LiveDaemon) -> None:
    slots(live, least=1, most=1)
    take(live)
    waiting = take(live, wait=600, detach=True)
    live.call("pools.drain", {"name": "builds"})
    ended = live.call("allocations.get", {"id": waiting["id"]})
    assert ended["state"] == "withdrawn" and ended["release_reason"] == "rejected"


def test_deleting_a_pool_in_use_is_refused_and_an_idle_one_gives_its_share_back(live: LiveDaemon) -> None:
    slots(live, size=2, least=2, most=4)
    running = take(live)
    assert live.error("pools.delete", {"name": "builds"}).code == ErrorCode.RESOURCE_IN_USE
    live.call("release", {"id": running["id"]})
    assert live.call("pools.delete", {"name": "builds"})["state"] == "deleted"
    [parent] = [r for r in live.call("resources.list") if r["name"] == "slot"]
    assert parent["allocated"] == 0.0
    assert not [r for r in live.call("resources.list") if r["name"].startswith("builds/")]
    assert live.error("pools.get", {"name": "builds"}).code == ErrorCode.UNKNOWN_POOL


def test_a_command_factory_makes_members_from_its_output(live: LiveDaemon, tmp_path: Path) -> None:
    made = tmp_path / "made"
    live.call("pools.create", {
        "name": "workers", "factory": "command", "min": 2, "max": 4, "cooldown": COOLDOWN,
        "create": f'echo $MCPRES_MEMBER_INDEX >> {made}; echo "{{\\"name\\": \\"w$MCPRES_MEMBER_INDEX\\",'
                  f' \\"labels\\": {{\\"port\\": 900$MCPRES_MEMBER_INDEX}}}}"',
        "destroy": f"cat > {tmp_path}/destroyed-$MCPRES_MEMBER_INDEX; echo gone >> {tmp_path}/destroyed",
    })
    live.settle()
    shown = pool(live, "workers")
    assert [m["name"] for m in shown["members"]] == ["workers/w0", "workers/w1"]
    assert made.read_text().split() == ["0", "1"]
    granted = take(live, "workers")
    assert granted["items"][0]["resource"] == "workers/w0"


def test_a_factory_that_times_out_is_killed_and_paused_after_repeated_failures(live: LiveDaemon) -> None:
    live.call("pools.create", {"name": "slow", "factory": "command", "min": 1, "max": 2, "create": "sleep 30",
                               "timeout": 0.3, "cooldown": 0})
    for _ in range(3):
        live.settle()
        live.advance(1)
    live.settle()
    failures = [e for e in events(live, "slow") if e["kind"] == "pool.factory_failed"]
    assert len(failures) == 3
    assert "timed out after 0.3s" in failures[0]["detail"]["error"]
    paused = [e for e in events(live, "slow") if e["kind"] == "pool.factory_paused"]
    assert len(paused) == 1
    alerts = live.call("alerts.list")
    assert [(a["resource"], a["state"], a["level"]) for a in alerts if a["rule"] == "pool-factory"] == [
        ("pool:slow", "firing", "error")]
    live.advance(10)
    live.settle()
    assert len([e for e in events(live, "slow") if e["kind"] == "pool.factory_failed"]) == 3, \
        "no new run while paused"
    assert pool(live, "slow")["size"] == 0


def test_an_unhealthy_parent_has_its_idle_slots_moved_elsewhere(live: LiveDaemon) -> None:
    slots(live, parent="custom", size=1, least=2, most=4)
    parents = {m["parent"] for m in pool(live)["members"]}
    assert len(parents) == 1
    [sick] = parents
    live.on_store(lambda broker: broker.ledger.block(sick, "health 20/100 (throttling)"))
    live.advance(1)
    moved = pool(live)
    assert {m["parent"] for m in moved["members"]} == ({"licence", "slot"} - {sick})
    replaced = [e for e in events(live) if e["kind"] == "pool.member_replaced"]
    assert len(replaced) == 2 and "health 20/100" in replaced[0]["detail"]["reason"]


def test_requests_choose_among_several_pools_by_objective(live: LiveDaemon) -> None:
    live.call("pools.create", {"name": "cheap", "factory": "slots", "parent": "slot", "slot_size": 1, "min": 2,
                               "max": 2, "cost_per_unit_hour": 0.5})
    live.call("pools.create", {"name": "dear", "factory": "slots", "parent": "slot", "slot_size": 1, "min": 2,
                               "max": 2, "cost_per_unit_hour": 3.0})
    by_order = take(live, "dear,cheap")
    by_cost = take(live, "dear,cheap", objective="cost")
    assert by_order["pools"] == ["dear"]
    assert by_cost["pools"] == ["cheap"]
    assert by_cost["cost_per_hour"] == 0.5
    spread = take(live, "dear,cheap", objective="balanced")
    assert spread["pools"] == ["dear"], "both are half used: a tie goes to the order named"
    assert take(live, "*", objective="utilisation")["pools"] == ["cheap"], "dear is full"


def test_a_pool_selector_and_unknown_pools(live: LiveDaemon) -> None:
    slots(live, least=1, most=1, labels={"team": "ml"})
    assert take(live, "team=ml")["pools"] == ["builds"]
    assert live.error("allocate", {"resources": [{"resource": "pool:nope", "amount": 1}]}).code == \
        ErrorCode.UNKNOWN_POOL


def test_config_declared_pools_are_created_at_start(tmp_path: Path) -> None:
    config = CONFIG + """
[[pools]]
name = "gpu-halves"
factory = "slots"
parent = "gpu"
slot_size = 0.5
min = 2
max = 2
cooldown = "2m"
"""
    live = LiveDaemon(tmp_path, config).start()
    try:
        shown = pool(live, "gpu-halves")
        assert shown["source"] == "config" and shown["size"] == 2 and shown["scale"]["cooldown_s"] == 120
        [gpu] = [r for r in live.call("resources.list") if r["type"] == "gpu"]
        assert gpu["allocated"] == 1.0
        half = take(live, "gpu-halves")
        assert half["items"][0]["resource"] == "gpu-halves/0"
    finally:
        live.close()


def test_pool_changes_are_for_the_daemons_user_only(live: LiveDaemon) -> None:
    from mcpresd import params
    from mcpresd.core.errors import PermissionDenied
    from mcpresd.service import Caller

    stranger = Caller(uid=os.getuid() + 4242, gid=0, pid=None)
    command = params.create_pool({"name": "x", "factory": "command", "create": "true", "max": 1})
    with pytest.raises(PermissionDenied):
        live.on_store(lambda broker: broker.pools_create(stranger, command))


def test_pools_members_and_shares_survive_a_restart(tmp_path: Path) -> None:
    first = LiveDaemon(tmp_path).start()
    try:
        slots(first, size=2, least=3, most=6)
        held = take(first)
        first.call("pools.drain", {"name": "builds"})
    finally:
        first.close()
    second = LiveDaemon(tmp_path).start()
    try:
        shown = pool(second)
        assert shown["state"] == "draining" and shown["size"] == 3 and shown["busy"] == 1
        [parent] = [r for r in second.call("resources.list") if r["name"] == "slot"]
        assert parent["allocated"] == 6.0
        assert second.call("allocations.get", {"id": held["id"]})["state"] == "active"
        second.call("release", {"id": held["id"]})
        second.advance(1)
        assert pool(second)["state"] == "drained"
    finally:
        second.close()


def test_a_resource_registered_later_joins_the_static_pool_that_selects_or_lists_it(live: LiveDaemon) -> None:
    live.call("pools.create", {"name": "farm", "factory": "static", "select": ["name~^farm-"]})
    live.call("pools.create", {"name": "listed", "factory": "static", "members": ["slot"]})
    assert pool(live, "farm")["size"] == 0
    live.call("resources.add", {"name": "farm-1", "capacity": 1})
    live.call("resources.add", {"name": "other-1", "capacity": 1})  # matches no pool: the pools stay as they are
    assert [m["name"] for m in pool(live, "farm")["members"]] == ["farm-1"]
    assert take(live, "farm")["items"][0]["resource"] == "farm-1"
    live.call("resources.add", {"name": "farm-2", "capacity": 1})
    assert take(live, "farm")["items"][0]["resource"] == "farm-2"
    live.call("resources.remove", {"name": "other-1"})
    assert pool(live, "farm")["size"] == 2
