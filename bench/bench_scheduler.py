"""Scheduler benchmark: reclaim latency, big registries, many connections, contention.

Run:  .venv/bin/python bench/bench_scheduler.py [--quick]

Prints:
- holder SIGKILLed -> a queued waiter granted: median and p99 over 100 trials;
- grant latency (allocate+release round trips, one client) with 100,000 custom resources; target p99 <= 2 ms.
  The C client runs 5 rounds of 1,000 calls, each printed with its CPU steal and the disk's fdatasync p99
  measured right after it; the summary quotes the median round;
- 1,000 open idle connections held while one more client allocates and releases: its p50/p99;
- 200 clients contending for 10 slots (each holds its slot ~5 ms): grants/s and fairness
  (max wait / median wait), and the decision cache's hit rate.
Every loop is bounded in count and time; the daemon runs from the venv of bench_foundation.
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
from bench_foundation import (  # noqa: E402
    ROOT, StealMeter, bench_venv, build_loadgen, one_client_rounds, sqlite_commit_floor, start_daemon,
    stop_daemon,
)
from bench_monitor import cpu_seconds  # noqa: E402


class Conn:
    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(path)
        self.file = self.sock.makefile("rwb")
        self.next_id = 0

    def call(self, method: str, params: dict[str, object] | None = None) -> dict[str, object]:
        self.next_id += 1
        message: dict[str, object] = {"jsonrpc": "2.0", "id": self.next_id, "method": method}
        if params is not None:
            message["params"] = params
        self.file.write(json.dumps(message).encode() + b"\n")
        self.file.flush()
        reply: dict[str, object] = json.loads(self.file.readline())
        return reply

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * p))]


def reclaim(sock: str, trials: int) -> list[float]:
    """SIGKILL a holder of the only `one` slot while a request waits; time until that waiter's reply."""
    latencies = []
    waiter = Conn(sock)
    owner = Conn(sock)
    for _ in range(trials):
        holder = subprocess.Popen(["sleep", "60"])
        reply = owner.call("allocate", {"resources": [{"resource": "one", "amount": 1}], "holder_pid": holder.pid})
        assert "result" in reply, reply
        waiter.file.write(json.dumps({"jsonrpc": "2.0", "id": 1, "method": "allocate", "params": {
            "resources": [{"resource": "one", "amount": 1}], "wait": 30}}).encode() + b"\n")
        waiter.file.flush()
        time.sleep(0.02)  # let the request reach the queue
        started = time.perf_counter()
        holder.kill()
        granted = json.loads(waiter.file.readline())
        latencies.append(time.perf_counter() - started)
        holder.wait()
        assert "result" in granted, granted
        result = granted["result"]
        assert isinstance(result, dict)
        assert owner.call("release", {"id": result["id"]}).get("result"), "release failed"
    waiter.close()
    owner.close()
    return latencies


def grant_latency(sock: str, rounds: int, resource: str) -> list[float]:
    conn = Conn(sock)
    latencies = []
    for _ in range(rounds):
        started = time.perf_counter()
        reply = conn.call("allocate", {"resources": [{"resource": resource, "amount": 1}], "holder_pid": os.getpid()})
        latencies.append(time.perf_counter() - started)
        result = reply["result"]
        assert isinstance(result, dict)
        conn.call("release", {"id": result["id"]})
    conn.close()
    return latencies


def register(sock: str, count: int) -> float:
    started = time.perf_counter()
    conn = Conn(sock)
    batch = []
    for index in range(count):
        batch.append({"jsonrpc": "2.0", "id": index, "method": "resources.add",
                      "params": {"name": f"res-{index}", "capacity": 4}})
        if len(batch) == 1000 or index == count - 1:
            conn.file.write(json.dumps(batch).encode() + b"\n")
            conn.file.flush()
            replies = json.loads(conn.file.readline())
            assert all("result" in r for r in replies), replies[:1]
            batch = []
    conn.close()
    return time.perf_counter() - started


