"""`mcpctl allocations`: active (or all) allocations, or the details of some."""

from __future__ import annotations

import time
from typing import Annotated

import typer

from mcpctl.output import call, fancy, plain_table, print_json, usage
from mcpctl.view import age, cost_text, items_text, used_text
from mcpresd.protocol import ALLOCATIONS_PAGE, Method


def allocations(
    ctx: typer.Context,
    ids: Annotated[list[str] | None, typer.Argument(help="Show only these allocations (any state).")] = None,
    all_: Annotated[bool, typer.Option("--all", help="Include released, withdrawn and queued allocations.")] = False,
    queued: Annotated[bool, typer.Option("--queued", help="Only queued requests, waiting to be granted.")] = False,
    limit: Annotated[int, typer.Option(help="At most this many, newest first.", min=1, max=100_000)] = 1000,
    json_output: Annotated[bool, typer.Option("--json", help="Print the API's JSON.")] = False,
) -> None:
    """List allocations (active ones unless --all or --queued), or the ones named.

    Examples: mcpctl allocations; mcpctl allocations --queued; mcpctl allocations --all --json;
    mcpctl allocations 3f9c2e1b7d4a5e6f
    """
    if all_ and queued:
        usage("choose one of --all and --queued")
    if ids:
        rows = [call(ctx, Method.ALLOCATIONS_GET, {"id": allocation_id}) for allocation_id in ids]
    else:
        state = "all" if all_ else "queued" if queued else "active"
        rows = []
        while len(rows) < limit:  # the daemon answers at most ALLOCATIONS_PAGE a request: read on from the last
            asked = min(ALLOCATIONS_PAGE, limit - len(rows))
            page = call(ctx, Method.ALLOCATIONS_LIST, {"state": state, "limit": asked,
                                                       **({"before_id": rows[-1]["id"]} if rows else {})})
            rows += page
            if len(page) < asked:
                break
    if json_output:
        print_json(rows)
    elif fancy():
        from mcpctl import render

        render.allocations(rows)
    else:
        now = time.time()
        plain_table(
            ("ID", "STATE", "PRIORITY", "ITEMS", "TOOL", "HOLDER", "USED", "AGE", "COST"),
            [
                (a["id"], a["state"], a["priority"], items_text(a), a["tool_id"] or "-",
                 str(a["holder_pid"] or "-"), used_text(a), age(now - a["created_at"]), cost_text(a))
                for a in rows
            ],
        )


def register(app: typer.Typer) -> None:
    app.command()(allocations)
