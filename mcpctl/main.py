"""Entry point of `mcpctl`: the fast path for allocate/release, else the Typer app.

Ctrl-C at any moment from here on, imports included, exits 130 without a traceback (the commands that wait
catch it themselves to clean up first).
"""

from __future__ import annotations

import sys

INTERRUPTED = 130  # mcpctl.exitcodes.INTERRUPTED, not imported: Ctrl-C may come before it could be


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(sys.argv[1:] if argv is None else argv)
    except KeyboardInterrupt:
        return INTERRUPTED


def _main(args: list[str]) -> int:
    from mcpctl.fast import try_fast

    code = try_fast(args)
    if code is not None:
        return code
    from mcpctl.app import run_app

    return run_app(args)
