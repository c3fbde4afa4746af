"""`mcpctl pools`: every resource pool, how full it is, and what it costs."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from mcpctl.output import Columns, NoHeaders, call, listing, print_json, usage
from mcpctl.view import money, percent
from mcpresd.protocol import Method

HEADERS = ("NAME", "FACTORY", "STATE", "BUSY/SIZE", "QUEUED", "UTIL", "MIN..MAX", "STRATEGY", "COST/MEMBER-H")
RIGHT = ("BUSY/SIZE", "QUEUED", "UTIL", "COST/MEMBER-H")
STATE_STYLES = {"active": None, "draining": "yellow", "drained": "dim"}


def pools(
    ctx: typer.Context,
    json_output: Annotated[bool, typer.Option("--json", help="Print the API's JSON.")] = False,
    columns: Columns = None,
    no_headers: NoHeaders = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print only the names, one a line.")] = False,
) -> None:
    """List resource pools: members busy of the pool's size, queued requests, utilisation, bounds and cost.

    Examples:

      mcpctl pools

      mcpctl pools --json | jq '.[] | select(.state != "active") | .name'

      mcpctl pools -o name,state,util --no-headers

    UTIL is (busy + queued) / size: above the pool's scale-up threshold it
    grows, below its scale-down threshold it shrinks, within MIN..MAX (static
    pools are fixed). See `mcpctl pool show NAME` for one pool and its members.
    """
    if sum((json_output, quiet, columns is not None)) > 1:
        usage("choose one of --json, -q and -o")
    rows = call(ctx, Method.POOLS_LIST)
    if json_output:
        print_json(rows)
    elif quiet:
        for pool in rows:
            print(pool["name"])
    elif not rows and columns is None and not no_headers:
        print("no pools (create one with `mcpctl pool create`)")
    else:
        def rich() -> None:
            from mcpctl import render

            render.text_table(HEADERS, [pool_cells(p) for p in rows], right=RIGHT,
                              styles=[STATE_STYLES.get(p.get("state", "")) for p in rows])

        listing(HEADERS, [pool_cells(p) for p in rows], columns=columns, no_headers=no_headers, rich=rich)


def pool_cells(pool: dict[str, Any]) -> tuple[str, ...]:
    return (
        pool["name"],
        str(pool.get("factory", "-")),
        str(pool.get("state", "-")),
        f"{pool.get('busy', 0)}/{pool.get('size', 0)}",
        str(pool.get("queued", 0)),
        percent(pool.get("utilisation")),
        bounds_text(pool),
        str(pool.get("strategy") or "-"),
        money(pool.get("cost_per_unit_hour")),
    )


def bounds_text(pool: dict[str, Any]) -> str:
    """'1..4' members; 'fixed' for a static pool, which never scales."""
    if pool.get("factory") == "static":
        return "fixed"
    high = pool.get("max")
    return f"{pool.get('min', 0)}..{'-' if high is None else high}"


def register(app: typer.Typer) -> None:
    app.command()(pools)
