"""The one place that wires mcpresd together: config -> store -> broker -> server.

Lifecycle: start -> serve until stop -> shut down. Signal handlers only set the
stop event. Shutdown closes the listener, lets requests in flight finish (with
a timeout), stops the store thread after its last commit, and removes the socket.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time
from collections.abc import Callable

from mcpresd.config import Config
from mcpresd.core.model import Resource
from mcpresd.protocol import prometheus_text
from mcpresd.rpc import Dispatcher
from mcpresd.samplers.metrics import HostSampler
from mcpresd.samplers.host import discover
from mcpresd.samplers.nvml import Nvml, ReplayNvml, open_nvml
from mcpresd.server import BACKLOG, Server, StoreThread, bind_unix_socket, remove_socket
from mcpresd.service import Broker, Outbox
from mcpresd.watch import HolderWatch, send_signal
from mcpresd.store import Store

log = logging.getLogger("mcpresd")

SHUTDOWN_GRACE_S = 5.0


def configure_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("mcpresd")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False


class Daemon:
    """mcpresd as a library: `await Daemon(config).serve(stop)` runs it until `stop` is set."""

    def __init__(self, config: Config, *, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.clock = clock
        self.nvml: Nvml | None = None
        self.started = asyncio.Event()
        self.server: Server | None = None
        self.watch: HolderWatch | None = None
        self.store_thread: StoreThread | None = None
        self._disks: list[tuple[str, str]] = []
        self._wake: asyncio.TimerHandle | None = None
        self._links: list[str] = []

    def open_gpus(self) -> Nvml | None:
        if self.config.gpu_replay:
            return ReplayNvml(self.config.gpu_replay)
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

    def _make_broker(self) -> Broker:
        store = Store(self.config.database)
        if not store.integrity_ok():
            raise RuntimeError(
                f"database {self.config.database} failed its integrity check; restore a backup"
                " or move the file aside to start afresh"
            )
        broker = Broker(
            store,
            socket_path=self.config.socket,
            gpu_source=self.nvml.source if self.nvml else "none",
            clock=self.clock,
            policy=self.config.policy,
            monitor=self.config.monitor,
        )
        with store.transaction():
            for change in broker.reconcile_resources(self.discover(), self.config.resources):
                log.info("resources: %s", change)
            for allocation_id in broker.recover():
                log.info("ended %s: its holder went away while the daemon was down", allocation_id)
        return broker

    # -- what the loop does after each commit, and what it reports to the store --

    def _committed(self, outbox: Outbox) -> None:
        assert self.server is not None and self.watch is not None
        self.server.publish(outbox.events)
        for pid, start in outbox.watch:
            self.watch.add(pid, start)
        for pid, start, signum in outbox.signals:
            send_signal(pid, start, signum)
        if outbox.wake_at is not None:
            self._wake_at(outbox.wake_at)

    def _submit_quietly(self, job: Callable[[Broker], object], what: str) -> None:
        assert self.store_thread is not None

        def logged(future: asyncio.Future[object]) -> None:
            if not future.cancelled() and future.exception() is not None:
                log.error("%s failed: %s", what, future.exception())

        self.store_thread.submit(job).add_done_callback(logged)

    def _holder_exited(self, pid: int, start: int | None) -> None:
        self._submit_quietly(lambda broker: broker.holder_exited(pid, start), f"releasing for holder {pid}")

    def _connection_closed(self, connection: int) -> None:
        self._submit_quietly(lambda broker: broker.connection_closed(connection), "closing a connection")

    def _wake_at(self, when: float) -> None:
        """Run the broker's tick at wall-clock time `when` (the earliest deadline it reported), not before."""
        loop = asyncio.get_running_loop()
        due = loop.time() + max(0.0, when - time.time())
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
            except Exception as error:  # noqa: BLE001 - a sampler failure must never stop the daemon
                log.warning("sampling failed: %s", error)
            else:
                processes = dict(sampler.gpu_processes)
                current = {name: dict(values) for name, values in readings.items()}  # the broker adds to readings
                stats = self.server.dispatcher.stats.take()
                self._submit_quietly(lambda broker: broker.record_samples(readings, processes, stats), "sampling")
                if self.config.prometheus_file:
                    await loop.run_in_executor(None, write_prometheus, self.config.prometheus_file, current)
            try:
                await asyncio.wait_for(stop.wait(), self.config.sample_interval)
            except TimeoutError:
                pass

    async def serve(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        self.nvml = self.open_gpus()
        self.watch = HolderWatch(loop, self._holder_exited)
        self.store_thread = store_thread = StoreThread(self._make_broker, self._committed)
        self.server = server = Server(Dispatcher(store_thread.submit, self.discover), on_close=self._connection_closed)
        await loop.run_in_executor(None, store_thread.start, loop)
        ticker = loop.create_task(self._tick(stop))
        sampler = loop.create_task(self._sample(stop))
        sock = bind_unix_socket(self.config.socket, self.config.socket_mode)
        # The path's inode, not the socket fd's (fstat of a socket gives its sockfs inode).
        inode = os.lstat(self.config.socket).st_ino
        listener = await loop.create_unix_server(server.protocol, sock=sock, backlog=BACKLOG)
        try:
            assert store_thread.broker is not None
            log.info(
                "serving on %s (database %s, %d resources, GPUs: %s)",
                self.config.socket,
                self.config.database,
                len(store_thread.broker.ledger),
                store_thread.broker.gpu_source,
            )
            self.started.set()
            await stop.wait()
            log.info("shutting down")
        finally:
            listener.close()
            ticker.cancel()
            if self._wake is not None:
                self._wake.cancel()
            sampler.cancel()
            await server.close_all(SHUTDOWN_GRACE_S)
            self.watch.close()
            remove_socket(self.config.socket, inode)
            await loop.run_in_executor(None, store_thread.stop)
            if self.nvml is not None:
                self.nvml.close()
            log.info("stopped")


def write_prometheus(path: str, readings: dict[str, dict[str, float | str | None]]) -> None:
    """The current values in the Prometheus text format, for node_exporter's textfile collector (atomic)."""
    temporary = f"{path}.{os.getpid()}.tmp"
    try:
        with open(temporary, "w", encoding="utf-8") as file:
            file.write(prometheus_text(readings))
        os.replace(temporary, path)
    except OSError as error:
        log.warning("cannot write %s: %s", path, error)


def run(config: Config) -> int:
    """Run the daemon in the foreground until SIGINT or SIGTERM; return the exit status."""
    configure_logging(config.log_level)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        await Daemon(config).serve(stop)

    try:
        asyncio.run(main())
    except Exception as error:  # noqa: BLE001 - the one place start-up failures become an exit status
        log.error("%s", error)
        log.debug("details", exc_info=True)
        return 1
    return 0