def contention(sock: str, clients: int, seconds: float, hold_s: float) -> dict[str, float]:
    waits: list[float] = []
    grants = [0]
    lock = threading.Lock()
    until = time.perf_counter() + seconds

    def client() -> None:
        conn = Conn(sock)
        try:
            while time.perf_counter() < until:
                started = time.perf_counter()
                reply = conn.call("allocate", {"resources": [{"resource": "slots10", "amount": 1}],
                                               "holder_pid": os.getpid(), "wait": 60})
                waited = time.perf_counter() - started
                result = reply.get("result")
                if not isinstance(result, dict):
                    continue
                time.sleep(hold_s)
                conn.call("release", {"id": result["id"]})
                with lock:
                    waits.append(waited)
                    grants[0] += 1
        finally:
            conn.close()

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(seconds + 70)
    median = statistics.median(waits)
    return {"grants_per_s": grants[0] / seconds, "median_wait_ms": median * 1000, "max_wait_ms": max(waits) * 1000,
            "fairness": max(waits) / median if median else float("inf")}


def main() -> None:
    cli = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_argument("--quick", action="store_true", help="fewer trials (CI smoke)")
    cli.add_argument("--venv", default=str(ROOT / "bench" / ".venv"))
    args = cli.parse_args()
    python = str(bench_venv(Path(args.venv)))
    trials = 20 if args.quick else 100
    config = ('[[resources]]\nname = "one"\ncapacity = 1\n[[resources]]\nname = "slots10"\ncapacity = 10\n'
              '[[resources]]\nname = "slots"\ncapacity = 1000000\n[scheduler]\ntick_interval = "100ms"\n')
    with tempfile.TemporaryDirectory() as tmp_text:
        tmp = Path(tmp_text)
        proc, sock = start_daemon(tmp, python, config)
        try:
            lat = reclaim(sock, trials)
            print(f"holder SIGKILLed -> waiter granted ({trials} trials): median {statistics.median(lat) * 1000:.1f} ms"
                  f"  p99 {percentile(lat, 0.99) * 1000:.1f} ms")
            idle = []
            for _ in range(1000):
                conn = socket.socket(socket.AF_UNIX)
                conn.connect(sock)
                idle.append(conn)
            time.sleep(0.5)
            steal = StealMeter()
            lat = grant_latency(sock, 1000 if not args.quick else 200, "slots")
            print(f"1,000 idle connections open, one more client: allocate p50 {statistics.median(lat) * 1000:.2f} ms"
                  f"  p99 {percentile(lat, 0.99) * 1000:.2f} ms  (cpu steal {steal.percent():.1f} %)")
            for conn in idle:
                conn.close()
            result = contention(sock, 200, 5.0 if not args.quick else 2.0, 0.005)
            print(f"200 clients, 10 slots, 5 ms holds: {result['grants_per_s']:.0f} grants/s  median wait "
                  f"{result['median_wait_ms']:.1f} ms  max wait {result['max_wait_ms']:.1f} ms  "
                  f"fairness (max/median) {result['fairness']:.1f}")
            status = Conn(sock).call("daemon.status")["result"]
            assert isinstance(status, dict)
            cache = status["decision_cache"]
            total = cache["hits"] + cache["misses"]
            print(f"decision cache: {cache['hits']} hits of {total} plans ({100 * cache['hits'] / max(1, total):.1f} %)")
        finally:
            stop_daemon(proc)
        (tmp / "big").mkdir()
        proc, sock = start_daemon(tmp / "big", python, config)
        try:
            elapsed = register(sock, 100_000)
            steal = StealMeter()
            lat = grant_latency(sock, 1000 if not args.quick else 200, "res-99999")
            print(f"100,000 custom resources (registered in {elapsed:.1f} s): allocate p50 "
                  f"{statistics.median(lat) * 1000:.2f} ms  p99 {percentile(lat, 0.99) * 1000:.2f} ms  (Python client;"
                  f" cpu steal {steal.percent():.1f} %)")
            time.sleep(2.0)  # let a sampling round or two pass: the registration changed every resource
            before, started = cpu_seconds(proc.pid), time.perf_counter()
            time.sleep(5.0)
            idle = 100 * (cpu_seconds(proc.pid) - before) / (time.perf_counter() - started)
            print(f"100,000 custom resources: daemon CPU while idle (sampling every second): {idle:.1f} % of a core")
            loadgen = build_loadgen(tmp)
            if loadgen is not None:
                one_client_rounds(loadgen, sock, "res-99999", "100,000 custom resources", tmp / "big",
                                  rounds=5 if not args.quick else 1, pairs=1000 if not args.quick else 200)
        finally:
            stop_daemon(proc)
        floor_p50, floor_p99 = sqlite_commit_floor(tmp)
        print(f"floor: one-row SQLite WAL/FULL commit in the same directory, no daemon: p50 {floor_p50:.3f} ms  "
              f"p99 {floor_p99:.3f} ms")


if __name__ == "__main__":
    main()
