"""`mcpctl top`, `alerts`, `metrics` and `predict` as a user runs them, against a daemon sampling every 0.5 s.

The replayed H100 idles for about 13 samples, runs at 99-100 % for about 23, then idles again: the
`gpu-busy` rule below goes pending, fires and resolves within the first ~20 seconds of a fresh daemon.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import pty
import queue
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from mcpctl import exitcodes
from tests.conftest import DaemonProcess, H100_UUID, as_json, capture_with_process, cli, ok, run_cli, wait_for_connections

pytestmark = pytest.mark.e2e

MCPCTL = str(Path(sys.executable).parent / "mcpctl")
STEP_S = 10.0
ALERT_S = 40.0  # the replay fires gpu-busy ~7 s after start; generous for a loaded machine
ANSI = re.compile(r"\x1b(\[[0-9;?]*[ -/]*[@-~]|\][^\x07]*\x07|[()][0-9A-B]|[=>])")

CONFIG = """
memory_reserve = "0"

[monitor]
interval = "0.5s"

[[resources]]
name = "slot"
capacity = 100
unit = "slots"

[[alerts]]
name = "gpu-busy"
metric = "gpu.utilisation"
selector = "gpu"
warning = 50
critical = 90
for = 0.5
keep_firing_for = 0
"""


def started(tmp_path: Path, config: str = CONFIG) -> DaemonProcess:
    process = DaemonProcess(tmp_path, config=config)
    process.start()
    return process


@pytest.fixture
def fresh(tmp_path: Path) -> Iterator[DaemonProcess]:
    """A daemon of its own, for tests that watch the replay's alert from its start."""
    process = started(tmp_path)
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture(scope="module")
def monitored(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    """One daemon for the tests that only read, with a few samples already taken."""
    process = started(tmp_path_factory.mktemp("monitored"))
    try:
        eventually(lambda: len(process.call("metrics.history", {"resource": "gpu:0"})["points"]) >= 3)
        yield process
    finally:
        process.stop()


def eventually(check: Callable[[], Any], timeout: float = STEP_S, every: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            assert value, f"not true within {timeout}s"
            return value
        time.sleep(every)


def on_terminal(daemon: DaemonProcess, *args: str, columns: int, lines: int,
                env: dict[str, str] | None = None) -> tuple[int, list[str]]:
    """Run mcpctl on a pseudo-terminal of the given size; its exit code and its screen lines without ANSI codes."""
    code, raw = on_terminal_raw(daemon, *args, columns=columns, lines=lines, env=env)
    return code, ANSI.sub("", raw).replace("\r\n", "\n").rstrip("\n").split("\n")


def on_terminal_raw(daemon: DaemonProcess, *args: str, columns: int, lines: int,
                    env: dict[str, str] | None = None) -> tuple[int, str]:
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", lines, columns, 0, 0))
    base = {k: v for k, v in os.environ.items() if k != "NO_COLOR"}
    env = dict(base, MCPRES_SOCKET=daemon.socket, TERM="xterm-256color", COLUMNS=str(columns), LINES=str(lines),
               **(env or {}))
    proc = subprocess.Popen([MCPCTL, *args], stdin=slave, stdout=slave, stderr=slave, env=env,
                            start_new_session=True)
    os.close(slave)
    seen = b""
    try:
        deadline = time.monotonic() + STEP_S
        while time.monotonic() < deadline:
            readable, _, _ = select.select([master], [], [], 0.1)
            if readable:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not chunk:
                    break
                seen += chunk
            elif proc.poll() is not None:
                break
        code = proc.wait(STEP_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    text = seen.decode("utf-8", errors="replace")
    assert "\x1b[" in text, "expected styles on a terminal"
    return code, text


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

    def next(self, timeout: float) -> str | None:
        try:
            return self._lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no line in {timeout}s") from None


def follower(daemon: DaemonProcess, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([MCPCTL, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, MCPRES_SOCKET=daemon.socket))


def ended(proc: subprocess.Popen[str]) -> int:
    if proc.poll() is None:
        proc.kill()
    return proc.wait(STEP_S)


# -- top --------------------------------------------------------------------


@pytest.fixture(scope="module")
def busy(monitored: DaemonProcess) -> DaemonProcess:
    """30 active allocations and one queued request, more than 80x24 has room for."""
    holder = os.getpid()
    for index in range(30):
        monitored.call("allocate", {"resources": [{"resource": "slot", "amount": 1}], "tool_id": f"tool-{index}",
                                    "execution_id": f"run-{index}", "holder_pid": holder})
    monitored.call("allocate", {"resources": [{"resource": "slot", "amount": 100}], "tool_id": "waiter",
                                "holder_pid": holder, "wait": 600, "detach": True})
    return monitored


@pytest.mark.parametrize("columns, lines", [(80, 24), (160, 50)])
def test_top_once_fits_the_terminal_and_keeps_the_header(busy: DaemonProcess, columns: int, lines: int) -> None:
    code, screen = on_terminal(busy, "top", "--once", columns=columns, lines=lines)

    assert code == 0, screen
    assert screen[0].startswith("mcpres top"), screen
    assert "31 active" not in screen[0] and "30 active, 1 queued" in screen[0]
    assert len(screen) <= lines
    assert all(len(line) <= columns for line in screen), [line for line in screen if len(line) > columns]
    text = "\n".join(screen)
    for resource in ("cpu", "memory", "gpu:0", "slot"):
        assert re.search(rf"^{re.escape(resource)}\s", text, re.MULTILINE), resource
    more = re.search(r"^\+(\d+) more allocations \((\d+) active, 0 queued\) \(j, down\)$", text, re.MULTILINE)
    assert allocation_rows(screen) + (int(more.group(1)) if more else 0) == 31
    assert re.search(r"^[0-9a-f]{16}\s+queued\s+waiter", text, re.MULTILINE), "the queued request is never hidden"
    if columns == 80:
        assert more, "31 allocations cannot fit 24 lines"


def test_top_keeps_the_queued_request_in_view_of_200_allocations(busy: DaemonProcess) -> None:
    for index in range(170):
        busy.call("allocate", {"resources": [{"resource": "memory", "amount": 1 << 20}], "holder_pid": os.getpid()})
    try:
        code, screen = on_terminal(busy, "top", "--once", columns=120, lines=30)
        _, oldest = on_terminal(busy, "top", "--once", "--sort", "oldest", columns=120, lines=30)
    finally:
        for allocation in busy.call("allocations.list", {"state": "active", "limit": 170}):
            if not allocation.get("tool_id"):
                busy.call("release", {"id": allocation["id"]})

    assert code == 0
    text = "\n".join(screen)
    assert re.search(r"^[0-9a-f]{16}\s+queued\s+waiter", text, re.MULTILINE), text
    assert re.search(r"^\+\d+ more allocations \(\d+ active, 0 queued\) \(j, down\)$", text, re.MULTILINE), text
    assert "sorted by newest" in screen[0] and "sorted by oldest" in oldest[0]
    rows = [line.split()[2] for line in screen if re.match(r"^[0-9a-f]{16}\s+active", line)]
    assert rows[0] == "-"  # the newest: one of the untooled memory allocations
    assert [line.split()[2] for line in oldest if re.match(r"^[0-9a-f]{16}\s+active", line)][0] == "tool-0"


def allocation_rows(screen: list[str]) -> int:
    return sum(1 for line in screen if re.match(r"^[0-9a-f]{16}\s", line))


def test_a_bigger_terminal_shows_more_rows_and_columns(busy: DaemonProcess) -> None:
    _, small = on_terminal(busy, "top", "--once", columns=80, lines=24)
    _, big = on_terminal(busy, "top", "--once", columns=160, lines=50)

    assert allocation_rows(big) > allocation_rows(small) > 0
    gpu_small = next(line for line in small if line.startswith("gpu:0"))
    gpu_big = next(line for line in big if line.startswith("gpu:0"))
    assert "fan n/a" in gpu_big and "fan" not in gpu_small  # the fan reading is unsupported: n/a, never 0
    assert "HOLDS" in "\n".join(big)


COLOUR = re.compile(r"\x1b\[(?:[0-9;]*;)?(?:3[0-9]|9[0-7]|4[0-9])(?:;[0-9;]*)?m")


def test_top_is_coloured_on_a_terminal_unless_no_color_is_set(monitored: DaemonProcess) -> None:
    _, coloured = on_terminal_raw(monitored, "top", "--once", columns=80, lines=24)
    _, plain = on_terminal_raw(monitored, "top", "--once", columns=80, lines=24, env={"NO_COLOR": "1"})

    assert COLOUR.search(coloured)
    assert not COLOUR.search(plain), plain
    assert "mcpres top" in plain


def test_top_once_on_a_pipe_is_plain_text(busy: DaemonProcess) -> None:
    result = cli(busy, "top", "--once", env={"COLUMNS": "80", "LINES": ""})

    assert result.returncode == 0, result.stderr
    assert "\x1b" not in result.stdout
    lines = result.stdout.splitlines()
    assert lines[0].startswith("mcpres top")
    assert any(line.startswith("gpu:0 ") for line in lines)
    assert allocation_rows(lines) == 31  # a pipe has no height: every row
    assert all(len(line) <= 80 for line in lines)


def test_top_once_json_is_the_batch_of_one_refresh(monitored: DaemonProcess) -> None:
    data = as_json(monitored, "top", "--once")

    assert set(data) == {"resources", "metrics", "alerts", "active", "queued"}
    assert "gpu:0" in data["metrics"]["resources"]
    assert data["metrics"]["interval_s"] == 0.5


@pytest.mark.parametrize("interval", ["0.1", "0", "soon", "forever"])
def test_top_refuses_an_interval_under_half_a_second(monitored: DaemonProcess, interval: str) -> None:
    result = cli(monitored, "top", "--once", "--interval", interval)

    assert result.returncode == exitcodes.USAGE
    assert "--interval" in result.stderr


def test_top_shows_each_gpu_process_with_its_device_memory(tmp_path: Path) -> None:
    """The replay's compute process is a live process here (tests/conftest.py capture_with_process)."""
    user = subprocess.Popen(["sleep", "600"])
    daemon = DaemonProcess(tmp_path, config=CONFIG, gpu_replay=capture_with_process(tmp_path, user.pid))
    try:
        daemon.start()
        allocation = daemon.call("allocate", {"resources": [{"resource": "gpu:0", "amount": 1}],
                                              "holder_pid": os.getpid()})  # the process's parent holds gpu:0
        # A round recorded before the allocation lists the process as nobody's: wait for one that attributes it.
        listed = eventually(lambda: [p for p in daemon.call("metrics.current", {"resource": "gpu:0"})["processes"]
                                     .get("gpu:0", ()) if p["allocations"]], timeout=ALERT_S)
        assert [(p["pid"], p["allocations"], p["foreign"]) for p in listed] == [(user.pid, [allocation["id"]], False)]
        assert listed[0]["used_memory"] > 1 << 30

        data = as_json(daemon, "top", "--once")
        assert data["metrics"]["processes"]["gpu:0"][0]["pid"] == user.pid
        result = cli(daemon, "top", "--once", env={"COLUMNS": "160", "LINES": ""})
        assert result.returncode == 0, result.stderr
        row = next(line for line in result.stdout.splitlines() if line.startswith("gpu:0 "))
        assert re.search(rf"pid {user.pid} \d+(\.\d+)?G\b", row), row
        assert "1 proc" in row
    finally:
        daemon.stop()
        user.kill()
        user.wait()


def _read_until(master: int, seen: bytearray, done: Callable[[], bool], timeout: float) -> None:
    """Keep reading the pty into `seen` until `done()` or the pty closes; fail after `timeout` seconds.

    The view's writes block once the pty's buffer (about 20 KiB, seven frames) is full, so the test reads for as
    long as the process lives, never stopping at a pause in its output."""
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            pytest.fail(f"gave up after {timeout}s; the terminal showed:\n{bytes(seen)[-2000:]!r}")
        if select.select([master], [], [], 0.1)[0]:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: every process holding the terminal has closed it
                return
            if not chunk:
                return
            seen += chunk


def _sigint(disposition: str) -> Callable[[], None]:
    """Start the child with SIGINT at its default disposition or ignored, whatever this process has."""
    handler = signal.SIG_IGN if disposition == "ignored" else signal.SIG_DFL
    return lambda: signal.signal(signal.SIGINT, handler) and None


@pytest.mark.parametrize("inherited", ["default", "ignored"])
def test_top_live_view_exits_0_on_ctrl_c(monitored: DaemonProcess, inherited: str) -> None:
    """Ctrl-C ends the live view, also when started with SIGINT ignored (a background job of a script, some CI
    runners): it is an interactive view on a terminal, and q or Ctrl-C are how it is left."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    proc = subprocess.Popen([MCPCTL, "top", "--interval", "0.5"], stdin=slave, stdout=slave, stderr=slave,
                            env=dict(os.environ, MCPRES_SOCKET=monitored.socket, TERM="xterm-256color"),
                            start_new_session=True, preexec_fn=_sigint(inherited))
    os.close(slave)
    seen = bytearray()
    try:
        _read_until(master, seen, lambda: seen.count(b"mcpres top") >= 2, ALERT_S)  # two refreshes drawn
        proc.send_signal(signal.SIGINT)
        _read_until(master, seen, lambda: proc.poll() is not None, ALERT_S)
        assert proc.wait(ALERT_S) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    assert b"\x1b[?1049h" in seen and b"\x1b[?1049l" in seen  # the alternate screen, left on exit
    assert b"Traceback" not in seen


def test_top_without_a_daemon_exits_5(tmp_path: Path) -> None:
    result = run_cli("top", "--once", socket_path=str(tmp_path / "none.sock"))

    assert result.returncode == exitcodes.UNREACHABLE
    assert "cannot reach mcpresd" in result.stderr


# -- alerts -----------------------------------------------------------------


def firing(daemon: DaemonProcess) -> list[dict[str, Any]]:
    return [a for a in as_json(daemon, "alerts") if a["rule"] == "gpu-busy" and a["state"] == "firing"]


def test_alerts_shows_the_gpu_alert_firing(fresh: DaemonProcess) -> None:
    [alert] = eventually(lambda: firing(fresh), timeout=ALERT_S, every=0.25)

    assert alert["resource"] == "gpu:0"
    assert alert["level"] == "critical"
    assert alert["last_value"] >= 90
    table = ok(fresh, "alerts")
    assert re.search(r"^\d+\s+\w+\s+\w+\s+gpu-busy\s+gpu:0\s", table, re.MULTILINE), table


def test_alerts_all_keeps_the_resolved_alert_with_its_duration(fresh: DaemonProcess) -> None:
    def resolved() -> list[dict[str, Any]]:
        return [a for a in as_json(fresh, "alerts", "--all") if a["rule"] == "gpu-busy" and a["state"] == "resolved"]

    [alert] = eventually(resolved, timeout=ALERT_S + 20, every=0.5)

    assert alert["duration_s"] > 0
    assert alert["max"] >= 99 and alert["min"] is not None and alert["avg"] is not None
    assert not [a for a in as_json(fresh, "alerts") if a["rule"] == "gpu-busy"]
    assert re.search(r"\bresolved\s+critical\s+gpu-busy\s+gpu:0\b", ok(fresh, "alerts", "--all"))


def test_alerts_follow_prints_the_firing_event_as_json_lines(fresh: DaemonProcess) -> None:
    proc = follower(fresh, "alerts", "--follow", "--json")
    try:
        lines = Lines(proc)
        deadline = time.monotonic() + ALERT_S
        events = []
        while not any(e["kind"] == "alert.firing" for e in events):
            line = lines.next(max(0.1, deadline - time.monotonic()))
            assert line is not None, proc.stderr.read() if proc.stderr else ""
            events.append(json.loads(line))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(STEP_S) == 0
    finally:
        ended(proc)

    assert all(e["kind"].startswith("alert.") for e in events)
    event = events[-1]
    assert event["resource"] == "gpu:0"
    assert event["detail"]["rule"] == "gpu-busy"
    assert event["detail"]["value"] >= 90


def test_alerts_follow_exits_5_when_the_daemon_goes_away(tmp_path: Path) -> None:
    daemon = started(tmp_path)
    proc = follower(daemon, "alerts", "--follow")
    try:
        wait_for_connections(daemon.socket, 1)  # following, when the daemon goes away
        daemon.stop()
        assert proc.wait(STEP_S) == exitcodes.UNREACHABLE
    finally:
        ended(proc)
        daemon.stop()


def test_alerts_follow_refuses_all(monitored: DaemonProcess) -> None:
    assert cli(monitored, "alerts", "--follow", "--all").returncode == exitcodes.USAGE


# -- metrics ----------------------------------------------------------------


def test_metrics_json_has_the_history_points(monitored: DaemonProcess) -> None:
    history = as_json(monitored, "metrics", "gpu:0")

    assert history["resource"] == "gpu:0" and history["metric"] == "utilisation"
    assert history["points"]
    assert all(p["status"] == "ok" and 0 <= p["value"] <= 100 for p in history["points"])


def test_metrics_on_a_pipe_prints_timestamp_value_lines(monitored: DaemonProcess) -> None:
    lines = ok(monitored, "metrics", "gpu:0", "--since", "10m").splitlines()

    assert lines
    for line in lines:
        ts, value = line.split(" ")
        assert abs(float(ts) - time.time()) < 600 + 5
        assert 0 <= float(value) <= 100


def test_metrics_on_a_terminal_draws_a_sparkline_with_latest_min_max_avg(monitored: DaemonProcess) -> None:
    code, screen = on_terminal_plainly(monitored, "metrics", "gpu:0", "--metric", "temperature_c")

    assert code == 0
    assert screen[0].startswith("gpu:0 temperature_c, last 1h")
    assert re.fullmatch(r"[▁▂▃▄▅▆▇█ ]+", screen[1].strip())
    assert re.match(r"latest \d+ °C \(\d+s ago\)\s+min \d+ °C\s+max \d+ °C\s+avg \d+ °C", screen[2])


def on_terminal_plainly(daemon: DaemonProcess, *args: str) -> tuple[int, list[str]]:
    """On a terminal, for commands that print no colour."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    proc = subprocess.Popen([MCPCTL, *args], stdin=slave, stdout=slave, stderr=slave,
                            env=dict(os.environ, MCPRES_SOCKET=daemon.socket, TERM="xterm-256color"))
    os.close(slave)
    seen = b""
    try:
        while select.select([master], [], [], STEP_S)[0]:
            try:
                chunk = os.read(master, 65536)
            except OSError:
                break
            if not chunk:
                break
            seen += chunk
        code = proc.wait(STEP_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    return code, ANSI.sub("", seen.decode()).replace("\r\n", "\n").rstrip("\n").split("\n")


def test_an_unsupported_metric_reads_unsupported_never_0(monitored: DaemonProcess) -> None:
    lines = ok(monitored, "metrics", "gpu:0", "--metric", "fan_speed_pct").splitlines()

    assert lines
    assert all(line.split(" ")[1] == "unsupported" for line in lines)
    history = as_json(monitored, "metrics", "gpu:0", "--metric", "fan_speed_pct")
    assert all(p["status"] == "unsupported" and p["value"] is None for p in history["points"])
    _, screen = on_terminal_plainly(monitored, "metrics", "gpu:0", "--metric", "fan_speed_pct")
    assert screen[1].startswith("unsupported")


def test_a_gpu_uuid_names_the_gpu(monitored: DaemonProcess) -> None:
    history = as_json(monitored, "metrics", H100_UUID, "--metric", "memory_used")

    assert history["resource"] == "gpu:0"
    assert history["points"]


def test_metrics_prometheus_is_valid_exposition_text(monitored: DaemonProcess) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    text = ok(monitored, "metrics", "--prometheus")

    assert text.endswith("\n")
    assert re.search(r'^mcpres_gpu_utilisation_ratio\{resource="gpu:0",', text, re.MULTILINE)
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert all(f.documentation for f in families.values())
    assert all(math.isfinite(s.value) for f in families.values() for s in f.samples)
    assert "mcpres_gpu_fan_speed_ratio" not in families  # unsupported values are left out, not written as 0


def test_metrics_prometheus_goes_with_no_resource_or_metric(monitored: DaemonProcess) -> None:
    result = cli(monitored, "metrics", "gpu:0", "--prometheus")

    assert result.returncode == 2 and "does not go with a resource or --metric" in result.stderr
    assert result.stdout == ""


def test_metrics_without_a_resource_lists_current_values(monitored: DaemonProcess) -> None:
    out = ok(monitored, "metrics")

    assert re.search(r"^gpu:0\s+fan_speed_pct\s+n/a$", out, re.MULTILINE)
    assert re.search(r"^gpu:0\s+utilisation\s+\d+ %$", out, re.MULTILINE)


def test_metrics_of_a_resource_not_sampled_yet_says_so(tmp_path: Path) -> None:
    daemon = started(tmp_path, CONFIG.replace('interval = "0.5s"', 'interval = "1h"'))
    try:
        eventually(lambda: daemon.call("metrics.current")["ts"] is not None)
        ok(daemon, "resource", "add", "licence:new", "--capacity", "2")

        result = cli(daemon, "metrics", "licence:new")
    finally:
        daemon.stop()

    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("no history yet for licence:new")


@pytest.mark.parametrize("args", [("metrics", "gpu:9"), ("metrics", "gpu:0", "--metric", "nonsense"),
                                  ("predict", "gpu:9")], ids=" ".join)
def test_an_unknown_resource_or_metric_exits_1(monitored: DaemonProcess, args: tuple[str, ...]) -> None:
    result = cli(monitored, *args)

    assert result.returncode == exitcodes.ERROR
    assert result.stdout == ""
    assert result.stderr.startswith("mcpctl: ")


# -- predict ----------------------------------------------------------------


def test_predict_json_has_the_forecast_and_its_accuracy(monitored: DaemonProcess) -> None:
    result = eventually(lambda: (r := as_json(monitored, "predict", "gpu:0"))["predicted"] is not None and r)

    assert 0 <= result["predicted"] <= 100
    assert result["horizon_s"] == 1800
    assert set(result["accuracy"]) >= {"mape_pct", "scored", "horizon_s"}


def test_predict_says_now_ahead_and_accuracy_in_one_line(monitored: DaemonProcess) -> None:
    line = ok(monitored, "predict", "gpu:0", "--in", "1h30m").strip()

    assert re.fullmatch(r"gpu:0 utilisation: now \d+ %, in 1h 30m ~ \d+ %"
                        r"( \((full now|full in [\dhdms ]+|not rising)\))?; "
                        r"accuracy: (no accuracy yet|MAPE [\d.]+ % over \d+ scored forecasts? \(\S+ ahead\))", line), line


def test_predict_refuses_a_horizon_of_zero(monitored: DaemonProcess) -> None:
    assert cli(monitored, "predict", "gpu:0", "--in", "0").returncode == exitcodes.USAGE


def test_a_percentage_sparkline_is_scaled_to_its_data_not_to_0_100(monitored: DaemonProcess) -> None:
    """Memory wavers by a fraction of a percent: on 0..100 % it drew one flat row of the same block."""
    def varied() -> bool:
        values = {p["value"] for p in monitored.call("metrics.history", {"resource": "memory"})["points"]
                  if p["status"] == "ok"}
        return len(values) >= 2 and max(values) - min(values) < 50

    eventually(varied, timeout=120)

    code, screen = on_terminal_plainly(monitored, "metrics", "memory", "--since", "1h")

    assert code == 0
    assert screen[0].startswith("memory utilisation, last 1h"), screen
    assert "▁" in screen[1] and "█" in screen[1], screen[1]


def test_top_live_view_sorts_and_scrolls_on_keys(busy: DaemonProcess) -> None:
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    proc = subprocess.Popen([MCPCTL, "top", "--interval", "30"], stdin=slave, stdout=slave, stderr=slave,
                            env=dict(os.environ, MCPRES_SOCKET=busy.socket, TERM="xterm-256color"),
                            start_new_session=True)
    os.close(slave)
    seen = bytearray()
    try:
        _read_until(master, seen, lambda: b"sorted by newest" in seen, ALERT_S)
        os.write(master, b"s")
        _read_until(master, seen, lambda: b"sorted by oldest" in seen, ALERT_S)
        os.write(master, b"j")
        _read_until(master, seen, lambda: b"1 above" in seen, ALERT_S)
        os.write(master, b"q")
        _read_until(master, seen, lambda: proc.poll() is not None, ALERT_S)
        assert proc.wait(ALERT_S) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    assert b"Traceback" not in seen
