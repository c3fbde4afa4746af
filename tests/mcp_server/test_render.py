"""What the MCP server's tools say, from the daemon's answers alone: pure functions, no daemon, no SDK session."""

from __future__ import annotations

from typing import Any

import pytest

from mcpctl.client import DaemonUnreachable, RpcError
from mcpctl.mcp_server import (
    NETWORK_LINES,
    allocation_line,
    demands,
    describe_handle,
    measured_words,
    queued_line,
    refusal,
    summarise_host,
)
from mcpresd.protocol import ErrorCode, UnitError

STATUS = {"version": "0.1.0", "pid": 7, "uptime_s": 95.0, "socket": "/s", "database": "/d", "resources": 3,
          "allocations": {"queued": 1, "active": 2, "released": 0, "withdrawn": 0}, "gpu_source": "none"}


def resource(name: str, kind: str, capacity: float, allocated: float, unit: str, *,
             health: dict[str, Any] | None = None, labels: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"name": name, "type": kind, "capacity": capacity, "allocated": allocated,
            "free": max(0.0, capacity - allocated), "unit": unit, "labels": labels or {}, "uuid": None,
            "cost_per_unit_hour": None, "source": "discovered",
            "health": {"score": 100, "reasons": [], "granted": True} if health is None else health}


def test_host_status_lists_each_resource_with_allocated_free_and_measured_load() -> None:
    resources = [
        resource("licence", "custom", 2, 1, "seats"),
        resource("memory", "memory", 16 * 2 ** 30, 8 * 2 ** 30, "bytes"),
        resource("gpu:0", "gpu", 1, 0.5, "device", labels={"name": "NVIDIA H100"}),
        resource("cpu", "cpu", 8, 2, "cores"),
    ]
    current = {"ts": None, "resources": {
        "cpu": {"utilisation": 91.2, "load1": 7.5, "utilisation_rate": 25.0},
        "memory": {"utilisation": 40.0, "swap_utilisation": "unsupported"},
        "gpu:0": {"utilisation": 99.0, "memory_utilisation": 12.0, "temperature_c": 71.0, "foreign_memory": 2 ** 30}}}
    text, status = summarise_host(STATUS, resources, current, [], ["a1"])
    assert text.splitlines() == [
        "mcpresd 0.1.0 up 1m35s: 2 active and 1 queued allocations; this session holds 1.",
        "cpu: 2 of 8 cores allocated, 6 free; measured busy 91%, load1 7.50",
        "memory: 8G of 16G allocated, 8G free; measured busy 40%",
        "gpu:0 (NVIDIA H100): 0.5 of 1 device allocated, 0.5 free; measured busy 99%, memory 12%, 71°C, "
        "outside allocations 1G",
        "licence: 1 of 2 seats allocated, 1 free",
        "no alerts firing.",
    ]
    assert [r["name"] for r in status["resources"]] == ["cpu", "memory", "gpu:0", "licence"]
    assert status["resources"][0]["metrics"]["load1"] == 7.5 and status["resources"][3]["metrics"] == {}
    assert status["sampled_at"] is None and status["held_by_this_session"] == ["a1"]


def test_host_status_names_firing_alerts_and_unhealthy_resources_but_not_pending_alerts() -> None:
    sick = {"score": 30, "reasons": ["gpu-hot firing (-40)"], "granted": False}
    alerts = [{"rule": "gpu-hot", "resource": "gpu:0", "state": "firing", "level": "critical", "last_value": 91.0},
              {"rule": "cpu-busy", "resource": "cpu", "state": "pending", "level": "warning", "last_value": 85.0}]
    text, status = summarise_host(STATUS, [resource("gpu:0", "gpu", 1, 0, "device", health=sick)],
                                  {"ts": None, "resources": {}}, alerts, [])
    assert "gpu:0: 0 of 1 device allocated, 1 free; health 30: not granted until it recovers" in text
    assert "firing alerts: gpu-hot on gpu:0 (critical, last 91.0)" in text and "cpu-busy" not in text
    assert [a["rule"] for a in status["alerts"]] == ["gpu-hot"]
    assert status["resources"][0]["granted"] is False and status["resources"][0]["health_score"] == 30


@pytest.mark.parametrize("interfaces, lines", [(NETWORK_LINES, NETWORK_LINES), (NETWORK_LINES + 1, 0)])
def test_many_network_interfaces_are_summed_up_in_one_line(interfaces: int, lines: int) -> None:
    nets = [resource(f"net:veth{i}", "network", 125 * 2 ** 20, 0, "bytes/s") for i in range(interfaces)]
    text, status = summarise_host(STATUS, nets, {"ts": None, "resources": {}}, [], [])
    if lines:
        assert "net:veth0: 0 of 125M/s allocated, 125M/s free" in text
    assert sum(line.startswith("net:") for line in text.splitlines()) == lines
    assert (f"network: {interfaces} interfaces" in text) == (lines == 0)
    assert len(status["resources"]) == interfaces


@pytest.mark.parametrize("kind, metrics, words", [
    ("disk", {"utilisation": 21.6, "read_bps": 5.0}, "full 22%"),
    ("network", {"rx_bps": 2048.0, "tx_bps": None}, "rx 2K/s"),
    ("gpu", {"utilisation": None, "memory_utilisation": "unsupported", "foreign_memory": 0.0}, ""),
    ("custom", {"utilisation_rate": 50.0}, ""),
])
def test_measured_words_leave_out_what_was_not_measured(kind: str, metrics: dict[str, Any], words: str) -> None:
    assert measured_words(kind, metrics) == words


