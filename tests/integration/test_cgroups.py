"""The enforcement backends: cgroup v1 against this host's real hierarchies (as root), v2 against a fake tree."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mcpresd.core.enforcement import Grant, limits_for
from mcpresd.enforce import HeldFiles, NoEnforcement, Pressure, choose, stop_processes
from mcpresd.enforce.cgroup_v1 import CgroupV1
from mcpresd.enforce.cgroup_v2 import CgroupV2
from mcpresd.protocol import EnforceMode
from tests.cgroups import cgroup_subtree, v1, v1_mounts, wait_for  # noqa: F401 - fixtures
from tests.conftest import CONFIG, run_cli
from tests.live import LiveDaemon

MIB = 1 << 20


def test_v1_writes_hard_limits_in_each_controller_and_moves_a_process(v1: CgroupV1):
    limits = limits_for(EnforceMode.HARD, Grant(cpu=1.5, memory=128 * MIB), tasks_max=64)
    v1.create("a1", limits)
    cpu = v1.mounts["cpu"] / v1.subtree / "alloc-a1"
    memory = v1.mounts["memory"] / v1.subtree / "alloc-a1"
    assert (cpu / "cpu.cfs_quota_us").read_text().strip() == "150000"
    assert (cpu / "cpu.shares").read_text().strip() == "1536"
    assert int((memory / "memory.limit_in_bytes").read_text()) == 128 * MIB
    if (memory / "memory.memsw.limit_in_bytes").exists():
        assert int((memory / "memory.memsw.limit_in_bytes").read_text()) == 128 * MIB
    if "pids" in v1.mounts:
        assert (v1.mounts["pids"] / v1.subtree / "alloc-a1" / "pids.max").read_text().strip() == "64"
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        v1.move("a1", sleeper.pid)
        assert v1.pids("a1") == {sleeper.pid}
        lines = Path(f"/proc/{sleeper.pid}/cgroup").read_text()
        assert f"/{v1.subtree}/alloc-a1" in lines
        usage = v1.usage("a1")
        assert usage is not None and usage.oom_kills == 0
        assert v1.existing() == {"a1"} and v1.exists("a1")
        assert not v1.remove("a1")  # busy: a process is still in it
    finally:
        sleeper.kill()
        sleeper.wait()
    wait_for(lambda: not v1.pids("a1"), what="the killed sleeper to leave its cgroup")
    assert v1.remove("a1")
    assert v1.existing() == set()
    assert v1.usage("a1") is None


def test_v1_soft_sets_a_soft_limit_and_no_cap(v1: CgroupV1):
    v1.create("s1", limits_for(EnforceMode.SOFT, Grant(cpu=0.5, memory=64 * MIB)))
    memory = v1.mounts["memory"] / v1.subtree / "alloc-s1"
    cpu = v1.mounts["cpu"] / v1.subtree / "alloc-s1"
    assert int((memory / "memory.soft_limit_in_bytes").read_text()) == 64 * MIB
    assert int((memory / "memory.limit_in_bytes").read_text()) > 1 << 50  # unlimited
    assert (cpu / "cpu.cfs_quota_us").read_text().strip() == "-1"
    assert (cpu / "cpu.shares").read_text().strip() == "512"
    assert v1.remove("s1")


def test_v1_measures_cpu_seconds_and_peak_memory_of_everything_in_the_cgroup(v1: CgroupV1):
    v1.create("m1", limits_for(EnforceMode.SOFT, Grant(cpu=1)))
    script = "import sys; sys.stdin.readline(); b = bytearray(48 << 20); sum(range(3_000_000))"
    child = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE)
    v1.move("m1", child.pid)
    assert child.stdin is not None
    child.stdin.write(b"go\n")
    child.stdin.close()
    assert child.wait(30) == 0
    usage = v1.usage("m1")
    assert usage is not None
    assert usage.memory_peak >= 48 * MIB
    assert usage.cpu_seconds > 0.05
    assert v1.remove("m1")


def test_stopping_an_allocations_processes_terms_then_kills_the_ones_that_ignore_it(v1: CgroupV1):
    v1.create("k1", limits_for(EnforceMode.SOFT, Grant()))
    polite = subprocess.Popen(["sleep", "60"])
    stubborn = subprocess.Popen([sys.executable, "-c",
                                 "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                                 "print('ready', flush=True); time.sleep(60)"], stdout=subprocess.PIPE)
    assert stubborn.stdout is not None and stubborn.stdout.readline() == b"ready\n"
    for process in (polite, stubborn):
        v1.move("k1", process.pid)

    async def stop() -> int:
        waiting = asyncio.gather(asyncio.to_thread(polite.wait), asyncio.to_thread(stubborn.wait))
        stopped = await stop_processes(v1, "k1", grace=0.5)
        await waiting
        return stopped

    assert asyncio.run(stop()) == 2
    assert polite.returncode == -15 and stubborn.returncode == -9
    assert v1.existing() == set()


def test_choose_finds_v1_here_and_names_its_controllers(cgroup_subtree: str):
    chosen = choose(cgroup_subtree)
    mounts = v1_mounts()
    if isinstance(chosen, CgroupV2):
        pytest.skip("this host offers cgroup v2 with controllers; v1 is not chosen")
    assert isinstance(chosen, CgroupV1)
    assert set(chosen.controllers) == {c for c in ("cpu", "cpuacct", "cpuset", "memory", "pids", "devices")
                                       if c in mounts}
    assert chosen.describe()["backend"] == "cgroup-v1"


def test_choose_says_why_nothing_is_enforced_without_usable_controllers(tmp_path: Path):
    unified = tmp_path / "unified"
    unified.mkdir()
    (unified / "cgroup.controllers").write_text("\n")
    mounts = tmp_path / "mounts"
    mounts.write_text(f"cgroup2 {unified} cgroup2 rw,nosuid 0 0\nproc /proc proc rw 0 0\n")
    chosen = choose("mcpres", mounts=str(mounts))
    assert isinstance(chosen, NoEnforcement)
    assert chosen.why_not == (f"the cgroup v2 hierarchy at {unified} has no cpu or memory controller; "
                              "no cgroup v1 memory and cpu hierarchies either")
    assert chosen.describe() == {"backend": "none", "controllers": [], "why_not": chosen.why_not}


@pytest.fixture
def fake_v2(tmp_path: Path) -> Path:
    """A directory with the cgroup v2 root's file names, standing in for /sys/fs/cgroup."""
    (tmp_path / "cgroup.controllers").write_text("cpuset cpu io memory hugetlb pids rdma misc\n")
    return tmp_path


