"""Host discovery as pure functions of recorded facts, and RealNvml over a fake pynvml module."""

from __future__ import annotations

import logging
import sys
import types
from types import SimpleNamespace

import pytest

from mcpresd.protocol import ResourceType
from mcpresd.samplers.host import (
    HostFacts,
    Link,
    Partition,
    disk_resources,
    gpu_resources,
    memory_resource,
    network_resources,
    resources_from_facts,
)
from mcpresd.samplers.nvml import UNSUPPORTED, GpuError, GpuFacts, RealNvml, open_nvml

GIB = 1 << 30
H100 = GpuFacts(
    index=0,
    uuid="GPU-ba485a4c-f4ba-e6ae-4d48-e42a77690a6e",
    name="NVIDIA H100 80GB HBM3",
    memory_total=85520809984,
    pci_bus_id="00000000:00:06.0",
    mig_enabled=False,
    numa_node=None,
)


def facts(**changes: object) -> HostFacts:
    base: dict[str, object] = {"cpu_logical": 16, "cpu_physical": 8, "memory_total": 128 * GIB}
    return HostFacts(**{**base, **changes})  # type: ignore[arg-type]


def test_discovered_resources_have_stable_names_and_say_they_were_discovered() -> None:
    resources = resources_from_facts(
        facts(
            partitions=(Partition("/dev/vda", "/", "ext4", 256 * GIB),),
            links=(Link("eth0", True, 10_000, 1500, "up,broadcast,running,multicast"),),
            gpus=(H100,),
        ),
        memory_reserve=2 * GIB,
    )

    assert [r.name for r in resources] == ["cpu", "memory", "disk:/", "net:eth0", "gpu:0"]
    assert [r.type for r in resources] == [
        ResourceType.CPU,
        ResourceType.MEMORY,
        ResourceType.DISK,
        ResourceType.NETWORK,
        ResourceType.GPU,
    ]
    assert {r.source for r in resources} == {"discovered"}


def test_cpu_capacity_is_logical_cores_with_the_physical_count_as_a_label() -> None:
    cpu = resources_from_facts(facts(cpu_logical=16, cpu_physical=None), memory_reserve=0)[0]

    assert (cpu.capacity, cpu.unit, cpu.labels) == (16.0, "cores", {"physical": None})


@pytest.mark.parametrize(
    ("total", "reserve", "capacity", "applied"),
    [
        (128 * GIB, 2 * GIB, 126 * GIB, 2 * GIB),
        (128 * GIB, 0, 128 * GIB, 0),
        (4 * GIB, 4 * GIB, 1, 4 * GIB - 1),
        (4 * GIB, 64 * GIB, 1, 4 * GIB - 1),
    ],
)
def test_memory_capacity_keeps_the_reserve_back(total: int, reserve: int, capacity: int, applied: int) -> None:
    memory = memory_resource(total, reserve)

    assert memory.capacity == capacity
    assert memory.unit == "bytes"
    assert memory.labels == {"total": total, "reserve": applied}


def test_a_negative_memory_reserve_is_refused() -> None:
    with pytest.raises(ValueError, match="must not be negative"):
        memory_resource(8 * GIB, -1)


@pytest.mark.parametrize(
    ("fstype", "is_disk"),
    [
        ("ext4", True),
        ("xfs", True),
        ("btrfs", True),
        ("overlay", True),
        ("fuseblk", True),
        ("squashfs", False),
        ("iso9660", False),
        ("tmpfs", False),
        ("devtmpfs", False),
        ("proc", False),
        ("sysfs", False),
        ("cgroup2", False),
        ("nsfs", False),
        ("autofs", False),
        ("ramfs", False),
        ("fuse.snapfuse", False),
        ("fuse.lxcfs", False),
    ],
)
def test_pseudo_filesystems_are_not_disks(fstype: str, is_disk: bool) -> None:
    disks = disk_resources((Partition("/dev/x", "/mnt/x", fstype, 10 * GIB),))

    assert [d.name for d in disks] == (["disk:/mnt/x"] if is_disk else [])


def test_a_disk_offers_its_size_and_says_where_it_is() -> None:
    (disk,) = disk_resources((Partition("/dev/vda", "/", "ext4", 256 * GIB),))

    assert (disk.capacity, disk.unit) == (256 * GIB, "bytes")
    assert disk.labels == {"mountpoint": "/", "device": "/dev/vda", "fstype": "ext4"}


def test_mount_points_that_could_not_be_measured_are_not_disks() -> None:
    assert disk_resources((Partition("/dev/vda", "/etc/hosts", "ext4", None),)) == []


def test_a_mount_point_listed_twice_is_one_disk_described_by_the_visible_mount() -> None:
    disks = disk_resources(
        (Partition("/dev/vda", "/data", "ext4", 100 * GIB), Partition("/dev/vdc", "/data", "xfs", 500 * GIB))
    )

    assert [(d.name, d.labels["device"], d.capacity) for d in disks] == [("disk:/data", "/dev/vdc", 500 * GIB)]


