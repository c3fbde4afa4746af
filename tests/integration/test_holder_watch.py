"""The holder watch: pidfds where the kernel gives them, polling only for what it cannot watch (real processes)."""

from __future__ import annotations

import asyncio
import errno
import os
import subprocess
import threading
from collections.abc import Iterator

import pytest

from mcpresd.holders import process_start_time
from mcpresd.watch import HolderWatch

BOUND_S = 10.0


@pytest.fixture
def thread_id() -> Iterator[int]:
    """The id of a live thread of this process that is not its thread group's leader."""
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait)
    thread.start()
    try:
        assert thread.native_id is not None and thread.native_id != os.getpid()
        yield thread.native_id
    finally:
        stop.set()
        thread.join()


async def exits_reported(watch_pids: list[int], *, pidfd_open: object = "real") -> tuple[bool, int, int]:
    """Watch `watch_pids` plus a fresh `sleep`, then kill the sleep.

    Returns whether the sleep's exit (and only it) was reported, and how many holders were polled and watched.
    """
    loop = asyncio.get_running_loop()
    exited: asyncio.Queue[int] = asyncio.Queue()
    kwargs = {} if pidfd_open == "real" else {"pidfd_open": pidfd_open}
    watch = HolderWatch(loop, lambda pid, start: exited.put_nowait(pid), **kwargs)  # type: ignore[arg-type]
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        for pid in watch_pids:
            watch.add(pid, process_start_time(pid))
        watch.add(sleeper.pid, process_start_time(sleeper.pid))
        polled, watched = watch.polled, len(watch)
        sleeper.kill()
        sleeper.wait()
        first = await asyncio.wait_for(exited.get(), BOUND_S)
        return first == sleeper.pid and exited.empty(), polled, watched
    finally:
        sleeper.kill()
        sleeper.wait()
        watch.close()


def test_a_thread_id_is_polled_alone_and_the_next_holder_still_gets_a_pidfd(thread_id: int) -> None:
    reported, polled, watched = asyncio.run(exits_reported([thread_id]))
    assert watched == 2
    assert polled == 1  # the thread only: pidfd_open gave EINVAL for it, the sleeper has a pidfd
    assert reported


@pytest.mark.parametrize("code", [errno.ENOSYS, errno.EPERM])
def test_where_pidfds_are_unavailable_every_holder_is_polled_and_its_exit_still_seen(code: int) -> None:
    calls: list[int] = []

    def unavailable(pid: int) -> int:
        calls.append(pid)
        raise OSError(code, os.strerror(code))

    reported, polled, watched = asyncio.run(exits_reported([os.getpid()], pidfd_open=unavailable))
    assert calls == [os.getpid()]  # asked once; after "unsupported" the watch no longer tries
    assert polled == watched == 2
    assert reported


def test_another_pidfd_failure_polls_only_that_holder() -> None:
    real = os.pidfd_open
    failing = {os.getpid()}

    def out_of_descriptors(pid: int) -> int:
        if pid in failing:
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))
        return real(pid)

    reported, polled, watched = asyncio.run(exits_reported([os.getpid()], pidfd_open=out_of_descriptors))
    assert (polled, watched) == (1, 2)
    assert reported
