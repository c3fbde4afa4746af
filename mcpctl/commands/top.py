"""`mcpctl top`: a live view of resources, what is allocated and measured, firing alerts and allocations.

Rules:
- One JSON-RPC batch per refresh, on one connection kept open; nothing runs
  between refreshes (the process sleeps in `select`), so a refresh a second
  costs well under 1 % of a core.
- Rich is imported only for the live view and for `--once` on a terminal; a
  pipe gets plain text frames (`mcpctl.dashboard`), no ANSI codes.
- The live view redraws once per new data (and on a resize), never on a timer:
  `Live(auto_refresh=False)`, on the terminal's alternate screen.
- By default it refreshes at the daemon's sampling interval, just after each
  sample; a daemon that goes away is shown and retried, not fatal, once the
  view is up. Ctrl-C, SIGTERM or `q` end it with exit 0, Ctrl-C also when
  the shell started it with SIGINT ignored.
"""

from __future__ import annotations

import json
import math
import os
import select
import shutil
import signal
import sys
import time
from types import FrameType, TracebackType
from typing import Annotated, Any

import typer

from mcpctl import dashboard, exitcodes
from mcpctl.actions import quiet_stdout, rpc_failure, unreachable
from mcpctl.client import Client, DaemonUnreachable, RpcError
from mcpctl.output import duration, exit_with, fancy, socket_of, usage
from mcpresd.protocol import Method

MIN_INTERVAL = 0.5
BATCH: tuple[tuple[str, dict[str, Any] | None], ...] = (
    (Method.RESOURCES_LIST, {}),
    (Method.METRICS_CURRENT, {}),
    (Method.ALERTS_LIST, {}),
    (Method.ALLOCATIONS_LIST, {"state": "active"}),
    (Method.ALLOCATIONS_LIST, {"state": "queued"}),
)


def top(
    ctx: typer.Context,
    once: Annotated[bool, typer.Option("--once", help="Print one frame and exit (plain text on a pipe).")] = False,
    interval: Annotated[
        str | None,
        typer.Option("--interval", "-n", metavar="SECONDS",
                     help="Seconds between refreshes, at least 0.5 (also 2s, 1m). Default: the daemon's "
                          "sampling interval, just after each sample."),
    ] = None,
    json_output: Annotated[
        bool, typer.Option("--json", help="Print each refresh's data as JSON (one object per line; with --once, "
                                          "one indented object).")
    ] = False,
    sort: Annotated[
        str, typer.Option("--sort", metavar="ORDER", help=f"How to order the active allocations: "
                                                         f"{', '.join(dashboard.SORTS)} (s cycles them live).",
                          autocompletion=lambda: list(dashboard.SORTS))
    ] = dashboard.SORTS[0],
) -> None:
    """Watch resources, allocations and alerts live: a bar of what is allocated and one of what is used.

    Examples:

      mcpctl top

      mcpctl top --interval 1

      mcpctl top --once | grep gpu

      mcpctl top --once --json | jq '.alerts'

      mcpctl top --sort memory

    Each resource shows two bars, ALLOCATED (granted / capacity) and MEASURED
    (sampled use), GPUs their memory, temperature and power, and a health score
    when below 100; then firing alerts, then active and queued allocations, as
    many as the terminal has room for (queued requests first, never hidden):
    USED (measured from the allocation's cgroup where it has one), PRESSURE
    (cgroup v2: the share of the last 10 s its tasks waited for CPU and
    memory) and ALERTS (firing alerts naming it, such as "overuse memory" for
    a soft allocation over its grant). "n/a": the device does not report it;
    "?": the read failed.

    Keys: s sorts the active allocations (newest, oldest, tool, holder,
    memory); j or down, k or up scroll them a line, space or PgDn, b or PgUp a
    page, g back to the top; any other key refreshes now. Quit with q or
    Ctrl-C (exit 0); exits 5 if the daemon cannot be reached at start.
    """
    every = None
    if interval is not None:
        every = duration(interval, "--interval", forever=False)
        if every is None or not every >= MIN_INTERVAL:
            usage(f"--interval takes {MIN_INTERVAL:g} seconds or more, got {interval!r}")
    if sort not in dashboard.SORTS:
        usage(f"--sort takes one of {', '.join(dashboard.SORTS)}; got {sort!r}")
    exit_with(run_top(socket_of(ctx), once=once, every=every, as_json=json_output, sort=sort))