def test_choose_takes_v2_where_the_unified_hierarchy_has_cpu_and_memory(fake_v2: Path, tmp_path: Path):
    mounts = tmp_path / "mounts"
    mounts.write_text(f"cgroup2 {fake_v2} cgroup2 rw 0 0\n")
    chosen = choose("mcpres.slice", mounts=str(mounts))
    assert isinstance(chosen, CgroupV2)
    assert chosen.controllers == ("cpu", "cpuset", "memory", "pids")


def test_v2_writes_hard_limits_and_enables_its_controllers(fake_v2: Path):
    backend = CgroupV2(fake_v2, "mcpres.slice")
    backend.create("h1", limits_for(EnforceMode.HARD, Grant(cpu=1, memory=128 * MIB, cores=(2, 3)), tasks_max=512))
    directory = fake_v2 / "mcpres.slice" / "alloc-h1"
    written = {f.name: f.read_text() for f in directory.iterdir()}
    assert written == {"cpu.weight": "100", "cpu.max": "100000 100000", "cpuset.cpus": "2,3",
                       "memory.high": "max", "memory.max": str(128 * MIB), "memory.swap.max": "0",
                       "pids.max": "512"}
    assert (fake_v2 / "mcpres.slice" / "cgroup.subtree_control").read_text() == "+cpu +cpuset +memory +pids"


def test_v2_soft_writes_a_weight_and_memory_high_only(fake_v2: Path):
    backend = CgroupV2(fake_v2, "mcpres.slice")
    backend.create("s1", limits_for(EnforceMode.SOFT, Grant(cpu=2.5, memory=64 * MIB)))
    directory = fake_v2 / "mcpres.slice" / "alloc-s1"
    assert {f.name: f.read_text() for f in directory.iterdir()} == {
        "cpu.weight": "250", "cpu.max": "max 100000", "memory.high": str(64 * MIB), "memory.max": "max",
        "pids.max": "max"}


def test_v2_reads_cpu_stat_memory_current_peak_and_oom_kills(fake_v2: Path):
    backend = CgroupV2(fake_v2, "mcpres.slice")
    backend.create("r1", limits_for(EnforceMode.HARD, Grant(memory=MIB)))
    directory = fake_v2 / "mcpres.slice" / "alloc-r1"
    (directory / "cpu.stat").write_text("usage_usec 2500000\nuser_usec 2000000\nsystem_usec 500000\n")
    (directory / "memory.current").write_text("1000\n")
    (directory / "memory.peak").write_text("1048576\n")
    (directory / "memory.events").write_text("low 0\nhigh 0\nmax 7\noom 1\noom_kill 1\noom_group_kill 0\n")
    (directory / "cgroup.procs").write_text("101\n102\n")
    usage = backend.usage("r1")
    assert usage is not None
    assert (usage.cpu_seconds, usage.memory_current, usage.memory_peak, usage.oom_kills) == (2.5, 1000, MIB, 1)
    assert backend.pids("r1") == {101, 102}
    assert backend.existing() == {"r1"}
    assert backend.usage("gone") is None


