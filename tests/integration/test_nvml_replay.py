"""ReplayNvml and discovery against a capture recorded on a real H100 host, and discovery on this machine."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import pytest

from mcpresd.protocol import ResourceType
from mcpresd.samplers.host import (
    HostFacts,
    Link,
    Partition,
    discover,
    disk_total,
    read_host_facts,
    resources_from_facts,
)
from mcpresd.samplers.nvml import UNSUPPORTED, GpuError, GpuFacts, ReplayError, ReplayNvml, open_nvml

REPO = Path(__file__).resolve().parents[2]
CAPTURE = next(
    (
        path
        for path in (
            REPO / "tests/fixtures/h100-nvml-capture.json",
            REPO.parent / "shared/fixtures/gpu/h100-nvml-capture.json",
        )
        if path.exists()
    ),
    REPO / "tests/fixtures/h100-nvml-capture.json",
)
H100_UUID = "GPU-ba485a4c-f4ba-e6ae-4d48-e42a77690a6e"


@pytest.fixture
def capture() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(CAPTURE.read_text())
    return data


@pytest.fixture
def replay() -> ReplayNvml:
    return ReplayNvml(CAPTURE)


def write_capture(tmp_path: Path, data: object) -> Path:
    path = tmp_path / "capture.json"
    path.write_text(json.dumps(data))
    return path


def test_replay_lists_the_recorded_devices_with_their_facts(replay: ReplayNvml) -> None:
    assert replay.source == f"replay:{CAPTURE}"
    assert replay.device_count() == 1
    assert replay.facts(0) == GpuFacts(
        index=0,
        uuid=H100_UUID,
        name="NVIDIA H100 80GB HBM3",
        memory_total=85520809984,
        pci_bus_id="00000000:00:06.0",
        mig_enabled=False,
        numa_node=None,
        minor_number=0,
    )


def test_replay_walks_the_load_trace_then_the_load_ending_then_holds_the_last_sample(
    replay: ReplayNvml, capture: dict[str, Any]
) -> None:
    trace = capture["load_trace"] + capture["after"]

    seen = [replay.sample(0) for _ in range(len(trace) + 3)]

    assert [s["power_w"] for s in seen[: len(trace)]] == [entry["power_usage_mw"] / 1000 for entry in trace]
    assert [s["utilization_gpu"] for s in seen[: len(trace)]] == [entry["utilization"]["gpu"] for entry in trace]
    assert seen[len(trace) :] == [seen[len(trace) - 1]] * 3
    assert seen[-1]["utilization_gpu"] < 10  # the load has ended: alerts on it can resolve


def test_replay_shows_the_recorded_load_arriving(replay: ReplayNvml) -> None:
    seen = [replay.sample(0) for _ in range(36)]

    idle, busy = seen[0], seen[-1]
    assert (idle["utilization_gpu"], idle["temperature_c"], idle["compute_processes"]) == (0, 42, [])
    assert busy["utilization_gpu"] == 100
    assert busy["memory_used"] == 8005681152
    assert busy["memory_total"] == 85520809984
    assert busy["throttle_reasons"] == 4
    assert busy["power_w"] == pytest.approx(696.996)


def test_unsupported_fan_speed_is_reported_as_unsupported_not_zero(replay: ReplayNvml) -> None:
    assert replay.sample(0)["fan_speed_pct"] == UNSUPPORTED


def test_unreadable_process_records_keep_their_count_but_claim_no_pid(replay: ReplayNvml) -> None:
    processes = [replay.sample(0)["compute_processes"] for _ in range(14)]

    assert processes[12] == []
    assert processes[13] == [{"pid": None, "used_memory": None}]


def test_recorded_process_fields_are_used_where_present(tmp_path: Path, capture: dict[str, Any]) -> None:
    capture["load_trace"] = [{"compute_processes": [{"pid": 464, "usedGpuMemory": 2690646016}]}]

    sample = ReplayNvml(write_capture(tmp_path, capture)).sample(0)

    assert sample["compute_processes"] == [{"pid": 464, "used_memory": 2690646016}]


def test_recorded_failures_other_than_not_supported_read_as_none(tmp_path: Path, capture: dict[str, Any]) -> None:
    capture["load_trace"] = [
        {
            "temperature_gpu": {"error": "NVMLError_Unknown", "msg": "Unknown Error"},
            "utilization": {"error": "NVMLError_GpuIsLost", "msg": "GPU is lost"},
            "power_usage_mw": {"error": "NVMLError_NotSupported", "msg": "Not Supported"},
        }
    ]

    sample = ReplayNvml(write_capture(tmp_path, capture)).sample(0)

    assert sample["temperature_c"] is None
    assert sample["utilization_gpu"] is None and sample["utilization_memory"] is None
    assert sample["power_w"] == UNSUPPORTED


def test_a_capture_without_a_trace_samples_its_idle_snapshot(tmp_path: Path, capture: dict[str, Any]) -> None:
    del capture["load_trace"]
    del capture["after"]

    sample = ReplayNvml(write_capture(tmp_path, capture)).sample(0)

    assert (sample["utilization_gpu"], sample["power_w"], sample["fan_speed_pct"]) == (0, 74.76, UNSUPPORTED)


def test_each_device_keeps_its_own_place_in_the_trace(tmp_path: Path, capture: dict[str, Any]) -> None:
    capture["idle"].append({**capture["idle"][0], "index": 1, "uuid": "GPU-second"})
    replay = ReplayNvml(write_capture(tmp_path, capture))

    first_of_gpu0 = replay.sample(0)
    second_of_gpu0 = replay.sample(0)

    assert replay.sample(1) == first_of_gpu0
    assert replay.sample(1) == second_of_gpu0
    assert replay.facts(1).uuid == "GPU-second"


def test_sampling_a_device_that_was_not_recorded_raises_gpu_error(replay: ReplayNvml) -> None:
    with pytest.raises(GpuError, match="GPU 1"):
        replay.sample(1)


def test_a_sample_is_a_copy_the_caller_may_change(replay: ReplayNvml, capture: dict[str, Any]) -> None:
    for _ in capture["load_trace"] + capture["after"]:
        replay.sample(0)
    held = replay.sample(0)
    original = list(held["compute_processes"])  # type: ignore[call-overload]
    held["compute_processes"].append("junk")  # type: ignore[attr-defined]

    assert replay.sample(0)["compute_processes"] == original


@pytest.mark.parametrize(
    ("content", "complaint"),
    [
        (None, "cannot read GPU capture"),
        ("{not json", "is not JSON"),
        ("[]", "expected a JSON object"),
        ('{"load_trace": []}', "'idle' must be a list of objects"),
        ('{"idle": [{"index": 0, "name": "x", "pci": {"busId": "0"}, "memory_info": {"total": 1}}]}', "idle[0].uuid"),
        ('{"idle": [{"index": 1, "uuid": "u", "name": "x"}]}', "idle[0]: index is 1, expected 0"),
        ('{"idle": [], "load_trace": {}}', "'load_trace' must be a list of objects"),
    ],
)
def test_an_unusable_capture_raises_replay_error_naming_the_file(
    tmp_path: Path, content: str | None, complaint: str
) -> None:
    path = tmp_path / "capture.json"
    if content is not None:
        path.write_text(content)

    with pytest.raises(ReplayError) as raised:
        ReplayNvml(path)

    assert str(path) in str(raised.value)
    assert complaint in str(raised.value)


def test_a_trace_value_of_the_wrong_kind_is_refused_when_loaded(tmp_path: Path, capture: dict[str, Any]) -> None:
    capture["load_trace"][5]["temperature_gpu"] = "hot"

    with pytest.raises(ReplayError, match=r"load_trace\[5\]\.temperature_gpu"):
        ReplayNvml(write_capture(tmp_path, capture))


# -- discovery --------------------------------------------------------------------------


def host_facts_from_capture(capture: dict[str, Any], gpus: tuple[GpuFacts, ...], disk_total: int) -> HostFacts:
    """The capture's psutil section as HostFacts; it recorded no disk usage, so `disk_total` stands in."""
    host = capture["psutil"]
    return HostFacts(
        cpu_logical=host["cpu_count_logical"],
        cpu_physical=host["cpu_count_physical"],
        memory_total=host["virtual_memory"]["total"],
        partitions=tuple(
            Partition(p["device"], p["mountpoint"], p["fstype"], disk_total) for p in host["partitions"]
        ),
        links=tuple(
            Link(name, s["isup"], s["speed"], s["mtu"], s["flags"]) for name, s in host["net_if_stats"].items()
        ),
        gpus=gpus,
    )


