"""Watching holder processes, so an allocation is released the moment its holder dies.

Rules:
- A holder is (pid, start time). With a pidfd (Linux 5.3+) the event loop is
  woken when that very process exits, SIGKILL included; a pid reused later can
  never be mistaken for it. Where pidfds are unavailable (ENOSYS, or EPERM
  from a seccomp filter), holders are polled every `poll_interval` seconds by
  pid and start time. Any other pidfd_open failure (EINVAL for a thread that
  leads no thread group, EMFILE) polls that one holder only: one odd holder
  never turns the whole daemon to polling.
- Each pidfd is a file descriptor: past `max_fds` of them, further holders are
  polled, so holders never take the descriptors connections need.
- The watcher only reports exits; the broker decides what to release.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
from collections.abc import Callable

from mcpresd.holders import is_alive, process_start_time

log = logging.getLogger("mcpresd.watch")

Exited = Callable[[int, "int | None"], None]

UNSUPPORTED = frozenset({errno.ENOSYS, errno.EPERM})
"""pidfd_open errors that mean pidfds cannot be had on this system at all (old kernel, seccomp)."""


class HolderWatch:
    """Calls `on_exit(pid, start)` once when a watched holder exits."""

    def __init__(self, loop: asyncio.AbstractEventLoop, on_exit: Exited, poll_interval: float = 0.05,
                 pidfd_open: Callable[[int], int] | None = getattr(os, "pidfd_open", None),
                 max_fds: int | None = None) -> None:
        self._loop = loop
        self._max_fds = max_fds
        self._on_exit = on_exit
        self._poll_interval = poll_interval
        self._fds: dict[tuple[int, int | None], int] = {}
        self._polled: set[tuple[int, int | None]] = set()
        self._poller: asyncio.TimerHandle | None = None
        self._pidfd_open = pidfd_open

    def __len__(self) -> int:
        return len(self._fds) + len(self._polled)

    @property
    def polled(self) -> int:
        """How many holders are polled rather than watched with a pidfd."""
        return len(self._polled)

    def add(self, pid: int, start: int | None) -> None:
        key = (pid, start)
        if key in self._fds or key in self._polled:
            return
        if self._pidfd_open is not None and (self._max_fds is None or len(self._fds) < self._max_fds):
            try:
                fd = self._pidfd_open(pid)
            except ProcessLookupError:
                self._loop.call_soon(self._on_exit, pid, start)
                return
            except OSError as error:
                if error.errno in UNSUPPORTED:
                    log.info("pidfd_open unavailable (%s); polling holders instead", error)
                    self._pidfd_open = None
                else:
                    log.info("pidfd_open(%d) failed (%s); polling this holder", pid, error)
            else:
                # The pidfd names whatever process has this pid now: make sure it is the holder we mean.
                if start is not None and process_start_time(pid) != start:
                    os.close(fd)
                    self._loop.call_soon(self._on_exit, pid, start)
                    return
                self._fds[key] = fd
                self._loop.add_reader(fd, self._fired, key)
                return
        self._polled.add(key)
        if self._poller is None:
            self._poller = self._loop.call_later(self._poll_interval, self._poll)

    def _fired(self, key: tuple[int, int | None]) -> None:
        fd = self._fds.pop(key, None)
        if fd is not None:
            self._loop.remove_reader(fd)
            os.close(fd)
        self._on_exit(*key)

    def _poll(self) -> None:
        self._poller = None
        for key in list(self._polled):
            if not is_alive(*key):
                self._polled.discard(key)
                self._on_exit(*key)
        if self._polled:
            self._poller = self._loop.call_later(self._poll_interval, self._poll)

    def close(self) -> None:
        for fd in self._fds.values():
            self._loop.remove_reader(fd)
            os.close(fd)
        self._fds.clear()
        self._polled.clear()
        if self._poller is not None:
            self._poller.cancel()


def send_signal(pid: int, start: int | None, signum: int) -> bool:
    """Signal a holder if it is still the same process; False if it is gone or not ours to signal."""
    if not is_alive(pid, start):
        return False
    try:
        os.kill(pid, signum)
    except (ProcessLookupError, PermissionError) as error:
        log.warning("could not signal holder %d: %s", pid, error)
        return False
    return True
