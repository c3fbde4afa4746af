"""Strings other users, admins and the system chose reach a person's terminal shown, never obeyed.

The installed `mcpctl` against a real daemon, on a pseudo-terminal (Rich) and on a pipe (plain text). Another
user's tool id carries Rich markup (an OSC 8 hyperlink, reverse video, an emoji code), an 8-bit CSI (U+009B),
NEL (U+0085) and a right-to-left override; an admin's resource name, unit and label and a pool name carry the
same. What the terminal gets: no hyperlink, no raw C1 or bidi character, the markup as it was typed, the
controls as their escapes, and ordinary Unicode (é, 中文) as it is. `--json` stays exact.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import DaemonProcess, ok
from tests.e2e.test_monitor_cli import ALERT_S, CONFIG as MONITOR_CONFIG, Lines, ended, follower, on_terminal_raw
from tests.integration.test_access import NOBODY, nobodys_process  # noqa: F401 - a fixture

pytestmark = pytest.mark.e2e

MARKUP = "[link=http://evil.example/]click[/link][reverse]X[/]"
TOOL = f"{MARKUP} :thumbs_up: \x9b31mC1\u202eRTL\x85 é中文"
EXECUTION = "run[bold]\u2066é中文\u2069"
RESOURCE = "lic:[reverse]R[/]\x9b\u202eé中文"  # no spaces, ',' or '=' in a resource name
UNIT = "[link=http://evil.example/]u[/link]\x9b"
LABEL = "[link=http://evil.example/]l[/link]\u202e中文"
POOL = "p\x9b\u202eé中文"  # no brackets in a pool name
RAW = ("\x9b", "\u202e", "\u2066", "\u2069", "\x85")
"""Characters from the data that must never reach the terminal as they are."""
SGR = re.compile(r"\x1b\[[0-9;]*m")


def shown(text: str) -> str:
    """What a person reads: `text` without the styles (Rich's own SGR sequences); any other ESC stays."""
    return SGR.sub("", text).replace("\r\n", "\n")


def assert_safe(text: str) -> None:
    assert "\x1b]8" not in text, "an OSC 8 hyperlink from the data"
    assert "\x1b" not in shown(text), "an escape sequence other than a style"
    for char in RAW:
        assert char not in text, f"raw {char!r} from the data"
    assert "👍" not in text, "an emoji code from the data was read"


@pytest.fixture
def hostile(tmp_path: Path) -> Iterator[DaemonProcess]:
    """A daemon with an allocation by a hostile tool, a resource added by root with hostile name, unit and label,
    and a pool named with controls."""
    daemon = DaemonProcess(tmp_path)
    daemon.start()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        ok(daemon, "allocate", "--res", "slot=1", "--res", "licence=2", "--tool", TOOL, "--exec", EXECUTION,
           "--holder-pid", str(holder.pid))
        ok(daemon, "resource", "add", RESOURCE, "--capacity", "3", "--unit", UNIT, "--label", f"k={LABEL}")
        ok(daemon, "pool", "create", POOL, "--factory", "slots", "--parent", "slot", "--slot-size", "1", "--max", "2")
        yield daemon
    finally:
        holder.kill()
        holder.wait()
        daemon.stop()


def test_allocations_on_a_terminal_show_the_tool_id_as_typed(hostile: DaemonProcess) -> None:
    code, screen = on_terminal_raw(hostile, "allocations", columns=250, lines=50)

    assert code == 0
    assert_safe(screen)
    assert f"{MARKUP} :thumbs_up: \\x9b31mC1\\u202eRTL\\x85 é中文" in shown(screen)


def test_resources_and_pools_on_a_terminal_show_names_units_and_labels_escaped(hostile: DaemonProcess) -> None:
    for args in (("resources",), ("pools",), ("pool", "show", POOL), ("status",)):
        code, screen = on_terminal_raw(hostile, *args, columns=250, lines=50)
        assert code == 0, args
        assert_safe(screen)
    assert "lic:[reverse]R[/]\\x9b\\u202eé中文" in shown(on_terminal_raw(hostile, "resources", columns=250,
                                                                        lines=50)[1])
    assert "p\\x9b\\u202eé中文" in shown(on_terminal_raw(hostile, "pools", columns=250, lines=50)[1])


def test_top_on_a_terminal_shows_the_execution_id_escaped(hostile: DaemonProcess) -> None:
    code, screen = on_terminal_raw(hostile, "top", "--once", columns=250, lines=50)

    assert code == 0
    assert_safe(screen)
    assert "run[bold]\\u2066é中文" in shown(screen)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: another user allocates (setpriv)")
def test_another_users_tool_id_reaches_roots_terminal_escaped(nobodys_process: int) -> None:
    """The report as found: nobody (uid 65534) allocates with a hostile tool id; root lists allocations."""
    base = Path(tempfile.mkdtemp(prefix="hostile-strings-"))  # pytest's own temporary directory is root's alone
    base.chmod(0o755)
    daemon = DaemonProcess(base, extra_args=("--socket-mode", "0666"))
    try:
        daemon.start()
        theirs = subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                                 str(Path(sys.executable).parent / "mcpctl"), "allocate", "--res", "slot=1",
                                 "--tool", TOOL, "--holder-pid", str(nobodys_process)],
                                capture_output=True, text=True, timeout=60,
                                env=dict(os.environ, MCPRES_SOCKET=daemon.socket))
        assert theirs.returncode == 0, theirs.stderr
        [listed] = json.loads(ok(daemon, "allocations", "--json"))
        assert (listed["id"], listed["owner_uid"], listed["tool_id"]) == (theirs.stdout.strip(), NOBODY, TOOL)

        code, screen = on_terminal_raw(daemon, "allocations", columns=250, lines=50)
    finally:
        if daemon.proc is not None:
            daemon.stop()
        shutil.rmtree(base, ignore_errors=True)

    assert code == 0
    assert_safe(screen)
    assert f"{MARKUP} :thumbs_up: \\x9b31mC1\\u202eRTL\\x85 é中文" in shown(screen)


