"""`mcpctl` in shell scripts and pipelines: closed stdouts, `eval` of `--env`, and output scripts can read."""

from __future__ import annotations

import datetime
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import H100_UUID, DaemonProcess, as_json, cli, ok, run_cli
from tests.e2e.test_cli import _command_paths

pytestmark = pytest.mark.e2e

BIN = Path(sys.executable).parent
MCPCTL = str(BIN / "mcpctl")
TYPER_PATH = "import sys; from mcpctl.app import run_app; raise SystemExit(run_app(sys.argv[1:]))"
ENTRY_POINTS = {"fast path": [MCPCTL], "Typer path": [sys.executable, "-c", TYPER_PATH]}


def env_for(daemon: DaemonProcess) -> dict[str, str]:
    return dict(os.environ, MCPRES_SOCKET=daemon.socket, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")


def many_events(daemon: DaemonProcess, pairs: int = 600) -> None:
    """Enough events that their listing is far larger than a pipe's 64 KiB buffer."""
    with daemon.client() as client:
        for _ in range(pairs):
            allocation = client.call("allocate", {"resources": [{"resource": "slot", "amount": 1}], "holder_pid": 1})
            client.call("release", {"id": allocation["id"]})


def run_into_closed_pipe(daemon: DaemonProcess, command: list[str], read: int) -> subprocess.CompletedProcess[bytes]:
    """Run `command` with its stdout a pipe whose reader reads `read` bytes and then closes it, as `| head -c`."""
    reader, writer = os.pipe()
    try:
        proc = subprocess.Popen(command, stdout=writer, stderr=subprocess.PIPE, env=env_for(daemon))
    finally:
        os.close(writer)
    try:
        got = b""
        while len(got) < read:
            chunk = os.read(reader, read - len(got))
            if not chunk:
                break
            got += chunk
    finally:
        os.close(reader)
    _, stderr = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(command, proc.returncode, got, stderr)


# -- 1. a closed stdout -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("args", [["events", "--limit", "10000", "--json"], ["events", "--limit", "10000"],
                                  ["allocations", "--all", "--limit", "10000", "--json"]])
def test_a_listing_whose_reader_stops_early_exits_0_without_a_traceback(daemon: DaemonProcess,
                                                                        args: list[str]) -> None:
    many_events(daemon)

    result = run_into_closed_pipe(daemon, [MCPCTL, *args], read=10)

    assert len(result.stdout) == 10
    assert result.stderr == b""
    assert result.returncode == 0


def test_a_failing_command_into_a_closed_pipe_keeps_its_own_exit_status(daemon: DaemonProcess) -> None:
    result = run_into_closed_pipe(daemon, [MCPCTL, "allocations", "nosuch", "--json"], read=10)

    assert result.returncode == 1
    assert b"Traceback" not in result.stderr and b"nosuch" in result.stderr


def test_output_that_cannot_be_written_is_an_error_not_a_traceback(daemon: DaemonProcess) -> None:
    many_events(daemon, 100)
    with open("/dev/full", "wb") as full:
        result = subprocess.run([MCPCTL, "events", "--limit", "10000"], stdout=full, stderr=subprocess.PIPE,
                                env=env_for(daemon), timeout=60)

    assert result.returncode == 1
    assert result.stderr.decode() == "mcpctl: could not write to stdout: No space left on device\n"


@pytest.mark.parametrize("path", ENTRY_POINTS)
@pytest.mark.parametrize("output", [[], ["--json"], ["--env"]])
def test_an_allocation_whose_id_found_no_reader_is_released(daemon: DaemonProcess, path: str,
                                                            output: list[str]) -> None:
    result = run_into_closed_pipe(daemon, [*ENTRY_POINTS[path], "allocate", "--cpu", "1", *output], read=0)

    assert result.returncode == 1, result.stderr
    assert b"Traceback" not in result.stderr
    assert b"(its reader is gone); released it" in result.stderr
    assert as_json(daemon, "allocations") == []


@pytest.mark.parametrize("path", ENTRY_POINTS)
def test_an_allocation_with_stdout_closed_is_released(daemon: DaemonProcess, path: str) -> None:
    command = " ".join(f"'{part}'" for part in ENTRY_POINTS[path])
    result = subprocess.run(["bash", "-c", f"{command} allocate --cpu 1 >&-"], capture_output=True, text=True,
                            env=env_for(daemon), timeout=60)

    assert result.returncode == 1, result.stderr
    assert "(stdout is closed); released it" in result.stderr
    assert as_json(daemon, "allocations") == []


