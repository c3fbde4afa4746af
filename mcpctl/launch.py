"""`mcpctl run`: run a command as the holder of an allocation.

Rules:
- The command itself holds the allocation, so the daemon releases it the moment
  the command exits, however it exits. To know its pid before allocating,
  mcpctl forks first: the child waits on a pipe, the parent allocates with the
  child as holder, sends the child its environment through the pipe, and the
  child execs the command (same pid). If the allocation fails, the child gets
  EOF instead and exits without running anything.
- The parent only forwards signals, waits and releases. The release carries
  what the command measurably used (its and its waited-for children's CPU
  time and peak RSS, from wait4), for accounting and `recommend`. The daemon
  has usually seen the holder exit and released the allocation by then: the
  release only delivers the measurement, and AlreadyReleased is expected.
  Signals the kernel sent to the whole foreground process group (Ctrl-C at a
  terminal) reached the command already and are not sent twice.
- The exit status is the command's, as a shell reports it: its exit code,
  128+N when signal N killed it, 126/127 when it could not be started.
- Where the daemon names a transient scope for the step (systemd-scope backend,
  a per-user daemon), the child execs `systemd-run --user --scope ... -- cmd`
  instead, which starts the scope around itself and execs the command: the
  same pid, the same exit status. The command is looked up first, so that one
  that cannot be found still exits 127 (systemd-run would exit 1).
Standard library and `mcpresd.protocol` only.
"""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    import signal
    from collections.abc import Sequence
    from resource import struct_rusage
    from types import FrameType
    from typing import Any
else:
    # `signal` without its enums: `import signal` imports `enum` (with `collections`, `functools`, ...), ~5 ms of
    # every `mcpctl run`; its C half has the same functions and constants (as plain ints) and is all run needs.
    import _signal as signal

from mcpctl import exitcodes
from mcpctl.actions import (
    AllocateOptions,
    UsageError,
    allocate_params,
    fail,
    request_allocation,
    rpc_failure,
    run_environment,
    unreachable,
    warn_risks,
)
from mcpctl.client import Client, DaemonUnreachable, RpcError
from mcpctl.escape import printable
from mcpresd.protocol import ALLOCATION_NOT_FOUND, ALREADY_RELEASED, RELEASE, decode_line, encode_line

FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)
RESET_IN_CHILD = (*FORWARDED, signal.SIGPIPE, signal.SIGXFSZ)  # Python ignores SIGPIPE/SIGXFSZ; exec keeps that
SI_KERNEL = 0x80  # siginfo si_code of a signal the kernel sent, e.g. a terminal's Ctrl-C to its foreground group


