"""`mcpctl allocate`: ask for several resources at once; all or nothing; now, or after waiting in the queue.

`mcpctl.fast` runs the same options without importing Typer; keep the two in step
(tests/e2e/test_cli.py checks it). `mcpctl run` takes the request options too:
they are declared once here.
"""

from __future__ import annotations

from typing import Annotated

import typer

from mcpctl import complete
from mcpctl.actions import AllocateOptions, run_allocate
from mcpctl.output import exit_with, retry_of, socket_of, usage
from mcpresd.protocol import EnforceMode, Objective, Priority, Strategy

Cpu = Annotated[str | None, typer.Option("--cpu", metavar="N", help="CPU cores; fractions allowed (0.5); or MIN..MAX.")]
Mem = Annotated[
    str | None, typer.Option("--mem", metavar="SIZE", help="Memory: 512M, 8G, 1.5T or bytes; or MIN..MAX (4G..16G).")
]
Gpu = Annotated[
    str | None,
    typer.Option("--gpu", metavar="N", help="Whole GPUs (1, 2, ...) or a share of one (0.5); or MIN..MAX (1..2)."),
]
Disk = Annotated[
    list[str] | None, typer.Option("--disk", metavar="MOUNT=SIZE", help="Disk space on a mount, e.g. /=10G.")
]
Res = Annotated[
    list[str] | None,
    typer.Option("--res", metavar="NAME=AMOUNT",
                 help="Any resource by name or GPU UUID, e.g. licence=1 or slot=1..4; repeat for more.",
                 autocompletion=complete.resource_amounts),
]
PriorityOption = Annotated[Priority, typer.Option("--priority", help="Priority of the request.")]
Tool = Annotated[str | None, typer.Option("--tool", metavar="ID", help="Tool id, for accounting.")]
ExecId = Annotated[str | None, typer.Option("--exec", metavar="ID", help="Execution id, for accounting.")]
Key = Annotated[
    str | None,
    typer.Option("--key", metavar="K", help="Idempotency key: a retry with the same key returns the same allocation."),
]
Wait = Annotated[
    str | None,
    typer.Option("--wait", metavar="DURATION",
                 help="If it does not fit now, queue and wait this long (30s, 10m, 2h, forever). Default: 0, "
                      "fail at once."),
]
Ttl = Annotated[
    str | None,
    typer.Option("--ttl", metavar="DURATION",
                 help="Lease time: the daemon releases the allocation this long after the grant unless renewed."),
]
StrategyOption = Annotated[
    Strategy | None, typer.Option("--strategy", help="How to choose among resources that fit (default: the daemon's).")
]
Where = Annotated[
    list[str] | None,
    typer.Option("--where", metavar="SELECTOR",
                 help="Only resources matching this, e.g. 'memory>=40G' or 'name~H100'; repeat for more."),
]
MaxCost = Annotated[
    str | None, typer.Option("--max-cost", metavar="X", help="Refuse choices costing more than X per hour.")
]
Preemptible = Annotated[
    bool, typer.Option("--preemptible", help="Let a more urgent queued request take this allocation back.")
]
Pool = Annotated[
    str | None,
    typer.Option("--pool", metavar="NAMES",
                 help="Whole members of a pool: names, globs or selectors, comma-separated (build, 'build-*', "
                      "'cost<1'); alone or with other resources.", autocompletion=complete.pool_names),
]
Members = Annotated[
    str | None, typer.Option("--members", metavar="N", help="How many members to take from the pool(s) (default 1).")
]
ObjectiveOption = Annotated[
    Objective | None,
    typer.Option("--objective", help="With --pool naming several pools: which to prefer (default: the order named)."),
]

