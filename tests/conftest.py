"""Shared fixtures: a real mcpresd on a temporary socket and database."""

from __future__ import annotations

import grp
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mcpctl.client import Client, DaemonUnreachable

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
GPU_CAPTURE = FIXTURES / "h100-nvml-capture.json"
H100_UUID = "GPU-ba485a4c-f4ba-e6ae-4d48-e42a77690a6e"

CONFIG = """
memory_reserve = "0"

[[resources]]
name = "licence"
capacity = 2
unit = "seats"
cost_per_unit_hour = 1.5

[[resources]]
name = "slot"
capacity = 10
unit = "slots"
"""



def capture_with_process(tmp: Path, pid: int) -> Path:
    """A variant of the H100 capture whose compute process is `pid`, a live process the test controls, with the
    load held: written to `tmp` for `DaemonProcess(gpu_replay=...)`.

    The capture recorded its one compute process (the load it ran, `load_pid` 464) only as repr() strings of
    pynvml objects, which `ReplayNvml` counts but cannot attribute. The variant replaces each such record with
    `{"pid": pid, "usedGpuMemory": ...}`, the device memory that sample used above the idle snapshot (what the
    load took). Its trace is the load's part only (from the first sample with the process), and it has no
    `after`, so the last loaded sample is held: the process stays on the GPU for as long as the test runs.
    No production path knows of this: ReplayNvml plays any capture whose records carry fields.
    """
    capture = json.loads(GPU_CAPTURE.read_text())
    idle_used = capture["idle"][0]["memory_info"]["used"]
    loaded = [entry for entry in capture["load_trace"] if entry.get("compute_processes")]
    for entry in loaded:
        entry["compute_processes"] = [
            {"pid": pid, "usedGpuMemory": entry["memory_info"]["used"] - idle_used} for _ in entry["compute_processes"]
        ]
    capture["load_trace"] = loaded
    capture["after"] = []
    path = tmp / f"h100-capture-pid-{pid}.json"
    path.write_text(json.dumps(capture))
    return path


def mcpresd_command() -> list[str]:
    """The installed `mcpresd` console script beside this interpreter, as a user runs it, so the packaging is
    what is tested. Outside CI, a checkout without it (not installed with pip) falls back to `python -m mcpresd`;
    in CI (CI set) its absence is a failure, never a silent fallback."""
    installed = Path(sys.executable).parent / "mcpresd"
    if installed.exists():
        return [str(installed)]
    if os.environ.get("CI"):
        raise RuntimeError(f"{installed} is missing: install the package (pip install -e .) before testing")
    return [sys.executable, "-m", "mcpresd"]