def test_v2_keep_processes_moves_them_to_the_root_cgroup(fake_v2: Path):
    backend = CgroupV2(fake_v2, "mcpres.slice")
    backend.create("k1", limits_for(EnforceMode.SOFT, Grant()))
    (fake_v2 / "mcpres.slice" / "alloc-k1" / "cgroup.procs").write_text("101\n")
    assert backend.evict("k1") == 1
    assert (fake_v2 / "cgroup.procs").read_text() == "101"


def test_v1_keep_processes_moves_them_out_and_the_cgroup_goes(v1: CgroupV1):
    v1.create("e1", limits_for(EnforceMode.HARD, Grant(memory=64 * MIB)))
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        v1.move("e1", sleeper.pid)
        assert v1.evict("e1") >= 1
        assert v1.pids("e1") == set()
        assert v1.remove("e1")
        assert sleeper.poll() is None
        assert f"/{v1.subtree}/" not in Path(f"/proc/{sleeper.pid}/cgroup").read_text()
    finally:
        sleeper.kill()
        sleeper.wait()


def test_v2_enables_only_the_controllers_its_parent_passes_down(fake_v2: Path):
    subtree = fake_v2 / "mcpres.slice"
    subtree.mkdir()
    (subtree / "cgroup.controllers").write_text("cpu memory pids\n")  # the root's subtree_control lacks cpuset
    CgroupV2(fake_v2, "mcpres.slice").create("c1", limits_for(EnforceMode.HARD, Grant(cpu=1, cores=(1,))))
    assert (subtree / "cgroup.subtree_control").read_text() == "+cpu +memory +pids"
    assert not (subtree / "alloc-c1" / "cpuset.cpus").exists()  # no cpuset here: the cores are not pinned
    assert (subtree / "alloc-c1" / "cpu.max").read_text() == "100000 100000"


def test_v2_on_a_real_unified_hierarchy_limits_moves_measures_and_removes():
    """Runs where the host offers cgroup v2 with cpu and memory (as root); this project's CI hosts are v1."""
    import os

    subtree = "mcpres-test-" + os.urandom(4).hex()
    chosen = choose(subtree)
    if not isinstance(chosen, CgroupV2):
        pytest.skip(f"no writable cgroup v2 hierarchy with cpu and memory here ({chosen.name}: "
                    f"{chosen.why_not or 'v1 is used'})")
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        chosen.create("r1", limits_for(EnforceMode.HARD, Grant(cpu=0.5, memory=64 * MIB)))
        assert (chosen.root / "alloc-r1" / "memory.max").read_text().strip() == str(64 * MIB)
        assert (chosen.root / "alloc-r1" / "cpu.max").read_text().split() == ["50000", "100000"]
        chosen.move("r1", sleeper.pid)
        assert chosen.pids("r1") == {sleeper.pid}
        usage = chosen.usage("r1")
        assert usage is not None and usage.memory_current >= 0
        asyncio.run(stop_processes(chosen, "r1", grace=1))
        assert sleeper.wait(5) == -15
        assert not chosen.exists("r1")
    finally:
        sleeper.kill()
        sleeper.wait()
        for leftover in chosen.existing():
            chosen.remove(leftover)
        if chosen.root.exists():
            chosen.root.rmdir()


# -- the devices controller: hard mode's GPU fence -------------------------------------------------

OPEN_EACH = """
import errno, os, sys
sys.stdin.readline()
for path in sys.argv[1:]:
    try:
        os.close(os.open(path, os.O_RDWR))
        print("opened")
    except OSError as error:
        print(errno.errorcode[error.errno])
"""


def device_nodes(tmp_path: Path, minors: dict[str, int]) -> dict[str, str]:
    """Character nodes 195:N made in `tmp_path` (a node's cgroup check does not care where it lives)."""
    import os

    nodes = {}
    for name, minor in minors.items():
        path = tmp_path / name
        try:
            os.mknod(path, 0o600 | 0o020000, os.makedev(195, minor))
        except PermissionError as error:
            pytest.skip(f"cannot make device nodes here: {error}")
        nodes[name] = str(path)
    return nodes


