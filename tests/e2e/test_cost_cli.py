"""Cost, budgets and accounting from the shell: `resource set-cost`, `budget`, `budgets`, `usage`, `recommend`,
`optimise`, and what `run` and `release --measured` report, against a real daemon.

The shared test config's `licence` costs 1.5 per seat-hour; `slot` has no cost.
"""

from __future__ import annotations

import os
import pwd
import re
import sys
import time
from typing import Any

import pytest

from mcpctl import exitcodes
from tests.conftest import DaemonProcess, as_json, cli, ok, run_cli

pytestmark = pytest.mark.e2e

ANSI = re.compile(r"\x1b\[")
ME = pwd.getpwuid(os.getuid()).pw_name
BUDGET_FIELDS = {"scope", "subject", "period", "limit", "soft", "spent", "remaining", "fraction", "state",
                 "period_start", "period_end"}
USAGE_FIELDS = {"allocations", "active", "resource_hours", "cost", "waited_s", "mean_wait_s", "requested",
                "measured", "efficiency"}
ALLOCATES_64M = [sys.executable, "-c", "b = bytearray(64 << 20); sum(range(200_000))"]


def resource(daemon: DaemonProcess, name: str) -> dict[str, Any]:
    [found] = [r for r in as_json(daemon, "resources") if r["name"] == name]
    return found  # type: ignore[no-any-return]


def held_briefly(daemon: DaemonProcess, *request: str, measured: str | None = None) -> str:
    """Allocate, hold for a moment, release (reporting `measured`); the allocation's id."""
    allocation_id = ok(daemon, "allocate", *request).strip()
    granted_at = daemon.call("allocations.get", {"id": allocation_id})["granted_at"]
    deadline = time.monotonic() + 30
    while time.time() < granted_at + 0.2:  # held 0.2 s by the daemon's grant time (the host's one clock)
        assert time.monotonic() < deadline
        time.sleep(0.01)
    ok(daemon, "release", allocation_id, *(["--measured", measured] if measured else []))
    return allocation_id


# -- cost ---------------------------------------------------------------------------


def test_set_cost_sets_and_clears_a_resources_cost(daemon: DaemonProcess) -> None:
    assert ok(daemon, "resource", "set-cost", "slot", "0.25").strip() == "slot: 0.25 per slot-hour"
    assert resource(daemon, "slot")["cost_per_unit_hour"] == 0.25

    cleared = as_json(daemon, "resource", "set-cost", "slot", "none")

    assert cleared["cost_per_unit_hour"] is None
    assert resource(daemon, "slot")["cost_per_unit_hour"] is None
    assert ok(daemon, "resource", "set-cost", "slot", "none").strip() == "slot: no cost"


def test_a_new_cost_applies_to_later_grants_only(daemon: DaemonProcess) -> None:
    before = as_json(daemon, "allocate", "--res", "slot=2")
    ok(daemon, "resource", "set-cost", "slot", "0.5")
    after = as_json(daemon, "allocate", "--res", "slot=2")

    assert before["cost_per_hour"] in (0, None)
    assert after["cost_per_hour"] == pytest.approx(1.0)


@pytest.mark.parametrize(("args", "code"), [
    (["resource", "set-cost", "nosuch", "1"], exitcodes.ERROR),
    (["resource", "set-cost", "slot", "cheap"], exitcodes.USAGE),
    (["resource", "set-cost", "slot", "nan"], exitcodes.USAGE),
], ids=lambda v: " ".join(v) if isinstance(v, list) else str(v))
def test_set_cost_refuses_unknown_resources_and_bad_costs(daemon: DaemonProcess, args: list[str], code: int) -> None:
    result = cli(daemon, *args)

    assert result.returncode == code, result.stderr
    assert result.stdout == ""
    assert result.stderr.strip()


