"""holder_usage's one pass over /proc gives what the per-holder psutil walk gave, on a real process tree."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import psutil
import pytest

from mcpresd.samplers.usage import holder_usage
from tests.live import LiveDaemon, live  # noqa: F401 - a fixture

BURN = "import time\nend = time.process_time() + 0.05\nwhile time.process_time() < end: pass\n"
CHILD = BURN + """
import subprocess, sys, time
grandchild = subprocess.Popen(["sleep", "3600"])
print("ready", flush=True)
time.sleep(3600)
"""
HOLDER = BURN + f"""
import subprocess, sys, time
subprocess.run([sys.executable, "-c", {BURN!r}], check=True)  # exited and reaped: the holder's children's time
children = [subprocess.Popen([sys.executable, "-c", {CHILD!r}], stdout=subprocess.PIPE) for _ in range(2)]
for child in children:
    child.stdout.readline()
print("ready", flush=True)
time.sleep(3600)
"""


def psutil_walk(pid: int) -> dict[str, float] | None:
    """The walk holder_usage made per allocation before it read /proc once per round (without GPUs)."""
    try:
        root = psutil.Process(pid)
        tree = [root, *root.children(recursive=True)]
    except psutil.Error:
        return None
    cpu, rss = 0.0, 0
    for process in tree:
        try:
            with process.oneshot():
                times = process.cpu_times()
                cpu += times.user + times.system
                rss += process.memory_info().rss
        except psutil.Error:
            continue
    times = root.cpu_times()
    cpu += times.children_user + times.children_system
    return {"cpu_seconds": cpu, "memory_peak": float(rss)}


@pytest.fixture
def holders() -> Iterator[list[int]]:
    """Two settled holder trees: each holder, a reaped child, two sleeping children, a grandchild under each."""
    started = [subprocess.Popen([sys.executable, "-c", HOLDER], stdout=subprocess.PIPE, start_new_session=True)
               for _ in range(2)]
    try:
        for holder in started:
            assert holder.stdout is not None
            assert holder.stdout.readline() == b"ready\n"
        yield [holder.pid for holder in started]
    finally:
        for holder in started:
            os.killpg(holder.pid, signal.SIGKILL)
            holder.wait(10)


def test_one_pass_gives_each_tree_what_the_psutil_walk_gave(holders: list[int]) -> None:
    gone = subprocess.Popen(["true"])
    gone.wait(10)
    allocations = {f"a{n}": holders[n % 2] for n in range(10)} | {"gone": gone.pid}

    usage = holder_usage(allocations, {})

    expected = {pid: psutil_walk(pid) for pid in holders}
    assert set(usage) == {f"a{n}" for n in range(10)}
    for allocation_id, pid in allocations.items():
        if allocation_id == "gone":
            continue
        walked = expected[pid]
        assert walked is not None
        assert usage[allocation_id]["cpu_seconds"] == pytest.approx(walked["cpu_seconds"], rel=1e-12)
        # The holder, its reaped child and two children burned 0.05 s each; /proc counts in ticks (10 ms) and may
        # round each one down.
        assert usage[allocation_id]["cpu_seconds"] >= 4 * (0.05 - 0.01)
        assert usage[allocation_id]["memory_peak"] == walked["memory_peak"]
        assert len(psutil.Process(pid).children(recursive=True)) == 4


def test_a_cgroup_replaces_the_walk_and_gpu_memory_follows_the_lineage(holders: list[int]) -> None:
    first, second = holders
    grandchild = psutil.Process(first).children(recursive=True)[-1].pid
    gpus = {"GPU-0": [(grandchild, 1000, (first,)), (12345678, 500, ())], "GPU-1": [(second, None, ())]}

    usage = holder_usage({"walked": first, "confined": second}, gpus,
                         lambda allocation_id: {"cpu_seconds": 7.0} if allocation_id == "confined" else None)

    assert usage["confined"] == {"cpu_seconds": 7.0}
    assert usage["walked"]["gpu_memory_peak"] == 1000.0


def test_a_tree_whose_figures_did_not_change_gives_back_the_same_figures(holders: list[int]) -> None:
    first, second = holders
    kept: dict[int, dict[str, float]] = {}
    before = holder_usage({"a": first, "b": first, "c": second}, {})
    for _ in range(50):  # settled: the trees sleep (a holder may still be on its way from print to sleep)
        settled, before = before, holder_usage({"a": first, "b": first, "c": second}, {}, kept=kept)
        if settled == before:
            break
    kept[second] = {**kept[second], "memory_peak": kept[second]["memory_peak"] - 1.0}  # as if it grew since

    after = holder_usage({"a": first, "b": first, "c": second, "new": first}, {}, kept=kept)

    assert after["a"] is before["a"] and after["b"] is before["a"] and after["new"] is before["a"]
    assert after["c"] is not before["c"] and after["c"] == before["c"]  # changed since the kept figures: afresh
    assert kept == {first: before["a"], second: after["c"]}
    assert holder_usage({"a": first}, {}, kept=kept) == {"a": before["a"]}
    assert set(kept) == {first}  # a holder no longer sampled is forgotten


OPENED: list[str] | None = None


def _count_opens(event: str, args: tuple[Any, ...]) -> None:
    if OPENED is not None and event == "open" and isinstance(args[0], str) and args[0].startswith("/proc/"):
        OPENED.append(args[0])


sys.addaudithook(_count_opens)  # lives as long as the test process; counts only while OPENED is a list


def test_a_round_reads_each_process_once_whatever_the_number_of_allocations(holders: list[int]) -> None:
    global OPENED
    OPENED = []
    try:
        usage = holder_usage({f"a{n}": holders[n % 2] for n in range(2000)}, {})
        opened = OPENED
    finally:
        OPENED = None
    assert len(usage) == 2000
    stats = [path for path in opened if path.endswith("/stat")]
    assert len(stats) == len(set(stats))  # each process's stat once
    assert len(stats) <= len(psutil.pids()) + 50  # one pass (+ processes started meanwhile), not 2000 passes
    statms = [path for path in opened if path.endswith("/statm")]
    assert len(statms) == len(set(statms)) == 10  # the resident set of the two trees' 10 processes, once each


def test_the_sampled_holders_are_the_active_pid_held_allocations_as_they_change(live: LiveDaemon) -> None:
    def both() -> tuple[dict[str, int], dict[str, int]]:
        return live.on_store(lambda broker: (broker.accounts.holders(), {
            a.id: a.holder_pid for a in broker.live.values() if a.is_active and a.holder_pid is not None}))

    first = live.call("allocate", {"resources": [{"resource": "licence", "amount": 1}], "holder_pid": os.getpid()})
    second = live.call("allocate", {"resources": [{"resource": "slot", "amount": 1}], "holder_pid": os.getppid()})
    assert both() == ({first["id"]: os.getpid(), second["id"]: os.getppid()},) * 2
    live.call("release", {"id": first["id"]})
    assert both() == ({second["id"]: os.getppid()},) * 2
    live.on_store(lambda broker: broker.reload())  # rebuilt from the store, as after a rolled-back job
    assert both() == ({second["id"]: os.getppid()},) * 2
