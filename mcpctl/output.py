"""Printing without Rich: JSON, plain tables for pipes, and the calls every command shares."""

from __future__ import annotations

import datetime
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Annotated, Any, NoReturn

import typer

from mcpctl import exitcodes
from mcpctl.actions import fail, format_duration, rpc_failure, unreachable
from mcpctl.client import Client, DaemonUnreachable, RpcError
from mcpctl.escape import printable
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


def duration(text: str | None, option: str, *, forever: bool = True) -> float | None:
    """Seconds from a --timeout/--ttl value; None for `forever` (or no value). An option that needs a finite
    time passes `forever=False`: its error then offers no `forever`, which it would refuse."""
    if text is None:
        return None
    try:
        return parse_duration(text, forever=forever)
    except UnitError as error:
        usage(f"{option}: {error}")


def local_time(timestamp: float | None) -> str:
    """A local time with its zone, as tables print it: '2025-06-01 14:03:10 +0200'; '-' for none."""
    if timestamp is None:
        return "-"
    return datetime.datetime.fromtimestamp(timestamp).astimezone().strftime("%Y-%m-%d %H:%M:%S %z")


def when(timestamp: float | None, now: float | None = None) -> str:
    """A local time and how far away it is: '2025-06-01 14:03:10 +0200 (in 9m59s)'."""
    if timestamp is None:
        return "-"
    now = time.time() if now is None else now
    text = local_time(timestamp)
    delta = timestamp - now
    return f"{text} (in {format_duration(delta)})" if delta >= 0 else f"{text} ({format_duration(-delta)} ago)"


def exit_with(code: int) -> NoReturn:
    raise typer.Exit(code)


def usage(message: str) -> NoReturn:
    exit_with(fail(message, exitcodes.USAGE))


def print_json(data: Any) -> None:
    """The API's JSON, with an ISO 8601 time beside each epoch time (`created_at_iso` beside `created_at`)."""
    from mcpctl.actions import with_iso_times

    print(json.dumps(with_iso_times(data), indent=2, ensure_ascii=False))


def fancy() -> bool:
    """Rich output only on a terminal, never on a pipe; NO_COLOR is honoured by Rich itself."""
    return sys.stdout.isatty() and os.environ.get("TERM") != "dumb"


def plain_table(headers: Sequence[str], rows: Sequence[Sequence[str]], *, show_headers: bool = True) -> None:
    """Columns of text for a pipe, each cell `printable`: a control character in a name is shown escaped."""
    headers = [printable(h) for h in headers]
    rows = [[printable(cell) for cell in row] for row in rows]
    widths = [max(len(str(h)) if show_headers else 0, *(len(str(r[i])) for r in rows)) if rows else len(h)
              for i, h in enumerate(headers)]
    for line in [headers, *rows] if show_headers else rows:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(line, widths)).rstrip())


Columns = Annotated[
    str | None,
    typer.Option("--output", "-o", metavar="COLUMNS",
                 help="Print only these columns, comma-separated, in this order (e.g. -o id,state,holder); "
                      "plain text, even on a terminal."),
]
NoHeaders = Annotated[bool, typer.Option("--no-headers", help="Leave out the header line (for scripts).")]


def listing(headers: Sequence[str], rows: Sequence[Sequence[str]], *, columns: str | None, no_headers: bool,
            default: Sequence[str] | None = None, rich: Callable[[], None] | None = None) -> None:
    """A table as asked: `columns` (-o, names as the headers in lower case, any of `headers`), else `default`
    (the headers shown when none are asked for); Rich on a terminal unless -o or --no-headers."""
    names = [h.lower() for h in headers]
    if columns is None:
        if rich is not None and not no_headers and fancy():
            rich()
            return
        chosen = [names.index(h.lower()) for h in (default or headers)]
    else:
        asked = [c.strip().lower() for c in columns.split(",")]
        unknown = [c for c in asked if c not in names]
        if unknown or not columns.strip():
            usage(f"-o/--output takes column names, comma-separated, from: {','.join(names)}; got {columns!r}")
        chosen = [names.index(c) for c in asked]
    plain_table([headers[i] for i in chosen], [[row[i] for i in chosen] for row in rows],
                show_headers=not no_headers)