def test_network_capacity_comes_from_link_speed() -> None:
    (link,) = network_resources((Link("eth0", True, 10_000, 9000, "up,broadcast,running"),), 125e6)

    assert (link.capacity, link.unit) == (1.25e9, "bytes/s")
    assert link.labels == {"speed_mbps": 10_000, "speed_known": True, "isup": True, "mtu": 9000}


def test_unknown_link_speed_uses_the_default_and_says_so() -> None:
    (link,) = network_resources((Link("eth0", True, 0, 1400, "up,broadcast,running,multicast"),), 50e6)

    assert link.capacity == 50e6
    assert link.labels["speed_known"] is False
    assert link.labels["speed_mbps"] is None


@pytest.mark.parametrize(
    "loopback",
    [
        Link("lo", True, 0, 65536, "up,loopback,running"),
        Link("lo0", True, 0, 16384, "up,loopback"),
        Link("lo", True, 0, 65536, ""),  # psutil before 5.9.3 reports no flags
    ],
)
def test_loopback_is_not_a_network_link(loopback: Link) -> None:
    assert network_resources((loopback,), 125e6) == []


def test_gpu_resources_are_named_by_index_and_keyed_by_uuid() -> None:
    second = GpuFacts(1, "GPU-0000-second", "NVIDIA H100 80GB HBM3", 85520809984, "00000000:00:07.0", None, 1)

    gpus = gpu_resources((H100, second))

    assert [(g.name, g.uuid) for g in gpus] == [("gpu:0", H100.uuid), ("gpu:1", "GPU-0000-second")]
    assert (gpus[0].capacity, gpus[0].unit, gpus[0].is_device) == (1.0, "device", True)
    assert gpus[0].labels == {
        "index": 0,
        "name": "NVIDIA H100 80GB HBM3",
        "memory": 85520809984,
        "pci_bus_id": "00000000:00:06.0",
        "mig": False,
        "numa_node": None,
        "minor": None,
    }
    assert (gpus[1].labels["mig"], gpus[1].labels["numa_node"]) == (None, 1)


# -- NVML without a GPU -------------------------------------------------------------------

NOT_SUPPORTED = 3
UNKNOWN_ERROR = 999


class FakeNVMLError(Exception):
    def __init__(self, value: int) -> None:
        super().__init__(f"NVML error {value}")
        self.value = value


class FakePynvml(types.ModuleType):
    """Just enough of pynvml, with values recorded on an idle H100; names in `refuse` raise NVML errors."""

    NVMLError = FakeNVMLError
    NVMLLibraryMismatchError = type("NVMLLibraryMismatchError", (Exception,), {})
    NVML_ERROR_NOT_SUPPORTED = NOT_SUPPORTED
    NVML_TEMPERATURE_GPU = 0
    NVML_CLOCK_SM = 1

    def __init__(self, refuse: dict[str, int] | None = None) -> None:
        super().__init__("pynvml")
        self.refuse = refuse or {}
        self.shutdowns = 0

    def _answer(self, name: str, value: object) -> object:
        if name in self.refuse:
            raise FakeNVMLError(self.refuse[name])
        return value

    def nvmlInit(self) -> None:
        self._answer("nvmlInit", None)

    def nvmlShutdown(self) -> None:
        self.shutdowns += 1

    def nvmlDeviceGetCount(self) -> object:
        return self._answer("nvmlDeviceGetCount", 1)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> object:
        if index != 0:
            raise FakeNVMLError(2)
        return "handle-0"

    def nvmlDeviceGetUUID(self, handle: object) -> object:
        return self._answer("nvmlDeviceGetUUID", b"GPU-ba485a4c-f4ba-e6ae-4d48-e42a77690a6e")

    def nvmlDeviceGetName(self, handle: object) -> object:
        return self._answer("nvmlDeviceGetName", "NVIDIA H100 80GB HBM3")

    def nvmlDeviceGetPciInfo(self, handle: object) -> object:
        return SimpleNamespace(busId=b"00000000:00:06.0")

    def nvmlDeviceGetMemoryInfo(self, handle: object) -> object:
        return self._answer("nvmlDeviceGetMemoryInfo", SimpleNamespace(total=85520809984, used=503316480))

    def nvmlDeviceGetMigMode(self, handle: object) -> object:
        return self._answer("nvmlDeviceGetMigMode", [0, 0])

    def nvmlDeviceGetNumaNodeId(self, handle: object) -> object:
        return self._answer("nvmlDeviceGetNumaNodeId", 1)

    def nvmlDeviceGetMinorNumber(self, handle: object) -> object:
        return self._answer("nvmlDeviceGetMinorNumber", 0)

    def nvmlDeviceGetUtilizationRates(self, handle: object) -> object:
        return self._answer("nvmlDeviceGetUtilizationRates", SimpleNamespace(gpu=0, memory=0))

    def nvmlDeviceGetTemperature(self, handle: object, sensor: int) -> object:
        return self._answer("nvmlDeviceGetTemperature", 42)

    def nvmlDeviceGetPowerUsage(self, handle: object) -> object:
        return self._answer("nvmlDeviceGetPowerUsage", 74760)

    def nvmlDeviceGetClockInfo(self, handle: object, clock: int) -> object:
        return self._answer("nvmlDeviceGetClockInfo", 345)

    def nvmlDeviceGetCurrentClocksEventReasons(self, handle: object) -> object:
        return self._answer("nvmlDeviceGetCurrentClocksEventReasons", 1)

    def nvmlDeviceGetFanSpeed(self, handle: object) -> object:
        return self._answer("nvmlDeviceGetFanSpeed", 30)

    def nvmlDeviceGetComputeRunningProcesses(self, handle: object) -> object:
        return self._answer(
            "nvmlDeviceGetComputeRunningProcesses", [SimpleNamespace(pid=464, usedGpuMemory=7502364672)]
        )


