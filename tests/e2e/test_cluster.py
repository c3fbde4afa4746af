"""`mcpctl allocate --cluster` and `mcpctl run --cluster` against the real single-node Slurm of ../shared/slurm.

The installed commands, a real daemon with the harness as its `[cluster]` (polling Slurm every second), and
Slurm's own view (squeue) as the judge. Skipped, saying why, where the harness is not up.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import CONFIG, DaemonProcess, cli, ok
from tests.integration.test_access import nobodys_process, shared_dir  # noqa: F401 - fixtures
from tests.slurm import HARNESS, cancel_all, cluster_config, job_of, jobs, skip_unless_slurm, wait_for_job

pytestmark = pytest.mark.e2e

NOBODY = 65534
AS_NOBODY = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]


@pytest.fixture
def made() -> Iterator[list[str]]:
    """The allocation ids a test made: their jobs are cancelled afterwards, whatever happened."""
    ids: list[str] = []
    yield ids
    cancel_all(ids)


def start(tmp_path: Path, extra: str = "", **kwargs: Any) -> DaemonProcess:
    skip_unless_slurm()
    daemon = DaemonProcess(tmp_path, config=CONFIG + cluster_config(extra), **kwargs)
    daemon.start()
    return daemon


@pytest.fixture
def cluster_daemon(tmp_path: Path) -> Iterator[DaemonProcess]:
    daemon = start(tmp_path)
    try:
        yield daemon
    finally:
        daemon.stop()


def allocate(daemon: DaemonProcess, made: list[str], *args: str) -> dict[str, Any]:
    allocation: dict[str, Any] = json.loads(ok(daemon, "allocate", *args, "--json"))
    made.append(allocation["id"])
    return allocation


def get(daemon: DaemonProcess, allocation_id: str) -> dict[str, Any]:
    result: dict[str, Any] = daemon.call("allocations.get", {"id": allocation_id})
    return result


def eventually(check: Callable[[], Any], what: str, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout}s")
        time.sleep(0.1)


def test_an_allocation_on_the_cluster_is_a_slurm_job_until_released(cluster_daemon: DaemonProcess,
                                                                    made: list[str]) -> None:
    allocation = allocate(cluster_daemon, made, "--cluster", "--gpu", "1", "--cpu", "1", "--mem", "100M")
    assert allocation["state"] == "active" and allocation["site"] == "cluster"
    job = wait_for_job(allocation["id"], "RUNNING")
    assert allocation["cluster"]["job_id"] == job.id and allocation["cluster"]["nodes"] == job.nodes
    assert any(item["resource"] == f"cluster:{job.nodes}:job:{job.id}" for item in allocation["items"])
    assert "gpu:1" in job.gres
    exported = ok(cluster_daemon, "allocate", "--cluster", "--cpu", "1", "--env")
    made.append(exported.split("MCPRES_ALLOCATION_ID=")[1].split()[0].strip("'"))
    assert "export SLURM_JOB_ID=" in exported and "CUDA_VISIBLE_DEVICES" not in exported
    released = json.loads(ok(cluster_daemon, "release", allocation["id"], "--json"))
    assert released[0]["state"] == "released" if isinstance(released, list) else released["state"] == "released"
    wait_for_job(allocation["id"], "CANCELLED")
    assert get(cluster_daemon, allocation["id"])["cluster"]["slurm_state"] == "CANCELLED"


def test_a_cluster_allocation_without_holder_pid_is_held_by_its_connection(cluster_daemon: DaemonProcess,
                                                                          made: list[str]) -> None:
    # As on the host (docs/api.md, "holder"): a raw client's allocation lasts as long as its connection.
    params = {"resources": [{"resource": "cpu", "amount": 1}], "site": "cluster"}
    with cluster_daemon.client() as client:
        allocation = client.call("allocate", params)
        made.append(allocation["id"])
        assert allocation["state"] == "active" and allocation["holder"] == "connection"
        wait_for_job(allocation["id"], "RUNNING")
        assert get(cluster_daemon, allocation["id"])["state"] == "active"  # another connection's look: kept
    ended = eventually(lambda: (a := get(cluster_daemon, allocation["id"]))["state"] == "released" and a,
                       "the allocation released when its connection closed")
    assert ended["release_reason"] == "connection_closed"
    wait_for_job(allocation["id"], "CANCELLED")
    # Held by a pid instead, it outlives the connection.
    with cluster_daemon.client() as client:
        kept = client.call("allocate", {**params, "holder_pid": os.getpid()})
        made.append(kept["id"])
    wait_for_job(kept["id"], "RUNNING")
    assert get(cluster_daemon, kept["id"])["state"] == "active"


def test_resources_list_the_partitions_beside_the_host(cluster_daemon: DaemonProcess) -> None:
    rows = eventually(lambda: [r for r in json.loads(ok(cluster_daemon, "resources", "--json"))
                               if r["labels"].get("site") == "cluster"], "the partitions listed")
    gpus = next(r for r in rows if r["name"].endswith(":gpu"))
    assert gpus["capacity"] == 2 and gpus["labels"]["stale"] is False
    assert {r["type"] for r in rows} == {"cpu", "memory", "gpu"}
    assert any(r["name"] == "cpu" for r in json.loads(ok(cluster_daemon, "resources", "--json")))
    status = json.loads(ok(cluster_daemon, "status", "--json"))["cluster"]
    assert status["backend"] == "slurm" and status["stale"] is None and status["active"] == 0
    assert "cluster: slurm via " in ok(cluster_daemon, "status")


def test_run_on_the_cluster_streams_and_passes_the_exit_status(cluster_daemon: DaemonProcess,
                                                               made: list[str]) -> None:
    done = cli(cluster_daemon, "run", "--cluster", "--gpu", "1", "--", "sh", "-c",
               'echo "$CUDA_VISIBLE_DEVICES"; echo to-stderr >&2; exit 7')
    assert done.returncode == 7, done.stderr
    assert done.stdout.strip() in ("0", "1")
    assert "to-stderr" in done.stderr
    (ended,) = [a for a in json.loads(ok(cluster_daemon, "allocations", "--all", "--json"))
                if a.get("site") == "cluster"]
    made.append(ended["id"])
    assert ended["state"] == "released" and ended["cluster"]["slurm_state"] == "CANCELLED"
    assert job_of(ended["id"]).state.ended  # type: ignore[union-attr]


def test_a_step_of_a_cluster_allocation_runs_in_its_job(cluster_daemon: DaemonProcess, made: list[str]) -> None:
    allocation = allocate(cluster_daemon, made, "--cluster", "--gpu", "1")
    done = subprocess.run([*_mcpctl(), "run", "--allocation", allocation["id"], "--", "sh", "-c",
                           'echo "$SLURM_JOB_ID"; read line; echo "got $line"; exit 3'],
                          input="hello\n", capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, MCPRES_SOCKET=cluster_daemon.socket))
    assert done.returncode == 3, done.stderr
    assert done.stdout.split() == [str(allocation["cluster"]["job_id"]), "got", "hello"]
    assert get(cluster_daemon, allocation["id"])["state"] == "active"  # a step leaves the allocation


def test_a_third_request_waits_with_slurms_reason_and_is_granted_when_one_is_released(
        cluster_daemon: DaemonProcess, made: list[str]) -> None:
    first = allocate(cluster_daemon, made, "--cluster", "--gpu", "1")
    second = allocate(cluster_daemon, made, "--cluster", "--gpu", "1")
    third = allocate(cluster_daemon, made, "--cluster", "--gpu", "1", "--wait", "5m", "--no-block")
    assert third["state"] == "queued"
    job = wait_for_job(third["id"], "PENDING")
    explained = eventually(lambda: (e := json.loads(ok(cluster_daemon, "explain", third["id"], "--json")))
                           .get("slurm_reason") not in (None, "None") and e, "Slurm's reason in explain")
    assert explained["queued"] and explained["job_id"] == job.id and explained["slurm_reason"] == job.reason
    text = ok(cluster_daemon, "explain", third["id"])
    assert f"Slurm job {job.id}" in text and f"reason: {job.reason}" in text
    ok(cluster_daemon, "release", first["id"])
    granted = json.loads(ok(cluster_daemon, "wait", third["id"], "--json"))
    assert granted["state"] == "active" and granted["cluster"]["job_id"] == job.id
    assert second["state"] == "active"


def test_wait_0_on_a_busy_cluster_exits_3_and_leaves_nothing(cluster_daemon: DaemonProcess,
                                                              made: list[str]) -> None:
    held = allocate(cluster_daemon, made, "--cluster", "--gpu", "2")
    before = _rows(cluster_daemon)
    refused = cli(cluster_daemon, "allocate", "--cluster", "--gpu", "1")
    assert refused.returncode == 3, refused.stderr
    assert "busy" in refused.stderr
    assert [a["id"] for a in cluster_daemon.call("allocations.list", {})] == [held["id"]]
    assert _rows(cluster_daemon) == before


@pytest.mark.parametrize(("args", "words"), [
    (("--gpu", "3"), "Requested node configuration is not available"),
])
def test_an_invalid_cluster_request_exits_7_with_slurms_message(cluster_daemon: DaemonProcess, made: list[str],
                                                                args: tuple[str, ...], words: str) -> None:
    before = _rows(cluster_daemon)
    refused = cli(cluster_daemon, "allocate", "--cluster", *args)
    assert refused.returncode == 7, refused.stderr
    assert words in refused.stderr
    assert _rows(cluster_daemon) == before


def test_an_unknown_partition_exits_7_and_the_daemon_serves_on(tmp_path: Path, made: list[str]) -> None:
    daemon = start(tmp_path, 'partition = "nosuch"\n')
    try:
        refused = cli(daemon, "allocate", "--cluster", "--cpu", "1")
        assert refused.returncode == 7 and "partition" in refused.stderr.lower(), refused.stderr
        assert ok(daemon, "allocate", "--res", "licence=1").strip()  # the host still serves
    finally:
        daemon.stop()


def test_the_holders_death_cancels_the_job(cluster_daemon: DaemonProcess, made: list[str]) -> None:
    holder = subprocess.Popen(["sleep", "60"])
    try:
        allocation = allocate(cluster_daemon, made, "--cluster", "--cpu", "1", "--holder-pid", str(holder.pid))
        wait_for_job(allocation["id"], "RUNNING")
    finally:
        holder.kill()
        holder.wait()
    wait_for_job(allocation["id"], "CANCELLED")
    ended = eventually(lambda: (a := get(cluster_daemon, allocation["id"]))["state"] == "released" and a,
                       "the allocation ended")
    assert ended["release_reason"] == "holder_exited"


def test_a_job_slurm_ends_ends_its_allocation_with_the_reason(cluster_daemon: DaemonProcess,
                                                              made: list[str]) -> None:
    allocation = allocate(cluster_daemon, made, "--cluster", "--cpu", "1")
    job = wait_for_job(allocation["id"], "RUNNING")
    subprocess.run([*skip_unless_slurm(), "scancel", str(job.id)], check=True, timeout=30)  # an admin's scancel
    ended = eventually(lambda: (a := get(cluster_daemon, allocation["id"]))["state"] == "released" and a,
                       "the allocation ended by Slurm", timeout=15)
    assert ended["release_reason"] == "cluster_job_ended" and ended["cluster"]["slurm_state"] == "CANCELLED"


def test_kill_9_of_the_daemon_then_restart_orphans_nothing(tmp_path: Path, made: list[str]) -> None:
    daemon = start(tmp_path)
    try:
        active = allocate(daemon, made, "--cluster", "--gpu", "2")
        pending = allocate(daemon, made, "--cluster", "--gpu", "1", "--wait", "10m", "--no-block")
        wait_for_job(pending["id"], "PENDING")
        daemon.kill()
        ok_job = job_of(active["id"])
        assert ok_job is not None and ok_job.state.holding  # the job outlives the daemon
        daemon.start()
        # Both jobs outlived the daemon: the active one is active again, the pending one followed again (by squeue).
        assert get(daemon, active["id"])["state"] == "active"
        ok(daemon, "release", active["id"])
        wait_for_job(active["id"], "CANCELLED")
        granted = eventually(lambda: get(daemon, pending["id"])["state"] == "active", "the pending one granted")
        assert granted
        ok(daemon, "release", pending["id"])
        daemon.kill()
        gone = wait_for_job(pending["id"], "CANCELLED")
        assert gone.state.ended
    finally:
        daemon.stop()
    leftover = [job for job in jobs() if job.allocation_id in made and not job.state.ended]
    assert leftover == []


def test_after_a_restart_an_allocation_whose_job_is_gone_ends_saying_so(tmp_path: Path, made: list[str]) -> None:
    daemon = start(tmp_path)
    try:
        allocation = allocate(daemon, made, "--cluster", "--cpu", "1")
        job = wait_for_job(allocation["id"], "RUNNING")
        daemon.kill()
        subprocess.run([*skip_unless_slurm(), "scancel", str(job.id)], check=True, timeout=30)
        daemon.start()
        ended = eventually(lambda: (a := get(daemon, allocation["id"]))["state"] == "released" and a,
                           "the allocation ended after the restart")
        assert ended["release_reason"] in ("cluster_job_ended", "cluster_job_gone")
    finally:
        daemon.stop()


def test_spill_goes_local_while_the_host_has_room_then_to_the_cluster(cluster_daemon: DaemonProcess,
                                                                      made: list[str]) -> None:
    here = allocate(cluster_daemon, made, "--spill", "--gpu", "1")  # the replayed H100: the host's one GPU
    assert here.get("site") != "cluster" and here["items"][0]["resource"].startswith("gpu:")
    there = allocate(cluster_daemon, made, "--spill", "--gpu", "1")
    assert there["site"] == "cluster"
    wait_for_job(there["id"], "RUNNING")


def test_jobs_belong_to_the_user_who_asked(tmp_path: Path, shared_dir: Path, nobodys_process: int,
                                          made: list[str]) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: a second user, and a system daemon submitting for it")
    from tests.integration.test_access import shared_daemon

    skip_unless_slurm()
    daemon = shared_daemon(tmp_path, shared_dir, cluster_config())
    try:
        env = dict(os.environ, MCPRES_SOCKET=daemon.socket, HOME="/nonexistent")
        theirs = subprocess.run([*AS_NOBODY, *_mcpctl(), "allocate", "--cluster", "--cpu", "1", "--holder-pid",
                                 str(nobodys_process), "--json"], capture_output=True, text=True, env=env, timeout=60)
        assert theirs.returncode == 0, theirs.stderr
        allocation = json.loads(theirs.stdout)
        made.append(allocation["id"])
        assert wait_for_job(allocation["id"], "RUNNING").user == "nobody"  # submitted for them, not as root
        roots = json.loads(ok(daemon, "allocate", "--cluster", "--cpu", "1", "--json"))
        made.append(roots["id"])
        assert wait_for_job(roots["id"], "RUNNING").user == "root"
        refused = subprocess.run([*AS_NOBODY, *_mcpctl(), "release", roots["id"]], capture_output=True, text=True,
                                 env=env, timeout=60)
        assert refused.returncode == 1 and "no allocation" in refused.stderr, refused.stderr
        assert job_of(roots["id"]).state.holding  # type: ignore[union-attr]
        released = subprocess.run([*AS_NOBODY, *_mcpctl(), "release", allocation["id"]], capture_output=True,
                                  text=True, env=env, timeout=60)
        assert released.returncode == 0, released.stderr
        wait_for_job(allocation["id"], "CANCELLED")
    finally:
        daemon.stop()


def test_cluster_allocations_per_uid_are_limited_too(tmp_path: Path, shared_dir: Path, nobodys_process: int,
                                                    made: list[str]) -> None:
    # Each queued or active cluster allocation is an salloc the daemon runs and a Slurm job: one user may not
    # start them without bound, as on the host (root may).
    if os.geteuid() != 0:
        pytest.skip("needs root: a second user, and a system daemon submitting for it")
    from tests.integration.test_access import shared_daemon

    skip_unless_slurm()
    daemon = shared_daemon(tmp_path, shared_dir, cluster_config() + "\n[limits]\nmax_allocations_per_uid = 1\n")
    try:
        env = dict(os.environ, MCPRES_SOCKET=daemon.socket, HOME="/nonexistent")

        def as_nobody(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([*AS_NOBODY, *_mcpctl(), *args], capture_output=True, text=True, env=env,
                                  timeout=60)

        allocate_one = ("allocate", "--cluster", "--cpu", "1", "--holder-pid", str(nobodys_process), "--json")
        first = as_nobody(*allocate_one)
        assert first.returncode == 0, first.stderr
        made.append(json.loads(first.stdout)["id"])
        over = as_nobody(*allocate_one)
        assert over.returncode != 0 and "1 cluster allocations queued or active" in over.stderr, over
        assert "max_allocations_per_uid" in over.stderr
        roots = json.loads(ok(daemon, "allocate", "--cluster", "--cpu", "1", "--json"))  # root: no limit
        made.append(roots["id"])
        released = as_nobody("release", made[0])
        assert released.returncode == 0, released.stderr
        again = as_nobody(*allocate_one)
        assert again.returncode == 0, again.stderr
        made.append(json.loads(again.stdout)["id"])
    finally:
        daemon.stop()


def test_slurm_stopped_mid_way_gives_clear_errors_and_loses_nothing_local(tmp_path: Path, made: list[str]) -> None:
    if os.geteuid() != 0 or not (HARNESS / "down.sh").exists():
        pytest.skip("needs root and ../shared/slurm to stop and start Slurm")
    daemon = start(tmp_path)
    try:
        local = ok(daemon, "allocate", "--res", "licence=1").strip()
        kept = allocate(daemon, made, "--cluster", "--cpu", "1")
        released = allocate(daemon, made, "--cluster", "--cpu", "1")
        subprocess.run([str(HARNESS / "down.sh")], capture_output=True, timeout=120, check=True)
        try:
            ok(daemon, "release", released["id"])  # ended here; its job is cancelled once Slurm answers again
            assert get(daemon, released["id"])["state"] == "released"
            refused = cli(daemon, "allocate", "--cluster", "--cpu", "1")
            assert refused.returncode == 7, refused.stderr
            assert "cluster" in refused.stderr
            stale = eventually(lambda: [r for r in json.loads(ok(daemon, "resources", "--json"))
                                        if r["labels"].get("site") == "cluster" and r["labels"]["stale"]],
                               "the partitions marked stale")
            assert stale[0]["labels"]["why_stale"]
            assert get(daemon, local)["state"] == "active"
            assert ok(daemon, "allocate", "--res", "licence=1").strip()
        finally:
            subprocess.run([str(HARNESS / "up.sh")], capture_output=True, timeout=300, check=True)
        skip_unless_slurm()
        assert get(daemon, local)["state"] == "active"
        # The harness starts afresh (its state is wiped): the kept allocation's job is gone, and it ends saying so.
        gone = eventually(lambda: (a := get(daemon, kept["id"]))["state"] == "released" and a,
                          "the allocation whose job Slurm lost ended")
        assert gone["release_reason"] == "cluster_job_gone"
        assert get(daemon, local)["state"] == "active"
    finally:
        daemon.stop()


def _rows(daemon: DaemonProcess) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(daemon.db)
    try:
        return conn.execute("SELECT * FROM cluster_allocations UNION ALL SELECT id, state, 0, 0, 0, 0, 0, 0, 0, 0, 0, "
                            "0, 0, 0, 0, 0, 0, 0, 0, 0 FROM allocations").fetchall()
    finally:
        conn.close()


def _mcpctl() -> list[str]:
    import sys

    return [str(Path(sys.executable).parent / "mcpctl")]


def test_a_wait_that_runs_out_cancels_the_pending_job_and_exits_3(cluster_daemon: DaemonProcess,
                                                                   made: list[str]) -> None:
    allocate(cluster_daemon, made, "--cluster", "--gpu", "2")
    started = time.monotonic()
    timed_out = cli(cluster_daemon, "allocate", "--cluster", "--gpu", "1", "--wait", "2s", "--json")
    assert timed_out.returncode == 3, timed_out.stderr
    assert "wait ran out" in timed_out.stderr and time.monotonic() - started >= 2
    (withdrawn,) = [a for a in cluster_daemon.call("allocations.list", {"state": "withdrawn"})]
    made.append(withdrawn["id"])
    assert withdrawn["release_reason"] == "timeout"
    job = eventually(lambda: (j := job_of(withdrawn["id"])) is None or j.state.ended, "the pending job gone")
    assert job


def test_a_lease_that_runs_out_cancels_the_job(cluster_daemon: DaemonProcess, made: list[str]) -> None:
    allocation = allocate(cluster_daemon, made, "--cluster", "--cpu", "1", "--ttl", "2s")
    wait_for_job(allocation["id"], "RUNNING")
    renewed = json.loads(ok(cluster_daemon, "renew", allocation["id"], "--ttl", "3s", "--json"))
    assert renewed["ttl_s"] == 3 and renewed["expires_at"] > allocation["expires_at"]
    wait_for_job(allocation["id"], "CANCELLED")
    ended = eventually(lambda: (a := get(cluster_daemon, allocation["id"]))["state"] == "released" and a,
                       "the lease ended")
    assert ended["release_reason"] == "expired" and ended["cluster"]["slurm_state"] == "CANCELLED"


def test_ctrl_c_while_waiting_withdraws_the_request_and_cancels_its_job(cluster_daemon: DaemonProcess,
                                                                         made: list[str]) -> None:
    allocate(cluster_daemon, made, "--cluster", "--gpu", "2")
    waiting = subprocess.Popen([*_mcpctl(), "allocate", "--cluster", "--gpu", "1", "--wait", "5m"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=dict(os.environ, MCPRES_SOCKET=cluster_daemon.socket))
    try:
        queued = eventually(lambda: [a for a in cluster_daemon.call("allocations.list", {"state": "queued"})],
                            "the request queued")
        made.append(queued[0]["id"])
        wait_for_job(queued[0]["id"], "PENDING")
        waiting.send_signal(signal.SIGINT)
        assert waiting.wait(30) == 130
    finally:
        if waiting.poll() is None:
            waiting.kill()
        waiting.communicate()
    ended = eventually(lambda: (a := get(cluster_daemon, queued[0]["id"]))["state"] == "withdrawn" and a,
                       "the request withdrawn")
    assert ended["release_reason"] == "disconnected"
    assert eventually(lambda: (j := job_of(queued[0]["id"])) is None or j.state.ended, "the pending job gone")


def test_after_a_restart_the_job_of_an_ended_allocation_is_cancelled(tmp_path: Path, made: list[str]) -> None:
    daemon = start(tmp_path)
    try:
        allocation = allocate(daemon, made, "--cluster", "--cpu", "1")
        wait_for_job(allocation["id"], "RUNNING")
        daemon.kill()
        # What a crash between the release's COMMIT and its scancel leaves: the row ended, the job running.
        conn = sqlite3.connect(daemon.db)
        with conn:
            conn.execute("UPDATE cluster_allocations SET state = 'released', released_at = 1, "
                         "release_reason = 'released' WHERE id = ?", (allocation["id"],))
        conn.close()
        assert job_of(allocation["id"]).state.holding  # type: ignore[union-attr]
        daemon.start()
        wait_for_job(allocation["id"], "CANCELLED")
    finally:
        daemon.stop()