class DaemonProcess:
    """mcpresd run as a user runs it, as a subprocess of this interpreter."""

    def __init__(self, tmp: Path, *, config: str = CONFIG, gpu_replay: Path | None = GPU_CAPTURE,
                 extra_args: tuple[str, ...] = (), env: dict[str, str] | None = None) -> None:
        self.tmp = tmp
        self.env = env
        self.socket = str(tmp / "mcpresd.sock")
        self.db = str(tmp / "state" / "mcpresd.db")
        self.config_path = tmp / "mcpresd.toml"
        self.config_path.write_text(config)
        self.log_path = tmp / "mcpresd.log"
        self.args = [*mcpresd_command(), "--config", str(self.config_path), "--socket", self.socket,
                     "--db", self.db, *extra_args]
        if gpu_replay is not None:
            self.args += ["--gpu-replay", str(gpu_replay)]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 15.0, env: dict[str, str] | None = None) -> None:
        """Start mcpresd; `env` (or the one given at construction) is added to this process's environment."""
        extra = env if env is not None else self.env
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.args, stdout=log, stderr=log, cwd=ROOT,
                                     env=None if extra is None else {**os.environ, **extra})
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mcpresd exited with {self.proc.returncode}:\n{self.log()}")
            try:
                # It listens before it opens its database (early clients wait in the backlog): ready once it answers.
                with Client(self.socket, timeout=max(0.1, deadline - time.monotonic())) as client:
                    client.call("daemon.status")
                return
            except DaemonUnreachable:
                time.sleep(0.02)
        raise RuntimeError(f"mcpresd did not start in {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def restart(self) -> None:
        self.stop()
        self.start()

    def client(self) -> Client:
        return Client(self.socket, timeout=10.0)

    def call(self, method: str, params: dict[str, Any] | None = None) -> Any:
        with self.client() as client:
            return client.call(method, params)

    def raw(self, data: bytes, *, shutdown: bool = True, timeout: float = 5.0) -> list[Any]:
        """Send raw bytes on a fresh connection; return every JSON line the daemon answered."""
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(timeout)
            sock.connect(self.socket)
            try:
                sock.sendall(data)
                if shutdown:
                    sock.shutdown(socket.SHUT_WR)
            except (BrokenPipeError, ConnectionResetError):
                pass  # a connection refused at accept is answered and closed before the request is written: read it
            chunks = []
            while True:
                try:
                    chunk = sock.recv(65536)
                except (ConnectionResetError, TimeoutError):
                    break
                if not chunk:
                    break
                chunks.append(chunk)
        return [json.loads(line) for line in b"".join(chunks).splitlines() if line.strip()]

    def snapshot(self) -> dict[str, list[tuple[Any, ...]]]:
        """Every row of the state tables, read straight from the database file."""
        conn = sqlite3.connect(self.db)
        try:
            return {
                table: conn.execute(f"SELECT * FROM {table} ORDER BY 1, 2").fetchall()
                for table in ("resources", "allocations", "allocation_items")
            }
        finally:
            conn.close()


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[DaemonProcess]:
    process = DaemonProcess(tmp_path)
    process.start()
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture(scope="session")
def throwaway_group() -> Iterator[grp.struct_group]:
    """A system group made for this test session and removed after it (root only: skips otherwise), so tests of
    group rights depend on no group the host happens to have."""
    if os.getuid() != 0:
        pytest.skip("needs root to create a group")
    name = f"mcpres-test-{os.getpid()}"
    done = subprocess.run(["groupadd", "--system", name], capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise RuntimeError(f"groupadd {name} failed: {done.stderr}")
    try:
        yield grp.getgrnam(name)
    finally:
        subprocess.run(["groupdel", name], capture_output=True, timeout=60)


@pytest.fixture
def bin_dir() -> Path:
    """The directory of the installed `mcpctl` and `mcpresd` commands (the test interpreter's venv)."""
    return Path(sys.executable).parent


def run_cli(*args: str, socket_path: str | None = None, env: dict[str, str] | None = None,
            input: str | None = None, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    """Run the installed mcpctl as a user would."""
    full_env = dict(os.environ)
    full_env.pop("MCPRES_SOCKET", None)
    if socket_path is not None:
        full_env["MCPRES_SOCKET"] = socket_path
    full_env.update(env or {})
    mcpctl = str(Path(sys.executable).parent / "mcpctl")
    return subprocess.run([mcpctl, *args], capture_output=True, text=True, env=full_env, input=input,
                          timeout=timeout)


def connections_to(socket_path: str) -> int:
    """How many client connections the daemon listening at `socket_path` holds open now: in /proc/net/unix an
    accepted socket carries its listener's path, in state 03 (connected)."""
    with open("/proc/net/unix") as table:
        rows = [line.split() for line in table.read().splitlines()[1:]]
    return sum(1 for row in rows if len(row) == 8 and row[7] == socket_path and row[5] == "03")


def wait_for_connections(socket_path: str, count: int, timeout: float = 30.0) -> None:
    """Wait until the daemon at `socket_path` holds at least `count` client connections."""
    deadline = time.monotonic() + timeout
    while connections_to(socket_path) < count:
        if time.monotonic() > deadline:
            raise AssertionError(f"the daemon did not hold {count} connections within {timeout}s")
        time.sleep(0.01)


# -- the installed mcpctl against a DaemonProcess (e2e tests) ---------------------------

def cli(daemon: DaemonProcess, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return run_cli(*args, socket_path=daemon.socket, env=env)


def ok(daemon: DaemonProcess, *args: str) -> str:
    result = cli(daemon, *args)
    assert result.returncode == 0, f"mcpctl {' '.join(args)} exited {result.returncode}: {result.stderr}"
    return result.stdout


def as_json(daemon: DaemonProcess, *args: str) -> Any:
    return json.loads(ok(daemon, *args, "--json"))
