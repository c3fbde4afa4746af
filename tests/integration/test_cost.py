"""Cost, budgets, accounting and learning, through the real daemon with a fake clock."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from mcpresd.protocol import ErrorCode
from tests.live import LiveDaemon, live  # noqa: F401 - a fixture

MINUTE = 60.0
HOUR = 3600.0


def seats(live: LiveDaemon, amount: float = 2, tool: str | None = "render", **extra: Any) -> dict[str, Any]:
    allocation: dict[str, Any] = live.call("allocate", {
        "resources": [{"resource": "licence", "amount": amount}], "holder_pid": os.getpid(), "tool_id": tool, **extra})
    return allocation


def get(live: LiveDaemon, allocation_id: str) -> dict[str, Any]:
    shown: dict[str, Any] = live.call("allocations.get", {"id": allocation_id})
    return shown


def test_cost_accrues_per_unit_hour_while_held_and_stops_at_release(live: LiveDaemon) -> None:
    held = seats(live)  # 2 seats at 1.5 per seat-hour
    assert held["cost_per_hour"] == 3.0 and held["cost"] == 0.0
    live.clock.now += 90 * MINUTE
    assert get(live, held["id"])["cost"] == 4.5
    released = live.call("release", {"id": held["id"]})
    assert released["cost"] == 4.5
    live.clock.now += HOUR
    assert get(live, held["id"])["cost"] == 4.5


def test_a_new_price_applies_to_later_grants(live: LiveDaemon) -> None:
    before = seats(live, 1)
    changed = live.call("resources.set_cost", {"name": "licence", "cost_per_unit_hour": 4.0})
    assert changed["cost_per_unit_hour"] == 4.0
    after = seats(live, 1, tool="other")
    live.clock.now += HOUR
    assert get(live, before["id"])["cost"] == 1.5
    assert get(live, after["id"])["cost"] == 4.0
    assert live.error("resources.set_cost", {"name": "licence", "cost_per_unit_hour": -1}).code == \
        ErrorCode.INVALID_PARAMS
    assert live.error("resources.set_cost", {"name": "nope", "cost_per_unit_hour": 1}).code == \
        ErrorCode.UNKNOWN_RESOURCE


def budget_alerts(live: LiveDaemon) -> list[tuple[str, str, str]]:
    return [(a["resource"], a["state"], a["level"]) for a in live.call("alerts.list", {"all": True})
            if a["rule"] == "budget"]


def test_a_budget_alerts_at_its_soft_threshold_then_denies_at_its_limit(live: LiveDaemon) -> None:
    budget = live.call("budgets.set", {"scope": "tool", "subject": "render", "limit": 3, "period": "day",
                                       "soft": 0.8})
    assert budget["state"] == "ok" and budget["spent"] == 0
    held = seats(live)  # 3 per hour
    live.advance(47 * MINUTE)
    assert budget_alerts(live) == []
    live.advance(1 * MINUTE)  # 2.4 spent: exactly 80 %
    assert budget_alerts(live) == [("budget:tool/render/day", "firing", "warning")]
    [shown] = live.call("budgets.list")
    assert shown["state"] == "soft" and shown["spent"] == 2.4
    assert live.call("allocate", {"resources": [{"resource": "slot", "amount": 1}], "tool_id": "render"})[
        "state"] == "active", "soft only warns"
    live.advance(12 * MINUTE)
    live.call("release", {"id": held["id"]})
    refused = live.error("allocate", {"resources": [{"resource": "slot", "amount": 1}], "tool_id": "render"})
    assert refused.code == ErrorCode.BUDGET_EXCEEDED
    assert "daily budget of tool render is spent" in refused.message
    assert seats(live, 1, tool="other")["state"] == "active", "other tools are not affected"
    assert budget_alerts(live) == [("budget:tool/render/day", "firing", "error")]
    live.advance(24 * HOUR)
    assert seats(live, 0.1, tool="render")["state"] == "active", "a new day, a new budget"
    assert ("budget:tool/render/day", "resolved", "error") in budget_alerts(live)


@pytest.mark.parametrize(("scope", "subject"), [("owner", str(os.getuid())), ("pool", "seats")])
def test_owner_and_pool_budgets_deny_what_they_cover(live: LiveDaemon, scope: str, subject: str) -> None:
    live.call("pools.create", {"name": "seats", "factory": "slots", "parent": "licence", "slot_size": 1, "min": 1,
                               "max": 1})
    live.call("budgets.set", {"scope": scope, "subject": subject, "limit": 1, "period": "week"})
    held = live.call("allocate", {"resources": [{"resource": "pool:seats", "amount": 1}], "holder_pid": os.getpid()})
    live.clock.now += HOUR  # 1.5 spent
    live.call("release", {"id": held["id"]})
    refused = live.error("allocate", {"resources": [{"resource": "pool:seats", "amount": 1}]})
    assert refused.code == ErrorCode.BUDGET_EXCEEDED
    assert refused.data["scope"] == scope and refused.data["spent"] == 1.5
    deleted = live.call("budgets.delete", {"scope": scope, "subject": subject, "period": "week"})
    assert deleted["state"] == "exceeded"
    assert live.call("allocate", {"resources": [{"resource": "pool:seats", "amount": 1}]})["state"] == "active"


def test_usage_totals_are_exact(live: LiveDaemon) -> None:
    live.call("pools.create", {"name": "builds", "factory": "slots", "parent": "slot", "slot_size": 2, "min": 2,
                               "max": 2, "cost_per_unit_hour": 0.25})
    start = live.clock.now
    render = seats(live, 2, tool="render")  # 3.0 per hour
    build = live.call("allocate", {"resources": [{"resource": "pool:builds", "amount": 1}], "tool_id": "make",
                                   "holder_pid": os.getpid()})
    waiting = seats(live, 1, tool="render", wait=10 * HOUR, detach=True)  # outlives the clock jumps below
    live.clock.now = start + 2 * HOUR
    live.call("release", {"id": render["id"], "measured": {"cpu_seconds": 3600}})
    live.clock.now = start + 3 * HOUR
    live.call("release", {"id": build["id"]})
    live.call("release", {"id": waiting["id"]})
    usage = live.call("usage", {"by": "tool", "since": 7 * 86400})
    rows = {row["key"]: row for row in usage["rows"]}
    assert rows["render"]["allocations"] == 2
    assert rows["render"]["cost"] == 6.0 + 1.5, "2 seats x 2 h x 1.5, then 1 seat x 1 h x 1.5"
    assert rows["render"]["resource_hours"] == {"custom": 5.0}
    assert rows["render"]["waited_s"] == 2 * HOUR
    assert rows["make"]["cost"] == 0.75 and rows["make"]["resource_hours"] == {"custom": 6.0}
    assert usage["totals"]["cost"] == 8.25 and usage["totals"]["allocations"] == 3
    by_pool = {row["key"]: row for row in live.call("usage", {"by": "pool"})["rows"]}
    assert list(by_pool) == ["builds"] and by_pool["builds"]["cost"] == 0.75
    by_resource = {row["key"]: row["cost"] for row in live.call("usage", {"by": "resource"})["rows"]}
    assert by_resource == {"licence": 7.5, "builds/0": 0.75}
    [owner] = live.call("usage", {"by": "owner"})["rows"]
    assert owner["key"] == str(os.getuid()) and owner["cost"] == 8.25
    recent = live.call("usage", {"by": "tool", "since": 30 * MINUTE})
    assert {row["key"]: row["cost"] for row in recent["rows"]} == {"render": 0.75, "make": 0.125}


def test_recommendations_are_the_documented_percentiles_of_measured_runs(live: LiveDaemon) -> None:
    for minutes, cores, gib in [(10, 1, 1), (20, 2, 2), (30, 3, 3), (40, 4, 4)]:
        held = live.call("allocate", {"resources": [{"resource": "slot", "amount": 4}], "tool_id": "train",
                                      "holder_pid": os.getpid()})
        live.clock.now += minutes * MINUTE
        live.call("release", {"id": held["id"], "measured": {"cpu_seconds": cores * minutes * MINUTE,
                                                             "memory_peak": gib * (1 << 30)}})
    advice = live.call("recommend", {"tool_id": "train"})
    assert advice["runs"] == 4 and advice["enough"] is True
    cpu = advice["evidence"]["cpu"]
    assert (cpu["p50"], cpu["p90"], cpu["p95"], cpu["max"]) == (2.5, 3.7, pytest.approx(3.85), 4.0)
    assert advice["evidence"]["duration_s"]["p50"] == 25 * MINUTE
    assert advice["recommendation"]["cpu"] == 5.0, "ceil_to(3.85 x 1.2, 0.5)"
    assert advice["recommendation"]["ttl_s"] == 3480.0, "ceil_to(38.5 min x 1.5 = 3465 s, 60 s)"
    assert advice["args"][:2] == ["--cpu", "5"]
    unknown = live.call("recommend", {"tool_id": "never-ran"})
    assert unknown["runs"] == 0 and unknown["enough"] is False


def test_explain_estimates_the_start_from_the_holders_usual_duration(live: LiveDaemon) -> None:
    for _ in range(3):
        held = seats(live, 2)
        live.clock.now += 10 * MINUTE
        live.call("release", {"id": held["id"], "measured": {"cpu_seconds": 60}})
    blocker = seats(live, 2)
    waiting = seats(live, 1, tool="other", wait=HOUR, detach=True)
    live.clock.now += 4 * MINUTE
    why = live.call("allocations.explain", {"id": waiting["id"]})
    assert why["estimate"] == blocker["granted_at"] + 10 * MINUTE
    assert "render usually runs 600s (median of 3 runs)" in why["estimate_basis"]


def test_optimise_reports_allocations_holding_far_more_than_they_use(live: LiveDaemon) -> None:
    held = live.call("allocate", {"resources": [{"resource": "cpu", "amount": 1}], "tool_id": "idle-tool",
                                  "holder_pid": os.getpid()})
    for total in (10.0, 16.0):  # the holder had used 10 s of CPU before: only what follows counts
        live.on_store(lambda broker: broker.record_samples({}, {}, None, {held["id"]: {"cpu_seconds": total}}))
    live.clock.now += 20 * MINUTE
    report = live.call("optimise")
    [finding] = report["oversized"]
    assert finding["allocation_id"] == held["id"] and finding["kind"] == "cpu"
    assert finding["used"] == pytest.approx(6.0 / 1200)
    assert get(live, held["id"])["state"] == "active", "a report only: nothing is moved"
    live.advance(1)
    live.advance(400)
    reports = [e for e in live.call("events.list", {"limit": 1000}) if e["kind"] == "optimise.report"]
    assert len(reports) == 1, "the periodic pass reports a finding once, not on every pass"
    assert reports[0]["detail"]["oversized"][0]["allocation_id"] == held["id"]


def test_the_daemon_measures_a_holders_process_tree(tmp_path: Path) -> None:
    import subprocess
    import sys
    import time

    from tests.conftest import CONFIG, DaemonProcess

    daemon = DaemonProcess(tmp_path, config=CONFIG + '\n[monitor]\ninterval = "0.5s"\n')
    daemon.start()
    try:
        # Burns a second of CPU, takes 64 MiB, says so, then idles until killed.
        burner = subprocess.Popen([sys.executable, "-c", "import os, time\nwhile os.times().user < 1.0: pass\n"
                                   "b=bytearray(64<<20)\nprint('ready', flush=True)\ntime.sleep(600)"],
                                  stdout=subprocess.PIPE)
        held = daemon.call("allocate", {"resources": [{"resource": "slot", "amount": 1}], "tool_id": "burn",
                                        "holder_pid": burner.pid})
        assert burner.stdout is not None and burner.stdout.readline() == b"ready\n"
        ready = time.time()
        deadline = time.monotonic() + 30
        while (daemon.call("metrics.current")["ts"] or 0) <= ready:  # a sampling round after it was ready
            assert time.monotonic() < deadline, "no sample taken"
            time.sleep(0.05)
        burner.kill()
        burner.wait()
        while daemon.call("allocations.get", {"id": held["id"]})["state"] == "active":
            assert time.monotonic() < deadline, "the killed holder's allocation was not released"
            time.sleep(0.05)
        measured = daemon.call("allocations.get", {"id": held["id"]})["measured"]
        assert measured["cpu_seconds"] > 0.5
        assert measured["memory_peak"] > 64 << 20
    finally:
        daemon.stop()
