"""Slurm's command-line tools as an adapter behind the `Cluster` protocol.

Rules:
- Every command is the configured `command` prefix (empty, `["ssh", "login1"]`, a namespace wrapper) followed
  by Slurm's own argv, run without a shell, and bounded by the configured timeout; a command that hangs is
  killed and reported as a ClusterError of kind `timeout`.
- Failures are ClusterErrors carrying Slurm's own message and a kind: `unreachable` (the controller or the
  login node does not answer, the command is missing), `refused` (Slurm will not run it: busy nodes with
  --immediate, an account it refuses), `invalid` (an unknown partition, more GPUs than a node has), `timeout`.
- Output is parsed by `mcpresd.core.cluster`; nothing here decides what an allocation is.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import signal
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol

from mcpresd.core.cluster import (ClusterJob, ClusterRequest, Partition, SallocNews, parse_sinfo, parse_squeue,
                                  salloc_argv, salloc_news, sinfo_argv, squeue_argv)

DEFAULT_TIMEOUT_S = 10.0
STOP_ATTEMPTS = 20
STOP_INTERVAL_S = 0.25


class ClusterErrorKind(StrEnum):
    UNREACHABLE = "unreachable"
    REFUSED = "refused"
    INVALID = "invalid"
    TIMEOUT = "timeout"


class ClusterError(Exception):
    """A Slurm command failed; `message` is Slurm's own words, `kind` what sort of failure it is."""

    def __init__(self, kind: ClusterErrorKind, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


@dataclass(frozen=True)
class ClusterConfig:
    """The `[cluster]` table."""

    backend: str = "slurm"
    partition: str | None = None
    account: str | None = None
    time_limit: float | None = None
    """Seconds; None: the partition's default."""
    command: tuple[str, ...] = ()
    timeout: float = DEFAULT_TIMEOUT_S
    extra: tuple[str, ...] = field(default_factory=tuple)


_UNREACHABLE = ("Unable to contact slurm controller", "Connection refused", "Communication connection failure",
                "Socket timed out", "Could not resolve hostname", "Connection timed out", "No route to host",
                "Zero Bytes were transmitted", "Unable to establish", "Munge", "munge",
                "Invalid authentication credential", "Protocol authentication error")
_INVALID = ("Invalid partition", "Requested node configuration is not available", "Invalid generic resource",
            "Invalid account", "invalid", "Invalid", "Memory specification can not be satisfied",
            "More processors requested than permitted", "Requested time limit is invalid")


def kind_of(message: str) -> ClusterErrorKind:
    """What sort of failure a Slurm error message reports."""
    if any(text in message for text in _UNREACHABLE):
        return ClusterErrorKind.UNREACHABLE
    if any(text in message for text in _INVALID):
        return ClusterErrorKind.INVALID
    return ClusterErrorKind.REFUSED


def slurm_message(stderr: str, argv0: str) -> str:
    """Slurm's error lines without their `salloc: error: ` prefixes, joined; the whole text when none."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [line.split("error: ", 1)[1] for line in lines if "error: " in line]
    text = "; ".join(errors or lines[-3:])
    return text or f"{argv0} failed with no message"


class Cluster(Protocol):
    """What the cluster site needs of a cluster."""

    async def partitions(self) -> list[Partition]: ...

    async def jobs(self) -> list[ClusterJob]: ...

    async def submit(self, request: ClusterRequest, as_user: tuple[int, int] | None = None) -> Submission: ...

    async def cancel(self, job_ids: Sequence[int]) -> None: ...

    async def nodes_of(self, job_id: int) -> str: ...

    def step_argv(self, job_id: int, argv: Sequence[str]) -> list[str]: ...


class Submission:
    """A running `salloc --no-shell`: its job id once Slurm named one, and the outcome when it ends.

    salloc blocks while the job is pending and exits once it is granted (the job then runs on, as
    --no-shell asks); `stop()` ends a pending salloc, which makes Slurm cancel its job.
    """

    def __init__(self, process: asyncio.subprocess.Process, argv0: str) -> None:
        self.process = process
        self.argv0 = argv0
        self.job_id: int | None = None
        self.granted = False
        self.stopped = False
        self.pending = asyncio.Event()
        """Set when Slurm named the job (pending or granted), or salloc ended."""
        self._lines: list[str] = []
        self._reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        assert self.process.stderr is not None
        while line := await self.process.stderr.readline():
            text = line.decode(errors="replace")
            self._lines.append(text)
            news = salloc_news(text)
            if news is not None and news[0] is not SallocNews.ERROR and isinstance(news[1], int):
                self.job_id = news[1]
                self.granted = news[0] is SallocNews.GRANTED
                self.pending.set()
        self.pending.set()

    async def outcome(self) -> int:
        """Wait for salloc to end: the granted job's id; ClusterError if Slurm refused or ended it."""
        await self._reader
        code = await self.process.wait()
        if code == 0 and self.granted and self.job_id is not None:
            return self.job_id
        message = slurm_message("".join(self._lines), self.argv0)
        if self.stopped:
            message = f"salloc was stopped while job {self.job_id} was pending ({message})"
        raise ClusterError(kind_of(message), message)

    def stop(self) -> None:
        """End a salloc still waiting: Slurm cancels its pending job."""
        if self.stopped:
            return
        self.stopped = True
        self._stopper = asyncio.get_running_loop().create_task(self._stop())

    async def _stop(self) -> None:
        # salloc blocks signals for a moment after it names the job: a SIGTERM then is kept until it unblocks,
        # or lost. Sent again until it ends (SIGKILL at last: its job is then left to scancel).
        for attempt in range(STOP_ATTEMPTS + 1):
            if self.process.returncode is not None:
                return
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGTERM if attempt < STOP_ATTEMPTS else signal.SIGKILL)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._reader), STOP_INTERVAL_S)


