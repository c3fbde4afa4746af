"""A holder is (pid, start time): parsing /proc/PID/stat, and telling a reused pid from its holder."""

from __future__ import annotations

import os

import pytest

from mcpresd.holders import is_alive, parse_start_time, process_start_time


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
