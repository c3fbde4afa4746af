"""The exposition's names follow the Prometheus naming guide, docs/metrics.md lists them all, and any label
value reads back as written."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from mcpresd.core.model import Resource
from mcpresd.exposition import Snapshot, all_specs, exposition
from mcpresd.protocol import ResourceType
from mcpresd.samplers.metrics import METRICS

DOCS = Path(__file__).resolve().parents[2] / "docs" / "metrics.md"


def snapshot(**changes: object) -> Snapshot:
    values: dict[str, object] = dict(
        now=100.0, readings={}, sampled_at=None, resources=(), in_use={}, queued_since=(), active=0,
        counters={}, wait_buckets=((1.0, 0), (math.inf, 0)), measured=(), budgets=())
    values.update(changes)
    return Snapshot(**values)  # type: ignore[arg-type]


def test_every_family_is_in_the_docs_with_its_type() -> None:
    table = {m.group(1): m.group(2) for m in re.finditer(r"^\| `(mcpres_\w+)` \| (\w+) \|", DOCS.read_text(), re.M)}

    assert table == {spec.name: spec.kind for spec in all_specs()}


@pytest.mark.parametrize("spec", all_specs(), ids=lambda spec: spec.name)
def test_names_follow_the_naming_guide(spec: object) -> None:
    name, kind = spec.name, spec.kind  # type: ignore[attr-defined]

    assert re.fullmatch(r"mcpres_[a-z][a-z0-9_]*[a-z0-9]", name)
    assert name.endswith("_total") == (kind == "counter")
    assert not re.search(r"_(ms|mhz|w|c|bps|pct|percent|core\d+)(_|$)|_utilisation$", name)
    assert spec.help.endswith(".")  # type: ignore[attr-defined]


def test_every_sampled_metric_is_exported_or_replaced() -> None:
    replaced = {"utilisation_rate"}  # by mcpres_*_allocated / capacity
    exported = set(re.findall(r"`(\w+)`", DOCS.read_text()))

    assert set(METRICS) - replaced <= exported


@pytest.mark.parametrize("name", ['a"b', "back\\slash", "new\nline", "é ü", "{x=1}"])
def test_any_resource_name_reads_back_as_written(name: str) -> None:
    resource = Resource(name=name, type=ResourceType.CUSTOM, capacity=3.0, unit="seats")

    text = exposition(snapshot(resources=(resource,), in_use={name: 1.0}))

    [family] = [f for f in text_string_to_metric_families(text) if f.name == "mcpres_custom_free"]
    assert [(s.labels, s.value) for s in family.samples] == [({"resource": name, "unit": "seats"}, 2.0)]


def test_a_mount_point_that_is_not_utf_8_is_written_as_utf_8() -> None:
    """psutil decodes a mount point's undecodable bytes as lone surrogates (a USB stick's label, say)."""
    name = "disk:/media/ann/stick\udcff"
    resource = Resource(name=name, type=ResourceType.DISK, capacity=3.0, unit="bytes",
                        labels={"mountpoint": "/media/ann/stick\udcff"})

    text = exposition(snapshot(resources=(resource,), in_use={name: 1.0}))

    [family] = [f for f in text_string_to_metric_families(text.encode("utf-8").decode("utf-8"))
                if f.name == "mcpres_disk_free_bytes"]
    assert [s.labels for s in family.samples] == [{"resource": "disk:/media/ann/stick\ufffd",
                                                   "mount": "/media/ann/stick\ufffd"}]


def test_values_that_are_not_numbers_are_left_out_never_written_as_0() -> None:
    cpu = Resource(name="cpu", type=ResourceType.CPU, capacity=2.0, unit="cores")
    readings = {"cpu": {"utilisation": math.nan, "load1": "unsupported", "core0": None, "core1": 50.0}}

    text = exposition(snapshot(resources=(cpu,), readings=readings))

    assert "mcpres_cpu_busy_ratio{" not in text and "mcpres_cpu_load1{" not in text
    assert 'mcpres_cpu_core_busy_ratio{resource="cpu",core="1"} 0.5\n' in text
    assert 'core="0"' not in text


def test_the_wait_histogram_counts_every_grant_and_the_queue_is_timed_from_its_oldest() -> None:
    text = exposition(snapshot(now=100.0, queued_since=(40.0, 70.0),
                               wait_buckets=((1.0, 3), (10.0, 5), (math.inf, 6)), counters={"wait_sum": 42.5}))

    found = {(s.name, s.labels.get("le")): s.value for f in text_string_to_metric_families(text) for s in f.samples}
    assert [found[("mcpres_wait_seconds_bucket", le)] for le in ("1.0", "10.0", "+Inf")] == [3, 5, 6]
    assert found[("mcpres_wait_seconds_count", None)] == 6 and found[("mcpres_wait_seconds_sum", None)] == 42.5
    assert found[("mcpres_queue_oldest_wait_seconds", None)] == 60
    assert found[("mcpres_queue_length", None)] == 2


def test_measured_use_is_shown_per_allocation_with_its_owner() -> None:
    measured = (("a1", 1000, {"cpu_seconds": 2.5, "memory_peak": 1024.0, "gpu_utilisation": 0.5}),
                ("a2", 0, {"cpu_seconds": 1.0}))

    text = exposition(snapshot(measured=measured))

    found = {(s.name, s.labels["allocation"], s.labels["owner"]): s.value
             for f in text_string_to_metric_families(text) for s in f.samples if "allocation" in s.labels}
    assert found == {("mcpres_allocation_cpu_seconds_total", "a1", "1000"): 2.5,
                     ("mcpres_allocation_memory_peak_bytes", "a1", "1000"): 1024.0,
                     ("mcpres_allocation_gpu_utilisation_ratio", "a1", "1000"): 0.5,
                     ("mcpres_allocation_cpu_seconds_total", "a2", "0"): 1.0}
