"""Who holds an allocation made from a shell or a container: the script itself, as the host sees it.

Real shells (bash, dash, zsh), real pid namespaces (`unshare --pid --fork --mount-proc`), the installed `mcpctl`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import DaemonProcess
from tests.e2e.test_leases import BIN, BOUND_S, active, env, until

pytestmark = pytest.mark.e2e

UNSHARE = ["unshare", "--pid", "--fork", "--mount-proc"]
needs_namespaces = pytest.mark.skipif(os.getuid() != 0 or shutil.which("unshare") is None,
                                      reason="creating a pid namespace needs root and unshare(1)")


def namespace_init(unshare_pid: int) -> int:
    """The host pid of the process `unshare --fork` started as pid 1 of its new namespace."""
    children: list[str] = []

    def forked() -> bool:
        children[:] = Path(f"/proc/{unshare_pid}/task/{unshare_pid}/children").read_text().split()
        return bool(children)

    until(forked, "unshare to fork the namespace's init")
    (init,) = children
    return int(init)


def nspid(pid: int) -> list[int]:
    """The process's pid in each pid namespace it is in, the host's first."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("NSpid:"):
            return [int(part) for part in line.split()[1:]]
    raise AssertionError("no NSpid line")


def state(daemon: DaemonProcess, allocation_id: str) -> dict[str, Any]:
    result: dict[str, Any] = daemon.call("allocations.get", {"id": allocation_id})
    return result


@needs_namespaces
@pytest.mark.parametrize("unshare", [
    pytest.param(UNSHARE, id="its own /proc"),
    pytest.param(UNSHARE[:-1], id="the host's /proc"),
])
def test_an_allocation_made_in_a_pid_namespace_is_held_by_its_script_until_the_namespace_is_killed(
        daemon: DaemonProcess, unshare: list[str]) -> None:
    script = subprocess.Popen([*unshare, "bash", "-c", 'id=$(mcpctl allocate --res licence=1) || exit 1; echo "$id"; '
                               "sleep 30"], text=True, stdout=subprocess.PIPE, env=env(daemon))
    try:
        assert script.stdout is not None
        held = script.stdout.readline().strip()
        init = namespace_init(script.pid)
        assert nspid(init) == [init, 1]
        allocation = state(daemon, held)
        assert allocation["state"] == "active"
        assert allocation["holder_pid"] == init  # the script, by its host pid; never the host's pid 1
        os.kill(init, signal.SIGKILL)
        until(lambda: state(daemon, held)["state"] == "released", "the allocation to be released")
        assert state(daemon, held)["release_reason"] == "holder_exited"
    finally:
        script.kill()
        script.wait()


@needs_namespaces
def test_mcpctl_run_in_a_pid_namespace_is_held_by_its_command(daemon: DaemonProcess) -> None:
    run = subprocess.Popen([*UNSHARE, str(BIN / "mcpctl"), "run", "--res", "licence=2", "--", "sleep", "30"],
                           env=env(daemon))
    try:
        until(lambda: active(daemon), "the run to hold the licences")
        (allocation,) = active(daemon)
        command = allocation["holder_pid"]
        until(lambda: Path(f"/proc/{command}/cmdline").read_bytes() == b"sleep\x0030\x00", "the command to start")
        assert nspid(command) == [command, 2]  # mcpctl is the namespace's pid 1, its command pid 2
        os.kill(command, signal.SIGKILL)
        assert run.wait(BOUND_S) == 128 + signal.SIGKILL
        assert state(daemon, allocation["id"])["release_reason"] == "holder_exited"
    finally:
        run.kill()
        run.wait()


@needs_namespaces
def test_a_process_named_by_its_pid_in_the_callers_namespace_holds_the_allocation(daemon: DaemonProcess) -> None:
    """`sleep & mcpctl allocate --holder-pid $!`: the sleep is neither mcpctl's ancestor nor its child."""
    script = subprocess.Popen([*UNSHARE, "bash", "-c", 'sleep 30 & echo "$!"; mcpctl allocate --res licence=1 '
                               '--holder-pid "$!" || exit 1; wait'], text=True, stdout=subprocess.PIPE,
                              env=env(daemon))
    try:
        assert script.stdout is not None
        inside = int(script.stdout.readline())
        held = script.stdout.readline().strip()
        holder = state(daemon, held)["holder_pid"]
        assert nspid(holder) == [holder, inside]
        assert Path(f"/proc/{holder}/cmdline").read_bytes() == b"sleep\x0030\x00"
        os.kill(holder, signal.SIGKILL)
        until(lambda: state(daemon, held)["state"] == "released", "the allocation to be released")
        assert script.wait(BOUND_S) == 0  # the script itself ran on: the sleep held the allocation
    finally:
        script.kill()
        script.wait()


