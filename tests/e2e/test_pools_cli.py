"""`mcpctl pools`, `pool ...` and `allocate --pool` as a user and a shell script run them, against a real daemon.

The shared test config has `licence` (2 seats, 1.5 per seat-hour) and `slot` (10 slots): the pools here are
carved from them.
"""

from __future__ import annotations

import re
from typing import Any

import pytest

from mcpctl import exitcodes
from tests.conftest import DaemonProcess, as_json, cli, ok, run_cli

pytestmark = pytest.mark.e2e

ANSI = re.compile(r"\x1b\[")
SEATS = ["pool", "create", "seats", "--factory", "slots", "--parent", "licence", "--slot-size", "1", "--min", "1",
         "--max", "2", "--cost", "1.5"]


def pool(daemon: DaemonProcess, name: str) -> dict[str, Any]:
    [found] = [p for p in as_json(daemon, "pools") if p["name"] == name]
    return found  # type: ignore[no-any-return]


@pytest.fixture
def seats(daemon: DaemonProcess) -> dict[str, Any]:
    """A slots pool of licence seats, one member made at once, at most two."""
    return as_json(daemon, *SEATS)  # type: ignore[no-any-return]


# -- create, list, show ---------------------------------------------------------------


def test_a_slots_pool_is_created_with_its_minimum_of_members(daemon: DaemonProcess, seats: dict[str, Any]) -> None:
    assert (seats["name"], seats["factory"], seats["state"]) == ("seats", "slots", "active")
    assert (seats["min"], seats["max"], seats["cost_per_unit_hour"]) == (1, 2, 1.5)
    assert (seats["parent"], seats["slot_size"]) == ("licence", 1)
    assert seats["size"] == 1
    listed = pool(daemon, "seats")
    assert (listed["size"], listed["busy"], listed["queued"]) == (1, 0, 0)
    [member] = listed["members"]
    assert (member["state"], member["parent"], member["allocations"]) == ("idle", "licence", [])


def test_pools_prints_a_table_row_per_pool(daemon: DaemonProcess, seats: dict[str, Any]) -> None:
    text = ok(daemon, "pools")

    header, row = text.splitlines()
    assert header.split()[:3] == ["NAME", "FACTORY", "STATE"]
    assert row.split()[:7] == ["seats", "slots", "active", "0/1", "0", "0%", "1..2"]
    assert row.split()[-1] == "1.50"


def test_pools_with_none_says_so_and_json_is_an_empty_list(daemon: DaemonProcess) -> None:
    assert "no pools" in ok(daemon, "pools")
    assert as_json(daemon, "pools") == []


def test_pool_show_lists_settings_and_members(daemon: DaemonProcess, seats: dict[str, Any]) -> None:
    text = ok(daemon, "pool", "show", "seats")

    assert re.search(r"^factory\s+slots: slots of 1 from licence$", text, re.MULTILINE), text
    assert re.search(r"^members\s+1 \(0 busy, 1 idle\), bounds 1\.\.2$", text, re.MULTILINE), text
    assert re.search(r"^cost\s+1\.50 per member-hour$", text, re.MULTILINE), text
    assert re.search(r"^scaling\s+up above 80%, down below 30%, target 70%", text, re.MULTILINE), text
    assert re.search(r"^seats/\S+\s+idle\s+-\s+licence\s", text, re.MULTILINE), text
    assert as_json(daemon, "pool", "show", "seats")["name"] == "seats"


def test_a_static_pool_serves_the_resources_named(daemon: DaemonProcess) -> None:
    created = as_json(daemon, "pool", "create", "fixed", "--factory", "static", "--member", "slot", "--label",
                      "team=ml")

    assert created["factory"] == "static"
    assert created["members_listed"] == ["slot"]
    assert created["labels"] == {"team": "ml"}
    assert [m["name"] for m in created["members"]] == ["slot"]
    assert "fixed" in ok(daemon, "pools").splitlines()[1].split()


