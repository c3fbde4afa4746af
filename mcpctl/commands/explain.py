"""`mcpctl explain`: why a queued request waits, who holds what it needs, and when it may be granted."""

from __future__ import annotations

import time
from typing import Annotated, Any

import typer

from mcpctl import complete
from mcpctl.actions import format_duration
from mcpctl.escape import printable
from mcpctl.output import call, print_json, when
from mcpctl.view import sized
from mcpresd.protocol import Method


def explain(
    ctx: typer.Context,
    allocation_id: Annotated[str, typer.Argument(metavar="ID", help="The queued allocation.", autocompletion=complete.allocation_ids)],
    json_output: Annotated[bool, typer.Option("--json", help="Print the API's JSON.")] = False,
) -> None:
    """Explain why a queued request waits: its place, what it lacks, who holds it, and when.

    Examples:

      mcpctl explain "$id"

      mcpctl explain "$id" --json | jq .blockers
    """
    result = call(ctx, Method.ALLOCATIONS_EXPLAIN, {"id": allocation_id})
    if json_output:
        print_json(result)
    else:
        print("\n".join(map(printable, explanation_lines(result, time.time()))))


def explanation_lines(result: dict[str, Any], now: float) -> list[str]:
    """The explanation as plain lines: one fact per line, blockers as an indented list."""
    if not result.get("queued"):
        return [str(result.get("summary") or f"allocation {result['id']} is {result['state']}, not queued")]
    if result.get("site") == "cluster":
        return [f"allocation {result['id']} is queued on the cluster: Slurm job {result.get('job_id')}",
                f"Slurm state: {result.get('slurm_state') or 'PENDING'}, reason: {result.get('slurm_reason') or 'None'}",
                f"waited: {format_duration(result['waited_s'])}"
                + (f", gives up {when(result['wait_until'], now)}" if result.get("wait_until") is not None
                   else ", with no time limit")]
    lines = [
        f"allocation {result['id']} is queued: position {result['position']} of {result['queue_length']}",
        f"effective priority: {result['effective_priority']}",
        f"waited: {format_duration(result['waited_s'])}"
        + (f", gives up {when(result['wait_until'], now)}" if result.get("wait_until") is not None
           else ", with no time limit"),
    ]
    if result.get("fits_now"):
        lines.append("fits now: yes" + (f", but waits behind {result['ahead']}" if result.get("ahead") else ""))
    shortfalls = result.get("shortfalls") or []
    if shortfalls:
        lines.append("lacks:")
        for s in shortfalls:
            name = str(s["resource"])
            lines.append(f"  {name}: asks {sized(name, s['requested'])}, free {sized(name, s['free'])}"
                         + (f" of {sized(name, s['capacity'])}" if s.get("capacity") is not None else ""))
    blockers = result.get("blockers") or []
    if blockers:
        lines.append("held by:")
        for b in blockers:
            items = ", ".join(f"{i['resource']}={sized(i['resource'], i['amount'])}" for i in b["items"])
            expires = when(b["expires_at"], now) if b.get("expires_at") is not None else "no TTL"
            lines.append(f"  {b['id']}  {items}  pid {b.get('holder_pid') or '-'}  tool {b.get('tool_id') or '-'}"
                         f"  priority {b['priority']}  expires {expires}")
            for note in b.get("overuse") or []:
                lines.append(f"    {note}")
    if result.get("suggestion"):
        lines.append(f"suggestion: {result['suggestion']}")
    if result.get("estimate") is not None:
        lines.append(f"estimate: granted by {when(result['estimate'], now)}, {result.get('estimate_basis') or ''}"
                     .rstrip(", "))
    elif result.get("estimate_basis"):
        lines.append(f"estimate: {result['estimate_basis']}")
    return lines


def register(app: typer.Typer) -> None:
    app.command()(explain)
