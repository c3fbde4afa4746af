"""Daemon configuration: embedded defaults, then the TOML file, then command-line options.

Rules:
- Unknown keys and bad values are errors that name the key; the daemon refuses
  to start rather than guess.
- Paths default to per-user locations: the socket under $XDG_RUNTIME_DIR (else
  /run/user/UID, else a private directory in /tmp), the database under
  $XDG_STATE_HOME/mcpresd/ (else ~/.local/state/mcpresd/; $STATE_DIRECTORY when
  systemd provides one).
- Without --config the file is found (`find_config`): /etc/mcpres/mcpresd.toml
  for root, $XDG_CONFIG_HOME/mcpres/mcpresd.toml (else ~/.config/) for anyone
  else, if it exists; the embedded defaults otherwise.
- `as_toml` writes a Config back as a file that loads to the same Config.
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from mcpresd.cluster.slurm import ClusterConfig
from mcpresd.core.enforcement import EnforcePolicy
from mcpresd.core.model import Resource
from mcpresd.protocol import Strategy
from mcpresd.core.alerts import AlertRule, default_rules, rule_from_config
from mcpresd.core.errors import DomainError
from mcpresd.monitor import MonitorPolicy
from mcpresd.samplers.metrics import METRICS
from mcpresd.server import Limits
from mcpresd.service import Policy
from mcpresd.retention import Retention
from mcpresd.core.pools import PoolSpec
from mcpresd.params import InvalidParams, check_custom_name, check_quantity, check_text, pool_spec
from mcpresd.protocol import (MAX_QUANTITY, EnforceMode, ResourceType, UnitError, default_socket_path, is_valid_number,
                              parse_duration, parse_size)

DEFAULT_MEMORY_RESERVE = 1 << 30
SYSTEM_CONFIG = "/etc/mcpres/mcpresd.toml"
LOG_LEVELS = ("debug", "info", "warning", "error")


class ConfigError(ValueError):
    """The configuration file or an option is invalid."""


@dataclass(frozen=True)
class Config:
    socket: str = field(default_factory=default_socket_path)
    database: str = field(default_factory=lambda: default_database_path())
    socket_mode: int = 0o600
    gpu_replay: str | None = None
    memory_reserve: int = DEFAULT_MEMORY_RESERVE
    default_link_bytes_per_s: float = 125_000_000.0
    log_level: str = "info"
    resources: tuple[Resource, ...] = ()
    pools: tuple[PoolSpec, ...] = ()
    policy: Policy = Policy()
    tick_interval: float = 5.0
    monitor: MonitorPolicy = MonitorPolicy()
    prometheus_file: str | None = None
    metrics_listen: tuple[str, int] | None = None  # [metrics] listen: loopback host and port; None: off
    limits: Limits = Limits()
    enforce: EnforcePolicy = EnforcePolicy()
    cluster: ClusterConfig | None = None
    """The `[cluster]` table; None: no cluster site."""
    config_file: str | None = field(default=None, compare=False)
    """The file read, if any (where the configuration came from is not part of it)."""
    config_source: str = field(default="embedded defaults", compare=False)
    """How that file was chosen, or why there is none: for the first log line and `daemon.status`."""

    @property
    def sample_interval(self) -> float:
        return self.monitor.interval


def user_config_path() -> str:
    given = os.environ.get("XDG_CONFIG_HOME", "")
    base = given if os.path.isabs(given) else os.path.join(os.path.expanduser("~"), ".config")  # XDG: relative is invalid
    return os.path.join(base, "mcpres", "mcpresd.toml")


def default_config_path() -> tuple[str, str]:
    """Where the config file is looked for without --config, and whose it is: root's, or this user's."""
    if os.geteuid() == 0:
        return SYSTEM_CONFIG, "system"
    return user_config_path(), "user"


def find_config(given: str | None) -> tuple[str | None, str]:
    """The config file to read and how it was chosen: --config, else the default path if it exists, else none."""
    if given is not None:
        return given, "--config"
    path, whose = default_config_path()
    try:
        os.stat(path)
    except FileNotFoundError:
        return None, f"embedded defaults: no {path}"
    except OSError:
        pass  # there may be one: reading it says what is wrong
    return path, whose


def default_database_path() -> str:
    state_directory = os.environ.get("STATE_DIRECTORY")
    if state_directory:
        return os.path.join(state_directory.split(":")[0], "mcpresd.db")
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "mcpresd", "mcpresd.db")


_KEYS = {"socket", "database", "socket_mode", "gpu_replay", "memory_reserve", "default_link_speed",
         "log_level", "resources", "scheduler", "monitor", "alerts", "limits", "access", "pools", "retention",
         "enforce", "metrics", "cluster"}
_LIMIT_KEYS = {"max_connections", "max_connections_per_uid", "idle_timeout", "max_queued_per_uid",
               "max_allocations_per_uid", "max_pipelined",
               "reply_buffer", "batch_reply", "subscriber_buffer", "unread_per_uid"}
_LIMIT_SIZES = ("reply_buffer", "batch_reply", "subscriber_buffer", "unread_per_uid")
MIN_BUFFER = 4096
_CLUSTER_KEYS = {"backend", "partition", "account", "time_limit", "command", "timeout"}
_ENFORCE_KEYS = {"mode", "max_mode", "kill_grace", "tasks_max", "cgroup", "favordynmods"}
_MONITOR_DURATIONS = {"interval", "raw_max_age", "rollup_max_age", "health_interval", "forecast_window",
                      "forecast_horizon"}
_MONITOR_KEYS = _MONITOR_DURATIONS | {"raw_points", "health_threshold", "prometheus_file", "default_alerts"}
_SCHEDULER_KEYS = {"aging_interval", "default_strategy", "preemption", "preempt_grace", "tick_interval",
                   "pool_interval"}
_RESOURCE_KEYS = {"name", "capacity", "unit", "cost_per_unit_hour", "labels"}
_RETENTION_KEYS = {"events_days", "ended_allocations_days", "key_expiry"}


def load(path: str | Path | None, **overrides: Any) -> Config:
    """Defaults, then the file at `path` (if any), then non-None `overrides`."""
    config = Config()
    if path is not None:
        config = _apply_file(config, Path(path))
    changes = {key: value for key, value in overrides.items() if value is not None}
    if path is not None and "config_file" not in changes:
        changes["config_file"] = str(path)
    if "socket_mode" in changes:
        changes["socket_mode"] = _parse_mode(changes["socket_mode"], "--socket-mode")
    if "log_level" in changes:
        changes["log_level"] = _parse_log_level(changes["log_level"], "--log-level")
    return replace(config, **changes)


def _apply_file(config: Config, path: Path) -> Config:
    try:
        with path.open("rb") as file:
            data = tomllib.load(file)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"config file {path} is not valid TOML: {error}") from None
    except RecursionError:
        raise ConfigError(f"config file {path} is nested too deeply (arrays or tables within each other) "
                          f"to be a config file") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"config file {path} cannot be read: {error}") from None
    unknown = sorted(set(data) - _KEYS)
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(_KEYS))})")
    changes: dict[str, Any] = {}
    for key in ("socket", "database", "gpu_replay"):
        if key in data:
            value = data[key]
            if not isinstance(value, str):
                raise ConfigError(f"{path}: {key} must be a string path")
            if value:
                changes[key] = os.path.expanduser(value)
    if "socket_mode" in data:
        changes["socket_mode"] = _parse_mode(data["socket_mode"], f"{path}: socket_mode")
    if "memory_reserve" in data:
        changes["memory_reserve"] = _memory_reserve(data["memory_reserve"], f"{path}: memory_reserve")
    if "default_link_speed" in data:
        changes["default_link_bytes_per_s"] = float(_size(data["default_link_speed"], f"{path}: default_link_speed"))
    if "log_level" in data:
        changes["log_level"] = _parse_log_level(data["log_level"], f"{path}: log_level")
    if "resources" in data:
        changes["resources"] = _resources(data["resources"], path)
    if "pools" in data:
        changes["pools"] = _pools(data["pools"], path)
    if "scheduler" in data:
        changes.update(_scheduler(data["scheduler"], path))
    if "limits" in data:
        changes.update(_limits(data["limits"], path, changes.get("policy", config.policy)))
    if "retention" in data:
        changes["policy"] = replace(changes.get("policy", config.policy),
                                    retention=_retention(data["retention"], path))
    if "access" in data:
        changes["limits"] = replace(changes.get("limits", config.limits), admin_gid=_admin_gid(data["access"], path))
    if "enforce" in data:
        changes["enforce"] = _enforce(data["enforce"], path)
    if "cluster" in data:
        changes["cluster"] = _cluster(data["cluster"], path)
    if "monitor" in data or "alerts" in data:
        changes.update(_monitor(data.get("monitor", {}), data.get("alerts", []), path))
    if "metrics" in data:
        _check_table(data["metrics"], f"{path}: [metrics]", {"listen"})
        if "listen" in data["metrics"]:
            changes["metrics_listen"] = parse_listen(data["metrics"]["listen"], f"{path}: [metrics] listen")
    return replace(config, **changes)


def parse_listen(value: Any, where: str) -> tuple[str, int] | None:
    """`127.0.0.1:PORT` or `[::1]:PORT` (loopback only: anyone who can reach it reads every metric); "" is off."""
    if not isinstance(value, str):
        raise ConfigError(f"{where} must be a string such as \"127.0.0.1:9464\"")
    if not value:
        return None
    host, colon, port_text = value.rpartition(":")
    bracketed = host.startswith("[") and host.endswith("]")
    if bracketed:
        host = host[1:-1]
    try:
        address = ipaddress.ip_address(host) if colon else None
    except ValueError:
        address = None
    if address is not None and address.version == 6 and not bracketed:
        address = None  # ::1:9464 reads two ways: an IPv6 address goes in brackets
    if address is None or not port_text.isdecimal() or not 1 <= int(port_text) <= 65535:
        raise ConfigError(f"{where} must be a loopback address and a port, such as \"127.0.0.1:9464\" or "
                          f"\"[::1]:9464\"; got {value!r}")
    if not address.is_loopback:
        raise ConfigError(f"{where} must be a loopback address (127.0.0.1 or [::1]), got {value!r}: the "
                          f"endpoint has no authentication; to serve other hosts, put a proxy with TLS and "
                          f"authentication in front of it")
    return str(address), int(port_text)



def _check_table(table: Any, where: str, known: set[str]) -> None:
    """A config table is a table of known keys; say which are not."""
    if not isinstance(table, dict):
        raise ConfigError(f"{where} must be a table")
    unknown = sorted(set(table) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")

def _enforce(table: Any, path: Path) -> EnforcePolicy:
    where = f"{path}: [enforce]"
    _check_table(table, where, _ENFORCE_KEYS)
    policy = EnforcePolicy()
    modes = {m.value: m for m in EnforceMode}
    for key in ("mode", "max_mode"):
        if key in table and table[key] not in modes:
            raise ConfigError(f"{where} {key} must be one of {', '.join(modes)}")
    policy = replace(policy, mode=modes[table.get("mode", policy.mode.value)],
                     max_mode=modes[table.get("max_mode", policy.max_mode.value)])
    if "kill_grace" in table:
        grace = _duration(table["kill_grace"], f"{where} kill_grace")
        if not 0 <= grace <= 3600:
            raise ConfigError(f"{where} kill_grace must be between 0s and 1h")
        policy = replace(policy, kill_grace=grace)
    if "tasks_max" in table:
        value = table["tasks_max"]
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 4_194_304:
            raise ConfigError(f"{where} tasks_max must be a whole number from 1 to 4194304")
        policy = replace(policy, tasks_max=value)
    if "cgroup" in table:
        name = table["cgroup"]
        if not isinstance(name, str) or not name or "/" in name or name.startswith(".") or len(name) > 64:
            raise ConfigError(f"{where} cgroup must be a directory name (no '/'), e.g. mcpres")
        policy = replace(policy, cgroup=name)
    if "favordynmods" in table:
        if not isinstance(table["favordynmods"], bool):
            raise ConfigError(f"{where} favordynmods must be true or false")
        policy = replace(policy, favordynmods=table["favordynmods"])
    return policy


def _cluster(table: Any, path: Path) -> ClusterConfig:
    where = f"{path}: [cluster]"
    _check_table(table, where, _CLUSTER_KEYS)
    backend = table.get("backend", "slurm")
    if backend != "slurm":
        raise ConfigError(f"{where} backend must be \"slurm\" (the one cluster backend), got {backend!r}")
    names: dict[str, str | None] = {}
    for key in ("partition", "account"):
        value = table.get(key)
        if value is not None and (not isinstance(value, str) or not value.strip() or len(value) > 200
                                  or any(c.isspace() or c in ",=" for c in value)):
            raise ConfigError(f"{where} {key} must be a Slurm {key} name (no spaces or commas), got {value!r}")
        names[key] = value or None
    time_limit = None
    if "time_limit" in table:
        time_limit = _duration(table["time_limit"], f"{where} time_limit")
        if not 60 <= time_limit <= 365 * 86400:
            raise ConfigError(f"{where} time_limit must be between 1m and 365d")
    command = table.get("command", [])
    if not isinstance(command, list) or not all(isinstance(arg, str) and arg for arg in command):
        raise ConfigError(f"{where} command must be an array of non-empty strings, e.g. [\"ssh\", \"login1\"]")
    timeout = ClusterConfig.timeout
    if "timeout" in table:
        timeout = _duration(table["timeout"], f"{where} timeout")
        if not 0.1 <= timeout <= 600:
            raise ConfigError(f"{where} timeout must be between 100ms and 10m")
    return ClusterConfig(backend=backend, partition=names["partition"], account=names["account"],
                         time_limit=time_limit, command=tuple(command), timeout=timeout)


def _admin_gid(table: Any, path: Path) -> int | None:
    if not isinstance(table, dict) or set(table) - {"admin_group"}:
        raise ConfigError(f"{path}: [access] takes only admin_group")
    name = table.get("admin_group")
    if name is None or name == "":
        return None
    if not isinstance(name, str):
        raise ConfigError(f"{path}: [access] admin_group must be a group name")
    import grp

    try:
        gid = grp.getgrnam(name).gr_gid
    except KeyError:
        raise ConfigError(f"{path}: [access] admin_group {name!r} is not a group on this host") from None
    if gid == overflow_gid():
        # A client in another user namespace (a container on a shared socket) is seen with this gid for every
        # group the daemon's namespace does not map: it would be an admin.
        raise ConfigError(f"{path}: [access] admin_group {name!r} is gid {gid}, the kernel's overflow gid that "
                          "every unmapped group of a container's client shows as; choose a group of its own")
    return gid


def overflow_gid(path: str = "/proc/sys/kernel/overflowgid") -> int:
    """The gid the kernel reports for a group that the reader's user namespace does not map (65534 by default)."""
    try:
        with open(path, encoding="ascii") as value:
            return int(value.read())
    except (OSError, ValueError):
        return 65534


