"""`mcpctl run`: allocate, run a command that holds the allocation, release when it ends."""

from __future__ import annotations

from typing import Annotated

import typer

from mcpctl.actions import AllocateOptions
from mcpctl.commands.allocate import (
    Cpu,
    Disk,
    EnforceOption,
    KeepProcesses,
    ExecId,
    Gpu,
    Key,
    MaxCost,
    Members,
    Mem,
    ObjectiveOption,
    Pool,
    Preemptible,
    PriorityOption,
    Res,
    StrategyOption,
    Tool,
    Ttl,
    ClusterOption,
    Spill,
    Wait,
    Where,
)
from mcpctl.launch import run_command, run_step
from mcpctl.output import exit_with, retry_of, socket_of, usage
from mcpresd.protocol import Priority


def run(
    ctx: typer.Context,
    command: Annotated[
        list[str] | None,
        typer.Argument(metavar="-- CMD [ARGS]...", help="The command to run, after `--`, with its arguments.",
                       show_default=False),
    ] = None,
    cpu: Cpu = None,
    mem: Mem = None,
    gpu: Gpu = None,
    disk: Disk = None,
    res: Res = None,
    priority: PriorityOption = Priority.NORMAL,
    tool: Tool = None,
    exec_id: ExecId = None,
    key: Key = None,
    wait: Wait = None,
    ttl: Ttl = None,
    strategy: StrategyOption = None,
    where: Where = None,
    max_cost: MaxCost = None,
    preemptible: Preemptible = False,
    pool: Pool = None,
    members: Members = None,
    objective: ObjectiveOption = None,
    enforce: EnforceOption = None,
    keep_processes: KeepProcesses = False,
    cluster: ClusterOption = False,
    spill: Spill = False,
    allocation: Annotated[
        str | None,
        typer.Option("--allocation", metavar="ID",
                     help="Run the command as a step of this existing allocation (in its cgroup, with its GPUs); "
                          "the allocation stays when the command ends. Takes no request options."),
    ] = None,
) -> None:
    """Run a command inside an allocation: allocate, run it, release when it ends.

    Examples:

      mcpctl run --gpu 1 -- python train.py --epochs 10

      mcpctl run --gpu 1 --mem 32G --wait 1h -- ./render.sh scene.blend

      mcpctl run --res licence=1 --wait forever -- matlab -batch job

      mcpctl run --pool render --objective cost --tool render -- ./render.sh scene.blend

      mcpctl run --cluster --gpu 1 --wait 1h -- python train.py    # a step of a Slurm job

    With --cluster (or --spill when the host is full) the command runs on the
    cluster as a step of the allocation's Slurm job (`srun --jobid=N
    --overlap`, through the daemon's [cluster] command prefix), with stdin,
    stdout and stderr passed through and CUDA_VISIBLE_DEVICES as Slurm sets
    it; the job is cancelled when the command ends. --allocation ID of a
    cluster allocation runs the command as a step of its job the same way.

    The command holds the allocation: the daemon releases it the moment the
    command exits, however it exits. It sees MCPRES_ALLOCATION_ID,
    CUDA_VISIBLE_DEVICES (the granted GPUs' UUIDs, comma-separated; empty when
    no GPU was granted) and CUDA_DEVICE_ORDER=PCI_BUS_ID. SIGINT, SIGTERM,
    SIGHUP, SIGQUIT, SIGUSR1 and SIGUSR2 sent to mcpctl are passed on to it.
    When it ends, mcpctl releases the allocation and reports what the command
    used (CPU seconds and peak memory, from the kernel), so `mcpctl usage` and
    `mcpctl recommend TOOL` can show how much of the request was used.

    With enforcement (--enforce, or the daemon's [enforce] mode) the command is in
    the allocation's cgroup before it starts, and so is everything it starts:
    under hard, going over --mem is an OOM kill (exit 137, and mcpctl says by
    how much); when it ends, what it left running is stopped (--keep-processes
    keeps it).

    A per-user daemon (`mcpctl status`: systemd-scope) moves no process: the
    command is started through `systemd-run --user --scope` in a transient
    scope of your systemd user manager, with the allocation's limits as the
    scope's properties (same pid, same exit status).

    With --allocation ID the command runs as a step of an allocation made
    before (id=$(mcpctl allocate ...)): it joins that allocation's cgroup, so
    all the steps share its limits, and the allocation is not released when
    the step ends.

    Exits with the command's exit code, 128+N if signal N killed it, 127 if it
    was not found, 126 if it could not be run; or, when nothing ran, with allocate's exit code (3:
    does not fit now or the --wait ran out).
    """
    if allocation is not None:
        asked = [name for name, value in (("--cpu", cpu), ("--mem", mem), ("--gpu", gpu), ("--disk", disk),
                                          ("--res", res), ("--pool", pool), ("--enforce", enforce), ("--key", key),
                                          ("--wait", wait), ("--ttl", ttl), ("--cluster", cluster),
                                          ("--spill", spill)) if value]
        if asked or keep_processes:
            usage(f"--allocation runs a step of an allocation that exists; it takes no "
                  f"{', '.join(asked) or '--keep-processes'}")
        exit_with(run_step(socket_of(ctx), allocation, command or [], retry_of(ctx)))
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
        wait=wait,
        ttl=ttl,
        strategy=None if strategy is None else strategy.value,
        where=where or [],
        max_cost=max_cost,
        preemptible=preemptible,
        pool=pool,
        members=members,
        objective=None if objective is None else objective.value,
        enforce=None if enforce is None else enforce.value,
        keep_processes=keep_processes,
        cluster=cluster,
        spill=spill,
    )
    exit_with(run_command(socket_of(ctx), options, command or [], retry_of(ctx)))


def register(app: typer.Typer) -> None:
    app.command(context_settings={"allow_interspersed_args": False})(run)
