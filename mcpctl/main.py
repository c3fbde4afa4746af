"""Entry point of `mcpctl`: the fast path for allocate/release, else the Typer app."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    from mcpctl.fast import try_fast

    code = try_fast(args)
    if code is not None:
        return code
    from mcpctl.app import run_app

    return run_app(args)
