"""`mcpctl pool create|show|drain|undrain|delete|events`: one resource pool.

A pool hands out whole members: fixed resources (static), slots carved from a
parent resource (slots), or resources made by a command (command). Slots and
command pools scale between --min and --max on utilisation.
"""

from __future__ import annotations

import time
from typing import Annotated, Any

import typer

from mcpctl import complete
from mcpctl.commands.pools import HEADERS, bounds_text, pool_cells
from mcpctl.escape import printable
from mcpctl.output import call, duration, fancy, local_time, plain_table, print_json, usage, when
from mcpctl.view import human_duration, kind_amount, money, number_text, percent
from mcpresd.protocol import FactoryKind, Method, Strategy, UnitError, parse_amount

app = typer.Typer(help="Create, inspect, drain and delete resource pools.\n\nExamples:"
                       "\n\n  mcpctl pool create builds --factory slots --parent cpu --slot-size 2 --min 1 --max 4"
                       "\n\n  mcpctl pool show builds\n\n  mcpctl pool drain builds && mcpctl pool delete builds",
                  no_args_is_help=True, suggest_commands=False)  # Click suggests itself

Name = Annotated[str, typer.Argument(metavar="NAME", help="The pool's name.", autocompletion=complete.pool_names)]
Json = Annotated[bool, typer.Option("--json", help="Print the API's JSON.")]
MEMBER_HEADERS = ("MEMBER", "STATE", "ALLOCATIONS", "PARENT", "HEALTH")
POOL_STRATEGIES = "first-fit, best-fit, round-robin, least-loaded or locality-aware"


@app.command()
def create(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(metavar="NAME", help="The new pool's name (no spaces, commas or globs).")],
    factory: Annotated[
        FactoryKind,
        typer.Option("--factory", help="static: fixed members; slots: carved from --parent; command: made by "
                                       "--create.", show_default=False),
    ],
    member: Annotated[
        list[str] | None,
        typer.Option("--member", metavar="RESOURCE", help="static: a member resource by name; repeat for more."),
    ] = None,
    select: Annotated[
        list[str] | None,
        typer.Option("--select", metavar="SELECTOR",
                     help="static: every resource matching this, e.g. 'type=gpu'; repeat for more."),
    ] = None,
    parent: Annotated[
        str | None,
        typer.Option("--parent", metavar="RESOURCE", help="slots: the resource (or type) the slots are carved from."),
    ] = None,
    slot_size: Annotated[
        str | None,
        typer.Option("--slot-size", metavar="N", help="slots: each member's share of the parent (a number or a "
                                                      "size, e.g. 1, 0.5, 4G)."),
    ] = None,
    create_command: Annotated[
        str | None,
        typer.Option("--create", metavar="CMD", help="command: a shell command that makes a member and prints "
                                                     "its JSON."),
    ] = None,
    destroy_command: Annotated[
        str | None,
        typer.Option("--destroy", metavar="CMD", help="command: a shell command that removes a member."),
    ] = None,
    timeout: Annotated[
        str | None,
        typer.Option("--timeout", metavar="DURATION", help="command: how long --create and --destroy may run "
                                                           "(e.g. 30s)."),
    ] = None,
    minimum: Annotated[
        int | None, typer.Option("--min", metavar="N", min=0, help="Fewest members (slots and command pools).")
    ] = None,
    maximum: Annotated[
        int | None,
        typer.Option("--max", metavar="N", min=1, help="Most members (required for slots and command pools)."),
    ] = None,
    strategy: Annotated[
        str | None,
        typer.Option("--strategy", metavar="S",
                     help=f"How to choose among idle members: {POOL_STRATEGIES} (default: first-fit)."),
    ] = None,
    cost: Annotated[
        float | None,
        typer.Option("--cost", metavar="PER_MEMBER_HOUR", min=0, help="Cost of one member for one hour."),
    ] = None,
    scale_up_at: Annotated[
        float | None,
        typer.Option("--scale-up-at", metavar="FRACTION", min=0, max=1,
                     help="Grow when utilisation is above this (default 0.8)."),
    ] = None,
    scale_down_at: Annotated[
        float | None,
        typer.Option("--scale-down-at", metavar="FRACTION", min=0, max=1,
                     help="Shrink when utilisation is below this (default 0.3)."),
    ] = None,
    target: Annotated[
        float | None,
        typer.Option("--target", metavar="FRACTION", min=0, max=1,
                     help="The utilisation a scaling step aims for (default 0.7)."),
    ] = None,
    cooldown: Annotated[
        str | None,
        typer.Option("--cooldown", metavar="DURATION", help="Least time between two scaling steps (default 1m)."),
    ] = None,
    label: Annotated[
        list[str] | None, typer.Option("--label", metavar="KEY=VALUE", help="A label; repeat for more.")
    ] = None,
    json_output: Json = False,
) -> None:
    """Create a pool of whole members that `allocate --pool NAME` hands out.

    Examples:

      mcpctl pool create gpus --factory static --select 'type=gpu'

      mcpctl pool create seats --factory slots --parent licence --slot-size 1 --min 1 --max 2 --cost 1.5

      mcpctl pool create builders --factory command --create ./make-worker.sh --destroy ./drop-worker.sh \\
        --timeout 2m --max 8 --cooldown 5m --label team=ci

    Then: mcpctl allocate --pool seats, or --pool 'build-*' to take from any
    matching pool. Unset settings take the daemon's defaults.
    """
    params: dict[str, Any] = {"name": name, "factory": factory.value}
    if member:
        params["members"] = list(member)
    if select:
        params["select"] = list(select)
    if parent is not None:
        params["parent"] = parent
    if slot_size is not None:
        try:
            params["slot_size"] = parse_amount(slot_size)
        except UnitError as error:
            usage(f"--slot-size: {error}")
    if create_command is not None:
        params["create"] = create_command
    if destroy_command is not None:
        params["destroy"] = destroy_command
    for option, text, key in (("--timeout", timeout, "timeout"), ("--cooldown", cooldown, "cooldown")):
        if text is not None:
            seconds = duration(text, option, forever=False)
            if seconds is None:
                usage(f"{option} takes a duration, e.g. 30s or 5m; got {text!r}")
            params[key] = seconds
    for key, value in (("min", minimum), ("max", maximum), ("cost_per_unit_hour", cost),
                       ("scale_up_at", scale_up_at), ("scale_down_at", scale_down_at), ("target", target)):
        if value is not None:
            params[key] = value
    if strategy is not None:
        if strategy not in {s.value for s in Strategy}:
            usage(f"--strategy takes {POOL_STRATEGIES}; got {strategy!r}")
        params["strategy"] = strategy
    if label:
        params["labels"] = labels_of(label)
    pool = call(ctx, Method.POOLS_CREATE, params)
    if json_output:
        print_json(pool)
    else:
        making = pool.get("creating") or 0  # a command pool's first members are made in the background
        print(printable(f"created pool {pool['name']} ({pool.get('factory', factory.value)}, "
                        f"{bounds_text(pool)} members, {pool.get('size', 0) - making} now"
                        + (f", {making} being made)" if making else ")")))