# -- 2. eval "$(mcpctl allocate --env)" ------------------------------------------------------------------------

SHELLS = ["bash", "dash", "zsh"]


@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.parametrize("eval_line, code", [
    pytest.param('set -e; eval "$(mcpctl allocate --gpu 1 --env)"', 3, id="set-e-busy"),
    pytest.param('eval "$(mcpctl allocate --gpu 1 --env)" || exit', 3, id="or-exit-busy"),
    pytest.param('set -e; eval "$(mcpctl allocate --cpu abc --env)"', 2, id="set-e-bad-value"),
    pytest.param('set -e; eval "$(mcpctl allocate --gpu 1 --env --bogus)"', 2, id="set-e-unknown-option"),
])
def test_a_failed_allocation_fails_the_eval_of_its_env_in_every_shell(daemon: DaemonProcess, shell: str,
                                                                      eval_line: str, code: int) -> None:
    busy = daemon.call("allocate", {"resources": [{"resource": "gpu", "amount": 1}], "holder_pid": os.getpid()})
    script = f'{eval_line}; echo "ran with CUDA_VISIBLE_DEVICES=${{CUDA_VISIBLE_DEVICES:-}}"'

    result = subprocess.run([shell, "-c", script], capture_output=True, text=True, env=env_for(daemon), timeout=60)

    assert result.returncode == code, result.stderr
    assert result.stdout == ""
    assert result.stderr.startswith(("mcpctl: ", "Usage: "))
    assert [a["id"] for a in as_json(daemon, "allocations")] == [busy["id"]]


@pytest.mark.parametrize("shell", SHELLS)
def test_a_granted_allocation_is_exported_by_eval_in_every_shell(daemon: DaemonProcess, shell: str) -> None:
    script = 'set -e; eval "$(mcpctl allocate --gpu 1 --env)"; echo "$CUDA_VISIBLE_DEVICES $MCPRES_ALLOCATION_ID"'

    result = subprocess.run([shell, "-c", script], capture_output=True, text=True, env=env_for(daemon), timeout=60)

    assert result.returncode == 0, result.stderr
    visible, allocation_id = result.stdout.split()
    assert visible == H100_UUID
    assert as_json(daemon, "allocations", "--all")[0]["id"] == allocation_id


# -- 3, 4. capacity errors as people read them, and the pools that hold a share ------------------------------


def test_a_memory_shortfall_is_said_in_sizes_not_bytes(daemon: DaemonProcess) -> None:
    [memory] = [r for r in as_json(daemon, "resources") if r["name"] == "memory"]
    daemon.call("allocate", {"resources": [{"resource": "memory", "amount": memory["capacity"] - (3 << 29)}],
                             "holder_pid": os.getpid()})

    result = cli(daemon, "allocate", "--mem", "8G")

    assert result.returncode == 3
    assert "(memory: asked 8G, free 1.5G)" in result.stderr, result.stderr
    assert "e+" not in result.stderr


def test_a_pool_holding_the_cpus_is_shown_by_resources_and_named_by_the_refusal(daemon: DaemonProcess) -> None:
    """As on a 2-core host after `pool create builds --slot-size 2 --min 1`: the slots hold every core."""
    [cpu] = [r for r in as_json(daemon, "resources") if r["name"] == "cpu"]
    cores = f"{cpu['capacity']:g}"
    ok(daemon, "pool", "create", "builds", "--factory", "slots", "--parent", "cpu", "--slot-size", cores,
       "--min", "1", "--max", "1")

    refused = cli(daemon, "allocate", "--cpu", "1")

    assert refused.returncode == 3
    assert f"(cpu: asked 1, free 0, pool builds holds {cores})" in refused.stderr, refused.stderr
    assert "`mcpctl pools`" in refused.stderr
    assert as_json(daemon, "allocations") == []
    [listed] = [r for r in as_json(daemon, "resources") if r["name"] == "cpu"]
    assert listed["pools"] == {"builds": cpu["capacity"]}
    table = ok(daemon, "resources").splitlines()
    assert table[0].split() == ["NAME", "TYPE", "CAPACITY", "ALLOCATED", "FREE", "POOLS", "DETAILS"]
    [row] = [line for line in table if line.startswith("cpu ")]
    assert f"builds {cores} cores" in row


# -- 5. what people read -------------------------------------------------------------------------------------