def test_missing_nvml_library_gives_no_gpus_and_one_log_line(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)
    caplog.set_level(logging.INFO)

    assert open_nvml(logging.getLogger("test")) is None
    assert [(r.levelno, r.getMessage().split(":")[0]) for r in caplog.records] == [(logging.INFO, "no NVIDIA GPUs")]


def test_nvml_without_a_driver_gives_no_gpus_and_one_log_line(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", FakePynvml(refuse={"nvmlInit": 9}))
    caplog.set_level(logging.INFO)

    assert open_nvml(logging.getLogger("test")) is None
    assert [r.getMessage() for r in caplog.records] == ["no NVIDIA GPUs: NVML error 9"]


def test_real_nvml_reads_facts_and_decodes_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", FakePynvml())

    nvml = open_nvml(logging.getLogger("test"))

    assert nvml is not None and nvml.source == "nvml"
    assert nvml.device_count() == 1
    assert nvml.facts(0) == GpuFacts(0, H100.uuid, H100.name, 85520809984, "00000000:00:06.0", False, 1, 0)


def test_real_nvml_facts_say_unknown_where_mig_and_numa_are_not_supported(monkeypatch: pytest.MonkeyPatch) -> None:
    refuse = {"nvmlDeviceGetMigMode": NOT_SUPPORTED, "nvmlDeviceGetNumaNodeId": NOT_SUPPORTED,
              "nvmlDeviceGetMinorNumber": NOT_SUPPORTED}
    monkeypatch.setitem(sys.modules, "pynvml", FakePynvml(refuse))

    facts = RealNvml().facts(0)

    assert (facts.mig_enabled, facts.numa_node, facts.minor_number) == (None, None, None)


def test_real_nvml_samples_in_watts_and_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", FakePynvml())

    assert RealNvml().sample(0) == {
        "utilization_gpu": 0,
        "utilization_memory": 0,
        "memory_used": 503316480,
        "memory_total": 85520809984,
        "temperature_c": 42,
        "power_w": 74.76,
        "clock_sm_mhz": 345,
        "throttle_reasons": 1,
        "fan_speed_pct": 30,
        "compute_processes": [{"pid": 464, "used_memory": 7502364672}],
    }


def test_real_nvml_reports_not_supported_as_unsupported_and_other_failures_as_none(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    refuse = {
        "nvmlDeviceGetFanSpeed": NOT_SUPPORTED,
        "nvmlDeviceGetUtilizationRates": NOT_SUPPORTED,
        "nvmlDeviceGetTemperature": UNKNOWN_ERROR,
        "nvmlDeviceGetComputeRunningProcesses": UNKNOWN_ERROR,
    }
    monkeypatch.setitem(sys.modules, "pynvml", FakePynvml(refuse))

    sample = RealNvml().sample(0)

    assert sample["fan_speed_pct"] == UNSUPPORTED
    assert sample["utilization_gpu"] == sample["utilization_memory"] == UNSUPPORTED
    assert sample["temperature_c"] is None
    assert sample["compute_processes"] is None


def test_real_nvml_shuts_down_once(monkeypatch: pytest.MonkeyPatch) -> None:
    lib = FakePynvml()
    monkeypatch.setitem(sys.modules, "pynvml", lib)
    nvml = RealNvml()

    nvml.close()
    nvml.close()

    assert lib.shutdowns == 1


def test_real_nvml_raises_gpu_error_for_a_device_it_cannot_reach(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", FakePynvml())

    with pytest.raises(GpuError, match="GPU 1"):
        RealNvml().sample(1)
