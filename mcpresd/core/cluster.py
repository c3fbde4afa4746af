"""A Slurm cluster as values: what its commands are asked, and what their output says.

Pure: the adapter (mcpresd/cluster/slurm.py) runs the commands and hands their output here. Slurm's command-line
tools are the interface because they exist on every version users run (slurmrestd's allocation endpoint does
not in 22.05). Every request sent to Slurm is named `mcpres-<allocation id>`, so the daemon can find its own jobs
again after a restart (`squeue`), and an admin can see whose they are.

Formats read here (stable across Slurm 20.11 to 24.x; recorded from 22.05 in tests/fixtures/slurm/):
- `sinfo --noheader --Node --Format=` with `SINFO_FIELDS`: one line per node and partition;
- `squeue --noheader --states=all --format=` with `SQUEUE_FORMAT`: one line per job;
- salloc's stderr: `salloc: Pending job allocation N`, `salloc: Granted job allocation N`, `salloc: error: ...`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from enum import StrEnum

JOB_PREFIX = "mcpres-"
SEP = "|"
SINFO_FIELDS = ("Partition", "Available", "NodeHost", "CPUsState", "Memory", "AllocMem", "Gres", "GresUsed",
                "StateLong")
"""`sinfo -O` fields, each closed by `:|` so that the output is split on `|` whatever the widths."""
SQUEUE_FORMAT = SEP.join(("%i", "%T", "%r", "%N", "%u", "%b", "%j"))
"""Job id, state, reason, nodes, user, generic resources (gres), name: last, since a name may hold a `|`."""

# Node states (StateLong, lower case, maybe with a `*` for not responding, `~` powered down, `#`, `!`, `%`, `$`, `@`,
# `^`, `-` suffixes) in which a node takes no new work.
_UNUSABLE = ("down", "drain", "drained", "draining", "fail", "failing", "future", "maint", "reboot", "unknown",
             "inval", "power_down", "powered_down", "powering_down", "not_responding", "perfctrs", "planned")


class JobState(StrEnum):
    """squeue's %T, as far as an allocation cares (every other state reads as OTHER)."""

    PENDING = "PENDING"
    CONFIGURING = "CONFIGURING"
    RUNNING = "RUNNING"
    SUSPENDED = "SUSPENDED"
    COMPLETING = "COMPLETING"
    COMPLETED = "COMPLETED"
    CANCELLED = "CANCELLED"
    FAILED = "FAILED"
    TIMEOUT = "TIMEOUT"
    NODE_FAIL = "NODE_FAIL"
    PREEMPTED = "PREEMPTED"
    BOOT_FAIL = "BOOT_FAIL"
    DEADLINE = "DEADLINE"
    OUT_OF_MEMORY = "OUT_OF_MEMORY"
    OTHER = "OTHER"

    @property
    def waiting(self) -> bool:
        return self in (JobState.PENDING, JobState.CONFIGURING)

    @property
    def holding(self) -> bool:
        """The job holds its nodes: the allocation is active."""
        return self in (JobState.RUNNING, JobState.SUSPENDED, JobState.COMPLETING)

    @property
    def ended(self) -> bool:
        return not (self.waiting or self.holding)


@dataclass(frozen=True)
class Partition:
    """One partition's capacity and what is free in it now (nodes that take no new work count as not free)."""

    name: str
    default: bool
    up: bool
    nodes: tuple[str, ...]
    cpus: int
    cpus_free: int
    memory: int
    """Bytes."""
    memory_free: int
    gpus: int
    gpus_free: int


@dataclass(frozen=True)
class ClusterJob:
    """One line of squeue."""

    id: int
    name: str
    state: JobState
    reason: str
    nodes: str
    user: str
    gres: str

    @property
    def allocation_id(self) -> str | None:
        """The mcpres allocation this job was submitted for; None for anyone else's job."""
        return self.name[len(JOB_PREFIX):] if self.name.startswith(JOB_PREFIX) else None


@dataclass(frozen=True)
class ClusterRequest:
    """What one allocation asks of the cluster."""

    allocation_id: str
    cpus: float = 1.0
    memory: int | None = None
    """Bytes; None: Slurm's default for the partition."""
    gpus: int = 0
    time_limit: float | None = None
    """Seconds; None: the config's default (then the partition's)."""
    partition: str | None = None
    account: str | None = None
    immediate: bool = False
    """`--wait 0`: a job Slurm cannot start at once is refused, not queued."""
    extra: tuple[str, ...] = field(default_factory=tuple)


class SallocNews(StrEnum):
    PENDING = "pending"
    GRANTED = "granted"
    ERROR = "error"


def job_name(allocation_id: str) -> str:
    return JOB_PREFIX + allocation_id


def slurm_duration(seconds: float) -> str:
    """A time limit as Slurm reads it (`days-hours:minutes:seconds`), rounded up to whole seconds, at least 1."""
    total = max(1, math.ceil(seconds))
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{days}-{hours:02d}:{minutes:02d}:{secs:02d}"


def salloc_argv(request: ClusterRequest) -> list[str]:
    """`salloc --no-shell` for one request: one task on one node, its CPUs, memory and GPUs, named for it."""
    argv = ["salloc", "--no-shell", f"--job-name={job_name(request.allocation_id)}", "--nodes=1", "--ntasks=1",
            f"--cpus-per-task={max(1, math.ceil(request.cpus))}"]
    if request.memory is not None:
        argv.append(f"--mem={max(1, math.ceil(request.memory / 1048576))}M")
    if request.gpus:
        argv.append(f"--gres=gpu:{request.gpus}")
    if request.time_limit is not None:
        argv.append(f"--time={slurm_duration(request.time_limit)}")
    if request.partition:
        argv.append(f"--partition={request.partition}")
    if request.account:
        argv.append(f"--account={request.account}")
    if request.immediate:
        argv.append("--immediate")
    argv.extend(request.extra)
    return argv