def _limits(table: Any, path: Path, policy: Policy) -> dict[str, Any]:
    where = f"{path}: [limits]"
    _check_table(table, where, _LIMIT_KEYS)
    counts = {}
    for key in ("max_connections", "max_connections_per_uid", "max_queued_per_uid", "max_allocations_per_uid",
                "max_pipelined"):
        if key in table:
            value = table[key]
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 1_000_000:
                raise ConfigError(f"{where} {key} must be a whole number from 1 to 1000000")
            counts[key] = value
    sizes = {}
    for key in _LIMIT_SIZES:
        if key in table:
            sizes[key] = _size(table[key], f"{where} {key}")
            if sizes[key] < MIN_BUFFER:
                raise ConfigError(f"{where} {key} must be at least {MIN_BUFFER} bytes")
    limits = Limits(
        max_connections=counts.get("max_connections", Limits.max_connections),
        max_connections_per_uid=counts.get("max_connections_per_uid", Limits.max_connections_per_uid),
        idle_timeout=_duration(table["idle_timeout"], f"{where} idle_timeout") if "idle_timeout" in table
        else Limits.idle_timeout,
        max_pipelined=counts.get("max_pipelined", Limits.max_pipelined),
        **sizes,
    )
    changes: dict[str, Any] = {"limits": limits}
    if "max_queued_per_uid" in counts or "max_allocations_per_uid" in counts:
        changes["policy"] = replace(
            policy, max_queued_per_uid=counts.get("max_queued_per_uid", policy.max_queued_per_uid),
            max_allocations_per_uid=counts.get("max_allocations_per_uid", policy.max_allocations_per_uid))
    return changes