def test_creating_a_pool_twice_exits_1(daemon: DaemonProcess, seats: dict[str, Any]) -> None:
    again = cli(daemon, *SEATS)

    assert again.returncode == exitcodes.ERROR
    assert again.stdout == ""
    assert "seats" in again.stderr


@pytest.mark.parametrize("args", [
    pytest.param(["pool", "create", "p", "--factory", "slots", "--parent", "licence", "--slot-size", "1"],
                 id="slots-without-max"),
    pytest.param(["pool", "create", "p", "--factory", "slots", "--parent", "licence", "--slot-size", "1", "--max",
                  "2", "--member", "slot"], id="members-on-a-slots-pool"),
    pytest.param(["pool", "create", "p", "--factory", "static"], id="static-without-members"),
    pytest.param(["pool", "create", "a,b", "--factory", "static", "--member", "slot"], id="name-with-a-comma"),
    pytest.param(["pool", "create", "p", "--factory", "slots", "--parent", "licence", "--slot-size", "1", "--max",
                  "2", "--strategy", "cost-optimised"], id="strategy-pools-do-not-take"),
    pytest.param(["pool", "create", "p", "--factory", "slots", "--parent", "licence", "--slot-size", "1", "--max",
                  "2", "--scale-up-at", "0.5", "--target", "0.7"], id="target-above-scale-up"),
])
def test_a_pool_the_daemon_refuses_exits_2_and_is_not_created(daemon: DaemonProcess, args: list[str]) -> None:
    result = cli(daemon, *args)

    assert result.returncode == exitcodes.USAGE, (result.stdout, result.stderr)
    assert result.stdout == ""
    assert result.stderr.strip()
    assert as_json(daemon, "pools") == []


@pytest.mark.parametrize(("options", "said"), [
    (["--slot-size", "1"], "pool 'p': max is required for slots pools"),
    (["--slot-size", "1", "--min", "3", "--max", "2"], "pool 'p': max must be a whole number >= 1 and >= min (3)"),
    (["--slot-size", "1", "--max", "2", "--scale-up-at", "0.5", "--target", "0.7"],
     "pool 'p': target must be below scale_up_at (0.5)"),
])
def test_a_refused_pool_is_explained_in_the_names_its_options_and_the_api_use(daemon: DaemonProcess,
                                                                             options: list[str], said: str) -> None:
    result = cli(daemon, "pool", "create", "p", "--factory", "slots", "--parent", "licence", *options)

    assert result.returncode == exitcodes.USAGE
    assert said in result.stderr
    assert not re.search(r"max_size|min_size|scale\.", result.stderr), result.stderr
    assert daemon.call("pools.list") == []


def test_creating_a_command_pool_says_its_first_members_are_still_being_made(daemon: DaemonProcess) -> None:
    said = ok(daemon, "pool", "create", "workers", "--factory", "command", "--create", "sleep 30; echo {}",
              "--min", "1", "--max", "1")

    assert said == "created pool workers (command, 1..1 members, 0 now, 1 being made)\n"
    assert pool(daemon, "workers")["members"] == []


def test_a_slots_pool_of_an_unknown_parent_exits_1(daemon: DaemonProcess) -> None:
    result = cli(daemon, "pool", "create", "p", "--factory", "slots", "--parent", "nosuch", "--slot-size", "1",
                 "--max", "2")

    assert result.returncode == exitcodes.ERROR
    assert "nosuch" in result.stderr


# -- allocate --pool --------------------------------------------------------------------


def test_allocate_pool_takes_a_whole_member_and_names_the_pool(daemon: DaemonProcess,
                                                               seats: dict[str, Any]) -> None:
    allocation = as_json(daemon, "allocate", "--pool", "seats")

    [item] = allocation["items"]
    assert item["resource"].startswith("seats/")
    assert allocation["pools"] == ["seats"]
    assert allocation["cost_per_hour"] == pytest.approx(1.5)
    assert allocation["request"]["resources"] == [{"resource": "pool:seats", "amount": 1}]
    listed = pool(daemon, "seats")
    assert listed["busy"] == 1
    [member] = [m for m in listed["members"] if m["name"] == item["resource"]]
    assert (member["state"], member["allocations"]) == ("busy", [allocation["id"]])