def opened_from(v1: CgroupV1, allocation_id: str | None, paths: list[str]) -> list[str]:
    """What open() of each path gives a process in the allocation's cgroup (None: in none of the daemon's)."""
    child = subprocess.Popen([sys.executable, "-c", OPEN_EACH, *paths], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        if allocation_id is not None:
            v1.move(allocation_id, child.pid)
        out, _ = child.communicate("go\n", timeout=30)
    finally:
        child.kill()
        child.wait()
    return out.split()


def test_v1_hard_denies_the_device_nodes_of_the_gpus_not_granted_and_nothing_else(v1: CgroupV1, tmp_path: Path):
    if "devices" not in v1.mounts:
        pytest.skip(f"no writable devices hierarchy here: {v1.why_not}")
    # Minors no real GPU has: the fence is checked by the kernel before any driver is asked.
    gpus = {"gpu:0": 200, "gpu:1": 201}
    nodes = device_nodes(tmp_path, {"granted": 200, "other": 201, "nvidiactl": 255})
    limits = limits_for(EnforceMode.HARD, Grant(cpu=1, gpus=("gpu:0",)), gpu_devices=gpus)
    assert limits.gpu_devices_denied == (201,)
    v1.create("g1", limits)
    devices = v1.mounts["devices"] / v1.subtree / "alloc-g1"
    assert devices.is_dir()

    granted, other, control = opened_from(v1, "g1", [nodes["granted"], nodes["other"], nodes["nvidiactl"]])

    assert other == "EPERM"  # refused by the cgroup
    assert granted != "EPERM" and control != "EPERM"  # left to the driver: ENXIO here, where there is none
    assert opened_from(v1, None, [nodes["other"]]) != ["EPERM"]  # outside the allocation it is not refused
    wait_for(lambda: not v1.pids("g1"), what="the child to leave its cgroup")
    assert v1.remove("g1") and not devices.exists()


def test_v1_soft_and_a_grant_of_every_gpu_get_no_devices_cgroup(v1: CgroupV1):
    if "devices" not in v1.mounts:
        pytest.skip(f"no writable devices hierarchy here: {v1.why_not}")
    gpus = {"gpu:0": 200}
    v1.create("s1", limits_for(EnforceMode.SOFT, Grant(cpu=1), gpu_devices=gpus))
    v1.create("h1", limits_for(EnforceMode.HARD, Grant(cpu=1, gpus=("gpu:0",)), gpu_devices=gpus))
    assert not (v1.mounts["devices"] / v1.subtree / "alloc-s1").exists()
    assert not (v1.mounts["devices"] / v1.subtree / "alloc-h1").exists()
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        v1.move("h1", sleeper.pid)
        assert v1.pids("h1") == {sleeper.pid}
    finally:
        sleeper.kill()
        sleeper.wait()
    wait_for(lambda: not v1.pids("h1"), what="the sleeper to leave its cgroup")
    assert v1.remove("s1") and v1.remove("h1")


def fake_v1_tree(tmp_path: Path, controllers: tuple[str, ...]) -> Path:
    """A /proc/self/mounts naming one directory per v1 controller under `tmp_path`."""
    lines = []
    for controller in controllers:
        (tmp_path / controller).mkdir()
        lines.append(f"cgroup {tmp_path / controller} cgroup rw,nosuid,{controller} 0 0")
    mounts = tmp_path / "mounts"
    mounts.write_text("\n".join(lines) + "\n")
    return mounts


def test_a_v1_host_without_a_devices_hierarchy_says_the_gpu_fence_is_unavailable(tmp_path: Path):
    mounts = fake_v1_tree(tmp_path, ("cpu", "cpuacct", "cpuset", "memory", "pids"))
    chosen = choose("mcpres", mounts=str(mounts))
    assert isinstance(chosen, CgroupV1)
    assert "devices" not in chosen.controllers
    assert chosen.why_not == ("devices: unavailable (no devices hierarchy mounted): "
                              "GPUs are fenced by CUDA_VISIBLE_DEVICES only")
    assert chosen.describe()["why_not"] == chosen.why_not


def test_a_v1_host_with_a_devices_hierarchy_names_it(tmp_path: Path):
    mounts = fake_v1_tree(tmp_path, ("cpu", "cpuacct", "cpuset", "memory", "pids", "devices"))
    chosen = choose("mcpres", mounts=str(mounts))
    assert isinstance(chosen, CgroupV1)
    assert "devices" in chosen.controllers and chosen.why_not is None
# The kernel's formats, as Documentation/admin-guide/cgroup-v2.rst and accounting/psi.rst give them.
MEMORY_EVENTS = "low 0\nhigh 12\nmax 3\noom 2\noom_kill 1\noom_group_kill 0\n"
CPU_PRESSURE = ("some avg10=1.50 avg60=0.80 avg300=0.20 total=2500000\n"
                "full avg10=0.00 avg60=0.00 avg300=0.00 total=0\n")
MEMORY_PRESSURE = ("some avg10=12.34 avg60=5.00 avg300=1.00 total=750000\n"
                   "full avg10=10.00 avg60=4.00 avg300=0.50 total=600000\n")


def fill_v2(directory: Path, *, pressure: bool = True) -> None:
    """What the kernel shows in an allocation's v2 cgroup that has run a while."""
    (directory / "cpu.stat").write_text("usage_usec 2500000\nuser_usec 2000000\nsystem_usec 500000\n"
                                        "nr_periods 0\nnr_throttled 0\nthrottled_usec 0\n")
    (directory / "memory.current").write_text("1000\n")
    (directory / "memory.peak").write_text("1048576\n")
    (directory / "memory.events").write_text(MEMORY_EVENTS)
    if pressure:
        (directory / "cpu.pressure").write_text(CPU_PRESSURE)
        (directory / "memory.pressure").write_text(MEMORY_PRESSURE)


def test_v2_reads_memory_events_and_cpu_and_memory_pressure(fake_v2: Path):
    backend = CgroupV2(fake_v2, "mcpres.slice")
    backend.create("p1", limits_for(EnforceMode.SOFT, Grant(memory=MIB)))
    fill_v2(fake_v2 / "mcpres.slice" / "alloc-p1")
    usage = backend.usage("p1")
    assert usage is not None
    assert (usage.oom_kills, usage.oom_events, usage.memory_high_events, usage.memory_max_events) == (1, 2, 12, 3)
    assert usage.cpu_pressure == Pressure(some_avg10=1.5, some_total_s=2.5, full_avg10=0.0, full_total_s=0.0)
    assert usage.memory_pressure == Pressure(some_avg10=12.34, some_total_s=0.75, full_avg10=10.0, full_total_s=0.6)
    assert usage.figures() == {
        "cpu_seconds": 2.5, "memory_current": 1000.0, "memory_peak": float(MIB), "oom_kills": 1.0,
        "oom_events": 2.0, "memory_high_events": 12.0, "memory_max_events": 3.0,
        "cpu_pressure_some_avg10": 1.5, "cpu_pressure_some_s": 2.5,
        "cpu_pressure_full_avg10": 0.0, "cpu_pressure_full_s": 0.0,
        "memory_pressure_some_avg10": 12.34, "memory_pressure_some_s": 0.75,
        "memory_pressure_full_avg10": 10.0, "memory_pressure_full_s": 0.6}


def test_v2_without_psi_reports_no_pressure_and_a_cpu_file_without_full_only_some(fake_v2: Path):
    backend = CgroupV2(fake_v2, "mcpres.slice")
    backend.create("n1", limits_for(EnforceMode.SOFT, Grant()))
    directory = fake_v2 / "mcpres.slice" / "alloc-n1"
    fill_v2(directory, pressure=False)  # a kernel without CONFIG_PSI, or booted with psi=0
    usage = backend.usage("n1")
    assert usage is not None and usage.cpu_pressure is None and usage.memory_pressure is None
    assert not [key for key in usage.figures() if "pressure" in key]
    (directory / "cpu.pressure").write_text("some avg10=0.00 avg60=0.00 avg300=0.00 total=0\n")  # before 5.13
    (directory / "memory.pressure").write_text("some avg10=oops\n")
    usage = backend.usage("n1")
    assert usage is not None and usage.memory_pressure is None
    assert usage.cpu_pressure == Pressure(some_avg10=0.0, some_total_s=0.0)
    assert {key for key in usage.figures() if "pressure" in key} == {"cpu_pressure_some_avg10", "cpu_pressure_some_s"}


def test_v1_reports_oom_kills_but_no_pressure_nor_memory_events(v1: CgroupV1):
    v1.create("q1", limits_for(EnforceMode.SOFT, Grant(memory=64 * MIB)))
    usage = v1.usage("q1")
    assert usage is not None
    assert usage.cpu_pressure is None and usage.memory_pressure is None and usage.memory_high_events is None
    assert set(usage.figures()) == {"cpu_seconds", "memory_current", "memory_peak", "oom_kills"}
    assert v1.remove("q1")


@pytest.fixture
def live_on_fake_v2(tmp_path: Path, fake_v2: Path) -> Iterator[tuple[LiveDaemon, Path, int]]:
    """The real daemon in-process whose enforcer is cgroup v2 on the fake tree; (daemon, its subtree, a holder pid
    to confine: a sleep, which the release signals as it is "in" the fake cgroup)."""
    subtree = "mcpres-fake-" + os.urandom(4).hex()  # never created on the real hierarchies: the tree is swapped
    state = tmp_path / "daemon"
    state.mkdir()
    live = LiveDaemon(state, CONFIG + f'\n[enforce]\ncgroup = "{subtree}"\n[monitor]\ninterval = "0.5s"\n').start()
    holder = subprocess.Popen(["sleep", "120"])
    try:
        fake = CgroupV2(fake_v2, subtree)
        live.daemon.enforcer = fake
        live.on_store(lambda broker: setattr(broker, "enforcer", fake))
        yield live, fake_v2 / subtree, holder.pid
    finally:
        live.close()
        holder.kill()
        holder.wait()


def confined(live: LiveDaemon, subtree: Path, holder: int, **request: Any) -> tuple[dict[str, Any], Path]:
    held = live.call("allocate", {"resources": [{"resource": "slot", "amount": 1}], "holder_pid": holder,
                                  "enforce": "soft", "confine_holder": True, **request})
    directory = subtree / f"alloc-{held['id']}"
    wait_for(lambda: (directory / "cgroup.procs").exists(), what="the allocation's cgroup")
    assert (directory / "cgroup.procs").read_text() == str(holder)
    return held, directory


def test_an_allocations_pressure_and_memory_events_from_its_v2_cgroup_are_in_measured_and_shown(
        live_on_fake_v2: tuple[LiveDaemon, Path, int]):
    """The daemon's sampling round reads a (fake) v2 cgroup; allocations.get, mcpctl allocations and top show it."""
    live, subtree, holder = live_on_fake_v2
    held, directory = confined(live, subtree, holder)
    fill_v2(directory)
    measured = wait_for(lambda: (m := live.call("allocations.get", {"id": held["id"]})["measured"] or {})
                        .get("memory_pressure_some_avg10") and m, what="the pressure in measured")
    assert measured["memory_pressure_full_avg10"] == 10.0 and measured["cpu_pressure_some_s"] == 2.5
    assert (measured["oom_kills"], measured["memory_high_events"], measured["memory_max_events"]) == (1, 12, 3)
    assert measured["memory_current"] == 1000 and measured["memory_peak"] >= MIB  # a round may predate the files
    listing = run_cli("allocations", socket_path=live.socket, env={"COLUMNS": "200"})
    assert listing.returncode == 0, listing.stderr
    assert "1 OOM kill, pressure cpu 2% mem 12%" in listing.stdout
    top = run_cli("top", "--once", socket_path=live.socket, env={"COLUMNS": "200", "LINES": ""})
    assert top.returncode == 0, top.stderr
    assert "PRESSURE" in top.stdout
    row = next(line for line in top.stdout.splitlines() if line.startswith(held["id"]))
    assert "cpu 2% mem 12%" in row and "1 OOM kill" in row
    live.call("release", {"id": held["id"]})


def test_an_overuse_alert_resolves_when_its_allocation_ends(live_on_fake_v2: tuple[LiveDaemon, Path, int]):
    live, subtree, holder = live_on_fake_v2
    held, directory = confined(live, subtree, holder, resources=[{"resource": "memory", "amount": MIB}])
    fill_v2(directory)
    (directory / "memory.current").write_text(f"{5 * MIB}\n")
    [alert] = wait_for(lambda: [a for a in live.call("alerts.list") if a["rule"] == "overuse"],
                       what="the overuse alert")
    assert (alert["resource"], alert["state"], alert["last_value"]) == (f"allocation:{held['id']}/memory", "firing",
                                                                       5 * MIB)
    live.call("release", {"id": held["id"]})
    assert not [a for a in live.call("alerts.list") if a["rule"] == "overuse"]
    [resolved] = [e for e in live.call("events.list", {"limit": 1000})
                  if e["kind"] == "alert.resolved" and e["detail"]["rule"] == "overuse"]
    assert resolved["detail"]["why"] == "the allocation ended"
    assert resolved["detail"]["alert_id"] == alert["id"]


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_v1_keeps_its_files_open_between_rounds_and_reads_fresh_figures_through_them(v1: CgroupV1):
    v1.files.budget = 100
    fresh = CgroupV1(v1.mounts, v1.subtree)  # no budget: opens, reads and closes every file every round
    v1.create("f1", limits_for(EnforceMode.SOFT, Grant(cpu=1)))
    before = open_fds()
    first = v1.usage("f1")
    assert first is not None and v1.files.held == 4 and open_fds() == before + 4
    assert v1.usage("f1") is first, "unchanged files give back the same figures"
    assert first.figures() is first.figures()
    script = "import sys; sys.stdin.readline(); b = bytearray(48 << 20); sum(range(3_000_000))"
    child = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE)
    v1.move("f1", child.pid)
    assert child.stdin is not None
    child.stdin.write(b"go\n")
    child.stdin.close()
    assert child.wait(30) == 0
    second = v1.usage("f1")
    assert second is not None and second is not first
    assert second.memory_peak >= 48 * MIB and second.cpu_seconds > 0.05
    assert second == fresh.usage("f1"), "a held file reads what a fresh open reads"
    assert v1.files.held == 4 and fresh.files.held == 0
    assert v1.remove("f1")
    assert v1.files.held == 0 and open_fds() == before


