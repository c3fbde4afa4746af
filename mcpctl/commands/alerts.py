"""`mcpctl alerts`: alerts firing or pending now (or all, resolved ones too); --follow prints them as they change."""

from __future__ import annotations

import datetime
import json
import time
from typing import Annotated, Any

import typer

from mcpctl import stream
from mcpctl.escape import printable
from mcpctl.output import (Columns, NoHeaders, call, exit_with, listing, local_time, print_json, retry_of,
                           socket_of, usage)
from mcpctl.view import alert_value_text, human_duration
from mcpresd.protocol import Method

HEADERS = ("ID", "STATE", "LEVEL", "ALERT", "RESOURCE", "VALUE", "SINCE", "DURATION", "MIN", "MAX", "AVG", "HELD BY")


def alerts(
    ctx: typer.Context,
    all_: Annotated[
        bool, typer.Option("--all", help="Include resolved alerts, with how long they fired and min/max/avg.")
    ] = False,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Print alerts as they fire, change level or resolve, until Ctrl-C.")
    ] = False,
    json_output: Annotated[
        bool, typer.Option("--json", help="Print the API's JSON (with --follow: one event object per line).")
    ] = False,
    columns: Columns = None,
    no_headers: NoHeaders = False,
) -> None:
    """List alerts that are firing or pending (waiting out their rule's `for`); --all adds resolved ones.

    Examples:

      mcpctl alerts

      mcpctl alerts --all --json | jq '.[] | select(.rule == "gpu-busy")'

      mcpctl alerts --follow

      mcpctl alerts --follow --json | jq -c 'select(.kind == "alert.firing")'

      mcpctl alerts --all -o id,state,level,alert --no-headers

    HELD BY names the allocations that held the resource when the alert fired,
    largest first; for foreign-gpu-use, the allocations concerned and the pids
    of the GPU processes their grants do not cover ("gpu pid N"). With
    --follow, a daemon restart is ridden through (--retry-for, 10s by default),
    missing nothing; exits 0 on Ctrl-C, SIGTERM or a closed pipe, and 5 if the
    daemon stays away.
    """
    if follow:
        if all_:
            usage("--all lists past alerts; --follow prints new ones as they happen: choose one")

        def show(event: dict[str, Any]) -> None:
            if str(event.get("kind", "")).startswith("alert."):
                print(json.dumps(event, ensure_ascii=False, separators=(",", ":")) if json_output
                      else printable(event_line(event)), flush=True)

        exit_with(stream.follow(socket_of(ctx), show, retry_for=retry_of(ctx)))
    rows = call(ctx, Method.ALERTS_LIST, {"all": all_})
    if json_output:
        print_json(rows)
        return
    now = time.time()

    def rich() -> None:
        if not rows:
            print("no alerts" if all_ else "no alerts firing or pending")
            return
        from mcpctl import render

        render.alerts(HEADERS, [alert_cells(a, now) for a in rows], optional=("MIN", "MAX", "AVG", "HELD BY"))

    listing(HEADERS, [alert_cells(a, now) for a in rows], columns=columns, no_headers=no_headers, rich=rich)


def alert_cells(alert: dict[str, Any], now: float) -> tuple[str, ...]:
    started = alert.get("fired_at") or alert["since"]
    if alert["state"] == "resolved":
        lasted = alert.get("duration_s")
    else:
        lasted = now - started
    holders = ", ".join(holder_text(h) for h in alert.get("allocations") or ())
    return (
        str(alert["id"]),
        alert["state"],
        alert["level"],
        alert["rule"],
        alert["resource"],
        alert_value_text(alert["resource"], alert.get("last_value")) + (" (unknown)" if alert.get("unknown") else ""),
        _clock(started, now),
        "-" if lasted is None else human_duration(lasted),
        alert_value_text(alert["resource"], alert.get("min")),  # in VALUE's unit (an overuse's memory: MiB)
        alert_value_text(alert["resource"], alert.get("max")),
        alert_value_text(alert["resource"], alert.get("avg")),
        holders or "-",
    )


def holder_text(holder: dict[str, Any]) -> str:
    extras = [f"tool {holder['tool_id']}" if holder.get("tool_id") else "",
              f"pid {holder['holder_pid']}" if holder.get("holder_pid") else "",
              f"gpu pid {', '.join(map(str, holder['gpu_pids']))}" if holder.get("gpu_pids") else ""]
    extra = ", ".join(e for e in extras if e)
    return str(holder["id"]) + (f" ({extra})" if extra else "")


def event_line(event: dict[str, Any]) -> str:
    """One alert event as one line: time, kind, resource, rule, level, value and what it says."""
    detail = event.get("detail") or {}
    parts = [
        local_time(event["ts"]),
        event["kind"],
        event.get("resource") or "-",
        str(detail.get("rule", "-")),
        (f"{detail['previous_level']} -> " if detail.get("previous_level") else "") + str(detail.get("level", "-")),
        f"value {alert_value_text(event.get('resource'), detail.get('value'))}",
    ]
    if event["kind"] == "alert.resolved":
        lasted = detail.get("duration_s")
        resource = event.get("resource")
        parts.append(("after " + human_duration(lasted) if isinstance(lasted, (int, float)) else "")
                     + f" (min {alert_value_text(resource, detail.get('min'))},"
                       f" max {alert_value_text(resource, detail.get('max'))},"
                       f" avg {alert_value_text(resource, detail.get('avg'))})")
    if detail.get("allocations"):
        parts.append("held by " + ", ".join(holder_text(h) for h in detail["allocations"]))
    return "  ".join(parts)


def _clock(timestamp: float, now: float) -> str:
    """Today's times as 14:03:10, older ones with their date."""
    return datetime.datetime.fromtimestamp(timestamp).strftime("%H:%M:%S" if now - timestamp < 43200
                                                              else "%Y-%m-%d %H:%M")


def register(app: typer.Typer) -> None:
    app.command()(alerts)