def labels_of(entries: list[str]) -> dict[str, str]:
    labels: dict[str, str] = {}
    for entry in entries:
        key, sep, value = entry.partition("=")
        if not sep or not key:
            usage(f"--label takes KEY=VALUE, got {entry!r}")
        labels[key] = value
    return labels


@app.command()
def show(ctx: typer.Context, name: Name, json_output: Json = False) -> None:
    """Show a pool: its settings, how full it is, and each member.

    Examples:

      mcpctl pool show seats

      mcpctl pool show seats --json | jq '.members[] | select(.state == "idle") | .name'
    """
    pool = call(ctx, Method.POOLS_GET, {"name": name})
    if json_output:
        print_json(pool)
        return
    members = [m for m in pool.get("members") or () if isinstance(m, dict)]
    settings = settings_rows(pool, time.time())
    if fancy():
        from mcpctl import render

        render.pairs(settings)
        if members:
            render.text_table(MEMBER_HEADERS, [member_cells(m) for m in members])
    else:
        width = max(len(label) for label, _ in settings)
        for label, value in settings:
            print(printable(f"{label.ljust(width)}  {value}"))
        if members:
            print()
            plain_table(MEMBER_HEADERS, [member_cells(m) for m in members])
    if not members:
        print("no members")


def settings_rows(pool: dict[str, Any], now: float) -> list[tuple[str, str]]:
    """The pool as label/value lines, in the order a person reads it."""
    cells = dict(zip(HEADERS, pool_cells(pool)))
    size = f"{pool.get('size', 0)} ({pool.get('busy', 0)} busy, {pool.get('idle', 0)} idle"
    if pool.get("creating"):
        size += f", {pool['creating']} being made"
    if pool.get("draining_members"):
        size += f", {pool['draining_members']} draining"
    rows = [
        ("pool", pool["name"] + (" (from the config)" if pool.get("source") == "config" else "")),
        ("factory", cells["FACTORY"] + factory_detail(pool)),
        ("state", cells["STATE"]),
        ("members", f"{size}), bounds {bounds_text(pool)}"),
        ("queued", str(pool.get("queued", 0))),
        ("utilisation", percent(pool.get("utilisation"))),
        ("strategy", cells["STRATEGY"]),
        ("cost", f"{money(pool.get('cost_per_unit_hour'))} per member-hour"),
    ]
    if pool.get("factory") != "static":
        rows.append(("scaling", scaling_text(pool.get("scale") or {}, pool.get("last_scaled_at"), now)))
    if pool.get("factory_failures"):
        paused = pool.get("factory_paused_until")
        rows.append(("factory", f"{pool['factory_failures']} failure(s) in a row"
                     + (f", paused until {when(paused, now)}" if isinstance(paused, (int, float)) and paused > now
                        else "")))
    if pool.get("labels"):
        rows.append(("labels", " ".join(f"{k}={v}" for k, v in sorted(pool["labels"].items()))))
    return rows


