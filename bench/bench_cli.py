"""Whole-process `mcpctl allocate`, `mcpctl release` and `mcpctl run`, beside `python -c pass` from the same
interpreter.

Run:  .venv/bin/python bench/bench_cli.py [--runs 30] [--before REF]

Installs this checkout (not editable) into its own virtualenv, as pip does for a user (bytecode compiled
once at install), starts mcpresd on temporary paths with one custom resource, and times, round by round
so that the machine's noisy neighbours weigh on every command alike:
- `python -c pass` (the floor: the interpreter's own start-up, site and .pth files included),
- `mcpctl allocate --res slots=1` (prints the id) and `mcpctl release ID`,
- `mcpctl run --res slots=1 -- true` (allocate, fork, exec, wait, release: what wraps an agent's tool call),
- with --before REF, the same commands from REF (`git archive`), installed into a second virtualenv.
Each figure is the median of --runs whole processes (wall clock, and CPU time from the children's rusage),
with its ratio to the floor; issue 15's target is at most 1.5x. PYTHONDONTWRITEBYTECODE is dropped.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_foundation import ROOT, start_daemon, stop_daemon  # noqa: E402


def install(venv: Path, source: Path) -> Path:
    """A virtualenv at `venv` with `source` installed as a user installs it; its bin directory."""
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", str(source)], check=True)
    else:
        subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--force-reinstall", str(source)],
                       check=True)
    return python.parent


def checkout(ref: str, into: Path) -> Path:
    into.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


class Timings:
    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.wall: dict[str, list[float]] = {}
        self.cpu: dict[str, list[float]] = {}

    def run(self, label: str, argv: list[str]) -> str:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        done = subprocess.run(argv, capture_output=True, text=True, env=self.env, timeout=60)
        elapsed = time.perf_counter() - started
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if done.returncode != 0:
            raise RuntimeError(f"{argv} exited {done.returncode}: {done.stderr}")
        self.wall.setdefault(label, []).append(elapsed * 1000)
        self.cpu.setdefault(label, []).append(
            (after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime) * 1000)
        return done.stdout.strip()

    def report(self, floor: str) -> None:
        base = statistics.median(self.wall[floor])
        for label, times in self.wall.items():
            median = statistics.median(times)
            print(f"{label:<28} {median:6.1f} ms  {median / base:4.2f}x the floor   "
                  f"cpu {statistics.median(self.cpu[label]):5.1f} ms   (median of {len(times)})")


def main() -> None:
    cli = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_argument("--runs", type=int, default=30, help="whole processes per command (default 30)")
    cli.add_argument("--venv", default=str(ROOT / "bench" / ".venv"), help="virtualenv for this checkout")
    cli.add_argument("--before", metavar="REF", help="also time the commands of this git revision, e.g. main")
    args = cli.parse_args()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}

    with tempfile.TemporaryDirectory() as tmp_text:
        tmp = Path(tmp_text)
        installs = {"": install(Path(args.venv), ROOT)}
        if args.before:
            installs[f" ({args.before})"] = install(tmp / "before-venv", checkout(args.before, tmp / "before-src"))
        python = str(installs[""] / "python")
        (tmp / "daemon").mkdir()
        proc, sock = start_daemon(tmp / "daemon", python, '[[resources]]\nname = "slots"\ncapacity = 100000\n')
        env["MCPRES_SOCKET"] = sock
        timings = Timings(env)
        try:
            for round_ in range(args.runs + 2):
                warm = round_ < 2  # the first runs fill the page cache; not counted
                timings.run("python -c pass", [python, "-c", "pass"])
                for suffix, bindir in installs.items():
                    allocation = timings.run(f"mcpctl allocate{suffix}",
                                             [str(bindir / "mcpctl"), "allocate", "--res", "slots=1"])
                    timings.run(f"mcpctl release{suffix}", [str(bindir / "mcpctl"), "release", allocation])
                    timings.run(f"mcpctl run -- true{suffix}",
                                [str(bindir / "mcpctl"), "run", "--res", "slots=1", "--", "true"])
                if warm:
                    timings.wall.clear()
                    timings.cpu.clear()
        finally:
            stop_daemon(proc)
        print(f"python: {python} ({os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end)")
        timings.report("python -c pass")


if __name__ == "__main__":
    main()
