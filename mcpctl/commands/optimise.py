"""`mcpctl optimise`: allocations holding much more than they use, and pools that could be smaller. Reports only."""

from __future__ import annotations

import time
from typing import Annotated, Any

import typer

from mcpctl.escape import printable
from mcpctl.output import call, fancy, plain_table, print_json
from mcpctl.view import age, kind_amount, percent
from mcpresd.protocol import Method

OVERSIZED = ("ALLOCATION", "TOOL", "KIND", "HELD", "USED", "USED/HELD", "FOR", "SUGGESTION")
CONSOLIDATE = ("POOL", "SIZE", "BUSY", "IDLE", "COULD REMOVE", "REASON")
REPORT_ONLY = "report only: nothing was changed, moved or released"


def optimise(
    ctx: typer.Context,
    json_output: Annotated[bool, typer.Option("--json", help="Print the API's JSON.")] = False,
) -> None:
    """Report allocations that hold much more than they use, and pools with members to spare. Changes nothing.

    Examples:

      mcpctl optimise

      mcpctl optimise --json | jq '.oversized[] | .suggestion'

    This only reports: no allocation is moved, resized or released, and no
    pool is shrunk. Act on it yourself (ask for less next time, see `mcpctl
    recommend TOOL`; lower a pool's --max). `optimize` is accepted too.
    """
    result = call(ctx, Method.OPTIMISE, {})
    if json_output:
        print_json(result)
        return
    now = time.time()
    oversized = [oversized_cells(o, now) for o in result.get("oversized") or ()]
    consolidate = [consolidate_cells(c) for c in result.get("consolidate") or ()]
    if not oversized and not consolidate:
        print(f"nothing to report ({REPORT_ONLY})")
        return
    sections = [("Allocations holding more than they use", OVERSIZED, oversized),
                ("Pools that could be smaller", CONSOLIDATE, consolidate)]
    for title, headers, rows in sections:
        if not rows:
            continue
        if fancy():
            from mcpctl import render

            render.text_table(headers, rows, title=title, right=("HELD", "USED", "USED/HELD", "SIZE", "BUSY", "IDLE",
                                                                 "COULD REMOVE"))
        else:
            print(printable(f"{title}:"))
            plain_table(headers, rows)
            print()
    print(REPORT_ONLY)


def oversized_cells(entry: dict[str, Any], now: float) -> tuple[str, ...]:
    kind = str(entry.get("kind", "-"))
    since = entry.get("since")
    return (
        str(entry.get("allocation_id", "-")),
        str(entry.get("tool_id") or "-"),
        kind,
        kind_amount(kind, entry.get("held")),
        kind_amount(kind, entry.get("used")),
        percent(entry.get("ratio")),
        age(now - since) if isinstance(since, (int, float)) else "-",
        str(entry.get("suggestion") or "-"),
    )


def consolidate_cells(entry: dict[str, Any]) -> tuple[str, ...]:
    return (
        str(entry.get("pool", "-")),
        str(entry.get("size", "-")),
        str(entry.get("busy", "-")),
        str(entry.get("idle", "-")),
        str(entry.get("could_remove", "-")),
        str(entry.get("reason") or "-"),
    )


def register(app: typer.Typer) -> None:
    app.command()(optimise)
    app.command("optimize", hidden=True, help="Alias of optimise.")(optimise)
