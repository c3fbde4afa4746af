"""Every read shows another user's runs the way `usage` and `allocations.list` do: what is held, not who holds
it, what it runs or what it used. Root and the admin group see everything.

Two real uids, as in test_access.py: the daemon runs as root; a forked child drops to `nobody` before it
connects, and talks through `mcpctl.client.Client` so one request can use the reply of another.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from mcpctl.client import Client
from mcpresd import params as p
from mcpresd.monitor import MonitorPolicy
from mcpresd.service import Caller, event_for
from tests.conftest import DaemonProcess
from tests.integration.test_access import NOBODY, shared_daemon, shared_dir  # noqa: F401 - a fixture
from tests.integration.test_monitoring import GPU_BUSY, Rig

pytestmark = pytest.mark.skipif(os.getuid() != 0, reason="needs root to act as a second user")

SECRET_PEAK = 777_777_777
"""A memory peak root's runs report: it must not reach nobody in any shape."""


def as_nobody_with(socket_path: str, session: Callable[[Client, Callable[[], None]], Any],
                   until_ready: Callable[[], None] | None = None) -> Any:
    """Run `session(client, ready)` in a child running as nobody; return what it returns (as JSON).

    The child calls `ready()` once it is set up (subscribed); the parent then runs `until_ready`, if given.
    """
    result_read, result_write = os.pipe()
    ready_read, ready_write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop privileges, talk, report, exit without running pytest's cleanup
        try:
            os.close(result_read)
            os.close(ready_read)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            with Client(socket_path, timeout=20.0) as client:
                outcome = session(client, lambda: os.write(ready_write, b"r") and None)
            os.write(result_write, json.dumps({"ok": outcome}).encode())
        except BaseException as error:  # noqa: BLE001 - reported to the parent, which fails the test
            os.write(result_write, json.dumps({"error": repr(error)}).encode())
        finally:
            os._exit(0)
    os.close(result_write)
    os.close(ready_write)
    try:
        if until_ready is not None:
            assert os.read(ready_read, 1) == b"r", "the child ended before it was ready"
            until_ready()
        data = b""
        while chunk := os.read(result_read, 65536):
            data += chunk
    finally:
        os.close(result_read)
        os.close(ready_read)
        os.waitpid(pid, 0)
    reply: dict[str, Any] = json.loads(data)
    assert "error" not in reply, reply["error"]
    return reply["ok"]


def measured_run(daemon: DaemonProcess, tool: str) -> str:
    """One released run of `tool` by root, with what it used."""
    held = daemon.call("allocate", {"resources": [{"resource": "slot", "amount": 1}], "tool_id": tool,
                                    "holder_pid": os.getpid()})
    daemon.call("release", {"id": held["id"], "measured": {"cpu_seconds": 0.5, "memory_peak": SECRET_PEAK}})
    return str(held["id"])


def test_recommend_learns_only_from_the_callers_own_runs(tmp_path: Path, shared_dir: Path) -> None:
    daemon = shared_daemon(tmp_path, shared_dir)
    try:
        for _ in range(3):
            measured_run(daemon, "train")

        theirs = as_nobody_with(daemon.socket, lambda client, _: client.call("recommend", {"tool_id": "train"}))

        assert (theirs["runs"], theirs["evidence"], theirs["basis"]) == (0, {}, "no measured runs")
        assert str(SECRET_PEAK) not in json.dumps(theirs)
        mine = daemon.call("recommend", {"tool_id": "train"})
        assert mine["runs"] == 3 and mine["evidence"]["memory"]["max"] == SECRET_PEAK
    finally:
        daemon.stop()


def test_a_listing_shows_another_users_run_without_what_it_used(tmp_path: Path, shared_dir: Path) -> None:
    daemon = shared_daemon(tmp_path, shared_dir)
    try:
        run = measured_run(daemon, "train")

        listed = as_nobody_with(daemon.socket, lambda client, _: client.call("allocations.list",
                                                                             {"state": "released"}))

        (shown,) = [a for a in listed if a["id"] == run]
        assert shown["redacted"] is True and shown["measured"] is None and shown["tool_id"] is None
        assert str(SECRET_PEAK) not in json.dumps(listed)
        assert daemon.call("allocations.get", {"id": run})["measured"]["memory_peak"] == SECRET_PEAK
    finally:
        daemon.stop()


