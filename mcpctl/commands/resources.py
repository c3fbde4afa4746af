"""`mcpctl resources`: every resource with its capacity, what is allocated and what is free."""

from __future__ import annotations

from typing import Annotated

import typer

from mcpctl.output import Columns, NoHeaders, call, listing, print_json, usage
from mcpctl.view import RESOURCE_HEADERS, resource_row
from mcpresd.protocol import Method, ResourceType


def resources(
    ctx: typer.Context,
    type_: Annotated[
        ResourceType | None, typer.Option("--type", help="Only resources of this type.", case_sensitive=False)
    ] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print the API's JSON.")] = False,
    columns: Columns = None,
    no_headers: NoHeaders = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print only the names, one a line.")] = False,
) -> None:
    """List resources: capacity, allocated and free; POOLS is what slot pools hold of it (part of ALLOCATED).

    Examples: mcpctl resources; mcpctl resources --type gpu --json; mcpctl resources -o name,free --no-headers;
    mcpctl resources --type gpu -q
    """
    if sum((json_output, quiet, columns is not None)) > 1:
        usage("choose one of --json, -q and -o")
    rows = call(ctx, Method.RESOURCES_LIST, {"type": type_.value} if type_ else {})
    if json_output:
        print_json(rows)
        return
    if quiet:
        for resource in rows:
            print(resource["name"])
        return

    def rich() -> None:
        from mcpctl import render

        render.resources(rows)

    listing(RESOURCE_HEADERS, [resource_row(r) for r in rows], columns=columns, no_headers=no_headers, rich=rich)


def register(app: typer.Typer) -> None:
    app.command()(resources)
