"""A check on a machine with a real NVIDIA GPU: discovery, sampling and `mcpctl run`, then grant latency.

Run:  python3 bench/gpu_check.py [--replay CAPTURE] [--no-latency]

Made for a short lease of a GPU machine (one run, a few minutes, nothing fetched): it needs only this
checkout and the daemon's dependencies importable by the running interpreter (PYTHONPATH may point at
them). It prints, in order:
- what the driver reports (nvidia-smi -L), and the GPUs mcpresd discovered through NVML (name, UUID,
  memory), from a daemon started on temporary paths with `monitor.interval = 1s`;
- a few sampling rounds of each GPU: utilisation, memory used, temperature, power, from `mcpctl metrics`;
- `mcpctl run --gpu 1 -- <load>`: the command sees CUDA_VISIBLE_DEVICES (the granted GPU's UUID); with
  PyTorch it runs matrix products on that GPU for ~6 s; the sampled utilisation during the run, the
  allocation's events (allocated, released) and that nothing is held after it;
- `mcpctl run --gpu 1 -- sh -c 'kill -9 $$'`: a command killed by SIGKILL; its allocation is released;
- unless --no-latency: one client's allocate latency (5 rounds of 1,000, bench/loadgen.c) from a plain
  resource, a slots pool of 1,000 members and one of 100,000 registered resources, with the database on
  this machine's disk, and each round's disk fdatasync p99.
Every step has a timeout; a step that fails says so and the check goes on. Exits 1 if any step failed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

FAILED: list[str] = []

LOAD = r"""
import os, sys, time
print("  in the command: CUDA_VISIBLE_DEVICES=" + os.environ.get("CUDA_VISIBLE_DEVICES", "(unset)")
      + " MCPRES_ALLOCATION_ID=" + os.environ.get("MCPRES_ALLOCATION_ID", "(unset)"), flush=True)
try:
    import torch
except ImportError:
    print("  no PyTorch here: sleeping 6 s instead of loading the GPU", flush=True)
    time.sleep(6)
    sys.exit(0)
print(f"  torch sees {torch.cuda.device_count()} device(s): {torch.cuda.get_device_name(0)}", flush=True)
x = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
end = time.time() + 6
n = 0
while time.time() < end:
    y = x @ x
    torch.cuda.synchronize()
    n += 1
