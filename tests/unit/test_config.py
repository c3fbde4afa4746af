"""The daemon's configuration: defaults, the TOML file, overrides, and clear refusals."""

from __future__ import annotations

from pathlib import Path

import pytest

from mcpresd import config
from mcpresd.protocol import ResourceType
from mcpresd.server import FD_OVERHEAD, Limits

ROOT = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "mcpresd.toml"
    path.write_text(text)
    return path


def test_the_shipped_config_file_loads() -> None:
    loaded = config.load(ROOT / "config" / "mcpresd.toml")
    assert loaded.socket_mode == 0o600


def test_defaults_are_per_user(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))
    (tmp_path / "run").mkdir()
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.delenv("MCPRES_SOCKET", raising=False)
    monkeypatch.delenv("STATE_DIRECTORY", raising=False)
    loaded = config.load(None)
    assert loaded.socket == str(tmp_path / "run" / "mcpres" / "mcpresd.sock")
    assert loaded.database == str(tmp_path / "state" / "mcpresd" / "mcpresd.db")


def test_without_a_runtime_dir_the_socket_goes_to_a_private_tmp_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.delenv("MCPRES_SOCKET", raising=False)
    assert config.load(None).socket.startswith("/tmp/mcpres-")


def test_custom_resources_are_declared_in_the_file(tmp_path: Path) -> None:
    loaded = config.load(write(tmp_path, """
memory_reserve = "2G"
[[resources]]
name = "licence:matlab"
capacity = 4
unit = "seats"
cost_per_unit_hour = 0.5
"""))
    assert loaded.memory_reserve == 2 << 30
    (resource,) = loaded.resources
    assert (resource.name, resource.type, resource.capacity, resource.unit, resource.cost_per_unit_hour) == (
        "licence:matlab", ResourceType.CUSTOM, 4.0, "seats", 0.5)


def test_options_override_the_file(tmp_path: Path) -> None:
    loaded = config.load(write(tmp_path, 'socket = "/tmp/a.sock"\n'), socket="/tmp/b.sock", socket_mode="0660")
    assert loaded.socket == "/tmp/b.sock" and loaded.socket_mode == 0o660


@pytest.mark.parametrize("text, complaint", [
    ("sockt = 'x'", "unknown key"),
    ("memory_reserve = 'lots'", "memory_reserve"),
    ("socket_mode = '0200'", "socket_mode"),
    ("log_level = 'loud'", "log_level"),
    ("[[resources]]\nname = 'cpu'\ncapacity = 1", "reserved"),
    ("[[resources]]\nname = 'x'\ncapacity = 0", "capacity"),
    ("[[resources]]\nname = 'x'\ncapacity = 1\n[[resources]]\nname = 'x'\ncapacity = 1", "twice"),
    ("[[resources]]\nname = 'x'\ncapacity = 1\ncolour = 'red'", "unknown key"),
    ("not toml at all [", "not valid TOML"),
    ("[[resources]]\nname = 'x'\ncapacity = 1e308", "capacity must be from 1e-09 to 9.22337e\\+18"),
    ("[[resources]]\nname = 'x'\ncapacity = 5e-324", "capacity must be from"),
    ("[[resources]]\nname = 'x'\ncapacity = 1\ncost_per_unit_hour = 1e300", "cost_per_unit_hour"),
    ("default_link_speed = 1e300", "default_link_speed: at most"),
    ("[limits]\nreply_buffer = '1K'", "reply_buffer must be at least 4096"),
    ("[limits]\nsubscriber_buffer = 0", "subscriber_buffer"),
    ("[limits]\nmax_pipelined = 0", "max_pipelined must be a whole number"),
    ("[limits]\nmax_allocations_per_uid = 0", "max_allocations_per_uid must be a whole number from 1"),
    ("[limits]\nmax_allocations_per_uid = true", "max_allocations_per_uid must be a whole number from 1"),
])
def test_bad_config_is_refused_with_a_message_naming_the_problem(tmp_path: Path, text: str, complaint: str) -> None:
    with pytest.raises(config.ConfigError, match=complaint):
        config.load(write(tmp_path, text))


def test_a_missing_config_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(config.ConfigError, match="does not exist"):
        config.load(tmp_path / "nope.toml")


def test_a_deeply_nested_file_is_one_config_error_not_a_recursion_traceback(tmp_path: Path) -> None:
    with pytest.raises(config.ConfigError, match="nested too deeply") as raised:
        config.load(write(tmp_path, "x = " + "[" * 100_000 + "]" * 100_000 + "\n"))
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize("reserve", ['"1P"', '"100000T"'])
def test_a_memory_reserve_of_at_least_the_hosts_memory_is_refused(tmp_path: Path, reserve: str) -> None:
    with pytest.raises(config.ConfigError, match=r"memory_reserve: .* is not less than this host's memory"):
        config.load(write(tmp_path, f"memory_reserve = {reserve}\n"))


