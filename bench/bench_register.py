"""Registering many custom resources through a real daemon, then the first allocation after it.

Run:  .venv/bin/python bench/bench_register.py [--count 100000] [--runs 3] [--one-by-one [--batch 1000]]

Starts mcpresd on temporary paths (a database on the same disk as the temporary directory) and, on one
connection, registers --count resources `res-0`, `res-1`, ... with `resources.add` requests that each carry
a list of 10,000 (protocol.MAX_ADD), one after the other; or, with --one-by-one, with JSON-RPC batches of
--batch requests that each add one (the most a batch may hold is 1000), waiting for each batch's replies
before the next. Then it times the first `allocate` of one unit of the last resource, and of the first, on a fresh
connection (what a `mcpctl allocate` pays), and the daemon's RSS. Issue 15's target: 100,000 in at most
2 s, the first allocation after it in at most 10 ms. Each of --runs starts a fresh daemon; medians and
ranges are printed, with the machine's load.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_foundation import ROOT, rss_mib, start_daemon, stop_daemon  # noqa: E402

sys.path.insert(0, str(ROOT))
from mcpresd.protocol import MAX_ADD  # noqa: E402


def call(stream: object, message: object) -> object:
    stream.write(json.dumps(message).encode() + b"\n")  # type: ignore[attr-defined]
    stream.flush()  # type: ignore[attr-defined]
    return json.loads(stream.readline())  # type: ignore[attr-defined]


def register(sock: str, count: int, batch: int, one_by_one: bool) -> float:
    started = time.perf_counter()
    with socket.socket(socket.AF_UNIX) as conn:
        conn.connect(sock)
        stream = conn.makefile("rwb")
        for first in range(0, count if not one_by_one else 0, MAX_ADD):
            reply = call(stream, {"jsonrpc": "2.0", "id": first, "method": "resources.add", "params": {
                "resources": [{"name": f"res-{index}", "capacity": 4}
                              for index in range(first, min(first + MAX_ADD, count))]}})
            assert isinstance(reply, dict) and "result" in reply, str(reply)[:300]
        for first in range(0, count if one_by_one else 0, batch):
            requests = [{"jsonrpc": "2.0", "id": index, "method": "resources.add",
                         "params": {"name": f"res-{index}", "capacity": 4}}
                        for index in range(first, min(first + batch, count))]
            replies = call(stream, requests)
            assert isinstance(replies, list) and len(replies) == len(requests), str(replies)[:300]
            assert all("result" in reply for reply in replies), [r for r in replies if "result" not in r][:1]
    return time.perf_counter() - started


def cpu_seconds(pid: int) -> float:
    """The daemon's CPU time so far (user + system): on a loaded machine, what it cost apart from waiting."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def first_allocation(sock: str, resource: str) -> float:
    started = time.perf_counter()
    with socket.socket(socket.AF_UNIX) as conn:
        conn.connect(sock)
        reply = call(conn.makefile("rwb"), {"jsonrpc": "2.0", "id": 1, "method": "allocate", "params": {
            "resources": [{"resource": resource, "amount": 1}]}})
    elapsed = time.perf_counter() - started
    assert isinstance(reply, dict) and "result" in reply, reply
    return elapsed


def main() -> None:
    cli = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_argument("--count", type=int, default=100_000)
    cli.add_argument("--batch", type=int, default=1000, help="with --one-by-one: requests per JSON-RPC batch")
    cli.add_argument("--one-by-one", action="store_true", help="one resource per resources.add request")
    cli.add_argument("--runs", type=int, default=3)
    args = cli.parse_args()
    figures: dict[str, list[float]] = {"register": [], "register, daemon CPU": [], "first allocate (last added)": [],
                                       "first allocate (first added)": [], "rss": []}
    for _ in range(args.runs):
        with tempfile.TemporaryDirectory() as tmp_text:
            proc, sock = start_daemon(Path(tmp_text), sys.executable, gpu_replay=None)
            try:
                cpu_before = cpu_seconds(proc.pid)
                figures["register"].append(register(sock, args.count, args.batch, args.one_by_one))
                figures["register, daemon CPU"].append(cpu_seconds(proc.pid) - cpu_before)
                figures["first allocate (last added)"].append(first_allocation(sock, f"res-{args.count - 1}"))
                figures["first allocate (first added)"].append(first_allocation(sock, "res-0"))
                figures["rss"].append(rss_mib(proc.pid))
            finally:
                stop_daemon(proc)
    how = f"one by one in JSON-RPC batches of {args.batch}" if args.one_by_one else f"in lists of {MAX_ADD}"
    print(f"{args.count} resources added {how}, one connection, {args.runs} fresh daemons "
          f"({os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end):")
    for label, values in figures.items():
        unit, scale = ("MiB", 1) if label == "rss" else ("ms", 1000)
        print(f"  {label:<30} median {statistics.median(values) * scale:9.1f} {unit}  "
              f"(range {min(values) * scale:.1f}-{max(values) * scale:.1f})")


if __name__ == "__main__":
    main()