def factory_detail(pool: dict[str, Any]) -> str:
    if pool.get("factory") == "slots" and pool.get("parent"):
        parent = str(pool["parent"])
        return f": slots of {kind_amount(parent.split(':')[0], pool.get('slot_size'))} from {parent}"
    if pool.get("factory") == "command" and pool.get("create"):
        timeout = pool.get("timeout_s")
        return (f": create {pool['create']!r}" + (f", destroy {pool['destroy']!r}" if pool.get("destroy") else "")
                + (f", timeout {human_duration(timeout)}" if isinstance(timeout, (int, float)) else ""))
    if pool.get("factory") == "static":
        parts = [*map(str, pool.get("members_listed") or ()), *(f"select {s!r}" for s in pool.get("select") or ())]
        return f": {', '.join(parts)}" if parts else ""
    return ""


def scaling_text(scale: dict[str, Any], last: object, now: float) -> str:
    cooldown = scale.get("cooldown_s")
    text = (f"up above {percent(scale.get('up_at'))}, down below {percent(scale.get('down_at'))}, "
            f"target {percent(scale.get('target'))}, cooldown "
            + (human_duration(cooldown) if isinstance(cooldown, (int, float)) else "-"))
    if isinstance(last, (int, float)):
        text += f"; last scaled {human_duration(now - last)} ago"
    return text


def member_cells(member: dict[str, Any]) -> tuple[str, ...]:
    held = member.get("allocations") or []
    health = member.get("health")
    return (
        str(member.get("name", "-")),
        str(member.get("state", "-")),
        (", ".join(map(str, held)) if isinstance(held, list) else str(held)) or "-",
        str(member.get("parent") or "-"),
        "-" if health is None else number_text(health),
    )


def _changed(ctx: typer.Context, method: str, name: str, json_output: bool, state: str) -> None:
    """Drain or undrain, then one line with the pool's new state (`state` if the reply has none)."""
    pool = call(ctx, method, {"name": name})
    if json_output:
        print_json(pool)
    else:
        print(printable(f"pool {pool.get('name', name)}: {pool.get('state') or state}"))


@app.command()
def drain(ctx: typer.Context, name: Name, json_output: Json = False) -> None:
    """Stop granting from a pool; it is drained once no member is busy. Allocations keep their members.

    Example: mcpctl pool drain seats; mcpctl pool show seats
    """
    _changed(ctx, Method.POOLS_DRAIN, name, json_output, "draining")


@app.command()
def undrain(ctx: typer.Context, name: Name, json_output: Json = False) -> None:
    """Grant from a drained or draining pool again.

    Example: mcpctl pool undrain seats
    """
    _changed(ctx, Method.POOLS_UNDRAIN, name, json_output, "active")


@app.command()
def delete(ctx: typer.Context, name: Name, json_output: Json = False) -> None:
    """Delete a pool and the members it made; refused while any member is allocated (drain it first).

    Example: mcpctl pool drain seats && mcpctl pool delete seats
    """
    pool = call(ctx, Method.POOLS_DELETE, {"name": name})
    if json_output:
        print_json(pool)
    else:
        print(printable(f"deleted pool {pool.get('name', name) if isinstance(pool, dict) else name}"))


@app.command()
def events(
    ctx: typer.Context,
    name: Name,
    limit: Annotated[int, typer.Option("--limit", metavar="N", help="The newest N events.", min=1,
                                       max=10_000)] = 50,
    json_output: Json = False,
) -> None:
    """Show a pool's events, oldest first: members added and removed, scaling decisions and why, drains.

    Examples:

      mcpctl pool events seats

      mcpctl pool events seats --limit 200 --json | jq -c '.[] | [.kind, .detail.reason]'
    """
    rows = call(ctx, Method.POOLS_EVENTS, {"name": name, "limit": limit})
    if json_output:
        print_json(rows)
    elif not rows:
        print(printable(f"no events for pool {name}"))
    else:
        plain_table(("TIME", "EVENT", "REASON", "DETAIL"), [event_cells(e) for e in rows])


def event_cells(event: dict[str, Any]) -> tuple[str, ...]:
    """Time, kind, the reason (scaling decisions carry one), and the rest of the detail as key=value."""
    detail = dict(event.get("detail") or {})
    reason = detail.pop("reason", None)
    extra = [f"{k}={detail_value(v)}" for k, v in detail.items() if v not in (None, [], {}, "")]
    if event.get("allocation_id"):
        extra.insert(0, f"allocation={event['allocation_id']}")
    return (
        local_time(event["ts"]),
        str(event["kind"]),
        str(reason) if reason is not None else "-",
        " ".join(extra) or "-",
    )


def detail_value(value: object) -> str:
    if isinstance(value, list):
        return ",".join(map(str, value))
    if isinstance(value, float):
        return number_text(value)
    return str(value)
