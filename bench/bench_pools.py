"""Pools benchmark: how fast a pool grows past its threshold, and grant latency from a pool of 1,000 members.

Run:  .venv/bin/python bench/bench_pools.py [--quick]

Prints:
- a pool crossing its scale-up threshold -> the new member granted to a waiting request: median, p99 and max
  over N trials, beside the pool tick (scheduler.pool_interval); target: within one tick;
- allocate latency (one client, allocate then release) from a slots pool of 1,000 members, idle and with 990
  busy: p50 and p99; target: p99 <= 2 ms. The same client against a plain resource is the baseline. The
  C client runs 5 rounds of 1,000 calls; each round prints its p99, the CPU steal during it and the disk's
  fdatasync p99 right after it, and the summary quotes the median round. The latencies are measured with the
  database on disk, then on tmpfs (/dev/shm), which leaves out the disk's fsync.
Every loop is bounded in count and time; the daemon runs from the venv of bench_foundation.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_foundation import (  # noqa: E402
    ROOT, StealMeter, bench_venv, build_loadgen, one_client_rounds, sqlite_commit_floor, start_daemon,
    stop_daemon,
)
from bench_scheduler import Conn, percentile  # noqa: E402

POOL_INTERVAL = 1.0
CONFIG = f"""
memory_reserve = "0"

[scheduler]
pool_interval = "{POOL_INTERVAL}s"

[[resources]]
name = "cores"
capacity = 64
unit = "cores"

[[resources]]
name = "cells"
capacity = 1000
unit = "cells"

[[resources]]
name = "plain"
capacity = 1000
unit = "cells"
"""


def ok(reply: dict[str, object]) -> dict[str, object]:
    assert "result" in reply, reply
    result = reply["result"]
    assert isinstance(result, dict)
    return result


def scale_up(sock: str, trials: int) -> list[float]:
    """A 1-member pool, its member taken (100 % > 80 %): time until a waiting request gets the new member."""
    latencies = []
    owner, waiter = Conn(sock), Conn(sock)
    for trial in range(trials):
        name = f"grow{trial}"
        ok(owner.call("pools.create", {"name": name, "factory": "slots", "parent": "cores", "slot_size": 1,
                                       "min": 1, "max": 4, "cooldown": 0}))
        held = ok(owner.call("allocate", {"resources": [{"resource": f"pool:{name}", "amount": 1}]}))
        started = time.perf_counter()
        waiter.file.write(json.dumps({"jsonrpc": "2.0", "id": 1, "method": "allocate", "params": {
            "resources": [{"resource": f"pool:{name}", "amount": 1}], "wait": 30}}).encode() + b"\n")
        waiter.file.flush()
        granted = ok(json.loads(waiter.file.readline()))
        latencies.append(time.perf_counter() - started)
        for allocation in (held, granted):
            ok(owner.call("release", {"id": allocation["id"]}))
        ok(owner.call("pools.delete", {"name": name}))
        time.sleep(random.uniform(0, POOL_INTERVAL))  # cross the threshold at a random point of the pool tick
    owner.close()
    waiter.close()
    return latencies


def latency(sock: str, resource: str, pairs: int) -> list[float]:
    client = Conn(sock)
    times = []
    deadline = time.monotonic() + 120
    for _ in range(pairs):
        if time.monotonic() > deadline:
            break
        started = time.perf_counter()
        granted = ok(client.call("allocate", {"resources": [{"resource": resource, "amount": 1}]}))
        times.append(time.perf_counter() - started)
        ok(client.call("release", {"id": granted["id"]}))
    client.close()
    return times


def main() -> None:
    cli = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_argument("--quick", action="store_true", help="fewer trials (a smoke run)")
    args = cli.parse_args()
    trials, pairs = (5, 300) if args.quick else (30, 3000)
    python = bench_venv(ROOT / "bench" / ".venv")
    with tempfile.TemporaryDirectory() as tmp:
        proc, sock = start_daemon(Path(tmp), str(python), CONFIG)
        try:
            grow = scale_up(sock, trials)
            print(f"pool crossing its threshold -> new member granted ({trials} trials, pool tick "
                  f"{POOL_INTERVAL:g}s): median {statistics.median(grow) * 1000:.0f} ms, "
                  f"p99 {percentile(grow, 0.99) * 1000:.0f} ms, max {max(grow) * 1000:.0f} ms")
            latencies(sock, pairs, "database on disk", build_loadgen(Path(tmp)), Path(tmp), args.quick)
        finally:
            stop_daemon(proc)
        floor_p50, floor_p99 = sqlite_commit_floor(Path(tmp))
        print(f"[database on disk] floor: one-row SQLite WAL/FULL commit, no daemon: p50 {floor_p50:.3f} ms  "
              f"p99 {floor_p99:.3f} ms")
    if Path("/dev/shm").is_dir():
        # The same on tmpfs: what the daemon itself costs, without this disk's fsync latency.
        with tempfile.TemporaryDirectory(dir="/dev/shm") as tmp:
            proc, sock = start_daemon(Path(tmp), str(python), CONFIG)
            try:
                latencies(sock, pairs, "database on tmpfs", build_loadgen(Path(tmp)), Path(tmp), args.quick)
            finally:
                stop_daemon(proc)


def latencies(sock: str, pairs: int, where: str, loadgen: str | None, directory: Path, quick: bool) -> None:
    control = Conn(sock)
    started = time.perf_counter()
    ok(control.call("pools.create", {"name": "big", "factory": "slots", "parent": "cells", "slot_size": 1,
                                     "min": 1000, "max": 1000}))
    print(f"[{where}] creating a 1,000-member slots pool: {(time.perf_counter() - started) * 1000:.0f} ms")
    control.close()
    holder = Conn(sock)
    for label, resource in (("pool of 1,000 members", "pool:big"), ("plain resource (baseline)", "plain"),
                            ("pool of 1,000 members, 990 of them busy", "pool:big")):
        if "busy" in label:
            ok(holder.call("allocate", {"resources": [{"resource": "pool:big", "amount": 990}]}))
        steal = StealMeter()
        times = latency(sock, resource, pairs)
        print(f"[{where}] allocate from a {label}: {len(times)} calls, p50 {statistics.median(times) * 1000:.2f} ms,"
              f" p99 {percentile(times, 0.99) * 1000:.2f} ms  (Python client; cpu steal {steal.percent():.1f} %)")
        if loadgen is not None:
            one_client_rounds(loadgen, sock, resource, f"[{where}] allocate from a {label}", directory,
                              rounds=1 if quick else 5, pairs=300 if quick else 1000)
    holder.close()

if __name__ == "__main__":
    main()
