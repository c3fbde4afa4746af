"""`mcpctl mcp-server`: serve this machine's resources to an AI agent as an MCP server on stdin/stdout.

The MCP SDK is an optional extra (`pip install 'mcpres[mcp]'`), imported only inside the
command, so `mcpctl --help` and every other command start without it.
"""

from __future__ import annotations

import sys

import typer

from mcpctl import exitcodes
from mcpctl.output import socket_of

MISSING_SDK = "mcpctl mcp-server needs the MCP SDK: pip install 'mcpres[mcp]'"


def mcp_server(ctx: typer.Context) -> None:
    """Serve the broker to an AI agent over MCP (stdio): host status, allocate, release, explain.

    Put it in an agent host's MCP config as the command `mcpctl` with the argument `mcp-server`
    (add `--socket PATH` before it for a daemon on another socket). Tools: host_status,
    list_allocations, allocate, release, explain; resources: mcpres://host/utilisation and
    mcpres://resources. Allocations are held by the server's own connection to mcpresd and are
    released when the agent's session ends. See docs/mcp-server.md.

    Example: mcpctl --socket /run/mcpres/mcpresd.sock mcp-server
    """
    from importlib.util import find_spec

    if find_spec("mcp") is None:
        print(MISSING_SDK, file=sys.stderr)
        raise typer.Exit(exitcodes.USAGE)
    from mcpctl.mcp_server import serve

    serve(socket_of(ctx))


def register(app: typer.Typer) -> None:
    app.command("mcp-server")(mcp_server)