class Terminated(BaseException):
    """A signal asked mcpctl to stop while it was still waiting for the allocation."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def run_command(socket_path: str, options: AllocateOptions, argv: Sequence[str], retry_for: float = 0.0) -> int:
    if not argv:
        return fail("give the command to run after the options, e.g. mcpctl run --gpu 1 -- python train.py",
                    exitcodes.USAGE)
    try:
        params = allocate_params(options)
    except UsageError as error:
        return fail(str(error), exitcodes.USAGE)
    read_end, write_end = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    child = os.fork()
    if child == 0:
        _become_command(read_end, write_end, list(argv))
    os.close(read_end)
    params["holder_pid"] = child
    params["signal_holder"] = True
    params["confine_holder"] = True  # with enforcement, the daemon moves the child into the cgroup before it replies
    code = _allocate_for(socket_path, params, child, retry_for)
    if isinstance(code, int):
        os.close(write_end)
        _stop(child)
        return code
    allocation = code
    status, usage = _hand_over_and_wait(child, write_end, step_environment(allocation), allocation.get("scope"))
    _release(socket_path, allocation["id"], retry_for, measured_of(usage))
    if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL and allocation.get("enforce") == "hard":
        _say_if_oom_killed(socket_path, allocation, retry_for)
    return _exit_code(status)


def _say_if_oom_killed(socket_path: str, allocation: dict[str, Any], retry_for: float) -> None:
    """The command was SIGKILLed in a hard allocation: if it was for memory, say so and by how much."""
    from mcpresd.protocol import Method

    try:
        with Client(socket_path, timeout=10.0, retry_for=retry_for) as client:
            client.call(Method.ALLOCATIONS_GET, {"id": allocation["id"]})  # a step's OOM kill is recorded now
            events = client.call(Method.EVENTS_LIST, {"allocation_id": allocation["id"], "after_id": 0,
                                                      "limit": 1000})
    except (RpcError, DaemonUnreachable):
        return
    for event in events:
        if event.get("kind") == "oom_killed":
            detail = event.get("detail") or {}
            granted, peak = detail.get("memory_granted"), detail.get("memory_peak")
            what = f"its --mem grant of {_mib(granted)}" if granted else "its memory limit"
            print(f"mcpctl: the command went over {what} and was killed by the kernel's OOM killer "
                  f"(memory peak {_mib(peak)}, {detail.get('oom_kills', 1)} process(es) killed; allocation "
                  f"{allocation['id']}, enforce hard). Ask for more with --mem, or use --enforce soft.",
                  file=sys.stderr)
            return


def _mib(value: object) -> str:
    return f"{value / 1048576:.1f} MiB" if isinstance(value, (int, float)) else "?"


def run_step(socket_path: str, allocation_id: str, argv: Sequence[str], retry_for: float = 0.0) -> int:
    """Run `argv` as a step of an allocation that exists (its cgroup's limits, its GPUs); the allocation stays."""
    if not argv:
        return fail("give the command to run after the options, e.g. mcpctl run --allocation ID -- make -j8",
                    exitcodes.USAGE)
    read_end, write_end = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    child = os.fork()
    if child == 0:
        _become_command(read_end, write_end, list(argv))
    os.close(read_end)
    from mcpresd.protocol import Method

    try:
        with Client(socket_path, timeout=10.0, retry_for=retry_for) as client:
            allocation: dict[str, Any] = client.call(Method.ALLOCATIONS_ATTACH, {"id": allocation_id, "pid": child})
    except (DaemonUnreachable, RpcError) as error:
        os.close(write_end)
        _stop(child)
        return unreachable(error) if isinstance(error, DaemonUnreachable) else rpc_failure(error)
    status, _ = _hand_over_and_wait(child, write_end, step_environment(allocation), allocation.get("scope"))
    if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL and allocation.get("enforce") == "hard":
        _say_if_oom_killed(socket_path, allocation, retry_for)
    return _exit_code(status)


def systemd_run_argv(scope: dict[str, Any], argv: Sequence[str]) -> list[str]:
    """The command line that starts `argv` in the step's transient scope (the daemon's ScopeDict)."""
    return ["systemd-run", "--user", "--scope", "--quiet", "--collect", f"--unit={scope['unit']}",
            f"--slice={scope['slice']}", *(f"--property={p}" for p in scope["properties"]), "--", *argv]


STEP_PREFIX = "MCPRES_STEP_PREFIX"
"""How the parent tells the child to exec the command through a prefix (a cluster job's srun), as JSON."""


def step_environment(allocation: dict[str, Any]) -> dict[str, str]:
    """The command's environment; for a cluster allocation, also the srun prefix the child execs it through
    (Slurm sets CUDA_VISIBLE_DEVICES there, so the host's value is not passed)."""
    cluster = allocation.get("cluster")
    if not isinstance(cluster, dict) or not cluster.get("step_command"):
        return run_environment(allocation)
    return {"MCPRES_ALLOCATION_ID": allocation["id"], STEP_PREFIX: _dumps(cluster["step_command"])}


def _dumps(value: Any) -> str:
    """`value` as JSON text, without importing `json` (and with it `re` and `enum`: several ms of every run)."""
    return encode_line(value)[:-1].decode()


def measured_of(usage: struct_rusage) -> dict[str, float]:
    """release's `measured` from a wait4 rusage: CPU seconds (user + system) and peak RSS in bytes."""
    return {"cpu_seconds": round(usage.ru_utime + usage.ru_stime, 6), "memory_peak": int(usage.ru_maxrss) * 1024}


def _allocate_for(socket_path: str, params: dict[str, Any], child: int, retry_for: float) -> dict[str, Any] | int:
    """The granted allocation, or the exit code to leave with."""
    previous = {signum: signal.signal(signum, _raise_terminated) for signum in (signal.SIGTERM, signal.SIGHUP)}
    try:
        allocation: dict[str, Any] = request_allocation(socket_path, params, retry_for)
    except DaemonUnreachable as error:
        return unreachable(error)
    except RpcError as error:
        return rpc_failure(error)
    except KeyboardInterrupt:
        return 128 + signal.SIGINT
    except Terminated as stop:
        return 128 + stop.signum
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if allocation["state"] != "active":
        return fail(f"allocation {allocation['id']} is {allocation['state']}, not active; "
                    "a --key used before names an old allocation", exitcodes.ERROR)
    warn_risks(allocation)
    return allocation


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    raise Terminated(signum)


def _become_command(read_end: int, write_end: int, argv: list[str]) -> None:
    """In the child: wait for the environment, then exec the command. Never returns."""
    try:
        for signum in RESET_IN_CHILD:
            signal.signal(signum, signal.SIG_DFL)
        os.close(write_end)
        data = b""
        while chunk := os.read(read_end, 65536):
            data += chunk
        os.close(read_end)
        if not data:
            os._exit(exitcodes.ERROR)  # no allocation: the parent says why
        handed = decode_line(data)
        environment = handed["environment"]
        prefix = environment.pop(STEP_PREFIX, None)  # only the parent's: not one this process inherited
        os.environ.pop(STEP_PREFIX, None)
        os.environ.update(environment)
        if prefix is not None:  # a cluster job's step: srun ... -- argv
            argv = [*decode_line(prefix.encode()), *argv]
        run = argv
        if handed.get("scope") is not None:
            import shutil

            if shutil.which(argv[0]) is None:
                present = os.sep in argv[0] and os.path.exists(argv[0])
                _cannot_run(argv[0], PermissionError(13, os.strerror(13)) if present
                            else FileNotFoundError(2, os.strerror(2)))
            run = systemd_run_argv(handed["scope"], argv)
        try:
            os.execvp(run[0], run)
        except OSError as error:
            _cannot_run(run[0], error)
    except BaseException:
        os._exit(exitcodes.ERROR)
    os._exit(exitcodes.ERROR)


def _cannot_run(program: str, error: OSError) -> None:
    """In the child: say why `program` cannot run, and exit 127 (not found) or 126. Never returns."""
    code = exitcodes.NOT_FOUND if isinstance(error, FileNotFoundError) else exitcodes.CANNOT_EXECUTE
    os.write(2, f"mcpctl: cannot run {program!r}: {error.strerror or error}\n".encode(errors="replace"))
    os._exit(code)


def _hand_over_and_wait(child: int, write_end: int, environment: dict[str, str],
                        scope: dict[str, Any] | None = None) -> tuple[int, struct_rusage]:
    """Start the command (in `scope`, where the daemon names one), forward signals to it until it ends; its wait
    status and resource usage."""
    watched = {*FORWARDED, signal.SIGCHLD}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, watched)
    try:
        try:
            os.write(write_end, encode_line({"environment": environment, "scope": scope}))
        except BrokenPipeError:
            pass  # the child is gone already; waitpid says how
        finally:
            os.close(write_end)
        while True:
            pid, status, usage = os.wait4(child, os.WNOHANG)
            if pid:
                return status, usage
            info = signal.sigtimedwait(watched, 1.0)
            if info is None or info.si_signo == signal.SIGCHLD or info.si_code == SI_KERNEL:
                continue
            try:
                os.kill(child, info.si_signo)
            except ProcessLookupError:
                pass
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _stop(child: int) -> None:
    try:
        os.kill(child, signal.SIGKILL)
    except ProcessLookupError:
        pass
    os.waitpid(child, 0)


def _release(socket_path: str, allocation_id: str, retry_for: float, measured: dict[str, float]) -> None:
    """Release after the command, with what it used; the daemon may have seen the holder exit and released it."""
    try:
        with Client(socket_path, timeout=10.0, retry_for=retry_for) as client:
            client.call(RELEASE, {"id": allocation_id, "measured": measured})
    except RpcError as error:
        if error.code not in (ALREADY_RELEASED, ALLOCATION_NOT_FOUND):
            rpc_failure(error)
    except DaemonUnreachable as error:
        print(f"mcpctl: could not release {allocation_id}: {printable(error)}", file=sys.stderr)


def _exit_code(status: int) -> int:
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code
