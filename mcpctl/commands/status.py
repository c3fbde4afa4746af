"""`mcpctl status`: is the daemon up, and what does it hold."""

from __future__ import annotations

from typing import Annotated

import typer

from mcpctl.escape import printable
from mcpctl.output import call, fancy, print_json
from mcpresd.protocol import Method


def status(
    ctx: typer.Context,
    json_output: Annotated[bool, typer.Option("--json", help="Print the API's JSON.")] = False,
) -> None:
    """Show the daemon's version, uptime, socket (and how mcpctl found it), config file, database and counts.

    With --json, `found` says which socket mcpctl chose and why (source: --socket, $MCPRES_SOCKET, user or
    system; tried: the paths it looked at).

    Example: mcpctl status --json
    """
    data = call(ctx, Method.DAEMON_STATUS)
    data["found"] = ctx.obj["socket_choice"].describe()
    if json_output:
        print_json(data)
        return
    from mcpctl import render

    if fancy():
        render.status(data)
    else:
        for label, value in render.status_rows(data):
            print(printable(f"{label}: {value}"))


def register(app: typer.Typer) -> None:
    app.command()(status)
