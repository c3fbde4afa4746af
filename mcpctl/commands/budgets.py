"""`mcpctl budgets`: every budget, what was spent of it this period, and when it resets."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from mcpctl.commands.budget import subject_text
from mcpctl.output import Columns, NoHeaders, call, listing, local_time, print_json
from mcpctl.view import BUDGET_STYLES, money, percent
from mcpresd.protocol import Method

HEADERS = ("SCOPE", "SUBJECT", "PERIOD", "SPENT/LIMIT", "USED", "STATE", "RESETS")


def budgets(
    ctx: typer.Context,
    json_output: Annotated[bool, typer.Option("--json", help="Print the API's JSON.")] = False,
    columns: Columns = None,
    no_headers: NoHeaders = False,
) -> None:
    """List budgets: spent of the limit this period, the state (ok, soft, exceeded) and when it resets.

    Examples:

      mcpctl budgets

      mcpctl budgets --json | jq '.[] | select(.state == "exceeded")'

      mcpctl budgets -o subject,state --no-headers

    Set one with `mcpctl budget set`. An exceeded budget refuses new
    allocations it covers until its period resets.
    """
    rows = call(ctx, Method.BUDGETS_LIST)
    if json_output:
        print_json(rows)
    elif not rows and columns is None and not no_headers:
        print("no budgets (set one with `mcpctl budget set`)")
    else:
        def rich() -> None:
            from mcpctl import render

            render.text_table(HEADERS, [budget_cells(b) for b in rows], right=("SPENT/LIMIT", "USED"),
                              styles=[BUDGET_STYLES.get(str(b.get("state"))) for b in rows])

        listing(HEADERS, [budget_cells(b) for b in rows], columns=columns, no_headers=no_headers, rich=rich)


def budget_cells(budget: dict[str, Any]) -> tuple[str, ...]:
    end = budget.get("period_end")
    return (
        str(budget["scope"]),
        subject_text(budget["scope"], budget["subject"]),
        str(budget["period"]),
        f"{money(budget.get('spent'))}/{money(budget['limit'])}",
        percent(budget.get("fraction")),
        str(budget.get("state", "-")),
        local_time(end) if isinstance(end, (int, float)) else "-",
    )


def register(app: typer.Typer) -> None:
    app.command()(budgets)
