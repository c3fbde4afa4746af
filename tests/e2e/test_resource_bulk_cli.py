"""`mcpctl resource add --from FILE`: many custom resources from a JSON array or JSON Lines, in lists."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mcpresd.protocol import MAX_ADD
from tests.conftest import DaemonProcess, as_json, cli, run_cli

pytestmark = pytest.mark.e2e


def names(daemon: DaemonProcess) -> set[str]:
    return {r["name"] for r in as_json(daemon, "resources")}


def test_a_json_lines_file_larger_than_one_list_is_registered_whole(daemon: DaemonProcess, tmp_path: Path) -> None:
    count = MAX_ADD + 500
    path = tmp_path / "slots.jsonl"
    path.write_text("".join(json.dumps({"name": f"slot:{i}", "capacity": 1, "unit": "slots"}) + "\n\n"
                            for i in range(count)))

    result = cli(daemon, "resource", "add", "--from", str(path))

    assert (result.returncode, result.stdout, result.stderr) == (0, f"added {count} resources\n", "")
    listed = {r["name"]: r for r in as_json(daemon, "resources")}
    assert {f"slot:{i}" for i in range(count)} <= listed.keys()
    assert listed[f"slot:{count - 1}"]["unit"] == "slots" and listed["slot:0"]["source"] == "api"


def test_a_json_array_from_stdin_with_json_output(daemon: DaemonProcess) -> None:
    entries = [{"name": "licence:cad", "capacity": 3, "cost_per_unit_hour": 2.5, "labels": {"vendor": "acme"}},
               {"name": "licence:cam", "capacity": 1}]

    result = run_cli("resource", "add", "--from", "-", "--json", socket_path=daemon.socket, input=json.dumps(entries))

    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"added": 2}
    cad = next(r for r in as_json(daemon, "resources") if r["name"] == "licence:cad")
    assert (cad["capacity"], cad["cost_per_unit_hour"], cad["labels"]) == (3, 2.5, {"vendor": "acme"})


def test_a_refused_entry_is_named_by_its_place_in_the_file_and_its_list_is_not_added(
        daemon: DaemonProcess, tmp_path: Path) -> None:
    entries = [{"name": f"seat:{i}", "capacity": 1} for i in range(MAX_ADD + 10)]
    entries[MAX_ADD + 3]["capacity"] = -1
    path = tmp_path / "seats.json"
    path.write_text(json.dumps(entries))

    result = cli(daemon, "resource", "add", "--from", str(path))

    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.startswith(f"mcpctl: --from {path}: entry {MAX_ADD + 4}: capacity must be greater than 0")
    assert f"(entries {MAX_ADD + 1}-{MAX_ADD + 10} were not added; {MAX_ADD} added before them)" in result.stderr
    present = names(daemon)
    assert "seat:0" in present and f"seat:{MAX_ADD - 1}" in present and f"seat:{MAX_ADD}" not in present


def test_a_taken_name_refuses_its_list(daemon: DaemonProcess, tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    path.write_text('{"name": "fresh", "capacity": 1}\n{"name": "licence", "capacity": 1}\n')

    result = cli(daemon, "resource", "add", "--from", str(path))

    assert result.returncode == 1
    assert "a resource named 'licence' already exists" in result.stderr
    assert "fresh" not in names(daemon)


@pytest.mark.parametrize(("content", "message"), [
    (None, "cannot read"),
    ("", "holds no resources"),
    ('{"name": "a", "capacity": 1}\n{"name": \n', "line 2 of"),
    ('[{"name": "a", "capacity": 1},', "is not a JSON array of resources"),
    ('["a"]', "entry 1 of"),
    ("{}\n42\n", "entry 2 of"),
])
def test_a_bad_file_is_a_usage_error_and_nothing_is_sent(daemon: DaemonProcess, tmp_path: Path,
                                                          content: str | None, message: str) -> None:
    path = tmp_path / "r.jsonl"
    if content is not None:
        path.write_text(content)
    before = names(daemon)

    result = cli(daemon, "resource", "add", "--from", str(path))

    assert result.returncode == 2
    assert message in result.stderr and result.stderr.startswith("mcpctl: --from")
    assert names(daemon) == before


@pytest.mark.parametrize("args", [["x", "--from", "f"], ["--capacity", "2", "--from", "f"],
                                  ["--label", "a=b", "--from", "f"], []], ids=" ".join)
def test_from_goes_alone_and_without_it_a_name_and_capacity_are_needed(daemon: DaemonProcess,
                                                                       args: list[str]) -> None:
    result = cli(daemon, "resource", "add", *args)

    assert result.returncode == 2
    assert result.stderr.startswith("mcpctl: ")


def test_the_documented_pipeline_registers_as_shown(daemon: DaemonProcess) -> None:
    """The example of `mcpctl resource add --help` and the README, as a shell runs it."""
    import os
    import subprocess
    import sys

    line = next(l for l in (Path(__file__).resolve().parents[2] / "README.md").read_text().splitlines()
                if "resource add --from -" in l).split("  #")[0]
    env = dict(os.environ, MCPRES_SOCKET=daemon.socket, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    done = subprocess.run(["bash", "-c", line], capture_output=True, text=True, env=env, timeout=60)

    assert (done.returncode, done.stdout, done.stderr) == (0, "added 1000 resources\n", "")
    assert {f"slot:{i}" for i in range(1, 1001)} <= names(daemon)
    help_text = cli(daemon, "resource", "add", "--help").stdout
    assert "sed 's/.*/{\"name\": \"slot:&\", \"capacity\": 1}/'" in help_text
