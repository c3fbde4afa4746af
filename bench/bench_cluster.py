"""The cluster site's overhead: mcpres's commands against Slurm's own, in the same run, on the same cluster.

Run:  .venv/bin/python bench/bench_cluster.py [N]      (N rounds, default 20; needs the ../shared/slurm harness)

Prints the median and p90 wall time (whole processes, as a shell script sees them) of:
- `mcpctl allocate --cluster --cpu 1` + `mcpctl release ID`  vs  `salloc --no-shell` + `scancel ID`;
- `mcpctl run --cluster --cpu 1 -- true`                       vs  `srun -n1 true`.
Rounds alternate the two sides so that a slow spell of the shared VM falls on both. The target (issue 17):
mcpres's median at most 1.2x the direct commands' plus 10 ms. For scale it also prints what the same mcpctl
commands cost on a host resource (the CLI's own start-up and the daemon's round trip, no Slurm), and the
daemon's part alone: allocate + release as two RPCs on one open connection.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from mcpctl.client import Client  # noqa: E402
from tests.slurm import NS, skip_unless_slurm  # noqa: E402

BIN = Path(sys.executable).parent
MCPCTL = str(BIN / "mcpctl")


def timed(argv: list[str], env: dict[str, str]) -> tuple[float, str]:
    started = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} exited {done.returncode}: {done.stderr}")
    return elapsed, done.stdout + done.stderr


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 20
    try:
        skip_unless_slurm()
    except BaseException as error:  # pytest's Skipped: not an Exception
        raise SystemExit(f"no Slurm harness: {error}") from None
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "mcpresd.toml"
        config.write_text(f'memory_reserve = "0"\n[[resources]]\nname = "licence"\ncapacity = 2\n'
                          f'[cluster]\ncommand = ["{NS}"]\ntime_limit = "10m"\n')
        socket_path = str(Path(tmp) / "mcpresd.sock")
        env = dict(os.environ, MCPRES_SOCKET=socket_path)
        daemon = subprocess.Popen([str(BIN / "mcpresd"), "--config", str(config), "--socket", socket_path, "--db",
                                   str(Path(tmp) / "db")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 30
            while subprocess.run([MCPCTL, "status"], env=env, capture_output=True).returncode != 0:
                if time.monotonic() > deadline:
                    raise SystemExit("mcpresd did not start")
                time.sleep(0.1)
            figures: dict[str, list[float]] = {name: [] for name in
                                               ("mcpctl allocate+release", "salloc+scancel", "mcpctl run -- true",
                                                "srun -n1 true", "host: mcpctl allocate+release",
                                                "host: mcpctl run -- true", "RPC allocate+release")}
            client = Client(socket_path, timeout=60)
            client.__enter__()
            for _ in range(rounds):
                elapsed, out = timed([MCPCTL, "allocate", "--cluster", "--cpu", "1"], env)
                more, _ = timed([MCPCTL, "release", out.strip()], env)
                figures["mcpctl allocate+release"].append(elapsed + more)
                elapsed, out = timed([NS, "salloc", "--no-shell", "-J", "bench-direct", "-n1", "--time=10"], env)
                job = out.strip().split()[-1]
                more, _ = timed([NS, "scancel", job], env)
                figures["salloc+scancel"].append(elapsed + more)
                figures["mcpctl run -- true"].append(timed([MCPCTL, "run", "--cluster", "--cpu", "1", "--", "true"],
                                                           env)[0])
                figures["srun -n1 true"].append(timed([NS, "srun", "-n1", "--time=10", "true"], env)[0])
                elapsed, out = timed([MCPCTL, "allocate", "--res", "licence=1"], env)
                more, _ = timed([MCPCTL, "release", out.strip()], env)
                figures["host: mcpctl allocate+release"].append(elapsed + more)
                figures["host: mcpctl run -- true"].append(timed([MCPCTL, "run", "--res", "licence=1", "--", "true"],
                                                                 env)[0])
                started = time.perf_counter()
                allocation = client.call("allocate", {"resources": [{"resource": "cpu", "amount": 1}],
                                                      "site": "cluster", "holder_pid": os.getpid()})
                client.call("release", {"id": allocation["id"]})
                figures["RPC allocate+release"].append(time.perf_counter() - started)
        finally:
            daemon.terminate()
            daemon.wait(30)
    print(f"{rounds} rounds, whole processes (ms): median / p90")
    medians = {}
    for name, values in figures.items():
        values.sort()
        medians[name] = statistics.median(values) * 1000
        print(f"  {name:26s} {medians[name]:8.1f} / {values[int(0.9 * (len(values) - 1))] * 1000:8.1f}")
    for ours, theirs in (("mcpctl allocate+release", "salloc+scancel"), ("mcpctl run -- true", "srun -n1 true"),
                         ("RPC allocate+release", "salloc+scancel")):
        target = 1.2 * medians[theirs] + 10
        print(f"  {ours}: {medians[ours] / medians[theirs]:.2f}x {theirs}; target <= {target:.1f} ms: "
              f"{'met' if medians[ours] <= target else 'NOT met'}")


if __name__ == "__main__":
    main()