def sinfo_argv() -> list[str]:
    return ["sinfo", "--noheader", "--Node", "--Format=" + ",".join(f"{name}:{SEP}" for name in SINFO_FIELDS)]


def squeue_argv(user: str | None = None) -> list[str]:
    argv = ["squeue", "--noheader", "--states=all", f"--format={SQUEUE_FORMAT}"]
    if user is not None:
        argv.append(f"--user={user}")
    return argv


_SALLOC = re.compile(r"salloc: (?:Pending|Granted) job allocation (\d+)")


def salloc_news(line: str) -> tuple[SallocNews, int | str] | None:
    """What one line of salloc's stderr says: (PENDING|GRANTED, job id), (ERROR, message), or None."""
    line = line.strip()
    found = _SALLOC.match(line)
    if found is not None:
        return (SallocNews.GRANTED if "Granted" in line else SallocNews.PENDING), int(found.group(1))
    if line.startswith("salloc: error: "):
        return SallocNews.ERROR, line[len("salloc: error: "):]
    return None


def split_top(text: str, sep: str = ",") -> list[str]:
    """`text` split on `sep` outside parentheses (`gpu:a100:2(S:0-1),mps:100` has two entries)."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(text):
        if char == "(":
            depth += 1
        elif char == ")":
            depth = max(0, depth - 1)
        elif char == sep and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [part for part in parts if part]


def gpu_count(gres: str) -> int:
    """GPUs in a gres string: `gpu:2`, `gpu:a100:2(S:0-1)`, `gpu:1(IDX:0)`, `gres:gpu:1`; 0 for `(null)`."""
    total = 0
    for entry in split_top(gres.strip()):
        entry = entry.split("(", 1)[0]
        if entry.startswith("gres:"):
            entry = entry[len("gres:"):]
        fields = entry.split(":")
        if fields[0] != "gpu":
            continue
        if len(fields) == 1:
            total += 1
            continue
        count = fields[-1]
        if count.isdigit():
            total += int(count)
        elif len(fields) == 2:  # gpu:TYPE with no count means one
            total += 1
    return total


def _usable(state: str) -> bool:
    state = state.strip().lower().rstrip("*~#!%$@^-+")
    return not any(part in _UNUSABLE for part in state.split("+"))


def _mebibytes(text: str) -> int:
    text = text.strip()
    return int(text) if text.isdigit() else 0


def parse_sinfo(text: str) -> list[Partition]:
    """Partitions from `sinfo_argv()`'s output, in the order sinfo lists them (the default one marked `*`)."""
    order: list[str] = []
    found: dict[str, dict[str, object]] = {}
    for line in text.splitlines():
        fields = [f.strip() for f in line.split(SEP)]
        if len(fields) < len(SINFO_FIELDS):
            continue
        name, available, node, cpus_state, memory, alloc_mem, gres, gres_used, state = fields[:len(SINFO_FIELDS)]
        default = name.endswith("*")
        name = name.rstrip("*")
        if name not in found:
            order.append(name)
            found[name] = {"default": default, "up": available.lower() == "up", "nodes": [], "cpus": 0,
                           "cpus_free": 0, "memory": 0, "memory_free": 0, "gpus": 0, "gpus_free": 0}
        part = found[name]
        nodes = part["nodes"]
        assert isinstance(nodes, list)
        if node in nodes:
            continue
        nodes.append(node)
        counts = cpus_state.split("/")  # allocated/idle/other/total
        total_cpus = int(counts[3]) if len(counts) == 4 and counts[3].isdigit() else 0
        idle_cpus = int(counts[1]) if len(counts) == 4 and counts[1].isdigit() else 0
        memory_mib, used_mib = _mebibytes(memory), _mebibytes(alloc_mem)
        gpus, gpus_used = gpu_count(gres), gpu_count(gres_used)
        usable = _usable(state)
        add = {"cpus": total_cpus, "memory": memory_mib * 1048576, "gpus": gpus,
               "cpus_free": idle_cpus if usable else 0,
               "memory_free": max(0, memory_mib - used_mib) * 1048576 if usable else 0,
               "gpus_free": max(0, gpus - gpus_used) if usable else 0}
        for key, value in add.items():
            current = part[key]
            assert isinstance(current, int)
            part[key] = current + value
    partitions = []
    for name in order:
        part = found[name]
        nodes = part.pop("nodes")
        assert isinstance(nodes, list)
        partitions.append(Partition(name=name, nodes=tuple(nodes), **part))  # type: ignore[arg-type]
    return partitions


def parse_squeue(text: str) -> list[ClusterJob]:
    """Jobs from `squeue_argv()`'s output (lines that do not parse are skipped)."""
    jobs = []
    for line in text.splitlines():
        fields = line.strip().split(SEP)
        if len(fields) < 7 or not fields[0].isdigit():
            continue
        job_id, state, reason, nodes, user, gres = fields[:6]
        name = SEP.join(fields[6:])
        try:
            job_state = JobState(state)
        except ValueError:
            job_state = JobState.OTHER
        jobs.append(ClusterJob(int(job_id), name, job_state, reason, nodes, user, gres))
    return jobs
