"""What an allocation's processes are held to, per enforcement mode: pure values, no cgroup files.

Rules:
- `off` limits nothing (no cgroup). `soft` is work-conserving: a CPU weight in
  proportion to the granted cores and a memory threshold at the grant that
  throttles and reclaims, never kills. `hard` caps: a CPU quota of the granted
  cores, the cores themselves where the grant names them, memory and swap at
  the grant, a task limit, and the device nodes of the host's GPUs it was
  not granted (cgroup v1's devices controller; on v2 that needs BPF and is
  not done).
- A request may ask for any mode up to the config's `max_mode`; none asked
  means the config's `mode`, lowered to `max_mode` if it is above it.
- A backend (mcpresd.enforce) turns `Limits` into its own files: cgroup v2
  takes `cpu_weight` and `memory_high`, v1 `cpu_shares` and the soft limit.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from mcpresd.core.errors import InvalidRequest
from mcpresd.protocol import EnforceMode

RANK = {EnforceMode.OFF: 0, EnforceMode.SOFT: 1, EnforceMode.HARD: 2}
CPU_PERIOD_US = 100_000
MIN_CPU_QUOTA_US = 1_000
"""The kernel refuses a CFS quota below 1 ms."""
SHARES_PER_CORE = 1024
"""cgroup v1's default cpu.shares is 1024: one core's worth."""
WEIGHT_PER_CORE = 100
"""cgroup v2's default cpu.weight is 100."""
DEFAULT_TASKS_MAX = 4096


@dataclass(frozen=True)
class Limits:
    """What one allocation's cgroup is set to; None leaves the kernel's default (unlimited)."""

    mode: EnforceMode
    cpu_shares: int | None = None
    cpu_weight: int | None = None
    cpu_quota_us: int | None = None
    cpu_period_us: int = CPU_PERIOD_US
    cpus: tuple[int, ...] | None = None
    memory_soft: int | None = None
    memory_max: int | None = None
    swap_max: int | None = None
    """Swap the allocation may use beyond memory_max (v2 memory.swap.max; v1 memsw = memory_max + this)."""
    tasks_max: int | None = None
    gpu_devices_denied: tuple[int, ...] = ()
    """Minors of the NVIDIA device nodes (/dev/nvidiaN, char 195:N) its processes may not open: the host's GPUs
    it was not granted. /dev/nvidiactl, nvidia-uvm and the others stay open."""

    @property
    def contained(self) -> bool:
        """Whether the allocation's processes get a cgroup at all."""
        return self.mode is not EnforceMode.OFF


def effective_mode(requested: EnforceMode | None, default: EnforceMode, most: EnforceMode) -> EnforceMode:
    """The mode a request gets: what it asked for, else the default; never above `most` (asking above is refused)."""
    if requested is None:
        return default if RANK[default] <= RANK[most] else most
    if RANK[requested] > RANK[most]:
        raise InvalidRequest(f"enforce {requested.value!r} is above this daemon's max_mode {most.value!r}",
                             field="enforce", max_mode=most.value)
    return requested


@dataclass(frozen=True)
class Grant:
    """The parts of a grant enforcement acts on."""

    cpu: float | None = None
    """Cores (fractions allowed)."""
    memory: int | None = None
    """Bytes."""
    cores: tuple[int, ...] | None = None
    """Whole cores the grant names (resources `cpu:N`), if any."""
    gpus: tuple[str, ...] = ()
    """The GPUs granted (resources `gpu:N`)."""


def grant_of(items: Iterable[tuple[str, float]]) -> Grant:
    """The CPU and memory in an allocation's items (resource name, amount): `cpu`, `memory`, `cpu:N` cores."""
    cpu = memory = 0.0
    cores: list[int] = []
    gpus: list[str] = []
    for resource, amount in items:
        if resource.startswith("gpu:") and amount > 0:
            gpus.append(resource)
        elif resource == "cpu":
            cpu += amount
        elif resource == "memory":
            memory += amount
        elif resource.startswith("cpu:") and resource[4:].isdigit() and amount >= 1:
            cores.append(int(resource[4:]))
            cpu += amount
    return Grant(cpu=cpu or None, memory=int(memory) if memory else None,
                 cores=tuple(sorted(cores)) if cores else None, gpus=tuple(sorted(gpus)))


