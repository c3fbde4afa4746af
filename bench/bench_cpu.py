"""CPU cost per request: the figure that stays put when the VM's latency tails do not.

Run:  .venv/bin/python bench/bench_cpu.py [--quick]

Latency percentiles on a shared 2-core VM move with CPU steal and the disk's fsync tail (see the rounds
printed by bench_scheduler.py and bench_pools.py). CPU time spent per request does not, so this is the
number to compare before and after a change to the request path. It prints, as medians of 3 runs:
- in-process: the broker's work for one request (params, the job, its SQL with BEGIN/COMMIT, the reply's
  JSON), allocate and release alternating, on tmpfs, no sockets: process CPU microseconds per request, for
  a plain resource, a slots pool of 1,000 members (idle and with 990 busy) and 100,000 registered resources;
- whole daemon: the daemon's CPU seconds (user and system, from /proc) per request under one client
  (bench/loadgen.c) with its database on tmpfs: the above plus parsing, the event loop and the socket.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench_foundation import ROOT, bench_venv, build_loadgen, load_c, start_daemon, stop_daemon  # noqa: E402

from mcpresd import params as p  # noqa: E402
from mcpresd import rpc  # noqa: E402
from mcpresd.service import Broker, Caller  # noqa: E402
from mcpresd.store import Store  # noqa: E402

ME = Caller(uid=os.getuid(), gid=os.getgid(), pid=os.getpid(), connection=1)
SHM = "/dev/shm" if Path("/dev/shm").is_dir() else None


def broker_with(directory: Path, case: str) -> Broker:
    broker = Broker(Store(directory / "state.db"))
    with broker.store.transaction():
        broker.resources_add(ME, p.add_resource({"name": "cells", "capacity": 1000}))
        broker.resources_add(ME, p.add_resource({"name": "plain", "capacity": 1000}))
        if case.startswith("pool"):
            broker.pools_create(ME, p.create_pool({"name": "big", "factory": "slots", "parent": "cells",
                                                   "slot_size": 1, "min": 1000, "max": 1000}))
        if case == "100k":
            for index in range(100_000):
                broker.resources_add(ME, p.add_resource({"name": f"res-{index}", "capacity": 4}))
    broker.take_outbox()
    if case == "pool-busy":
        with broker.store.transaction():
            broker.allocate(ME, p.allocate({"resources": [{"resource": "pool:big", "amount": 990}]}))
        broker.take_outbox()
    return broker


def in_process(case: str, resource: str, pairs: int) -> float:
    """Median over 3 runs of process CPU microseconds per request (allocate and release alternating)."""
    with tempfile.TemporaryDirectory(dir=SHM) as tmp:
        broker = broker_with(Path(tmp), case)
        store = broker.store
        demand = {"resources": [{"resource": resource, "amount": 1}]}

        def pair() -> None:
            command = p.allocate(demand)
            store.begin()
            granted = broker.allocate(ME, command)
            store.commit()
            broker.take_outbox()
            rpc.encode({"jsonrpc": "2.0", "id": 1, "result": granted})
            release = p.release({"id": granted["id"]})
            store.begin()
            released = broker.release(ME, release)
            store.commit()
            broker.take_outbox()
            rpc.encode({"jsonrpc": "2.0", "id": 2, "result": released})

        for _ in range(pairs // 10):
            pair()
        runs = []
        for _ in range(3):
            started = time.process_time()
            for _ in range(pairs):
                pair()
            runs.append((time.process_time() - started) / (2 * pairs) * 1e6)
        store.close()
        return statistics.median(runs)


def cpu_of(pid: int) -> tuple[float, float]:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def whole_daemon(pairs: int) -> tuple[float, float] | None:
    """Median over 3 runs of the daemon's user and system CPU microseconds per request, one C client."""
    python = str(bench_venv(ROOT / "bench" / ".venv"))
    with tempfile.TemporaryDirectory(dir=SHM) as tmp_text:
        tmp = Path(tmp_text)
        loadgen = build_loadgen(tmp)
        if loadgen is None:
            return None
        proc, sock = start_daemon(tmp, python, '[[resources]]\nname = "slots"\ncapacity = 100000\n')
        try:
            load_c(loadgen, sock, 1, 60.0, pairs // 10)
            users, systems = [], []
            for _ in range(3):
                user, system = cpu_of(proc.pid)
                result = load_c(loadgen, sock, 1, 60.0, pairs)
                user2, system2 = cpu_of(proc.pid)
                requests = 2 * result["pairs"]
                users.append((user2 - user) / requests * 1e6)
                systems.append((system2 - system) / requests * 1e6)
            return statistics.median(users), statistics.median(systems)
        finally:
            stop_daemon(proc)


def main() -> None:
    cli = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_argument("--quick", action="store_true", help="fewer requests (a smoke run)")
    args = cli.parse_args()
    pairs = 300 if args.quick else 3000
    for label, case, resource in (("a plain resource", "plain", "plain"),
                                  ("a slots pool of 1,000 members", "pool", "pool:big"),
                                  ("a slots pool of 1,000 members, 990 busy", "pool-busy", "pool:big"),
                                  ("one of 100,000 registered resources", "100k", "res-99999")):
        print(f"in-process, {label}: {in_process(case, resource, pairs):.0f} us CPU per request "
              f"(broker job, SQL with BEGIN/COMMIT on tmpfs, reply JSON; median of 3 runs of {2 * pairs})", flush=True)
    daemon = whole_daemon(pairs)
    if daemon is not None:
        user, system = daemon
        print(f"whole daemon, a plain resource, one client: {user + system:.0f} us CPU per request "
              f"(user {user:.0f}, system {system:.0f}; database on tmpfs; median of 3 runs of {2 * pairs})")


if __name__ == "__main__":
    main()
