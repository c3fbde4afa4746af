"""The config's [enforce] table: defaults, values, and clear refusals."""

from __future__ import annotations

from pathlib import Path

import pytest

from mcpresd import config
from mcpresd.core.enforcement import EnforcePolicy
from mcpresd.protocol import EnforceMode

ROOT = Path(__file__).resolve().parents[2]


def test_enforcement_defaults_to_soft_up_to_hard_with_a_five_second_grace():
    assert config.load(None).enforce == EnforcePolicy(EnforceMode.SOFT, EnforceMode.HARD, 5.0, 4096, "mcpres")


def test_the_shipped_config_states_the_defaults():
    assert config.load(ROOT / "config" / "mcpresd.toml").enforce == EnforcePolicy()


def test_favordynmods_is_set_at_start_unless_the_config_says_false(tmp_path: Path):
    assert config.load(None).enforce.favordynmods is True
    path = tmp_path / "c.toml"
    path.write_text("[enforce]\nfavordynmods = false\n")
    assert config.load(path).enforce.favordynmods is False


def test_the_enforce_table_sets_modes_grace_tasks_and_subtree(tmp_path: Path):
    path = tmp_path / "c.toml"
    path.write_text('[enforce]\nmode = "hard"\nmax_mode = "hard"\nkill_grace = "500ms"\ntasks_max = 10\n'
                    'cgroup = "mcpres-ci"\n')
    assert config.load(path).enforce == EnforcePolicy(EnforceMode.HARD, EnforceMode.HARD, 0.5, 10, "mcpres-ci")


@pytest.mark.parametrize(("table", "message"), [
    ('mode = "strict"', "[enforce] mode must be one of off, soft, hard"),
    ('kill_grace = "-1s"', "[enforce] kill_grace"),
    ('tasks_max = 0', "[enforce] tasks_max must be a whole number"),
    ('cgroup = "../x"', "[enforce] cgroup must be a directory name"),
    ('limit = 1', "[enforce]: unknown key(s) limit"),
    ('favordynmods = "yes"', "[enforce] favordynmods must be true or false"),
])
def test_a_bad_enforce_value_is_refused_naming_the_key(tmp_path: Path, table: str, message: str):
    path = tmp_path / "c.toml"
    path.write_text(f"[enforce]\n{table}\n")
    with pytest.raises(config.ConfigError) as refused:
        config.load(path)
    assert message in str(refused.value)