@needs_namespaces
def test_a_holder_pid_that_names_no_process_in_the_callers_namespace_is_refused(daemon: DaemonProcess) -> None:
    host_only = os.getpid()  # this test's pid on the host: a fresh namespace has only its first few pids
    refused = subprocess.run([*UNSHARE, "bash", "-c", f"mcpctl allocate --res licence=1 --holder-pid {host_only}"],
                             text=True, capture_output=True, env=env(daemon), timeout=BOUND_S)
    assert refused.returncode == 1, refused.stderr
    assert f"holder process {host_only} does not exist in the caller's pid namespace" in refused.stderr
    assert active(daemon) == []


SHELLS = [pytest.param(shell, marks=pytest.mark.skipif(shutil.which(shell) is None, reason=f"{shell} is not installed"),
                       id=shell) for shell in ("bash", "dash", "zsh")]
IDIOMS = {
    "or exit": "id=$(mcpctl allocate --res licence=1 || exit 1)",
    "pipe": "id=$(mcpctl allocate --res licence=1 | tr -d '\\n')",
    "timeout": "id=$(timeout 30 mcpctl allocate --res licence=1)",
    "flock": "id=$(flock {lock} mcpctl allocate --res licence=1)",
    "nice in a subshell": "id=$( (nice mcpctl allocate --res licence=1) )",
}


@pytest.mark.parametrize("idiom", list(IDIOMS))
@pytest.mark.parametrize("shell", SHELLS)
def test_a_script_holds_what_it_allocates_through_a_subshell_or_wrapper_until_it_exits(
        daemon: DaemonProcess, tmp_path: Path, shell: str, idiom: str) -> None:
    line = IDIOMS[idiom].format(lock=tmp_path / "lock")
    body = f'{line} || exit 1; echo "$id"; read go; echo "still $id"; read go; exit 0'
    script = subprocess.Popen([shell, "-c", body], text=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              env=env(daemon))
    try:
        assert script.stdin is not None and script.stdout is not None
        held = script.stdout.readline().strip()
        assert held, f"the idiom failed under {shell}"
        allocation = state(daemon, held)
        assert allocation["holder_pid"] == script.pid  # the script, not the subshell or wrapper that has exited
        assert allocation["state"] == "active"
        script.stdin.write("go\n")
        script.stdin.flush()
        assert script.stdout.readline().strip() == f"still {held}"
        assert state(daemon, held)["state"] == "active"  # the idiom's processes are long gone; the script runs on
        script.stdin.close()
        assert script.wait(BOUND_S) == 0
        until(lambda: state(daemon, held)["state"] == "released", "the script's exit to release it")
        assert state(daemon, held)["release_reason"] == "holder_exited"
    finally:
        script.kill()
        script.wait()


def test_json_output_shows_the_holder_chosen(daemon: DaemonProcess) -> None:
    script = subprocess.Popen(["bash", "-c", "out=$(mcpctl allocate --res licence=1 --json || exit 1); "
                               'echo "$out" | tr -d "\\n"; echo; read go'], text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env(daemon))
    try:
        assert script.stdout is not None
        shown = json.loads(script.stdout.readline())
        assert shown["holder_pid"] == script.pid and shown["holder"] == "pid"
    finally:
        script.kill()
        script.wait()


def test_a_shell_started_from_a_shell_holds_its_own_allocations(daemon: DaemonProcess) -> None:
    """A new `bash` run from `bash` with the same command line is not a subshell: it holds what it allocates."""
    inner = 'bash -c \'echo "$$"; mcpctl allocate --res licence=1; read go\''
    script = subprocess.Popen(["bash", "-c", f"{inner}; read go"], text=True, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, env=env(daemon))
    try:
        assert script.stdout is not None
        shell = int(script.stdout.readline())
        held = script.stdout.readline().strip()
        assert state(daemon, held)["holder_pid"] == shell != script.pid
    finally:
        script.kill()
        script.wait()
