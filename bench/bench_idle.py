"""An idle daemon holding 10,000 pid-held allocations: its CPU, SIGTERM-to-exit and RSS (issue 15, target 1).

Run:  .venv/bin/python bench/bench_idle.py [--allocations 10000] [--holders 100] [--seconds 60] [--runs 3]

Each run starts mcpresd on temporary paths at the default 5 s sampling interval, starts `--holders`
long-lived `sleep` processes and makes `--allocations` allocations held by them (as `mcpctl allocate` from
that many scripts makes them; many allocations share a holder), plus 100 held by this process. It then
leaves the daemon idle `--seconds` and reads its CPU from /proc/PID/stat (utime + stime) over that span,
with the machine's steal time from /proc/stat beside it; then its RSS, then how long it takes from SIGTERM
to exit. It prints each run and the median of the runs.

Figures on this machine (2 shared cores), median of 3:
  main (c6e9ef2):  idle CPU 78.63 % of a core (steal 0.07 %), RSS 50.7 MiB, SIGTERM to exit 41.48 s
  0dd5205:         idle CPU  0.97 % of a core (steal 0.01 %), RSS 48.8 MiB, SIGTERM to exit  0.27 s
  (f74c803, which also sent the broker only changed walked figures: 0.37 and 0.40 % in two runs; dropped in 0dd5205)
  3 runs interleaved with main (89c449e, 0.92 %, RSS 49.7 MiB, SIGTERM 0.32 s):
  8f2cf20:         idle CPU  0.30 % of a core (steal 0.01 %), RSS 49.3 MiB, SIGTERM to exit  0.27 s
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_foundation import rss_mib, start_daemon  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")
CONFIG = """
memory_reserve = "0"

[[resources]]
name = "licence"
capacity = 1000000
unit = "seats"
"""


def cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime, stime


def steal_ticks() -> int:
    fields = Path("/proc/stat").read_text().splitlines()[0].split()
    return int(fields[8]) if len(fields) > 8 else 0


def allocate_all(sock: str, holders: list[int], per_batch: int = 8) -> int:
    """One allocation per holder pid in `holders`, pipelined `per_batch` at a time; the number granted."""
    granted = 0
    with socket.socket(socket.AF_UNIX) as conn:
        conn.connect(sock)
        reader = conn.makefile("rb")
        for start in range(0, len(holders), per_batch):
            batch = holders[start:start + per_batch]
            conn.sendall(b"".join(json.dumps({
                "jsonrpc": "2.0", "id": start + n, "method": "allocate",
                "params": {"resources": [{"resource": "licence", "amount": 1}], "holder_pid": pid}}).encode() + b"\n"
                for n, pid in enumerate(batch)))
            for _ in batch:
                reply = json.loads(reader.readline())
                if "error" in reply:
                    raise RuntimeError(f"allocate: {reply['error']}")
                granted += 1
    return granted


def one_run(allocations: int, holder_count: int, seconds: float) -> dict[str, float]:
    sleeps = [subprocess.Popen(["sleep", "3600"]) for _ in range(holder_count)]
    try:
        with tempfile.TemporaryDirectory() as name:
            tmp = Path(name)
            proc, sock = start_daemon(tmp, sys.executable, CONFIG)
            try:
                holders = [sleeps[n % holder_count].pid for n in range(allocations)] + [os.getpid()] * 100
                began = time.monotonic()
                granted = allocate_all(sock, holders)
                made = time.monotonic() - began
                time.sleep(6)  # one sampling round after the last grant, so the idle span starts settled
                cpu0, steal0, t0 = cpu_ticks(proc.pid), steal_ticks(), time.monotonic()
                time.sleep(seconds)
                cpu1, steal1, t1 = cpu_ticks(proc.pid), steal_ticks(), time.monotonic()
                rss = rss_mib(proc.pid)
                began = time.monotonic()
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(120)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(10)
                exit_s = time.monotonic() - began
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(10)
    finally:
        for sleep in sleeps:
            sleep.kill()
            sleep.wait()
    span = t1 - t0
    return {"granted": granted, "allocate_s": made, "cpu_pct": 100 * (cpu1 - cpu0) / TICK / span,
            "steal_pct": 100 * (steal1 - steal0) / TICK / span / (os.cpu_count() or 1),
            "rss_mib": rss, "sigterm_exit_s": exit_s}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--allocations", type=int, default=10_000)
    parser.add_argument("--holders", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    results = []
    for run in range(args.runs):
        result = one_run(args.allocations, args.holders, args.seconds)
        results.append(result)
        print(f"run {run + 1}: {result['granted']:.0f} held ({args.holders} sleep holders + this process),"
              f" made in {result['allocate_s']:.1f} s; idle CPU {result['cpu_pct']:.2f} % of a core over"
              f" {args.seconds:g} s (steal {result['steal_pct']:.2f} % per core); RSS {result['rss_mib']:.1f} MiB;"
              f" SIGTERM to exit {result['sigterm_exit_s']:.2f} s", flush=True)
    print(f"median of {args.runs}: idle CPU {statistics.median(r['cpu_pct'] for r in results):.2f} % of a core"
          f" (steal {statistics.median(r['steal_pct'] for r in results):.2f} %),"
          f" RSS {statistics.median(r['rss_mib'] for r in results):.1f} MiB,"
          f" SIGTERM to exit {statistics.median(r['sigterm_exit_s'] for r in results):.2f} s")


if __name__ == "__main__":
    main()
