"""Printing without Rich: JSON, plain tables for pipes, and the calls every command shares."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

import typer

from mcpctl import exitcodes
from mcpctl.actions import fail, rpc_failure
from mcpctl.client import Client, DaemonUnreachable, RpcError


def socket_of(ctx: typer.Context) -> str:
    path: str = ctx.obj["socket"]
    return path


def call(ctx: typer.Context, method: str, params: dict[str, Any] | None = None) -> Any:
    """One RPC, with failures turned into a message on stderr and an exit code."""
    try:
        with Client(socket_of(ctx)) as client:
            return client.call(method, params)
    except DaemonUnreachable as error:
        exit_with(fail(f"{error} (start it with `mcpresd`)", exitcodes.UNREACHABLE))
    except RpcError as error:
        exit_with(rpc_failure(error))


def exit_with(code: int) -> NoReturn:
    raise typer.Exit(code)


def usage(message: str) -> NoReturn:
    exit_with(fail(message, exitcodes.USAGE))


def print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, ensure_ascii=False))


def fancy() -> bool:
    """Rich output only on a terminal, never on a pipe; NO_COLOR is honoured by Rich itself."""
    return sys.stdout.isatty() and os.environ.get("TERM") != "dumb"


def plain_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    for line in [headers, *rows]:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(line, widths)).rstrip())
