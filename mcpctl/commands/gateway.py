"""`mcpctl gateway`: wrap an MCP server so each gated tool call is admitted through mcpres (docs/gateway.md)."""

from __future__ import annotations

from typing import Annotated

import typer

from mcpctl.output import exit_with, socket_of


def gateway(
    ctx: typer.Context,
    tools: Annotated[
        str,
        typer.Option("--tools", metavar="FILE",
                     help="The tools file (TOML): which tools are gated and what each call asks for."),
    ],
    command: Annotated[
        list[str] | None,
        typer.Argument(metavar="-- CMD [ARGS]...", help="The MCP server's command (stdio), after `--`.",
                       show_default=False),
    ] = None,
    name: Annotated[
        str | None,
        typer.Option("--name", metavar="SERVER",
                     help="The server's name in tool ids (SERVER/TOOL); overrides [server] name."),
    ] = None,
) -> None:
    """Run an MCP server behind mcpres: every gated tool call waits for its resources first.

    Examples:

      mcpctl gateway --tools render.toml -- python -m render_server

      mcpctl gateway --tools tools.toml --name time -- uvx mcp-server-time

    Speaks MCP on stdin/stdout: put it in an agent host's MCP config in place
    of the server's own command. A call to a tool that the tools file gates is
    held until mcpresd grants what its [[tool]] entry asks for, with progress
    on the call's progress token while it waits, and released when the call
    ends. Everything else passes through untouched. Logs go to stderr.
    Exits with the server's exit status; 2 for a bad tools file.
    """
    from mcpctl.gateway import main

    exit_with(main(tools, list(command or ()), name=name, socket_path=socket_of(ctx)))


def register(app: typer.Typer) -> None:
    app.command(context_settings={"allow_interspersed_args": False})(gateway)
