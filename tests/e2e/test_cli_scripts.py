"""`mcpctl` in shell scripts and pipelines: closed stdouts, `eval` of `--env`, and output scripts can read."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import H100_UUID, DaemonProcess, as_json, cli, ok

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
