"""`mcpctl resource add|remove|refresh|set-cost`: custom resources, rediscovery and what resources cost."""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any

import math

import typer

from mcpctl import complete, exitcodes
from mcpctl.actions import rpc_failure, unreachable
from mcpctl.client import Client, DaemonUnreachable, RpcError
from mcpctl.escape import printable
from mcpctl.output import call, exit_with, print_json, retry_of, socket_of, usage
from mcpctl.view import money
from mcpresd.protocol import MAX_ADD, MAX_MESSAGE_BYTES, Method, UnitError, format_amount, parse_amount

app = typer.Typer(help="Register or remove custom resources, set what resources cost; rediscover the host's."
                       "\n\nExamples:\n\n  mcpctl resource add licence:matlab --capacity 4 --unit seats"
                       "\n\n  mcpctl resource set-cost gpu:0 2.5\n\n  mcpctl resource remove licence:matlab",
                  no_args_is_help=True, suggest_commands=False)  # Click suggests itself


@app.command()
def add(
    ctx: typer.Context,
    name: Annotated[str | None, typer.Argument(help="Name, e.g. licence:matlab or slot:render.")] = None,
    capacity: Annotated[
        str | None, typer.Option("--capacity", metavar="N", help="How much there is (a number or a size).")
    ] = None,
    unit: Annotated[str, typer.Option("--unit", metavar="U", help="Unit shown beside amounts.")] = "units",
    cost: Annotated[
        float | None, typer.Option("--cost", metavar="X", min=0, help="Cost per unit-hour, for accounting.")
    ] = None,
    label: Annotated[
        list[str] | None, typer.Option("--label", metavar="KEY=VALUE", help="A label; repeat for more.")
    ] = None,
    from_file: Annotated[
        str | None,
        typer.Option("--from", metavar="FILE",
                     help="Register many: a JSON array of resources, or one JSON object a line (- reads stdin), "
                          "each with the fields of resources.add (name, capacity, unit, labels, "
                          "cost_per_unit_hour)."),
    ] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print the new resource (with --from: the count) as "
                                                             "JSON.")] = False,
) -> None:
    """Register a custom resource (a licence pool, tool slots, ...); root and the admin group only.

    A name the config file declares is not taken: the config's definition wins (at the next reload or start,
    it replaces a resource added here under that name).

    With --from, the file's resources are sent in lists of up to 10,000 (a few seconds for 100,000). Each
    list is added whole or not at all; a list refused (a bad entry, a name taken) stops there, and those
    sent before it stay (the message says how many).

    Examples:

      mcpctl resource add licence:matlab --capacity 4 --unit seats

      seq 1 5000 | sed 's/.*/{"name": "slot:&", "capacity": 1}/' | mcpctl resource add --from -
    """
    if from_file is not None:
        if name is not None or capacity is not None or label or cost is not None or unit != "units":
            usage("--from takes every field from the file: give no NAME, --capacity, --unit, --cost or --label")
        added = add_many(ctx, from_file)
        if json_output:
            print_json({"added": added})
        else:
            print(f"added {added} resource{'' if added == 1 else 's'}")
        return
    if name is None or capacity is None:
        usage("give a NAME and its --capacity (or --from FILE to register many)")
    try:
        amount = parse_amount(capacity)
    except UnitError as error:
        usage(f"--capacity: {error}")
    labels: dict[str, Any] = {}
    for entry in label or []:
        key, sep, value = entry.partition("=")
        if not sep or not key:
            usage(f"--label takes KEY=VALUE, got {entry!r}")
        labels[key] = value
    params: dict[str, Any] = {"name": name, "capacity": amount, "unit": unit, "labels": labels}
    if cost is not None:
        params["cost_per_unit_hour"] = cost
    resource = call(ctx, Method.RESOURCES_ADD, params)
    if json_output:
        print_json(resource)
    else:
        print(printable(f"added {resource['name']} ({format_amount(resource['capacity'], resource['unit'])})"))


def read_resources(path: str) -> list[Any]:
    """The entries of a --from file: a JSON array, or JSON Lines (blank lines skipped); else a usage error."""
    where = "stdin" if path == "-" else path
    try:
        if path == "-":
            text = sys.stdin.read()
        else:
            with open(path, encoding="utf-8") as file:
                text = file.read()
    except (OSError, UnicodeDecodeError) as error:
        usage(f"--from: cannot read {where}: {getattr(error, 'strerror', None) or error}")
    if text.lstrip().startswith("["):
        try:
            entries = json.loads(text)
        except ValueError as error:
            usage(f"--from: {where} is not a JSON array of resources ({error})")
    else:
        entries = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    entries.append(json.loads(line))
                except ValueError as error:
                    usage(f"--from: line {number} of {where} is not JSON ({error})")
    if not isinstance(entries, list) or not entries:
        usage(f"--from: {where} holds no resources")
    for number, entry in enumerate(entries, 1):
        if not isinstance(entry, dict):
            usage(f"--from: entry {number} of {where} is not an object with the fields of a resource")
    return entries


