"""Shell completion as people use it: the scripts `mcpctl completion SHELL` prints, sourced in real shells."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import DaemonProcess, ok, run_cli

pytestmark = pytest.mark.e2e

BIN = Path(sys.executable).parent


def env_for(socket_path: str) -> dict[str, str]:
    return dict(os.environ, MCPRES_SOCKET=socket_path, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")


def bash_complete(socket_path: str, *words: str) -> subprocess.CompletedProcess[str]:
    """What bash offers for the last of `words`, through the sourced script's completion function."""
    quoted = " ".join(f"'{w}'" for w in words)
    script = (f'source <(mcpctl completion bash); COMP_WORDS=({quoted}); COMP_CWORD={len(words) - 1}; '
              'complete -p mcpctl >/dev/null; _mcpctl_completion mcpctl; printf "%s\\n" "${COMPREPLY[@]}"')
    return subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=env_for(socket_path),
                          timeout=60)


@pytest.mark.parametrize("words, expected", [
    (("mcpctl", "allo"), {"allocate", "allocations"}),
    (("mcpctl", "allocate", "--prio"), {"--priority"}),
    (("mcpctl", "allocate", "--priority", ""), {"low", "normal", "high", "critical"}),
    (("mcpctl", "pool", "dr"), {"drain"}),
    (("mcpctl", "completion", ""), {"bash", "zsh", "fish"}),
])
def test_bash_completes_commands_options_and_choices(daemon: DaemonProcess, words: tuple[str, ...],
                                                     expected: set[str]) -> None:
    done = bash_complete(daemon.socket, *words)

    assert done.returncode == 0, done.stderr
    assert set(done.stdout.split()) == expected


def test_bash_completes_allocation_ids_and_resource_names_from_the_daemon(daemon: DaemonProcess) -> None:
    held = ok(daemon, "allocate", "--res", "licence=1").strip()

    assert bash_complete(daemon.socket, "mcpctl", "release", "").stdout.split() == [held]
    assert bash_complete(daemon.socket, "mcpctl", "explain", held[:6]).stdout.split() == [held]
    assert bash_complete(daemon.socket, "mcpctl", "allocate", "--res", "li").stdout.split() == ["licence="]
    assert "slot" in bash_complete(daemon.socket, "mcpctl", "resource", "remove", "").stdout.split()


@pytest.mark.parametrize("words", [("mcpctl", "metrics", "mem"), ("mcpctl", "predict", "mem"),
                                   ("mcpctl", "resource", "set-cost", "mem")])
def test_bash_completes_the_resource_argument_of_every_command_that_takes_one(daemon: DaemonProcess,
                                                                              words: tuple[str, ...]) -> None:
    assert bash_complete(daemon.socket, *words).stdout.split() == ["memory"]


def test_completion_without_a_daemon_offers_what_it_can_and_says_nothing(tmp_path: Path) -> None:
    absent = str(tmp_path / "none.sock")

    commands = bash_complete(absent, "mcpctl", "rel")
    ids = bash_complete(absent, "mcpctl", "release", "")

    assert commands.stdout.split() == ["release"] and commands.stderr == ""
    assert ids.returncode == 0 and ids.stdout.strip() == "" and ids.stderr == ""


ZSH_DRIVER = r"""
zmodload zsh/zpty
zpty z zsh -f -i
zpty -w z 'PS1="> "; autoload -U compinit; compinit -u -D; source <(mcpctl completion zsh); print READ""Y'
zpty -r z out '*READY*'
zpty -w -n z $'mcpctl rele\t'
zpty -r z out '*release*'
zpty -w -n z $'\t'
zpty -r z out "*$1*"
print -r -- "DONE: $out"
zpty -d z
"""


@pytest.mark.skipif(shutil.which("zsh") is None, reason="zsh is not installed")
def test_zsh_completes_a_command_and_then_an_allocation_id_at_a_real_prompt(daemon: DaemonProcess,
                                                                           tmp_path: Path) -> None:
    held = ok(daemon, "allocate", "--res", "licence=1").strip()
    driver = tmp_path / "drive.zsh"
    driver.write_text(ZSH_DRIVER)

    done = subprocess.run(["zsh", "-f", str(driver), held], capture_output=True, text=True,
                          env=env_for(daemon.socket), timeout=60)

    assert done.returncode == 0, done.stderr
    assert "DONE:" in done.stdout and held in done.stdout.split("DONE:", 1)[1]


