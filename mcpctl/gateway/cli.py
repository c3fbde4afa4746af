"""The gateway's own argument parser, for `python -m mcpctl.gateway`: the same options as `mcpctl gateway`.

Kept apart from Typer because agent hosts start the gateway for every session
and Typer costs more to import than the gateway itself.
"""

from __future__ import annotations

import os
import sys

USAGE = ("usage: mcpctl [--socket PATH] gateway --tools FILE [--name NAME] -- CMD [ARGS]...\n"
         "Run CMD, an MCP server on stdio, and admit each gated tool call through mcpresd (docs/gateway.md).\n")
VALUES = {"--socket": "socket", "--tools": "tools", "--name": "name"}


def parse_and_run(argv: list[str]) -> int:
    from mcpctl import exitcodes

    options: dict[str, str] = {}
    args = list(argv)
    while args and args[0] != "--":
        arg = args.pop(0)
        if arg in ("-h", "--help"):
            sys.stdout.write(USAGE)
            return exitcodes.OK
        name, sep, value = arg.partition("=")
        if name not in VALUES:
            sys.stderr.write(f"mcpctl gateway: unknown option {arg!r}\n{USAGE}")
            return exitcodes.USAGE
        if not sep:
            if not args:
                sys.stderr.write(f"mcpctl gateway: {name} needs a value\n{USAGE}")
                return exitcodes.USAGE
            value = args.pop(0)
        options[VALUES[name]] = value
    command = args[1:]
    if "tools" not in options:
        sys.stderr.write(f"mcpctl gateway: --tools FILE is required\n{USAGE}")
        return exitcodes.USAGE
    from mcpctl.gateway import main

    return main(options["tools"], command, name=options.get("name"),
                socket_path=options.get("socket") or os.environ.get("MCPRES_SOCKET") or None)
