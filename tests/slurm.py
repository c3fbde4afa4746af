"""The ../shared/slurm harness (a real single-node Slurm 22.05) for the cluster tests, or a skip saying why.

`.ci/run` starts it before the tests (as root) and stops it after. Its clients run through the harness's
namespace wrapper `$D/ns` (D defaults to /tmp/mcpres-slurm), which is the `[cluster] command` prefix the
daemon is configured with here. Tests only read and cancel the jobs they made (named `mcpres-<their ids>`).
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from mcpresd.core.cluster import ClusterJob, parse_squeue, squeue_argv

HARNESS = Path(os.environ.get("MCPRES_SLURM_HARNESS") or Path(__file__).resolve().parents[2] / "shared" / "slurm")
"""../shared/slurm beside the checkout (up.sh, down.sh); $MCPRES_SLURM_HARNESS for a checkout elsewhere."""
D = Path(os.environ.get("D", "/tmp/mcpres-slurm"))
NS = str(D / "ns")


def skip_unless_slurm() -> list[str]:
    """The command prefix that reaches the harness's Slurm; skips the test if Slurm is not up."""
    if not Path(NS).exists():
        pytest.skip(f"no Slurm test harness at {D} (start it with ../shared/slurm/up.sh, as root)")
    try:
        done = subprocess.run([NS, "sinfo", "--noheader"], capture_output=True, text=True, timeout=15)
        failed = done.stderr.strip() if done.returncode != 0 else ""
    except (OSError, subprocess.TimeoutExpired) as error:
        failed = str(error)
    if failed:
        why = f"the Slurm harness at {D} does not answer: {failed}"
        if os.environ.get("MCPRES_SLURM_HARNESS"):  # .ci/run started it: its being gone fails, not skips
            pytest.fail(why)
        pytest.skip(why)
    return [NS]


def cluster_config(extra: str = "", interval: str = "1s", timeout: str = "10s") -> str:
    """Config tables (after tests.conftest.CONFIG) with the harness as the cluster, sampling (and so polling
    Slurm) every `interval`; `extra` is more of the [cluster] table."""
    return (f'\n[monitor]\ninterval = "{interval}"\n[cluster]\ncommand = ["{NS}"]\n'
            f'time_limit = "10m"\ntimeout = "{timeout}"\n{extra}')


def jobs() -> list[ClusterJob]:
    done = subprocess.run([NS, *squeue_argv()], capture_output=True, text=True, timeout=30, check=True)
    return parse_squeue(done.stdout)


def job_of(allocation_id: str) -> ClusterJob | None:
    """The newest job Slurm lists for an allocation (squeue keeps ended ones for MinJobAge)."""
    found = [job for job in jobs() if job.allocation_id == allocation_id]
    return max(found, key=lambda job: job.id) if found else None


def wait_for_job(allocation_id: str, *states: str, timeout: float = 30.0) -> ClusterJob:
    """Wait until the allocation's job is in one of `states` (squeue's %T)."""
    deadline = time.monotonic() + timeout
    while True:
        job = job_of(allocation_id)
        if job is not None and job.state.value in states:
            return job
        if time.monotonic() > deadline:
            raise AssertionError(f"the job of {allocation_id} is {job and job.state.value}, not {states}, "
                                 f"after {timeout}s")
        time.sleep(0.2)


def cancel_all(allocation_ids: list[str]) -> None:
    """Clean-up: cancel whatever the test left (by job name)."""
    for allocation_id in allocation_ids:
        subprocess.run([NS, "scancel", f"--name=mcpres-{allocation_id}"], capture_output=True, timeout=30)
