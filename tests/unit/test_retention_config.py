"""[retention] in the config file."""

from __future__ import annotations

from pathlib import Path

import pytest

from mcpresd import config
from mcpresd.retention import Retention


def load(tmp_path: Path, text: str) -> config.Config:
    path = tmp_path / "mcpresd.toml"
    path.write_text(text)
    return config.load(path)


def test_retention_defaults_keep_90_days_and_keys_for_a_day(tmp_path: Path) -> None:
    assert load(tmp_path, "").policy.retention == Retention(events_days=90, ended_allocations_days=90,
                                                             key_expiry=86400)


def test_retention_is_read_beside_the_scheduler_settings(tmp_path: Path) -> None:
    loaded = load(tmp_path, '[scheduler]\naging_interval = "1m"\n[retention]\nevents_days = 7\n'
                            'ended_allocations_days = 0\nkey_expiry = "30m"\n[limits]\nmax_queued_per_uid = 9\n'
                            'max_allocations_per_uid = 50\n')
    assert loaded.policy.retention == Retention(events_days=7, ended_allocations_days=0, key_expiry=1800)
    assert loaded.policy.aging_interval == 60 and loaded.policy.max_queued_per_uid == 9
    assert loaded.policy.max_allocations_per_uid == 50
    assert load(tmp_path, "").policy.max_allocations_per_uid == 10_000
    assert loaded.policy.retention.allocations_before(1e9) is None, "0 keeps for ever"


@pytest.mark.parametrize("text, message", [
    ("[retention]\nevents_days = -1\n", "events_days must be a number of days"),
    ("[retention]\nended_allocations_days = true\n", "ended_allocations_days must be a number of days"),
    ('[retention]\nevents_days = "7d"\n', "events_days must be a number of days"),
    ('[retention]\nkey_expiry = "soon"\n', "key_expiry"),
    ("[retention]\nkeys = 1\n", "unknown key(s) keys"),
    ("retention = 3\n", "[retention] must be a table"),
])
def test_bad_retention_settings_are_refused(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(config.ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[").replace("]", r"\]")):
        load(tmp_path, text)