def test_v1_a_cgroup_removed_behind_its_back_and_made_again_is_read_afresh(v1: CgroupV1, cgroup_subtree: str):
    from tests.cgroups import remove_subtree

    v1.files.budget = 100
    v1.create("g1", limits_for(EnforceMode.SOFT, Grant(cpu=1)))
    assert v1.usage("g1") is not None and v1.files.held == 4
    remove_subtree(v1_mounts(), cgroup_subtree)  # its held files now read ENODEV
    assert v1.usage("g1") is None and v1.files.held == 0
    v1.create("g1", limits_for(EnforceMode.SOFT, Grant(cpu=1)))
    again = v1.usage("g1")
    assert again is not None and again.memory_current >= 0 and v1.files.held == 4
    assert v1.existing() == {"g1"}
    remove_subtree(v1_mounts(), cgroup_subtree)
    assert v1.existing() == set() and v1.files.held == 0, "the listing lets go of the files of cgroups gone"


def test_v2_unchanged_files_give_back_the_same_figures_and_changed_ones_new(fake_v2: Path):
    backend = CgroupV2(fake_v2, "mcpres.slice")
    backend.files.budget = 100
    backend.create("u1", limits_for(EnforceMode.SOFT, Grant(memory=MIB)))
    directory = fake_v2 / "mcpres.slice" / "alloc-u1"
    fill_v2(directory)
    first = backend.usage("u1")
    assert first is not None and backend.usage("u1") is first and backend.files.held == 6
    (directory / "memory.pressure").write_text(MEMORY_PRESSURE.replace("avg10=12.34", "avg10=20.00"))
    second = backend.usage("u1")
    assert second is not None and second is not first
    assert second.memory_pressure is not None and second.memory_pressure.some_avg10 == 20.0
    backend.remove("u1")  # a fake directory keeps its files (ENOTEMPTY): the files are let go all the same
    assert backend.files.held == 0


