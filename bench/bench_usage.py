"""Heavy reads beside grants: `usage` over many ended allocations, and an allocate sent while it runs.

Run:  .venv/bin/python bench/bench_usage.py [--ended 500000] [--days 30]

It builds a database on temporary paths with `--ended` released allocations spread over the last `--days`
days (inserted in bulk through the store, with charges and measurements as `mcpctl run` leaves them),
starts mcpresd on it and prints:
- where the daemon keeps hourly usage totals: how long migration m004 takes to backfill them from those
  allocations (an upgrade);
- where the daemon prunes: how long one retention step (a tick's batch) takes over that history;
- the latency of one `usage --by tool --since 30d` alone (median of 3);
- the latency of the other reads that could cover the whole history, alone: `daemon.status` (counts by
  state), `allocations.list` at its largest page (1,000; before paging, 100,000) of all allocations and of a
  state none has, `recommend` at its most runs, `events.list` at its largest limit;
- the latency of that `usage` and of an `allocate` sent on another connection just after it, together:
  the allocate's latency is how long a grant waits behind the read.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench_foundation import start_daemon, stop_daemon  # noqa: E402
from mcpresd.core.accounting import Charge  # noqa: E402
from mcpresd.core.model import Allocation, AllocationItem, HolderKind  # noqa: E402
from mcpresd.protocol import AllocationState, Priority  # noqa: E402
from mcpresd.store import Store  # noqa: E402

CONFIG = """
memory_reserve = "0"

[[resources]]
name = "licence"
capacity = 4
unit = "seats"
cost_per_unit_hour = 1.5
"""


def fill(db: Path, ended: int, days: float) -> None:
    store = Store(db)
    now = time.time()
    span = days * 86400
    batch: list[Allocation] = []
    with store.transaction():
        for n in range(ended):
            granted = now - span + span * n / ended
            released = granted + 60 + (n % 17) * 30
            charge = Charge("licence", "custom", 1.0, 1.5, None)
            batch.append(Allocation(
                id=f"{n:016x}", state=AllocationState.RELEASED, items=(AllocationItem("licence", 1.0),),
                priority=Priority.NORMAL, owner_uid=os.getuid(), created_at=granted - 1, tool_id=f"tool{n % 7}",
                holder_kind=HolderKind.NONE, granted_at=granted, released_at=min(released, now),
                release_reason="released", charges=(charge,),
                measured={"cpu_seconds": 30.0, "memory_peak": 1e8}))
            if len(batch) == 10_000:
                end(store, batch)
                batch = []
        end(store, batch)
    store.close()


def end(store: Store, allocations: list[Allocation]) -> None:
    for allocation in allocations:
        store.insert_allocation(allocation)


def as_before_the_hourly_totals(db: Path) -> bool:
    """Take the database back to before migration m004, where it has one: the daemon's start then backfills
    the hourly totals, as an upgrade does. False where there is no such migration (before the change)."""
    store = Store(db)
    try:
        if not store.conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'usage_hours'").fetchone():
            return False
        with store.transaction():
            store.conn.execute("DROP TABLE usage_hours")
            store.conn.execute("DROP TABLE usage_spans")
            store.conn.execute("DROP INDEX allocations_by_grant")
            store.conn.execute("DELETE FROM _sqlite_migrations WHERE name = 'm004_usage_hours'")
        return True
    finally:
        store.close()


def prune_batch(db: Path, days: float) -> None:
    """One retention step (a tick's) over the oldest allocations, beside 100,000 old events, as the daemon runs it."""
    try:
        from mcpresd.retention import Retention, prune
    except ImportError:
        return  # before retention
    store = Store(db)
    try:
        now = time.time()
        with store.transaction():
            for n in range(100_000):
                store.insert_event(now - days * 86400 + n, "bench.old")
        retention = Retention(events_days=1, ended_allocations_days=1)
        times = []
        for _ in range(5):
            began = time.perf_counter()
            with store.transaction():
                events, allocations = prune(store, retention, now)
            times.append(time.perf_counter() - began)
        print(f"one retention step ({events} events, {allocations} ended allocations, committed):"
              f" median {statistics.median(times) * 1000:.1f} ms of 5")
    finally:
        store.close()


def call(sock: str, method: str, params: dict[str, object], into: dict[str, float], start: threading.Event) -> None:
    with socket.socket(socket.AF_UNIX) as conn:
        conn.connect(sock)
        start.wait()
        began = time.perf_counter()
        conn.sendall(json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": params}).encode() + b"\n")
        reply = b""
        while not reply.endswith(b"\n"):
            chunk = conn.recv(1 << 20)
            if not chunk:
                break
            reply += chunk
        into[method] = time.perf_counter() - began
        if b'"error"' in reply:
            print(f"{method}: {reply[:300]!r}", file=sys.stderr)


def together(sock: str) -> dict[str, float]:
    times: dict[str, float] = {}
    usage_go, allocate_go = threading.Event(), threading.Event()
    usage = threading.Thread(target=call, args=(sock, "usage", {"by": "tool", "since": 30 * 86400}, times, usage_go))
    allocate = threading.Thread(target=call, args=(
        sock, "allocate", {"resources": [{"resource": "licence", "amount": 1}], "holder_pid": os.getpid()},
        times, allocate_go))
    usage.start()
    allocate.start()
    usage_go.set()
    time.sleep(0.05)  # the usage request is in before the allocate
    allocate_go.set()
    usage.join(120)
    allocate.join(120)
    return times


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ended", type=int, default=500_000)
    parser.add_argument("--days", type=float, default=30.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        began = time.perf_counter()
        fill(tmp / "bench.db", args.ended, args.days)
        print(f"inserted {args.ended:,} ended allocations over {args.days:g} days in {time.perf_counter() - began:.1f} s")
        if as_before_the_hourly_totals(tmp / "bench.db"):
            began = time.perf_counter()
            subprocess.run([sys.executable, "-m", "mcpresd.store", str(tmp / "bench.db")], check=True)
            print(f"migration m004 (the hours of {args.ended:,} ended allocations summed, as an upgrade does):"
                  f" {time.perf_counter() - began:.1f} s")
        prune_batch(tmp / "bench.db", args.days)
        began = time.perf_counter()
        proc, sock = start_daemon(tmp, sys.executable, CONFIG)
        print(f"daemon answering after {time.perf_counter() - began:.1f} s")
        try:
            alone = []
            for _ in range(3):
                times: dict[str, float] = {}
                go = threading.Event()
                go.set()
                call(sock, "usage", {"by": "tool", "since": 30 * 86400}, times, go)
                alone.append(times["usage"])
            print(f"usage --since 30d alone: median {statistics.median(alone) * 1000:.1f} ms")
            for method, params in [("daemon.status", {}), ("allocations.list", {"state": "all", "limit": 1000}),
                                   ("allocations.list", {"state": "withdrawn", "limit": 1000}),
                                   ("recommend", {"tool_id": "tool0", "runs": 10_000}),
                                   ("events.list", {"limit": 10_000})]:
                times = {}
                go = threading.Event()
                go.set()
                call(sock, method, params, times, go)
                print(f"{method} {json.dumps(params)}: {times[method] * 1000:.1f} ms")
            both = together(sock)
            print(f"together: usage {both.get('usage', float('nan')) * 1000:.1f} ms,"
                  f" allocate sent 50 ms after it {both.get('allocate', float('nan')) * 1000:.1f} ms")
        finally:
            stop_daemon(proc)


if __name__ == "__main__":
    main()
