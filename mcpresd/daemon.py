"""The one place that wires mcpresd together: config -> store -> broker -> server.

Lifecycle: start -> serve until stop -> shut down. Signal handlers only set an
event (stop, or reload for SIGHUP). Shutdown closes the listener, lets requests
in flight finish (with a timeout), runs the store's last pending jobs and
closes it, and removes the socket (unless systemd passed it: then it is systemd's).

systemd (`mcpresd.notify`): READY=1 once the socket listens, STATUS= and
WATCHDOG=1 every watchdog interval (a ping only after the store has
answered a job, so a stuck store or loop is restarted), RELOADING=1 then READY=1 around a
reload, STOPPING=1 at shutdown. A reload re-reads the config file and applies
what can change while serving; allocations are untouched, and a config that
does not load is logged and ignored.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import socket
import sqlite3
import sys
import time
from collections.abc import Callable
from dataclasses import fields, replace
from typing import Any

from mcpresd.cluster.site import ClusterSite
from mcpresd.cluster.slurm import SlurmCluster
from mcpresd.config import Config, ConfigError
from mcpresd.holders import is_alive, resolve_holder
from mcpresd.core.model import Resource
from mcpresd.enforce import Enforcer, HeldFiles, NoEnforcement, allocation_of, choose, let_go
from mcpresd.files import (
    EXIT_FAILURE,
    AlreadyServed,
    DatabaseLock,
    StartupConfigError,
    StartupError,
    UnusablePath,
    path_error,
    prepare_database_directory,
    prepare_database_files,
    restore_recipe,
)
from mcpresd.notify import Notifier
from mcpresd.pooling import FactoryRun, PoolNotApplied
from mcpresd import __version__
from mcpresd.exposition import Snapshot, exposition
from mcpresd.metrics_http import MetricsEndpoint
from mcpresd.rpc import Dispatcher
from mcpresd.protocol import EnforceMode
from mcpresd.samplers.metrics import HostSampler
from mcpresd.samplers.host import discover
from mcpresd.samplers.usage import GpuProcesses, holder_usage
from mcpresd.samplers.nvml import Nvml, ReplayError, ReplayNvml, open_nvml
from mcpresd.server import (
    BACKLOG,
    FD_OVERHEAD,
    Server,
    GroupCommitter,
    Limits,
    bind_unix_socket,
    open_file_limit,
    raise_open_file_limit,
    inherited_socket,
    remove_socket,
    socket_name,
)
from mcpresd.service import Broker, Confine, Outbox
from mcpresd.watch import HolderWatch, send_signal
from mcpresd.store import MIGRATION_HEARTBEAT_S, CorruptDatabase, MigrationFailed, Store

FACTORY_OUTPUT_LIMIT = 64 * 1024
"""The most of a factory command's stdout that is kept (its description is the last line)."""

log = logging.getLogger("mcpresd")

SHUTDOWN_GRACE_S = 5.0
STATUS_INTERVAL_S = 30.0
"""How often systemd's STATUS= line is refreshed when no watchdog asks for more."""
RESTART_ONLY = ("socket", "database", "socket_mode", "gpu_replay", "enforce", "metrics_listen", "cluster")
"""Config fields a reload cannot apply: the daemon keeps serving with the values it started with."""
ON_NEXT_DISCOVERY = ("memory_reserve", "default_link_bytes_per_s")


class LineFormatter(logging.Formatter):
    """One event per record: where stderr is the journal, with the `<N>` syslog priority journald reads (so
    `journalctl -p warning` works) and no time (the journal keeps its own); elsewhere, after a local ISO 8601
    timestamp with milliseconds and the UTC offset. A message of several lines (a how-to-fix) keeps them, each
    further line indented (and, for the journal, with the same priority), so none can pass for an event of its
    own."""

    PRIORITIES = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}

    def __init__(self, journal: bool) -> None:
        super().__init__("%(levelname)s %(name)s: %(message)s")
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        first, *rest = super().format(record).split("\n")
        if self.journal:
            prefix = f"<{self.PRIORITIES.get(record.levelno, 6)}>"
            return "\n".join([prefix + first, *(f"{prefix}  {line}" for line in rest)])
        local = time.localtime(record.created)
        stamp = f"{time.strftime('%Y-%m-%dT%H:%M:%S', local)}.{int(record.msecs):03d}{time.strftime('%z', local)}"
        return "\n".join([f"{stamp} {first}", *(f"  {line}" for line in rest)])


