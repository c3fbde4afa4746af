"""Ctrl-C at any moment of an mcpctl command exits 130 without a traceback (README: exit codes).

The moment is made exact, not timed: a real SIGINT is sent by the mcpctl process to itself at a chosen point
(an import about to happen, a function about to run), through the interpreter's own hooks, so the
KeyboardInterrupt arrives exactly there, as one from a terminal would.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mcpctl import exitcodes
from tests.conftest import DaemonProcess, ok

pytestmark = pytest.mark.e2e

MCPCTL = str(Path(sys.executable).parent / "mcpctl")

# Runs mcpctl's console-script entry point, and sends SIGINT to itself when `module` is first imported or
# when the function `function` of module `module` is first called (the interpreter's profile hook).
INTERRUPTED_AT = textwrap.dedent("""
    import os, signal, sys
    module, function = sys.argv[1], sys.argv[2]
    argv = sys.argv[3:]

    class InterruptOnImport:
        def find_spec(self, name, path=None, target=None):
            if name == module and not function:
                os.kill(os.getpid(), signal.SIGINT)
            return None

    def interrupt_on_call(frame, event, arg):
        if event == "call" and frame.f_code.co_name == function and frame.f_globals.get("__name__") == module:
            sys.setprofile(None)
            os.kill(os.getpid(), signal.SIGINT)

    sys.meta_path.insert(0, InterruptOnImport())
    if function:
        sys.setprofile(interrupt_on_call)
    from mcpctl.main import main
    sys.exit(main(argv))
""")


def interrupted(module: str, function: str, *argv: str, socket_path: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, MCPRES_SOCKET=socket_path, MCPRES_RETRY_FOR="0")
    return subprocess.run([sys.executable, "-c", INTERRUPTED_AT, module, function, *argv], capture_output=True,
                          text=True, env=env, timeout=60)


@pytest.mark.parametrize(("module", "function", "argv"), [
    ("mcpctl.fast", "", ("allocate", "--res", "licence=1")),     # importing the fast path
    ("mcpctl.actions", "", ("allocate", "--res", "licence=1")),  # importing what the fast path runs
    ("typer", "", ("status",)),                                  # importing Typer for a command
    ("mcpctl.app", "", ("status",)),                             # importing the commands
    ("mcpctl.app", "main", ("status",)),                         # in Typer's global options, before the command
    ("mcpctl.commands.status", "status", ("status",)),           # as the command starts
])
def test_ctrl_c_at_any_point_of_start_up_exits_130_without_a_traceback(
        daemon: DaemonProcess, module: str, function: str, argv: tuple[str, ...]) -> None:
    result = interrupted(module, function, *argv, socket_path=daemon.socket)

    assert result.returncode == exitcodes.INTERRUPTED, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert "KeyboardInterrupt" not in result.stderr, result.stderr


def test_ctrl_c_before_the_request_leaves_nothing_allocated(daemon: DaemonProcess) -> None:
    result = interrupted("mcpctl.actions", "", "allocate", "--res", "licence=2", socket_path=daemon.socket)

    assert result.returncode == exitcodes.INTERRUPTED, result.stderr
    assert ok(daemon, "allocate", "--res", "licence=2").strip()  # both seats still free


def test_the_interruption_hook_itself_fires(daemon: DaemonProcess) -> None:
    """The hook above really interrupts: without mcpctl's handling the same SIGINT is a KeyboardInterrupt."""
    script = INTERRUPTED_AT.replace("from mcpctl.main import main\nsys.exit(main(argv))",
                                    "import mcpctl.fast\nsys.exit(0)")
    result = subprocess.run([sys.executable, "-c", script, "mcpctl.fast", ""], capture_output=True, text=True,
                            timeout=60)

    assert result.returncode == -signal.SIGINT, result.stderr
    assert "KeyboardInterrupt" in result.stderr
