"""The daemon's metrics in the Prometheus text exposition format (version 0.0.4), by the naming guide.

Rules:
- Pure: values in, text out. No clock, no I/O; the broker passes what it knows (`Snapshot`).
- Base units (seconds, bytes, watts, celsius, hertz, ratios 0-1); `_total` on counters; one meaning per
  name (capacity of a CPU and of a disk are different families); label values never inside names.
- Every family has HELP and TYPE, and its series do not come and go between scrapes: every known RPC
  method is listed from the start, every core always. A value the device does not offer, or a failed
  read, is left out (never written as 0).
- docs/metrics.md lists every family; a test holds the two together (`FAMILIES`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final, Literal

from mcpresd.core.model import Resource
from mcpresd.protocol import ResourceType

CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"

Kind = Literal["gauge", "counter", "histogram", "summary"]

@dataclass
class Family:
    name: str  # a counter's name ends in _total
    kind: Kind
    help: str
    samples: list[tuple[str, str, float]] = field(default_factory=list)  # (suffix, written labels, value)

    def add(self, value: float, suffix: str = "", **labels: str) -> None:
        if math.isfinite(value):
            written = ",".join(f'{key}="{_escape_label(text)}"' for key, text in labels.items())
            self.samples.append((suffix, f"{{{written}}}" if written else "", float(value)))


@dataclass(frozen=True)
class Spec:
    name: str
    kind: Kind
    unit: str
    help: str
    dcgm: str = ""  # the DCGM exporter's field for the same quantity, if any (docs/metrics.md)


def _spec(name: str, kind: Kind, unit: str, help: str, dcgm: str = "") -> Spec:
    return Spec(name, kind, unit, help, dcgm)


# Sampled values: (resource type, the sampler's metric name) -> (family, scale to the base unit).
_HOST: Final[dict[tuple[ResourceType, str], tuple[Spec, float]]] = {
    (ResourceType.CPU, "utilisation"): (_spec(
        "mcpres_cpu_busy_ratio", "gauge", "ratio", "Share of the host's CPU time measured busy over the last "
        "sampling interval, all cores (0-1)."), 0.01),
    (ResourceType.CPU, "load1"): (_spec("mcpres_cpu_load1", "gauge", "", "1-minute load average."), 1.0),
    (ResourceType.MEMORY, "utilisation"): (_spec(
        "mcpres_memory_used_ratio", "gauge", "ratio", "Share of the host's memory in use (0-1)."), 0.01),
    (ResourceType.MEMORY, "used"): (_spec(
        "mcpres_memory_used_bytes", "gauge", "bytes", "Host memory in use (total less available)."), 1.0),
    (ResourceType.MEMORY, "available"): (_spec(
        "mcpres_memory_available_bytes", "gauge", "bytes", "Host memory available to new processes."), 1.0),
    (ResourceType.MEMORY, "swap_utilisation"): (_spec(
        "mcpres_swap_used_ratio", "gauge", "ratio", "Share of swap in use (0-1); absent without swap."), 0.01),
    (ResourceType.DISK, "utilisation"): (_spec(
        "mcpres_disk_used_ratio", "gauge", "ratio", "Share of the file system's space in use (0-1)."), 0.01),
    (ResourceType.DISK, "used"): (_spec(
        "mcpres_disk_used_bytes", "gauge", "bytes", "File system space in use."), 1.0),
    (ResourceType.DISK, "read_bps"): (_spec(
        "mcpres_disk_read_bytes_per_second", "gauge", "bytes/s",
        "Bytes read from the file system's device per second over the last sampling interval."), 1.0),
    (ResourceType.DISK, "write_bps"): (_spec(
        "mcpres_disk_written_bytes_per_second", "gauge", "bytes/s",
        "Bytes written to the file system's device per second over the last sampling interval."), 1.0),
    (ResourceType.NETWORK, "rx_bps"): (_spec(
        "mcpres_network_receive_bytes_per_second", "gauge", "bytes/s",
        "Bytes received on the interface per second over the last sampling interval."), 1.0),
    (ResourceType.NETWORK, "tx_bps"): (_spec(
        "mcpres_network_transmit_bytes_per_second", "gauge", "bytes/s",
        "Bytes sent on the interface per second over the last sampling interval."), 1.0),
    (ResourceType.GPU, "utilisation"): (_spec(
        "mcpres_gpu_utilisation_ratio", "gauge", "ratio",
        "Share of time a kernel ran on the GPU over NVML's last sample period (0-1).", "DCGM_FI_DEV_GPU_UTIL"), 0.01),
    (ResourceType.GPU, "memory_used"): (_spec(
        "mcpres_gpu_memory_used_bytes", "gauge", "bytes", "GPU memory in use.", "DCGM_FI_DEV_FB_USED"), 1.0),
    (ResourceType.GPU, "memory_utilisation"): (_spec(
        "mcpres_gpu_memory_used_ratio", "gauge", "ratio", "Share of the GPU's memory in use (0-1)."), 0.01),
    (ResourceType.GPU, "temperature_c"): (_spec(
        "mcpres_gpu_temperature_celsius", "gauge", "celsius", "GPU die temperature.", "DCGM_FI_DEV_GPU_TEMP"), 1.0),
    (ResourceType.GPU, "power_w"): (_spec(
        "mcpres_gpu_power_watts", "gauge", "watts", "GPU power draw.", "DCGM_FI_DEV_POWER_USAGE"), 1.0),
    (ResourceType.GPU, "clock_sm_mhz"): (_spec(
        "mcpres_gpu_sm_clock_hertz", "gauge", "hertz", "GPU SM clock.", "DCGM_FI_DEV_SM_CLOCK"), 1e6),
    (ResourceType.GPU, "throttle_reasons"): (_spec(
        "mcpres_gpu_clock_event_reasons", "gauge", "bit mask",
        "NVML clocks-event (throttle) reasons as a bit mask; 0: none.", "DCGM_FI_DEV_CLOCK_THROTTLE_REASONS"), 1.0),
    (ResourceType.GPU, "fan_speed_pct"): (_spec(
        "mcpres_gpu_fan_speed_ratio", "gauge", "ratio", "GPU fan speed as a share of its maximum (0-1); absent "
        "where the GPU has no fan.", "DCGM_FI_DEV_FAN_SPEED"), 0.01),
    (ResourceType.GPU, "processes"): (_spec(
        "mcpres_gpu_processes", "gauge", "processes", "Compute processes running on the GPU."), 1.0),
    (ResourceType.GPU, "foreign_memory"): (_spec(
        "mcpres_gpu_foreign_memory_bytes", "gauge", "bytes",
        "GPU memory used by processes outside any allocation."), 1.0),
}
CORE_BUSY: Final = _spec("mcpres_cpu_core_busy_ratio", "gauge", "ratio",
                         "Share of one core's time measured busy over the last sampling interval (0-1).")

_UNITS: Final = {ResourceType.CPU: ("cores", "cores"), ResourceType.MEMORY: ("bytes", "bytes"),
                 ResourceType.DISK: ("bytes", "bytes"), ResourceType.NETWORK: ("bytes_per_second", "bytes/s"),
                 ResourceType.GPU: ("", "devices"), ResourceType.CUSTOM: ("", "the resource's unit")}


def _ledger_specs(kind: ResourceType) -> tuple[Spec, Spec, Spec]:
    suffix, unit = _UNITS[kind]
    tail = f"_{suffix}" if suffix else ""
    what = {ResourceType.CUSTOM: "custom resource (its unit in the label `unit`)",
            ResourceType.GPU: "GPU (devices; a shared GPU is granted in fractions)"}.get(kind, f"{kind.value} resource")
    return (_spec(f"mcpres_{kind.value}_capacity{tail}", "gauge", unit, f"What the broker may grant of the {what}."),
            _spec(f"mcpres_{kind.value}_allocated{tail}", "gauge", unit,
                  f"What active allocations hold of the {what}."),
            _spec(f"mcpres_{kind.value}_free{tail}", "gauge", unit, f"Capacity less what is allocated, of the {what}."))


BROKER: Final = {
    "allocations": _spec("mcpres_allocations", "gauge", "allocations", "Allocations by state (queued, active)."),
    "queue_length": _spec("mcpres_queue_length", "gauge", "requests", "Requests waiting in the queue."),
    "queue_oldest": _spec("mcpres_queue_oldest_wait_seconds", "gauge", "seconds",
                          "How long the oldest queued request has waited; 0 with an empty queue."),
    "grants": _spec("mcpres_grants_total", "counter", "allocations",
                    "Allocations granted, at once or from the queue (kept in the database: survives restarts)."),
    "releases": _spec("mcpres_releases_total", "counter", "allocations",
                      "Active allocations ended (released, expired, holder gone, preempted...; survives restarts)."),
    "withdrawals": _spec("mcpres_withdrawals_total", "counter", "requests",
                         "Queued requests ended without a grant, timeouts included (survives restarts)."),
    "timeouts": _spec("mcpres_wait_timeouts_total", "counter", "requests",
                      "Queued requests withdrawn because their wait timed out (survives restarts)."),
    "wait": _spec("mcpres_wait_seconds", "histogram", "seconds",
                  "Time from request to grant of granted allocations, 0 for those granted at once (survives restarts)."),
    "cpu": _spec("mcpres_allocation_cpu_seconds_total", "counter", "seconds",
                 "CPU time used by an active allocation's processes since its grant, where it is measured."),
    "memory": _spec("mcpres_allocation_memory_peak_bytes", "gauge", "bytes",
                    "Peak memory of an active allocation's processes, where it is measured."),
    "gpu_memory": _spec("mcpres_allocation_gpu_memory_peak_bytes", "gauge", "bytes",
                        "Peak GPU memory of an active allocation's processes, where it is measured."),
    "gpu_busy": _spec("mcpres_allocation_gpu_utilisation_ratio", "gauge", "ratio",
                      "Mean utilisation of the whole GPUs an active allocation holds, since its grant (0-1)."),
    "spent": _spec("mcpres_budget_spent", "gauge", "cost units",
                   "Cost spent in a budget's current period, in the units of resources' cost_per_unit_hour."),
    "limit": _spec("mcpres_budget_limit", "gauge", "cost units", "A budget's limit for its period."),
    "rpc_requests": _spec("mcpres_rpc_requests_total", "counter", "requests",
                          "JSON-RPC requests answered, by method (since the daemon started: see _created)."),
    "rpc_errors": _spec("mcpres_rpc_errors_total", "counter", "requests",
                        "JSON-RPC requests answered with an error, by method (since the daemon started)."),
    "rpc_requests_created": _spec("mcpres_rpc_requests_created", "gauge", "seconds",
                                  "When mcpres_rpc_requests_total started counting (the daemon's start), Unix time."),
    "rpc_errors_created": _spec("mcpres_rpc_errors_created", "gauge", "seconds",
                                "When mcpres_rpc_errors_total started counting (the daemon's start), Unix time."),
    "rpc_seconds": _spec("mcpres_rpc_duration_seconds", "summary", "seconds",
                         "Time from a request's arrival to its reply, by method (since the daemon started)."),
    "start": _spec("mcpres_start_time_seconds", "gauge", "seconds", "When the daemon started, Unix time."),
    "sampled": _spec("mcpres_last_sample_timestamp_seconds", "gauge", "seconds",
                     "When the host was last sampled, Unix time (absent before the first round)."),
}


def all_specs() -> list[Spec]:
    """Every family the daemon may write (docs/metrics.md lists the same)."""
    return ([spec for spec, _ in _HOST.values()] + [CORE_BUSY]
            + [spec for kind in ResourceType for spec in _ledger_specs(kind)] + list(BROKER.values()))


@dataclass(frozen=True)
class RpcTotals:
    """Process-lifetime RPC figures by method: requests, errors, seconds summed."""
    started: float
    requests: Mapping[str, int]
    errors: Mapping[str, int]
    seconds: Mapping[str, float]


@dataclass(frozen=True)
class Snapshot:
    """Everything one exposition shows, read by the broker in one store job."""
    now: float
    readings: Mapping[str, Mapping[str, float | str | None]]
    sampled_at: float | None
    resources: Sequence[Resource]
    in_use: Mapping[str, float]
    queued_since: Sequence[float]  # created_at of each queued request
    active: int
    counters: Mapping[str, float]  # grants, releases, withdrawals, timeouts, wait_sum
    wait_buckets: Sequence[tuple[float, int]]  # (upper bound, how many waited at most that long), +Inf last
    measured: Sequence[tuple[str, int, Mapping[str, float]]]  # (allocation id, owner uid, figures)
    budgets: Sequence[tuple[str, str, str, float, float]]  # scope, subject, period, spent, limit
    rpc: RpcTotals | None = None


def exposition(snapshot: Snapshot) -> str:
    return render(families(snapshot))


def exposition_reply(snapshot: Snapshot) -> dict[str, str]:
    """`metrics.exposition`'s result, rendered off the store's thread."""
    return {"content_type": CONTENT_TYPE, "text": exposition(snapshot)}


def families(snapshot: Snapshot) -> list[Family]:
    found: dict[str, Family] = {}

    def family(spec: Spec) -> Family:
        if spec.name not in found:
            found[spec.name] = Family(spec.name, spec.kind, spec.help)
        return found[spec.name]

    by_name = {resource.name: resource for resource in snapshot.resources}
    for name, values in sorted(snapshot.readings.items()):
        resource = by_name.get(name)
        if resource is None:
            continue  # the daemon's own figures ('daemon') and resources gone since the round
        labels = _resource_labels(resource)
        for metric, value in values.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            entry = _HOST.get((resource.type, metric))
            if entry is not None:
                family(entry[0]).add(value * entry[1], **labels)
            elif resource.type is ResourceType.CPU and metric.startswith("core") and metric[4:].isdecimal():
                family(CORE_BUSY).add(value / 100, resource=name, core=metric[4:])
    for resource in sorted(snapshot.resources, key=lambda r: r.name):
        capacity, allocated, free = (family(spec) for spec in _ledger_specs(resource.type))
        labels = _resource_labels(resource)
        if resource.type is ResourceType.CUSTOM:
            labels["unit"] = resource.unit
        used = snapshot.in_use.get(resource.name, 0.0)
        capacity.add(resource.capacity, **labels)
        allocated.add(used, **labels)
        free.add(max(0.0, resource.capacity - used), **labels)
    _broker_families(snapshot, family)
    return list(found.values())


def _broker_families(snapshot: Snapshot, family: Callable[[Spec], Family]) -> None:
    queued = len(snapshot.queued_since)
    states = family(BROKER["allocations"])
    states.add(queued, state="queued")
    states.add(snapshot.active, state="active")
    family(BROKER["queue_length"]).add(queued)
    oldest = min(snapshot.queued_since, default=snapshot.now)
    family(BROKER["queue_oldest"]).add(max(0.0, snapshot.now - oldest))
    for key in ("grants", "releases", "withdrawals", "timeouts"):
        family(BROKER[key]).add(snapshot.counters.get(key, 0.0))
    wait = family(BROKER["wait"])
    for bound, count in snapshot.wait_buckets:
        wait.add(count, "_bucket", le="+Inf" if bound == math.inf else repr(float(bound)))  # 1.0, as clients write
    wait.add(snapshot.counters.get("wait_sum", 0.0), "_sum")
    wait.add(snapshot.wait_buckets[-1][1] if snapshot.wait_buckets else 0, "_count")
    measured = [(key, family(BROKER[name])) for key, name in (
        ("cpu_seconds", "cpu"), ("memory_peak", "memory"), ("gpu_memory_peak", "gpu_memory"),
        ("gpu_utilisation", "gpu_busy"))]
    for allocation_id, owner, figures in snapshot.measured:
        for key, made in measured:
            if key in figures:
                made.add(figures[key], allocation=allocation_id, owner=str(owner))
    spent, limit = family(BROKER["spent"]), family(BROKER["limit"])
    for scope, subject, period, value, bound in snapshot.budgets:
        spent.add(value, scope=scope, subject=subject, period=period)
        limit.add(bound, scope=scope, subject=subject, period=period)
    if snapshot.rpc is not None:
        rpc = snapshot.rpc
        requests, errors = family(BROKER["rpc_requests"]), family(BROKER["rpc_errors"])
        seconds = family(BROKER["rpc_seconds"])
        created = [family(BROKER["rpc_requests_created"]), family(BROKER["rpc_errors_created"])]
        for method in sorted(rpc.requests):
            requests.add(rpc.requests[method], method=method)
            errors.add(rpc.errors.get(method, 0), method=method)
            seconds.add(rpc.seconds.get(method, 0.0), "_sum", method=method)
            seconds.add(rpc.requests[method], "_count", method=method)
            for made in created:
                made.add(rpc.started, method=method)
        family(BROKER["start"]).add(rpc.started)
    if snapshot.sampled_at is not None:
        family(BROKER["sampled"]).add(snapshot.sampled_at)


def _resource_labels(resource: Resource) -> dict[str, str]:
    labels = {"resource": resource.name}
    if resource.type is ResourceType.DISK:
        labels["mount"] = str(resource.labels.get("mountpoint", resource.name.partition(":")[2]))
    elif resource.type is ResourceType.NETWORK:
        labels["interface"] = resource.name.partition(":")[2]
    elif resource.type is ResourceType.GPU:
        labels["uuid"] = resource.uuid or ""
        labels["index"] = str(resource.labels.get("index", resource.name.partition(":")[2]))
        labels["model"] = str(resource.labels.get("name") or "")
    return labels


def render(found: Iterable[Family]) -> str:
    lines: list[str] = []
    for entry in found:
        lines.append(f"# HELP {entry.name} {_escape_help(entry.help)}")
        lines.append(f"# TYPE {entry.name} {entry.kind}")
        name = entry.name
        lines.extend(f"{name}{suffix}{labels} {_number(value)}" for suffix, labels, value in entry.samples)
    return "\n".join(lines) + "\n"


def _number(value: float) -> str:
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    if value == math.inf:
        return "+Inf"
    return repr(value)  # the shortest text that reads back as the same float


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _escape_label(text: str) -> str:
    if not text.isascii():  # a mount point's undecodable bytes reach here as lone surrogates: not UTF-8
        text = text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    if "\\" not in text and '"' not in text and "\n" not in text:
        return text
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
