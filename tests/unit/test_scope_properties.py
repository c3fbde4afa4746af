"""The systemd-scope backend's scope for a step: the unit's properties per mode, and the systemd-run command line
mcpctl execs with them. Pure values."""

from __future__ import annotations

import pytest

from mcpctl.launch import systemd_run_argv
from mcpresd.core.enforcement import Grant, limits_for
from mcpresd.enforce.systemd_scope import properties, scope_path, unit_name
from mcpresd.protocol import EnforceMode

SOFT, HARD = EnforceMode.SOFT, EnforceMode.HARD
MIB = 1 << 20
ALWAYS = ["CPUAccounting=yes", "MemoryAccounting=yes", "TimeoutStopSec=5000ms"]


@pytest.mark.parametrize(("mode", "grant", "expected"), [
    (SOFT, Grant(cpu=0.5, memory=64 * MIB), ["CPUWeight=50", "MemoryHigh=67108864"]),
    (SOFT, Grant(), []),
    (HARD, Grant(cpu=1.5, memory=128 * MIB),
     ["CPUWeight=150", "CPUQuota=150%", "MemoryMax=134217728", "MemorySwapMax=0", "TasksMax=4096"]),
    (HARD, Grant(cpu=2, cores=(0, 2)),
     ["CPUWeight=200", "CPUQuota=200%", "AllowedCPUs=0,2", "TasksMax=4096"]),
    # systemd refuses more than two decimals ("CPU quota '33.333%' invalid", systemd 252)
    (HARD, Grant(cpu=0.33333), ["CPUWeight=33", "CPUQuota=33.33%", "TasksMax=4096"]),
    (HARD, Grant(cpu=0.001), ["CPUWeight=1", "CPUQuota=1%", "TasksMax=4096"]),
])
def test_each_mode_gives_the_scope_the_v2_backends_limits_as_properties(mode, grant, expected):
    assert properties(limits_for(mode, grant), kill_grace=5.0) == ALWAYS + expected


def test_the_scope_is_stopped_with_the_daemons_kill_grace():
    assert "TimeoutStopSec=2500ms" in properties(limits_for(SOFT, Grant(cpu=1)), kill_grace=2.5)


def test_the_step_runs_the_command_through_systemd_run_in_its_unit_and_slice():
    scope = {"unit": unit_name("0a1b", 4242), "slice": "mcpres.slice", "properties": ["CPUWeight=50", "MemoryHigh=1"]}

    assert systemd_run_argv(scope, ["python", "train.py", "--", "x"]) == [
        "systemd-run", "--user", "--scope", "--quiet", "--collect", "--unit=alloc-0a1b-4242.scope",
        "--slice=mcpres.slice", "--property=CPUWeight=50", "--property=MemoryHigh=1", "--", "python", "train.py",
        "--", "x"]


@pytest.mark.parametrize(("text", "expected"), [
    ("0::/user.slice/user-1000.slice/user@1000.service/mcpres.slice/alloc-1-2.scope\n",
     "/user.slice/user-1000.slice/user@1000.service/mcpres.slice/alloc-1-2.scope"),
    ("12:pids:/x\n1:name=systemd:/y\n0::/z.scope\n", "/z.scope"),
    ("4:memory:/a\n1:name=systemd:/b\n", None),  # cgroup v1 only
])
def test_the_scopes_path_is_the_unified_hierarchys_line_of_proc_pid_cgroup(text, expected):
    assert scope_path(text) == expected