@pytest.mark.parametrize("args", [("allocations",), ("allocations", "-o", "id,tool"), ("events",), ("resources",),
                                  ("pools",), ("pool", "show", POOL)],
                         ids=["allocations", "allocations -o", "events", "resources", "pools", "pool show"])
def test_plain_output_on_a_pipe_shows_controls_escaped(hostile: DaemonProcess, args: tuple[str, ...]) -> None:
    out = ok(hostile, *args)

    assert_safe(out)
    assert "é中文" in out


def test_events_show_the_admins_unit_and_label_escaped_and_the_markup_as_typed(hostile: DaemonProcess) -> None:
    out = ok(hostile, "events")

    assert "unit=[link=http://evil.example/]u[/link]\\x9b" in out
    assert "lic:[reverse]R[/]\\x9b\\u202eé中文" in out


def test_explain_names_the_blocking_tool_escaped(hostile: DaemonProcess) -> None:
    queued = ok(hostile, "allocate", "--res", "licence=1", "--wait", "forever", "--no-block").strip()

    out = ok(hostile, "explain", queued)

    assert_safe(out)
    assert f"tool {MARKUP} :thumbs_up: \\x9b31mC1\\u202eRTL\\x85 é中文" in out


def test_json_keeps_every_string_exact(hostile: DaemonProcess) -> None:
    allocations = ok(hostile, "allocations", "--json")
    resources = json.loads(ok(hostile, "resources", "--json"))
    pools = json.loads(ok(hostile, "pools", "--json"))

    assert TOOL in allocations.replace("\\u0085", "\x85")  # json.dumps escapes C0 only; NEL stays raw too
    assert [(a["tool_id"], a["execution_id"]) for a in json.loads(allocations)] == [(TOOL, EXECUTION)]
    ours = next(r for r in resources if r["name"] == RESOURCE)
    assert (ours["unit"], ours["labels"]["k"]) == (UNIT, LABEL)
    assert POOL in [p["name"] for p in pools]


@pytest.fixture
def monitored_hostile(tmp_path: Path) -> Iterator[DaemonProcess]:
    """A daemon whose replayed GPU fires `gpu-busy` a few seconds after start, held by the hostile tool."""
    daemon = DaemonProcess(tmp_path, config=MONITOR_CONFIG)
    daemon.start()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        ok(daemon, "allocate", "--gpu", "1", "--tool", TOOL, "--holder-pid", str(holder.pid))
        yield daemon
    finally:
        holder.kill()
        holder.wait()
        daemon.stop()


def test_alerts_follow_shows_the_holders_tool_id_escaped(monitored_hostile: DaemonProcess) -> None:
    proc = follower(monitored_hostile, "alerts", "--follow")
    try:
        lines = Lines(proc)
        line = lines.next(ALERT_S)
        while line is not None and "alert.firing" not in line:
            line = lines.next(ALERT_S)
    finally:
        ended(proc)

    assert line is not None
    assert_safe(line)
    assert f"tool {MARKUP} :thumbs_up: \\x9b31mC1\\u202eRTL\\x85 é中文" in line
    code, screen = on_terminal_raw(monitored_hostile, "alerts", "--all", columns=250, lines=50)
    assert code == 0
    assert_safe(screen)
    assert f"tool {MARKUP} :thumbs_up: \\x9b31mC1\\u202eRTL\\x85 é中文" in shown(screen)
