"""`mcpctl renew`: extend an allocation's lease (its TTL)."""

from __future__ import annotations

from typing import Annotated

import typer

from mcpctl import complete
from mcpctl.escape import printable
from mcpctl.output import call, duration, print_json, usage, when
from mcpresd.protocol import Method


def renew(
    ctx: typer.Context,
    allocation_id: Annotated[str, typer.Argument(metavar="ID", help="The allocation to renew.",
                                                        autocompletion=complete.allocation_ids)],
    ttl: Annotated[
        str | None,
        typer.Option("--ttl", metavar="DURATION",
                     help="New lease time from now (30s, 10m, 2h). Default: the allocation's own TTL again."),
    ] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print the renewed allocation as JSON.")] = False,
) -> None:
    """Renew an allocation's lease: it now expires TTL from now.

    Examples:

      mcpctl renew "$id"              # the same TTL again, from now

      mcpctl renew "$id" --ttl 2h

      while sleep 60; do mcpctl renew "$id" --ttl 5m >/dev/null || break; done &

    For a queued request, the TTL is set and counts from the grant. Exits 1 if
    the allocation was released already, 2 if it has no TTL and none is given.
    """
    params: dict[str, object] = {"id": allocation_id}
    if ttl is not None:
        seconds = duration(ttl, "--ttl", forever=False)
        if seconds is None or seconds <= 0:
            usage(f"--ttl takes a duration greater than zero, e.g. 30s, 10m or 2h; got {ttl!r}")
        params["ttl"] = seconds
    allocation = call(ctx, Method.ALLOCATIONS_RENEW, params)
    if json_output:
        print_json(allocation)
    elif allocation["expires_at"] is None:
        print(printable(f"{allocation['id']} is {allocation['state']}: its TTL counts from the grant"))
    else:
        print(printable(f"{allocation['id']} expires {when(allocation['expires_at'])}"))


def register(app: typer.Typer) -> None:
    app.command()(renew)
