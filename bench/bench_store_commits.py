"""Store-level allocate+release pairs: the store's own CPU and COMMIT latency, without the daemon around it.

Run:  .venv/bin/python bench/bench_store_commits.py [--pairs 5000] [--rounds 3] [--sync-off] [TREE ...]

Each pair is two transactions, as the group committer runs them at one client: insert an active allocation
(with its item), then end it (its usage summed in memory, the row updated); the usage is flushed every 100
pairs, as the broker's tick does. For each TREE (a checkout of this repository; default: this one), in turns,
`--rounds` times, it prints the process's CPU per pair (every thread), the calling thread's, and COMMIT wall
time p50/p99/max with the counts over 1 and 3 ms. Several trees in one run give an A/B on the same disk at the
same time: on a shared machine, compare only figures from the same run. `--sync-off` sets synchronous=OFF to
see the CPU without the fsyncs (never the daemon's setting).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def one_run(pairs: int, sync_off: bool) -> str:
    from mcpresd.core.accounting import UsageRecord
    from mcpresd.core.model import Allocation, AllocationItem, HolderKind
    from mcpresd.protocol import AllocationState, Priority
    from mcpresd.store import Store

    with tempfile.TemporaryDirectory() as tmp:
        store = Store(os.path.join(tmp, "state.db"))
        if sync_off:
            store.conn.execute("PRAGMA synchronous=OFF")
        commits: list[float] = []
        cpu, thread = time.process_time(), time.thread_time()
        for n in range(pairs):
            granted = 1.7e9 + n
            active = Allocation(id=f"bench{n:012x}", state=AllocationState.ACTIVE,
                                items=(AllocationItem("slots", 1.0),), priority=Priority.NORMAL,
                                owner_uid=os.getuid(), created_at=granted, holder_kind=HolderKind.NONE,
                                granted_at=granted, tool_id="bench")
            ended = active.ended(AllocationState.RELEASED, granted + 1.0, "released")
            store.begin()
            store.insert_allocation(active)
            started = time.perf_counter()
            store.commit()
            commits.append(time.perf_counter() - started)
            store.begin()
            store.end_usage(UsageRecord(ended.id, ended.tool_id, ended.owner_uid, ended.created_at,
                                        ended.granted_at, ended.released_at, ended.charges, {}))
            store.mark_ended(ended)
            started = time.perf_counter()
            store.commit()
            commits.append(time.perf_counter() - started)
            if n % 100 == 99:
                store.flush_usage()
        cpu, thread = time.process_time() - cpu, time.thread_time() - thread
        store.close()
    commits.sort()
    return (f"cpu per pair {cpu / pairs * 1e6:6.1f} us (calling thread {thread / pairs * 1e6:6.1f} us)  "
            f"commit p50 {commits[len(commits) // 2] * 1e3:.3f} ms  p99 {commits[int(len(commits) * 0.99)] * 1e3:.3f}"
            f" ms  max {commits[-1] * 1e3:.2f} ms  over 1 ms {sum(c > 1e-3 for c in commits)}  over 3 ms "
            f"{sum(c > 3e-3 for c in commits)}")


def main() -> None:
    cli = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_argument("trees", nargs="*", type=lambda tree: str(Path(tree).resolve()), default=[str(ROOT)],
                     help="checkouts to compare (default: this one)")
    cli.add_argument("--pairs", type=int, default=5000)
    cli.add_argument("--rounds", type=int, default=3)
    cli.add_argument("--sync-off", action="store_true", help="synchronous=OFF: the CPU without the fsyncs")
    cli.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = cli.parse_args()
    if args.one:
        import mcpresd

        assert Path(mcpresd.__file__).resolve().parent.parent == Path(os.environ["PYTHONPATH"]), mcpresd.__file__
        print(one_run(args.pairs, args.sync_off))
        return
    for round_ in range(1, args.rounds + 1):
        for tree in args.trees:
            argv = [sys.executable, __file__, "--one", "--pairs", str(args.pairs)] + (["--sync-off"] if args.sync_off else [])
            done = subprocess.run(argv, env={**os.environ, "PYTHONPATH": tree}, capture_output=True, text=True,
                                  timeout=600)
            print(f"round {round_} {Path(tree).name:<12} {done.stdout.strip() or done.stderr.strip()[-300:]}",
                  flush=True)


if __name__ == "__main__":
    main()
