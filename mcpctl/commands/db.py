"""`mcpctl db backup`: a consistent copy of the daemon's database, taken while it serves."""

from __future__ import annotations

import os
from typing import Annotated

import typer

from mcpctl.escape import printable
from mcpctl.output import call, print_json
from mcpresd.protocol import Method, format_size

app = typer.Typer(help="Look after the daemon's database.\n\nExample:\n\n  mcpctl db backup ~/mcpresd-backup.db",
                  no_args_is_help=True, suggest_commands=False)  # Click suggests itself

BACKUP_TIMEOUT_S = 600.0
"""A large history takes a while to copy; the daemon answers once the copy is on disk."""


@app.command()
def backup(
    ctx: typer.Context,
    path: Annotated[str, typer.Argument(help="File to write (a relative path is taken from here).")],
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace PATH if it exists.")] = False,
    json_output: Annotated[bool, typer.Option("--json", help="Print the API's JSON.")] = False,
) -> None:
    """Copy the daemon's database to PATH, consistently, while it keeps serving.

    The copy holds every allocation acknowledged before the command ran. The
    daemon writes it (under systemd: only where the unit may write, e.g.
    /var/lib/mcpresd/), so only root and the daemon's own user may ask for it.
    Restore by stopping mcpresd and copying the file over its database.

    Example: mcpctl db backup ~/mcpresd-$(date +%F).db
    """
    target = os.path.abspath(os.path.expanduser(path))
    result = call(ctx, Method.DB_BACKUP, {"path": target, "overwrite": overwrite}, timeout=BACKUP_TIMEOUT_S)
    if json_output:
        print_json(result)
    else:
        print(printable(f"backed up to {result['path']} ({format_size(result['bytes'])}B, {result['pages']} pages)"))
