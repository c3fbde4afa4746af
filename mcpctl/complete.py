"""Shell completion: the scripts for bash, zsh and fish, and the values only the daemon knows.

Rules: imported by the Typer commands only, never by the fast path (`mcpctl allocate` and `release`
in a script never pay for it). Asking the daemon takes at most TIMEOUT_S in all (however slowly a daemon
dribbles its reply) and says nothing when it fails: a completion offers what it can, never an error in the
middle of a command line. What the daemon names reaches the user's shell (zsh's script evals it twice), so
a value is offered only when it is made of plain characters (letters, digits, `._:/@+%,=-`), and its help
shows anything else as `?`: no quote, `$`, backslash, space, glob or control character gets through.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import typer

from mcpctl.client import Client
from mcpresd.protocol import Method, resolve_socket

COMPLETE_VAR = "_MCPCTL_COMPLETE"
SHELLS = ("bash", "zsh", "fish")
TIMEOUT_S = 0.5
_PLAIN = frozenset("._:/@+%,=-")
_deadline: float | None = None


class _TooSlow(Exception):
    """The daemon did not answer within what was left of TIMEOUT_S."""


def plain(text: str) -> bool:
    """Whether `text` may be offered to a shell as it is."""
    return bool(text) and all((c.isalnum() and c.isascii()) or c in _PLAIN for c in text)


def _shown(text: str) -> str:
    return "".join(c if (c.isalnum() and c.isascii()) or c in _PLAIN or c == " " else "?" for c in text)


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
    global _deadline
    root = ctx.find_root()
    path = resolve_socket(root.params.get("socket")).path  # the one rule every client follows
    now = time.monotonic()
    if _deadline is None:
        _deadline = now + TIMEOUT_S  # one budget for every question of this completion
    left = _deadline - now
    if left <= 0:
        return []

    def too_slow(signum: int, frame: object) -> None:
        raise _TooSlow

    previous = signal.signal(signal.SIGALRM, too_slow)
    signal.setitimer(signal.ITIMER_REAL, left)
    try:
        with Client(path, timeout=left) as client:
            rows = client.call(method, params)
    except Exception:  # no daemon, an untrusted one, a slow one: offer nothing
        return []
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    return [row for row in rows if isinstance(row, dict)] if isinstance(rows, list) else []


def allocation_ids(ctx: typer.Context, incomplete: str) -> list[tuple[str, str]]:
    """Ids of the active and queued allocations, with what they hold."""
    found = []
    for state in ("active", "queued"):
        for row in _ask(ctx, Method.ALLOCATIONS_LIST, {"state": state, "limit": 200}):
            ident = row.get("id")
            if isinstance(ident, str) and plain(ident) and ident.startswith(incomplete):
                items = ", ".join(f"{i.get('resource')}={_amount(i.get('amount'))}" for i in row.get("items") or ()
                                  if isinstance(i, dict))
                found.append((ident, _shown(f"{state} {items}".strip())))
    return found


def resource_names(ctx: typer.Context, incomplete: str) -> list[str]:
    return _names(_ask(ctx, Method.RESOURCES_LIST), incomplete)


def resource_amounts(ctx: typer.Context, incomplete: str) -> list[str]:
    """`--res NAME=`: the names, each ready for its amount."""
    return [f"{name}=" for name in resource_names(ctx, incomplete)] if "=" not in incomplete else []


def pool_names(ctx: typer.Context, incomplete: str) -> list[str]:
    return _names(_ask(ctx, Method.POOLS_LIST), incomplete)


def _amount(value: object) -> str:
    return f"{value:g}" if isinstance(value, (int, float)) else "?"


def _names(rows: list[dict[str, Any]], incomplete: str) -> list[str]:
    return [name for row in rows if isinstance(name := row.get("name"), str) and plain(name)
            and name.startswith(incomplete)]