print(f"  {n} bf16 8192x8192 matrix products in 6 s", flush=True)
"""


def step(title: str) -> None:
    print(f"\n== {title}", flush=True)


def fail(what: str) -> None:
    FAILED.append(what)
    print(f"  FAILED: {what}", flush=True)


def mcpctl(sock: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MCPRES_SOCKET": sock}
    return subprocess.run([sys.executable, "-m", "mcpctl", *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


def as_json(done: subprocess.CompletedProcess[str]) -> Any:
    if done.returncode != 0:
        raise RuntimeError(f"exit {done.returncode}: {done.stderr.strip()[:500]}")
    return json.loads(done.stdout)


def start(tmp: Path, config: str, replay: str | None) -> tuple[subprocess.Popen[bytes], str]:
    from bench_foundation import start_daemon

    return start_daemon(tmp, sys.executable, config, Path(replay) if replay else None)


def stop(proc: subprocess.Popen[bytes]) -> None:
    from bench_foundation import stop_daemon

    stop_daemon(proc)
    if proc.returncode != 0:
        fail(f"mcpresd exited with {proc.returncode} after SIGTERM (0 expected)")


def gpu_metrics(sock: str, gpu: str) -> dict[str, Any]:
    """`mcpctl metrics GPU --json`: its utilisation history, with `metrics`, the names of all it has."""
    return dict(as_json(mcpctl(sock, "metrics", gpu, "--json")))


def check_gpu(replay: str | None) -> None:
    step("driver")
    if shutil.which("nvidia-smi"):
        print(subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout.rstrip())
    else:
        print("  no nvidia-smi on PATH")
    with tempfile.TemporaryDirectory() as tmp_text:
        tmp = Path(tmp_text)
        proc, sock = start(tmp, '[monitor]\ninterval = "1s"\n', replay)
        try:
            step("GPUs discovered through NVML (mcpctl resources --type gpu --json)")
            gpus = as_json(mcpctl(sock, "resources", "--type", "gpu", "--json"))
            for gpu in gpus:
                print(f"  {gpu['name']}: uuid {gpu['uuid']}  capacity {gpu['capacity']} {gpu['unit']}  "
                      f"labels {json.dumps(gpu.get('labels', {}))}")
            if not gpus:
                fail("no GPU discovered")
                return
            first = gpus[0]["name"]

            step(f"sampling {first}: three rounds, one a second (mcpctl metrics {first} --metric M --json)")
            time.sleep(3.5)
            for metric in gpu_metrics(sock, first).get("metrics", []):
                points = as_json(mcpctl(sock, "metrics", first, "--metric", metric, "--since", "1m", "--json"))
                values = [p["value"] if p["status"] == "ok" else p["status"] for p in points.get("points", [])]
                print(f"  {metric}: {values[-4:]}")

            step(f"mcpctl run --gpu 1 -- python3 -c <matrix products on the granted GPU>")
            started = time.time()
            done = mcpctl(sock, "run", "--gpu", "1", "--tool", "gpu-check", "--", sys.executable, "-c", LOAD,
                          timeout=180)
            print(done.stdout.rstrip())
            if done.returncode != 0:
                fail(f"mcpctl run exited {done.returncode}: {done.stderr.strip()[:500]}")
            time.sleep(1.5)
            history = as_json(mcpctl(sock, "metrics", first, "--metric", "utilisation", "--since", "2m", "--json"))
            during = [p["value"] for p in history.get("points", []) if p["ts"] >= started and p["status"] == "ok"]
            print(f"  {first} utilisation sampled during and after the run: {during}")
            active = as_json(mcpctl(sock, "allocations", "--json"))
            print(f"  allocations still active after the run: {len(active)}")
            if active:
                fail("an allocation is still active after mcpctl run returned")
            events = as_json(mcpctl(sock, "events", "--json", "--limit", "20"))
            mine = [e for e in events if e.get("ts", 0) >= started - 1 and e.get("allocation_id")]
            print("  its events: " + ", ".join(f"{e['kind']}" for e in mine))

            step("mcpctl run --gpu 1 -- sh -c 'kill -9 $$' (the command killed by SIGKILL)")
            done = mcpctl(sock, "run", "--gpu", "1", "--", "sh", "-c", "kill -9 $$", timeout=60)
            print(f"  exit {done.returncode} (128+9 expected)")
            if done.returncode != 137:
                fail(f"a SIGKILLed command gave exit {done.returncode}")
            time.sleep(0.3)
            active = as_json(mcpctl(sock, "allocations", "--json"))
            print(f"  allocations still active: {len(active)}")
            if active:
                fail("the SIGKILLed command's allocation is still active")
            usage = mcpctl(sock, "usage", "--by", "tool")
            print(usage.stdout.rstrip()[:1500])
        finally:
            stop(proc)


def check_latency() -> None:
    from bench_foundation import build_loadgen, one_client_rounds
    from bench_scheduler import Conn, register

    config = ('memory_reserve = "0"\n[[resources]]\nname = "cells"\ncapacity = 1000\nunit = "cells"\n'
              '[[resources]]\nname = "plain"\ncapacity = 1000\nunit = "cells"\n')
    with tempfile.TemporaryDirectory(dir=os.environ.get("GPU_CHECK_DIR")) as tmp_text:
        tmp = Path(tmp_text)
        loadgen = build_loadgen(tmp)
        if loadgen is None:
            fail("no C compiler for bench/loadgen.c: latency not measured")
            return
        step(f"one client's allocate latency, database in {tmp} ({os.cpu_count()} CPUs)")
        proc, sock = start(tmp, config, None)
        try:
            control = Conn(sock)
            created = control.call("pools.create", {"name": "big", "factory": "slots", "parent": "cells",
                                                    "slot_size": 1, "min": 1000, "max": 1000})
            if "result" not in created:
                fail(f"pools.create: {created}")
            control.close()
            one_client_rounds(loadgen, sock, "plain", "plain resource", tmp)
            one_client_rounds(loadgen, sock, "pool:big", "pool of 1,000 members", tmp)
            seconds = register(sock, 100_000)
            print(f"  registered 100,000 custom resources in {seconds:.1f} s", flush=True)
            time.sleep(2)
            one_client_rounds(loadgen, sock, "res-99999", "100,000 custom resources", tmp)
        finally:
            stop(proc)


def main() -> None:
    cli = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_argument("--replay", help="an NVML capture to replay instead of the real driver (a dry run)")
    cli.add_argument("--no-latency", action="store_true", help="skip the latency rounds")
    args = cli.parse_args()
    print(f"python {sys.version.split()[0]} at {sys.executable}; {os.cpu_count()} CPUs", flush=True)
    for name, run in (("GPU", lambda: check_gpu(args.replay)),
                      ("latency", None if args.no_latency else check_latency)):
        if run is None:
            continue
        try:
            run()
        except Exception as error:  # noqa: BLE001 - report and go on to the next step
            fail(f"{name} check: {type(error).__name__}: {error}")
    print(f"\n{'all steps passed' if not FAILED else 'FAILED: ' + '; '.join(FAILED)}")
    sys.exit(1 if FAILED else 0)


if __name__ == "__main__":
    main()
