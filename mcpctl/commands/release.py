"""`mcpctl release`: give allocations back."""

from __future__ import annotations

from typing import Annotated

import typer

from mcpctl.actions import run_release
from mcpctl.output import exit_with, retry_of, socket_of


def release(
    ctx: typer.Context,
    ids: Annotated[list[str], typer.Argument(metavar="ID...", help="Allocation ids to release.")],
    json_output: Annotated[bool, typer.Option("--json", help="Print the released allocations as JSON.")] = False,
) -> None:
    """Release allocations by id. Releasing an unknown or already released id is an error (exit 1).

    Example: mcpctl release "$id"
    """
    exit_with(run_release(socket_of(ctx), ids, "json" if json_output else "text", retry_of(ctx)))


def register(app: typer.Typer) -> None:
    app.command()(release)
