"""Who may define resources: root and the admin group add and remove API resources; the config and the host
define the rest, and a resource added through the API never shadows theirs, not after a reload or a restart.

Two real uids, as in test_access.py: the daemon runs as root and a forked child drops to `nobody`.
"""

from __future__ import annotations

import grp
import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from mcpresd import params as p
from mcpresd.core.model import Resource
from mcpresd.protocol import ErrorCode, ResourceType
from mcpresd.rpc import Dispatcher
from mcpresd.service import Broker, Caller
from mcpresd.store import Store
from tests.conftest import CONFIG, H100_UUID, DaemonProcess
from tests.fuzz_harness import GPUS, InProcessDaemon
from tests.integration.test_access import as_nobody, shared_daemon, shared_dir  # noqa: F401 - a fixture
from tests.integration.test_reload import hangup

pytestmark = pytest.mark.skipif(os.getuid() != 0, reason="needs root to act as a second user")

WITHOUT_LICENCE = """
memory_reserve = "0"

[[resources]]
name = "slot"
capacity = 10
unit = "slots"
"""


def resource(daemon: DaemonProcess, name: str) -> dict[str, Any]:
    found: dict[str, Any] = next(r for r in daemon.call("resources.list") if r["name"] == name)
    return found


def test_another_user_may_not_add_remove_refresh_or_reprice_resources(tmp_path: Path, shared_dir: Path) -> None:
    daemon = shared_daemon(tmp_path, shared_dir)
    try:
        before = {r["name"]: (r["capacity"], r["source"]) for r in daemon.call("resources.list")}
        replies = as_nobody(daemon.socket, [
            {"method": "resources.remove", "params": {"name": "licence"}},
            {"method": "resources.add", "params": {"name": "licence", "capacity": 1000}},
            {"method": "resources.add", "params": {"name": "licence:mine", "capacity": 1000}},
            {"method": "resources.remove", "params": {"name": "slot"}},
            {"method": "resources.refresh"},
            {"method": "resources.set_cost", "params": {"name": "licence", "cost_per_unit_hour": 0}},
        ])
        for reply in replies:
            assert reply["error"]["code"] == ErrorCode.PERMISSION_DENIED, reply
            assert "admin group" in reply["error"]["message"]
        assert {r["name"]: (r["capacity"], r["source"]) for r in daemon.call("resources.list")} == before
        assert resource(daemon, "licence")["capacity"] == 2
        held = daemon.call("allocate", {"resources": [{"resource": "licence", "amount": 2}],
                                        "holder_pid": os.getpid()})
        assert held["state"] == "active"
        more = daemon.raw(b'{"jsonrpc":"2.0","id":1,"method":"allocate","params":'
                          b'{"resources":[{"resource":"licence","amount":1}]}}\n')
        assert more[0]["error"]["code"] == ErrorCode.INSUFFICIENT_CAPACITY
    finally:
        daemon.stop()


def test_a_member_of_the_admin_group_adds_and_removes_api_resources(tmp_path: Path, shared_dir: Path,
                                                                     throwaway_group: grp.struct_group) -> None:
    # Not "nogroup" (nobody's own): that is the kernel's overflow gid, which the daemon refuses as admin_group.
    daemon = shared_daemon(tmp_path, shared_dir, f'\n[access]\nadmin_group = "{throwaway_group.gr_name}"\n')
    try:
        added, removed = as_nobody(daemon.socket, [
            {"method": "resources.add", "params": {"name": "licence:cad", "capacity": 3}},
            {"method": "resources.remove", "params": {"name": "licence:cad"}},
        ], groups=(throwaway_group.gr_gid,))
        assert added["result"]["source"] == "api"
        assert removed["result"]["name"] == "licence:cad"
        assert "licence:cad" not in {r["name"] for r in daemon.call("resources.list")}
    finally:
        daemon.stop()


@pytest.mark.parametrize(("name", "says"), [("licence", "config file"), ("cpu", "discovered")])
def test_not_even_root_removes_a_resource_of_the_config_or_the_host(daemon: DaemonProcess, name: str,
                                                                    says: str) -> None:
    refused = daemon.raw(f'{{"jsonrpc":"2.0","id":1,"method":"resources.remove","params":{{"name":"{name}"}}}}\n'
                         .encode())
    assert refused[0]["error"]["code"] == ErrorCode.PERMISSION_DENIED
    assert says in refused[0]["error"]["message"]
    assert resource(daemon, name)["source"] in ("config", "discovered")