EnforceOption = Annotated[
    EnforceMode | None,
    typer.Option("--enforce", help="Hold the processes to the grant: off (a reservation), soft (CPU weight, memory "
                                   "throttled above the grant) or hard (CPU quota, memory capped, OOM-killed above "
                                   "it). Default: the daemon's [enforce] mode."),
]
KeepProcesses = Annotated[
    bool, typer.Option("--keep-processes", help="Leave the allocation's processes running when it ends (default: "
                                                "SIGTERM, then SIGKILL after the daemon's kill_grace).")
]
ClusterOption = Annotated[
    bool, typer.Option("--cluster", help="Allocate on the daemon's Slurm cluster ([cluster] in its config), not "
                                         "this host; the same as --where site=cluster.")
]
Spill = Annotated[
    bool, typer.Option("--spill", help="This host while it has room now; the Slurm cluster when it has not.")
]


def allocate(
    ctx: typer.Context,
    cpu: Cpu = None,
    mem: Mem = None,
    gpu: Gpu = None,
    disk: Disk = None,
    res: Res = None,
    priority: PriorityOption = Priority.NORMAL,
    tool: Tool = None,
    exec_id: ExecId = None,
    key: Key = None,
    holder_pid: Annotated[
        int | None,
        typer.Option("--holder-pid", metavar="PID", min=1,
                     help="Process holding the allocation (default: the calling script, above subshells and "
                          "wrappers such as timeout); released when it exits."),
    ] = None,
    wait: Wait = None,
    no_block: Annotated[
        bool,
        typer.Option("--no-block", help="With --wait: print the id at once, even while the request is queued "
                                        "(then use `mcpctl wait ID`)."),
    ] = False,
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
    json_output: Annotated[bool, typer.Option("--json", help="Print the allocation as JSON.")] = False,
    env: Annotated[
        bool, typer.Option("--env", help="Print export lines (MCPRES_ALLOCATION_ID, CUDA_VISIBLE_DEVICES) for eval; "
                                          "on failure `(exit N)`, so the eval fails with the exit code too.")
    ] = False,
) -> None:
    """Allocate resources atomically and print the allocation id.

    Examples:

      id=$(mcpctl allocate --cpu 2 --mem 8G --gpu 1 --res licence=1)

      eval "$(mcpctl allocate --gpu 1 --env)" || exit    # fails (exit 3, ...) when the allocation does

      id=$(mcpctl allocate --gpu 1 --wait 10m --ttl 2h)     # queue for up to 10 minutes

      id=$(mcpctl allocate --res licence=1 --wait forever --no-block); mcpctl wait "$id"

      mcpctl allocate --cpu 2..8 --mem 4G..16G --where 'name~H100' --gpu 1 --json

      id=$(mcpctl allocate --pool 'build-*' --members 2 --objective cost --wait 5m)

      id=$(mcpctl allocate --cluster --gpu 2 --mem 16G --wait 1h)    # a Slurm job (salloc)

      id=$(mcpctl allocate --spill --gpu 1 --wait 10m)   # here if it fits now, else the cluster

    The allocation is held by the calling shell (see --holder-pid) and released when it exits.
    With --enforce and --holder-pid, the named process (and its future children) joins the allocation's
    cgroup; the calling shell never does: run steps in it with `mcpctl run --allocation ID -- cmd`.
    Any amount may be a range MIN..MAX: the daemon grants as much as fits, at least MIN.
    --pool takes whole members of a pool (see `mcpctl pools`); --objective picks among several.
    --cluster (or --where site=cluster) forwards the request to the daemon's Slurm cluster: it is queued while
    Slurm keeps the job pending (`mcpctl explain` shows Slurm's reason) and its items name the job and node;
    releasing it cancels the job. --spill tries this host first, the cluster when the host is full.
    Exits 3 if the request does not fit now (or its --wait runs out); 1 if it can never fit, was withdrawn,
    or is refused (a spent budget, a draining or unknown pool); 7 if the cluster refused it or did not answer
    (Slurm's message says why).
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
        wait=wait,
        no_block=no_block,
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
    exit_with(run_allocate(socket_of(ctx), options, retry_of(ctx)))


def register(app: typer.Typer) -> None:
    app.command()(allocate)