def test_the_daemon_lets_its_backend_keep_files_open_within_what_the_open_file_limit_spares(
        tmp_path: Path, cgroup_subtree: str):
    import resource

    live = LiveDaemon(tmp_path, CONFIG + f'\n[enforce]\ncgroup = "{cgroup_subtree}"\n').start()
    try:
        files = getattr(live.daemon.enforcer, "files")
        limits = live.daemon.server.limits  # type: ignore[union-attr]
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        assert 0 < files.budget <= soft - limits.max_connections - (limits.holder_fds or 0)
    finally:
        live.close()


def test_v1_past_its_budget_of_descriptors_files_are_opened_each_round(v1: CgroupV1):
    v1.files.budget = 2  # half of one allocation's four files
    fresh = CgroupV1(v1.mounts, v1.subtree)
    v1.create("b1", limits_for(EnforceMode.SOFT, Grant(cpu=1)))
    v1.create("b2", limits_for(EnforceMode.SOFT, Grant(cpu=1)))
    for _ in range(2):
        assert v1.usage("b1") == fresh.usage("b1") and v1.usage("b2") == fresh.usage("b2")
        assert v1.files.held == 2
    assert v1.remove("b1") and v1.remove("b2") and v1.files.held == 0


def test_an_overuse_alert_whose_allocation_ended_while_the_daemon_was_down_resolves_at_the_next_round(
        tmp_path: Path):
    from mcpresd.core.alerts import Level

    live = LiveDaemon(tmp_path, CONFIG + '\n[monitor]\ninterval = "0.5s"\n').start()
    try:
        # As the alerts table holds it after a restart: open, for an allocation the daemon no longer has.
        live.on_store(lambda broker: broker.monitor.condition("overuse", "allocation:00000000deadbeef/memory",
                                                              Level.WARNING, float(5 * MIB), broker.clock(), {}))
        def overuse() -> list[str]:
            return [a["resource"] for a in live.call("alerts.list") if a["rule"] == "overuse"]

        # Not asserted present first: a round (every 0.5 s) may resolve it before alerts.list is answered.
        wait_for(lambda: not overuse(), what="the overuse alert to resolve")
        events = [e for e in live.call("events.list", {"limit": 1000})
                  if e["kind"].startswith("alert.") and e["detail"]["rule"] == "overuse"]
        assert sorted(e["kind"] for e in events) == ["alert.firing", "alert.resolved"]
        [resolved] = [e for e in events if e["kind"] == "alert.resolved"]
        assert resolved["detail"]["why"] == "the allocation ended"
    finally:
        live.close()