def through(prefix: tuple[str, ...] | list[str], slurm_argv: list[str] | tuple[str, ...]) -> list[str]:
    """A Slurm command line behind the configured prefix.

    ssh hands its command to the remote user's shell as one string (its arguments joined by spaces), so behind
    an ssh prefix the Slurm argv is quoted for that shell: else a `|` in squeue's --format would start a pipe
    there, and a step's `sh -c 'a; b'` would be split. Any other prefix (a namespace wrapper, sudo, env)
    execs its arguments as they are.
    """
    if prefix and os.path.basename(prefix[0]) == "ssh":
        return [*prefix, shlex.join(slurm_argv)]
    return [*prefix, *slurm_argv]


class SlurmCluster:
    """Slurm through its command-line tools, each call through `config.command` and bounded by `config.timeout`."""

    def __init__(self, config: ClusterConfig) -> None:
        self.config = config

    def argv(self, slurm_argv: Sequence[str]) -> list[str]:
        return through(self.config.command, list(slurm_argv))

    async def _run(self, slurm_argv: Sequence[str]) -> str:
        argv = self.argv(slurm_argv)
        try:
            process = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE, start_new_session=True)
        except OSError as error:
            raise ClusterError(ClusterErrorKind.UNREACHABLE, f"cannot run {argv[0]!r}: {error.strerror}") from None
        try:
            out, err = await asyncio.wait_for(process.communicate(), self.config.timeout)
        except TimeoutError:
            _kill_group(process)
            await process.wait()
            raise ClusterError(ClusterErrorKind.TIMEOUT, f"{slurm_argv[0]} did not answer within "
                                                         f"{self.config.timeout:g}s") from None
        if process.returncode != 0:
            message = slurm_message(err.decode(errors="replace"), slurm_argv[0])
            raise ClusterError(kind_of(message), message)
        return out.decode(errors="replace")

    async def partitions(self) -> list[Partition]:
        return parse_sinfo(await self._run(sinfo_argv()))

    async def jobs(self) -> list[ClusterJob]:
        return parse_squeue(await self._run(squeue_argv()))

    async def nodes_of(self, job_id: int) -> str:
        """The nodes a granted job holds (squeue's %N)."""
        return (await self._run(["squeue", "--noheader", f"--jobs={job_id}", "--format=%N"])).strip()

    async def cancel(self, job_ids: Sequence[int]) -> None:
        if job_ids:
            await self._run(["scancel", *(str(job_id) for job_id in job_ids)])

    async def submit(self, request: ClusterRequest, as_user: tuple[int, int] | None = None) -> Submission:
        """Start salloc for `request`; as (uid, gid) when a root daemon submits for a user."""
        slurm_argv = salloc_argv(request)
        if as_user is not None:
            slurm_argv[1:1] = [f"--uid={as_user[0]}", f"--gid={as_user[1]}"]
        argv = self.argv(slurm_argv)
        try:
            process = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE, env={**os.environ, "SLURM_EXIT_ERROR": "1"})
        except OSError as error:
            raise ClusterError(ClusterErrorKind.UNREACHABLE, f"cannot run {argv[0]!r}: {error.strerror}") from None
        submission = Submission(process, "salloc")
        try:
            # Slurm names the job (or refuses it) within one controller round trip: bounded like every call.
            await asyncio.wait_for(submission.pending.wait(), self.config.timeout)
        except TimeoutError:
            submission.stop()
            raise ClusterError(ClusterErrorKind.TIMEOUT,
                               f"salloc did not answer within {self.config.timeout:g}s") from None
        return submission

    def step_argv(self, job_id: int, argv: Sequence[str]) -> list[str]:
        """A command run as a step of job `job_id`, through the prefix: what `mcpctl run` execs."""
        return self.argv(["srun", f"--jobid={job_id}", "--overlap", "--quiet", *argv])


def _kill_group(process: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