def test_explain_names_the_callers_blockers_but_not_another_users(tmp_path: Path, shared_dir: Path) -> None:
    daemon = shared_daemon(tmp_path, shared_dir)
    try:
        for _ in range(3):  # the tool's history gives explain an estimate of when the blocker ends
            measured_run(daemon, "secret-tool")
        blocker = daemon.call("allocate", {"resources": [{"resource": "licence", "amount": 2}],
                                           "tool_id": "secret-tool", "holder_pid": os.getpid()})

        def explain_my_wait(client: Client, _: Callable[[], None]) -> Any:
            queued = client.call("allocate", {"resources": [{"resource": "licence", "amount": 1}], "wait": 60,
                                              "detach": True})
            return client.call("allocations.explain", {"id": queued["id"]})

        why = as_nobody_with(daemon.socket, explain_my_wait)

        (shown,) = why["blockers"]
        assert shown["id"] == blocker["id"] and shown["items"] == [{"resource": "licence", "amount": 2.0}]
        assert (shown["holder_pid"], shown["tool_id"], shown["redacted"]) == (None, None, True)
        assert "secret-tool" not in json.dumps(why)
        assert "its tool usually runs" in why["estimate_basis"]
    finally:
        daemon.stop()


def test_another_owners_budget_and_its_alert_stay_private(tmp_path: Path, shared_dir: Path) -> None:
    daemon = shared_daemon(tmp_path, shared_dir)
    try:
        def spend_over_roots_budget() -> None:
            daemon.call("allocate", {"resources": [{"resource": "licence", "amount": 2}], "holder_pid": os.getpid()})
            daemon.call("budgets.set", {"scope": "owner", "subject": "0", "period": "day", "limit": 0.0001,
                                        "soft": 0.01})

        def watch(client: Client, ready: Callable[[], None]) -> Any:
            client.call("events.subscribe")
            ready()
            for event in client.notifications():
                if event["kind"] == "alert.firing":
                    return {"event": event, "listed": client.call("events.list", {"after_id": event["id"] - 1}),
                            "alerts": client.call("alerts.list", {"all": True}),
                            "budgets": client.call("budgets.list")}
            return None

        seen = as_nobody_with(daemon.socket, watch, until_ready=spend_over_roots_budget)

        assert seen["event"]["resource"] == "budget:owner/0/day"
        assert seen["event"]["detail"] == {} and seen["event"]["redacted"] is True
        assert all(e["detail"] == {} for e in seen["listed"] if e["resource"] == "budget:owner/0/day")
        assert seen["alerts"] == [] and seen["budgets"] == []
        (alert,) = daemon.call("alerts.list", {"all": True})
        assert alert["resource"] == "budget:owner/0/day" and alert["last_value"] > 0
        assert daemon.call("budgets.list")[0]["spent"] > 0
    finally:
        daemon.stop()


def test_an_alert_names_another_users_allocations_without_their_tool_or_holder(tmp_path: Path) -> None:
    rig = Rig(tmp_path / "db", MonitorPolicy(rules=(GPU_BUSY,)))
    held = rig.allocate("gpu:0", 0.5)
    rig.feed([95.0, 95.0, 95.0])
    nobody = Caller(uid=NOBODY, gid=NOBODY, pid=None)

    events = rig.broker.events_list(nobody, p.ListEventsCommand(after_id=0, limit=100, allocation_id=None))
    (firing,) = [e for e in events if e["kind"] == "alert.firing"]
    (alert,) = rig.broker.alerts_list(nobody, p.AlertsCommand(all=True))

    for named in (firing["detail"]["allocations"], alert["allocations"]):
        assert named == [{"id": held["id"], "amount": 0.5, "tool_id": None, "holder_pid": None, "owner_uid": 0,
                          "redacted": True}]
    (as_root,) = rig.broker.alerts_list(Caller(uid=0, gid=0, pid=None), p.AlertsCommand(all=True))
    assert as_root["allocations"][0]["holder_pid"] == os.getpid()


