"""`mcpctl wait`: block until a queued allocation is granted."""

from __future__ import annotations

from typing import Annotated

import typer

from mcpctl import complete
from mcpctl import exitcodes
from mcpctl.actions import REPLY_GRACE_S, fail
from mcpctl.output import call, duration, exit_with, print_json
from mcpresd.protocol import Method


def wait(
    ctx: typer.Context,
    allocation_id: Annotated[str, typer.Argument(metavar="ID", help="The queued allocation (from --no-block).",
                                                        autocompletion=complete.allocation_ids)],
    timeout: Annotated[
        str | None,
        typer.Option("--timeout", metavar="DURATION", help="Give up after this long (30s, 10m, forever); "
                                                           "the request stays queued. Default: forever."),
    ] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print the granted allocation as JSON.")] = False,
) -> None:
    """Wait until a queued allocation is granted, then print its id.

    Examples:

      id=$(mcpctl allocate --gpu 1 --wait 1h --no-block); mcpctl wait "$id"

      mcpctl wait "$id" --timeout 30s || echo "still queued: see mcpctl explain $id"

    Returns at once for an active allocation. Exits 3 if the timeout runs out
    (the request stays queued until its own --wait ends), 1 if the request was
    withdrawn or released.
    """
    seconds = duration(timeout, "--timeout")
    params: dict[str, object] = {"id": allocation_id}
    if seconds is not None:
        params["timeout"] = seconds
    allocation = call(ctx, Method.ALLOCATIONS_WAIT, params,
                      timeout=None if seconds is None else seconds + REPLY_GRACE_S)
    state = allocation["state"]
    if state == "queued":
        exit_with(fail(f"allocation {allocation_id} is still queued", exitcodes.UNAVAILABLE))
    if state != "active":
        reason = allocation.get("release_reason")
        why = f" ({reason})" if reason not in (None, state) else ""  # not "was released (released)"
        exit_with(fail(f"allocation {allocation_id} was {state}{why}",
                       exitcodes.ERROR))
    if json_output:
        print_json(allocation)
    else:
        print(allocation["id"])


def register(app: typer.Typer) -> None:
    app.command()(wait)
