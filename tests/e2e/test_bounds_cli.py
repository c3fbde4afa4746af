"""The largest capacity a config may declare, held whole, and the smallest budget limit: `mcpctl top`,
`budgets`, `usage` and `resources` answer (issue 13 item 9: each hung the daemon's reply before)."""

from __future__ import annotations

import os
from pathlib import Path

from mcpresd.protocol import MAX_QUANTITY, MIN_QUANTITY
from tests.conftest import DaemonProcess, as_json, ok

VAST = f"""
memory_reserve = "0"

[[resources]]
name = "vast-a"
capacity = {MAX_QUANTITY!r}
unit = "units"
cost_per_unit_hour = {MAX_QUANTITY!r}

[[resources]]
name = "vast-b"
capacity = {MAX_QUANTITY!r}
unit = "units"
"""


def test_every_view_answers_at_the_bounds(tmp_path: Path) -> None:
    daemon = DaemonProcess(tmp_path, config=VAST)
    daemon.start()
    try:
        for _ in range(2):  # a typed request over both: each grant takes one whole resource
            daemon.call("allocate", {"resources": [{"resource": "custom", "amount": MAX_QUANTITY}],
                                     "holder_pid": os.getpid()})
        daemon.call("budgets.set", {"scope": "owner", "subject": str(os.getuid()), "period": "day",
                                    "limit": MIN_QUANTITY})
        assert "vast-a" in ok(daemon, "top", "--once")
        frame = as_json(daemon, "top", "--once")
        assert [a["items"][0]["amount"] for a in frame["active"]] == [MAX_QUANTITY, MAX_QUANTITY]
        (budget,) = as_json(daemon, "budgets")
        assert budget["limit"] == MIN_QUANTITY
        assert as_json(daemon, "usage", "--by", "resource")
        resources = {r["name"]: r for r in as_json(daemon, "resources")}
        assert resources["vast-a"]["allocated"] == resources["vast-b"]["allocated"] == MAX_QUANTITY
    finally:
        daemon.stop()