def event(uid: int | None, kind: str = "released", resource: str | None = None, **detail: Any) -> dict[str, Any]:
    return {"id": 7, "ts": 1.0, "kind": kind, "allocation_id": None, "resource": resource, "uid": uid,
            "detail": detail}


MINE = {"id": "a1", "amount": 1.0, "tool_id": "mine", "holder_pid": 10, "owner_uid": NOBODY}
ROOTS = {"id": "a2", "amount": 1.0, "tool_id": "secret", "holder_pid": 20, "owner_uid": 0}
ROOTS_SHOWN = {**ROOTS, "tool_id": None, "holder_pid": None, "redacted": True}
OVERSIZED_MINE = {"allocation_id": "a1", "tool_id": "mine", "used": 0.1, "owner_uid": NOBODY}
OVERSIZED_ROOTS = {"allocation_id": "a2", "tool_id": "secret", "used": 0.1, "owner_uid": 0}


@pytest.mark.parametrize(("given", "shown"), [
    pytest.param(event(NOBODY, holder_pid=10), event(NOBODY, holder_pid=10), id="my own event"),
    pytest.param(event(0, holder_pid=20), {**event(0), "redacted": True}, id="another user's event"),
    pytest.param(event(None, "resource.added", "licence", capacity=2), event(None, "resource.added", "licence",
                                                                             capacity=2), id="a resource event"),
    pytest.param(event(None, "alert.firing", "gpu:0", allocations=[ROOTS, MINE]),
                 event(None, "alert.firing", "gpu:0", allocations=[ROOTS_SHOWN, MINE]),
                 id="an alert naming allocations"),
    pytest.param(event(None, "optimise.report", oversized=[OVERSIZED_ROOTS, OVERSIZED_MINE], consolidate=[]),
                 event(None, "optimise.report", oversized=[OVERSIZED_MINE], consolidate=[]),
                 id="the optimise report"),
    pytest.param(event(None, "alert.firing", "budget:owner/0/day", spent=3.0),
                 {**event(None, "alert.firing", "budget:owner/0/day"), "redacted": True},
                 id="another owner's budget alert"),
    pytest.param(event(None, "alert.firing", f"budget:owner/{NOBODY}/day", spent=3.0),
                 event(None, "alert.firing", f"budget:owner/{NOBODY}/day", spent=3.0), id="my budget's alert"),
    pytest.param(event(None, "alert.firing", "budget:tool/train/day", spent=3.0),
                 event(None, "alert.firing", "budget:tool/train/day", spent=3.0), id="a tool's budget alert"),
])
def test_an_event_shows_a_user_what_the_reads_show_them(given: dict[str, Any], shown: dict[str, Any]) -> None:
    nobody = Caller(uid=NOBODY, gid=NOBODY, pid=None)

    assert event_for(nobody, given) == shown
    assert event_for(Caller(uid=NOBODY, gid=NOBODY, pid=None, admin=True), given) is given


def test_the_periodic_optimise_report_names_each_allocations_owner_so_users_see_only_theirs(tmp_path: Path) -> None:
    rig = Rig(tmp_path / "db", MonitorPolicy(rules=()))
    held = rig.allocate("gpu:0", 1.0)
    rig.feed([5.0, 5.0, 5.0])  # a whole GPU held at 5 % use
    rig.clock.now += 3600  # past the 10 minutes an allocation must run, and the pass's 5-minute interval
    with rig.store.transaction():
        rig.broker.tick()
    (report,) = [e for e in rig.broker.take_outbox().events if e["kind"] == "optimise.report"]

    assert [(o["allocation_id"], o["owner_uid"]) for o in report["detail"]["oversized"]] == [(held["id"], 0)]
    assert event_for(Caller(uid=NOBODY, gid=NOBODY, pid=None), report)["detail"]["oversized"] == []