def stderr_is_the_journal() -> bool:
    """Whether stderr is the stream systemd connected to the journal: $JOURNAL_STREAM is its `DEVICE:INODE`
    (systemd.exec(5)). A child that inherits the variable but writes elsewhere (a redirect, a pipe) is not."""
    stream = os.environ.get("JOURNAL_STREAM", "")
    device, _, inode = stream.partition(":")
    if not (device.isdigit() and inode.isdigit()):
        return False
    try:
        info = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError):
        return False
    return (info.st_dev, info.st_ino) == (int(device), int(inode))


class RepeatFilter(logging.Filter):
    """A warning or error repeated word for word (a metrics file that cannot be written, every sampling round)
    is logged once; its repeats are counted, and once `window_s` has passed since it was last logged, the next
    one is logged with `(repeated N times in the last M s)`. Times are the records' own."""

    def __init__(self, window_s: float = 300.0) -> None:
        super().__init__()
        self.window_s = window_s
        self._seen: dict[tuple[str, int, str], tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        key = (record.name, record.levelno, record.getMessage())
        seen = self._seen.get(key)
        if seen is None:
            if len(self._seen) >= 1000:
                self._seen.clear()
            self._seen[key] = (record.created, 0)
            return True
        logged_at, repeats = seen
        if record.created - logged_at < self.window_s:
            self._seen[key] = (logged_at, repeats + 1)
            return False
        self._seen[key] = (record.created, 0)
        if repeats:
            record.msg = f"{key[2]} (repeated {repeats} times in the last {record.created - logged_at:.0f} s)"
            record.args = None
        return True


def configure_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LineFormatter(journal=stderr_is_the_journal()))
    handler.addFilter(RepeatFilter())
    root = logging.getLogger("mcpresd")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False


