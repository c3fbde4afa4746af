"""`mcpctl recommend`: what to ask for next time, from what a tool's past runs used."""

from __future__ import annotations

import shlex
from typing import Annotated, Any

import typer

from mcpctl.escape import printable
from mcpctl.output import call, fancy, plain_table, print_json
from mcpctl.view import human_duration, kind_amount
from mcpresd.protocol import Method

HEADERS = ("KIND", "REQUESTED P50", "USED P50", "P90", "P95", "MAX", "RUNS")


def recommend(
    ctx: typer.Context,
    tool: Annotated[str, typer.Argument(metavar="TOOL", help="The tool id the runs were allocated with (--tool).")],
    runs: Annotated[
        int | None,
        typer.Option("--runs", metavar="N", min=1, max=10_000, help="Look at the newest N runs (default: the "
                                                                     "daemon's)."),
    ] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print the API's JSON.")] = False,
) -> None:
    """Recommend a request for a tool from what its past runs measurably used, and show the evidence.

    Examples:

      mcpctl recommend train

      mcpctl recommend train --runs 50

      mcpctl recommend train --json | jq -r '.args | join(" ")'

    Runs count when they reported what they used: `mcpctl run --tool ID` does
    this by itself; otherwise `mcpctl release --measured`. The line printed
    first is the suggested `mcpctl allocate`; the table compares what was
    requested with what was used (percentiles over the runs).
    """
    params: dict[str, Any] = {"tool_id": tool}
    if runs is not None:
        params["runs"] = runs
    result = call(ctx, Method.RECOMMEND, params)
    if json_output:
        print_json(result)
        return
    print(printable(suggestion_line(result)))
    if not result.get("args"):
        return  # no runs: that line says so, and there is no guess to warn of nor any basis to name
    if not result.get("enough"):
        print(printable(f"note: only {result.get('runs', 0)} measured run(s) of {result.get('tool_id', tool)}: "
                        "too few to be sure; the suggestion is a guess"))
    if result.get("basis"):
        print(printable(f"basis: {result['basis']}"))
    rows = [evidence_cells(kind, facts) for kind, facts in sorted((result.get("evidence") or {}).items())]
    if not rows:
        return
    print()
    if fancy():
        from mcpctl import render

        render.text_table(HEADERS, rows, right=HEADERS[1:])
    else:
        plain_table(HEADERS, rows)


def suggestion_line(result: dict[str, Any]) -> str:
    args = [str(a) for a in result.get("args") or ()]
    if not args:
        return f"no recommendation for {result.get('tool_id')}: no measured runs"
    return "mcpctl allocate " + shlex.join(args)


def evidence_cells(kind: str, facts: dict[str, Any]) -> tuple[str, ...]:
    """One kind's evidence: cpu in cores, memory as a size, gpu in devices, duration_s as a duration."""
    def shown(value: object) -> str:
        if kind == "duration_s" and isinstance(value, (int, float)):
            return human_duration(value)
        return kind_amount(kind, value)

    return (
        "duration" if kind == "duration_s" else kind,
        *(shown(facts.get(key)) for key in ("requested_p50", "p50", "p90", "p95", "max")),
        str(facts.get("samples", 0)),
    )


def register(app: typer.Typer) -> None:
    app.command()(recommend)
