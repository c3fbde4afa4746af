"""`mcpctl events`: the event log (allocated, released, resources added or removed)."""

from __future__ import annotations

import datetime
from typing import Annotated

import typer

from mcpctl.output import call, plain_table, print_json
from mcpresd.protocol import Method


def events(
    ctx: typer.Context,
    allocation: Annotated[str | None, typer.Option("--allocation", help="Only events of this allocation.")] = None,
    limit: Annotated[int, typer.Option(help="The newest N events.", min=1, max=10_000)] = 50,
    json_output: Annotated[bool, typer.Option("--json", help="Print the API's JSON.")] = False,
) -> None:
    """Show the newest events, oldest first.

    Examples: mcpctl events; mcpctl events --allocation 3f9c2e1b7d4a5e6f --json
    """
    params: dict[str, object] = {"limit": limit}
    if allocation:
        params["allocation_id"] = allocation
    rows = call(ctx, Method.EVENTS_LIST, params)
    if json_output:
        print_json(rows)
        return
    plain_table(
        ("TIME", "EVENT", "ALLOCATION", "RESOURCE", "DETAIL"),
        [
            (
                datetime.datetime.fromtimestamp(e["ts"]).strftime("%Y-%m-%d %H:%M:%S"),
                e["kind"],
                e["allocation_id"] or "-",
                e["resource"] or "-",
                " ".join(f"{k}={v}" for k, v in e["detail"].items()) or "-",
            )
            for e in rows
        ],
    )


def register(app: typer.Typer) -> None:
    app.command()(events)
