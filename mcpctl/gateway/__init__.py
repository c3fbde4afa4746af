"""`mcpctl gateway`: put mcpres in front of an MCP server, so each tool call is admitted through the broker.

The package is imported by the Typer command only when the command runs, and
its start-up imports stay light (asyncio, json, tomllib, fnmatch): agent hosts
spawn the gateway and wait for it. `main` is the one entry point; `python -m
mcpctl.gateway` reaches it without Typer. See docs/gateway.md.
"""

from __future__ import annotations

import os
import sys

from mcpctl.escape import printable
from mcpctl.gateway.tools import ToolsFileError, load, server_name

LAUNCHERS = frozenset({"uvx", "uv", "npx", "pnpm", "bunx", "bun", "pipx", "python", "python3", "node", "deno",
                       "docker", "podman", "env", "run", "exec", "dlx", "tool"})
"""Words skipped when a server's default name is taken from its command line."""


def log(message: str) -> None:
    """One line on stderr, the gateway's only log."""
    try:
        sys.stderr.write(f"mcpctl gateway: {printable(message)}\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


def main(tools: str, command: list[str], *, name: str | None = None, socket_path: str | None = None) -> int:
    """Run the gateway; the wrapped server's exit status, 2 for a bad tools file or command line."""
    from mcpctl import exitcodes

    if not command:
        log("name the server's command after --, e.g. mcpctl gateway --tools tools.toml -- uvx mcp-server-time")
        return exitcodes.USAGE
    try:
        config = load(tools)
        server = server_name(name, "--name") if name is not None else config.server or default_name(command)
    except ToolsFileError as error:
        log(str(error))
        return exitcodes.USAGE
    if socket_path is None:
        from mcpresd.protocol import resolve_socket

        socket_path = resolve_socket().path
    import asyncio

    from mcpctl.gateway.proxy import Gateway

    try:
        return asyncio.run(Gateway(config, command, server, socket_path).run())
    finally:
        for fd in (0, 1):  # the event loop made them non-blocking; they may be shared with a terminal
            try:
                os.set_blocking(fd, True)
            except OSError:
                pass


def default_name(command: list[str]) -> str:
    """The server's name from its command line: `uvx mcp-server-time` -> `mcp-server-time`."""
    for arg in command:
        if arg.startswith("-"):
            continue
        base = os.path.basename(arg.rstrip("/")).split("@", 1)[0]  # npm's @scope/name@version
        if base and base not in LAUNCHERS and not base.startswith("python"):
            cleaned = "".join(ch if ch.isprintable() and not ch.isspace() else "_" for ch in base)[:100]
            return cleaned or "mcp"
    return "mcp"