def test_favordynmods_is_set_on_the_real_cgroup2_mount_keeping_every_option_it_had():
    from mcpresd.enforce import dynmods

    mounts = dynmods.cgroup2_mounts(Path("/proc/self/mountinfo").read_text())
    if os.geteuid() != 0 or not mounts:
        pytest.skip("needs root and a cgroup2 mount")
    path, before = mounts[0].path, list(mounts[0].options)
    try:
        # As systemd mounts it: nsdelegate (and on most hosts memory_recursiveprot), without favordynmods.
        dynmods.reconfigure(path, [*[o for o in before if o != dynmods.OPTION], "nsdelegate"])
        assert "favordynmods" not in dynmods.cgroup2_mounts(Path("/proc/self/mountinfo").read_text())[0].options
        assert dynmods.ensure() == f"on ({path}, set at start)"
        after = dynmods.cgroup2_mounts(Path("/proc/self/mountinfo").read_text())[0].options
        assert "favordynmods" in after and "nsdelegate" in after
        assert dynmods.ensure() == f"on ({path})"  # once on, left alone
        with pytest.raises(OSError, match="cgroup2 option bogus"):
            dynmods.reconfigure(path, ["bogus"])  # refused: nothing changed
        assert dynmods.cgroup2_mounts(Path("/proc/self/mountinfo").read_text())[0].options == after
    finally:
        dynmods.reconfigure(path, before)


