"""`mcpctl allocate` and `mcpctl release` without Typer: the same bytes, exit codes and errors as with it, and
none of the imports that made them slow (issue 15: whole process at most 1.5x `python -c pass`, bench/bench_cli.py).

The fast path (mcpctl/fast.py) runs in a subprocess that fails unless the fast path took the command; Typer
runs in another, through the app alone. Each case runs both against one daemon. An allocation that
succeeds is asked for with an idempotency key, so both see the very same allocation, byte for byte.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, DaemonProcess, ok, run_cli

pytestmark = pytest.mark.e2e

FAST_PATH = ("import sys; from mcpctl.main import INTERRUPTED; from mcpctl.fast import try_fast\n"
             "try:\n    code = try_fast(sys.argv[1:])\nexcept KeyboardInterrupt:\n    code = INTERRUPTED\n"
             "raise SystemExit(99 if code is None else code)")
TYPER_PATH = "import sys; from mcpctl.app import run_app; raise SystemExit(run_app(sys.argv[1:]))"
NOT_TAKEN = 99
SLOW_IMPORTS = {"re", "enum", "json", "socket", "typing", "collections", "functools", "selectors", "struct",
                "dataclasses", "uuid", "typer", "click", "rich"}


def run(script: str, args: list[str], socket_path: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, MCPRES_SOCKET=socket_path, MCPRES_RETRY_FOR="0")
    return subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, env=env, timeout=60)


def both(args: list[str], socket_path: str) -> tuple[subprocess.CompletedProcess[str], subprocess.CompletedProcess[str]]:
    by_fast = run(FAST_PATH, args, socket_path)
    assert by_fast.returncode != NOT_TAKEN, f"the fast path handed {args} to Typer"
    return by_fast, run(TYPER_PATH, args, socket_path)


def assert_same(by_fast: subprocess.CompletedProcess[str], by_typer: subprocess.CompletedProcess[str]) -> None:
    assert (by_fast.returncode, by_fast.stdout, by_fast.stderr) == (by_typer.returncode, by_typer.stdout,
                                                                     by_typer.stderr)


ALLOCATE_CASES = [
    # (arguments, exit status): successes carry a --key, so Typer's run gets the allocation the fast path made
    (["--res", "slot=1", "--key", "k-id"], 0),
    (["--res", "slot=1", "--key", "k-json", "--json"], 0),
    (["--gpu", "1", "--key", "k-env", "--env"], 0),
    (["--res", "slot=1", "--cpu", "0.5", "--mem", "1M", "--key", "k-all", "--tool", "t", "--exec", "e",
      "--ttl", "1h", "--preemptible", "--keep-processes", "--max-cost", "100", "--json"], 0),
    (["--res=slot=1", "--key=k-equals", "--wait=5s", "--json"], 0),
    (["--res", "slot=1", "--key", "k-noblock", "--wait", "forever", "--no-block"], 0),
    (["--res", "slot=1..2", "--priority", "high", "--strategy", "best-fit", "--key", "k-range", "--json"], 0),
    (["--res", "nosuch=1"], 1),
    (["--res", "slot=11"], 1),
    (["--pool", "nosuch"], 1),
    (["--cpu", "abc"], 2),
    (["--cpu", "-1"], 2),
    (["--cpu", "nan"], 2),
    (["--mem", "12Q"], 2),
    (["--mem", "0"], 2),
    (["--res", "slot"], 2),
    (["--res", "slot=x"], 2),
    (["--disk", "10G"], 2),
    (["--cpu", "4..2"], 2),
    (["--res", "slot=1", "--ttl", "0"], 2),
    (["--res", "slot=1", "--ttl", "soon"], 2),
    (["--res", "slot=1", "--wait", "soon"], 2),
    (["--res", "slot=1", "--no-block"], 2),
    (["--res", "slot=1", "--wait", "1s", "--no-block", "--env"], 2),
    (["--res", "slot=1", "--max-cost", "-1"], 2),
    (["--res", "slot=1", "--members", "2"], 2),
    (["--res", "slot=1", "--objective", "cost"], 2),
    (["--pool", "p", "--members", "0"], 2),
    (["--pool", ","], 2),
    (["--json"], 2),
    (["--cpu", "0.1", "--holder-pid", "999999999"], 1),
    (["--res", "licence=1", "--key="], 2),
]


@pytest.mark.parametrize(("args", "status"), ALLOCATE_CASES, ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_allocate_gives_the_same_bytes_and_status_with_and_without_typer(
        daemon: DaemonProcess, args: list[str], status: int) -> None:
    by_fast, by_typer = both(["allocate", *args], daemon.socket)

    assert by_fast.returncode == status, by_fast.stderr
    assert_same(by_fast, by_typer)


def test_a_wait_that_runs_out_reads_the_same_with_and_without_typer(daemon: DaemonProcess) -> None:
    ok(daemon, "allocate", "--res", "licence=2", "--holder-pid", str(os.getpid()))

    by_fast, by_typer = both(["allocate", "--res", "licence=1", "--wait", "0.1s"], daemon.socket)

    assert by_fast.returncode == 3, by_fast.stderr
    ids = re.compile(r"\b[0-9a-f]{16}\b")  # each run queued its own request
    assert ids.search(by_fast.stderr)
    assert (by_fast.stdout, ids.sub("ID", by_fast.stderr)) == (by_typer.stdout, ids.sub("ID", by_typer.stderr))


@pytest.mark.parametrize("args", [["allocate", "--res", "slot=1"], ["allocate", "--res", "slot=1", "--json"],
                                  ["release", "1234567890abcdef"], ["release", "1234567890abcdef", "--json"]],
                         ids=" ".join)
def test_no_daemon_reads_the_same_with_and_without_typer(tmp_path: Path, args: list[str]) -> None:
    by_fast, by_typer = both(args, str(tmp_path / "none.sock"))

    assert by_fast.returncode == 5, by_fast.stderr
    assert_same(by_fast, by_typer)


def test_release_gives_the_same_bytes_and_status_with_and_without_typer(daemon: DaemonProcess) -> None:
    first, second = (ok(daemon, "allocate", "--res", "slot=1").strip() for _ in range(2))

    released = [run(FAST_PATH, ["release", first], daemon.socket), run(TYPER_PATH, ["release", second], daemon.socket)]
    assert [(r.returncode, r.stdout, r.stderr) for r in released] == [(0, "", "")] * 2

    for args, status in ((["release", first], 1), (["release", first, "--json"], 1), (["release", "nosuch"], 1),
                         (["release", first, "nosuch", "--json"], 1),
                         (["release", first, "--measured", "cpu_seconds=x"], 2),
                         (["release", first, "--measured", "bogus=1"], 2),
                         (["release", first, "--measured", "gpu_utilisation=2"], 2)):
        by_fast, by_typer = both(args, daemon.socket)
        assert by_fast.returncode == status, (args, by_fast.stderr)
        assert_same(by_fast, by_typer)


def test_release_json_lists_the_same_fields_with_and_without_typer(daemon: DaemonProcess) -> None:
    first, second = (ok(daemon, "allocate", "--res", "slot=1", "--key", key).strip() for key in ("a", "b"))

    by_fast = run(FAST_PATH, ["release", first, "--json"], daemon.socket)
    by_typer = run(TYPER_PATH, ["release", second, "--json"], daemon.socket)

    volatile = re.compile(r'("(?:id|idempotency_key|requester_pid|(?:created|granted|released)_at(?:_iso)?)": )[^,\n]+')
    assert by_fast.returncode == by_typer.returncode == 0
    assert volatile.sub(r"\1X", by_fast.stdout) == volatile.sub(r"\1X", by_typer.stdout)


@pytest.mark.parametrize("args", [["--res", "slot=1"], ["--res", "slot=1", "--key", "k"]], ids=" ".join)
def test_the_installed_allocate_and_release_import_nothing_slow(daemon: DaemonProcess, args: list[str]) -> None:
    """The installed `mcpctl` script itself, under -X importtime; -S leaves out site's own imports (and the
    editable install's finder), so what is listed is mcpctl's."""
    env = dict(os.environ, MCPRES_SOCKET=daemon.socket, PYTHONPATH=str(ROOT))
    mcpctl = str(Path(sys.executable).parent / "mcpctl")

    def imported(*argv: str) -> tuple[str, set[str]]:
        done = subprocess.run([sys.executable, "-S", "-X", "importtime", mcpctl, *argv], capture_output=True,
                              text=True, env=env, timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stdout, {line.rsplit("|", 1)[1].strip() for line in done.stderr.splitlines()
                             if line.startswith("import time:") and "|" in line}

    allocation, by_allocate = imported("allocate", *args)
    _, by_release = imported("release", allocation.strip())

    assert "mcpctl.fast" in by_allocate and "mcpctl.client" in by_release
    assert by_allocate & SLOW_IMPORTS == set()
    assert by_release & SLOW_IMPORTS == set()


def test_the_installed_run_imports_nothing_slow(daemon: DaemonProcess) -> None:
    """`mcpctl run -- CMD`, the command an agent's every tool call may go through: no `json`, `signal` (its enums)
    or `collections` either; also when the closing release finds the allocation released already (as usual)."""
    env = dict(os.environ, MCPRES_SOCKET=daemon.socket, PYTHONPATH=str(ROOT))
    mcpctl = str(Path(sys.executable).parent / "mcpctl")

    done = subprocess.run([sys.executable, "-S", "-X", "importtime", mcpctl, "run", "--res", "slot=1", "--", "sh",
                           "-c", "exit 7"], capture_output=True, text=True, env=env, timeout=60)

    imported = {line.rsplit("|", 1)[1].strip() for line in done.stderr.splitlines()
                if line.startswith("import time:") and "|" in line}
    assert done.returncode == 7, done.stderr
    assert "mcpctl.launch" in imported
    assert imported & (SLOW_IMPORTS | {"signal", "mcpresd.protocol_enums"}) == set()


@pytest.mark.parametrize("args", [["--res", "slot=1", "--priority", "urgent"], ["--res", "slot=1", "--enforce", "tight"],
                                  ["--res", "slot=1", "--strategy", "fastest"], ["--res", "slot=1", "--holder-pid", "0"],
                                  ["--res", "slot=1", "--json", "--env"], ["--res", "slot=1", "--bogus"],
                                  ["--res", "nosuch=1", "--ttl", "1h", "--ttl", "2h"], ["--res"]],
                         ids=" ".join)
def test_what_typer_refuses_the_fast_path_hands_to_typer(daemon: DaemonProcess, args: list[str]) -> None:
    by_fast = run(FAST_PATH, ["allocate", *args], daemon.socket)
    by_installed = run_cli("allocate", *args, socket_path=daemon.socket)
    by_typer = run(TYPER_PATH, ["allocate", *args], daemon.socket)

    assert by_fast.returncode == NOT_TAKEN, by_fast.stderr
    assert by_typer.returncode != 0
    assert_same(by_installed, by_typer)
