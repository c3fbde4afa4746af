"""Entry point of `mcpctl`: the fast path for allocate/release, else the Typer app.

Ctrl-C at any moment from here on, imports included, exits 130 without a traceback (the commands that wait
catch it themselves to clean up first). A stdout closed before the start (`>&-`) or by its reader (`| head`)
costs no traceback and leaves the exit status the command's own; `allocate` releases what it could not print.
"""

from __future__ import annotations

import sys

INTERRUPTED = 130  # mcpctl.exitcodes.INTERRUPTED, not imported: Ctrl-C may come before it could be


def main(argv: list[str] | None = None) -> int:
    if sys.stdout is None:
        _hold_fd_1()
    try:
        code = _main(sys.argv[1:] if argv is None else argv)
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


def _main(args: list[str]) -> int:
    from mcpctl.fast import try_fast

    code = try_fast(args)
    if code is None:
        from mcpctl.app import run_app

        code = run_app(args)
    if code != 0 and _for_eval(args):
        from mcpctl.actions import emit

        emit(f"(exit {code})")
    return code


def _for_eval(args: list[str]) -> bool:
    """`allocate --env`, whose output a script evals: a failure must fail the eval too, so it prints `(exit N)`
    (bash, dash and zsh alike; under `set -e` the script stops with N), whatever the failure (usage errors too)."""
    command = next((arg for arg in args if not arg.startswith("-")), None)
    return command == "allocate" and "--env" in args and "--json" not in args
