"""`mcpctl allocations`: active (or all) allocations, or the details of some."""

from __future__ import annotations

import time
from typing import Annotated, Any

import typer

from mcpctl import complete
from mcpctl.output import Columns, NoHeaders, call, listing, local_time, print_json, usage
from mcpctl.view import age, cost_text, items_text, used_text
from mcpresd.protocol import ALLOCATIONS_PAGE, Method


def allocations(
    ctx: typer.Context,
    ids: Annotated[list[str] | None, typer.Argument(help="Show only these allocations (any state).",
                                                                autocompletion=complete.allocation_ids)] = None,
    all_: Annotated[bool, typer.Option("--all", help="Include released, withdrawn and queued allocations.")] = False,
    queued: Annotated[bool, typer.Option("--queued", help="Only queued requests, waiting to be granted.")] = False,
    limit: Annotated[int, typer.Option(help="At most this many, newest first.", min=1, max=100_000)] = 1000,
    json_output: Annotated[bool, typer.Option("--json", help="Print the API's JSON.")] = False,
    columns: Columns = None,
    no_headers: NoHeaders = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print only the ids, one a line.")] = False,
) -> None:
    """List allocations (active ones unless --all or --queued), or the ones named.

    Examples: mcpctl allocations; mcpctl allocations --queued; mcpctl allocations --all --json;
    mcpctl allocations -o id,state,holder,created --no-headers; mcpctl allocations -q | xargs -r mcpctl release

    -o takes any of the columns shown and owner, created, granted, expires (local times with their zone).
    """
    if all_ and queued:
        usage("choose one of --all and --queued")
    if sum((json_output, quiet, columns is not None)) > 1:
        usage("choose one of --json, -q and -o")
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
        return
    if quiet:
        for allocation in rows:
            print(allocation["id"])
        return
    now = time.time()

    def rich() -> None:
        from mcpctl import render

        render.allocations(rows)

    listing(HEADERS, [cells(a, now) for a in rows], columns=columns, no_headers=no_headers,
            default=HEADERS[:9], rich=rich)


HEADERS = ("ID", "STATE", "PRIORITY", "ITEMS", "TOOL", "HOLDER", "USED", "AGE", "COST",
           "OWNER", "CREATED", "GRANTED", "EXPIRES")


def cells(a: dict[str, Any], now: float) -> tuple[str, ...]:
    return (a["id"], a["state"], a["priority"], items_text(a), a["tool_id"] or "-", str(a["holder_pid"] or "-"),
            used_text(a), age(now - a["created_at"]), cost_text(a), str(a.get("owner_uid", "-")),
            local_time(a.get("created_at")), local_time(a.get("granted_at")), local_time(a.get("expires_at")))


def register(app: typer.Typer) -> None:
    app.command()(allocations)