def _monitor(table: Any, rules: Any, path: Path) -> dict[str, Any]:
    where = f"{path}: [monitor]"
    _check_table(table, where, _MONITOR_KEYS)
    settings: dict[str, Any] = {key: _duration(table[key], f"{where} {key}") for key in _MONITOR_DURATIONS & set(table)}
    if "interval" in settings and not 0.5 <= settings["interval"] <= 3600:
        raise ConfigError(f"{where} interval must be between 0.5s and 1h")
    for key in ("raw_points", "health_threshold"):
        if key in table:
            value = table[key]
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 1_000_000:
                raise ConfigError(f"{where} {key} must be a whole number")
            settings[key] = value
    if not isinstance(rules, list) or not all(isinstance(r, dict) for r in rules):
        raise ConfigError(f"{path}: alerts must be an array of tables ([[alerts]])")
    chosen = {} if table.get("default_alerts") is False else {r.name: r for r in default_rules()}
    for index, rule in enumerate(rules):
        converted = dict(rule)
        for key in ("for", "keep_firing_for"):
            if key in converted:
                converted[key] = _duration(converted[key], f"{path}: alerts[{index}] {key}")
        try:
            parsed = rule_from_config(converted)
        except DomainError as error:
            raise ConfigError(f"{path}: alerts[{index}]: {error.message}") from None
        measured = parsed.metric.split(".", 1)[-1]
        if measured not in METRICS:
            raise ConfigError(f"{path}: alerts[{index}] ({parsed.name}): metric {parsed.metric!r} does not exist; "
                              f"the metrics are {', '.join(sorted(METRICS))} (as type.metric, e.g. gpu.temperature_c)")
        chosen[parsed.name] = parsed
    changes: dict[str, Any] = {"monitor": MonitorPolicy(**settings, rules=tuple(chosen.values()))}
    if "prometheus_file" in table:
        if not isinstance(table["prometheus_file"], str):
            raise ConfigError(f"{where} prometheus_file must be a path")
        changes["prometheus_file"] = os.path.expanduser(table["prometheus_file"]) or None
    return changes


