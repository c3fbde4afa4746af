"""Slurm's output as values (mcpresd/core/cluster.py), against output recorded from Slurm 22.05 (tests/fixtures/slurm/:
the ../shared/slurm harness, one node with 2 CPUs and 2 GPUs; `busy`: one job holds a GPU, another waits for both)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mcpresd.core.cluster import (
    ClusterRequest,
    JobState,
    SallocNews,
    gpu_count,
    parse_sinfo,
    parse_squeue,
    salloc_argv,
    salloc_news,
    sinfo_argv,
    slurm_duration,
    split_top,
)

FIXTURES = Path(__file__).parent.parent / "fixtures" / "slurm"
MIB = 1048576


def test_an_idle_partition_is_all_free() -> None:
    [debug] = parse_sinfo((FIXTURES / "sinfo-idle.txt").read_text())
    assert (debug.name, debug.default, debug.up, debug.nodes) == ("debug", True, True, ("vm",))
    assert (debug.cpus, debug.cpus_free, debug.gpus, debug.gpus_free) == (2, 2, 2, 2)
    assert debug.memory == debug.memory_free == 22899 * MIB


def test_a_busy_partition_counts_what_its_jobs_hold() -> None:
    [debug] = parse_sinfo((FIXTURES / "sinfo-busy.txt").read_text())
    assert (debug.cpus, debug.cpus_free, debug.gpus, debug.gpus_free) == (2, 1, 2, 1)
    assert debug.memory_free == (22899 - 100) * MIB


def test_nodes_that_take_no_work_are_not_free_and_partitions_keep_their_order() -> None:
    text = ("gpu|up|n1|0/8/0/8|1000|0|gpu:a100:4(S:0-1)|gpu:a100:0(IDX:N/A)|idle|\n"
            "gpu|up|n2|0/0/8/8|1000|0|gpu:a100:4(S:0-1)|gpu:a100:0(IDX:N/A)|drained|\n"
            "gpu|up|n3|0/8/0/8|1000|0|gpu:4|gpu:0|down*|\n"
            "cpu*|down|n1|0/8/0/8|1000|0|(null)|gpu:0|idle|\n"
            "truncated|up|n9\n")
    gpu, cpu = parse_sinfo(text)
    assert (gpu.name, gpu.nodes, gpu.cpus, gpu.cpus_free, gpu.gpus, gpu.gpus_free) == ("gpu", ("n1", "n2", "n3"), 24,
                                                                                     8, 12, 4)
    assert gpu.memory == 3000 * MIB and gpu.memory_free == 1000 * MIB
    assert (cpu.name, cpu.default, cpu.up, cpu.gpus) == ("cpu", True, False, 0)


def test_jobs_are_read_with_their_state_reason_and_whose_they_are() -> None:
    jobs = {job.id: job for job in parse_squeue((FIXTURES / "squeue-busy.txt").read_text())}
    assert jobs[12].state is JobState.RUNNING and jobs[12].state.holding
    assert (jobs[12].allocation_id, jobs[12].nodes, gpu_count(jobs[12].gres)) == ("held", "vm", 1)
    assert jobs[13].state is JobState.PENDING and jobs[13].state.waiting and jobs[13].reason == "Resources"
    assert jobs[13].allocation_id == "waiting"
    assert jobs[11].name == "some|one else" and jobs[11].allocation_id is None  # a name may hold the separator
    assert jobs[9].state is JobState.TIMEOUT and jobs[9].state.ended and jobs[9].reason == "TimeLimit"
    assert parse_squeue("12|WEIRD_NEW_STATE|None|vm|root|N/A|mcpres-x\n")[0].state is JobState.OTHER


def test_salloc_says_pending_granted_or_why_not() -> None:
    pending = (FIXTURES / "salloc-pending.txt").read_text().splitlines()
    assert salloc_news(pending[0]) == (SallocNews.PENDING, 13)
    assert salloc_news(pending[1]) is None
    assert salloc_news("salloc: Granted job allocation 7\n") == (SallocNews.GRANTED, 7)
    assert salloc_news("salloc: error: invalid partition specified: nosuch") == (
        SallocNews.ERROR, "invalid partition specified: nosuch")


@pytest.mark.parametrize(("gres", "count"), [
    ("gpu:2", 2), ("gres:gpu:1", 1), ("gpu:a100:2(S:0-1)", 2), ("gpu:1(IDX:0)", 1), ("gpu:a100:1(IDX:0,2)", 1),
    ("gpu:2,mps:100", 2), ("gpu:a100:2,gpu:v100:1", 3), ("(null)", 0), ("N/A", 0), ("", 0), ("gpu", 1),
    ("gpu:a100", 1), ("mps:100", 0),
])
def test_gpus_are_counted_in_every_gres_form(gres: str, count: int) -> None:
    assert gpu_count(gres) == count


def test_a_request_becomes_one_named_task_with_its_cpus_memory_gpus_and_time() -> None:
    argv = salloc_argv(ClusterRequest("abc", cpus=1.5, memory=3 * MIB + 1, gpus=2, time_limit=90.2, partition="gpu",
                                      account="lab", immediate=True))
    assert argv == ["salloc", "--no-shell", "--job-name=mcpres-abc", "--nodes=1", "--ntasks=1", "--cpus-per-task=2",
                    "--mem=4M", "--gres=gpu:2", "--time=0-00:01:31", "--partition=gpu", "--account=lab",
                    "--immediate"]
    assert salloc_argv(ClusterRequest("x")) == ["salloc", "--no-shell", "--job-name=mcpres-x", "--nodes=1",
                                               "--ntasks=1", "--cpus-per-task=1"]


def test_durations_and_the_sinfo_command() -> None:
    assert slurm_duration(0) == "0-00:00:01"
    assert slurm_duration(86400 * 2 + 3600 * 3 + 61) == "2-03:01:01"
    assert sinfo_argv()[-1].startswith("--Format=Partition:|,Available:|,")
    assert split_top("a(b,c),d") == ["a(b,c)", "d"]


def test_behind_ssh_the_slurm_command_is_quoted_for_the_remote_shell_and_elsewhere_passed_as_it_is() -> None:
    import shlex

    from mcpresd.cluster.slurm import through
    from mcpresd.core.cluster import squeue_argv

    argv = [*squeue_argv(), "sh", "-c", "echo $X; exit 7"]
    over_ssh = through(("/usr/bin/ssh", "-o", "BatchMode=yes", "login1"), argv)
    assert over_ssh[:4] == ["/usr/bin/ssh", "-o", "BatchMode=yes", "login1"] and len(over_ssh) == 5
    assert shlex.split(over_ssh[4]) == argv  # what the remote shell reads back: the same words, `|` and `;` inert
    assert through(("nsenter", "--net=/run/netns/x"), argv) == ["nsenter", "--net=/run/netns/x", *argv]
    assert through((), argv) == argv
