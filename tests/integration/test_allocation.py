"""Allocation through the real daemon: atomic, never over-committed, durable, idempotent.

Every allocation has a holder. `DaemonProcess.call` opens a connection per call, and an allocation
without a holder_pid is held by its connection, so it would end as the call returns: allocations
that must persist here are held by this test process (holder_pid=os.getpid()).
"""

from __future__ import annotations

import os
import threading
from typing import Any

import pytest

from mcpctl.client import RpcError
from mcpresd.protocol import ErrorCode, Method
from tests.conftest import H100_UUID, DaemonProcess


def allocate(daemon: DaemonProcess, *demands: tuple[str, float], **fields: Any) -> dict[str, Any]:
    """Allocate, held by this test process unless `fields` name another holder."""
    params = {"resources": [{"resource": r, "amount": a} for r, a in demands], "holder_pid": os.getpid(), **fields}
    result: dict[str, Any] = daemon.call(Method.ALLOCATE, params)
    return result


def error_of(daemon: DaemonProcess, method: str, params: dict[str, Any]) -> RpcError:
    with pytest.raises(RpcError) as raised:
        daemon.call(method, params)
    return raised.value


def free(daemon: DaemonProcess, name: str) -> float:
    (resource,) = [r for r in daemon.call(Method.RESOURCES_LIST) if r["name"] == name]
    return float(resource["free"])


def test_discovery_registers_the_host_and_the_replayed_gpu(daemon: DaemonProcess) -> None:
    resources = {r["name"]: r for r in daemon.call(Method.RESOURCES_LIST)}
    assert resources["cpu"]["capacity"] == os.cpu_count()
    assert resources["memory"]["unit"] == "bytes"
    assert any(name.startswith("disk:") for name in resources)
    gpu = resources["gpu:0"]
    assert gpu["uuid"] == H100_UUID
    assert gpu["labels"]["name"] == "NVIDIA H100 80GB HBM3"
    assert gpu["labels"]["memory"] == 85520809984
    assert {"index", "pci_bus_id", "mig"} <= set(gpu["labels"])
    assert resources["licence"]["source"] == "config"


def test_a_multi_resource_request_is_all_or_nothing(daemon: DaemonProcess) -> None:
    before = daemon.snapshot()
    error = error_of(daemon, Method.ALLOCATE, {"resources": [
        {"resource": "cpu", "amount": 1}, {"resource": "licence", "amount": 1}, {"resource": "slot", "amount": 11}]})
    assert error.code == ErrorCode.NEVER_FITS
    assert daemon.snapshot() == before
    granted = allocate(daemon, ("cpu", 1), ("memory", 1 << 20), ("gpu", 1), ("licence", 1))
    assert {i["resource"] for i in granted["items"]} == {"cpu", "memory", "gpu:0", "licence"}
    assert [i["uuid"] for i in granted["items"] if i["type"] == "gpu"] == [H100_UUID]


def test_the_caller_is_identified_by_peer_credentials(daemon: DaemonProcess) -> None:
    granted = allocate(daemon, ("licence", 1), holder_pid=os.getpid())
    assert granted["owner_uid"] == os.getuid()
    assert granted["requester_pid"] == os.getpid()
    assert granted["holder_pid"] == os.getpid()
    assert granted["state"] == "active" and granted["priority"] == "normal"


def test_a_holder_that_does_not_exist_is_refused(daemon: DaemonProcess) -> None:
    error = error_of(daemon, Method.ALLOCATE, {"resources": [{"resource": "licence", "amount": 1}],
                                               "holder_pid": 2**31 - 2})
    assert error.code == ErrorCode.INVALID_HOLDER


def test_two_half_gpu_requests_share_the_device_and_a_third_waits(daemon: DaemonProcess) -> None:
    first = allocate(daemon, ("gpu", 0.5))
    second = allocate(daemon, ("gpu", 0.5))
    assert first["items"][0]["resource"] == second["items"][0]["resource"] == "gpu:0"
    assert error_of(daemon, Method.ALLOCATE, {"resources": [{"resource": "gpu", "amount": 0.5}]}).code == \
        ErrorCode.INSUFFICIENT_CAPACITY


def test_a_gpu_uuid_is_accepted_as_its_name(daemon: DaemonProcess) -> None:
    granted = allocate(daemon, (H100_UUID, 1))
    assert granted["items"][0]["resource"] == "gpu:0"


def test_release_frees_capacity_and_a_second_release_is_an_error(daemon: DaemonProcess) -> None:
    granted = allocate(daemon, ("licence", 2))
    assert free(daemon, "licence") == 0
    released = daemon.call(Method.RELEASE, {"id": granted["id"]})
    assert released["state"] == "released" and released["released_at"] is not None
    assert free(daemon, "licence") == 2
    assert error_of(daemon, Method.RELEASE, {"id": granted["id"]}).code == ErrorCode.ALREADY_RELEASED
    assert error_of(daemon, Method.RELEASE, {"id": "no-such-id"}).code == ErrorCode.ALLOCATION_NOT_FOUND


