"""`mcpctl events`: the event log (allocated, queued, released, resources added or removed); --follow streams it."""

from __future__ import annotations

import datetime
import json
import os
import signal
import sys
from types import FrameType
from typing import Annotated, Any

import typer

from mcpctl import exitcodes
from mcpctl.actions import rpc_failure, unreachable
from mcpctl.client import Client, DaemonUnreachable, RpcError
from mcpctl.output import call, exit_with, plain_table, print_json, socket_of
from mcpresd.protocol import Method


def events(
    ctx: typer.Context,
    allocation: Annotated[str | None, typer.Option("--allocation", help="Only events of this allocation.")] = None,
    limit: Annotated[int, typer.Option(help="The newest N events.", min=1, max=10_000)] = 50,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing events as they happen, until Ctrl-C.")
    ] = False,
    json_output: Annotated[
        bool, typer.Option("--json", help="Print the API's JSON (with --follow: one object per line).")
    ] = False,
) -> None:
    """Show the newest events, oldest first; with --follow, keep printing new ones as they happen.

    Examples:

      mcpctl events

      mcpctl events --allocation 3f9c2e1b7d4a5e6f --json

      mcpctl events --follow --json | jq -c 'select(.kind == "allocated")'

    With --follow, exits 0 on Ctrl-C, SIGTERM or a closed pipe, and 5 if the daemon goes away.
    """
    params: dict[str, object] = {"limit": limit}
    if allocation:
        params["allocation_id"] = allocation
    if follow:
        exit_with(_follow(socket_of(ctx), params, allocation, json_output))
    rows = call(ctx, Method.EVENTS_LIST, params)
    if json_output:
        print_json(rows)
        return
    plain_table(("TIME", "EVENT", "ALLOCATION", "RESOURCE", "DETAIL"), [event_cells(e) for e in rows])


def event_cells(event: dict[str, Any]) -> tuple[str, ...]:
    return (
        datetime.datetime.fromtimestamp(event["ts"]).strftime("%Y-%m-%d %H:%M:%S"),
        event["kind"],
        event["allocation_id"] or "-",
        event["resource"] or "-",
        " ".join(f"{k}={v}" for k, v in event["detail"].items()) or "-",
    )


class _Stop(BaseException):
    """SIGTERM: stop following, like Ctrl-C."""


def _stop(signum: int, frame: FrameType | None) -> None:
    raise _Stop()


def _follow(socket_path: str, params: dict[str, object], allocation: str | None, as_json: bool) -> int:
    """Subscribe first, then read the backlog on the same connection: no event falls between the two."""
    signal.signal(signal.SIGTERM, _stop)
    printed = 0
    try:
        with Client(socket_path, timeout=None) as client:
            client.call(Method.EVENTS_SUBSCRIBE, {})
            for event in client.call(Method.EVENTS_LIST, params):
                _print(event, as_json)
                printed = max(printed, event["id"])
            for event in client.notifications():
                if event["id"] <= printed or (allocation is not None and event.get("allocation_id") != allocation):
                    continue
                _print(event, as_json)
                printed = event["id"]
    except DaemonUnreachable as error:
        return unreachable(error)
    except RpcError as error:
        return rpc_failure(error)
    except (KeyboardInterrupt, _Stop):
        return exitcodes.OK
    except BrokenPipeError:
        # Whoever read stdout is gone; point it at /dev/null so the interpreter's last flush stays quiet.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return exitcodes.OK
    return exitcodes.OK


def _print(event: dict[str, Any], as_json: bool) -> None:
    line = json.dumps(event, ensure_ascii=False, separators=(",", ":")) if as_json else "  ".join(event_cells(event))
    print(line, flush=True)


def register(app: typer.Typer) -> None:
    app.command()(events)