def test_allocations_show_the_cost_so_far_and_the_rate(daemon: DaemonProcess) -> None:
    allocation = as_json(daemon, "allocate", "--res", "licence=1")
    assert allocation["cost_per_hour"] == pytest.approx(1.5)
    assert allocation["pools"] == []

    header, row = ok(daemon, "allocations").splitlines()

    assert header.split()[-1] == "COST"
    assert row.endswith("(1.50/h)"), row
    [listed] = as_json(daemon, "allocations")
    assert listed["cost"] is not None and listed["cost"] >= 0


# -- budgets -------------------------------------------------------------------------


def test_budget_set_then_budgets_lists_it(daemon: DaemonProcess) -> None:
    text = ok(daemon, "budget", "set", "--tool", "train", "--limit", "10", "--period", "day")
    [budget] = as_json(daemon, "budgets")

    assert text.startswith("budget tool train: 10.00 per day")
    assert BUDGET_FIELDS <= budget.keys()
    assert (budget["scope"], budget["subject"], budget["period"], budget["limit"]) == ("tool", "train", "day", 10)
    assert (budget["soft"], budget["spent"], budget["state"]) == (0.8, 0, "ok")
    assert budget["period_start"] <= time.time() < budget["period_end"]
    header, row = ok(daemon, "budgets").splitlines()
    assert header.split() == ["SCOPE", "SUBJECT", "PERIOD", "SPENT/LIMIT", "USED", "STATE", "RESETS"]
    assert row.split()[:6] == ["tool", "train", "day", "0.00/10.00", "0%", "ok"]


def test_an_owner_budget_takes_a_user_name_and_stores_the_uid(daemon: DaemonProcess) -> None:
    budget = as_json(daemon, "budget", "set", "--owner", ME, "--limit", "5", "--period", "week", "--soft", "0.5")

    assert (budget["scope"], budget["subject"], budget["soft"]) == ("owner", str(os.getuid()), 0.5)
    assert f"{os.getuid()} ({ME})" in ok(daemon, "budgets")


def test_a_spent_budget_refuses_new_allocations_with_exit_1(daemon: DaemonProcess) -> None:
    ok(daemon, "budget", "set", "--tool", "sim", "--limit", "0.000001", "--period", "day")
    held_briefly(daemon, "--res", "licence=1", "--tool", "sim")

    refused = cli(daemon, "allocate", "--res", "licence=1", "--tool", "sim")
    other_tool = cli(daemon, "allocate", "--res", "licence=1", "--tool", "render")

    assert refused.returncode == exitcodes.ERROR
    assert refused.stdout == ""
    assert "sim" in refused.stderr
    assert refused.stderr.count("mcpctl budgets") == 1, refused.stderr
    assert other_tool.returncode == 0, other_tool.stderr
    [budget] = as_json(daemon, "budgets")
    assert budget["state"] == "exceeded"
    assert budget["spent"] > budget["limit"]


def test_a_pool_budget_covers_allocations_from_the_pool(daemon: DaemonProcess) -> None:
    ok(daemon, "pool", "create", "seats", "--factory", "slots", "--parent", "licence", "--slot-size", "1", "--min",
       "1", "--max", "2", "--cost", "3")
    ok(daemon, "budget", "set", "--pool", "seats", "--limit", "0.000001", "--period", "month")
    held_briefly(daemon, "--pool", "seats")

    refused = cli(daemon, "allocate", "--pool", "seats")

    assert refused.returncode == exitcodes.ERROR, refused.stderr
    assert [b["state"] for b in as_json(daemon, "budgets")] == ["exceeded"]


def test_budget_delete_removes_it(daemon: DaemonProcess) -> None:
    ok(daemon, "budget", "set", "--tool", "train", "--limit", "10", "--period", "day")
    ok(daemon, "budget", "set", "--tool", "train", "--limit", "50", "--period", "week")

    assert ok(daemon, "budget", "delete", "--tool", "train", "--period", "day").strip() == \
        "deleted budget tool train per day"

    assert [(b["subject"], b["period"]) for b in as_json(daemon, "budgets")] == [("train", "week")]
    again = cli(daemon, "budget", "delete", "--tool", "train", "--period", "day")
    assert again.returncode != 0
    assert again.stderr.strip()


