"""Risk notes on a GPU grant: what NVML shows that the ledger cannot.

Rules:
- Device memory used by processes that belong to no allocation holding the
  device (their pid and ancestors include none of its holders) is foreign use.
  A process whose pid NVML did not report cannot be attributed and is not counted.
- Foreign GPU use (`foreign_gpu_use`): a process belongs to the allocation
  whose cgroup it is in and to every allocation one of its ancestors holds
  (the holder's process tree: allocations without a cgroup, reservations and
  `enforce off`). A process on a GPU none of its allocations was granted is
  foreign; so is a process of no allocation on a GPU allocated to someone.
  A process of no allocation on a GPU nobody holds is nobody's business here.
  Each (GPU, pid) is reported once per spell: again only after it stopped.
- Throttling that costs speed (power cap, hardware slowdown, thermal, power
  brake) is named; NVML's "GPU idle" and application-clock bits are not risks.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass

THROTTLE_NOTES = {
    0x4: "power-capped by software",
    0x8: "slowed down by hardware",
    0x20: "thermally throttled (software)",
    0x40: "thermally throttled (hardware)",
    0x80: "hardware power brake engaged",
}


@dataclass(frozen=True)
class GpuProcess:
    pid: int | None
    used_memory: int | None
    lineage: tuple[int, ...] = ()
    """The pid and its ancestors, nearest first."""


@dataclass(frozen=True)
class GpuReading:
    load: float | None
    memory_used: int | None
    memory_total: int | None
    throttle_reasons: int | None
    processes: tuple[GpuProcess, ...] = ()

    @property
    def memory_free(self) -> int | None:
        if self.memory_used is None or self.memory_total is None:
            return None
        return max(0, self.memory_total - self.memory_used)


def foreign_processes(reading: GpuReading, holders: Collection[int]) -> list[GpuProcess]:
    """Processes on the device that no holder of it started."""
    return [p for p in reading.processes if p.pid is not None and not set(p.lineage or (p.pid,)) & set(holders)]


def risk_notes(name: str, reading: GpuReading, holders: Collection[int]) -> list[str]:
    notes = []
    foreign = foreign_processes(reading, holders)
    if foreign:
        used = sum(p.used_memory or 0 for p in foreign)
        pids = ", ".join(str(p.pid) for p in foreign[:5])
        notes.append(f"{name}: {used / (1 << 30):.1f} GiB of device memory used by process(es) outside any "
                     f"allocation (pid {pids})")
    if reading.throttle_reasons:
        reasons = [text for bit, text in THROTTLE_NOTES.items() if reading.throttle_reasons & bit]
        if reasons:
            notes.append(f"{name}: {', '.join(reasons)}")
    return notes


@dataclass(frozen=True)
class ForeignUse:
    """A process on a GPU it has no grant for: its own allocations, and those granted the GPU."""

    gpu: str
    pid: int
    used_memory: int | None
    allocations: tuple[str, ...]
    """The allocations the process belongs to (none of them was granted `gpu`)."""
    granted: tuple[str, ...]
    """The allocations granted `gpu`."""

    def why(self) -> str:
        own = ", ".join(self.allocations)
        held = f"{self.gpu} is allocated to {', '.join(self.granted)}" if self.granted else \
            f"{self.gpu} is allocated to nobody"
        if self.allocations:
            return f"pid {self.pid} of allocation {own} uses {self.gpu}, which {own} was not granted ({held})"
        return f"pid {self.pid}, outside every allocation, uses {self.gpu} ({held})"


def belongs_to(process: GpuProcess, members: Mapping[int, str], held_by: Mapping[int, Collection[str]]) -> set[str]:
    """The allocations a GPU process belongs to: the one whose cgroup holds it, and those its ancestors hold."""
    if process.pid is None:
        return set()
    own = {members[process.pid]} if process.pid in members else set()
    for pid in process.lineage or (process.pid,):
        own.update(held_by.get(pid, ()))
    return own


def foreign_gpu_use(gpu: str, processes: Collection[GpuProcess], granted: Collection[str],
                    members: Mapping[int, str], held_by: Mapping[int, Collection[str]]) -> list[ForeignUse]:
    """The processes on `gpu` it was not granted to (see the module's rules).

    `granted`: the allocations holding `gpu`; `members`: {pid: allocation} from cgroup membership;
    `held_by`: {holder pid: its allocations}.
    """
    found = []
    for process in processes:
        if process.pid is None:
            continue  # NVML gave no pid: nothing to attribute
        own = belongs_to(process, members, held_by)
        if own & set(granted) or not (own or granted):
            continue
        found.append(ForeignUse(gpu, process.pid, process.used_memory, tuple(sorted(own)), tuple(sorted(granted))))
    return found


class ForeignSpells:
    """Which (GPU, pid) pairs are in a spell of foreign use; each is reported once per spell."""

    def __init__(self) -> None:
        self._open: dict[str, set[int]] = {}

    def observe(self, gpu: str, found: Collection[ForeignUse]) -> list[ForeignUse]:
        """This round's foreign use on `gpu`; returns the uses that started a spell."""
        before = self._open.get(gpu, set())
        now = {use.pid for use in found}
        if now:
            self._open[gpu] = now
        else:
            self._open.pop(gpu, None)
        return [use for use in found if use.pid not in before]

    def pids(self, gpu: str) -> set[int]:
        return set(self._open.get(gpu, ()))