def test_the_recorded_h100_host_offers_its_cpu_memory_root_disk_links_and_gpu(
    capture: dict[str, Any], replay: ReplayNvml
) -> None:
    facts = host_facts_from_capture(capture, (replay.facts(0),), disk_total=100 << 30)

    resources = {r.name: r for r in resources_from_facts(facts, memory_reserve=4 << 30)}

    # /usr/local/nvidia is the driver's squashfs image, lo is loopback: neither is offered.
    assert list(resources) == ["cpu", "memory", "disk:/", "net:ifb0", "net:ifb1", "net:eth0", "gpu:0"]
    assert resources["cpu"].capacity == 16
    assert resources["memory"].capacity == 135148564480 - (4 << 30)
    assert resources["net:eth0"].labels["speed_known"] is False
    assert resources["gpu:0"].uuid == H100_UUID
    assert resources["gpu:0"].type is ResourceType.GPU


def test_discovery_on_this_machine_finds_cpu_and_memory_and_never_raises() -> None:
    nvml = open_nvml(logging.getLogger("test"))
    try:
        resources = discover(memory_reserve=1 << 30, nvml=nvml)
    finally:
        if nvml is not None:
            nvml.close()

    by_name = {r.name: r for r in resources}
    assert len(by_name) == len(resources)
    assert by_name["cpu"].capacity >= 1
    assert by_name["memory"].capacity >= 1
    assert all(os.path.isdir(r.labels["mountpoint"]) for r in resources if r.type is ResourceType.DISK)  # type: ignore[arg-type]
    assert all(r.capacity > 0 and r.source == "discovered" for r in resources)