@pytest.mark.parametrize("args", [
    pytest.param(["budget", "set", "--limit", "1", "--period", "day"], id="covers-nothing"),
    pytest.param(["budget", "set", "--tool", "a", "--owner", "0", "--limit", "1", "--period", "day"],
                 id="covers-two"),
    pytest.param(["budget", "set", "--tool", "a", "--limit", "-1", "--period", "day"], id="negative-limit"),
    pytest.param(["budget", "set", "--tool", "a", "--limit", "1", "--period", "fortnight"], id="unknown-period"),
    pytest.param(["budget", "set", "--tool", "a", "--limit", "1", "--period", "day", "--soft", "0"], id="soft-zero"),
    pytest.param(["budget", "set", "--owner", "no-such-user-here", "--limit", "1", "--period", "day"],
                 id="unknown-user"),
    pytest.param(["budget", "delete", "--tool", "a"], id="delete-without-period"),
])
def test_bad_budget_options_exit_2(daemon: DaemonProcess, args: list[str]) -> None:
    result = cli(daemon, *args)

    assert result.returncode == exitcodes.USAGE, (result.stdout, result.stderr)
    assert result.stdout == ""
    assert as_json(daemon, "budgets") == []


# -- usage -------------------------------------------------------------------------------


def test_usage_json_accounts_per_tool_with_totals(daemon: DaemonProcess) -> None:
    held_briefly(daemon, "--res", "licence=1", "--cpu", "1", "--tool", "train")
    held_briefly(daemon, "--res", "licence=1", "--tool", "train")
    held_briefly(daemon, "--res", "slot=1", "--tool", "render")

    result = as_json(daemon, "usage", "--since", "1h")

    assert result["by"] == "tool"
    assert result["until"] - result["since"] == pytest.approx(3600, abs=5)
    rows = {row["key"]: row for row in result["rows"]}
    assert set(rows) == {"train", "render"}
    assert all(USAGE_FIELDS <= row.keys() for row in rows.values())
    assert (rows["train"]["allocations"], rows["render"]["allocations"]) == (2, 1)
    assert rows["train"]["resource_hours"]["custom"] > 0
    assert rows["train"]["resource_hours"]["cpu"] > 0
    assert rows["train"]["cost"] > 0
    assert rows["render"]["cost"] == 0
    assert result["totals"]["allocations"] == 3
    assert result["totals"]["cost"] == pytest.approx(rows["train"]["cost"], abs=1e-6)


def test_usage_prints_a_row_per_key_and_a_total(daemon: DaemonProcess) -> None:
    held_briefly(daemon, "--res", "licence=1", "--tool", "train")

    header, row, total = ok(daemon, "usage").splitlines()

    assert header.split()[:3] == ["KEY", "ALLOCS", "RESOURCE-HOURS"]
    assert row.split()[:3] == ["train", "1", "custom"]
    assert total.split()[:2] == ["TOTAL", "1"]


def test_usage_by_owner_names_the_user(daemon: DaemonProcess) -> None:
    held_briefly(daemon, "--res", "slot=1")

    assert [r["key"] for r in as_json(daemon, "usage", "--by", "owner")["rows"]] == [str(os.getuid())]
    assert f"{os.getuid()} ({ME})" in ok(daemon, "usage", "--by", "owner")


@pytest.mark.parametrize("by, key", [("resource", "licence"), ("pool", "seats")])
def test_usage_by_resource_and_by_pool(daemon: DaemonProcess, by: str, key: str) -> None:
    ok(daemon, "pool", "create", "seats", "--factory", "slots", "--parent", "licence", "--slot-size", "1", "--min",
       "1", "--max", "2", "--cost", "3")
    held_briefly(daemon, "--res", "licence=1")
    held_briefly(daemon, "--pool", "seats")

    keys = [r["key"] for r in as_json(daemon, "usage", "--by", by)["rows"]]

    assert key in keys


