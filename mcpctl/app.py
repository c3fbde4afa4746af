"""The Typer application: global options in the callback, one module per command."""

from __future__ import annotations

from typing import Annotated

import typer

from mcpctl import exitcodes
from mcpctl.actions import RETRY_FOR, RETRY_FOR_ENV, UsageError, retry_seconds
from mcpctl.commands import (
    alerts,
    allocate,
    allocations,
    budget,
    budgets,
    db,
    events,
    explain,
    gateway,
    mcp_server,
    metrics,
    optimise,
    pool,
    pools,
    predict,
    recommend,
    release,
    renew,
    resource,
    resources,
    run,
    status,
    top,
    usage,
    wait,
)
from mcpresd.protocol import VERSION, default_socket_path

EXIT_CODES = "\n\n".join(f"{code}  {meaning}" for code, meaning in exitcodes.TABLE)

app = typer.Typer(
    name="mcpctl",
    help="Allocate, release and inspect this machine's resources through mcpresd.",
    epilog=f"Exit codes:\n\n{EXIT_CODES}\n\n{exitcodes.RUN_NOTE}",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        print(f"mcpctl {VERSION}")
        raise typer.Exit()


@app.callback()
def main(
    ctx: typer.Context,
    socket: Annotated[
        str | None,
        typer.Option(
            "--socket",
            envvar="MCPRES_SOCKET",
            metavar="PATH",
            help="Daemon socket (default: $XDG_RUNTIME_DIR/mcpres/mcpresd.sock, else /tmp/mcpres-UID/mcpresd.sock).",
        ),
    ] = None,
    retry_for: Annotated[
        str | None,
        typer.Option(
            "--retry-for",
            envvar=RETRY_FOR_ENV,
            metavar="DURATION",
            help=f"While the daemon is unreachable (restarting), keep retrying this long before exit 5 "
                 f"(default {RETRY_FOR}; 0: do not retry; forever).",
        ),
    ] = None,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    try:
        seconds = retry_seconds(retry_for)
    except UsageError as error:
        raise typer.BadParameter(str(error).removeprefix("--retry-for: "), param_hint="'--retry-for'") from None
    ctx.obj = {"socket": socket or default_socket_path(), "retry_for": seconds}


for module in (status, resources, allocations, allocate, run, wait, explain, renew, release, events, top, alerts,
               metrics, predict, pools, budgets, usage, recommend, optimise, mcp_server, gateway):
    module.register(app)
app.add_typer(resource.app, name="resource")
app.add_typer(pool.app, name="pool")
app.add_typer(budget.app, name="budget")
app.add_typer(db.app, name="db")


def run_app(args: list[str]) -> int:
    try:
        app(args=args, prog_name="mcpctl", standalone_mode=True)
    except SystemExit as exit:
        code = exit.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    return 0
