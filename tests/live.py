"""The real daemon (mcpresd.daemon.Daemon) on a real socket, in a thread, driven by a fake clock.

Tests move the clock and run the broker's tick themselves, so rules with time in them (cooldowns, periods,
accrual) are checked exactly and without sleeping.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mcpctl.client import Client, RpcError
from mcpresd.config import load
from mcpresd.daemon import Daemon
from tests.conftest import CONFIG, GPU_CAPTURE

T0 = 1_800_000_000.0  # a Friday, 2027-01-15 08:00 UTC


class FakeClock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class LiveDaemon:
    def __init__(self, tmp: Path, config: str = CONFIG, *, gpu_replay: Path | None = GPU_CAPTURE) -> None:
        path = tmp / "mcpresd.toml"
        path.write_text(config)
        self.socket = str(tmp / "mcpresd.sock")
        self.clock = FakeClock()
        self.config = load(path, socket=self.socket, database=str(tmp / "state.db"),
                           gpu_replay=None if gpu_replay is None else str(gpu_replay))
        self.daemon = Daemon(self.config, clock=self.clock)
        self.loop = asyncio.new_event_loop()
        self._stop: asyncio.Event | None = None
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        asyncio.set_event_loop(self.loop)

        async def main() -> None:
            self._stop = asyncio.Event()
            await self.daemon.serve(self._stop)

        self.loop.run_until_complete(main())

    def start(self) -> LiveDaemon:
        self.thread.start()
        deadline = time.monotonic() + 15
        while not self.daemon.started.is_set():
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the daemon did not start")
            time.sleep(0.01)
        return self

    def close(self) -> None:
        if self._stop is not None and self.thread.is_alive():
            self.loop.call_soon_threadsafe(self._stop.set)
        self.thread.join(15)

    def call(self, method: str, params: dict[str, Any] | None = None) -> Any:
        with Client(self.socket, timeout=10.0) as client:
            return client.call(method, params)

    def error(self, method: str, params: dict[str, Any] | None = None) -> RpcError:
        try:
            self.call(method, params)
        except RpcError as error:
            return error
        raise AssertionError(f"{method} succeeded")

    def on_store(self, job: Any) -> Any:
        """Run `job(broker)` in a store job, inside a transaction, and return its result after the commit."""
        assert self.daemon.committer is not None
        committer = self.daemon.committer

        async def run() -> Any:
            return await committer.submit(job)

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(10)

    def tick(self) -> None:
        self.on_store(lambda broker: broker.tick())

    def advance(self, seconds: float) -> None:
        self.clock.now += seconds
        self.tick()

    def settle(self, timeout: float = 10.0) -> None:
        """Wait until every pool factory command the daemon started has finished and been taken in."""
        deadline = time.monotonic() + timeout
        while self.daemon._factories:
            if time.monotonic() > deadline:
                raise TimeoutError("pool factory commands still running")
            time.sleep(0.01)
        self.on_store(lambda broker: None)


@pytest.fixture
def live(tmp_path: Path) -> Iterator[LiveDaemon]:
    """A started LiveDaemon on the shared test config, closed after the test."""
    daemon = LiveDaemon(tmp_path).start()
    try:
        yield daemon
    finally:
        daemon.close()