def test_a_memory_reserve_equal_to_the_hosts_memory_is_refused(tmp_path: Path) -> None:
    total = config.host_memory()
    assert total is not None
    with pytest.raises(config.ConfigError, match="not less than this host's memory"):
        config.load(write(tmp_path, f"memory_reserve = {total}\n"))
    assert config.load(write(tmp_path, f"memory_reserve = {total - 1}\n")).memory_reserve == total - 1


@pytest.mark.parametrize("text, meant", [
    ("socket_mode = 438", '"0666"'),
    ("socket_mode = 660", '"0660"'),
    ("socket_mode = 0o660", '"0660"'),
])
def test_a_socket_mode_given_as_a_number_is_refused_with_the_string_it_probably_meant(
        tmp_path: Path, text: str, meant: str) -> None:
    with pytest.raises(config.ConfigError, match=f"socket_mode: .* is a number; write the octal mode as a string.*"
                                                 f"did you mean {meant}"):
        config.load(write(tmp_path, text + "\n"))
    assert config.load(write(tmp_path, 'socket_mode = "0660"\n')).socket_mode == 0o660


def test_an_alert_rule_on_a_metric_that_does_not_exist_is_refused(tmp_path: Path) -> None:
    rule = '[[alerts]]\nname = "hot"\nmetric = "gpu.temprature_c"\nselector = "gpu"\nwarning = 80\n'
    with pytest.raises(config.ConfigError, match=r"alerts\[0\] \(hot\): metric 'gpu.temprature_c' does not exist"):
        config.load(write(tmp_path, rule))
    assert config.load(write(tmp_path, rule.replace("temprature", "temperature"))).monitor.rules[-1].name == "hot"


def test_log_lines_carry_a_journald_priority_under_systemd_and_keep_a_messages_lines_indented() -> None:
    import logging
    import re

    from mcpresd.daemon import LineFormatter

    record = logging.LogRecord("mcpresd.server", logging.WARNING, __file__, 1, "two\nlines", None, None)
    assert LineFormatter(journal=True).format(record) == "<4>WARNING mcpresd.server: two\n<4>  lines"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d{4} WARNING mcpresd\.server: two\n  lines",
                        LineFormatter(journal=False).format(record))


def test_the_shipped_config_documents_pools_that_load_when_uncommented(tmp_path: Path) -> None:
    text = (ROOT / "config" / "mcpresd.toml").read_text()
    start = text.index("# [[pools]]")
    examples = "\n".join(line.removeprefix("# ") for line in text[start:].splitlines()
                         if line.startswith("# ") and "=" in line or line.strip() == "# [[pools]]")
    loaded = config.load(write(tmp_path, examples))
    assert [p.name for p in loaded.pools] == ["builds", "gpus", "workers"]
    builds = loaded.pools[0]
    assert (builds.parent, builds.slot_size, builds.min_size, builds.max_size) == ("cpu", 2.0, 2, 8)
    assert builds.scale.cooldown_s == 60.0 and builds.cost_per_unit_hour == 0.05
    assert loaded.pools[2].timeout_s == 30.0


@pytest.mark.parametrize(("text", "problem"), [
    ('[[pools]]\nname = "a"\nfactory = "slots"\nmax = 2\n', "parent"),
    ('[[pools]]\nname = "a"\nfactory = "nope"\n', "factory must be one of"),
    ('[[pools]]\nname = "a"\nfactory = "command"\ncreate = "x"\nmax = 1\ncooldown = "soon"\n', "cooldown"),
    ('[[pools]]\nname = "a"\nfactory = "static"\nmembers = ["x"]\n[[pools]]\nname = "a"\nfactory = "static"\n'
     'members = ["y"]\n', "declared twice"),
    ('pools = 3\n', "array of tables"),
    ('[scheduler]\npool_interval = "1ms"\n', "pool_interval"),
])
def test_bad_pool_declarations_are_refused_with_where(tmp_path: Path, text: str, problem: str) -> None:
    with pytest.raises(config.ConfigError, match=problem):
        config.load(write(tmp_path, text))


def test_what_a_connection_may_queue_is_read_from_limits(tmp_path: Path) -> None:
    loaded = config.load(write(tmp_path, """
[limits]
max_pipelined = 2
reply_buffer = "256K"
batch_reply = "2M"
subscriber_buffer = 65536
"""))
    limits = loaded.limits
    assert (limits.max_pipelined, limits.reply_buffer, limits.batch_reply, limits.subscriber_buffer) == (
        2, 256 << 10, 2 << 20, 65536)


