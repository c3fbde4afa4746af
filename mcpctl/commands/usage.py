"""`mcpctl usage`: what was allocated, what it cost, how long requests waited, and how much was used."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any

import typer

from mcpctl.commands.budget import user_name
from mcpctl.output import call, duration, fancy, plain_table, print_json, usage as usage_error
from mcpctl.view import human_duration, kind_fractions, kind_hours, money
from mcpresd.protocol import Method

HEADERS = ("KEY", "ALLOCS", "RESOURCE-HOURS", "COST", "MEAN WAIT", "EFFICIENCY")
RIGHT = ("ALLOCS", "COST", "MEAN WAIT")


class GroupBy(StrEnum):
    TOOL = "tool"
    OWNER = "owner"
    POOL = "pool"
    RESOURCE = "resource"


def usage(
    ctx: typer.Context,
    by: Annotated[GroupBy, typer.Option("--by", help="One row per tool, owner, pool or resource.")] = GroupBy.TOOL,
    since: Annotated[
        str, typer.Option("--since", metavar="DURATION", help="How far back: 1h, 7d, 30d.")
    ] = "7d",
    json_output: Annotated[bool, typer.Option("--json", help="Print the API's JSON.")] = False,
) -> None:
    """Account for allocations: resource-hours, cost, mean wait and efficiency, per tool, owner, pool or resource.

    Examples:

      mcpctl usage

      mcpctl usage --by owner --since 30d

      mcpctl usage --by pool --json | jq '.rows[] | {key, cost}'

    Resource-hours count what was held (memory in byte-hours, e.g. 12G·h);
    EFFICIENCY is what was measured to be used of what was requested, per
    kind, from runs that reported it (`mcpctl run` does; see `mcpctl release
    --measured`). Allocations still active count up to now.
    """
    seconds = duration(since, "--since", forever=False)
    if seconds is None or seconds <= 0:
        usage_error(f"--since takes a duration greater than zero, e.g. 1h, 7d or 30d; got {since!r}")
    result = call(ctx, Method.USAGE, {"by": by.value, "since": seconds})
    if json_output:
        print_json(result)
        return
    rows = [usage_cells(row, key_text(result.get("by", by.value), row["key"])) for row in result["rows"]]
    if not rows:
        print(f"no allocations in the last {human_duration(seconds)}")
        return
    totals = usage_cells(result["totals"], "TOTAL")
    if fancy():
        from mcpctl import render

        render.text_table(HEADERS, rows, right=RIGHT, footer=totals)
    else:
        plain_table(HEADERS, [*rows, totals])


def key_text(by: str, key: object) -> str:
    """A row's key; for owners, the user name beside the uid when this host knows it."""
    if key is None or (by == GroupBy.TOOL and key == "-"):
        return "(no tool)" if by == GroupBy.TOOL else "(none)"
    if by == GroupBy.OWNER and str(key).isdigit():
        name = user_name(int(str(key)))
        return f"{key} ({name})" if name else str(key)
    return str(key)


def usage_cells(row: dict[str, Any], key: str) -> tuple[str, ...]:
    mean_wait = row.get("mean_wait_s")
    allocations = str(row.get("allocations", 0))
    if row.get("active"):
        allocations += f" ({row['active']} active)"
    return (
        key,
        allocations,
        kind_hours(row.get("resource_hours")),
        money(row.get("cost")),
        human_duration(mean_wait) if isinstance(mean_wait, (int, float)) else "-",
        kind_fractions(row.get("efficiency")),
    )


def register(app: typer.Typer) -> None:
    app.command()(usage)
