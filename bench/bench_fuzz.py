"""Protocol fuzz run: 100,000+ generated lines through the daemon's dispatcher, in-process.

Run:  .venv/bin/python bench/bench_fuzz.py [--inputs N] [--seed S]

Each input is random bytes, a random JSON value, a request with a real or random method and plausible or
random params, a batch of those, or a near-valid allocate. Every input must get exactly one reply (None or
one line of JSON-RPC 2.0 responses with the right ids; no internal errors), and an input answered only with
errors must write nothing (checked with the connection's change counter, events included). Prints the
inputs run, the crashes (0 expected), the first few crashing inputs, and the reply codes seen.
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mcpresd.protocol import Method  # noqa: E402
from tests.fuzz_harness import AROUND_THE_BOUNDS, InProcessDaemon, all_failed, check_reply, encode_line  # noqa: E402

METHODS = [m.value for m in Method]
NAMES = ["licence", "slot", "gpu", "gpu0", "gpu1", "GPU-0000", "cpu", "nope", "licence:x", "a b", ""]
FIELDS = ["resources", "resource", "amount", "max", "priority", "tool_id", "idempotency_key", "holder_pid", "wait",
          "detach", "ttl", "strategy", "where", "max_cost", "preemptible", "id", "timeout", "after_id", "limit",
          "allocation_id", "state", "type", "name", "capacity", "unit", "labels", "metric", "since", "in", "all",
          "path", "overwrite", "bogus"]
ODD = [0, -1, 0.5, 1, 2, 3, 11, 1e-300, 1e300, 2**63, -(2**63), 10**30, True, False, None, "", "forever", "x" * 300,
       "\x00", "\ud800", "low", "critical", "all", "active", "type=gpu", "best-fit", [], {},
       *AROUND_THE_BOUNDS]


class Generator:
    def __init__(self, seed: int) -> None:
        self.r = random.Random(seed)

    def text(self) -> str:
        r = self.r
        alphabet = "abc:=, \t\n\"\\\x00\x7f\u00e9\u4e2d\U0001f600"
        return "".join(r.choice(alphabet) for _ in range(r.randint(0, 8)))

    def scalar(self) -> Any:
        r = self.r
        return r.choice([None, r.random() < 0.5, r.randint(-(2**40), 2**40), r.uniform(-1e6, 1e6),
                         r.choice([1e308, -0.0, 5e-324]), self.text(), r.choice(ODD)])

    def value(self, depth: int = 0) -> Any:
        r = self.r
        kind = r.random()
        if depth > 3 or kind < 0.5:
            return self.scalar()
        if kind < 0.75:
            return [self.value(depth + 1) for _ in range(r.randint(0, 4))]
        return {self.text(): self.value(depth + 1) for _ in range(r.randint(0, 4))}

    def params(self, known: list[str]) -> Any:
        r = self.r
        if r.random() < 0.15:
            return self.value()
        body: dict[str, Any] = {}
        for _ in range(r.randint(0, 5)):
            name = r.choice(FIELDS)
            if name == "resources":
                body[name] = [self.demand() for _ in range(r.randint(0, 3))]
            elif name in ("id", "allocation_id") and known and r.random() < 0.7:
                body[name] = r.choice(known)
            else:
                body[name] = r.choice([r.choice(NAMES), r.choice(ODD), self.scalar(), self.value()])
        return body

    def demand(self) -> Any:
        r = self.r
        entry: dict[str, Any] = {"resource": r.choice(NAMES) if r.random() < 0.8 else self.scalar(),
                                 "amount": r.choice(ODD) if r.random() < 0.5 else r.choice([0.5, 1, 2])}
        if r.random() < 0.2:
            entry["max"] = r.choice(ODD)
        if r.random() < 0.05:
            entry[self.text()] = 1
        return entry

    def request(self, known: list[str]) -> Any:
        r = self.r
        message: dict[str, Any] = {"jsonrpc": "2.0" if r.random() < 0.9 else self.scalar(),
                                   "method": r.choice(METHODS) if r.random() < 0.85 else self.scalar()}
        if r.random() < 0.8:
            message["params"] = self.params(known)
        if r.random() < 0.85:
            message["id"] = r.choice([r.randint(0, 10**6), self.text(), None, 1.5, True, [], 10**30])
        return message

    def allocate(self) -> Any:
        r = self.r
        body: dict[str, Any] = {"resources": [{"resource": r.choice(["licence", "slot", "gpu", "gpu0", "nope"]),
                                               "amount": r.choice([0.5, 1, 2, 3, 11])}
                                              for _ in range(r.randint(1, 3))]}
        for name, values in (("idempotency_key", ["k1", "k2", "k3"]), ("wait", [0, 0.5, "forever"]),
                             ("detach", [True, False]), ("priority", ["low", "high", "critical"]), ("ttl", [1, 60])):
            if r.random() < 0.4:
                body[name] = r.choice(values)
        return {"jsonrpc": "2.0", "method": "allocate", "params": body, "id": r.randint(0, 99)}

    def line(self, known: list[str]) -> bytes:
        r = self.r
        kind = r.random()
        if kind < 0.10:
            return bytes(r.getrandbits(8) for _ in range(r.randint(0, 60)))
        if kind < 0.20:
            return encode_line(self.value())
        if kind < 0.60:
            return encode_line(self.request(known))
        if kind < 0.80:
            return encode_line(self.allocate())
        if kind < 0.95:
            return encode_line([self.request(known) if r.random() < 0.6 else self.allocate()
                                for _ in range(r.randint(0, 5))])
        text = encode_line(self.request(known))
        cut = r.randint(0, len(text))
        return text[:cut] + bytes([r.getrandbits(8)]) + text[cut + 1:]  # one byte flipped or cut


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inputs", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=20240601)
    args = parser.parse_args()
    generator = Generator(args.seed)
    codes: collections.Counter[str] = collections.Counter()
    crashes: list[tuple[bytes, str]] = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        daemon = InProcessDaemon(Path(tmp) / "state.db")
        try:
            for count in range(args.inputs):
                peer = daemon.peer()
                line = generator.line(daemon.known_ids())
                before = daemon.changes()
                try:
                    replies, intervened = daemon.send(line, peer)
                    responses = check_reply(line, replies)
                    if not intervened and all_failed(line, responses) and daemon.changes() != before:
                        raise AssertionError("an input answered only with errors wrote to the database")
                    for response in responses:
                        codes["ok" if "result" in response else str(response["error"]["code"])] += 1
                    if not responses:
                        codes["no reply (notification)"] += 1
                except Exception:  # noqa: BLE001 - every failure is a finding to report
                    crashes.append((line, traceback.format_exc(limit=3)))
                daemon.tidy(peer)
            integrity = daemon.store.conn.execute("PRAGMA integrity_check").fetchone()[0]
        finally:
            daemon.close()
    elapsed = time.perf_counter() - started
    print(f"inputs run:  {args.inputs:,} in {elapsed:.1f} s ({args.inputs / elapsed:,.0f}/s), seed {args.seed}")
    print(f"crashes:     {len(crashes)}")
    print(f"integrity:   {integrity}")
    print("replies:     " + ", ".join(f"{code} x{n:,}" for code, n in codes.most_common()))
    for line, trace in crashes[:5]:
        print(f"\n--- crash on {line!r:.300}\n{trace}")
    return 1 if crashes or integrity != "ok" else 0


if __name__ == "__main__":
    sys.exit(main())
