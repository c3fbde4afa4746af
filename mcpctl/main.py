"""Entry point of `mcpctl`: the fast path for allocate/release, else the Typer app.

Ctrl-C at any moment from here on, imports included, exits 130 without a traceback (the commands that wait
catch it themselves to clean up first).

The installed command (bin/mcpctl, `python -m mcpctl`) passes `exit_at_once`: a command the fast path
served runs without the cyclic garbage collector and ends with os._exit once stdout and stderr are
flushed. Tearing the interpreter down (module by module, then a last full collection) cost more than the
call to the daemon; the fast path leaves nothing behind that needs it (no atexit hook, no file but the
two streams, sockets the kernel closes). Typer's commands, some of which run for hours, exit as usual.
"""

from __future__ import annotations

import gc
import os
import sys

INTERRUPTED = 130  # mcpctl.exitcodes.INTERRUPTED, not imported: Ctrl-C may come before it could be


def main(argv: list[str] | None = None, *, exit_at_once: bool = False) -> int:
    try:
        return _main(sys.argv[1:] if argv is None else argv, exit_at_once)
    except KeyboardInterrupt:
        return INTERRUPTED


def _main(args: list[str], exit_at_once: bool) -> int:
    if exit_at_once:
        gc.disable()
    from mcpctl.fast import try_fast

    code = try_fast(args)
    if code is not None:
        if exit_at_once:
            _exit(code)
        return code
    if exit_at_once:
        gc.enable()
    from mcpctl.app import run_app

    return run_app(args)


def _exit(code: int) -> None:
    """Flush the streams and end the process now; if a flush fails, return to let Python's own exit report it."""
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):
        return
    os._exit(code)