def _scheduler(table: Any, path: Path) -> dict[str, Any]:
    where = f"{path}: [scheduler]"
    _check_table(table, where, _SCHEDULER_KEYS)
    policy = Policy()
    changes: dict[str, Any] = {}
    if "aging_interval" in table:
        policy = replace(policy, aging_interval=_duration(table["aging_interval"], f"{where} aging_interval"))
    if "pool_interval" in table:
        interval = _duration(table["pool_interval"], f"{where} pool_interval")
        if not 0.05 <= interval <= 3600:
            raise ConfigError(f"{where} pool_interval must be between 50ms and 1h")
        policy = replace(policy, pool_interval=interval)
    if "preempt_grace" in table:
        policy = replace(policy, preempt_grace=_duration(table["preempt_grace"], f"{where} preempt_grace"))
    if "preemption" in table:
        if not isinstance(table["preemption"], bool):
            raise ConfigError(f"{where} preemption must be true or false")
        policy = replace(policy, preemption=table["preemption"])
    if "default_strategy" in table:
        try:
            policy = replace(policy, default_strategy=Strategy(table["default_strategy"]).value)
        except ValueError:
            raise ConfigError(f"{where} default_strategy must be one of {', '.join(s.value for s in Strategy)}") from None
    if "tick_interval" in table:
        tick = _duration(table["tick_interval"], f"{where} tick_interval")
        if not 0.01 <= tick <= 60:
            raise ConfigError(f"{where} tick_interval must be between 10ms and 60s")
        changes["tick_interval"] = tick
    changes["policy"] = policy
    return changes


