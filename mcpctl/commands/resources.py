"""`mcpctl resources`: every resource with its capacity, what is allocated and what is free."""

from __future__ import annotations

from typing import Annotated

import typer

from mcpctl.output import call, fancy, plain_table, print_json
from mcpctl.view import RESOURCE_HEADERS, resource_row
from mcpresd.protocol import Method, ResourceType


def resources(
    ctx: typer.Context,
    type_: Annotated[
        ResourceType | None, typer.Option("--type", help="Only resources of this type.", case_sensitive=False)
    ] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print the API's JSON.")] = False,
) -> None:
    """List resources: capacity, allocated and free; POOLS is what slot pools hold of it (part of ALLOCATED).

    Examples: mcpctl resources; mcpctl resources --type gpu --json
    """
    rows = call(ctx, Method.RESOURCES_LIST, {"type": type_.value} if type_ else {})
    if json_output:
        print_json(rows)
    elif fancy():
        from mcpctl import render

        render.resources(rows)
    else:
        plain_table(RESOURCE_HEADERS, [resource_row(r) for r in rows])


def register(app: typer.Typer) -> None:
    app.command()(resources)
