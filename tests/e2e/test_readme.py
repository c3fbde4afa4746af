"""The README's examples run as written against a real daemon."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, DaemonProcess

pytestmark = pytest.mark.e2e

README = (ROOT / "README.md").read_text()


def sh_blocks(section: str) -> list[str]:
    body = README.split(f"## {section}", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```sh\n(.*?)```", body, flags=re.S)


def bash(script: str, daemon: DaemonProcess) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, MCPRES_SOCKET=daemon.socket,
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    return subprocess.run(["bash", "-euo", "pipefail", "-c", script], capture_output=True, text=True, env=env,
                          timeout=60)


def test_the_readme_opens_with_the_two_commands() -> None:
    first_block = re.search(r"```sh\n(.*?)```", README, flags=re.S)
    assert first_block is not None
    lines = [line for line in first_block.group(1).splitlines() if line.strip()]
    assert len(lines) == 2
    assert "mcpresd" in lines[0] and "pytest" in lines[1]
    assert README.index(first_block.group(0)) < 200


@pytest.mark.parametrize("index", [i for i, b in enumerate(sh_blocks("Using it from a shell script")) if "$(" in b])
def test_the_shell_script_examples_run(daemon: DaemonProcess, index: int) -> None:
    script = sh_blocks("Using it from a shell script")[index]
    done = bash(script, daemon)
    assert done.returncode == 0, done.stderr
    assert daemon.call("allocations.list") == []


def test_the_command_examples_without_placeholders_run(daemon: DaemonProcess) -> None:
    (block,) = [b for b in sh_blocks("Using it from a shell script") if "mcpctl status" in b]
    commands = [line.split("  #")[0].strip() for line in block.splitlines() if line.startswith("mcpctl")]
    stripped = [re.sub(r"\[[^]]*\]", "", c) for c in commands]
    runnable = [c for c in stripped if not re.search(r"\bID\b", c)]
    assert len(runnable) >= 6
    for command in runnable:
        done = bash(command, daemon)
        assert done.returncode == 0, f"{command}: {done.stderr}"


def test_the_monitoring_examples_run(daemon: DaemonProcess) -> None:
    (block,) = sh_blocks("Watching the machine")
    commands = [line.split("  #")[0].strip() for line in block.splitlines() if line.startswith("mcpctl")]
    assert len(commands) >= 5
    for command in commands:
        done = bash(command, daemon)
        assert done.returncode == 0, f"{command}: {done.stderr}"


def test_the_pool_and_cost_examples_run(daemon: DaemonProcess) -> None:
    (block,) = sh_blocks("Pools, cost and budgets")
    commands = [line.split("  #")[0].strip() for line in block.splitlines() if line.startswith("mcpctl")]
    assert len(commands) >= 8
    for command in commands:
        done = bash(command, daemon)
        assert done.returncode == 0, f"{command}: {done.stderr}"
    assert daemon.call("pools.get", {"name": "builds"})["size"] >= 1
    assert [b["subject"] for b in daemon.call("budgets.list")] == ["render"]


def test_the_readme_shows_how_to_try_the_gpu_parts_without_a_gpu(tmp_path: Path) -> None:
    [line] = [l for l in README.splitlines() if "--gpu-replay" in l and l.startswith(".venv/bin/mcpresd")]
    capture = line.split("--gpu-replay", 1)[1].split()[0]
    assert (ROOT / capture).is_file()
    daemon = DaemonProcess(tmp_path, gpu_replay=ROOT / capture)
    daemon.start()
    try:
        [gpu] = daemon.call("resources.list", {"type": "gpu"})
    finally:
        daemon.stop()
    assert gpu["uuid"] and "H100" in gpu["labels"]["name"]
    assert "about 15 minutes on 2 cores" in README