class _Stop(BaseException):
    """SIGTERM: stop, like Ctrl-C."""


def _stop(signum: int, frame: FrameType | None) -> None:
    raise _Stop()


def fetch(client: Client) -> dashboard.Snapshot:
    resources, metrics, alerts, active, queued = client.batch(BATCH)
    return dashboard.Snapshot(resources, metrics, alerts, active, queued)


def run_top(socket_path: str, *, once: bool, every: float | None, as_json: bool, sort: str = "newest") -> int:
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # also when started with it ignored: Ctrl-C quits
    client = Client(socket_path, timeout=10.0)
    try:
        snapshot = fetch(client)
        interval = every or max(MIN_INTERVAL, float(snapshot.metrics.get("interval_s") or 1.0))
        if once:
            _print_once(snapshot, interval, as_json, sort)
            return exitcodes.OK
        if fancy() and not as_json:
            return _live(client, snapshot, interval, aligned=every is None, sort=dashboard.SORTS.index(sort))
        while True:
            if as_json:
                print(json.dumps(snapshot.as_json(), ensure_ascii=False, separators=(",", ":")), flush=True)
            else:
                print(_plain_frame(snapshot, interval, sort) + "\n", flush=True)
            time.sleep(max(0.0, next_refresh(time.time(), interval, snapshot.metrics, every is None) - time.time()))
            snapshot = fetch(client)
    except DaemonUnreachable as error:
        return unreachable(error)
    except RpcError as error:
        return rpc_failure(error)
    except (KeyboardInterrupt, _Stop):
        return exitcodes.OK
    except BrokenPipeError:
        quiet_stdout()
        return exitcodes.OK
    finally:
        client.close()


def next_refresh(now: float, interval: float, metrics: dict[str, Any], aligned: bool) -> float:
    """When to fetch next: `interval` from now, or, following the daemon's own sampling, just after its next
    sample is in."""
    sampled, sampling = metrics.get("ts"), metrics.get("interval_s")
    if not aligned or sampled is None or not sampling or abs(sampling - interval) > 1e-9:
        return now + interval
    lag = min(0.25, interval / 4)
    target = float(sampled) + lag + math.ceil((now - float(sampled) - lag) / interval) * interval
    return target if target - now >= 0.1 else target + interval


def _print_once(snapshot: dashboard.Snapshot, interval: float, as_json: bool, sort: str) -> None:
    if as_json:
        print(json.dumps(snapshot.as_json(), indent=2, ensure_ascii=False))
    elif fancy():
        from mcpctl import render

        width, height = render.console.size
        lines = dashboard.frame(snapshot, width, height - 1, time.time(), interval=interval, sort=sort)
        render.console.print(render.Frame(lines, end="\n"))
    else:
        print(_plain_frame(snapshot, interval, sort))


def _plain_frame(snapshot: dashboard.Snapshot, interval: float, sort: str) -> str:
    """On a pipe: the width of $COLUMNS (else 80), every row unless $LINES says how many."""
    width = shutil.get_terminal_size((80, 24)).columns
    lines = os.environ.get("LINES", "")
    height = int(lines) if lines.isdigit() else None
    return dashboard.plain(dashboard.frame(snapshot, width, height, time.time(), interval=interval, ascii_only=True,
                                          sort=sort))