def test_an_idempotency_key_returns_the_same_allocation(daemon: DaemonProcess) -> None:
    first = allocate(daemon, ("licence", 1), idempotency_key="job-42")
    again = allocate(daemon, ("licence", 1), idempotency_key="job-42")
    assert again["id"] == first["id"]
    assert free(daemon, "licence") == 1
    conflict = error_of(daemon, Method.ALLOCATE, {"resources": [{"resource": "licence", "amount": 2}],
                                                  "idempotency_key": "job-42"})
    assert conflict.code == ErrorCode.IDEMPOTENCY_CONFLICT


def test_concurrent_requests_never_over_commit(daemon: DaemonProcess) -> None:
    granted: list[str] = []
    refused: list[int] = []
    lock = threading.Lock()

    def worker() -> None:
        with daemon.client() as client:
            for _ in range(10):
                try:
                    result = client.call(Method.ALLOCATE, {"resources": [{"resource": "slot", "amount": 1}],
                                                           "holder_pid": os.getpid()})
                    with lock:
                        granted.append(result["id"])
                except RpcError as error:
                    with lock:
                        refused.append(error.code)

    threads = [threading.Thread(target=worker) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(granted) == 10 and len(set(granted)) == 10
    assert len(refused) == 150 and set(refused) == {ErrorCode.INSUFFICIENT_CAPACITY}
    assert free(daemon, "slot") == 0


def test_concurrent_retries_with_one_key_create_one_allocation(daemon: DaemonProcess) -> None:
    ids: list[str] = []

    def worker() -> None:
        with daemon.client() as client:
            ids.append(client.call(Method.ALLOCATE, {"resources": [{"resource": "slot", "amount": 1}],
                                                     "idempotency_key": "same", "holder_pid": os.getpid()})["id"])

    threads = [threading.Thread(target=worker) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(ids) == 20 and len(set(ids)) == 1
    assert free(daemon, "slot") == 9


def test_custom_resources_are_registered_and_removed_at_run_time(daemon: DaemonProcess) -> None:
    added = daemon.call(Method.RESOURCES_ADD, {"name": "licence:cad", "capacity": 3, "unit": "seats",
                                               "cost_per_unit_hour": 2.0})
    assert (added["type"], added["capacity"], added["unit"], added["source"]) == ("custom", 3, "seats", "api")
    assert error_of(daemon, Method.RESOURCES_ADD, {"name": "licence:cad", "capacity": 1}).code == \
        ErrorCode.RESOURCE_EXISTS
    held = allocate(daemon, ("licence:cad", 1))
    assert error_of(daemon, Method.RESOURCES_REMOVE, {"name": "licence:cad"}).code == ErrorCode.RESOURCE_IN_USE
    daemon.call(Method.RELEASE, {"id": held["id"]})
    daemon.call(Method.RESOURCES_REMOVE, {"name": "licence:cad"})
    assert "licence:cad" not in {r["name"] for r in daemon.call(Method.RESOURCES_LIST)}
    assert error_of(daemon, Method.RESOURCES_REMOVE, {"name": "licence:cad"}).code == ErrorCode.UNKNOWN_RESOURCE


def test_state_survives_a_kill_and_restart(daemon: DaemonProcess) -> None:
    kept = allocate(daemon, ("licence", 1), ("cpu", 0.5), idempotency_key="k1")
    gone = allocate(daemon, ("slot", 3))
    daemon.call(Method.RELEASE, {"id": gone["id"]})
    daemon.call(Method.RESOURCES_ADD, {"name": "tokens", "capacity": 100})
    daemon.kill()
    daemon.start()
    active = daemon.call(Method.ALLOCATIONS_LIST)
    assert [a["id"] for a in active] == [kept["id"]]
    assert active[0]["items"] == kept["items"]
    assert daemon.call(Method.ALLOCATIONS_GET, {"id": gone["id"]})["state"] == "released"
    assert free(daemon, "licence") == 1 and free(daemon, "slot") == 10 and free(daemon, "tokens") == 100
    assert allocate(daemon, ("licence", 1), ("cpu", 0.5), idempotency_key="k1")["id"] == kept["id"]


def test_refresh_rediscovers_without_touching_allocations(daemon: DaemonProcess) -> None:
    held = allocate(daemon, ("gpu", 1))
    result = daemon.call(Method.RESOURCES_REFRESH)
    assert result["changes"] == []
    assert daemon.call(Method.ALLOCATIONS_GET, {"id": held["id"]})["state"] == "active"


def test_the_event_log_records_allocations_and_releases(daemon: DaemonProcess) -> None:
    held = allocate(daemon, ("licence", 1))
    daemon.call(Method.RELEASE, {"id": held["id"]})
    kinds = [e["kind"] for e in daemon.call(Method.EVENTS_LIST, {"allocation_id": held["id"]})]
    assert kinds == ["allocated", "released"]


def test_what_start_up_made_is_frozen_out_of_the_cyclic_collector(tmp_path: Any) -> None:
    import gc

    from tests.live import LiveDaemon

    gc.unfreeze()
    daemon = LiveDaemon(tmp_path).start()
    try:
        ledger_frozen = daemon.on_store(lambda broker: gc.get_freeze_count())
        assert ledger_frozen > 1000  # the modules, the config and the ledger the daemon started with
    finally:
        daemon.close()
        gc.unfreeze()
