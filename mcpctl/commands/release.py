"""`mcpctl release`: give allocations back, optionally saying what the holder used."""

from __future__ import annotations

from typing import Annotated

import typer

from mcpctl import complete
from mcpctl.actions import run_release
from mcpctl.output import exit_with, retry_of, socket_of


def release(
    ctx: typer.Context,
    ids: Annotated[list[str], typer.Argument(metavar="ID...", help="Allocation ids to release.",
                                                              autocompletion=complete.allocation_ids)],
    measured: Annotated[
        str | None,
        typer.Option("--measured", metavar="KEY=VALUE,...",
                     help="What the holder used, for accounting and `mcpctl recommend`: cpu_seconds, memory_peak, "
                          "gpu_utilisation (0..1), gpu_memory_peak; sizes like 2G, e.g. "
                          "cpu_seconds=12.5,memory_peak=2G."),
    ] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print the released allocations as JSON.")] = False,
) -> None:
    """Release allocations by id. Releasing an unknown or already released id is an error (exit 1).

    Examples:

      mcpctl release "$id"

      mcpctl release "$id" --measured cpu_seconds=12.5,memory_peak=2G

    `mcpctl run` reports what its command used by itself.
    """
    exit_with(run_release(socket_of(ctx), ids, "json" if json_output else "text", retry_of(ctx), measured))


def register(app: typer.Typer) -> None:
    app.command()(release)
