"""The wrapped server's keeper: `python -I -S keeper.py GATEWAY_PID PATH -- ARGV...`, started by the gateway.

Rules of this module:
- Standard library only, and run as a script (`-I -S`): it starts in a few
  milliseconds and imports nothing of mcpctl.
- The server never outlives its gateway. The keeper is the gateway's child and
  the server's parent; it starts the server in a process group of its own and
  makes itself a child subreaper, so the server's own children stay its
  descendants whatever they do. It stops the whole group (SIGTERM, then SIGKILL
  TERM_GRACE_S later) when the gateway asks (SIGTERM, SIGINT, SIGHUP), when
  the gateway dies (PR_SET_PDEATHSIG: SIGKILL leaves the gateway no time to
  ask), and when the server exits leaving children behind.
- The keeper holds the gateway's allocations (their `holder_pid`): it exits
  only once every process below it has been reaped, so mcpresd never frees
  what a call uses while any process of the server still runs.
- The server gets the environment the keeper was started with, byte for byte
  (from /proc/self/environ: this interpreter's own start-up may add LC_CTYPE).
- PATH is the server's executable, resolved by the gateway; ARGV its argv, as
  the host wrote it.
- Exit status: the server's (128 + N if signal N ended it); 127 if PATH could
  not be run because it does not exist, 126 for any other reason it could not.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
TERM_GRACE_S = 1.0
"""How long the server's processes get after SIGTERM, before SIGKILL."""
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def log(message: str) -> None:
    try:
        os.write(2, f"mcpctl gateway: {message}\n".encode(errors="replace"))
    except OSError:
        pass


class Keeper:
    def __init__(self, path: str, command: list[str]) -> None:
        self.path = path
        self.command = command
        self.child = 0
        self.stopping = False
        self.killed = False

    def stop(self, why: str) -> None:
        """SIGTERM to every process below the keeper; SIGKILL TERM_GRACE_S later to whatever is left."""
        if self.stopping:
            return
        self.stopping = True
        if why:
            log(why)
        self.signal_all(signal.SIGTERM)
        signal.signal(signal.SIGALRM, lambda *_: self.kill())
        signal.setitimer(signal.ITIMER_REAL, TERM_GRACE_S)

    def kill(self) -> None:
        if self.remaining():
            log(f"the server's processes outlived SIGTERM by {TERM_GRACE_S:g}s: SIGKILL")
        self.killed = True
        self.signal_all(signal.SIGKILL)
        signal.setitimer(signal.ITIMER_REAL, TERM_GRACE_S)  # again, for any process reparented to the keeper since

    def signal_all(self, number: int) -> None:
        if self.child:
            try:
                os.killpg(self.child, number)
            except OSError:
                pass
        for pid in self.remaining():  # descendants that left the group were reparented to the keeper
            try:
                os.kill(pid, number)
            except OSError:
                pass

    def remaining(self) -> list[int]:
        """The keeper's living children (the server, or what it left behind)."""
        pids: list[int] = []
        try:
            for task in os.listdir("/proc/self/task"):
                with open(f"/proc/self/task/{task}/children") as file:
                    pids += [int(pid) for pid in file.read().split()]
        except OSError:
            pass
        return pids

    def start(self, environ: dict[bytes, bytes] | None) -> int:
        """Fork and exec the server; its pid, or an exit status (126, 127) if it could not be run."""
        read_end, write_end = os.pipe2(os.O_CLOEXEC)
        keeper = os.getpid()
        pid = os.fork()
        if pid == 0:
            try:
                os.close(read_end)
                os.setpgid(0, 0)
                try:
                    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
                except OSError:
                    pass  # the keeper then only stops the server while it lives itself
                if os.getppid() != keeper:
                    os._exit(1)
                for number in (signal.SIGPIPE, signal.SIGXFSZ, *STOP_SIGNALS):
                    signal.signal(number, signal.SIG_DFL)
                signal.pthread_sigmask(signal.SIG_SETMASK, [])
                if environ is None:
                    os.execv(self.path, self.command)
                os.execve(self.path, self.command, environ)
            except OSError as error:
                os.write(write_end, f"{error.errno}".encode())
            finally:
                os._exit(127)
        os.close(write_end)
        with os.fdopen(read_end, "rb") as pipe:
            failed = pipe.read()
        if failed:
            os.waitpid(pid, 0)
            errno = int(failed)
            log(f"cannot start {self.command[0]!r}: {os.strerror(errno)}")
            return -(127 if errno == 2 else 126)
        self.child = pid
        return pid

    def wait(self) -> int:
        """Reap every process below the keeper; the server's exit status."""
        status: int | None = None
        while True:
            try:
                pid, raw = os.waitpid(-1, 0)
            except ChildProcessError:
                break
            if pid == self.child:
                status = os.waitstatus_to_exitcode(raw)
                if self.remaining():
                    self.stop("the server exited and left processes behind: stopping them")
        signal.setitimer(signal.ITIMER_REAL, 0)
        if status is None:
            return 1
        return status if status >= 0 else 128 - status


def _prctl(option: int, value: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(option, value, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))


def _environ() -> dict[bytes, bytes] | None:
    try:
        with open("/proc/self/environ", "rb") as file:
            block = file.read()
    except OSError:
        return None
    pairs = (entry.split(b"=", 1) for entry in block.split(b"\0") if b"=" in entry)
    return {name: value for name, value in pairs}


def main(argv: list[str]) -> int:
    if len(argv) < 5 or argv[3] != "--":
        log("usage: keeper.py GATEWAY_PID PATH -- ARGV...")
        return 2
    gateway = int(argv[1])
    keeper = Keeper(argv[2], argv[4:])
    for number in STOP_SIGNALS:
        signal.signal(number, lambda *_: keeper.stop(
            "" if os.getppid() == gateway else "the gateway is gone: stopping the server"))
    try:
        _prctl(PR_SET_CHILD_SUBREAPER, 1)
        _prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError as error:
        log(f"the server's keeper cannot watch the gateway: prctl: {error.strerror}")
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    started = keeper.start(_environ())
    signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    if started < 0:
        return -started
    for fd in (0, 1):  # the server's stdio only: the gateway sees its stdout end when the server's processes close it
        devnull = os.open(os.devnull, os.O_RDWR)
        os.dup2(devnull, fd)
        os.close(devnull)
    if os.getppid() != gateway:
        keeper.stop("the gateway is gone: stopping the server")
    return keeper.wait()


if __name__ == "__main__":
    sys.exit(main(sys.argv))