def test_allocate_pool_prints_the_id_alone(daemon: DaemonProcess, seats: dict[str, Any]) -> None:
    result = cli(daemon, "allocate", "--pool", "seats")

    assert result.returncode == 0, result.stderr
    assert re.fullmatch(r"[0-9a-f]{16}\n", result.stdout)


def test_allocate_pool_combines_with_other_resources(daemon: DaemonProcess, seats: dict[str, Any]) -> None:
    allocation = as_json(daemon, "allocate", "--pool", "seats", "--res", "slot=2", "--tool", "render")

    assert sorted(i["resource"].split("/")[0] for i in allocation["items"]) == ["seats", "slot"]
    assert allocation["tool_id"] == "render"


def test_a_queued_request_for_more_members_scales_the_pool_up(daemon: DaemonProcess) -> None:
    ok(daemon, "pool", "create", "seats", "--factory", "slots", "--parent", "licence", "--slot-size", "1", "--min",
       "1", "--max", "2", "--cooldown", "0")

    allocation = as_json(daemon, "allocate", "--pool", "sea*", "--members", "2", "--wait", "10s")

    assert len({i["resource"] for i in allocation["items"]}) == 2
    assert all(i["resource"].startswith("seats/") for i in allocation["items"])
    assert pool(daemon, "seats")["size"] == 2
    assert "pool.scaled_up" in [e["kind"] for e in as_json(daemon, "pool", "events", "seats")]


def test_objective_cost_takes_the_cheaper_of_two_pools(daemon: DaemonProcess) -> None:
    ok(daemon, "pool", "create", "dear", "--factory", "slots", "--parent", "slot", "--slot-size", "1", "--min", "1",
       "--max", "2", "--cost", "5")
    ok(daemon, "pool", "create", "cheap", "--factory", "slots", "--parent", "licence", "--slot-size", "1", "--min",
       "1", "--max", "2", "--cost", "1")

    by_cost = as_json(daemon, "allocate", "--pool", "dear,cheap", "--objective", "cost")
    in_order = as_json(daemon, "allocate", "--pool", "dear,cheap")

    assert by_cost["pools"] == ["cheap"]
    assert by_cost["request"]["objective"] == "cost"
    assert in_order["pools"] == ["dear"]


def test_asking_for_an_unknown_pool_exits_1_with_one_hint(daemon: DaemonProcess) -> None:
    result = cli(daemon, "allocate", "--pool", "nosuch")

    assert result.returncode == exitcodes.ERROR
    assert result.stdout == ""
    assert "nosuch" in result.stderr
    assert result.stderr.count("mcpctl pools") == 1, result.stderr


@pytest.mark.parametrize("args", [
    pytest.param(["allocate", "--members", "2", "--res", "slot=1"], id="members-without-pool"),
    pytest.param(["allocate", "--objective", "cost", "--res", "slot=1"], id="objective-without-pool"),
    pytest.param(["allocate", "--pool", "seats", "--objective", "cheapest"], id="unknown-objective"),
    pytest.param(["allocate", "--pool", "seats", "--members", "0"], id="no-members"),
    pytest.param(["run", "--pool", "seats", "--members", "1.5", "--", "true"], id="run-half-a-member"),
])
def test_bad_pool_options_exit_2_and_allocate_nothing(daemon: DaemonProcess, seats: dict[str, Any],
                                                      args: list[str]) -> None:
    result = cli(daemon, *args)

    assert result.returncode == exitcodes.USAGE, (result.stdout, result.stderr)
    assert result.stdout == ""
    assert as_json(daemon, "allocations", "--all") == []


def test_run_with_a_pool_gives_the_command_a_member(daemon: DaemonProcess, seats: dict[str, Any]) -> None:
    result = cli(daemon, "run", "--pool", "seats", "--", "sh", "-c", 'echo "$MCPRES_ALLOCATION_ID"')

    assert result.returncode == 0, result.stderr
    [after] = as_json(daemon, "allocations", result.stdout.strip())
    assert after["pools"] == ["seats"]
    assert after["state"] == "released"
    assert pool(daemon, "seats")["busy"] == 0