def _retention(table: Any, path: Path) -> Retention:
    where = f"{path}: [retention]"
    _check_table(table, where, _RETENTION_KEYS)
    days = {}
    for key in ("events_days", "ended_allocations_days"):
        if key in table:
            value = table[key]
            if isinstance(value, bool) or not is_valid_number(value) or not 0 <= value <= 100 * 365:
                raise ConfigError(f"{where} {key} must be a number of days from 0 (keep for ever) to 36500")
            days[key] = float(value)
    retention = Retention(events_days=days.get("events_days", Retention.events_days),
                          ended_allocations_days=days.get("ended_allocations_days", Retention.ended_allocations_days))
    if "key_expiry" in table:
        expiry = _duration(table["key_expiry"], f"{where} key_expiry")
        if expiry > 100 * 365 * 86400:
            raise ConfigError(f"{where} key_expiry must be at most 100 years (0: never)")
        retention = replace(retention, key_expiry=expiry)
    return retention


def _duration(value: Any, where: str) -> float:
    if is_valid_number(value) and value >= 0:
        return float(value)
    if isinstance(value, str):
        try:
            seconds = parse_duration(value)
        except UnitError as error:
            raise ConfigError(f"{where}: {error}") from None
        if seconds is not None:
            return seconds
    raise ConfigError(f"{where}: expected a duration such as 30s, 5m or 1h")