def _live(client: Client, snapshot: dashboard.Snapshot, interval: float, *, aligned: bool, sort: int) -> int:
    from rich.live import Live

    from mcpctl import render

    console = render.console
    note: str | None = None
    offset = 0
    with _Wakeups() as wakeups, Live(console=console, auto_refresh=False, screen=True, transient=True,
                                     redirect_stdout=False, redirect_stderr=False) as live:

        def draw() -> None:
            width, height = console.size
            lines = dashboard.frame(snapshot, width, height, time.time(), interval=interval, note=note,
                                    sort=dashboard.SORTS[sort], offset=offset)
            live.update(render.Frame(lines), refresh=True)

        draw()
        while True:
            due = time.monotonic() + next_refresh(time.time(), interval, snapshot.metrics, aligned) - time.time()
            while (why := wakeups.wait(due - time.monotonic())) in MOVES or why in ("resize", "sort"):
                if why == "sort":
                    sort, offset = (sort + 1) % len(dashboard.SORTS), 0
                elif why in MOVES:
                    page = max(1, console.size[1] // 2)
                    offset = max(0, min(len(snapshot.active) - 1, MOVES[why](offset, page)))
                draw()
            if why == "quit":
                return exitcodes.OK
            try:
                snapshot = fetch(client)
                note = None
            except DaemonUnreachable:
                client.close()
                note = "mcpresd unreachable, retrying"
            draw()


class _Wakeups:
    """What ends a wait between refreshes: a resize (SIGWINCH) or a key (q quits, any other refreshes now).

    A self-pipe receives a byte for each signal (`signal.set_wakeup_fd`); the terminal is put in cbreak mode so
    keys arrive at once and are not echoed over the view. Both are undone on exit.
    """

    def __init__(self) -> None:
        self._keys: int | None = None
        self._saved: list[Any] | None = None

    def __enter__(self) -> _Wakeups:
        self._read, self._write = os.pipe()
        os.set_blocking(self._read, False)
        os.set_blocking(self._write, False)
        self._previous_fd = signal.set_wakeup_fd(self._write)
        self._previous_handler = signal.signal(signal.SIGWINCH, lambda signum, frame: None)
        if sys.stdin.isatty():
            import termios
            import tty

            self._keys = sys.stdin.fileno()
            self._saved = termios.tcgetattr(self._keys)
            tty.setcbreak(self._keys)
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        if self._saved is not None and self._keys is not None:
            import termios

            termios.tcsetattr(self._keys, termios.TCSADRAIN, self._saved)
        signal.signal(signal.SIGWINCH, self._previous_handler)
        signal.set_wakeup_fd(self._previous_fd)
        os.close(self._read)
        os.close(self._write)

    def wait(self, timeout: float) -> str | None:
        """'resize', 'quit', 'refresh' (a key), or None once `timeout` seconds have passed."""
        if timeout <= 0:
            return None
        watched = [self._read] if self._keys is None else [self._read, self._keys]
        readable, _, _ = select.select(watched, [], [], timeout)
        if self._read in readable:
            try:
                os.read(self._read, 512)
            except BlockingIOError:
                pass
            return "resize"
        if self._keys is not None and self._keys in readable:
            typed = os.read(self._keys, 64)
            if not typed:
                self._keys = None  # stdin closed: stop watching it
                return "refresh"
            return KEYS.get(typed, KEYS.get(typed[:1], "refresh"))
        return None


KEYS = {b"q": "quit", b"Q": "quit", b"\x04": "quit", b"s": "sort", b"j": "down", b"\x1b[B": "down", b"k": "up",
        b"\x1b[A": "up", b" ": "page-down", b"\x1b[6~": "page-down", b"b": "page-up", b"\x1b[5~": "page-up",
        b"g": "top"}
"""What a key press (or an arrow's escape sequence) asks of the live view."""
MOVES: dict[str | None, Any] = {
    "down": lambda offset, page: offset + 1, "up": lambda offset, page: offset - 1,
    "page-down": lambda offset, page: offset + page, "page-up": lambda offset, page: offset - page,
    "top": lambda offset, page: 0,
}


def register(app: typer.Typer) -> None:
    app.command()(top)
