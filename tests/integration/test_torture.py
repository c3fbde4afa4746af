"""Crash torture: acknowledged work survives SIGKILLs at random moments, and the checker sees when it does not.

The loop and the invariant checker live in tests/torture.py (bench/bench_torture.py runs them too). The
negative control runs the same loop against tests/fixtures/unsafe_daemon.py, which replies before its COMMIT:
the checker must report a lost allocation or an undone release, or it would not catch the bug it exists for.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.torture import torture

pytestmark = pytest.mark.torture

KILLS = 50
CONTROL_KILLS = 15


def test_acknowledged_state_survives_fifty_sigkills(tmp_path: Path) -> None:
    result = torture(tmp_path, KILLS, seed=1)

    assert result.errors == []
    assert result.kills == KILLS
    assert result.violations == []
    assert result.acknowledged > KILLS  # the clients did work between the kills


def test_the_checker_catches_replies_sent_before_the_commit(tmp_path: Path) -> None:
    result = torture(tmp_path, CONTROL_KILLS, unsafe=True, seed=2, stop_at_first_violation=True)

    # Replying before the COMMIT shows either way, whichever a kill catches first: an acknowledged allocation
    # missing after the restart ("lost:"), or an acknowledged release undone by it ("resurrected:").
    # (A client's later request may fail on what was lost too, e.g. a release of a lost allocation: 1003.)
    assert any(v.startswith(("lost:", "resurrected:")) for v in result.violations), result.violations
