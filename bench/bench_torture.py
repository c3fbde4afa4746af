"""Crash torture, three rounds of 50 SIGKILLs, and the negative control (replies before COMMIT).

    .venv/bin/python bench/bench_torture.py

Prints, per round, kills, requests, acknowledged and invariant violations (0 expected), then the violations
the checker finds in the unsafe daemon (more than 0 expected). Exits 1 if either expectation fails.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.torture import torture  # noqa: E402

ROUNDS = 3
KILLS = 50
CONTROL_KILLS = 15


def main() -> int:
    failed = False
    print(f"{'round':<10}{'kills':>6}{'requests':>10}{'acked':>8}{'violations':>12}{'seconds':>9}")
    for round_ in range(ROUNDS):
        with tempfile.TemporaryDirectory() as tmp:
            started = time.monotonic()
            result = torture(Path(tmp), KILLS, seed=round_ + 10)
            took = time.monotonic() - started
        print(f"{round_ + 1:<10}{result.kills:>6}{result.requests:>10}{result.acknowledged:>8}"
              f"{len(result.violations):>12}{took:>9.1f}")
        for line in result.violations[:5]:
            print(f"    {line}")
        failed |= bool(result.violations or result.errors)
    with tempfile.TemporaryDirectory() as tmp:
        started = time.monotonic()
        control = torture(Path(tmp), CONTROL_KILLS, unsafe=True, seed=99)
        took = time.monotonic() - started
    lost = [v for v in control.violations if v.startswith("lost:")]
    print(f"{'control':<10}{control.kills:>6}{control.requests:>10}{control.acknowledged:>8}"
          f"{len(control.violations):>12}{took:>9.1f}   (unsafe daemon; {len(lost)} lost acknowledged allocations)")
    failed |= not lost
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