def _pools(entries: Any, path: Path) -> tuple[PoolSpec, ...]:
    """[[pools]] tables: the fields of `mcpctl pool create` (pools.create), durations as "30s" or seconds."""
    if not isinstance(entries, list):
        raise ConfigError(f"{path}: pools must be an array of tables ([[pools]])")
    specs: list[PoolSpec] = []
    for index, entry in enumerate(entries):
        where = f"{path}: pools[{index}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where} must be a table")
        table = dict(entry)
        for key in ("timeout", "cooldown"):
            if key in table:
                table[key] = _duration(table[key], f"{where} {key}")
        try:
            spec = pool_spec(table)
        except InvalidParams as error:
            raise ConfigError(f"{where}: {error.message}") from None
        if spec.name in {s.name for s in specs}:
            raise ConfigError(f"{where}: a pool named {spec.name!r} is declared twice")
        specs.append(spec)
    return tuple(specs)


def _resources(entries: Any, path: Path) -> tuple[Resource, ...]:
    if not isinstance(entries, list):
        raise ConfigError(f"{path}: resources must be an array of tables ([[resources]])")
    resources: list[Resource] = []
    seen: set[str] = set()
    for index, entry in enumerate(entries):
        where = f"{path}: resources[{index}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where} must be a table")
        unknown = sorted(set(entry) - _RESOURCE_KEYS)
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(_RESOURCE_KEYS))})")
        try:
            name = check_text(entry.get("name"), "name", 200)
            check_custom_name(name)
        except InvalidParams as error:
            raise ConfigError(f"{where}: {error.message}") from None
        if name in seen:
            raise ConfigError(f"{where}: resource {name!r} is declared twice")
        seen.add(name)
        try:
            capacity = check_quantity(entry.get("capacity"), "capacity")
        except InvalidParams as error:
            raise ConfigError(f"{where} ({name}): {error.message}") from None
        cost = entry.get("cost_per_unit_hour")
        if cost is not None and (not is_valid_number(cost) or not 0 <= cost <= MAX_QUANTITY):
            raise ConfigError(f"{where} ({name}): cost_per_unit_hour must be a number from 0 to {MAX_QUANTITY:g}")
        unit = entry.get("unit", "units")
        if not isinstance(unit, str) or not unit:
            raise ConfigError(f"{where} ({name}): unit must be a non-empty string")
        labels = entry.get("labels", {})
        if not isinstance(labels, dict) or not all(
            isinstance(v, (str, bool)) or is_valid_number(v) for v in labels.values()
        ):
            raise ConfigError(f"{where} ({name}): labels must be a table of strings, numbers or booleans")
        resources.append(
            Resource(
                name=name,
                type=ResourceType.CUSTOM,
                capacity=capacity,
                unit=unit,
                labels=labels,
                cost_per_unit_hour=None if cost is None else float(cost),
                source="config",
            )
        )
    return tuple(resources)


