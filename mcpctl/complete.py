"""Shell completion: the scripts for bash, zsh and fish, and the values only the daemon knows.

Rules: imported by the Typer commands only, never by the fast path (`mcpctl allocate` and `release`
in a script never pay for it). Asking the daemon takes at most TIMEOUT_S and says nothing when it fails:
a completion offers what it can, never an error in the middle of a command line.
"""

from __future__ import annotations

import os
from typing import Any

import typer

from mcpctl.client import Client
from mcpresd.protocol import Method, default_socket_path

COMPLETE_VAR = "_MCPCTL_COMPLETE"
SHELLS = ("bash", "zsh", "fish")
TIMEOUT_S = 0.5


def script(shell: str) -> str:
    """The completion script to source in `shell` (Typer's, which calls back `mcpctl` with COMPLETE_VAR set)."""
    from typer._completion_shared import get_completion_script

    return get_completion_script(prog_name="mcpctl", complete_var=COMPLETE_VAR, shell=shell)


def completing() -> bool:
    return bool(os.environ.get(COMPLETE_VAR))


def prepare() -> None:
    """Before a completion request: Typer's shell classes, which its scripts speak to."""
    from typer._completion_classes import completion_init

    completion_init()


def _ask(ctx: typer.Context, method: str, params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    root = ctx.find_root()
    path = root.params.get("socket") or os.environ.get("MCPRES_SOCKET") or default_socket_path()
    try:
        with Client(path, timeout=TIMEOUT_S) as client:
            rows = client.call(method, params)
    except Exception:  # no daemon, an untrusted one, a slow one: offer nothing
        return []
    return rows if isinstance(rows, list) else []


def allocation_ids(ctx: typer.Context, incomplete: str) -> list[tuple[str, str]]:
    """Ids of the active and queued allocations, with what they hold."""
    found = []
    for state in ("active", "queued"):
        for row in _ask(ctx, Method.ALLOCATIONS_LIST, {"state": state, "limit": 200}):
            if str(row.get("id", "")).startswith(incomplete):
                items = ", ".join(f"{i['resource']}={i['amount']:g}" for i in row.get("items") or ())
                found.append((row["id"], f"{state} {items}".strip()))
    return found


def resource_names(ctx: typer.Context, incomplete: str) -> list[str]:
    return [r["name"] for r in _ask(ctx, Method.RESOURCES_LIST) if str(r.get("name", "")).startswith(incomplete)]


def resource_amounts(ctx: typer.Context, incomplete: str) -> list[str]:
    """`--res NAME=`: the names, each ready for its amount."""
    return [f"{name}=" for name in resource_names(ctx, incomplete)] if "=" not in incomplete else []


def pool_names(ctx: typer.Context, incomplete: str) -> list[str]:
    return [p["name"] for p in _ask(ctx, Method.POOLS_LIST) if str(p.get("name", "")).startswith(incomplete)]