def example_lines(path: tuple[str, ...]) -> list[str]:
    """The command lines of a command's help examples, as its docstring writes them (a `\\` line joins the next)."""
    from mcpctl.app import app
    import typer

    command = typer.main.get_command(app)
    for name in path:
        command = command.commands[name]
    lines, examples = (command.help or "").splitlines(), []
    for index, line in enumerate(lines):
        text = line.strip()
        starts_a_command = text.startswith(("mcpctl ", "id=$(", "eval ", "out=$("))
        if line.startswith("  ") and starts_a_command or text.startswith(("Example: ", "Examples: ")):
            examples.append(text)
    return examples


@pytest.mark.parametrize("path", _command_paths(), ids=" ".join)
def test_help_examples_are_not_rewrapped_mid_command(path: tuple[str, ...]) -> None:
    result = run_cli(*path, "--help", env={"COLUMNS": "80"})
    assert result.returncode == 0, result.stderr
    shown = [line.strip() for line in result.stdout.splitlines()]

    for example in example_lines(path):
        if example.startswith(("Example: ", "Examples: ")):
            commands = [c for c in example.split(": ", 1)[1].rstrip(";").split("; ") if c.startswith("mcpctl")]
            assert all(command in shown for command in commands), (commands, result.stdout)
        else:
            assert example in shown, (example, result.stdout)


def test_the_man_pages_are_those_the_cli_writes(tmp_path: Path) -> None:
    """docs/man is generated (`python -m mcpctl.man docs/man`): it may not drift from the CLI."""
    done = subprocess.run([sys.executable, "-m", "mcpctl.man", str(tmp_path)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    committed = Path(__file__).resolve().parents[2] / "docs" / "man"

    assert sorted(p.name for p in committed.glob("*.1")) == sorted(p.name for p in tmp_path.glob("*.1"))
    for written in tmp_path.glob("*.1"):
        assert (committed / written.name).read_text() == written.read_text(), f"regenerate {written.name}"
    assert {"mcpctl.1", "mcpctl-allocate.1", "mcpctl-pool-create.1"} <= {p.name for p in tmp_path.glob("*.1")}


def test_a_man_page_renders_with_its_examples_line_by_line() -> None:
    page = Path(__file__).resolve().parents[2] / "docs" / "man" / "mcpctl-allocate.1"
    done = subprocess.run(["man", "-l", str(page)], capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, MANWIDTH="80", MANPAGER="cat", PAGER="cat"))
    assert done.returncode == 0, done.stderr
    shown = [line.strip() for line in done.stdout.splitlines()]
    assert 'id=$(mcpctl allocate --res licence=1 --wait forever --no-block); mcpctl wait "$id"' in shown
    assert any(line.startswith("--cpu") for line in shown)


def test_a_queued_request_shows_what_it_asks_for(daemon: DaemonProcess) -> None:
    daemon.call("allocate", {"resources": [{"resource": "licence", "amount": 2}], "holder_pid": os.getpid()})
    queued = ok(daemon, "allocate", "--res", "licence=1", "--mem", "1G..2G", "--cpu", "0.5", "--wait", "10m",
                "--no-block").strip()

    table = ok(daemon, "allocations", "--queued").splitlines()

    [row] = [line for line in table if line.startswith(queued)]
    assert "cpu=0.5, memory=1G..2G, licence=1" in row, table


def test_events_print_details_as_people_read_them(daemon: DaemonProcess) -> None:
    allocation_id = ok(daemon, "allocate", "--res", "licence=1", "--res", "slot=2").strip()

    table = ok(daemon, "events", "--allocation", allocation_id)

    assert "items={licence=1, slot=2}" in table, table
    assert "{'" not in table and "2.0" not in table


def test_events_of_an_unknown_allocation_is_an_error(daemon: DaemonProcess) -> None:
    for args in (["events", "--allocation", "nosuch"], ["events", "--allocation", "nosuch", "--json"]):
        result = cli(daemon, *args)
        assert result.returncode == 1
        assert result.stdout == ""
        assert "no allocation with id 'nosuch'" in result.stderr


def test_a_static_pool_in_use_is_not_deleted(daemon: DaemonProcess) -> None:
    ok(daemon, "pool", "create", "seats", "--factory", "static", "--member", "licence")
    taken = ok(daemon, "allocate", "--pool", "seats").strip()

    refused = cli(daemon, "pool", "delete", "seats")

    assert refused.returncode == 1
    assert "pool seats has 1 member(s) in use (licence)" in refused.stderr
    assert [p["name"] for p in as_json(daemon, "pools")] == ["seats"]
    ok(daemon, "release", taken)
    ok(daemon, "pool", "delete", "seats")
    assert as_json(daemon, "pools") == []


# -- 6. output scripts can read ---------------------------------------------------------------------------------

ZONED = r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2} [+-]\d{4}"