# -- drain, undrain, delete, events ------------------------------------------------------


def test_a_drained_pool_grants_nothing_until_undrained(daemon: DaemonProcess, seats: dict[str, Any]) -> None:
    assert ok(daemon, "pool", "drain", "seats").strip() in ("pool seats: draining", "pool seats: drained")
    assert pool(daemon, "seats")["state"] in ("draining", "drained")

    refused = cli(daemon, "allocate", "--pool", "seats")
    assert refused.returncode == exitcodes.ERROR
    assert "seats" in refused.stderr
    assert as_json(daemon, "allocations") == []

    assert ok(daemon, "pool", "undrain", "seats").strip() == "pool seats: active"
    assert as_json(daemon, "allocate", "--pool", "seats")["pools"] == ["seats"]


def test_draining_keeps_allocations_and_delete_waits_for_them(daemon: DaemonProcess, seats: dict[str, Any]) -> None:
    held = ok(daemon, "allocate", "--pool", "seats").strip()

    draining = as_json(daemon, "pool", "drain", "seats")
    assert draining["state"] == "draining"
    assert [a["id"] for a in as_json(daemon, "allocations")] == [held]
    refused = cli(daemon, "pool", "delete", "seats")
    assert refused.returncode == exitcodes.ERROR
    assert "seats" in refused.stderr

    ok(daemon, "release", held)
    assert ok(daemon, "pool", "delete", "seats").strip() == "deleted pool seats"
    assert as_json(daemon, "pools") == []


def test_an_unknown_pool_exits_1_for_every_pool_command(daemon: DaemonProcess) -> None:
    for command in ("show", "drain", "undrain", "delete", "events"):
        result = cli(daemon, "pool", command, "nosuch")
        assert result.returncode == exitcodes.ERROR, (command, result.stderr)
        assert "nosuch" in result.stderr


def test_pool_events_show_what_happened_and_why(daemon: DaemonProcess, seats: dict[str, Any]) -> None:
    ok(daemon, "pool", "drain", "seats")

    events = as_json(daemon, "pool", "events", "seats")
    text = ok(daemon, "pool", "events", "seats")

    kinds = [e["kind"] for e in events]
    assert kinds[0] == "pool.created"
    assert "pool.draining" in kinds
    assert all({"id", "ts", "kind", "detail"} <= e.keys() for e in events)
    scaled = [e for e in events if e["detail"].get("reason")]
    assert scaled, events
    header, *rows = text.splitlines()
    assert header.split() == ["TIME", "EVENT", "REASON", "DETAIL"]
    assert len(rows) == len(events)
    assert "asked to drain" in text
    assert as_json(daemon, "pool", "events", "seats", "--limit", "1") == events[-1:]


# -- output ---------------------------------------------------------------------------------


@pytest.mark.parametrize("args", [["pools"], ["pool", "show", "seats"], ["pool", "events", "seats"]], ids=" ".join)
def test_pool_commands_on_a_pipe_print_plain_text(daemon: DaemonProcess, seats: dict[str, Any],
                                                  args: list[str]) -> None:
    result = cli(daemon, *args, env={"TERM": "xterm-256color", "COLUMNS": "200"})

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    assert not ANSI.search(result.stdout)


@pytest.mark.parametrize("path", [["pools"], ["pool"], ["pool", "create"], ["pool", "show"], ["pool", "drain"],
                                  ["pool", "undrain"], ["pool", "delete"], ["pool", "events"]], ids=" ".join)
def test_pool_help_shows_examples(path: list[str]) -> None:
    result = run_cli(*path, "--help")

    assert result.returncode == 0, result.stderr
    assert "mcpctl pool" in result.stdout
    if path != ["pool"]:
        assert "Example" in result.stdout


def test_allocate_help_documents_the_pool_options() -> None:
    text = " ".join(run_cli("allocate", "--help").stdout.split())

    for needle in ("--pool NAMES", "--members N", "--objective", "cost|performance|latency|utilisation|balanced"):
        assert needle in text, needle