class RecordingFiles(HeldFiles):
    """Held files that note which files each read asks for, in order."""

    def __init__(self, budget: int) -> None:
        super().__init__(budget)
        self.asked: list[tuple[str, ...]] = []

    def read_all(self, allocation_id: str, paths: tuple[str, ...]) -> tuple[bytes, ...]:
        self.asked.append(tuple(Path(path).name for path in paths))
        return super().read_all(allocation_id, paths)


ALL_FOUR = ("cpuacct.usage", "memory.usage_in_bytes", "memory.max_usage_in_bytes", "memory.oom_control")
"""A v1 cgroup's files as a round reads them: the CPU time first, so anything that runs after it moves it."""
TWO = ("cpuacct.usage", "memory.usage_in_bytes")


def fake_v1(tmp_path: Path, allocation_id: str) -> tuple[CgroupV1, Path, Path]:
    """A v1 backend over a fake tree (memory and cpuacct hierarchies), with one allocation's files as a cgroup that
    has run a while shows them: (backend, its memory directory, its cpuacct directory)."""
    mounts = {"memory": tmp_path / "memory", "cpuacct": tmp_path / "cpuacct", "cpu": tmp_path / "cpu"}
    memory, cpuacct = (mounts[c] / "mcpres" / f"alloc-{allocation_id}" for c in ("memory", "cpuacct"))
    memory.mkdir(parents=True)
    cpuacct.mkdir(parents=True)
    (memory / "memory.usage_in_bytes").write_text(f"{10 * MIB}\n")
    (memory / "memory.max_usage_in_bytes").write_text(f"{20 * MIB}\n")
    (memory / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 0\n")
    (cpuacct / "cpuacct.usage").write_text("2500000000\n")
    backend = CgroupV1(mounts, "mcpres")
    backend.files = RecordingFiles(100)
    return backend, memory, cpuacct


def test_v1_a_cgroup_whose_cpu_did_not_move_is_read_for_its_memory_now_only(tmp_path: Path):
    backend, memory, cpuacct = fake_v1(tmp_path, "q1")
    asked = getattr(backend.files, "asked")
    first = backend.usage("q1")
    assert first is not None and (first.cpu_seconds, first.memory_current, first.memory_peak) == (2.5, 10 * MIB,
                                                                                                  20 * MIB)
    assert asked == [ALL_FOUR]
    # The kernel could not show these without a task of the cgroup running (its CPU time moving): not read.
    (memory / "memory.max_usage_in_bytes").write_text(f"{30 * MIB}\n")
    (memory / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 1\n")
    assert backend.usage("q1") is first, "nothing it reads changed: the same figures"
    (memory / "memory.usage_in_bytes").write_text(f"{4 * MIB}\n")  # reclaimed from outside: no CPU of its own
    fallen = backend.usage("q1")
    assert fallen is not None and (fallen.cpu_seconds, fallen.memory_current, fallen.memory_peak,
                                   fallen.oom_kills) == (2.5, 4 * MIB, 20 * MIB, 0)
    assert backend.usage("q1") is fallen
    assert asked == [ALL_FOUR, TWO, TWO, TWO]
    (memory / "memory.usage_in_bytes").write_text(f"{25 * MIB}\n")  # above the peak read: all four read again
    above = backend.usage("q1")
    assert above is not None and (above.memory_current, above.memory_peak, above.oom_kills) == (25 * MIB, 30 * MIB, 1)
    (memory / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 2\n")
    (cpuacct / "cpuacct.usage").write_text("2600000000\n")  # a task ran: all four read
    ran = backend.usage("q1")
    assert ran is not None and (ran.cpu_seconds, ran.memory_current, ran.oom_kills) == (2.6, 25 * MIB, 2)
    assert asked[4:] == [TWO, ALL_FOUR, TWO, ALL_FOUR]
    assert backend.files.held == 4


def test_v1_measurable_lists_the_memory_hierarchy_and_lets_go_of_cgroups_gone(v1: CgroupV1, cgroup_subtree: str):
    from tests.cgroups import remove_subtree

    v1.files.budget = 100
    for allocation_id in ("l1", "l2"):
        v1.create(allocation_id, limits_for(EnforceMode.SOFT, Grant(cpu=1)))
        assert v1.usage(allocation_id) is not None
    assert v1.measurable() == v1.existing() == {"l1", "l2"} and v1.files.held == 8
    assert v1.remove("l1")
    assert v1.measurable() == {"l2"} and v1.files.held == 4
    remove_subtree(v1_mounts(), cgroup_subtree)
    assert v1.measurable() == set() and v1.files.held == 0
