"""Risk notes on a GPU grant: what NVML shows that the ledger cannot.

Rules:
- Device memory used by processes that belong to no allocation holding the
  device (their pid and ancestors include none of its holders) is foreign use.
  A process whose pid NVML did not report cannot be attributed and is not counted.
- Throttling that costs speed (power cap, hardware slowdown, thermal, power
  brake) is named; NVML's "GPU idle" and application-clock bits are not risks.
"""

from __future__ import annotations

from collections.abc import Collection
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
