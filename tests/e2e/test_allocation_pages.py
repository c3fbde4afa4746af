"""`allocations.list` answers at most a page; `mcpctl allocations --limit` reads on page by page (issue 13, item 11)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from mcpctl.client import RpcError
from mcpresd.protocol import ALLOCATIONS_PAGE, ErrorCode
from mcpresd.store import Store
from tests.conftest import DaemonProcess, as_json
from tests.integration.test_usage_totals import ended_allocation
from tests.live import T0

ENDED = 2 * ALLOCATIONS_PAGE + 300


@pytest.fixture
def history(tmp_path: Path) -> Iterator[DaemonProcess]:
    """A daemon over ENDED released allocations."""
    daemon = DaemonProcess(tmp_path)
    Path(daemon.db).parent.mkdir(mode=0o700)
    store = Store(daemon.db)
    with store.transaction():
        for n in range(ENDED):
            store.insert_allocation(ended_allocation(n, T0))
    store.close()
    daemon.start()
    try:
        yield daemon
    finally:
        daemon.stop()


def test_a_list_is_read_a_page_at_a_time(history: DaemonProcess) -> None:
    with pytest.raises(RpcError) as refused:
        history.call("allocations.list", {"state": "all", "limit": ALLOCATIONS_PAGE + 1})
    assert refused.value.code == ErrorCode.INVALID_PARAMS
    first = history.call("allocations.list", {"state": "released", "limit": ALLOCATIONS_PAGE})
    second = history.call("allocations.list", {"state": "released", "limit": ALLOCATIONS_PAGE,
                                               "before_id": first[-1]["id"]})
    ids = [a["id"] for a in first + second]
    assert len(ids) == 2 * ALLOCATIONS_PAGE and ids == sorted(set(ids), reverse=True)
    assert ids[0] == f"bulk{ENDED - 1:012x}"


def test_mcpctl_allocations_reads_every_page_up_to_its_limit(history: DaemonProcess) -> None:
    everything = as_json(history, "allocations", "--all", "--limit", "100000")
    ids = [a["id"] for a in everything]
    assert ids == [f"bulk{n:012x}" for n in reversed(range(ENDED))]
    some = as_json(history, "allocations", "--all", "--limit", str(ALLOCATIONS_PAGE + 7))
    assert [a["id"] for a in some] == ids[: ALLOCATIONS_PAGE + 7]