class Daemon:
    """mcpresd as a library: `await Daemon(config).serve(stop)` runs it until `stop` is set."""

    def __init__(self, config: Config, *, clock: Callable[[], float] = time.time,
                 load_config: Callable[[], Config] | None = None, notifier: Notifier | None = None) -> None:
        self.config = config
        self.clock = clock
        self.load_config = load_config
        self.notifier = notifier or Notifier()
        self.reload_requested = asyncio.Event()
        self.socket_path = config.socket
        self.nvml: Nvml | None = None
        self.started = asyncio.Event()
        self.server: Server | None = None
        self.watch: HolderWatch | None = None
        self.committer: GroupCommitter | None = None
        self._disks: list[tuple[str, str]] = []
        self._wake: asyncio.TimerHandle | None = None
        self._links: list[str] = []
        self._factories: set[asyncio.Task[None]] = set()
        self.lock: DatabaseLock | None = None
        self._database_dir: os.stat_result | None = None
        self.enforcer: Enforcer = NoEnforcement("the daemon has not started")
        self._endings: dict[str, asyncio.Task[None]] = {}
        self.site: ClusterSite | None = None
        self._trees: dict[int, dict[str, float]] = {}
        """Each walked holder's figures of the last round (holder_usage's `kept`: unchanged ones keep their dict)."""

    def open_gpus(self) -> Nvml | None:
        if self.config.gpu_replay:
            try:
                return ReplayNvml(self.config.gpu_replay)
            except ReplayError as error:
                raise StartupConfigError(f"--gpu-replay (gpu_replay): {error}") from None
        return open_nvml(log)

    def discover(self) -> list[Resource]:
        found = discover(
            memory_reserve=self.config.memory_reserve,
            nvml=self.nvml,
            default_link_bytes_per_s=self.config.default_link_bytes_per_s,
        )
        self._disks = [(r.name, str(r.labels.get("mountpoint", r.name[5:]))) for r in found if r.name.startswith("disk:")]
        self._links = [r.name[4:] for r in found if r.name.startswith("net:")]
        return found

    def _migrating(self, elapsed: float, progressing: bool) -> None:
        """A migration still runs: say so, and while it progresses keep systemd from killing the start for taking
        long. One that used no CPU for a whole heartbeat (a hung disk or file system) gets no more time: systemd's
        start timeout ends it, as it would any start that hangs."""
        if not progressing:
            log.warning("the database migration used no CPU in the last %.0f s (%.0f s so far); not asking systemd"
                        " for more time", MIGRATION_HEARTBEAT_S, elapsed)
            return
        log.info("still migrating the database (%.0f s)", elapsed)
        self.notifier.extend_start(3 * MIGRATION_HEARTBEAT_S, f"migrating the database ({elapsed:.0f} s so far)")

    def _open_store(self) -> Store:
        """Open (create, migrate) the database; the lock and the socket are already ours."""
        Store.migrate_in_child = True
        Store.migration_heartbeat = self._migrating  # its log lines too, not only systemd's timeout
        database = self.config.database
        identity = None
        if self.lock is not None and self._database_dir is not None:
            identity = prepare_database_files(database, self._database_dir)
        try:
            return Store(database, check_integrity=True, lock=self.lock, identity=identity)
        except CorruptDatabase:
            raise RuntimeError(integrity_failure(database)) from None
        except (sqlite3.Error, MigrationFailed) as error:
            code = getattr(error, "sqlite_errorcode", 0) & 0xFF
            if code in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB):
                raise RuntimeError(f"{integrity_failure(database)}\n  ({error})") from None
            raise opening_failure(database, error, code) from None
        except OSError as error:
            raise path_error(database, error, "open the database", "--db") from None

    def _check_for_lost_commits(self, store: Store) -> dict[str, Any] | None:
        """Loud if the database lost committed transactions: SQLite's WAL recovery dropped commit frames, or
        its newest event is older than the one the lock file remembers. None if neither."""
        expected = self.lock.previous_mark if self.lock is not None else 0
        behind = store.mark < expected
        if not behind and not store.wal_commits_dropped:
            return None
        log.critical(
            "database %s lost committed transactions: %s%s; allocations acknowledged in them are gone. Serving "
            "what the database holds; check `mcpctl events` and restore a backup if you have a newer one",
            store.path,
            f"its newest event is #{store.mark}, but #{expected} was committed before" if behind
            else f"its newest event is #{store.mark}",
            f"; SQLite's recovery dropped {store.wal_commits_dropped} committed transaction(s) from its -wal, "
            f"which is damaged" if store.wal_commits_dropped else " (a damaged or deleted -wal, or an older copy)")
        return {"expected_event": expected if behind else store.mark, "found_event": store.mark,
                "wal_commits_dropped": store.wal_commits_dropped, "detected_at": self.clock()}

    def _make_broker(self) -> Broker:
        store = self._open_store()
        lost = self._check_for_lost_commits(store)
        store.lost_commits = lost
        broker = Broker(
            store,
            socket_path=self.socket_path,
            gpu_source=self.nvml.source if self.nvml else "none",
            clock=self.clock,
            policy=self.config.policy,
            monitor=self.config.monitor,
            enforce=self.config.enforce,
            enforcer=self.enforcer,
            config_origin=(self.config.config_file, self.config.config_source),
        )
        if self.server is not None:
            broker.rpc_totals = self.server.dispatcher.stats.totals
            broker.connection_open = self.server.connections.__contains__
        with store.transaction():
            if lost is not None:
                store.insert_event(self.clock(), "database.lost_commits",
                                   detail={key: lost[key] for key in
                                           ("expected_event", "found_event", "wal_commits_dropped")})
            for change in broker.reconcile_resources(self.discover(), self.config.resources):
                log.info("resources: %s", change)
            try:
                changes = broker.pools.reconcile(self.config.pools, strict=True)
            except PoolNotApplied as error:
                raise StartupConfigError(f"config: {error}") from None
            for change in changes:
                log.info("pools: %s", change)
            for allocation_id in broker.recover():
                log.info("ended %s: its holder went away while the daemon was down", allocation_id)
        if self.lock is not None:
            self.lock.record(store.mark)
        return broker

    # -- what the loop does after each commit, and what it reports to the store --

    def _committed(self, outbox: Outbox) -> None:
        assert self.server is not None and self.watch is not None
        # Before the replies go out (they are written on a later loop round): a process the reply starts
        # (`mcpctl run`'s command) is in its cgroup before it runs.
        for confine in outbox.confine:
            self._confine(confine)
        for allocation_id, keep in outbox.unconfine:
            self._unconfine(allocation_id, keep)
        for allocation_id in outbox.sweep:
            try:
                if self.enforcer.remove(allocation_id):
                    log.info("removed the empty cgroup of unknown allocation %s", allocation_id)
            except OSError as error:
                log.warning("cannot remove the cgroup of unknown allocation %s: %s", allocation_id, error)
        self.server.publish(outbox.events)
        for pid, start in outbox.watch:
            self.watch.add(pid, start)
        for pid, start, signum in outbox.signals:
            send_signal(pid, start, signum)
        for run in outbox.factory:
            task = asyncio.get_running_loop().create_task(self._run_factory(run))
            self._factories.add(task)
            task.add_done_callback(self._factories.discard)
        if outbox.wake_at is not None:
            self._wake_at(outbox.wake_at)

    def _confine(self, confine: Confine) -> None:
        try:
            if not self.enforcer.exists(confine.allocation_id):
                self.enforcer.create(confine.allocation_id, confine.limits)
            if confine.pid is not None:
                self.enforcer.move(confine.allocation_id, confine.pid)
        except OSError as error:
            log.warning("allocation %s: cannot enforce its %s limits on pid %s: %s", confine.allocation_id,
                        confine.limits.mode.value, confine.pid, error)

    def _cgroup_figures(self, allocation_id: str) -> dict[str, float] | None:
        usage = self.enforcer.usage(allocation_id)
        return None if usage is None else usage.figures()

    def _gpu_members(self, pids: set[int]) -> dict[int, str]:
        """Off the loop: the allocation whose cgroup holds each GPU process, where one does."""
        found = {pid: allocation_of(pid, self.config.enforce.cgroup) for pid in pids}
        return {pid: allocation_id for pid, allocation_id in found.items() if allocation_id is not None}

    def _holder_usage(self, holders: dict[str, int], gpu_processes: GpuProcesses) -> dict[str, dict[str, float]]:
        """Off the loop: the allocations that have a cgroup (one listing) read from it, the rest from /proc in one
        pass. Asking the enforcer about each allocation cost a failed open per one without a cgroup (10,000
        `mcpctl allocate` holders: 80 ms of CPU a round)."""
        confined = self.enforcer.measurable()
        return holder_usage(holders, gpu_processes,
                            (lambda allocation_id: self._cgroup_figures(allocation_id) if allocation_id in confined
                             else None) if confined else None, kept=self._trees)

    def _keep_cgroup_files(self, limits: Limits) -> None:
        """The enforcer may keep open, between sampling rounds, the descriptors that connections, holders' pidfds
        and the daemon's own files leave spare of the open-file limit (0 where none are)."""
        files = getattr(self.enforcer, "files", None)
        if isinstance(files, HeldFiles):
            files.budget = max(0, open_file_limit() - FD_OVERHEAD - (limits.holder_fds or 0)
                               - limits.max_connections - limits.admin_reserve)

    def _unconfine(self, allocation_id: str, keep: bool) -> None:
        if allocation_id in self._endings:
            return

        async def end() -> None:
            try:
                count = await let_go(self.enforcer, allocation_id, keep, self.config.enforce.kill_grace)
            except OSError as error:
                log.warning("allocation %s: cannot remove its cgroup: %s", allocation_id, error)
                return
            finally:
                self._endings.pop(allocation_id, None)
            if self.enforcer.exists(allocation_id):
                log.warning("allocation %s: its cgroup is still busy; it is removed at the next start", allocation_id)
            if not count:
                return
            self._submit_quietly(lambda broker: broker.processes_stopped(allocation_id, count),
                                 f"allocation {allocation_id}: recording its stopped processes")

        self._endings[allocation_id] = asyncio.get_running_loop().create_task(end())

    def _submit_quietly(self, job: Callable[[Broker], object], what: str) -> None:
        assert self.committer is not None

        def logged(future: asyncio.Future[object]) -> None:
            if not future.cancelled() and future.exception() is not None:
                log.error("%s failed: %s", what, future.exception())

        self.committer.submit(job).add_done_callback(logged)

    def _holder_exited(self, pid: int, start: int | None) -> None:
        self._submit_quietly(lambda broker: broker.holder_exited(pid, start), f"releasing for holder {pid}")
        if self.site is not None:
            self.site.holder_exited(pid, start)

    def _connection_closed(self, connection: int) -> None:
        self._submit_quietly(lambda broker: broker.connection_closed(connection), "closing a connection")
        if self.site is not None:
            self.site.connection_closed(connection)

    async def _run_factory(self, run: FactoryRun) -> None:
        """Run a pool factory's command in its own process group, killed at its timeout; report the outcome."""
        env = {**os.environ, "MCPRES_POOL": run.pool, "MCPRES_MEMBER_INDEX": str(run.index),
               "MCPRES_MEMBER": run.member or ""}
        ok, output, error = False, "", ""
        try:
            process = await asyncio.create_subprocess_shell(
                run.command, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE, start_new_session=True, env=env)
        except OSError as failure:
            error = f"cannot start {run.command!r}: {failure}"
        else:
            try:
                out, err = await asyncio.wait_for(process.communicate(run.handle.encode()), run.timeout_s)
            except asyncio.CancelledError:  # the daemon is stopping: leave nothing of the run behind
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                raise
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                await process.wait()
                error = f"{run.action} command timed out after {run.timeout_s:g}s and was killed"
            else:
                output = out[-FACTORY_OUTPUT_LIMIT:].decode("utf-8", "replace")
                ok = process.returncode == 0
                if not ok:
                    tail = err[-500:].decode("utf-8", "replace").strip()
                    error = f"{run.action} command exited with status {process.returncode}" + (
                        f": {tail}" if tail else "")
        log.log(logging.INFO if ok else logging.WARNING, "pool %s: %s %s%s", run.pool, run.action,
                "succeeded" if ok else "failed", "" if ok else f" ({error})")
        self._submit_quietly(lambda broker: broker.factory_done(run, ok, output, error), f"pool {run.pool} factory")

    def _wake_at(self, when: float) -> None:
        """Run the broker's tick at time `when` by the daemon's clock (its earliest deadline), not before."""
        loop = asyncio.get_running_loop()
        due = loop.time() + max(0.0, when - self.clock())
        if self._wake is not None and not self._wake.cancelled() and self._wake.when() <= due:
            return
        if self._wake is not None:
            self._wake.cancel()
        self._wake = loop.call_at(due, self._tick_now)

    def _tick_now(self) -> None:
        self._wake = None
        self._submit_quietly(lambda broker: broker.tick(), "tick")

    async def _tick(self, stop: asyncio.Event) -> None:
        """A slow safety tick, in case a deadline was missed (a wall-clock jump); deadlines wake the broker."""
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), self.config.tick_interval)
            except TimeoutError:
                self._tick_now()

    async def _sample(self, stop: asyncio.Event) -> None:
        """One sampler for every client: read the host every interval, off the loop; the broker records it."""
        assert self.server is not None
        loop = asyncio.get_running_loop()
        sampler = HostSampler(self.nvml)
        while not stop.is_set():
            disks, links = self._disks, self._links
            try:
                readings = await loop.run_in_executor(None, sampler.read, disks, links)
                processes = dict(sampler.gpu_processes)
                holders = await self.committer.submit(lambda broker: broker.accounts.holders()) \
                    if self.committer is not None else {}
                usage = await loop.run_in_executor(None, self._holder_usage, holders, processes) \
                    if holders else {}
                gpu_pids = {pid for listed in processes.values() for pid, _, _ in listed if pid is not None}
                members = await loop.run_in_executor(None, self._gpu_members, gpu_pids) \
                    if gpu_pids and self.enforcer.enforces else {}
            except Exception as error:  # noqa: BLE001 - a sampler failure must never stop the daemon
                log.warning("sampling failed: %s", error)
            else:
                stats = self.server.dispatcher.stats.take()
                self._submit_quietly(lambda broker: broker.record_samples(readings, processes, stats, usage, members),
                                     "sampling")
                if self.config.prometheus_file:
                    await self._write_prometheus(self.config.prometheus_file)
            try:
                await asyncio.wait_for(stop.wait(), self.config.sample_interval)
            except TimeoutError:
                pass

    async def exposition(self) -> str:
        """Every metric in the Prometheus text format, from a store job (the textfile, GET /metrics)."""
        assert self.committer is not None
        snapshot: Snapshot = await self.committer.submit(lambda broker: broker.exposition_snapshot())
        return await asyncio.get_running_loop().run_in_executor(None, exposition, snapshot)  # off the store thread

    async def _write_prometheus(self, path: str) -> None:
        try:
            text = await self.exposition()
        except Exception as error:  # noqa: BLE001 - a failed exposition must never stop the sampler
            log.warning("metrics: the exposition for %s failed: %s", path, error)
            return
        await asyncio.get_running_loop().run_in_executor(None, write_prometheus, path, text)

    # -- systemd: status, watchdog, reload ---------------------------------

    async def _status_line(self, timeout: float) -> str | None:
        """The broker's one-line summary, from a store job; None if it did not answer in time."""
        assert self.committer is not None
        try:
            line: str = await asyncio.wait_for(self.committer.submit(lambda broker: broker.summary()), timeout)
        except TimeoutError:
            return None
        return line

    async def _keep_systemd_informed(self, stop: asyncio.Event) -> None:
        interval = self.notifier.watchdog_interval or STATUS_INTERVAL_S
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), interval)
                return
            except TimeoutError:
                pass
            line = await self._status_line(interval)
            if line is None:
                # No ping: if the store stays stuck, systemd's watchdog restarts the daemon, as it should.
                log.warning("the store did not answer within %.1fs", interval)
                continue
            self.notifier.alive(line)

    async def _reload_when_asked(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self.reload_requested.wait()
            self.reload_requested.clear()
            self.notifier.reloading()
            try:
                await self.reload()
            except Exception:  # noqa: BLE001 - a failed reload must leave the daemon serving
                log.exception("reload failed; keeping the current configuration")
            if self.notifier.enabled:
                self.notifier.ready(await self._status_line(SHUTDOWN_GRACE_S))

    async def reload(self) -> list[str]:
        """Re-read the config and apply what can change while serving; return what changed (also logged)."""
        assert self.committer is not None
        try:
            fresh = self.load_config() if self.load_config is not None else self.config
        except ConfigError as error:
            log.error("reload: %s; keeping the current configuration", error)
            return []
        old = self.config
        for name in RESTART_ONLY:
            if getattr(fresh, name) != getattr(old, name):
                log.warning("reload: %s changed; it takes effect when the daemon restarts", name)
        fresh = replace(fresh, **{name: getattr(old, name) for name in RESTART_ONLY})
        changes: list[str] = await self.committer.submit(
            lambda broker: broker.reconfigure(fresh.resources, fresh.policy, fresh.monitor, fresh.pools))
        for field in fields(Config):
            if field.name in ("resources", "policy", "monitor", "pools") or field.name in RESTART_ONLY:
                continue
            before, after = getattr(old, field.name), getattr(fresh, field.name)
            if before != after:
                later = " (at the next `mcpctl resource refresh`)" if field.name in ON_NEXT_DISCOVERY else ""
                changes.append(f"{field.name}: {before} -> {after}{later}")
        if fresh.log_level != old.log_level:
            configure_logging(fresh.log_level)
        if self.server is not None:
            self.server.limits = fresh.limits.fitted(open_file_limit())
            self._keep_cgroup_files(self.server.limits)
        self.config = fresh
        for change in changes:
            log.info("reload: %s", change)
        log.info("reloaded the configuration: %s", f"{len(changes)} change(s)" if changes else "nothing changed")
        return changes

    # -- lifecycle ---------------------------------------------------------

    async def serve(self, stop: asyncio.Event) -> None:
        inherited = inherited_socket()
        if inherited is not None:
            self.socket_path = socket_name(inherited)
            if self.socket_path != self.config.socket:
                log.info("serving the socket systemd passed, %s (not %s)", self.socket_path, self.config.socket)
        try:
            await self._serve(stop, inherited)
        finally:
            if inherited is not None:
                inherited.close()
            self.notifier.close()
        if self.committer is not None and self.committer.broken is not None:
            # Exit non-zero so that a supervisor (systemd's Restart=on-failure) starts it afresh from the database.
            raise RuntimeError(f"stopped because the store failed: {self.committer.broken}")

    async def _serve(self, stop: asyncio.Event, inherited: socket.socket | None) -> None:
        # The order matters: lock the database, then own the socket, and only then open the database. A daemon
        # refused either one leaves the database untouched (no migration, no recovery of another's allocations).
        if self.config.database != ":memory:":
            self._database_dir = prepare_database_directory(self.config.database)
            self.lock = DatabaseLock(self.config.database, self._database_dir)
        inode: int | None = None
        sock: socket.socket | None = inherited
        try:
            if inherited is None:
                sock = bind_unix_socket(self.config.socket, self.config.socket_mode)
                # The path's inode, not the socket fd's (fstat of a socket gives its sockfs inode).
                inode = os.lstat(self.config.socket).st_ino
            assert sock is not None
            await self._serve_on(stop, sock, inode)
        finally:
            if inherited is None and sock is not None:
                sock.close()  # the listener closed it already, unless start-up failed before it listened
            if inode is not None:
                remove_socket(self.config.socket, inode)
            if self.lock is not None:
                self.lock.close()

    async def _serve_on(self, stop: asyncio.Event, sock: socket.socket, inode: int | None) -> None:
        loop = asyncio.get_running_loop()
        self.nvml = self.open_gpus()
        self.enforcer = choose(self.config.enforce.cgroup)
        from mcpresd.enforce import dynmods
        from mcpresd.enforce.cgroup_v1 import CgroupV1
        from mcpresd.enforce.cgroup_v2 import CgroupV2

        if isinstance(self.enforcer, (CgroupV1, CgroupV2)):
            # A host-wide option: only where a task may ever be moved into a cgroup (max_mode off: none is).
            if self.config.enforce.max_mode is EnforceMode.OFF:
                self.enforcer.favordynmods = f"{dynmods.state()[1]}; not changed ([enforce] max_mode = off)"
            elif self.config.enforce.favordynmods:
                self.enforcer.favordynmods = dynmods.ensure()
            else:
                self.enforcer.favordynmods = f"{dynmods.state()[1]}; not changed ([enforce] favordynmods = false)"
            log.info("enforcement: favordynmods %s", self.enforcer.favordynmods)
        log.info("enforcement: %s%s", self.enforcer.name,
                 f" ({self.enforcer.why_not})" if self.enforcer.why_not else f" ({', '.join(self.enforcer.controllers)})")
        limits = self.config.limits.fitted(open_file_limit())
        self._keep_cgroup_files(limits)
        self.watch = HolderWatch(loop, self._holder_exited, max_fds=limits.holder_fds)
        self.committer = committer = GroupCommitter(self._make_broker, self._committed,
                                                    on_broken=lambda error: stop.set())
        self.server = server = Server(Dispatcher(committer.submit, self.discover, committer.call),
                                      on_close=self._connection_closed, limits=limits)
        committer.start(loop)  # opens and recovers the store before anything is served
        ticker = loop.create_task(self._tick(stop))
        sampler = loop.create_task(self._sample(stop))
        if self.config.cluster is not None:
            self.site = ClusterSite(SlurmCluster(self.config.cluster), self.config.cluster, committer.submit,
                                    self.watch.add, self.clock, is_alive, resolve_holder,
                                    connection_open=server.connections.__contains__)
            await self.site.start()
            server.dispatcher.router = self.site
            cluster_poll = loop.create_task(self.site.poll_every(self.config.sample_interval, stop))
        listener = await loop.create_unix_server(server.protocol, sock=sock, backlog=BACKLOG)
        # What start-up made (modules, config, the ledger) lives as long as the daemon: out of the cyclic
        # collector's sight, so its full collections no longer walk it under load.
        gc.freeze()
        background: list[asyncio.Task[None]] = [loop.create_task(self._reload_when_asked(stop))]
        endpoint: MetricsEndpoint | None = None
        if self.site is not None:
            background.append(cluster_poll)
        try:
            if self.config.metrics_listen is not None:
                host, port = self.config.metrics_listen
                endpoint = MetricsEndpoint(self.exposition)
                try:
                    await endpoint.start(host, port)
                except OSError as error:
                    raise StartupConfigError(f"config: [metrics] listen: cannot listen on {host}:{port} "
                                             f"({error.strerror or error}); choose another port") from None
                log.info("metrics: GET http://%s/metrics", f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
            assert committer.broker is not None
            log.info(
                "serving on %s (database %s, %d resources, GPUs: %s)",
                self.socket_path,
                self.config.database,
                len(committer.broker.ledger),
                committer.broker.gpu_source,
            )
            self.started.set()
            if self.notifier.enabled:
                # systemd arms the watchdog once the start-up is over: the first ping is due one interval later.
                self.notifier.ready(await self._status_line(SHUTDOWN_GRACE_S))
                background.append(loop.create_task(self._keep_systemd_informed(stop)))
            await stop.wait()
            log.info("shutting down")
        finally:
            self.notifier.stopping()
            listener.close()
            if endpoint is not None:
                await endpoint.close()
            ticker.cancel()
            for task in background:
                task.cancel()
            if self._wake is not None:
                self._wake.cancel()
            sampler.cancel()
            for factory in list(self._factories):
                factory.cancel()
            for ending in list(self._endings.values()):
                ending.cancel()  # what is left in those cgroups is stopped at the next start
            if self.site is not None:
                await self.site.close()
            await server.close_all(SHUTDOWN_GRACE_S)
            # Closed transports report connection_lost on a later round: let them, so the jobs they submit
            # (a waiting client's request withdrawn) run before the store closes.
            deadline = loop.time() + SHUTDOWN_GRACE_S
            while server.connections and loop.time() < deadline:
                await asyncio.sleep(0.001)
            self.watch.close()
            if inode is not None:
                remove_socket(self.config.socket, inode)
            committer.stop()
            if self.nvml is not None:
                self.nvml.close()
            log.info("stopped")


def integrity_failure(database: str) -> str:
    """What to say, and what to do, when the database fails its start-up check."""
    return (
        f"database {database} failed its integrity check (PRAGMA quick_check); refusing to start on it.\n"
        f"  To restore a copy made with `mcpctl db backup`:\n"
        f"    {restore_recipe(database)}\n"
        f"  Or move the damaged file aside and start afresh (allocations and history are lost):\n"
        f"    mv {database} {database}.corrupt; mv {database}-wal {database}.corrupt-wal;"
        f" rm -f {database}-shm {database}.lock\n"
        f"  Then start mcpresd again."
    )


def opening_failure(database: str, error: Exception, code: int) -> StartupError:
    """One line for a database SQLite could not open or create: the path, the cause, the fix."""
    directory = os.path.dirname(os.path.abspath(database))
    try:
        disk = os.statvfs(directory)
        full = disk.f_bavail * disk.f_frsize < (1 << 20) and code != sqlite3.SQLITE_READONLY
    except OSError:
        full = False
    if code == sqlite3.SQLITE_FULL or (full and code in (sqlite3.SQLITE_IOERR, sqlite3.SQLITE_CANTOPEN)):
        return UnusablePath(f"cannot open the database {database}: the file system holding {directory} is full "
                            f"({error}); free some space there, or choose another --db")
    if code in (sqlite3.SQLITE_READONLY, sqlite3.SQLITE_PERM, sqlite3.SQLITE_CANTOPEN):
        return UnusablePath(f"cannot open the database {database} for writing ({error}); make it, its -wal and "
                            f"-shm and {directory} writable by uid {os.geteuid()} on a read-write file system, "
                            f"or choose another --db")
    if code == sqlite3.SQLITE_IOERR:
        return UnusablePath(f"cannot open the database {database}: the disk reported an I/O error ({error}); "
                            f"check the disk and the system log, or choose another --db")
    if code == sqlite3.SQLITE_BUSY:
        return AlreadyServed(f"cannot open the database {database}: another process holds a lock on it ({error}); "
                             f"stop whatever else opened it")
    return StartupError(f"cannot open the database {database}: {error}")


def write_prometheus(path: str, text: str) -> None:
    """The exposition, for node_exporter's textfile collector: written whole, then renamed into place."""
    temporary = f"{path}.{os.getpid()}.tmp"
    try:
        with open(temporary, "w", encoding="utf-8") as file:
            file.write(text)
        os.replace(temporary, path)
    except OSError as error:
        log.warning("cannot write %s: %s", path, error)


def run(config: Config, load_config: Callable[[], Config] | None = None) -> int:
    """Run the daemon in the foreground until SIGINT or SIGTERM; return the exit status.

    SIGHUP reloads: `load_config` is called again (the same file and command-line options).
    """
    configure_logging(config.log_level)
    log.info("mcpresd %s (pid %d): config %s", __version__, os.getpid(),
             f"{config.config_file} ({config.config_source})" if config.config_file else f"({config.config_source})")
    raise_open_file_limit()

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        daemon = Daemon(config, load_config=load_config)
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        loop.add_signal_handler(signal.SIGHUP, daemon.reload_requested.set)
        await daemon.serve(stop)

    try:
        asyncio.run(main())
    except StartupError as error:
        log.error("%s", error)
        return error.exit_status
    except Exception as error:  # noqa: BLE001 - the one place start-up failures become an exit status
        log.error("%s", error)
        log.debug("details", exc_info=True)
        return EXIT_FAILURE
    return 0
