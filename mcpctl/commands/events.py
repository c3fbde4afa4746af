"""`mcpctl events`: the event log (allocated, queued, released, resources added or removed); --follow streams it."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from mcpctl import complete
from mcpctl import stream
from mcpctl.actions import with_iso_times
from mcpctl.escape import printable
from mcpctl.output import Columns, NoHeaders, call, exit_with, listing, local_time, print_json, retry_of, socket_of
from mcpresd.protocol import Method


def events(
    ctx: typer.Context,
    allocation: Annotated[str | None, typer.Option("--allocation", help="Only events of this allocation.",
                                                         autocompletion=complete.allocation_ids)] = None,
    limit: Annotated[int, typer.Option(help="The newest N events.", min=1, max=10_000)] = 50,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing events as they happen, until Ctrl-C.")
    ] = False,
    json_output: Annotated[
        bool, typer.Option("--json", help="Print the API's JSON (with --follow: one object per line).")
    ] = False,
    columns: Columns = None,
    no_headers: NoHeaders = False,
) -> None:
    """Show the newest events, oldest first; with --follow, keep printing new ones as they happen.

    Examples:

      mcpctl events

      mcpctl events --allocation 3f9c2e1b7d4a5e6f --json

      mcpctl events --follow --json | jq -c 'select(.kind == "allocated")'

      mcpctl events -o time,event,allocation --no-headers

    With --follow, a daemon restart is ridden through (--retry-for, 10s by default) and the events written
    meanwhile are shown; exits 0 on Ctrl-C, SIGTERM or a closed pipe, and 5 if the daemon stays away.
    --allocation with an unknown id exits 1.
    """
    params: dict[str, object] = {"limit": limit}
    if allocation:
        call(ctx, Method.ALLOCATIONS_GET, {"id": allocation})  # an unknown id is an error, not an empty log
        params["allocation_id"] = allocation
    if follow:
        def show(event: dict[str, Any]) -> None:
            if allocation is None or event.get("allocation_id") == allocation:
                _print(event, json_output)

        exit_with(stream.follow(socket_of(ctx), show, backlog=params, retry_for=retry_of(ctx)))
    rows = call(ctx, Method.EVENTS_LIST, params)
    if json_output:
        print_json(rows)
        return
    listing(HEADERS, [event_cells(e) for e in rows], columns=columns, no_headers=no_headers)


HEADERS = ("TIME", "EVENT", "ALLOCATION", "RESOURCE", "DETAIL")


def event_cells(event: dict[str, Any]) -> tuple[str, ...]:
    return (
        local_time(event["ts"]),
        event["kind"],
        event["allocation_id"] or "-",
        event["resource"] or "-",
        " ".join(f"{k}={value_text(v)}" for k, v in event["detail"].items()) or "-",
    )


def value_text(value: Any) -> str:
    """A detail value as a person reads it: 2, 0.5, a b, {licence=1, gpu:0=1} (no Python reprs, no 2.0)."""
    if isinstance(value, bool) or value is None:
        return {True: "yes", False: "no", None: "-"}[value]
    if isinstance(value, float):
        return f"{value:.10g}" if abs(value) < 1e15 else f"{value:.0f}"  # not :g, which made 67108864 6.71089e+07
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}={value_text(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(value_text(v) for v in value) + "]"
    return str(value)


def _print(event: dict[str, Any], as_json: bool) -> None:
    line = (json.dumps(with_iso_times(event), ensure_ascii=False, separators=(",", ":")) if as_json
            else printable("  ".join(event_cells(event))))
    print(line, flush=True)


def register(app: typer.Typer) -> None:
    app.command()(events)
