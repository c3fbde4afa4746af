"""Entry point of `mcpctl`: the fast path for allocate/release, else the Typer app.

Ctrl-C at any moment from here on, imports included, exits 130 without a traceback (the commands that wait
catch it themselves to clean up first). A stdout closed before the start (`>&-`) or by its reader (`| head`)
costs no traceback and leaves the exit status the command's own; `allocate` releases what it could not print.

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
    if sys.stdout is None:
        _hold_fd_1()
    try:
        code = _main(sys.argv[1:] if argv is None else argv, exit_at_once)
    except KeyboardInterrupt:
        return INTERRUPTED
    if sys.stdout is not None:
        try:
            sys.stdout.flush()
        except OSError:
            from mcpctl.actions import quiet_stdout

            quiet_stdout()
    return code


def _hold_fd_1() -> None:
    """Started with fd 1 closed: put /dev/null there, so no socket or file opened later lands on it (and a
    `mcpctl run` command does not inherit one as its stdout). sys.stdout stays None: nothing can be printed."""
    import os

    fd = os.open(os.devnull, os.O_WRONLY)
    if fd != 1:
        os.dup2(fd, 1)
        os.close(fd)


def _main(args: list[str], exit_at_once: bool) -> int:
    if exit_at_once:
        gc.disable()
    from mcpctl.fast import try_fast

    code = try_fast(args)
    if code is not None:
        _tell_eval(args, code)
        if exit_at_once:
            _exit(code)
        return code
    if exit_at_once:
        gc.enable()
    from mcpctl.app import run_app

    code = run_app(args)
    _tell_eval(args, code)
    return code


def _tell_eval(args: list[str], code: int) -> None:
    """`allocate --env`, whose output a script evals: a failure must fail the eval too, so it prints `(exit N)`
    (bash, dash and zsh alike; under `set -e` the script stops with N), whatever the failure (usage errors too)."""
    if code == 0:
        return
    command = next((arg for arg in args if not arg.startswith("-")), None)
    if command == "allocate" and "--env" in args and "--json" not in args:
        from mcpctl.actions import emit

        emit(f"(exit {code})")


def _exit(code: int) -> None:
    """Flush the streams and end the process now; if a flush fails, return to let main() deal with it (a closed
    stdout: no traceback, the command's own status) and Python's own exit follow."""
    try:
        if sys.stdout is not None:
            sys.stdout.flush()
        if sys.stderr is not None:
            sys.stderr.flush()
    except (OSError, ValueError):
        return
    os._exit(code)