def test_usage_by_resource_counts_an_allocation_once_in_its_total(daemon: DaemonProcess) -> None:
    held_briefly(daemon, "--res", "licence=1", "--res", "slot=1", "--cpu", "1")
    held_briefly(daemon, "--res", "licence=1", "--res", "slot=1")

    result = as_json(daemon, "usage", "--by", "resource")

    assert sorted((r["key"], r["allocations"]) for r in result["rows"]) == [("cpu", 1), ("licence", 2), ("slot", 2)]
    assert result["totals"]["allocations"] == 2
    assert ok(daemon, "usage", "--by", "resource").splitlines()[-1].split()[:2] == ["TOTAL", "2"]


def test_usage_with_nothing_says_so(daemon: DaemonProcess) -> None:
    assert ok(daemon, "usage").startswith("no allocations in the last")
    assert as_json(daemon, "usage")["rows"] == []


# -- what was used: release --measured, run --------------------------------------------------


def test_release_measured_is_kept_with_the_allocation(daemon: DaemonProcess) -> None:
    allocation_id = held_briefly(daemon, "--cpu", "2", "--mem", "1G", "--tool", "sim",
                                 measured="cpu_seconds=0.2,memory_peak=300M")

    [released] = as_json(daemon, "allocations", allocation_id)

    assert released["measured"] == {"cpu_seconds": 0.2, "memory_peak": 300 << 20}


def test_release_measured_that_is_malformed_exits_2_and_releases_nothing(daemon: DaemonProcess) -> None:
    allocation_id = ok(daemon, "allocate", "--res", "slot=1").strip()

    result = cli(daemon, "release", allocation_id, "--measured", "cpu_seconds=lots")

    assert result.returncode == exitcodes.USAGE
    assert [a["id"] for a in as_json(daemon, "allocations")] == [allocation_id]


def test_run_reports_what_the_command_used(daemon: DaemonProcess) -> None:
    result = cli(daemon, "run", "--cpu", "1", "--mem", "256M", "--tool", "sim", "--", "sh", "-c",
                 f'echo "$MCPRES_ALLOCATION_ID"; {" ".join(map(repr, ALLOCATES_64M))}')
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""

    [released] = as_json(daemon, "allocations", result.stdout.strip())

    assert released["state"] == "released"
    measured = released["measured"] or {}
    assert measured.get("memory_peak", 0) >= 64 << 20, released
    assert measured.get("cpu_seconds", 0) > 0, released


# -- recommend -----------------------------------------------------------------------------------


def test_recommend_after_a_few_runs_suggests_an_allocate_line(daemon: DaemonProcess) -> None:
    for _ in range(3):
        done = cli(daemon, "run", "--cpu", "2", "--mem", "1G", "--tool", "sim", "--", *ALLOCATES_64M)
        assert done.returncode == 0, done.stderr

    result = as_json(daemon, "recommend", "sim")
    text = ok(daemon, "recommend", "sim")

    assert (result["tool_id"], result["runs"], result["enough"]) == ("sim", 3, True)
    assert {"cpu", "memory"} <= result["evidence"].keys()
    memory = result["evidence"]["memory"]
    assert memory["samples"] == 3
    assert memory["requested_p50"] == 1 << 30
    assert 64 << 20 <= memory["p50"] < 1 << 30
    assert result["recommendation"]["memory"] < 1 << 30
    assert "--mem" in result["args"]
    assert text.splitlines()[0] == "mcpctl allocate " + " ".join(result["args"])
    assert "too few" not in text