def shadowing_api_licence(daemon: DaemonProcess) -> str:
    """What the attack left behind: `licence` added through the API with 1000 seats, 5 of them held."""
    daemon.call("resources.add", {"name": "licence", "capacity": 1000, "unit": "seats"})
    held: str = daemon.call("allocate", {"resources": [{"resource": "licence", "amount": 5}],
                                         "holder_pid": os.getpid()})["id"]
    return held


def assert_the_config_defines_licence(daemon: DaemonProcess, held: str) -> None:
    licence = resource(daemon, "licence")
    assert (licence["source"], licence["capacity"], licence["allocated"], licence["free"]) == ("config", 2, 5, 0)
    assert "replaced licence" in daemon.log()
    assert daemon.call("allocations.get", {"id": held})["state"] == "active"  # what is held stays held
    refused = daemon.raw(b'{"jsonrpc":"2.0","id":1,"method":"allocate","params":'
                         b'{"resources":[{"resource":"licence","amount":1}]}}\n')
    assert refused[0]["error"]["code"] == ErrorCode.INSUFFICIENT_CAPACITY
    daemon.call("release", {"id": held})
    assert resource(daemon, "licence")["free"] == 2


def test_on_reload_the_config_replaces_an_api_resource_of_the_same_name(tmp_path: Path) -> None:
    daemon = DaemonProcess(tmp_path, config=WITHOUT_LICENCE)
    daemon.start()
    try:
        held = shadowing_api_licence(daemon)

        hangup(daemon, CONFIG, "reloaded the configuration")

        assert_the_config_defines_licence(daemon, held)
    finally:
        daemon.stop()


def test_on_restart_the_config_replaces_an_api_resource_of_the_same_name(tmp_path: Path) -> None:
    daemon = DaemonProcess(tmp_path, config=WITHOUT_LICENCE)
    daemon.start()
    try:
        held = shadowing_api_licence(daemon)
        daemon.stop()
        daemon.config_path.write_text(CONFIG)

        daemon.start()

        assert_the_config_defines_licence(daemon, held)
    finally:
        daemon.stop()


def test_a_gpu_that_comes_back_displaces_an_api_resource_named_by_its_uuid(tmp_path: Path) -> None:
    """Added while the GPU was away, a resource named like its UUID must not keep the GPU out (or stop the daemon)."""
    root = Caller(uid=0, gid=0, pid=os.getpid(), connection=1)
    gpu = Resource("gpu:0", ResourceType.GPU, 1.0, "device", uuid=H100_UUID, source="discovered")
    broker = Broker(Store(tmp_path / "state.db"))
    with broker.store.transaction():
        broker.resources_add(root, p.add_resource({"name": H100_UUID, "capacity": 8}))
        broker.allocate(root, p.allocate({"resources": [{"resource": H100_UUID, "amount": 1}]}))

        changes = broker.reconcile_resources([gpu], [])

    assert changes == [f"removed {H100_UUID}: added through the API, its name is the UUID of a discovered resource",
                       "added gpu:0"]
    assert broker.ledger.get(H100_UUID).name == "gpu:0"
    assert [r.name for r in broker.store.load_resources()] == ["gpu:0"]


def test_a_refused_refresh_does_not_make_the_daemon_scan_the_host(tmp_path: Path) -> None:
    """The real dispatcher and broker in-process, with a discovery that counts its scans."""
    daemon = InProcessDaemon(tmp_path / "state.db")
    scans = []
    daemon.dispatcher = Dispatcher(daemon.submit, discover=lambda: scans.append(1) or list(GPUS))
    refresh = b'{"jsonrpc":"2.0","id":1,"method":"resources.refresh"}'
    try:
        (refused,), _ = daemon.send(refresh, daemon.peer())  # uid 4242: neither root nor the admin group
        admin = daemon.peer()
        admin.caller = replace(admin.caller, admin=True)
        (done,), _ = daemon.send(refresh, admin)
    finally:
        daemon.close()

    assert refused is not None and json.loads(refused)["error"]["code"] == ErrorCode.PERMISSION_DENIED
    assert done is not None and json.loads(done)["result"] == {"changes": []}
    assert len(scans) == 1  # the admin's