@pytest.mark.skipif(shutil.which("fish") is None, reason="fish is not installed")
def test_fish_completes_a_command(daemon: DaemonProcess) -> None:
    script = "mcpctl completion fish | source; complete -C 'mcpctl rele'"
    done = subprocess.run(["fish", "-c", script], capture_output=True, text=True, env=env_for(daemon.socket),
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[0] == "release"


def test_an_unknown_shell_is_a_usage_error() -> None:
    done = run_cli("completion", "tcsh")
    assert done.returncode == 2 and done.stdout == "" and "bash, zsh, fish" in done.stderr


def test_the_fast_path_imports_no_completion_code(daemon: DaemonProcess) -> None:
    probe = ("import sys; from mcpctl.main import main; code = main(['allocate', '--res', 'slot=1', '--holder-pid', "
             "'1']); print(code, sorted(m for m in sys.modules if m in ('typer', 'click', 'mcpctl.complete')))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env_for(daemon.socket),
                          timeout=60)

    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "0 []"


HOSTILE_DAEMON = r"""
import json, socket, sys, threading, time
path, mode = sys.argv[1], sys.argv[2]
names = json.loads(sys.argv[3]) if len(sys.argv) > 3 else []
server = socket.socket(socket.AF_UNIX)
server.bind(path)
server.listen(8)
print("listening", flush=True)

def serve(conn):
    lines = conn.makefile("rb")
    for line in lines:
        request = json.loads(line)
        if mode == "dribble":
            while True:
                conn.sendall(b" ")
                time.sleep(0.1)
        if request.get("method") == "allocations.list":
            rows = [{"id": n, "items": [{"resource": n, "amount": 1}]} for n in names]
        else:
            rows = [{"name": n} for n in names]
        conn.sendall(json.dumps({"jsonrpc": "2.0", "id": request.get("id"), "result": rows}).encode() + b"\n")

while True:
    conn, _ = server.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
"""

HOSTILE_NAMES = ["licence:ok-1", 'a\\"*(e+{touch,PWNED}+)\\"', "b$(touch PWNED)", "c`touch PWNED`",
                 "d'; touch PWNED; '", "e\x1b[31mred", "f\nnewline", "g with space", "h*", "i\\"]


@pytest.fixture
def hostile_daemon(tmp_path: Path):
    """A process serving the socket as the daemon would, answering what the test tells it to."""
    started: list[subprocess.Popen[str]] = []
    (tmp_path / "hostile.py").write_text(HOSTILE_DAEMON)

    def start(mode: str, names: list[str] = []) -> str:
        path = str(tmp_path / f"{mode}.sock")
        process = subprocess.Popen([sys.executable, str(tmp_path / "hostile.py"), path, mode, json.dumps(names)],
                                   stdout=subprocess.PIPE, text=True)
        started.append(process)
        assert process.stdout is not None and process.stdout.readline() == "listening\n"
        return path

    yield start
    for process in started:
        process.kill()
        process.wait(timeout=30)


@pytest.mark.parametrize("words", [("mcpctl", "resource", "remove", ""), ("mcpctl", "release", ""),
                                   ("mcpctl", "allocate", "--res", "")])
def test_completion_offers_only_plain_names_from_a_daemon(hostile_daemon, tmp_path: Path,
                                                          words: tuple[str, ...]) -> None:
    socket_path = hostile_daemon("names", HOSTILE_NAMES)
    zsh = subprocess.run(["mcpctl"], capture_output=True, text=True, cwd=tmp_path, timeout=60,
                         env=dict(env_for(socket_path), _MCPCTL_COMPLETE="complete_zsh",
                                  _TYPER_COMPLETE_ARGS=" ".join(words)))
    bash = bash_complete(socket_path, *words)
    offered = zsh.stdout.replace("\\\\:", ":")  # Typer's own escape of ':' for zsh

    assert zsh.returncode == 0 and "licence:ok-1" in offered
    values = offered.removeprefix("_arguments '*: :((").removesuffix("))'\n")
    assert all(re.fullmatch(r'"[\w.:/@+%,=-]+"(:"[\w.:/@+%,=? -]*")?', line, re.ASCII)
               for line in values.split("\n")), values
    assert {line.removesuffix("=") for line in bash.stdout.splitlines()} == {"licence:ok-1"}
    assert not list(tmp_path.glob("PWNED*"))


@pytest.mark.skipif(shutil.which("zsh") is None, reason="zsh is not installed")
def test_zsh_completion_runs_no_code_a_daemon_names(hostile_daemon, tmp_path: Path) -> None:
    socket_path = hostile_daemon("names", HOSTILE_NAMES)
    driver = tmp_path / "drive.zsh"
    driver.write_text(ZSH_DRIVER.replace("mcpctl rele\\t", "mcpctl resource remove \\t")
                      .replace("'*release*'", "'*remove*'"))

    done = subprocess.run(["zsh", "-f", str(driver), "licence:ok-1"], capture_output=True, text=True,
                          cwd=tmp_path, env=env_for(socket_path), timeout=60)

    assert done.returncode == 0, done.stderr
    assert "licence:ok-1" in done.stdout.split("DONE:", 1)[1]
    assert not list(tmp_path.glob("PWNED*"))


def test_completion_gives_up_on_a_daemon_that_dribbles_its_reply(hostile_daemon) -> None:
    socket_path = hostile_daemon("dribble")

    done = bash_complete(socket_path, "mcpctl", "release", "")  # without a bound on the whole answer: never returns

    assert done.returncode == 0 and done.stdout.strip() == "" and done.stderr == ""
