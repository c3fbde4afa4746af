"""Gateway benchmark: the latency `mcpctl gateway` adds to an MCP tool call, on a free machine.

Run:  .venv/bin/python bench/bench_gateway.py [--calls 1000]

One raw MCP server (tests/gateway/servers/scripted.py, standard library only,
answering `echo` at once) is called three ways, one call at a time, with raw
JSON-RPC lines over stdio:
- directly;
- through the gateway, for a tool no [[tool]] entry gates;
- through the gateway, for a gated tool (`res = ["slot=1"]`): allocate on the
  daemon, forward, answer, release.
Prints p50 and p99 of each round trip and what the gateway adds to p50 and p99
(target: <= 2 ms at p50 for a gated call), mcpresd's own share of a gated call
(its allocate round trip, measured alone), plus the gateway's start-up time (spawn
to the answer to `initialize`) against the server's own. The daemon is this
checkout's, from the running interpreter, with its database in a temporary directory.
`--gap S` sleeps S seconds between calls (idle processes then have to be woken for
each call, which on small VMs costs more than the work itself).
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_foundation import ROOT, start_daemon, stop_daemon  # noqa: E402

SERVER = ROOT / "tests" / "gateway" / "servers" / "scripted.py"
CONFIG = '[[resources]]\nname = "slot"\ncapacity = 10\n'
TOOLS = '[server]\nname = "bench"\n\n[[tool]]\nmatch = "echo"\nres = ["slot=1"]\n'
INIT = (b'{"jsonrpc":"2.0","id":0,"method":"initialize","params":{"protocolVersion":"2025-11-25",'
        b'"capabilities":{},"clientInfo":{"name":"bench","version":"1"}}}\n')


class Stdio:
    """A process spoken to in raw lines."""

    def __init__(self, argv: list[str]) -> None:
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     cwd=ROOT)
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.stdin, self.stdout = self.proc.stdin, self.proc.stdout

    def ask(self, line: bytes) -> bytes:
        self.stdin.write(line)
        self.stdin.flush()
        return self.stdout.readline()

    def close(self) -> None:
        self.stdin.close()
        self.proc.wait(10)


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * p))]


def round_trips(peer: Stdio, tool: str, calls: int, gap: float = 0.0) -> list[float]:
    timings = []
    for number in range(1, calls + 51):
        if gap:
            time.sleep(gap)
        line = json.dumps({"jsonrpc": "2.0", "id": number, "method": "tools/call",
                           "params": {"name": tool, "arguments": {"n": number}}}).encode() + b"\n"
        started = time.perf_counter()
        reply = peer.ask(line)
        elapsed = time.perf_counter() - started
        assert json.loads(reply)["id"] == number, reply
        if number > 50:  # the first 50 warm up both sides
            timings.append(elapsed * 1000)
    return timings


def daemon_round_trips(sock_path: str, calls: int) -> list[float]:
    """mcpresd alone, as the gateway uses it: each allocate carries the previous release along in one batch."""
    timings = []
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(sock_path)
        reader = sock.makefile("rb")
        previous = None
        for number in range(1, calls + 51):
            allocate = {"jsonrpc": "2.0", "id": number, "method": "allocate",
                        "params": {"resources": [{"resource": "slot", "amount": 1}], "tool_id": "bench/echo",
                                   "execution_id": f"x/{number}", "wait": 600.0, "detach": True}}
            message: object = allocate if previous is None else [
                {"jsonrpc": "2.0", "method": "release", "params": {"id": previous}}, allocate]
            started = time.perf_counter()
            sock.sendall(json.dumps(message).encode() + b"\n")
            reply = json.loads(reader.readline())
            elapsed = time.perf_counter() - started
            previous = (reply[0] if isinstance(reply, list) else reply)["result"]["id"]
            if number > 50:
                timings.append(elapsed * 1000)
    return timings


def startup(argv: list[str], runs: int) -> float:
    times = []
    for _ in range(runs):
        peer = Stdio(argv)
        assert b'"id":0' in peer.ask(INIT)
        times.append((time.perf_counter() - peer.started) * 1000)
        peer.close()
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--gap", type=float, default=0.0, help="seconds between calls")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        daemon, sock = start_daemon(tmp, sys.executable, CONFIG)
        tools = tmp / "tools.toml"
        tools.write_text(TOOLS)
        direct_argv = [sys.executable, str(SERVER), str(tmp / "server.tap")]
        gateway_argv = [sys.executable, "-m", "mcpctl.gateway", "--socket", sock, "--tools", str(tools), "--",
                        *direct_argv]
        try:
            results: dict[str, list[float]] = {}
            for label, argv, tool in (("direct", direct_argv, "echo"), ("ungated", gateway_argv, "free_echo"),
                                      ("gated", gateway_argv, "echo")):
                peer = Stdio(argv)
                peer.ask(INIT)
                results[label] = round_trips(peer, tool, args.calls, args.gap)
                peer.close()
            base50, base99 = percentile(results["direct"], 0.5), percentile(results["direct"], 0.99)
            print(f"tool call round trip, {args.calls} calls each, one at a time (ms):")
            for label, timings in results.items():
                p50, p99 = percentile(timings, 0.5), percentile(timings, 0.99)
                added = "" if label == "direct" else f"   added: p50 {p50 - base50:+.3f}  p99 {p99 - base99:+.3f}"
                print(f"  {label:8} p50 {p50:7.3f}  p99 {p99:7.3f}{added}")
            alone = daemon_round_trips(sock, args.calls)
            print(f"  mcpresd's allocate (with the previous release in one batch), alone: "
                  f"p50 {percentile(alone, 0.5):.3f}  p99 {percentile(alone, 0.99):.3f}")
            gated_added = percentile(results["gated"], 0.5) - base50
            print(f"gated call, added p50: {gated_added:.3f} ms (target <= 2 ms): "
                  f"{'met' if gated_added <= 2 else 'NOT met'}")
            print(f"start-up to the answer to initialize (median of 5): server {startup(direct_argv, 5):.0f} ms, "
                  f"through the gateway {startup(gateway_argv, 5):.0f} ms")
        finally:
            stop_daemon(daemon)


if __name__ == "__main__":
    main()
