"""GPU readings for the scheduler: load, free device memory, throttling and who uses the device.

Runs off the event loop (NVML calls block); turns NVML samples into `GpuReading`s,
with each compute process's lineage read from /proc so the broker can tell its
own holders' processes from foreign ones.
"""

from __future__ import annotations

from mcpresd.core.risk import GpuProcess, GpuReading
from mcpresd.holders import lineage
from mcpresd.samplers.nvml import GpuError, Nvml


def _number(value: object) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _integer(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def read_gpus(nvml: Nvml) -> dict[str, GpuReading]:
    """One reading per GPU, keyed by resource name (gpu:<index>); unreachable devices are left out."""
    readings = {}
    for index in range(nvml.device_count()):
        try:
            sample = nvml.sample(index)
        except GpuError:
            continue
        utilisation = _number(sample.get("utilization_gpu"))
        raw = sample.get("compute_processes")
        processes = []
        if isinstance(raw, list):
            for entry in raw:
                if isinstance(entry, dict):
                    pid = _integer(entry.get("pid"))
                    processes.append(GpuProcess(pid, _integer(entry.get("used_memory")),
                                                lineage(pid) if pid else ()))
        readings[f"gpu:{index}"] = GpuReading(
            load=None if utilisation is None else utilisation / 100,
            memory_used=_integer(sample.get("memory_used")),
            memory_total=_integer(sample.get("memory_total")),
            throttle_reasons=_integer(sample.get("throttle_reasons")),
            processes=tuple(processes),
        )
    return readings