def add_many(ctx: typer.Context, path: str) -> int:
    """Send the file's resources in lists that fit MAX_ADD and the line limit; how many were added."""
    entries = read_resources(path)
    lists: list[tuple[int, list[Any]]] = []
    size = 0
    for number, entry in enumerate(entries):
        length = len(json.dumps(entry, separators=(",", ":"))) + 1
        if not lists or len(lists[-1][1]) == MAX_ADD or size + length > MAX_MESSAGE_BYTES // 2:
            lists.append((number, []))
            size = 0
        lists[-1][1].append(entry)
        size += length
    added = 0
    try:
        with Client(socket_of(ctx), retry_for=retry_of(ctx)) as client:
            for first, part in lists:
                try:
                    added += int(client.call(Method.RESOURCES_ADD, {"resources": part})["added"])
                except RpcError as error:
                    exit_with(rpc_failure(RpcError(error.code, _refusal(error.message, path, first, len(part), added),
                                                   error.data)))
    except DaemonUnreachable as error:
        exit_with(unreachable(error))
    except KeyboardInterrupt:
        exit_with(exitcodes.INTERRUPTED)
    return added


def _refusal(message: str, path: str, first: int, count: int, added: int) -> str:
    """The daemon's refusal of one list, with its entries numbered as in the file (from 1)."""
    head, sep, rest = message.partition("]: ")
    if sep and head.startswith("resources[") and head[len("resources["):].isdigit():
        message = f"entry {first + int(head[len('resources['):]) + 1}: {rest}"
    where = "stdin" if path == "-" else path
    return (f"--from {where}: {message} (entries {first + 1}-{first + count} were not added; "
            f"{added} added before them)")


@app.command()
def remove(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Name of the resource.", autocompletion=complete.resource_names)],
    json_output: Annotated[bool, typer.Option("--json", help="Print the removed resource as JSON.")] = False,
) -> None:
    """Remove a resource added with `mcpctl resource add`; root and the admin group only.

    Refused while any active allocation holds it. Resources from the config file or discovered on the host
    are never removed here: edit the config file and reload the daemon instead.

    Example: mcpctl resource remove licence:matlab
    """
    resource = call(ctx, Method.RESOURCES_REMOVE, {"name": name})
    if json_output:
        print_json(resource)
    else:
        print(printable(f"removed {resource['name']}"))


@app.command()
def refresh(
    ctx: typer.Context,
    json_output: Annotated[bool, typer.Option("--json", help="Print the changes as JSON.")] = False,
) -> None:
    """Rediscover CPUs, memory, disks, network interfaces and GPUs now; root and the admin group only.

    Example: mcpctl resource refresh
    """
    result = call(ctx, Method.RESOURCES_REFRESH)
    if json_output:
        print_json(result)
    else:
        print("\n".join(map(printable, result["changes"])) or "no changes")


@app.command("set-cost")
def set_cost(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Name of the resource (or a GPU UUID).",
                                        autocompletion=complete.resource_names)],
    cost: Annotated[
        str, typer.Argument(metavar="COST", help="Cost per unit-hour: a number of zero or more, or 'none' to clear.")
    ],
    json_output: Annotated[bool, typer.Option("--json", help="Print the changed resource as JSON.")] = False,
) -> None:
    """Set what one unit of a resource costs per hour (or clear it), for accounting, budgets and --max-cost.

    Examples:

      mcpctl resource set-cost gpu:0 2.5

      mcpctl resource set-cost memory 0.000000001     # per byte-hour

      mcpctl resource set-cost licence none

    Allocations already granted keep the cost they were granted at.
    """
    price: float | None
    if cost.strip().lower() == "none":
        price = None
    else:
        try:
            price = float(cost)
        except ValueError:
            price = -1.0
        if not math.isfinite(price) or price < 0:
            usage(f"COST takes a number of zero or more, or 'none' to clear it; got {cost!r}")
    resource = call(ctx, Method.RESOURCES_SET_COST, {"name": name, "cost_per_unit_hour": price})
    if json_output:
        print_json(resource)
    elif resource.get("cost_per_unit_hour") is None:
        print(printable(f"{resource['name']}: no cost"))
    else:
        unit = str(resource.get("unit") or "unit")
        one = unit[:-1] if unit.endswith("s") and "/" not in unit and len(unit) > 1 else unit
        print(printable(f"{resource['name']}: {money(resource['cost_per_unit_hour'])} per {one}-hour"))