def test_read_host_facts_reads_this_machine() -> None:
    facts = read_host_facts()

    assert facts.cpu_logical >= 1
    assert facts.memory_total > 0
    assert facts.gpus == ()


def test_a_bind_mounted_file_is_not_measured_as_a_disk(tmp_path: Path) -> None:
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost\n")

    stat = os.statvfs(tmp_path)

    assert disk_total(str(hosts), "ext4") is None
    assert disk_total(str(tmp_path), "ext4") == stat.f_blocks * stat.f_frsize


def test_pseudo_filesystems_and_vanished_mount_points_are_not_measured(tmp_path: Path) -> None:
    assert disk_total(str(tmp_path), "tmpfs") is None
    assert disk_total(str(tmp_path / "gone"), "ext4") is None


class LostSecondGpu:
    """Two GPUs recorded, the second fallen off the bus."""

    def __init__(self, replay: ReplayNvml) -> None:
        self.source = "fake"
        self._replay = replay

    def device_count(self) -> int:
        return 2

    def facts(self, index: int) -> GpuFacts:
        if index == 1:
            raise GpuError("GPU 1: GPU is lost")
        return self._replay.facts(index)

    def sample(self, index: int) -> dict[str, object]:
        return self._replay.sample(index)

    def close(self) -> None:
        pass


def test_a_gpu_that_cannot_be_read_is_left_out_and_logged(
    replay: ReplayNvml, caplog: pytest.LogCaptureFixture
) -> None:
    resources = discover(memory_reserve=0, nvml=LostSecondGpu(replay))

    assert [r.name for r in resources if r.type is ResourceType.GPU] == ["gpu:0"]
    assert "GPU left out of discovery: GPU 1: GPU is lost" in caplog.text
