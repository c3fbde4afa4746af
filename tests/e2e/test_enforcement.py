"""Enforcement end to end, as root on this host's real cgroup v1 controllers: the installed mcpctl and mcpresd.

Each test's daemon owns a fresh cgroup subtree (tests/cgroups.py), removed with everything in it afterwards.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.cgroups import cgroup_subtree, v1_mounts, wait_for  # noqa: F401 - fixtures
from tests.integration.test_access import shared_dir  # noqa: F401 - a fixture
from tests.conftest import CONFIG, DaemonProcess, cli, ok
from tests.conftest import run_cli  # noqa: F401

MIB = 1 << 20
KILL_GRACE_S = 1.0
HOG_512M = "import sys; data = b'x' * (512 << 20); print('survived', len(data) >> 20, 'MiB', flush=True)"


@pytest.fixture
def enforced(tmp_path: Path, cgroup_subtree: str) -> Iterator[DaemonProcess]:
    config = CONFIG + (f'\n[enforce]\ncgroup = "{cgroup_subtree}"\nkill_grace = "{KILL_GRACE_S}s"\n'
                       '\n[monitor]\ninterval = "0.5s"\n')
    process = DaemonProcess(tmp_path, config=config)
    process.start()
    process.subtree = cgroup_subtree  # type: ignore[attr-defined]
    try:
        yield process
    finally:
        process.stop()


def cgroup_dir(daemon: DaemonProcess, controller: str, allocation_id: str) -> Path:
    return v1_mounts()[controller] / daemon.subtree / f"alloc-{allocation_id}"  # type: ignore[attr-defined]


def events(daemon: DaemonProcess, allocation_id: str) -> list[dict[str, Any]]:
    return daemon.call("events.list", {"allocation_id": allocation_id, "after_id": 0, "limit": 1000})


def kinds(daemon: DaemonProcess, allocation_id: str) -> list[str]:
    return [e["kind"] for e in events(daemon, allocation_id)]


def start_run(daemon: DaemonProcess, *options: str, script: str) -> tuple[subprocess.Popen[str], str]:
    """`mcpctl run OPTIONS -- sh -c SCRIPT` in the background; the command prints its allocation id first."""
    env = {**os.environ, "MCPRES_SOCKET": daemon.socket}
    mcpctl = str(Path(sys.executable).parent / "mcpctl")
    process = subprocess.Popen([mcpctl, "run", *options, "--", "sh", "-c", f'echo "$MCPRES_ALLOCATION_ID"; {script}'],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=env)
    assert process.stdout is not None
    allocation_id = process.stdout.readline().strip()
    assert allocation_id, process.stderr.read() if process.stderr else ""
    return process, allocation_id


def in_cgroup(pid: int, daemon: DaemonProcess, allocation_id: str) -> bool:
    try:
        text = Path(f"/proc/{pid}/cgroup").read_text()
    except OSError:
        return False
    return f"/{daemon.subtree}/alloc-{allocation_id}" in text  # type: ignore[attr-defined]


def gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state in ("Z", "X")


def test_a_hard_command_over_its_mem_grant_is_oom_killed_and_told_why_its_neighbour_untouched(
        enforced: DaemonProcess):
    neighbour, neighbour_id = start_run(enforced, "--enforce", "hard", "--mem", "128M", script="exec sleep 120")
    try:
        result = cli(enforced, "run", "--enforce", "hard", "--mem", "128M", "--", "python3", "-c", HOG_512M)
        assert result.returncode == 137, result.stderr
        assert "survived" not in result.stdout
        assert "went over its --mem grant of 128.0 MiB" in result.stderr
        assert "OOM killer" in result.stderr
        oom = [e for e in enforced.call("events.list", {"after_id": 0, "limit": 1000}) if e["kind"] == "oom_killed"]
        assert len(oom) == 1
        assert oom[0]["detail"]["memory_granted"] == 128 * MIB
        assert oom[0]["detail"]["oom_kills"] >= 1
        assert oom[0]["allocation_id"] != neighbour_id
        assert neighbour.poll() is None
        assert enforced.call("allocations.get", {"id": neighbour_id})["state"] == "active"
        assert "oom_killed" not in kinds(enforced, neighbour_id)
    finally:
        neighbour.terminate()
        neighbour.wait(10)


def test_the_same_command_under_soft_completes_and_raises_overuse(enforced: DaemonProcess):
    hog, allocation_id = start_run(enforced, "--enforce", "soft", "--mem", "128M", "--res", "licence=2",
                                   script=f"python3 -c \"{HOG_512M}; import sys; sys.stdin.readline()\"")
    try:
        assert hog.stdout is not None
        assert hog.stdout.readline().strip() == "survived 512 MiB"  # it holds all 512 MiB from here on
        overuse = wait_for(lambda: [e for e in events(enforced, allocation_id) if e["kind"] == "overuse"],
                           timeout=20, what="the overuse event")
        assert overuse[0]["detail"]["kind"] == "memory"
        assert overuse[0]["detail"]["granted"] == 128 * MIB
        # The event carries the figure of the sample that found the excess, which may be mid-allocation.
        assert overuse[0]["detail"]["used"] > 128 * MIB
        # While it goes on, the allocation's risks carry the latest cgroup figure: the full 512 MiB.
        shown = wait_for(lambda: (lambda a: a if any(_over_mib(r) >= 512 for r in a["risks"]) else None)(
            enforced.call("allocations.get", {"id": allocation_id})), timeout=20, what="overuse of 512 MiB")
        assert any(r.startswith("overuse: memory") for r in shown["risks"]), shown["risks"]
        # The measured peak is the cgroup's: all 512 MiB, once a round has read it after the hog took it all.
        wait_for(lambda: enforced.call("allocations.get", {"id": allocation_id})["measured"].get("memory_peak", 0)
                 >= 512 * MIB, timeout=20, what="a measured peak of the whole 512 MiB")
        listing = ok(enforced, "allocations")
        assert "soft: " in listing and "MiB peak" in listing
        waiter = ok(enforced, "allocate", "--res", "licence=1", "--wait", "1m", "--no-block").strip()
        explained = ok(enforced, "explain", waiter)
        assert allocation_id in explained and "overuse: memory" in explained, explained
        ok(enforced, "release", waiter)
    finally:
        out, err = hog.communicate("go\n", timeout=30)
    assert hog.returncode == 0, err
    assert "oom_killed" not in kinds(enforced, allocation_id)


def _over_mib(risk: str) -> float:
    """The used figure of an "overuse: memory N MiB of a G MiB grant" risk; 0 for any other risk."""
    if not risk.startswith("overuse: memory "):
        return 0.0
    return float(risk.split()[2])


def test_a_hard_cpu_1_command_burning_two_cores_gets_at_most_about_one(enforced: DaemonProcess):
    burner, allocation_id = start_run(
        enforced, "--enforce", "hard", "--cpu", "1",
        script="yes >/dev/null & a=$!; yes >/dev/null & b=$!; sleep 3; kill $a $b")
    try:
        usage = cgroup_dir(enforced, "cpuacct", allocation_id) / "cpuacct.usage"
        assert (cgroup_dir(enforced, "cpu", allocation_id) / "cpu.cfs_quota_us").read_text().strip() == "100000"
        wait_for(lambda: int(usage.read_text()) > 0, what="the burners to start")
        cpu0, wall0 = int(usage.read_text()), time.monotonic()
        time.sleep(1.5)  # the measuring window, not a wait for an event
        cpu1, wall1 = int(usage.read_text()), time.monotonic()
        cores = (cpu1 - cpu0) / 1e9 / (wall1 - wall0)
        assert 0.05 < cores <= 1.3, f"{cores:.2f} cores of CPU time per second of wall time"
    finally:
        assert burner.wait(30) == 0


def test_a_double_forked_grandchild_is_gone_within_kill_grace_of_the_release(enforced: DaemonProcess):
    # The grandchild ignores SIGTERM, so only the SIGKILL after kill_grace ends it.
    result = cli(enforced, "run", "--enforce", "soft", "--cpu", "0.5", "--", "sh", "-c",
                 "(trap '' TERM; exec sleep 300) >/dev/null 2>&1 & echo $!")
    released = time.monotonic()
    assert result.returncode == 0, result.stderr
    grandchild = int(result.stdout.split()[-1])
    wait_for(lambda: gone(grandchild), timeout=KILL_GRACE_S + 1, what=f"grandchild {grandchild} to be stopped")
    assert time.monotonic() - released <= KILL_GRACE_S + 1
    wait_for(lambda: [e for e in enforced.call("events.list", {"after_id": 0, "limit": 1000})
                      if e["kind"] == "processes_stopped"], what="the processes_stopped event")
    stopped = [e for e in enforced.call("events.list", {"after_id": 0, "limit": 1000})
               if e["kind"] == "processes_stopped"]
    assert stopped[0]["detail"] == {"count": 1}


def test_keep_processes_leaves_them_running_outside_the_cgroup(enforced: DaemonProcess):
    result = cli(enforced, "run", "--enforce", "soft", "--cpu", "0.5", "--keep-processes", "--", "sh", "-c",
                 "(exec sleep 300) >/dev/null 2>&1 & echo $!; echo $MCPRES_ALLOCATION_ID")
    assert result.returncode == 0, result.stderr
    pid_text, allocation_id = result.stdout.split()
    grandchild = int(pid_text)
    try:
        wait_for(lambda: not cgroup_dir(enforced, "memory", allocation_id).exists(), what="the cgroup to go")
        assert not gone(grandchild)
    finally:
        os.kill(grandchild, signal.SIGKILL)


def test_steps_of_an_allocation_run_in_its_cgroup_with_their_exit_status(enforced: DaemonProcess):
    allocation_id = ok(enforced, "allocate", "--enforce", "hard", "--mem", "128M").strip()
    try:
        step = cli(enforced, "run", "--allocation", allocation_id, "--", "sh", "-c", "cat /proc/self/cgroup; exit 3")
        assert step.returncode == 3, step.stderr
        assert f"/{enforced.subtree}/alloc-{allocation_id}" in step.stdout  # type: ignore[attr-defined]
        hog = cli(enforced, "run", "--allocation", allocation_id, "--", "python3", "-c", HOG_512M)
        assert hog.returncode == 137, hog.stderr
        assert "went over its --mem grant of 128.0 MiB" in hog.stderr
        assert enforced.call("allocations.get", {"id": allocation_id})["state"] == "active"
        assert kinds(enforced, allocation_id).count("oom_killed") == 1
        refused = cli(enforced, "run", "--allocation", allocation_id, "--mem", "1G", "--", "true")
        assert refused.returncode == 2 and "takes no --mem" in refused.stderr
    finally:
        ok(enforced, "release", allocation_id)
    wait_for(lambda: not cgroup_dir(enforced, "memory", allocation_id).exists(), what="the cgroup to go")
    gone_step = cli(enforced, "run", "--allocation", allocation_id, "--", "true")
    assert gone_step.returncode == 1 and "not active" in gone_step.stderr


def test_asking_above_max_mode_is_refused(tmp_path: Path, cgroup_subtree: str):
    config = CONFIG + f'\n[enforce]\ncgroup = "{cgroup_subtree}"\nmax_mode = "soft"\n'
    daemon = DaemonProcess(tmp_path, config=config)
    daemon.start()
    try:
        refused = cli(daemon, "run", "--enforce", "hard", "--cpu", "1", "--", "true")
        assert refused.returncode == 2, refused.stderr
        assert "enforce 'hard' is above this daemon's max_mode 'soft'" in refused.stderr
    finally:
        daemon.stop()


def test_allocate_moves_a_named_holder_but_never_the_default_one(enforced: DaemonProcess):
    holder = subprocess.Popen(["sleep", "120"])
    try:
        named = ok(enforced, "allocate", "--enforce", "hard", "--mem", "64M", "--holder-pid", str(holder.pid)).strip()
        assert in_cgroup(holder.pid, enforced, named)
        limit = cgroup_dir(enforced, "memory", named) / "memory.limit_in_bytes"
        assert int(limit.read_text()) == 64 * MIB
        script = ok(enforced, "allocate", "--enforce", "hard", "--mem", "64M").strip()
        assert not cgroup_dir(enforced, "memory", script).exists()
        assert not in_cgroup(os.getpid(), enforced, script)
        ok(enforced, "release", named)
        wait_for(lambda: gone(holder.pid) or holder.poll() is not None, what="the named holder to be stopped")
        wait_for(lambda: not cgroup_dir(enforced, "memory", named).exists(), what="its cgroup to be removed")
        ok(enforced, "release", script)
    finally:
        holder.kill()
        holder.wait()


def test_a_daemon_killed_and_restarted_loses_no_cgroup_bookkeeping(enforced: DaemonProcess):
    keeper, kept_id = start_run(enforced, "--enforce", "hard", "--mem", "64M", script="exec sleep 120")
    # The holder starts its child once it is in the cgroup (a child started before stays where it was).
    holder = subprocess.Popen(["sh", "-c", "read go; sleep 120 & echo $!; wait"], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdin is not None
    try:
        ended_id = ok(enforced, "allocate", "--enforce", "soft", "--cpu", "0.5", "--holder-pid",
                      str(holder.pid)).strip()
        holder.stdin.write("go\n")
        holder.stdin.flush()
        orphan = int(holder.stdout.readline())
        wait_for(lambda: in_cgroup(orphan, enforced, ended_id), what="the holder's child in the cgroup")
        enforced.kill()
        holder.kill()  # the holder dies while the daemon is down; its child stays in the cgroup
        holder.wait()
        enforced.start()
        wait_for(lambda: gone(orphan), timeout=KILL_GRACE_S + 5, what="the ended allocation's leftover process")
        wait_for(lambda: not cgroup_dir(enforced, "memory", ended_id).exists(), what="the ended cgroup removed")
        assert enforced.call("allocations.get", {"id": ended_id})["release_reason"] == "holder_exited"
        assert enforced.call("allocations.get", {"id": kept_id})["state"] == "active"
        assert int((cgroup_dir(enforced, "memory", kept_id) / "memory.limit_in_bytes").read_text()) == 64 * MIB
        assert keeper.poll() is None
    finally:
        keeper.terminate()
        keeper.wait(10)
    wait_for(lambda: not cgroup_dir(enforced, "memory", kept_id).exists(), what="the kept allocation's cgroup to go")


def test_status_shows_the_backend_and_its_controllers(enforced: DaemonProcess):
    status = json.loads(ok(enforced, "status", "--json"))
    assert status["enforcement"]["backend"] == "cgroup-v1"
    assert {"cpu", "memory"} <= set(status["enforcement"]["controllers"])
    assert status["enforcement"]["mode"] == "soft"
    assert "soft (max hard) by cgroup-v1: cpu" in ok(enforced, "status")
    # A hybrid layout's cgroup2 mount takes favordynmods at start (set by default: mcpresd.enforce.dynmods).
    from mcpresd.enforce.dynmods import cgroup2_mounts

    if cgroup2_mounts(Path("/proc/self/mountinfo").read_text()):
        assert status["enforcement"]["favordynmods"].startswith("on (")
        assert "favordynmods on (" in ok(enforced, "status")
    else:
        assert "cgroup_favordynmods=true" in status["enforcement"]["favordynmods"]


def test_a_daemon_that_never_enforces_leaves_the_cgroup2_mount_alone(tmp_path: Path, cgroup_subtree: str):
    # max_mode = "off": no allocation ever gets a cgroup, so no task is ever moved; favordynmods (a host-wide
    # option that makes every fork and exit take another lock, and that Linux 6.18 cannot unset) buys nothing.
    config = CONFIG + f'\n[enforce]\ncgroup = "{cgroup_subtree}"\nmode = "off"\nmax_mode = "off"\n'
    daemon = DaemonProcess(tmp_path, config=config)
    daemon.start()
    try:
        said = json.loads(ok(daemon, "status", "--json"))["enforcement"]["favordynmods"]
        assert "not changed" in said and "max_mode" in said, said
    finally:
        daemon.stop()


def test_at_start_empty_cgroups_the_database_does_not_know_are_removed_busy_ones_kept(tmp_path: Path,
                                                                                     cgroup_subtree: str):
    from mcpresd.core.enforcement import Limits
    from mcpresd.enforce import choose
    from mcpresd.protocol import EnforceMode

    backend = choose(cgroup_subtree)
    backend.create("0000000000000001", Limits(EnforceMode.SOFT))
    backend.create("0000000000000002", Limits(EnforceMode.SOFT))
    busy = subprocess.Popen(["sleep", "120"])
    try:
        backend.move("0000000000000002", busy.pid)
        daemon = DaemonProcess(tmp_path, config=CONFIG + f'\n[enforce]\ncgroup = "{cgroup_subtree}"\n')
        daemon.start()
        try:
            wait_for(lambda: backend.existing() == {"0000000000000002"}, what="the empty unknown cgroup removed")
            assert busy.poll() is None  # another daemon's process, perhaps: never signalled
        finally:
            daemon.stop()
    finally:
        busy.kill()
        busy.wait()


def test_use_is_measured_from_the_cgroup_double_forked_children_included(enforced: DaemonProcess):
    # The holder's tree does not hold the memory: a grandchild re-parented to init does, which a walk of the
    # holder's process tree misses and the cgroup does not.
    runner, allocation_id = start_run(
        enforced, "--enforce", "soft", "--mem", "1G",
        script="(python3 -c \"import time; data = b'x' * (200 << 20); time.sleep(120)\" &); exec sleep 120")
    try:
        measured = wait_for(
            lambda: (enforced.call("allocations.get", {"id": allocation_id})["measured"] or {})
            .get("memory_peak", 0) >= 200 * MIB, timeout=20, what="the grandchild's 200 MiB measured")
        assert measured
        pids = {int(p) for p in (cgroup_dir(enforced, "memory", allocation_id) / "cgroup.procs").read_text().split()}
        parents = {pid: int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1]) for pid in pids}
        orphans = [pid for pid, parent in parents.items() if parent not in pids and parent != runner.pid]
        assert orphans, f"the grandchild should have left the holder's tree: {parents}"
    finally:
        runner.terminate()
        runner.wait(10)


def test_a_user_without_rights_on_cgroups_gets_the_command_confined_by_the_daemon(tmp_path: Path, shared_dir: Path,
                                                                                  cgroup_subtree: str):
    from tests.integration.test_access import shared_daemon
    from tests.integration.test_holder_checks import AS_NOBODY, mcpctl_env

    daemon = shared_daemon(tmp_path, shared_dir, f'\n[enforce]\ncgroup = "{cgroup_subtree}"\n')
    try:
        env = mcpctl_env(daemon)
        seen = subprocess.run([*AS_NOBODY, "mcpctl", "run", "--enforce", "hard", "--mem", "128M", "--", "sh", "-c",
                               'id -u; echo "$MCPRES_ALLOCATION_ID"; cat /proc/self/cgroup'],
                              text=True, capture_output=True, env=env, timeout=60)
        assert seen.returncode == 0, seen.stderr
        uid, allocation_id, *cgroups = seen.stdout.split("\n")
        assert uid == "65534"
        assert any(line.endswith(f"/{cgroup_subtree}/alloc-{allocation_id}") and ":memory:" in line
                   for line in cgroups), cgroups
        hog = subprocess.run([*AS_NOBODY, "mcpctl", "run", "--enforce", "hard", "--mem", "128M", "--", "python3",
                              "-c", HOG_512M], text=True, capture_output=True, env=env, timeout=60)
        assert hog.returncode == 137, hog.stderr
        assert "went over its --mem grant of 128.0 MiB" in hog.stderr
    finally:
        daemon.stop()


def test_a_grant_whose_holder_was_never_moved_before_a_crash_is_confined_at_restart(enforced: DaemonProcess):
    from mcpresd.enforce import choose

    holder = subprocess.Popen(["sleep", "120"])
    try:
        allocation_id = ok(enforced, "allocate", "--enforce", "hard", "--mem", "64M", "--holder-pid",
                           str(holder.pid)).strip()
        enforced.kill()
        backend = choose(enforced.subtree)  # type: ignore[attr-defined]
        backend.evict(allocation_id)  # as if the daemon died between the commit and the move
        assert backend.remove(allocation_id) and not in_cgroup(holder.pid, enforced, allocation_id)
        enforced.start()
        wait_for(lambda: in_cgroup(holder.pid, enforced, allocation_id), what="the holder moved in at restart")
        limit = cgroup_dir(enforced, "memory", allocation_id) / "memory.limit_in_bytes"
        assert int(limit.read_text()) == 64 * MIB
    finally:
        holder.kill()
        holder.wait()


HOG_THEN_FREE = ("import sys; data = b'x' * (512 << 20); print('survived', flush=True); sys.stdin.readline(); "
                 "del data; print('freed', flush=True); sys.stdin.readline()")


def overuse_alerts(daemon: DaemonProcess, *options: str) -> list[dict[str, Any]]:
    return [a for a in json.loads(ok(daemon, "alerts", *options, "--json")) if a["rule"] == "overuse"]


def test_a_soft_allocation_over_its_grant_is_an_alert_until_its_use_falls_back_under(enforced: DaemonProcess):
    hog, allocation_id = start_run(enforced, "--enforce", "soft", "--mem", "128M",
                                   script=f"python3 -c \"{HOG_THEN_FREE}\"")
    assert hog.stdout is not None and hog.stdin is not None
    try:
        assert hog.stdout.readline().strip() == "survived"
        [alert] = wait_for(lambda: overuse_alerts(enforced), timeout=20, what="the overuse alert")
        assert (alert["state"], alert["level"], alert["resource"]) == ("firing", "warning",
                                                                      f"allocation:{allocation_id}/memory")
        assert alert["last_value"] > 128 * MIB
        assert [held["id"] for held in alert["allocations"]] == [allocation_id]
        shown = next(line for line in ok(enforced, "alerts").splitlines() if f"allocation:{allocation_id}" in line)
        assert "overuse" in shown and "warning" in shown and " MiB" in shown, shown
        top = cli(enforced, "top", "--once", env={"COLUMNS": "220", "LINES": ""})
        assert top.returncode == 0, top.stderr
        row = next(line for line in top.stdout.splitlines() if line.startswith(allocation_id))
        assert "overuse memory" in row and "over its grant" in row, row
        listing = next(line for line in ok(enforced, "allocations").splitlines() if line.startswith(allocation_id))
        assert "over its grant" in listing, listing
        hog.stdin.write("go\n")
        hog.stdin.flush()
        assert hog.stdout.readline().strip() == "freed"
        wait_for(lambda: not overuse_alerts(enforced), timeout=20, what="the overuse alert to resolve")
        [resolved] = overuse_alerts(enforced, "--all")
        assert resolved["state"] == "resolved" and resolved["id"] == alert["id"]
        [event] = [e for e in enforced.call("events.list", {"after_id": 0, "limit": 1000})
                   if e["kind"] == "alert.resolved" and e["detail"].get("rule") == "overuse"]
        assert event["detail"]["why"] == "its use fell back under the grant"
        assert enforced.call("allocations.get", {"id": allocation_id})["state"] == "active"
    finally:
        out, err = hog.communicate("go\n", timeout=30)
    assert hog.returncode == 0, err