def _size(value: Any, where: str, allow_zero: bool = False) -> int:
    if allow_zero and value in (0, "0"):
        return 0
    size: int | None = None
    if is_valid_number(value) and value > 0:
        size = int(value)
    elif isinstance(value, str):
        try:
            size = parse_size(value)
        except UnitError as error:
            raise ConfigError(f"{where}: {error}") from None
    if size is None:
        raise ConfigError(f"{where}: expected a size such as 2G or a number of bytes")
    if size > MAX_QUANTITY:
        raise ConfigError(f"{where}: at most {MAX_QUANTITY:g} bytes, got {value!r}")
    return size


def _memory_reserve(value: Any, where: str) -> int:
    """A size to keep out of the memory resource; it must leave some memory to allocate."""
    reserve = _size(value, where, allow_zero=True)
    total = host_memory()
    if total is not None and reserve >= total:
        raise ConfigError(f"{where}: {value!r} ({reserve} bytes) is not less than this host's memory ({total} bytes);"
                          f" the reserve is what allocations may not take: give less, such as \"1G\"")
    return reserve


def host_memory() -> int | None:
    """This host's physical memory in bytes, where the system says."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return None


def _parse_mode(value: Any, where: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        # TOML reads 660 and 0o660 alike as numbers: a decimal 438 (0o666) is seldom what was meant. Ask for the
        # one spelling that cannot be misread.
        digits = str(value)
        as_digits = int(digits, 8) if value >= 0 and set(digits) <= set("01234567") else None
        meant = f"\"0{digits}\"" if as_digits is not None and _usable_mode(as_digits) else f"\"{value:04o}\""
        raise ConfigError(f"{where}: {value} is a number; write the octal mode as a string, such as \"0660\" "
                          f"(did you mean {meant}? {value} in decimal is {value:#o})")
    if isinstance(value, str):
        try:
            mode = int(value, 8)
        except ValueError:
            raise ConfigError(f"{where}: expected an octal mode such as 0600 or 0660, got {value!r}") from None
    else:
        raise ConfigError(f"{where}: expected an octal mode string such as \"0660\"")
    if not _usable_mode(mode):
        raise ConfigError(f"{where}: mode {oct(mode)} must keep read and write for the owner (e.g. 0600, 0660)")
    return mode


def _usable_mode(mode: int) -> bool:
    return 0 <= mode <= 0o777 and mode & 0o600 == 0o600


def _parse_log_level(value: Any, where: str) -> str:
    if not isinstance(value, str) or value.lower() not in LOG_LEVELS:
        raise ConfigError(f"{where}: expected one of {', '.join(LOG_LEVELS)}, got {value!r}")
    return value.lower()


# -- writing a configuration back ------------------------------------------------


def as_table(config: Config) -> dict[str, Any]:
    """`config` as the TOML file's tables: every key, defaults included, that `load` reads back to `config`.

    Durations are written in seconds and sizes in bytes, which the file accepts as well as "5m" or "1G".
    """
    table: dict[str, Any] = {
        "socket": config.socket,
        "database": config.database,
        "socket_mode": f"{config.socket_mode:04o}",
        "gpu_replay": config.gpu_replay or "",
        "memory_reserve": config.memory_reserve,
        "default_link_speed": int(config.default_link_bytes_per_s),
        "log_level": config.log_level,
    }
    policy, monitor, limits, retention = config.policy, config.monitor, config.limits, config.policy.retention
    table["scheduler"] = {"aging_interval": policy.aging_interval, "default_strategy": policy.default_strategy,
                          "preemption": policy.preemption, "preempt_grace": policy.preempt_grace,
                          "tick_interval": config.tick_interval, "pool_interval": policy.pool_interval}
    defaults = {rule.name: rule for rule in default_rules()}
    keeps_defaults = all(rule in monitor.rules for rule in defaults.values())
    table["monitor"] = {"interval": monitor.interval, "raw_max_age": monitor.raw_max_age,
                        "raw_points": monitor.raw_points, "rollup_max_age": monitor.rollup_max_age,
                        "health_interval": monitor.health_interval, "health_threshold": monitor.health_threshold,
                        "forecast_window": monitor.forecast_window, "forecast_horizon": monitor.forecast_horizon,
                        "prometheus_file": config.prometheus_file or "", "default_alerts": keeps_defaults}
    table["limits"] = {"max_connections": limits.max_connections,
                       "max_connections_per_uid": limits.max_connections_per_uid,
                       "idle_timeout": limits.idle_timeout, "max_queued_per_uid": policy.max_queued_per_uid,
                       "max_allocations_per_uid": policy.max_allocations_per_uid,
                       "max_pipelined": limits.max_pipelined,
                       **{key: getattr(limits, key) for key in _LIMIT_SIZES}}
    table["retention"] = {"events_days": retention.events_days,
                          "ended_allocations_days": retention.ended_allocations_days,
                          "key_expiry": retention.key_expiry}
    table["access"] = {"admin_group": _group_name(limits.admin_gid)}
    enforce = config.enforce
    table["enforce"] = {"mode": enforce.mode.value, "max_mode": enforce.max_mode.value,
                        "kill_grace": enforce.kill_grace, "tasks_max": enforce.tasks_max, "cgroup": enforce.cgroup,
                        "favordynmods": enforce.favordynmods}
    if config.metrics_listen is not None:
        host, port = config.metrics_listen
        table["metrics"] = {"listen": f"[{host}]:{port}" if ":" in host else f"{host}:{port}"}
    if config.cluster is not None:
        cluster = config.cluster
        table["cluster"] = {"backend": cluster.backend, "command": list(cluster.command), "timeout": cluster.timeout,
                            **{key: value for key, value in (("partition", cluster.partition),
                                                             ("account", cluster.account),
                                                             ("time_limit", cluster.time_limit)) if value is not None}}
    if config.resources:
        table["resources"] = [_resource_table(resource) for resource in config.resources]
    if config.pools:
        table["pools"] = [_pool_table(spec) for spec in config.pools]
    rules = [rule for rule in monitor.rules if not (keeps_defaults and defaults.get(rule.name) == rule)]
    if rules:
        table["alerts"] = [_rule_table(rule) for rule in rules]
    return table


def as_toml(config: Config) -> str:
    import tomli_w

    return tomli_w.dumps(as_table(config))


def _group_name(gid: int | None) -> str:
    if gid is None:
        return ""
    import grp

    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def _resource_table(resource: Resource) -> dict[str, Any]:
    table: dict[str, Any] = {"name": resource.name, "capacity": resource.capacity, "unit": resource.unit}
    if resource.cost_per_unit_hour is not None:
        table["cost_per_unit_hour"] = resource.cost_per_unit_hour
    if resource.labels:
        table["labels"] = dict(resource.labels)
    return table


def _pool_table(spec: PoolSpec) -> dict[str, Any]:
    table: dict[str, Any] = {"name": spec.name, "factory": spec.factory.value, "min": spec.min_size,
                             "strategy": spec.strategy.value, "timeout": spec.timeout_s,
                             "scale_up_at": spec.scale.up_at, "scale_down_at": spec.scale.down_at,
                             "target": spec.scale.target, "cooldown": spec.scale.cooldown_s}
    optional = {"max": spec.max_size, "members": list(spec.members) or None, "select": list(spec.select) or None,
                "parent": spec.parent, "slot_size": spec.slot_size, "create": spec.create, "destroy": spec.destroy,
                "cost_per_unit_hour": spec.cost_per_unit_hour, "labels": dict(spec.labels) or None}
    table.update({key: value for key, value in optional.items() if value is not None})
    return table


def _rule_table(rule: AlertRule) -> dict[str, Any]:
    table: dict[str, Any] = {"name": rule.name, "metric": rule.metric, "selector": rule.selector}
    table.update({level.value: threshold for level, threshold in rule.thresholds})
    if not rule.above:
        table["below"] = True
    if rule.clear is not None:
        table["clear"] = rule.clear
    table["for"] = rule.pending_for
    table["keep_firing_for"] = rule.keep_firing_for
    return table
