"""`mcpctl allocate`: ask for several resources at once; all or nothing.

`mcpctl.fast` runs the same options without importing Typer; keep the two in step
(tests/unit/test_cli_fast_path.py checks it).
"""

from __future__ import annotations

from typing import Annotated

import typer

from mcpctl.actions import AllocateOptions, run_allocate
from mcpctl.output import exit_with, socket_of, usage
from mcpresd.protocol import Priority


def allocate(
    ctx: typer.Context,
    cpu: Annotated[str | None, typer.Option("--cpu", metavar="N", help="CPU cores; fractions allowed (0.5).")] = None,
    mem: Annotated[str | None, typer.Option("--mem", metavar="SIZE", help="Memory: 512M, 8G, 1.5T or bytes.")] = None,
    gpu: Annotated[
        str | None, typer.Option("--gpu", metavar="N", help="Whole GPUs (1, 2, ...) or a share of one (0.5).")
    ] = None,
    disk: Annotated[
        list[str] | None, typer.Option("--disk", metavar="MOUNT=SIZE", help="Disk space on a mount, e.g. /=10G.")
    ] = None,
    res: Annotated[
        list[str] | None,
        typer.Option("--res", metavar="NAME=AMOUNT", help="Any resource by name or GPU UUID, e.g. licence=1."),
    ] = None,
    priority: Annotated[Priority, typer.Option("--priority", help="Priority of the request.")] = Priority.NORMAL,
    tool: Annotated[str | None, typer.Option("--tool", metavar="ID", help="Tool id, for accounting.")] = None,
    exec_id: Annotated[str | None, typer.Option("--exec", metavar="ID", help="Execution id, for accounting.")] = None,
    key: Annotated[
        str | None,
        typer.Option("--key", metavar="K", help="Idempotency key: a retry with the same key returns the same allocation."),
    ] = None,
    holder_pid: Annotated[
        int | None,
        typer.Option("--holder-pid", metavar="PID", min=1, help="Process holding the allocation (default: the caller's shell)."),
    ] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print the allocation as JSON.")] = False,
    env: Annotated[
        bool, typer.Option("--env", help="Print export lines (MCPRES_ALLOCATION_ID, CUDA_VISIBLE_DEVICES) for eval.")
    ] = False,
) -> None:
    """Allocate resources atomically and print the allocation id.

    Examples:

      id=$(mcpctl allocate --cpu 2 --mem 8G --gpu 1 --res licence=1)

      eval "$(mcpctl allocate --gpu 1 --env)"

      mcpctl allocate --disk /=10G --priority high --tool build --json

    Exits 3 if the request does not fit now.
    """
    if json_output and env:
        usage("choose one of --json and --env")
    options = AllocateOptions(
        cpu=cpu,
        mem=mem,
        gpu=gpu,
        disk=disk or [],
        res=res or [],
        priority=priority.value,
        tool=tool,
        exec_id=exec_id,
        key=key,
        holder_pid=holder_pid,
        output="json" if json_output else "env" if env else "id",
    )
    exit_with(run_allocate(socket_of(ctx), options))


def register(app: typer.Typer) -> None:
    app.command()(allocate)
