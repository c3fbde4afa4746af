"""Monitoring benchmark: sampler cost, alert latency, `mcpctl top` cost.

Run:  .venv/bin/python bench/bench_monitor.py [--quick]

Prints:
- the daemon's CPU use (% of one core) while idle with the sampler at 1 s and at 5 s
  (everything the daemon does idle, so an upper bound of the sampler's cost);
- the time from the sample that crosses an alert threshold to the alert notification on a
  subscribed connection (the GPU replay's load arriving), and its worst case (one interval more);
- `mcpctl top --interval 1` CPU use (% of one core) on a pseudo-terminal.
"""

from __future__ import annotations

import argparse
import json
import os
import pty
import select
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_foundation import ROOT, bench_venv, start_daemon, stop_daemon  # noqa: E402


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def idle_cpu(python: str, interval: str, seconds: float) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        proc, _ = start_daemon(Path(tmp), python, f'[monitor]\ninterval = "{interval}"\n')
        try:
            time.sleep(2.0)
            before, started = cpu_seconds(proc.pid), time.monotonic()
            time.sleep(seconds)
            return 100 * (cpu_seconds(proc.pid) - before) / (time.monotonic() - started)
        finally:
            stop_daemon(proc)


def sampler_cpu_per_round(rounds: int) -> float:
    """The sampler alone, in process: CPU seconds per round of reading the host (psutil + replayed NVML, no
    process scan) and recording it (samples, alerts, health) in one committed transaction."""
    import os as _os

    from mcpresd.samplers.host import discover
    from mcpresd.samplers.metrics import HostSampler
    from mcpresd.samplers.nvml import ReplayNvml
    from mcpresd.service import Broker
    from mcpresd.store import Store

    with tempfile.TemporaryDirectory() as tmp:
        store = Store(_os.path.join(tmp, "bench.db"))
        nvml = ReplayNvml(ROOT / "tests" / "fixtures" / "h100-nvml-capture.json")
        broker = Broker(store)
        resources = discover(memory_reserve=0, nvml=nvml)
        with store.transaction():
            broker.reconcile_resources(resources, [])
        sampler = HostSampler(nvml, process_every=1_000_000)
        disks = [(r.name, str(r.labels["mountpoint"])) for r in resources if r.name.startswith("disk:")]
        links = [r.name[4:] for r in resources if r.name.startswith("net:")]
        started = time.process_time()
        for _ in range(rounds):
            readings = sampler.read(disks, links)
            with store.transaction():
                broker.record_samples(readings, {}, {})
        used = time.process_time() - started
        store.close()
    return used / rounds


def alert_latency(python: str, trials: int) -> list[float]:
    """Each trial: a fresh daemon replaying the H100 load; latency = notification received - sample time."""
    config = ('[monitor]\ninterval = "1s"\n[[alerts]]\nname = "gpu-busy"\nmetric = "gpu.utilisation"\n'
              'selector = "gpu"\nwarning = 50\nfor = 0\nkeep_firing_for = 0\n')
    latencies = []
    for _ in range(trials):
        with tempfile.TemporaryDirectory() as tmp:
            proc, sock = start_daemon(Path(tmp), python, config)
            try:
                conn = socket.socket(socket.AF_UNIX)
                conn.connect(sock)
                stream = conn.makefile("rwb")
                stream.write(b'{"jsonrpc":"2.0","id":1,"method":"events.subscribe"}\n')
                stream.flush()
                stream.readline()
                deadline = time.time() + 60
                conn.settimeout(60)
                while time.time() < deadline:
                    message = json.loads(stream.readline())
                    if message.get("method") == "event" and message["params"]["kind"] == "alert.firing":
                        latencies.append(time.time() - message["params"]["ts"])
                        break
                conn.close()
            finally:
                stop_daemon(proc)
    return latencies


def top_cpu(python: str, seconds: float) -> float | None:
    mcpctl = Path(python).parent / "mcpctl"
    with tempfile.TemporaryDirectory() as tmp:
        proc, sock = start_daemon(Path(tmp), python, '[monitor]\ninterval = "1s"\n')
        try:
            check = subprocess.run([str(mcpctl), "top", "--help"], capture_output=True)
            if check.returncode != 0:
                return None
            master, slave = pty.openpty()
            env = dict(os.environ, MCPRES_SOCKET=sock, TERM="xterm-256color", COLUMNS="120", LINES="40")
            top = subprocess.Popen([str(mcpctl), "top", "--interval", "1"], stdin=slave, stdout=slave, stderr=slave,
                                   env=env, close_fds=True)
            os.close(slave)
            try:
                end = time.monotonic() + 3.0
                while time.monotonic() < end:  # let it start, draining the terminal so it never blocks
                    if select.select([master], [], [], 0.1)[0]:
                        os.read(master, 65536)
                before, started = cpu_seconds(top.pid), time.monotonic()
                end = started + seconds
                while time.monotonic() < end:
                    if select.select([master], [], [], 0.1)[0]:
                        os.read(master, 65536)
                return 100 * (cpu_seconds(top.pid) - before) / (time.monotonic() - started)
            finally:
                top.terminate()
                top.wait(10)
                os.close(master)
        finally:
            stop_daemon(proc)


def main() -> None:
    cli = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_argument("--quick", action="store_true")
    cli.add_argument("--venv", default=str(ROOT / "bench" / ".venv"))
    args = cli.parse_args()
    python = str(bench_venv(Path(args.venv)))
    window = 10.0 if args.quick else 30.0
    per_round = sampler_cpu_per_round(100 if args.quick else 300)
    print(f"sampler alone: {per_round * 1000:.2f} ms of CPU per round = {per_round * 100:.2f} % of one core at 1 s, "
          f"{per_round * 20:.3f} % at 5 s")
    for interval in ("1s", "5s"):
        print(f"daemon idle CPU, sampler every {interval}: {idle_cpu(python, interval, window):.2f} % of one core")
    lat = alert_latency(python, 2 if args.quick else 5)
    if lat:
        print(f"threshold-crossing sample -> alert notification: median {statistics.median(lat) * 1000:.1f} ms "
              f"(max {max(lat) * 1000:.1f} ms over {len(lat)} runs; worst case adds one interval, 1 s here)")
    cost = top_cpu(python, window)
    print("mcpctl top --interval 1: " + (f"{cost:.2f} % of one core" if cost is not None else "not available"))


if __name__ == "__main__":
    main()