def test_recommend_from_reported_releases(daemon: DaemonProcess) -> None:
    for _ in range(4):
        held_briefly(daemon, "--cpu", "2", "--mem", "1G", "--tool", "sim", measured="cpu_seconds=0.05,memory_peak=300M")

    result = as_json(daemon, "recommend", "sim", "--runs", "3")
    text = ok(daemon, "recommend", "sim")

    assert (result["runs"], result["enough"]) == (3, True)
    assert result["evidence"]["memory"]["p95"] == 300 << 20
    assert result["evidence"]["cpu"]["requested_p50"] == 2
    first, *rest = text.splitlines()
    assert re.fullmatch(r"mcpctl allocate --cpu \S+ --mem \S+ --ttl \S+", first), first
    assert any(line.split()[:3] == ["memory", "1G", "300M"] for line in rest), text


def test_recommend_with_too_few_runs_says_so(daemon: DaemonProcess) -> None:
    held_briefly(daemon, "--cpu", "1", "--tool", "sim", measured="cpu_seconds=0.1")

    result = as_json(daemon, "recommend", "sim")
    text = ok(daemon, "recommend", "sim")

    assert (result["runs"], result["enough"]) == (1, False)
    assert "too few" in text
    assert ok(daemon, "recommend", "never-ran") == "no recommendation for never-ran: no measured runs\n"


# -- optimise --------------------------------------------------------------------------------------


def test_optimise_reports_and_changes_nothing(daemon: DaemonProcess) -> None:
    held = ok(daemon, "allocate", "--res", "slot=1").strip()
    before = as_json(daemon, "allocations")

    result = as_json(daemon, "optimise")
    text = ok(daemon, "optimise")

    assert {"ts", "oversized", "consolidate"} <= result.keys()
    assert isinstance(result["oversized"], list) and isinstance(result["consolidate"], list)
    assert "nothing" in text and "report only" in text
    assert as_json(daemon, "allocations") == before
    assert [a["id"] for a in before] == [held]
    assert as_json(daemon, "optimize").keys() == result.keys()


def test_optimise_names_an_idle_pool_that_could_shrink(daemon: DaemonProcess) -> None:
    ok(daemon, "pool", "create", "fixed", "--factory", "static", "--member", "licence", "--member", "slot")

    result = as_json(daemon, "optimise")
    text = ok(daemon, "optimise")

    [entry] = result["consolidate"]
    assert (entry["pool"], entry["size"], entry["busy"]) == ("fixed", 2, 0)
    assert entry["could_remove"] >= 1
    assert "Pools that could be smaller:" in text
    assert text.rstrip().endswith("report only: nothing was changed, moved or released")
    assert [p["size"] for p in as_json(daemon, "pools")] == [2]


# -- output and help ----------------------------------------------------------------------------------


@pytest.mark.parametrize("args", [["budgets"], ["usage"], ["recommend", "sim"], ["optimise"]], ids=" ".join)
def test_cost_commands_on_a_pipe_print_plain_text(daemon: DaemonProcess, args: list[str]) -> None:
    ok(daemon, "budget", "set", "--tool", "sim", "--limit", "10", "--period", "day")
    held_briefly(daemon, "--cpu", "1", "--tool", "sim", measured="cpu_seconds=0.1")

    result = cli(daemon, *args, env={"TERM": "xterm-256color", "COLUMNS": "200"})

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    assert not ANSI.search(result.stdout)


@pytest.mark.parametrize("path", [["resource", "set-cost"], ["budget", "set"], ["budget", "delete"], ["budgets"],
                                  ["usage"], ["recommend"], ["optimise"], ["release"], ["run"]], ids=" ".join)
def test_cost_command_help_shows_examples(path: list[str]) -> None:
    result = run_cli(*path, "--help")

    assert result.returncode == 0, result.stderr
    assert "Example" in result.stdout
    assert f"mcpctl {path[0]}" in result.stdout


def test_optimise_help_says_it_only_reports_and_optimize_is_an_alias() -> None:
    text = " ".join(run_cli("optimise", "--help").stdout.split())

    assert "Changes nothing" in text and "only reports" in text
    assert run_cli("optimize", "--help").returncode == 0
    assert "optimize" not in run_cli("--help").stdout
