"""The Typer application: global options in the callback, one module per command."""

from __future__ import annotations

from typing import Annotated

import typer

from mcpctl import exitcodes
from mcpctl.actions import RETRY_FOR, RETRY_FOR_ENV, UsageError, configure_retry
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
from mcpresd.protocol import VERSION, resolve_socket

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
            metavar="PATH",
            help="Daemon socket. Default: $MCPRES_SOCKET, else your daemon's socket "
                 "($XDG_RUNTIME_DIR/mcpres/mcpresd.sock, else /run/user/UID/mcpres/, else /tmp/mcpres-UID/) if it "
                 "exists, else the system daemon's (/run/mcpres/mcpresd.sock) if it exists; `mcpctl status` says "
                 "which and why.",
        ),
    ] = None,
    retry_for: Annotated[
        str | None,
        typer.Option(
            "--retry-for",
            envvar=RETRY_FOR_ENV,
            metavar="DURATION",
            help=f"While the daemon is unreachable, keep retrying this long before exit 5, saying so on stderr "
                 f"(0: do not retry; forever). Default {RETRY_FOR} for a daemon that is restarting (its socket "
                 "refuses, or the connection broke); with no socket at all, exit 5 at once unless this is given.",
        ),
    ] = None,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    try:
        seconds = configure_retry(retry_for)
    except UsageError as error:
        raise typer.BadParameter(str(error).removeprefix("--retry-for: "), param_hint="'--retry-for'") from None
    choice = resolve_socket(socket)
    ctx.obj = {"socket": choice.path, "socket_choice": choice, "retry_for": seconds}


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
