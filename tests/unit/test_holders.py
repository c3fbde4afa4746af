"""A holder is (pid, start time): parsing /proc/PID/stat, and telling a reused pid from its holder."""

from __future__ import annotations

import os
import threading

import pytest

from mcpresd.holders import is_alive, parse_start_time, parse_status, process_start_time, process_status


def stat_line(command: str, state: str = "S", start: int = 123456) -> bytes:
    """A /proc/PID/stat line: pid (comm) state, then fields 4..52 with the start time as field 22."""
    fields = [str(n) for n in range(4, 53)]
    fields[22 - 4] = str(start)
    return f"4242 ({command}) {state} {' '.join(fields)}\n".encode()


@pytest.mark.parametrize("command", [
    "sleep",
    "my command",
    "a) (b",
    "x) S 1 2 3",
    ")",
    "((",
    "",
])
def test_the_start_time_is_read_after_the_last_parenthesis_whatever_the_command_name(command: str) -> None:
    assert parse_start_time(stat_line(command, start=987654)) == 987654


@pytest.mark.parametrize("data", [
    pytest.param(b"", id="empty"),
    pytest.param(b"4242 sleep S 1 2 3", id="no parentheses"),
    pytest.param(b"4242 (sleep) S 1 2 3", id="too few fields"),
    pytest.param(stat_line("sleep", state="Z"), id="a zombie has exited"),
    pytest.param(stat_line("sleep").replace(b"123456", b"12x456"), id="start time not a number"),
])
def test_a_stat_line_without_a_usable_start_time_gives_none(data: bytes) -> None:
    assert parse_start_time(data) is None


def test_a_live_process_with_its_own_start_time_is_alive() -> None:
    start = process_start_time(os.getpid())
    assert start is not None
    assert is_alive(os.getpid(), start)
    assert is_alive(os.getpid(), None)  # start unknown: the pid alone decides


def test_a_process_whose_start_time_differs_is_not_the_holder() -> None:
    """A reused pid: the process is alive, but it is not the one that held the allocation."""
    start = process_start_time(os.getpid())
    assert start is not None
    assert not is_alive(os.getpid(), start - 1)
    assert not is_alive(os.getpid(), start + 1)


def test_a_pid_that_does_not_exist_is_not_alive() -> None:
    assert process_start_time(2**31 - 2) is None
    assert not is_alive(2**31 - 2, None)


STATUS = (b"Name:\tbash\nUmask:\t0022\nState:\tS (sleeping)\nTgid:\t4242\nNgid:\t0\nPid:\t4243\nPPid:\t1\n"
          b"TracerPid:\t0\nUid:\t1000\t1001\t1002\t1003\nGid:\t100\t100\t100\t100\nNSpid:\t4243\t7\t1\nNSpgid:\t1\n")


@pytest.mark.parametrize("data, expected", [
    pytest.param(STATUS, (4243, 4242, (1000, 1001, 1002, 1003), (4243, 7, 1)), id="a thread two namespaces deep"),
    pytest.param(STATUS.replace(b"NSpid:\t4243\t7\t1\n", b""), (4243, 4242, (1000, 1001, 1002, 1003), (4243,)),
                 id="no NSpid line (before Linux 4.1): one namespace"),
    pytest.param(STATUS.rstrip(b"\n").replace(b"\nNSpgid:\t1", b""), (4243, 4242, (1000, 1001, 1002, 1003),
                                                                     (4243, 7, 1)), id="NSpid the last line"),
])
def test_status_gives_thread_group_uids_and_the_pid_in_each_namespace(
        data: bytes, expected: tuple[object, ...]) -> None:
    status = parse_status(data)
    assert status is not None
    assert (status.pid, status.tgid, status.uids, status.nspid) == expected


@pytest.mark.parametrize("data", [
    pytest.param(b"", id="empty"),
    pytest.param(STATUS.replace(b"Tgid:\t4242\n", b""), id="no Tgid"),
    pytest.param(STATUS.replace(b"Uid:\t1000", b"Uid:\tx"), id="a uid not a number"),
])
def test_a_status_without_the_facts_needed_gives_none(data: bytes) -> None:
    assert parse_status(data) is None


def test_the_status_of_this_process_and_of_one_of_its_threads() -> None:
    own = process_status(os.getpid())
    assert own is not None and own.pid == own.tgid == os.getpid() and own.uids[0] == os.getuid()
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait)
    thread.start()
    try:
        assert thread.native_id is not None
        status = process_status(thread.native_id)
    finally:
        stop.set()
        thread.join()
    assert status is not None and (status.pid, status.tgid) == (thread.native_id, os.getpid())