def allocation(state: str, items: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {"id": "1a2b", "state": state, "items": items, "ttl_s": None, "expires_at": None, "risks": [], **extra}


def test_a_granted_handle_carries_the_gpus_in_its_environment_and_says_how_it_ends() -> None:
    gpu = {"resource": "gpu:1", "type": "gpu", "amount": 1.0, "unit": "device", "uuid": "GPU-x"}
    text, handle = describe_handle(allocation("active", [gpu], ttl_s=600.0, risks=["gpu:1: power-capped"]))
    assert handle["env"] == {"MCPRES_ALLOCATION_ID": "1a2b", "CUDA_VISIBLE_DEVICES": "GPU-x",
                             "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    assert handle["granted"] == [gpu]
    assert "granted 1a2b: gpu:1 1 device (GPU-x)." in text
    assert "when its lease ends in 10m or when this MCP session ends" in text
    assert "warning: gpu:1: power-capped" in text


def test_a_queued_handle_has_no_environment_yet() -> None:
    text, handle = describe_handle(allocation("queued", []))
    assert handle["env"] == {} and handle["granted"] == [] and text.startswith("queued 1a2b:")


def test_queued_line_is_the_position_and_the_daemons_suggestion() -> None:
    why = {"id": "1a2b", "state": "queued", "queued": True, "position": 2, "queue_length": 3,
           "suggestion": "it would fit if 9f (licence=1) were released"}
    assert queued_line(why) == "1a2b is queued, position 2 of 3: it would fit if 9f (licence=1) were released"
    assert queued_line({"id": "1a2b", "state": "active", "queued": False, "summary": "not queued"}) == "not queued"


def test_demands_take_sizes_numbers_resources_and_a_pool() -> None:
    assert demands(0.5, "1.5G", 1, {"licence": 1, "disk:/": "10G"}, "build") == [
        {"resource": "cpu", "amount": 0.5},
        {"resource": "memory", "amount": 1.5 * 2 ** 30},
        {"resource": "gpu", "amount": 1},
        {"resource": "licence", "amount": 1},
        {"resource": "disk:/", "amount": 10 * 2 ** 30},
        {"resource": "pool:build", "amount": 1},
    ]
    assert demands(None, 4096, None, None, None) == [{"resource": "memory", "amount": 4096.0}]
    assert demands(None, None, None, None, None) == []
    with pytest.raises(UnitError, match=r"^mem: not a size: 'lots'"):
        demands(None, "lots", None, None, None)
    with pytest.raises(UnitError, match=r"^resources\['licence'\]: not a size: 'x'"):
        demands(None, None, None, {"licence": "x"}, None)


def test_refusals_carry_the_daemons_message_and_a_hint_when_waiting_would_help() -> None:
    busy = refusal(RpcError(ErrorCode.INSUFFICIENT_CAPACITY, "not enough free now (gpu: asked 1, free 0)"))
    never = refusal(RpcError(ErrorCode.NEVER_FITS, "licence has a capacity of 2, less than the 3 asked"))
    away = refusal(DaemonUnreachable("/s", "no socket there (is mcpresd running?)"))
    assert all(r.is_error for r in (busy, never, away))
    assert [block.text for r in (busy, never, away) for block in r.content if block.type == "text"] == [
        "not enough free now (gpu: asked 1, free 0)\nnothing was allocated: ask for less, pass wait (seconds) to "
        "queue for it, or see host_status for what is free",
        "licence has a capacity of 2, less than the 3 asked",
        "cannot reach mcpresd at /s: no socket there (is mcpresd running?)",
    ]


@pytest.mark.parametrize("extra, holder", [
    ({"holder": "connection", "holder_pid": None}, "held by this session"),
    ({"id": "9f", "holder": "pid", "holder_pid": 42}, "held by pid 42"),
    ({"id": "9f", "holder": "connection", "holder_pid": None, "redacted": True, "owner_uid": 1001}, "held by uid 1001"),
])
def test_an_allocation_line_says_who_holds_it(extra: dict[str, Any], holder: str) -> None:
    item = {"resource": "licence", "type": "custom", "amount": 1.0, "unit": "seats", "uuid": None}
    line = allocation_line(allocation("active", [item], priority="high", tool_id="ci", created_at=100.0,
                                      expires_at=700.0, **extra), ["1a2b"], now=160.0)
    shown_id = extra.get("id", "1a2b")
    assert line == f"{shown_id} active high: licence 1 seats; tool ci; {holder}; 1m old; lease ends in 9m"


def test_a_tools_text_shows_what_others_named_escaped_and_its_structured_content_exact() -> None:
    from mcpctl.mcp_server import result

    tool = "ci\u202e\U000e0041\x9b é中文"
    answer = result(f"granted: tool {tool}\nline two", {"tool_id": tool})
    refused = refusal(RpcError(ErrorCode.UNKNOWN_POOL, "no pool named 'p\u202e'"))

    assert [block.text for block in answer.content if block.type == "text"] == [
        "granted: tool ci\\u202e\\U000e0041\\x9b é中文\nline two"]
    assert answer.structured_content == {"tool_id": tool}
    assert [block.text for block in refused.content if block.type == "text"] == ["no pool named 'p\\u202e'"]