def limits_for(mode: EnforceMode, grant: Grant, tasks_max: int = DEFAULT_TASKS_MAX,
               gpu_devices: Mapping[str, int] | None = None) -> Limits:
    """The limits `mode` puts on an allocation granted `grant`; `gpu_devices`: {GPU resource: device minor} of
    every GPU on the host."""
    if mode is EnforceMode.OFF:
        return Limits(mode)
    shares = weight = None
    if grant.cpu is not None:
        shares = max(2, min(262_144, round(grant.cpu * SHARES_PER_CORE)))
        weight = max(1, min(10_000, round(grant.cpu * WEIGHT_PER_CORE)))
    if mode is EnforceMode.SOFT:
        return Limits(mode, cpu_shares=shares, cpu_weight=weight, memory_soft=grant.memory)
    quota = None if grant.cpu is None else max(MIN_CPU_QUOTA_US, round(grant.cpu * CPU_PERIOD_US))
    denied = sorted({minor for name, minor in (gpu_devices or {}).items() if name not in grant.gpus})
    return Limits(mode, cpu_shares=shares, cpu_weight=weight, cpu_quota_us=quota, cpus=grant.cores,
                  memory_max=grant.memory, swap_max=None if grant.memory is None else 0, tasks_max=tasks_max,
                  gpu_devices_denied=tuple(denied))


def over_grant(limits: Limits, grant: Grant, memory_used: float, cpu_rate: float | None) -> list[dict[str, float | str]]:
    """What measured use exceeds the grant by (soft mode's overuse): kind, granted, used."""
    over: list[dict[str, float | str]] = []
    if grant.memory is not None and memory_used > grant.memory:
        over.append({"kind": "memory", "granted": float(grant.memory), "used": float(memory_used)})
    if grant.cpu is not None and cpu_rate is not None and cpu_rate > grant.cpu * 1.05:
        over.append({"kind": "cpu", "granted": grant.cpu, "used": round(cpu_rate, 3)})
    return over


@dataclass(frozen=True)
class EnforcePolicy:
    """The config's [enforce] table."""

    mode: EnforceMode = EnforceMode.SOFT
    max_mode: EnforceMode = EnforceMode.HARD
    kill_grace: float = 5.0
    """Seconds between SIGTERM and SIGKILL to the processes left in an allocation that ended."""
    tasks_max: int = DEFAULT_TASKS_MAX
    cgroup: str = "mcpres"
    """The daemon's subtree under each cgroup controller (v1) or the unified hierarchy (v2)."""
    favordynmods: bool = True
    """Set the cgroup2 mount option favordynmods at start (mcpresd.enforce.dynmods), as root with cgroups."""


class Overuse:
    """Soft mode's overuse: use over the grant in two samples in a row (longer than one sampling interval).

    Each kind (cpu, memory) is reported once per spell: again only after it fell back under the grant.
    """

    def __init__(self) -> None:
        self._over: dict[str, set[str]] = {}
        self._reported: dict[str, dict[str, dict[str, float | str]]] = {}

    def observe(self, allocation_id: str, over: list[dict[str, float | str]]) -> list[dict[str, float | str]]:
        """This round's excesses of one allocation; returns those to report now."""
        kinds = {str(o["kind"]) for o in over}
        before = self._over.get(allocation_id, set())
        self._over[allocation_id] = kinds
        reported = self._reported.setdefault(allocation_id, {})
        for kind in set(reported) - kinds:
            del reported[kind]
        fresh = [o for o in over if o["kind"] in before and o["kind"] not in reported]
        for o in over:
            if o["kind"] in reported or o in fresh:
                reported[str(o["kind"])] = o
        return fresh

    def quiet(self, allocation_id: str) -> bool:
        """Nothing of the allocation was over its grant in the last round observed (or none was)."""
        return not self._over.get(allocation_id)

    def current(self, allocation_id: str) -> list[dict[str, float | str]]:
        """The excesses reported and still going on."""
        return list(self._reported.get(allocation_id, {}).values())

    def forget(self, allocation_id: str) -> None:
        self._over.pop(allocation_id, None)
        self._reported.pop(allocation_id, None)
