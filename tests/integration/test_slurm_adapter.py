"""The Slurm adapter against the real harness: every command through the prefix, its failures as ClusterErrors."""

from __future__ import annotations

import asyncio
import os

import pytest

from mcpresd.cluster.slurm import ClusterConfig, ClusterError, ClusterErrorKind, SlurmCluster
from mcpresd.core.cluster import ClusterRequest, JobState
from tests.slurm import cancel_all, job_of, skip_unless_slurm, wait_for_job



@pytest.fixture
def slurm() -> SlurmCluster:
    return SlurmCluster(ClusterConfig(command=tuple(skip_unless_slurm()), timeout=15.0))


def test_partitions_list_the_node_with_its_cpus_memory_and_gpus(slurm: SlurmCluster) -> None:
    partitions = asyncio.run(slurm.partitions())
    assert partitions and partitions[0].default
    assert partitions[0].gpus == 2 and partitions[0].cpus >= 1 and partitions[0].memory > 0


def test_submit_is_granted_then_cancel_ends_the_job(slurm: SlurmCluster) -> None:
    name = f"adapter-{os.getpid()}"

    async def scenario() -> int:
        submission = await slurm.submit(ClusterRequest(name, gpus=1, time_limit=120))
        assert submission.job_id is not None
        job_id = await submission.outcome()
        assert job_id == submission.job_id
        return job_id

    try:
        job_id = asyncio.run(scenario())
        assert wait_for_job(name, "RUNNING").id == job_id
        asyncio.run(slurm.cancel([job_id]))
        assert wait_for_job(name, "CANCELLED").id == job_id
    finally:
        cancel_all([name])


@pytest.mark.parametrize(("request_", "kind", "words"), [
    (ClusterRequest("adapter-gpus", gpus=3), ClusterErrorKind.INVALID, "Requested node configuration is not available"),
    (ClusterRequest("adapter-part", partition="nosuch"), ClusterErrorKind.INVALID, "invalid partition"),
])
def test_an_invalid_request_is_refused_with_slurms_message(slurm: SlurmCluster, request_: ClusterRequest,
                                                           kind: ClusterErrorKind, words: str) -> None:
    async def scenario() -> None:
        submission = await slurm.submit(request_)
        await submission.outcome()

    with pytest.raises(ClusterError) as raised:
        asyncio.run(scenario())
    assert raised.value.kind is kind and words.lower() in raised.value.message.lower()
    assert job_of(request_.allocation_id) is None or job_of(request_.allocation_id).state.ended  # type: ignore[union-attr]


def test_a_command_that_hangs_is_killed_at_the_timeout() -> None:
    slurm = SlurmCluster(ClusterConfig(command=("sh", "-c", "exec sleep 30", "--"), timeout=0.5))
    with pytest.raises(ClusterError) as raised:
        asyncio.run(slurm.jobs())
    assert raised.value.kind is ClusterErrorKind.TIMEOUT


def test_a_missing_command_is_unreachable() -> None:
    slurm = SlurmCluster(ClusterConfig(command=("/nonexistent/ssh", "login1"), timeout=5))
    with pytest.raises(ClusterError) as raised:
        asyncio.run(slurm.partitions())
    assert raised.value.kind is ClusterErrorKind.UNREACHABLE


def test_a_pending_submission_stopped_cancels_its_job(slurm: SlurmCluster) -> None:
    blockers = [f"adapter-block-{os.getpid()}", f"adapter-wait-{os.getpid()}"]

    async def scenario() -> None:
        held = await slurm.submit(ClusterRequest(blockers[0], gpus=2, time_limit=120))
        await held.outcome()
        waiting = await slurm.submit(ClusterRequest(blockers[1], gpus=2, time_limit=120))
        assert waiting.job_id is not None and waiting.process.returncode is None
        waiting.stop()
        with pytest.raises(ClusterError):
            await waiting.outcome()

    try:
        asyncio.run(scenario())
        job = job_of(blockers[1])  # a pending job cancelled leaves squeue at once, or shows CANCELLED
        assert job is None or job.state is JobState.CANCELLED
    finally:
        cancel_all(blockers)


def test_through_an_ssh_prefix_the_commands_reach_slurm_whole(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """`command = ["ssh", "login1"]`: ssh joins its arguments into one line for the remote shell. A stand-in
    `ssh` does just that (drops its options and host, runs the rest with sh -c), in front of the harness."""
    import subprocess

    wrapper = skip_unless_slurm()
    fake = tmp_path / "ssh"
    fake.write_text('#!/bin/sh\nwhile [ "${1#-}" != "$1" ]; do shift 2; done\nshift\nexec sh -c "$*"\n')
    fake.chmod(0o755)
    slurm = SlurmCluster(ClusterConfig(command=(str(fake), "-o", "BatchMode=yes", "login1", *wrapper), timeout=15.0))

    partitions = asyncio.run(slurm.partitions())  # sinfo's --Format holds `|`: unquoted, a pipe over there
    assert partitions and partitions[0].gpus == 2
    assert isinstance(asyncio.run(slurm.jobs()), list)  # squeue's --format too

    name = f"adapter-ssh-{os.getpid()}"
    try:
        job_id = asyncio.run(_granted(slurm, ClusterRequest(name, time_limit=120)))
        step = subprocess.run(slurm.step_argv(job_id, ["sh", "-c", "echo 'one; two'; exit 7"]),
                              capture_output=True, text=True, timeout=60)
        assert (step.returncode, step.stdout) == (7, "one; two\n"), step.stderr
    finally:
        cancel_all([name])


async def _granted(slurm: SlurmCluster, request: ClusterRequest) -> int:
    submission = await slurm.submit(request)
    return await submission.outcome()
