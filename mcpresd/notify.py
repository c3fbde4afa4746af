"""sd_notify(3) without libsystemd: state changes as datagrams to $NOTIFY_SOCKET.

Rules:
- A no-op when NOTIFY_SOCKET is unset (not started by systemd with Type=notify).
- Never raises: a lost notification is logged, and the daemon goes on serving.
- `@name` is a socket in the abstract namespace; a path is a socket file.
- The watchdog is on when WATCHDOG_USEC is set and WATCHDOG_PID is unset or
  names this process; the daemon then pings every `watchdog_interval` (half of
  WATCHDOG_USEC, as sd_watchdog_enabled(3) advises).
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping

log = logging.getLogger("mcpresd.notify")


class Notifier:
    """Tells the service manager (systemd) when the daemon is ready, reloading, alive and stopping."""

    def __init__(self, environ: Mapping[str, str] | None = None, pid: int | None = None) -> None:
        env = os.environ if environ is None else environ
        self.address = _address(env.get("NOTIFY_SOCKET", ""))
        self.watchdog_interval = _watchdog_interval(env, os.getpid() if pid is None else pid)
        self._sock: socket.socket | None = None
        self._failed = False

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *fields: str) -> bool:
        """Send `KEY=value` fields in one datagram; False when nothing was sent."""
        if self.address is None:
            return False
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)
            self._sock.sendto("\n".join(fields).encode("utf-8", "replace"), self.address)
        except OSError as error:
            # Once at warning level: a supervisor that went away must not flood the log every watchdog ping.
            log.log(logging.DEBUG if self._failed else logging.WARNING, "cannot notify systemd: %s", error)
            self._failed = True
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        return self.send("READY=1", *_status(status))

    def reloading(self) -> bool:
        return self.send("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")

    def extend_start(self, seconds: float, status: str) -> bool:
        """Ask for `seconds` more of the start timeout from now (EXTEND_TIMEOUT_USEC, systemd >= 236): a start
        that is slow but progressing (a long migration) is not killed by TimeoutStartSec; the next extension
        must come within `seconds`."""
        return self.send(f"EXTEND_TIMEOUT_USEC={int(seconds * 1_000_000)}", *_status(status))

    def stopping(self) -> bool:
        return self.send("STOPPING=1", "STATUS=shutting down")

    def status(self, text: str) -> bool:
        return self.send(*_status(text))

    def alive(self, status: str | None = None) -> bool:
        """A watchdog ping (when the watchdog is on), with the current status line."""
        fields = _status(status)
        if self.watchdog_interval is not None:
            fields.append("WATCHDOG=1")
        return self.send(*fields) if fields else False

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _status(text: str | None) -> list[str]:
    # One datagram holds newline-separated fields: a newline inside the text would start a bogus field.
    return [] if text is None else ["STATUS=" + " ".join(text.splitlines())]


def _address(value: str) -> str | None:
    if value.startswith("@"):
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    if value:
        log.warning("ignoring NOTIFY_SOCKET=%r: only Unix socket paths and @abstract names are supported", value)
    return None


def _watchdog_interval(env: Mapping[str, str], pid: int) -> float | None:
    """Seconds between watchdog pings, or None when systemd does not watch this process."""
    watched = env.get("WATCHDOG_PID")
    if watched and watched != str(pid):
        return None
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    return usec / 2 / 1_000_000
