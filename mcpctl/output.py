"""Printing without Rich: JSON, plain tables for pipes, and the calls every command shares."""

from __future__ import annotations

import datetime
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any, NoReturn

import typer

from mcpctl import exitcodes
from mcpctl.actions import fail, format_duration, rpc_failure, unreachable
from mcpctl.client import Client, DaemonUnreachable, RpcError
from mcpresd.protocol import UnitError, parse_duration


def socket_of(ctx: typer.Context) -> str:
    path: str = ctx.obj["socket"]
    return path


def retry_of(ctx: typer.Context) -> float:
    """Seconds to ride through a daemon restart (global --retry-for)."""
    seconds: float = ctx.obj["retry_for"]
    return seconds


def call(ctx: typer.Context, method: str, params: dict[str, Any] | None = None, *,
         timeout: float | None = 30.0) -> Any:
    """One RPC, with failures turned into a message on stderr and an exit code; Ctrl-C exits 130."""
    try:
        with Client(socket_of(ctx), timeout=timeout, retry_for=retry_of(ctx)) as client:
            return client.call(method, params)
    except DaemonUnreachable as error:
        exit_with(unreachable(error))
    except RpcError as error:
        exit_with(rpc_failure(error))
    except KeyboardInterrupt:
        exit_with(exitcodes.INTERRUPTED)


def duration(text: str | None, option: str) -> float | None:
    """Seconds from a --timeout/--ttl value; None for `forever` (or no value)."""
    if text is None:
        return None
    try:
        return parse_duration(text)
    except UnitError as error:
        usage(f"{option}: {error}")


def when(timestamp: float | None, now: float | None = None) -> str:
    """A local time and how far away it is: '2025-06-01 14:03:10 (in 9m59s)'."""
    if timestamp is None:
        return "-"
    now = time.time() if now is None else now
    text = datetime.datetime.fromtimestamp(timestamp).strftime("%Y-%m-%d %H:%M:%S")
    delta = timestamp - now
    return f"{text} (in {format_duration(delta)})" if delta >= 0 else f"{text} ({format_duration(-delta)} ago)"


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
