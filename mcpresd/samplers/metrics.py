"""Measured values of the host's resources, read with psutil and NVML once per interval.

Rules:
- One sampler in the daemon; clients never walk /proc themselves.
- A value is a number, `UNSUPPORTED` (the device does not offer it, e.g. fan
  speed on an H100) or None (the read failed: unknown). Never 0 for either.
- Rates (disk and network bytes per second) come from counter deltas between
  two reads; the first read of a counter has no rate yet (None).
- Names: metrics are keyed by resource name (`cpu`, `memory`, `disk:/`,
  `net:eth0`, `gpu:0`) and then by metric name; see METRICS for units.
- The sampler runs off the event loop; each probe has its own cadence: cheap
  reads every call, GPU process lineage (a /proc walk) only every
  `process_every` calls.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Any, Final, TypeVar

import psutil

from mcpresd.holders import lineage
from mcpresd.samplers.nvml import UNSUPPORTED, GpuError, Nvml

log = logging.getLogger("mcpresd.samplers")

T = TypeVar("T")
Value = float | str | None
Readings = dict[str, dict[str, Value]]

METRICS: Final = {
    "utilisation": "% of the resource measured busy (CPU, memory, disk space, GPU, network link)",
    "utilisation_rate": "% of the capacity allocated (allocated / capacity)",
    "load1": "1-minute load average (cpu)",
    "used": "bytes in use (memory, disk)",
    "available": "bytes available (memory)",
    "swap_utilisation": "% of swap in use (memory)",
    "read_bps": "bytes read per second (disk)",
    "write_bps": "bytes written per second (disk)",
    "rx_bps": "bytes received per second (network)",
    "tx_bps": "bytes sent per second (network)",
    "memory_utilisation": "% of device memory used (gpu)",
    "memory_used": "bytes of device memory used (gpu)",
    "temperature_c": "degrees Celsius (gpu)",
    "power_w": "watts (gpu)",
    "clock_sm_mhz": "SM clock in MHz (gpu)",
    "throttle_reasons": "NVML clocks-event reason bit mask (gpu)",
    "fan_speed_pct": "% fan speed (gpu)",
    "processes": "compute processes on the device (gpu)",
    "foreign_memory": "bytes of device memory used by processes outside any allocation (gpu)",
}


def _safe(read: Callable[[], float]) -> Value:
    try:
        return float(read())
    except Exception:  # noqa: BLE001 - a failed probe is an unknown value, never a crash
        return None


class HostSampler:
    """Reads psutil (and NVML where given) into `Readings`; keeps the counters needed for rates."""

    def __init__(self, nvml: Nvml | None = None, clock: Callable[[], float] = time.monotonic,
                 process_every: int = 5) -> None:
        self._nvml = nvml
        self._clock = clock
        self._process_every = max(1, process_every)
        self._calls = 0
        self._last: dict[str, tuple[float, float]] = {}
        self.gpu_processes: dict[str, list[tuple[int | None, int | None, tuple[int, ...]]]] = {}
        psutil.cpu_percent(percpu=True)  # primes psutil's per-call CPU deltas

    def read(self, disks: Iterable[tuple[str, str]], links: Iterable[str]) -> Readings:
        """`disks` are (resource name, mount point); `links` are interface names."""
        self._calls += 1
        now = self._clock()
        readings: Readings = {"cpu": self._cpu(), "memory": self._memory()}
        io = _call(lambda: psutil.disk_io_counters(perdisk=True)) or {}
        for name, mountpoint in disks:
            readings[name] = self._disk(mountpoint, io, now)
        nics = _call(lambda: psutil.net_io_counters(pernic=True)) or {}
        for link in links:
            readings[f"net:{link}"] = self._link(link, nics, now)
        if self._nvml is not None:
            readings.update(self._gpus(self._nvml))
        return readings

    def _cpu(self) -> dict[str, Value]:
        cores = _call(lambda: psutil.cpu_percent(percpu=True))
        values: dict[str, Value] = {
            "utilisation": sum(cores) / len(cores) if cores else None,
            "load1": _safe(lambda: psutil.getloadavg()[0]),
        }
        for index, percent in enumerate(cores or []):
            values[f"core{index}"] = float(percent)
        return values

    def _memory(self) -> dict[str, Value]:
        memory = _call(psutil.virtual_memory)
        swap = _call(psutil.swap_memory)
        return {
            "utilisation": float(memory.percent) if memory else None,
            "used": float(memory.total - memory.available) if memory else None,
            "available": float(memory.available) if memory else None,
            "swap_utilisation": (float(swap.percent) if swap.total else UNSUPPORTED) if swap else None,
        }

    def _rate(self, key: str, counter: float | None, now: float) -> Value:
        """Bytes per second since the last read; None if the counter failed; `_NOT_YET` on a first read."""
        if counter is None:
            return None
        previous = self._last.get(key)
        self._last[key] = (now, counter)
        if previous is None or now <= previous[0] or counter < previous[1]:
            return _NOT_YET  # no rate yet (or the counter wrapped): nothing to record, and no failed read either
        return (counter - previous[1]) / (now - previous[0])

    def _disk(self, mountpoint: str, io: dict[str, Any], now: float) -> dict[str, Value]:
        usage = _call(lambda: psutil.disk_usage(mountpoint))
        device = _device_of(mountpoint)
        counters = io.get(device) if device else None
        read_bytes = float(getattr(counters, "read_bytes")) if counters is not None else None
        write_bytes = float(getattr(counters, "write_bytes")) if counters is not None else None
        return _known({
            "utilisation": float(usage.percent) if usage else None,
            "used": float(usage.used) if usage else None,
            "read_bps": self._rate(f"{mountpoint}:r", read_bytes, now) if counters is not None else UNSUPPORTED,
            "write_bps": self._rate(f"{mountpoint}:w", write_bytes, now) if counters is not None else UNSUPPORTED,
        })

    def _link(self, link: str, nics: dict[str, Any], now: float) -> dict[str, Value]:
        counters = nics.get(link)
        if counters is None:
            return {"rx_bps": None, "tx_bps": None}
        return _known({
            "rx_bps": self._rate(f"{link}:rx", float(getattr(counters, "bytes_recv")), now),
            "tx_bps": self._rate(f"{link}:tx", float(getattr(counters, "bytes_sent")), now),
        })

    def _gpus(self, nvml: Nvml) -> Readings:
        readings: Readings = {}
        scan = self._calls % self._process_every == 1 or self._process_every == 1
        try:
            count = nvml.device_count()
        except Exception as error:  # noqa: BLE001 - the driver can fail at any time; report, never crash
            log.warning("GPU count failed: %s", error)
            return readings
        for index in range(count):
            name = f"gpu:{index}"
            try:
                sample = nvml.sample(index)
            except GpuError as error:
                log.warning("%s could not be read: %s", name, error)
                readings[name] = {"utilisation": None}
                continue
            used, total = sample.get("memory_used"), sample.get("memory_total")
            values: dict[str, Value] = {
                "utilisation": _value(sample.get("utilization_gpu")),
                "memory_used": _value(used),
                "memory_utilisation": (100.0 * used / total if isinstance(used, (int, float))
                                       and isinstance(total, (int, float)) and total else _value(used)),
                "temperature_c": _value(sample.get("temperature_c")),
                "power_w": _value(sample.get("power_w")),
                "clock_sm_mhz": _value(sample.get("clock_sm_mhz")),
                "throttle_reasons": _value(sample.get("throttle_reasons")),
                "fan_speed_pct": _value(sample.get("fan_speed_pct")),
            }
            processes = sample.get("compute_processes")
            if isinstance(processes, list):
                values["processes"] = float(len(processes))
                if scan:
                    self.gpu_processes[name] = [
                        (_int(p.get("pid")), _int(p.get("used_memory")),
                         lineage(p["pid"]) if isinstance(p.get("pid"), int) else ())
                        for p in processes if isinstance(p, dict)
                    ]
            else:
                values["processes"] = _value(processes)
            readings[name] = values
        return readings


_NOT_YET: Final = "not yet"


def _known(values: dict[str, Value]) -> dict[str, Value]:
    return {name: value for name, value in values.items() if value is not _NOT_YET}


def _call(read: Callable[[], T]) -> T | None:
    try:
        return read()
    except Exception:  # noqa: BLE001 - a failed probe is unknown, never a crash
        return None


def _value(value: object) -> Value:
    if value == UNSUPPORTED:
        return UNSUPPORTED
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


_DEVICES: dict[str, str | None] = {}


def _device_of(mountpoint: str) -> str | None:
    """The block device name (as psutil's perdisk counters key it) behind a mount point."""
    if mountpoint not in _DEVICES:
        device = None
        for partition in psutil.disk_partitions(all=False):
            if partition.mountpoint == mountpoint and partition.device.startswith("/dev/"):
                device = partition.device.rsplit("/", 1)[-1]
        _DEVICES[mountpoint] = device
    return _DEVICES[mountpoint]
