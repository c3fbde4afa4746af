"""`mcpctl resource add|remove|refresh|set-cost`: custom resources, rediscovery and what resources cost."""

from __future__ import annotations

from typing import Annotated, Any

import math

import typer

from mcpctl import complete
from mcpctl.output import call, print_json, usage
from mcpctl.view import money
from mcpresd.protocol import Method, UnitError, format_amount, parse_amount

app = typer.Typer(help="Register or remove custom resources, set what resources cost; rediscover the host's.",
                  no_args_is_help=True)


@app.command()
def add(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Name, e.g. licence:matlab or slot:render.")],
    capacity: Annotated[str, typer.Option("--capacity", metavar="N", help="How much there is (a number or a size).")],
    unit: Annotated[str, typer.Option("--unit", metavar="U", help="Unit shown beside amounts.")] = "units",
    cost: Annotated[
        float | None, typer.Option("--cost", metavar="X", min=0, help="Cost per unit-hour, for accounting.")
    ] = None,
    label: Annotated[
        list[str] | None, typer.Option("--label", metavar="KEY=VALUE", help="A label; repeat for more.")
    ] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print the new resource as JSON.")] = False,
) -> None:
    """Register a custom resource (a licence pool, tool slots, ...); root and the admin group only.

    A name the config file declares is not taken: the config's definition wins (at the next reload or start,
    it replaces a resource added here under that name).

    Example: mcpctl resource add licence:matlab --capacity 4 --unit seats
    """
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
        print(f"added {resource['name']} ({format_amount(resource['capacity'], resource['unit'])})")


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
        print(f"removed {resource['name']}")


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
        print("\n".join(result["changes"]) or "no changes")


@app.command("set-cost")
def set_cost(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Name of the resource (or a GPU UUID).")],
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
        print(f"{resource['name']}: no cost")
    else:
        unit = str(resource.get("unit") or "unit")
        one = unit[:-1] if unit.endswith("s") and "/" not in unit and len(unit) > 1 else unit
        print(f"{resource['name']}: {money(resource['cost_per_unit_hour'])} per {one}-hour")