def test_allocations_print_the_columns_asked_for_without_headers(daemon: DaemonProcess) -> None:
    first = ok(daemon, "allocate", "--res", "licence=1").strip()
    second = ok(daemon, "allocate", "--res", "slot=1").strip()

    lines = ok(daemon, "allocations", "-o", "id,state,holder,created", "--no-headers").splitlines()

    assert len(lines) == 2
    for line, allocation_id in zip(lines, [second, first]):
        assert re.fullmatch(rf"{allocation_id}  active  {os.getpid()} +{ZONED}", line), line
    assert ok(daemon, "allocations", "-q").split() == [second, first]
    assert ok(daemon, "allocations", "--output", "STATE").splitlines() == ["STATE", "active", "active"]


@pytest.mark.parametrize("args", [["allocations", "-o", "id,bogus"], ["resources", "-o", ""],
                                  ["pools", "-o", "name,nope"], ["events", "-o", "when"],
                                  ["allocations", "-q", "--json"], ["resources", "-q", "-o", "name"]])
def test_unknown_columns_or_two_outputs_are_usage_errors(daemon: DaemonProcess, args: list[str]) -> None:
    result = cli(daemon, *args)

    assert result.returncode == 2
    assert result.stdout == ""
    assert "-o/--output takes column names" in result.stderr or "choose one of" in result.stderr


def test_resources_pools_and_events_take_columns_and_no_headers(daemon: DaemonProcess) -> None:
    ok(daemon, "pool", "create", "seats", "--factory", "static", "--member", "licence")
    ok(daemon, "allocate", "--res", "slot=3")

    rows = [line.split() for line in ok(daemon, "resources", "-o", "name,free", "--no-headers").splitlines()]
    assert rows[-2:] == [["licence", "2", "seats"], ["slot", "7", "slots"]]
    assert len(rows) == len(as_json(daemon, "resources"))
    assert ok(daemon, "resources", "-q").split()[-2:] == ["licence", "slot"]
    assert ok(daemon, "pools", "-o", "name,state", "--no-headers").splitlines() == ["seats  active"]
    assert ok(daemon, "pools", "-q").split() == ["seats"]
    events = ok(daemon, "events", "-o", "time,event", "--no-headers").splitlines()
    assert re.fullmatch(rf"{ZONED}  allocated", events[-1]), events


def test_json_carries_iso_times_beside_the_epoch_ones(daemon: DaemonProcess) -> None:
    allocation = json.loads(ok(daemon, "allocate", "--res", "licence=1", "--json"))
    [listed] = as_json(daemon, "allocations")
    events = as_json(daemon, "events")

    for shown in (allocation, listed):
        created = datetime.datetime.fromisoformat(shown["created_at_iso"])
        assert created.utcoffset() is not None
        assert abs(created.timestamp() - shown["created_at"]) < 0.001
        assert shown["released_at"] is None and shown["released_at_iso"] is None
    assert abs(datetime.datetime.fromisoformat(events[-1]["ts_iso"]).timestamp() - events[-1]["ts"]) < 0.001


def test_explain_says_memory_in_sizes(daemon: DaemonProcess) -> None:
    [memory] = [r for r in as_json(daemon, "resources") if r["name"] == "memory"]
    held = daemon.call("allocate", {"resources": [{"resource": "memory", "amount": memory["capacity"] - (1 << 30)}],
                                    "holder_pid": os.getpid()})
    waiting = ok(daemon, "allocate", "--mem", "2G", "--wait", "10m", "--no-block").strip()

    text = ok(daemon, "explain", waiting)

    assert "  memory: asks 2G, free 1G of " in text, text
    assert f"it would fit if {held['id']} (memory=" in text and "e+" not in text, text


def test_alerts_and_budgets_take_columns_and_no_headers(daemon: DaemonProcess) -> None:
    ok(daemon, "budget", "set", "--tool", "train", "--limit", "5", "--period", "day")

    [row] = ok(daemon, "budgets", "-o", "subject,period,resets", "--no-headers").splitlines()
    assert re.fullmatch(rf"train\s+day\s+{ZONED}", row), row
    assert ok(daemon, "alerts", "--all", "-o", "id,state", "--no-headers") == ""
    assert ok(daemon, "alerts", "-o", "alert,level").splitlines() == ["ALERT  LEVEL"]
