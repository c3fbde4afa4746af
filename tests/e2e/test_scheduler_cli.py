"""`mcpctl` and the scheduler, as a user and a shell script run them: run, waiting, wait, explain, renew, follow."""

from __future__ import annotations

import json
import os
import pty
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from mcpctl import exitcodes, fast
from mcpctl.actions import AllocateOptions
from tests.conftest import DaemonProcess, H100_UUID, as_json, cli, connections_to, ok, run_cli, wait_for_connections

pytestmark = pytest.mark.e2e

BIN = Path(sys.executable).parent
MCPCTL = str(BIN / "mcpctl")
STEP_S = 10.0  # the bound on every single wait below; none is expected to come near it


def user_env(daemon: DaemonProcess) -> dict[str, str]:
    """The environment of a user's shell: mcpctl on PATH, the test daemon's socket."""
    return dict(os.environ, MCPRES_SOCKET=daemon.socket, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")


def start(daemon: DaemonProcess, *args: str, **kwargs: Any) -> subprocess.Popen[str]:
    kwargs.setdefault("stdout", subprocess.PIPE)
    kwargs.setdefault("stderr", subprocess.PIPE)
    return subprocess.Popen([MCPCTL, *args], text=True, env=user_env(daemon), **kwargs)


def stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(STEP_S)


class Lines:
    """A child's stdout, line by line, each read bounded by a timeout."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        self._lines: queue.Queue[str | None] = queue.Queue()
        stream = proc.stdout

        def pump() -> None:
            for line in stream:
                self._lines.put(line)
            self._lines.put(None)

        threading.Thread(target=pump, daemon=True).start()

    def next(self, timeout: float = STEP_S) -> str:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no line in {timeout}s") from None
        assert line is not None, "the stream ended"
        return line


def eventually(check: Any, timeout: float = STEP_S) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.02)


@contextmanager
def holding(daemon: DaemonProcess, tmp_path: Path, *request: str) -> Iterator[subprocess.Popen[str]]:
    """`mcpctl run REQUEST -- sh ...` holding its allocation until the block ends (then the command exits 0)."""
    go = tmp_path / f"go-{time.monotonic_ns()}"
    proc = start(daemon, "run", *request, "--", "sh", "-c",
                 f'echo "$MCPRES_ALLOCATION_ID"; while [ ! -e "{go}" ]; do sleep 0.02; done')
    try:
        proc.allocation_id = Lines(proc).next().strip()  # type: ignore[attr-defined]
        yield proc
        go.touch()
        assert proc.wait(STEP_S) == 0
    finally:
        go.touch()
        stop(proc)


def active(daemon: DaemonProcess) -> list[dict[str, Any]]:
    return as_json(daemon, "allocations")  # type: ignore[no-any-return]


def queued_ids(daemon: DaemonProcess) -> list[str]:
    return [a["id"] for a in as_json(daemon, "allocations", "--queued")]


# -- run ----------------------------------------------------------------------


def test_run_exits_with_the_commands_exit_code(daemon: DaemonProcess) -> None:
    result = cli(daemon, "run", "--res", "licence=1", "--", "sh", "-c", "exit 7")

    assert result.returncode == 7, result.stderr
    assert active(daemon) == []


def test_run_exits_128_plus_n_when_signal_n_kills_the_command(daemon: DaemonProcess) -> None:
    result = cli(daemon, "run", "--res", "licence=1", "--", "sh", "-c", "kill -TERM $$")

    assert result.returncode == 128 + signal.SIGTERM, result.stderr


def test_run_gives_the_command_the_granted_gpu_by_uuid(daemon: DaemonProcess) -> None:
    script = 'printf "%s\\n%s\\n%s\\n" "$CUDA_VISIBLE_DEVICES" "$CUDA_DEVICE_ORDER" "$MCPRES_ALLOCATION_ID"'
    result = cli(daemon, "run", "--gpu", "1", "--", "sh", "-c", script)

    assert result.returncode == 0, result.stderr
    visible, order, allocation_id = result.stdout.splitlines()
    assert (visible, order) == (H100_UUID, "PCI_BUS_ID")
    assert re.fullmatch(r"[0-9a-f]{16}", allocation_id)


def test_run_without_a_gpu_sets_cuda_visible_devices_to_empty(daemon: DaemonProcess) -> None:
    script = 'echo "${CUDA_VISIBLE_DEVICES-unset}|"'
    result = cli(daemon, "run", "--res", "slot=1", "--", "sh", "-c", script, env={"CUDA_VISIBLE_DEVICES": "0,1"})

    assert result.returncode == 0, result.stderr
    assert result.stdout == "|\n"


def test_the_allocation_is_active_while_the_command_runs_and_released_after(daemon: DaemonProcess,
                                                                           tmp_path: Path) -> None:
    seen = tmp_path / "seen.json"
    script = f'echo $$ > "{tmp_path}/pid"; mcpctl allocations --json > "{seen}"; echo "$MCPRES_ALLOCATION_ID"'
    result = subprocess.run([MCPCTL, "run", "--res", "licence=1", "--", "sh", "-c", script], capture_output=True,
                            text=True, env=user_env(daemon), timeout=30)

    assert result.returncode == 0, result.stderr
    allocation_id = result.stdout.strip()
    [inside] = json.loads(seen.read_text())
    assert (inside["id"], inside["state"]) == (allocation_id, "active")
    assert inside["holder_pid"] == int((tmp_path / "pid").read_text())  # the command itself holds it
    assert active(daemon) == []
    [after] = as_json(daemon, "allocations", allocation_id)
    assert after["state"] == "released"


def test_run_forwards_sigterm_to_the_command(daemon: DaemonProcess) -> None:
    proc = start(daemon, "run", "--res", "licence=1", "--", "sh", "-c",
                 'trap "exit 42" TERM; echo ready; while :; do sleep 0.02; done')
    try:
        assert Lines(proc).next().strip() == "ready"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(STEP_S) == 42
    finally:
        stop(proc)
    assert eventually(lambda: active(daemon) == [])


@pytest.mark.parametrize("name", ["HUP", "INT", "QUIT", "USR1", "USR2"])
def test_run_forwards_every_signal_it_forwards_to_the_command(daemon: DaemonProcess, name: str) -> None:
    proc = start(daemon, "run", "--res", "licence=1", "--", "sh", "-c",
                 f'trap "exit 42" {name}; echo ready; while :; do sleep 0.02; done')
    try:
        assert Lines(proc).next().strip() == "ready"
        proc.send_signal(getattr(signal, f"SIG{name}"))
        assert proc.wait(STEP_S) == 42
    finally:
        stop(proc)
    assert eventually(lambda: active(daemon) == [])


def _read_until(master: int, needle: bytes, seen: bytes = b"") -> bytes:
    import select

    deadline = time.monotonic() + STEP_S
    while needle not in seen:
        left = deadline - time.monotonic()
        assert left > 0, f"{needle!r} not seen in {STEP_S}s: {seen!r}"
        if select.select([master], [], [], left)[0]:
            try:
                chunk = os.read(master, 4096)
            except OSError:
                chunk = b""
            assert chunk, f"the terminal closed before {needle!r}: {seen!r}"
            seen += chunk
    return seen


def test_run_on_a_terminal_ctrl_c_reaches_the_command_and_mcpctl_waits_for_it(daemon: DaemonProcess) -> None:
    # Ctrl-C: the kernel signals the terminal's foreground process group, mcpctl and its command alike; mcpctl
    # lives on, sends no second SIGINT (one sent at once would merge with the kernel's, so "int 2" is only
    # seen when it comes late), and exits with the command's status.
    import fcntl
    import termios

    master, slave = pty.openpty()
    script = ('n=0; trap \'n=$((n+1)); echo "int $n"\' INT; trap \'echo "count $n"; exit 42\' USR1; echo ready; '
              'while :; do sleep 0.02; done')
    try:
        proc = start(daemon, "run", "--res", "licence=1", "--", "sh", "-c", script, stdin=slave, stdout=slave,
                     stderr=slave, start_new_session=True,
                     preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0))
        os.close(slave)
        slave = -1
        try:
            seen = _read_until(master, b"ready")
            os.write(master, b"\x03")  # the terminal's interrupt character
            seen = _read_until(master, b"int 1", seen)
            proc.send_signal(signal.SIGUSR1)  # forwarded after any SIGINT mcpctl would have forwarded
            seen = _read_until(master, b"count", seen)
            assert proc.wait(STEP_S) == 42
        finally:
            stop(proc)
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)

    assert b"count 1" in seen and b"int 2" not in seen, seen
    assert eventually(lambda: active(daemon) == [])


def test_run_of_a_file_that_is_not_executable_exits_126_and_releases(daemon: DaemonProcess, tmp_path: Path) -> None:
    script = tmp_path / "not-executable"
    script.write_text("#!/bin/sh\nexit 0\n")
    script.chmod(0o644)

    result = cli(daemon, "run", "--res", "licence=1", "--", str(script))

    assert result.returncode == 126, result.stderr
    assert "not-executable" in result.stderr
    assert eventually(lambda: active(daemon) == [])


def test_run_on_the_host_ignores_a_step_prefix_in_the_callers_environment(daemon: DaemonProcess) -> None:
    # MCPRES_STEP_PREFIX is how mcpctl tells its own child to run a cluster step through srun; one the caller's
    # environment happens to carry must not put another program before the command.
    result = cli(daemon, "run", "--res", "licence=1", "--", "echo", "command",
                 env={"MCPRES_STEP_PREFIX": '["echo", "injected"]'})

    assert result.returncode == 0, result.stderr
    assert result.stdout == "command\n"


def test_run_passes_the_callers_environment_byte_for_byte(daemon: DaemonProcess) -> None:
    # Values that are not UTF-8, or not ASCII, and a large environment reach the command as they were.
    environment = {os.fsencode(k): os.fsencode(v) for k, v in user_env(daemon).items()}
    environment.update({b"NOT_UTF8": b"\xff\xfe-\x80", b"ACCENTED": "é中".encode(), **{f"LARGE{n}".encode(): b"x" * 100_000 for n in range(10)}})
    script = 'printf "%s|%s|" "$NOT_UTF8" "$ACCENTED"; printf "%s" "$LARGE0$LARGE9" | wc -c'
    result = subprocess.run([MCPCTL, "run", "--res", "licence=1", "--", "sh", "-c", script], capture_output=True,
                            env=environment, timeout=30)

    assert result.returncode == 0, result.stderr
    assert result.stdout.split(b"|")[:2] == [b"\xff\xfe-\x80", "é中".encode()]
    assert int(result.stdout.split(b"|")[2]) == 200_000  # of 1 MB in all


def test_run_of_a_command_that_does_not_exist_exits_127_and_releases(daemon: DaemonProcess) -> None:
    result = cli(daemon, "run", "--res", "licence=1", "--", "no-such-command-here")

    assert result.returncode == 127
    assert "no-such-command-here" in result.stderr
    assert eventually(lambda: active(daemon) == [])


def test_run_of_a_file_that_cannot_be_executed_exits_126_as_its_help_says(daemon: DaemonProcess,
                                                                          tmp_path: Path) -> None:
    script = tmp_path / "not-executable.sh"
    script.write_text("#!/bin/sh\nexit 0\n")
    script.chmod(0o644)

    result = cli(daemon, "run", "--res", "licence=1", "--", str(script))

    assert result.returncode == exitcodes.CANNOT_EXECUTE == 126
    assert "cannot run" in result.stderr
    assert eventually(lambda: active(daemon) == [])
    for args in (("--help",), ("run", "--help")):
        text = " ".join(run_cli(*args).stdout.split())
        assert "127 if it was not found, 126 if it could not be run" in text or \
            "127 if the command was not found, 126 if it could not be run" in text, args


def test_run_that_cannot_allocate_runs_nothing_and_exits_like_allocate(daemon: DaemonProcess,
                                                                      tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    ok(daemon, "allocate", "--res", "licence=2")

    result = cli(daemon, "run", "--res", "licence=1", "--", "touch", str(marker))

    assert result.returncode == exitcodes.UNAVAILABLE
    assert "licence" in result.stderr
    assert not marker.exists()


def test_run_help_documents_the_command_and_the_environment() -> None:
    result = run_cli("run", "--help")

    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    for needle in ("-- CMD", "CUDA_VISIBLE_DEVICES", "MCPRES_ALLOCATION_ID", "--wait", "128+N"):
        assert needle in text, needle


# -- waiting ------------------------------------------------------------------


def test_wait_0_on_a_full_resource_exits_3_at_once(daemon: DaemonProcess) -> None:
    ok(daemon, "allocate", "--res", "licence=2")

    result = cli(daemon, "allocate", "--res", "licence=1", "--wait", "0")

    assert result.returncode == exitcodes.UNAVAILABLE
    assert result.stdout == ""
    assert queued_ids(daemon) == []


def test_a_waiting_allocate_is_granted_when_the_holders_run_ends(daemon: DaemonProcess, tmp_path: Path) -> None:
    with holding(daemon, tmp_path, "--res", "slot=10") as holder:
        waiter = start(daemon, "allocate", "--res", "slot=1", "--wait", "20s")
        try:
            assert eventually(lambda: len(queued_ids(daemon)) == 1)
            assert waiter.poll() is None
        except BaseException:
            stop(waiter)
            raise
    try:
        out, err = waiter.communicate(timeout=STEP_S)
    finally:
        stop(waiter)

    assert waiter.returncode == 0, err
    assert err == ""  # nothing on a pipe while waiting
    [granted] = active(daemon)
    assert granted["id"] == out.strip() != holder.allocation_id  # type: ignore[attr-defined]


def test_a_wait_that_runs_out_exits_3_and_leaves_nothing_queued(daemon: DaemonProcess, tmp_path: Path) -> None:
    with holding(daemon, tmp_path, "--res", "licence=2"):
        result = cli(daemon, "allocate", "--res", "licence=1", "--wait", "0.5s")

        assert result.returncode == exitcodes.UNAVAILABLE, result.stderr
        assert result.stdout == ""
        assert "queued" not in result.stderr  # the terminal-only line never goes to a pipe
        assert queued_ids(daemon) == []
        [withdrawn] = [a for a in as_json(daemon, "allocations", "--all") if a["state"] == "withdrawn"]
        assert withdrawn["released_at"] - withdrawn["created_at"] >= 0.5  # it waited, by the daemon's clock


def test_on_a_terminal_a_waiting_allocate_says_it_is_queued_and_its_id(daemon: DaemonProcess,
                                                                      tmp_path: Path) -> None:
    with holding(daemon, tmp_path, "--res", "licence=2"):
        master, slave = pty.openpty()
        try:
            proc = start(daemon, "allocate", "--res", "licence=1", "--wait", "1s", stderr=slave)
            os.close(slave)
            slave = -1
            seen = b""
            try:
                proc.wait(STEP_S)
                while True:
                    try:
                        chunk = os.read(master, 4096)
                    except OSError:
                        break
                    if not chunk:
                        break
                    seen += chunk
            finally:
                stop(proc)
        finally:
            os.close(master)
            if slave >= 0:
                os.close(slave)

    assert proc.returncode == exitcodes.UNAVAILABLE
    match = re.search(rb"mcpctl: queued as ([0-9a-f]{16}), waiting \(up to 1s\)", seen)
    assert match, seen
    [withdrawn] = [a for a in as_json(daemon, "allocations", "--all") if a["state"] == "withdrawn"]
    assert withdrawn["id"] == match.group(1).decode()


def test_no_block_prints_the_queued_id_and_wait_returns_when_it_is_granted(daemon: DaemonProcess,
                                                                          tmp_path: Path) -> None:
    with holding(daemon, tmp_path, "--res", "licence=2"):
        queued_id = ok(daemon, "allocate", "--res", "licence=1", "--wait", "30s", "--no-block").strip()

        assert queued_ids(daemon) == [queued_id]
        connected = connections_to(daemon.socket)
        waiter = start(daemon, "wait", queued_id, "--timeout", "20s")
        try:
            wait_for_connections(daemon.socket, connected + 1)  # the waiter has reached the daemon
            assert waiter.poll() is None  # still held: wait blocks
        except BaseException:
            stop(waiter)
            raise
    try:
        out, err = waiter.communicate(timeout=STEP_S)
    finally:
        stop(waiter)

    assert waiter.returncode == 0, err
    assert out.strip() == queued_id
    assert [a["id"] for a in active(daemon)] == [queued_id]


def test_wait_that_times_out_exits_3_and_the_request_stays_queued(daemon: DaemonProcess, tmp_path: Path) -> None:
    with holding(daemon, tmp_path, "--res", "licence=2"):
        queued_id = ok(daemon, "allocate", "--res", "licence=1", "--wait", "30s", "--no-block").strip()

        result = cli(daemon, "wait", queued_id, "--timeout", "0.5s")

        assert result.returncode == exitcodes.UNAVAILABLE
        assert result.stdout == ""
        assert queued_id in result.stderr
        assert queued_ids(daemon) == [queued_id]


def test_wait_on_an_active_allocation_prints_it_at_once(daemon: DaemonProcess) -> None:
    allocation_id = ok(daemon, "allocate", "--res", "slot=1").strip()

    assert as_json(daemon, "wait", allocation_id)["id"] == allocation_id


def test_wait_on_an_ended_allocation_exits_1_saying_how_it_ended_once(daemon: DaemonProcess) -> None:
    allocation_id = ok(daemon, "allocate", "--res", "slot=1").strip()
    ok(daemon, "release", allocation_id)

    result = cli(daemon, "wait", allocation_id)

    assert result.returncode == exitcodes.ERROR
    assert result.stderr.strip() == f"mcpctl: allocation {allocation_id} was released"


def test_renew_without_a_ttl_of_an_allocation_that_has_none_exits_as_its_help_says(daemon: DaemonProcess) -> None:
    allocation_id = ok(daemon, "allocate", "--res", "slot=1").strip()

    result = cli(daemon, "renew", allocation_id)

    assert result.returncode == exitcodes.USAGE and "has no TTL" in result.stderr
    assert "2 if it has no TTL and none is given" in " ".join(run_cli("renew", "--help").stdout.split())
    assert daemon.call("allocations.get", {"id": allocation_id})["ttl_s"] is None


def test_explain_names_the_allocation_that_blocks_the_request(daemon: DaemonProcess, tmp_path: Path) -> None:
    with holding(daemon, tmp_path, "--res", "licence=2", "--tool", "matlab") as holder:
        blocker = holder.allocation_id  # type: ignore[attr-defined]
        queued_id = ok(daemon, "allocate", "--res", "licence=1", "--wait", "30s", "--no-block").strip()

        text = ok(daemon, "explain", queued_id)
        data = as_json(daemon, "explain", queued_id)

    assert queued_id in text
    assert "position 1 of 1" in text
    assert blocker in text
    assert "matlab" in text
    assert "licence" in text
    assert [b["id"] for b in data["blockers"]] == [blocker]


def test_renew_sets_a_new_expiry(daemon: DaemonProcess) -> None:
    allocation = as_json(daemon, "allocate", "--res", "slot=1", "--ttl", "1m")
    assert allocation["expires_at"] == pytest.approx(time.time() + 60, abs=10)

    renewed = as_json(daemon, "renew", allocation["id"], "--ttl", "2h")
    text = ok(daemon, "renew", allocation["id"])

    assert renewed["id"] == allocation["id"]
    assert renewed["expires_at"] == pytest.approx(time.time() + 7200, abs=10)
    assert allocation["id"] in text and "expires" in text


def test_a_range_is_granted_as_much_as_fits(daemon: DaemonProcess) -> None:
    allocation = as_json(daemon, "allocate", "--res", "slot=2..20")

    assert [(i["resource"], i["amount"]) for i in allocation["items"]] == [("slot", 10)]
    assert allocation["request"]["resources"] == [{"resource": "slot", "amount": 2, "max": 20}]


# -- events --follow ----------------------------------------------------------


def test_events_follow_json_prints_an_event_made_after_it_started(daemon: DaemonProcess) -> None:
    follower = start(daemon, "events", "--follow", "--json", "--limit", "1")
    try:
        lines = Lines(follower)
        json.loads(lines.next())  # the backlog: it is subscribed by now
        allocation_id = ok(daemon, "allocate", "--res", "slot=1").strip()
        deadline = time.monotonic() + STEP_S
        while True:
            event = json.loads(lines.next(max(0.1, deadline - time.monotonic())))
            if event["kind"] == "allocated" and event["allocation_id"] == allocation_id:
                break
        assert event["detail"]["items"] == {"slot": 1}
        follower.terminate()
        assert follower.wait(STEP_S) == exitcodes.OK
    finally:
        stop(follower)


@pytest.mark.parametrize("retry_for", ["0", "1s"])
def test_events_follow_exits_5_when_the_daemon_stays_away_past_retry_for(daemon: DaemonProcess,
                                                                         retry_for: str) -> None:
    follower = start(daemon, "--retry-for", retry_for, "events", "--follow", "--limit", "1")
    try:
        Lines(follower).next()
        daemon.stop()
        assert follower.wait(STEP_S) == exitcodes.UNREACHABLE
    finally:
        stop(follower)


# -- options ------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        pytest.param(["allocate", "--res", "slot=1", "--no-block"], id="no-block-without-wait"),
        pytest.param(["allocate", "--res", "slot=1", "--wait", "soon"], id="wait-not-a-duration"),
        pytest.param(["allocate", "--res", "slot=1", "--ttl", "0"], id="ttl-zero"),
        pytest.param(["allocate", "--res", "slot=1", "--strategy", "fastest"], id="unknown-strategy"),
        pytest.param(["allocate", "--res", "slot=8..2"], id="range-backwards"),
        pytest.param(["allocate", "--cpu", "..2"], id="range-without-start"),
        pytest.param(["allocate", "--res", "slot=1", "--max-cost", "-1"], id="negative-cost"),
        pytest.param(["run", "--res", "slot=1"], id="run-without-command"),
        pytest.param(["run", "--", "true"], id="run-asks-nothing"),
        pytest.param(["wait", "abc", "--timeout", "soon"], id="wait-bad-timeout"),
        pytest.param(["allocations", "--all", "--queued"], id="all-and-queued"),
    ],
)
def test_scheduler_usage_errors_exit_2(daemon: DaemonProcess, args: list[str]) -> None:
    result = cli(daemon, *args)

    assert result.returncode == exitcodes.USAGE, (result.stdout, result.stderr)
    assert result.stdout == ""
    assert result.stderr.strip()
    assert as_json(daemon, "allocations", "--all") == []


SCHEDULER_CASES = [
    ["--cpu", "2..8", "--mem", "4G..16G", "--gpu", "1..2"],
    ["--res", "slot=1..4", "--wait", "10m", "--no-block", "--json"],
    ["--res", "licence=1", "--wait=forever", "--ttl", "1h", "--strategy", "best-fit"],
    ["--gpu", "1", "--where", "memory>=40G", "--where=name~H100", "--max-cost", "3.5", "--preemptible"],
]


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def __call__(self, *args: Any) -> int:
        self.calls.append(args)
        return 0


@pytest.mark.parametrize("args", SCHEDULER_CASES, ids=" ".join)
def test_the_fast_path_and_typer_parse_the_scheduler_options_alike(monkeypatch: pytest.MonkeyPatch,
                                                                   args: list[str]) -> None:
    import mcpctl.commands.allocate
    from mcpctl.app import run_app

    monkeypatch.delenv("MCPRES_SOCKET", raising=False)
    via_fast, via_typer = Recorder(), Recorder()
    monkeypatch.setattr(fast, "run_allocate", via_fast)
    monkeypatch.setattr(mcpctl.commands.allocate, "run_allocate", via_typer)

    assert fast.try_fast(["--socket", "/x.sock", "allocate", *args]) == 0
    assert run_app(["--socket", "/x.sock", "allocate", *args]) == 0

    assert via_fast.calls == via_typer.calls
    [(_, options, *_)] = via_fast.calls
    assert isinstance(options, AllocateOptions)
    assert options != AllocateOptions()


def test_every_allocate_carries_a_generated_idempotency_key(daemon: DaemonProcess) -> None:
    """So a resend after a lost reply (a daemon restart) never allocates twice; --key gives your own."""
    waiting = as_json(daemon, "allocate", "--res", "slot=1", "--wait", "5s")
    plain = as_json(daemon, "allocate", "--res", "slot=1")

    assert re.fullmatch(r"[0-9a-f]{32}", waiting["idempotency_key"] or "")
    assert re.fullmatch(r"[0-9a-f]{32}", plain["idempotency_key"] or "")
    assert waiting["idempotency_key"] != plain["idempotency_key"]
    assert as_json(daemon, "allocate", "--res", "slot=1", "--key", "mine")["idempotency_key"] == "mine"