@pytest.mark.parametrize("open_files", [100, 200, 1024, 20_000, 65_536, 1 << 20])
def test_connections_and_holders_stay_below_the_open_file_limit_with_a_reserve_for_root(open_files: int) -> None:
    fitted = Limits().fitted(open_files)
    assert fitted.holder_fds is not None
    assert FD_OVERHEAD + fitted.holder_fds + fitted.max_connections + fitted.admin_reserve <= open_files
    assert fitted.admin_reserve >= 1 and fitted.holder_fds >= 1
    assert 1 <= fitted.max_connections_per_uid <= fitted.max_connections // 2
    assert fitted.max_connections <= Limits().max_connections


def test_the_default_connection_caps_stand_where_descriptors_are_plenty() -> None:
    fitted = Limits().fitted(65_536)  # the systemd units' LimitNOFILE
    assert (fitted.max_connections, fitted.max_connections_per_uid) == (4096, 1024)


@pytest.mark.parametrize(("listen", "expected"), [
    ('"127.0.0.1:9464"', ("127.0.0.1", 9464)),
    ('"127.1.2.3:80"', ("127.1.2.3", 80)),
    ('"[::1]:9464"', ("::1", 9464)),
    ('""', None),
])
def test_the_metrics_endpoint_listens_on_loopback(tmp_path: Path, listen: str, expected: object) -> None:
    assert config.load(write(tmp_path, f"[metrics]\nlisten = {listen}\n")).metrics_listen == expected
    assert config.load(None).metrics_listen is None  # off by default


@pytest.mark.parametrize(("listen", "complaint"), [
    ('"0.0.0.0:9464"', "must be a loopback address"),
    ('"[::]:9464"', "must be a loopback address"),
    ('"192.168.1.10:9464"', "must be a loopback address"),
    ('"localhost:9464"', "a loopback address and a port"),
    ('"127.0.0.1"', "a loopback address and a port"),
    ('"127.0.0.1:0"', "a loopback address and a port"),
    ('"127.0.0.1:65536"', "a loopback address and a port"),
    ('"127.0.0.1:http"', "a loopback address and a port"),
    ('"::1:9464"', "a loopback address and a port"),
    ("9464", "must be a string"),
])
def test_a_metrics_endpoint_off_loopback_or_malformed_is_refused(tmp_path: Path, listen: str, complaint: str) -> None:
    with pytest.raises(config.ConfigError, match=complaint):
        config.load(write(tmp_path, f"[metrics]\nlisten = {listen}\n"))


def test_the_metrics_table_knows_only_listen(tmp_path: Path) -> None:
    with pytest.raises(config.ConfigError, match="unknown"):
        config.load(write(tmp_path, '[metrics]\nlisten = ""\nport = 9464\n'))
# -- [cluster] ------------------------------------------------------------------

def test_the_cluster_table_is_read_with_its_defaults(tmp_path: Path) -> None:
    loaded = config.load(write(tmp_path, '[cluster]\ncommand = ["ssh", "login1"]\npartition = "gpu"\n'
                                         'time_limit = "8h"\n'))
    assert loaded.cluster is not None
    assert loaded.cluster.command == ("ssh", "login1") and loaded.cluster.partition == "gpu"
    assert loaded.cluster.time_limit == 8 * 3600 and loaded.cluster.timeout == 10.0 and loaded.cluster.account is None


def test_without_a_cluster_table_there_is_no_cluster(tmp_path: Path) -> None:
    assert config.load(write(tmp_path, "")).cluster is None


@pytest.mark.parametrize(("table", "words"), [
    ('backend = "pbs"', "backend must be"),
    ('command = "ssh login1"', "command must be an array"),
    ('command = ["ssh", ""]', "command must be an array"),
    ('partition = "a b"', "partition must be"),
    ('account = 3', "account must be"),
    ('time_limit = "5s"', "time_limit must be between"),
    ('timeout = "1h"', "timeout must be between"),
    ('nodes = 2', "unknown key(s) nodes"),
])
def test_a_bad_cluster_table_is_refused_naming_the_key(tmp_path: Path, table: str, words: str) -> None:
    with pytest.raises(config.ConfigError, match=words.replace("(", r"\(").replace(")", r"\)")):
        config.load(write(tmp_path, f"[cluster]\n{table}\n"))


def test_the_kernels_overflow_group_cannot_be_the_admin_group(tmp_path: Path) -> None:
    # Every group a container's client has that the daemon's namespace does not map reads as this gid.
    import grp

    try:
        overflow = grp.getgrgid(config.overflow_gid()).gr_name
    except KeyError:
        pytest.skip("no group named for the overflow gid here")
    path = tmp_path / "mcpresd.toml"
    path.write_text(f'[access]\nadmin_group = "{overflow}"\n')

    with pytest.raises(config.ConfigError, match="overflow gid"):
        config.load(path)
