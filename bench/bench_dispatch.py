"""The request path without sockets: Dispatcher + GroupCommitter + Broker over a real store, on one loop.

Run:  .venv/bin/python bench/bench_dispatch.py [--clients 200] [--pairs 6000] [--runs 5]

Each of `clients` peers sends allocate (1 of a plain resource), then release, then allocate again, as JSON
lines through Dispatcher.handle_line; their jobs are grouped and committed by the real GroupCommitter (WAL +
FULL, the database on tmpfs where there is one). It prints process CPU microseconds per allocate+release
pair (setup included), per run and their median: the daemon's work per pair less the socket and the loop's
I/O. On a shared machine CPU time still moves with the neighbours' load (caches, steal); instruction counts
do not, so to compare two checkouts run this under callgrind twice with different --pairs and take the
difference per pair (the group budget is lifted so that valgrind's slowness does not split the groups):

  PYTHONHASHSEED=0 valgrind --tool=callgrind --callgrind-out-file=/dev/null \\
      .venv/bin/python bench/bench_dispatch.py --runs 1 --pairs 600 --no-budget   (then --pairs 1200)
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import mcpresd.server  # noqa: E402
from bench_cpu import ME, SHM, broker_with  # noqa: E402
from mcpresd.rpc import Dispatcher  # noqa: E402
from mcpresd.server import GroupCommitter  # noqa: E402

ALLOCATE = b'{"jsonrpc":"2.0","id":1,"method":"allocate","params":{"resources":[{"resource":"plain","amount":1}]}}'


class Peer:
    batch_reply_bytes = 1 << 20

    def __init__(self) -> None:
        self.caller = ME

    def notify(self, data: bytes) -> None:
        pass

    def subscribe(self) -> None:
        pass


async def serve(directory: str, clients: int, pairs: int) -> None:
    loop = asyncio.get_running_loop()
    committer = GroupCommitter(lambda: broker_with(Path(directory), "plain"), lambda outbox: None)
    committer.start(loop)
    if "call" in inspect.signature(Dispatcher).parameters:  # older checkouts, for A/B runs
        dispatcher = Dispatcher(committer.submit, lambda: [], committer.call)
    else:
        dispatcher = Dispatcher(committer.submit, lambda: [])
    left = [pairs]
    done = asyncio.Event()

    def client() -> None:
        peer = Peer()

        def allocated(data: bytes | None) -> None:
            if done.is_set():
                return
            assert data is not None
            allocation_id = json.loads(data)["result"]["id"]
            line = b'{"jsonrpc":"2.0","id":2,"method":"release","params":{"id":"%s"}}' % allocation_id.encode()
            loop.call_soon(dispatcher.handle_line, line, peer, released)

        def released(data: bytes | None) -> None:
            if done.is_set():
                return  # the requests still in flight when it stops are answered "shutting down"
            assert data is not None and b'"result"' in data, data
            left[0] -= 1
            if left[0] <= 0:
                done.set()
                return
            loop.call_soon(dispatcher.handle_line, ALLOCATE, peer, allocated)

        loop.call_soon(dispatcher.handle_line, ALLOCATE, peer, allocated)

    for _ in range(clients):
        client()
    await done.wait()
    committer.stop()


def main() -> None:
    cli = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_argument("--clients", type=int, default=200)
    cli.add_argument("--pairs", type=int, default=6000)
    cli.add_argument("--runs", type=int, default=5)
    cli.add_argument("--no-budget", action="store_true", help="lift the group's time budget (under valgrind)")
    args = cli.parse_args()
    if args.no_budget:
        mcpresd.server.GROUP_BUDGET_S = 1e9
    runs: list[float] = []
    for _ in range(args.runs):
        with tempfile.TemporaryDirectory(dir=SHM) as directory:
            started = time.process_time()
            asyncio.run(serve(directory, args.clients, args.pairs))
            runs.append((time.process_time() - started) / args.pairs * 1e6)
    print(f"{args.clients} clients, {args.pairs} pairs: CPU per allocate+release pair "
          f"{' '.join(f'{r:.0f}' for r in runs)} us, median {statistics.median(runs):.0f} us")


if __name__ == "__main__":
    main()
