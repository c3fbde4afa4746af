"""The one interface through which mcpresd talks to NVML: `Nvml`, a real and a replayed implementation.

Rules of this module:
- Only `RealNvml` touches pynvml (nvidia-ml-py), and imports it lazily: a host without the
  library or the driver gets `open_nvml(...) -> None` and one log line, never an exception.
- A sample reading that NVML refuses as NotSupported is the string "unsupported"; a read that
  failed otherwise is None. Neither is ever 0: 0 is a real reading (an idle GPU).
- Units: bytes, watts, degrees Celsius, MHz, percent. Throttle reasons are NVML's bit mask.
- A device that cannot be reached at all (lost from the bus, index out of range) raises `GpuError`.
- `ReplayNvml` plays back a capture such as shared/fixtures/gpu/h100-nvml-capture.json so that
  GPU code is tested without a GPU; a capture it cannot use raises `ReplayError` at construction.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Protocol

UNSUPPORTED: Final = "unsupported"
SAMPLE_KEYS: Final = (
    "utilization_gpu",
    "utilization_memory",
    "memory_used",
    "memory_total",
    "temperature_c",
    "power_w",
    "clock_sm_mhz",
    "throttle_reasons",
    "fan_speed_pct",
    "compute_processes",
)
_MIG_ENABLED: Final = 1  # NVML_DEVICE_MIG_ENABLE


class GpuError(RuntimeError):
    """A GPU could not be reached: lost from the bus, refused by the driver, or no such index."""


class ReplayError(ValueError):
    """A recorded NVML capture is missing, not JSON, or not shaped like a capture."""


@dataclass(frozen=True)
class GpuFacts:
    index: int
    uuid: str
    name: str
    memory_total: int
    pci_bus_id: str
    mig_enabled: bool | None
    numa_node: int | None
    minor_number: int | None = None
    """N of the device node /dev/nvidiaN (not always the NVML index); None where NVML did not say."""


class Nvml(Protocol):
    """What mcpresd needs from NVML. `sample` returns SAMPLE_KEYS; compute_processes is a list of {pid, used_memory}."""

    source: str

    def device_count(self) -> int: ...

    def facts(self, index: int) -> GpuFacts: ...

    def sample(self, index: int) -> dict[str, object]: ...

    def close(self) -> None: ...


def open_nvml(log: logging.Logger) -> Nvml | None:
    """The real NVML, or None (with one info line saying why) on a host without NVIDIA GPUs."""
    try:
        return RealNvml()
    # A daemon must start on any host; NVML can fail in more ways than its own error class names.
    except Exception as error:
        log.info("no NVIDIA GPUs: %s", str(error) or type(error).__name__)
        return None


class RealNvml:
    """NVML through nvidia-ml-py. The constructor runs nvmlInit and raises where there is no library or driver."""

    def __init__(self) -> None:
        import pynvml

        pynvml.nvmlInit()
        self.source = "nvml"
        self._lib: Any = pynvml
        self._errors: tuple[type[BaseException], ...] = (pynvml.NVMLError, pynvml.NVMLLibraryMismatchError)
        # Renamed from "throttle reasons" to "clocks event reasons" in NVML 12.2; older bindings lack the new name.
        self._clock_event_reasons: Any = getattr(pynvml, "nvmlDeviceGetCurrentClocksEventReasons", None) or getattr(
            pynvml, "nvmlDeviceGetCurrentClocksThrottleReasons", None
        )
        self._open = True

    def device_count(self) -> int:
        try:
            return int(self._lib.nvmlDeviceGetCount())
        except self._errors as error:
            raise GpuError(f"cannot count NVIDIA GPUs: {error}") from error

    def facts(self, index: int) -> GpuFacts:
        lib = self._lib
        handle = self._handle(index)
        try:
            uuid = _text(lib.nvmlDeviceGetUUID(handle))
            name = _text(lib.nvmlDeviceGetName(handle))
            memory_total = int(lib.nvmlDeviceGetMemoryInfo(handle).total)
            pci_bus_id = _text(lib.nvmlDeviceGetPciInfo(handle).busId)
        except self._errors as error:
            raise GpuError(f"GPU {index}: {error}") from error
        mig = self._read(lambda: lib.nvmlDeviceGetMigMode(handle)[0] == _MIG_ENABLED)
        numa = _optional_int(self._read(lambda: lib.nvmlDeviceGetNumaNodeId(handle)))
        minor = _optional_int(self._read(lambda: int(lib.nvmlDeviceGetMinorNumber(handle))))
        return GpuFacts(
            index=index,
            uuid=uuid,
            name=name,
            memory_total=memory_total,
            pci_bus_id=pci_bus_id,
            mig_enabled=mig if isinstance(mig, bool) else None,
            numa_node=numa if numa is not None and numa >= 0 else None,
            minor_number=minor if minor is not None and minor >= 0 else None,
        )

    def sample(self, index: int) -> dict[str, object]:
        lib = self._lib
        handle = self._handle(index)
        utilization = self._read(lambda: lib.nvmlDeviceGetUtilizationRates(handle))
        memory = self._read(lambda: lib.nvmlDeviceGetMemoryInfo(handle))
        power_mw = self._read(lambda: int(lib.nvmlDeviceGetPowerUsage(handle)))
        processes = self._read(lambda: lib.nvmlDeviceGetComputeRunningProcesses(handle))
        return {
            "utilization_gpu": _member(utilization, "gpu"),
            "utilization_memory": _member(utilization, "memory"),
            "memory_used": _member(memory, "used"),
            "memory_total": _member(memory, "total"),
            "temperature_c": self._read(lambda: int(lib.nvmlDeviceGetTemperature(handle, lib.NVML_TEMPERATURE_GPU))),
            "power_w": power_mw / 1000 if isinstance(power_mw, int) else power_mw,
            "clock_sm_mhz": self._read(lambda: int(lib.nvmlDeviceGetClockInfo(handle, lib.NVML_CLOCK_SM))),
            "throttle_reasons": (
                self._read(lambda: int(self._clock_event_reasons(handle))) if self._clock_event_reasons else None
            ),
            "fan_speed_pct": self._read(lambda: int(lib.nvmlDeviceGetFanSpeed(handle))),
            "compute_processes": (
                [{"pid": _optional_int(p.pid), "used_memory": _optional_int(p.usedGpuMemory)} for p in processes]
                if isinstance(processes, list)
                else processes
            ),
        }

    def close(self) -> None:
        if self._open:
            self._open = False
            self._read(self._lib.nvmlShutdown)

    def _handle(self, index: int) -> Any:
        try:
            return self._lib.nvmlDeviceGetHandleByIndex(index)
        except self._errors as error:
            raise GpuError(f"GPU {index}: {error}") from error

    def _read(self, read: Callable[[], object]) -> object:
        try:
            return read()
        except self._errors as error:
            return UNSUPPORTED if getattr(error, "value", None) == self._lib.NVML_ERROR_NOT_SUPPORTED else None


class ReplayNvml:
    """Plays back a recorded capture: devices from `idle`, samples from `load_trace`.

    Each device walks `load_trace` and then `after` (the load ending) in order, one entry per
    `sample` call, and holds the last entry once both are exhausted (a capture without a trace
    samples its `idle` snapshot).
    Every device replays the same trace; a field a trace entry did not record (fan speed) is
    taken from that device's `idle` snapshot.
    """

    def __init__(self, path: str | Path) -> None:
        self.source = f"replay:{path}"
        capture = _load_capture(Path(path))
        try:
            snapshots = _records(capture.get("idle"), "idle", allow_missing=False)
            trace = (_records(capture.get("load_trace"), "load_trace", allow_missing=True)
                     + _records(capture.get("after"), "after", allow_missing=True))
            self._facts = [_facts_from_snapshot(snapshot, position) for position, snapshot in enumerate(snapshots)]
            self._samples = [
                [_sample_from_record({**snapshot, **entry}, f"load_trace[{i}]") for i, entry in enumerate(trace)]
                or [_sample_from_record(snapshot, f"idle[{position}]")]
                for position, snapshot in enumerate(snapshots)
            ]
        except ReplayError as error:
            raise ReplayError(f"GPU capture {path}: {error}") from None
        self._next = [0] * len(snapshots)

    def device_count(self) -> int:
        return len(self._facts)

    def facts(self, index: int) -> GpuFacts:
        self._check(index)
        return self._facts[index]

    def sample(self, index: int) -> dict[str, object]:
        self._check(index)
        samples = self._samples[index]
        position = self._next[index]
        self._next[index] = min(position + 1, len(samples) - 1)
        return copy.deepcopy(samples[position])

    def close(self) -> None:
        pass

    def _check(self, index: int) -> None:
        if not 0 <= index < len(self._facts):
            raise GpuError(f"GPU {index}: no such device in {self.source} ({len(self._facts)} recorded)")


def _load_capture(path: Path) -> dict[str, object]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ReplayError(f"cannot read GPU capture {path}: {error}") from None
    try:
        capture = json.loads(text)
    except json.JSONDecodeError as error:
        raise ReplayError(f"GPU capture {path} is not JSON: {error}") from None
    if not isinstance(capture, dict):
        raise ReplayError(f"GPU capture {path}: expected a JSON object, got {type(capture).__name__}")
    return capture


def _records(value: object, where: str, *, allow_missing: bool) -> list[dict[str, object]]:
    if value is None and allow_missing:
        return []
    if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
        raise ReplayError(f"'{where}' must be a list of objects")
    return value


def _facts_from_snapshot(snapshot: Mapping[str, object], position: int) -> GpuFacts:
    where = f"idle[{position}]"
    index = _required_int(snapshot, "index", where)
    if index != position:
        raise ReplayError(f"{where}: index is {index}, expected {position} (devices must be listed in index order)")
    mig_mode = snapshot.get("mig_mode")
    numa_node = _optional_int(snapshot.get("numa_node"))
    return GpuFacts(
        index=index,
        uuid=_required_str(snapshot, "uuid", where),
        name=_required_str(snapshot, "name", where),
        memory_total=_required_int(_required_object(snapshot, "memory_info", where), "total", f"{where}.memory_info"),
        pci_bus_id=_required_str(_required_object(snapshot, "pci", where), "busId", f"{where}.pci"),
        mig_enabled=mig_mode[0] == _MIG_ENABLED if isinstance(mig_mode, list) and mig_mode else None,
        numa_node=numa_node if numa_node is not None and numa_node >= 0 else None,
        minor_number=minor if (minor := _optional_int(snapshot.get("minor_number"))) is not None and minor >= 0
        else None,
    )


def _sample_from_record(record: Mapping[str, object], where: str) -> dict[str, object]:
    utilization = _struct(record.get("utilization"), f"{where}.utilization")
    memory = _struct(record.get("memory_info"), f"{where}.memory_info")
    power_mw = _reading(record.get("power_usage_mw"), f"{where}.power_usage_mw")
    return {
        "utilization_gpu": _struct_reading(utilization, "gpu", f"{where}.utilization"),
        "utilization_memory": _struct_reading(utilization, "memory", f"{where}.utilization"),
        "memory_used": _struct_reading(memory, "used", f"{where}.memory_info"),
        "memory_total": _struct_reading(memory, "total", f"{where}.memory_info"),
        "temperature_c": _reading(record.get("temperature_gpu"), f"{where}.temperature_gpu"),
        "power_w": power_mw / 1000 if isinstance(power_mw, int | float) else power_mw,
        "clock_sm_mhz": _reading(record.get("clock_sm_mhz"), f"{where}.clock_sm_mhz"),
        "throttle_reasons": _reading(record.get("throttle_reasons"), f"{where}.throttle_reasons"),
        "fan_speed_pct": _reading(record.get("fan_speed"), f"{where}.fan_speed"),
        "compute_processes": _processes(record.get("compute_processes"), f"{where}.compute_processes"),
    }


def _recorded_error(value: object) -> str | None:
    """The reading for a recorded NVML error: "unsupported" for NotSupported, None for any other failure."""
    return UNSUPPORTED if isinstance(value, dict) and value.get("error") == "NVMLError_NotSupported" else None


def _is_error(value: object) -> bool:
    return isinstance(value, dict) and "error" in value


def _reading(value: object, where: str) -> int | float | str | None:
    if value is None or _is_error(value):
        return _recorded_error(value)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ReplayError(f"{where}: expected a number or a recorded error, got {value!r}")
    return value


def _struct(value: object, where: str) -> dict[str, object] | str | None:
    if value is None or _is_error(value):
        return _recorded_error(value)
    if not isinstance(value, dict):
        raise ReplayError(f"{where}: expected an object or a recorded error, got {value!r}")
    return value


def _struct_reading(struct: dict[str, object] | str | None, key: str, where: str) -> int | float | str | None:
    return _reading(struct.get(key), f"{where}.{key}") if isinstance(struct, dict) else struct


def _processes(value: object, where: str) -> list[dict[str, int | None]] | str | None:
    if value is None or _is_error(value):
        return _recorded_error(value)
    if not isinstance(value, list):
        raise ReplayError(f"{where}: expected a list or a recorded error, got {value!r}")
    # Some captures hold repr() strings of pynvml objects instead of the fields: keep the count, not the text.
    return [
        {
            "pid": _optional_int(process.get("pid")),
            "used_memory": _optional_int(process.get("usedGpuMemory", process.get("used_memory"))),
        }
        if isinstance(process, dict)
        else {"pid": None, "used_memory": None}
        for process in value
    ]


def _required_object(record: Mapping[str, object], key: str, where: str) -> dict[str, object]:
    value = record.get(key)
    if not isinstance(value, dict):
        raise ReplayError(f"{where}.{key}: expected an object, got {value!r}")
    return value


def _required_int(record: Mapping[str, object], key: str, where: str) -> int:
    value = record.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ReplayError(f"{where}.{key}: expected an integer, got {value!r}")
    return value


def _required_str(record: Mapping[str, object], key: str, where: str) -> str:
    value = record.get(key)
    if not isinstance(value, str) or not value:
        raise ReplayError(f"{where}.{key}: expected a non-empty string, got {value!r}")
    return value


def _member(struct: object, name: str) -> object:
    """One field of an NVML struct reading, or the struct's own "unsupported"/None."""
    return struct if struct is None or isinstance(struct, str) else _optional_int(getattr(struct, name, None))


def _optional_int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _text(value: object) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
