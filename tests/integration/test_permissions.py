"""Who may see and change what, checked with two real uids against a real daemon on a shared (0666) socket.

The daemon runs as root; the other user is uid 65534 run through `setpriv` (no user entry needed), with no
supplementary groups or with the session's throwaway admin group as its only supplementary one: its primary
group stays 65534, so admin rights can only come from the supplementary group. The client is a stdlib-only
script on stdin/stdout, so nothing of this checkout needs to be readable by that uid.
"""

from __future__ import annotations

import grp
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from mcpresd.protocol import ErrorCode
from tests.conftest import CONFIG, DaemonProcess

OTHER = 65534

pytestmark = pytest.mark.skipif(os.getuid() != 0, reason="needs root to act as a second user (uid 65534)")

CLIENT = """
import json, socket, sys
path, requests = sys.argv[1], json.load(sys.stdin)
replies = []
with socket.socket(socket.AF_UNIX) as sock:
    sock.settimeout(10)
    sock.connect(path)
    stream = sock.makefile("rwb")
    for number, request in enumerate(requests, 1):
        stream.write(json.dumps({"jsonrpc": "2.0", "id": number, **request}).encode() + b"\\n")
        stream.flush()
        replies.append(json.loads(stream.readline()))
json.dump(replies, sys.stdout)
"""


def as_other_user(socket_path: str, requests: list[dict[str, Any]], *, groups: tuple[int, ...] = ()
                  ) -> list[dict[str, Any]]:
    """Send `requests` on one connection as uid/gid 65534 with exactly these supplementary groups."""
    group_option = f"--groups={','.join(map(str, groups))}" if groups else "--clear-groups"
    done = subprocess.run(["setpriv", f"--reuid={OTHER}", f"--regid={OTHER}", group_option,
                           sys.executable, "-I", "-c", CLIENT, socket_path],
                          input=json.dumps(requests), capture_output=True, text=True, timeout=60, cwd="/")
    assert done.returncode == 0, done.stderr
    replies: list[dict[str, Any]] = json.loads(done.stdout)
    return replies


@pytest.fixture
def shared(tmp_path: Path, throwaway_group: grp.struct_group) -> Iterator[DaemonProcess]:
    """A root daemon whose socket (0666, in a directory others may enter) uid 65534 can reach; the throwaway
    group is its admin group."""
    with shared_daemon(tmp_path, f'\n[access]\nadmin_group = "{throwaway_group.gr_name}"\n') as daemon:
        yield daemon


@contextmanager
def shared_daemon(tmp_path: Path, config: str) -> Iterator[DaemonProcess]:
    """A root daemon with CONFIG and `config` whose socket (0666, in a directory others may enter) uid 65534
    can reach."""
    reachable = Path(tempfile.mkdtemp(prefix="permissions-test-"))  # pytest's own tmp dirs are 0700
    reachable.chmod(0o755)
    daemon = DaemonProcess(tmp_path, config=CONFIG + config, extra_args=("--socket-mode", "0666"))
    daemon.socket = str(reachable / "mcpresd.sock")
    daemon.args[daemon.args.index("--socket") + 1] = daemon.socket
    daemon.start()
    try:
        yield daemon
    finally:
        daemon.stop()
        shutil.rmtree(reachable, ignore_errors=True)


def roots_allocation(daemon: DaemonProcess) -> str:
    granted = daemon.call("allocate", {"resources": [{"resource": "licence", "amount": 1}], "tool_id": "secret-tool",
                                       "holder_pid": os.getpid()})
    return str(granted["id"])


def test_events_of_other_users_are_shown_to_a_non_admin_without_their_detail(shared: DaemonProcess) -> None:
    root_id = roots_allocation(shared)
    allocate, listing = as_other_user(shared.socket, [
        {"method": "allocate", "params": {"resources": [{"resource": "slot", "amount": 1}], "tool_id": "mine"}},
        {"method": "events.list", "params": {"limit": 10_000}},
    ])
    own_id = allocate["result"]["id"]
    events = {(e["allocation_id"], e["kind"]): e for e in listing["result"] if e["allocation_id"]}

    roots = events[(root_id, "allocated")]
    assert roots["detail"] == {} and roots["redacted"] is True
    own = events[(own_id, "allocated")]
    assert own["detail"]["items"] == {"slot": 1.0} and not own.get("redacted")
    # root sees both in full
    full = {(e["allocation_id"], e["kind"]): e for e in shared.call("events.list", {"limit": 10_000})}
    assert full[(root_id, "allocated")]["detail"]["items"] == {"licence": 1.0}


def test_an_admin_group_member_sees_other_users_events_in_full(
        shared: DaemonProcess, throwaway_group: grp.struct_group) -> None:
    root_id = roots_allocation(shared)
    (listing,) = as_other_user(shared.socket, [{"method": "events.list", "params": {"limit": 10_000}}],
                               groups=(throwaway_group.gr_gid,))

    [allocated] = [e for e in listing["result"] if e["allocation_id"] == root_id and e["kind"] == "allocated"]
    assert allocated["detail"]["items"] == {"licence": 1.0} and not allocated.get("redacted")


@pytest.mark.parametrize("admin", [False, True], ids=["no group", "admin group"])
def test_db_backup_is_refused_to_any_user_but_root_and_the_daemons_own(
        shared: DaemonProcess, throwaway_group: grp.struct_group, tmp_path: Path, admin: bool) -> None:
    target = tmp_path / "copy.db"
    (refused,) = as_other_user(shared.socket, [{"method": "db.backup", "params": {"path": str(target)}}],
                               groups=(throwaway_group.gr_gid,) if admin else ())

    assert refused["error"]["code"] == ErrorCode.PERMISSION_DENIED, refused
    assert not target.exists()
    assert shared.call("db.backup", {"path": str(target)})["path"] == str(target)  # root may


def test_set_cost_is_refused_to_a_non_admin_and_changes_nothing(shared: DaemonProcess) -> None:
    (refused,) = as_other_user(shared.socket, [
        {"method": "resources.set_cost", "params": {"name": "licence", "cost_per_unit_hour": 0}}])

    assert refused["error"]["code"] == ErrorCode.PERMISSION_DENIED, refused
    [licence] = [r for r in shared.call("resources.list") if r["name"] == "licence"]
    assert licence["cost_per_unit_hour"] == 1.5
    assert not [e for e in shared.call("events.list", {"limit": 10_000}) if e["kind"] == "resource.cost"]


def test_admin_rights_come_through_a_supplementary_group(
        shared: DaemonProcess, throwaway_group: grp.struct_group) -> None:
    root_id = roots_allocation(shared)
    member = (throwaway_group.gr_gid,)

    set_cost, get, release = as_other_user(shared.socket, [
        {"method": "resources.set_cost", "params": {"name": "licence", "cost_per_unit_hour": 0.25}},
        {"method": "allocations.get", "params": {"id": root_id}},
        {"method": "release", "params": {"id": root_id}},
    ], groups=member)

    assert set_cost["result"]["cost_per_unit_hour"] == 0.25, set_cost
    assert get["result"]["tool_id"] == "secret-tool", get
    assert release["result"]["state"] == "released", release


FORKING_CLIENT = """
import json, os, socket, sys
sock = socket.socket(socket.AF_UNIX)
sock.settimeout(30)
sock.connect(sys.argv[1])
sock.sendall(json.dumps({"jsonrpc": "2.0", "id": 1, "method": "resources.set_cost",
                         "params": {"name": "licence", "cost_per_unit_hour": 0.5}}).encode() + b"\\n")
if os.fork():
    os._exit(0)  # the process that connected is gone; its child keeps the connection and reads the reply
sys.stdout.write(sock.makefile("rb").readline().decode())
"""


@pytest.mark.parametrize("others", [0, 300])
def test_admin_rights_are_the_groups_the_connecting_process_had_even_after_it_exited(
        shared: DaemonProcess, throwaway_group: grp.struct_group, others: int) -> None:
    # The daemon is stopped while the client connects, so by the time it accepts, the process that connected
    # has exited (and its pid could name another process): the groups are the ones it connected with
    # (SO_PEERGROUPS), not whatever /proc/<pid> says later; in 300 groups too, more than socket.getsockopt
    # can read.
    groups = ",".join(map(str, (*range(70_000, 70_000 + others), throwaway_group.gr_gid)))
    assert shared.proc is not None
    os.kill(shared.proc.pid, signal.SIGSTOP)
    try:
        client = subprocess.Popen(["setpriv", f"--reuid={OTHER}", f"--regid={OTHER}",
                                   f"--groups={groups}", sys.executable, "-I", "-c", FORKING_CLIENT,
                                   shared.socket], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd="/")
        assert client.wait(timeout=60) == 0, client.stderr.read() if client.stderr else ""
        assert not Path(f"/proc/{client.pid}").exists()
    finally:
        os.kill(shared.proc.pid, signal.SIGCONT)
    out, _ = client.communicate(timeout=60)

    reply = json.loads(out)
    assert reply["result"]["cost_per_unit_hour"] == 0.5, reply


@pytest.mark.parametrize("others", [100, 300])
def test_admin_rights_come_through_a_supplementary_group_among_hundreds(
        shared: DaemonProcess, throwaway_group: grp.struct_group, others: int) -> None:
    # 300 groups are more than SO_PEERGROUPS can hand Python's getsockopt (256): those come from /proc.
    many = (*range(70_000, 70_000 + others), throwaway_group.gr_gid)

    [set_cost] = as_other_user(shared.socket, [
        {"method": "resources.set_cost", "params": {"name": "licence", "cost_per_unit_hour": 0.75}}], groups=many)

    assert set_cost["result"]["cost_per_unit_hour"] == 0.75, set_cost


LIMITED_CLIENT = """
import json, socket, sys
sock = socket.socket(socket.AF_UNIX)
sock.settimeout(30)
sock.connect(sys.argv[1])
stream = sock.makefile("rwb")
def call(method, params):
    stream.write(json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": params}).encode() + b"\\n")
    stream.flush()
    return json.loads(stream.readline())
one = {"resources": [{"resource": "licence", "amount": 0.5}]}
first, second, third = call("allocate", one), call("allocate", one), call("allocate", one)
released = call("release", {"id": first["result"]["id"]})
json.dump([first, second, third, released, call("allocate", one)], sys.stdout)
"""


def test_allocations_per_uid_are_limited_and_root_is_not(tmp_path: Path) -> None:
    with shared_daemon(tmp_path, "\n[limits]\nmax_allocations_per_uid = 2\n") as daemon:
        done = subprocess.run(["setpriv", f"--reuid={OTHER}", f"--regid={OTHER}", "--clear-groups", sys.executable,
                               "-I", "-c", LIMITED_CLIENT, daemon.socket], capture_output=True, text=True, timeout=60,
                              cwd="/")
        assert done.returncode == 0, done.stderr
        first, second, third, released, fourth = json.loads(done.stdout)

        assert first["result"]["state"] == second["result"]["state"] == "active"
        assert third["error"]["code"] == ErrorCode.LIMIT_EXCEEDED, third
        assert "2 allocations queued or active" in third["error"]["message"]
        assert "max_allocations_per_uid" in third["error"]["message"]
        assert released["result"]["state"] == "released" and fourth["result"]["state"] == "active"
        for _ in range(3):  # root: no limit
            granted = daemon.call("allocate", {"resources": [{"resource": "slot", "amount": 1}],
                                               "holder_pid": os.getpid()})
            assert granted["state"] == "active"


CAPPED_CLIENT = """
import json, socket, subprocess, sys
path, how = sys.argv[1], sys.argv[2]
class Connection:
    def __init__(self):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(60)
        self.sock.connect(path)
        self.stream, self.number = self.sock.makefile("rwb"), 0
    def send(self, method, params):
        self.number += 1
        self.stream.write(json.dumps({"jsonrpc": "2.0", "id": self.number, "method": method,
                                      "params": params}).encode() + b"\\n")
        self.stream.flush()
    def read(self):
        return json.loads(self.stream.readline())
    def call(self, method, params):
        self.send(method, params)
        return self.read()
    def close(self):
        self.stream.close()
        self.sock.close()
def demand(resource, amount, **more):
    return {"resources": [{"resource": resource, "amount": amount}], "enforce": "off", **more}
main, other, waiter = Connection(), Connection(), Connection()
holder = subprocess.Popen(["sleep", "300"])
first = {"holder": demand("licence", 2, holder_pid=holder.pid), "lease": demand("licence", 2, ttl=1),
         "key": demand("licence", 2, idempotency_key="k"),
         "preempt": demand("licence", 2, preemptible=True, priority="low")}.get(how, demand("licence", 2))
out = {"first": (other if how == "close" else main).call("allocate", first)}
# Each way leaves exactly one allocation of this user's live: the first one, or the queued request granted
# when the first one ended.
if how in ("release", "holder", "close", "lease", "preempt"):
    waiter.send("allocate", demand("licence", 1, wait="forever", priority="high" if how == "preempt" else "normal"))
    if how == "release":
        main.call("release", {"id": out["first"]["result"]["id"]})
    elif how == "holder":
        holder.kill()
    elif how == "close":
        other.close()
    out["second"] = waiter.read()  # granted once the first ended
elif how == "timeout":
    out["second"] = main.call("allocate", demand("licence", 1, wait=1))
elif how == "withdraw":
    queued = main.call("allocate", demand("licence", 1, wait="forever", detach=True))
    out["second"] = main.call("release", {"id": queued["result"]["id"]})
elif how == "key":
    out["second"] = main.call("allocate", first)
out["under"] = main.call("allocate", demand("slot", 1))
out["over"] = main.call("allocate", demand("slot", 1))
if how == "key":
    out["retried_at_the_limit"] = main.call("allocate", first)
holder.kill()
json.dump(out, sys.stdout)
"""


@pytest.mark.parametrize("how", ["release", "holder", "close", "lease", "preempt", "timeout", "withdraw", "key"])
def test_an_allocation_ended_any_way_frees_its_place_under_the_per_uid_limit(tmp_path: Path, how: str) -> None:
    # max_allocations_per_uid = 2: after the first allocation ends (or a retry repeats it), the user has one
    # live; one more is granted and the next is refused, so the count neither stays up nor falls too far.
    preemption = '\n[scheduler]\npreemption = true\npreempt_grace = "0.1s"\n' if how == "preempt" else ""
    with shared_daemon(tmp_path, preemption + "\n[limits]\nmax_allocations_per_uid = 2\n") as daemon:
        done = subprocess.run(["setpriv", f"--reuid={OTHER}", f"--regid={OTHER}", "--clear-groups", sys.executable,
                               "-I", "-c", CAPPED_CLIENT, daemon.socket, how], capture_output=True, text=True,
                              timeout=120, cwd="/")
        assert done.returncode == 0, done.stderr
        out = json.loads(done.stdout)

    assert out["first"]["result"]["state"] == "active", out
    second = out["second"]
    if how in ("release", "holder", "close", "lease", "preempt"):
        assert second["result"]["state"] == "active", out
    elif how == "timeout":
        assert second["error"]["code"] == ErrorCode.WAIT_TIMEOUT, out
    elif how == "withdraw":
        assert second["result"]["state"] == "withdrawn", out
    else:
        assert second["result"]["id"] == out["first"]["result"]["id"], out
        assert out["retried_at_the_limit"]["result"]["id"] == out["first"]["result"]["id"], out
    assert out["under"]["result"]["state"] == "active", out
    assert out["over"]["error"]["code"] == ErrorCode.LIMIT_EXCEEDED, out


def test_the_per_uid_limit_holds_after_a_restart(tmp_path: Path) -> None:
    holder = subprocess.Popen(["setpriv", f"--reuid={OTHER}", f"--regid={OTHER}", "--clear-groups", "sleep", "300"],
                              cwd="/")
    slot = {"resources": [{"resource": "slot", "amount": 1}], "holder_pid": holder.pid, "enforce": "off"}
    try:
        with shared_daemon(tmp_path, "\n[limits]\nmax_allocations_per_uid = 2\n") as daemon:
            first, second = as_other_user(daemon.socket, [{"method": "allocate", "params": slot}] * 2)
            assert first["result"]["state"] == second["result"]["state"] == "active", (first, second)
            daemon.restart()

            over, released, under = as_other_user(daemon.socket, [
                {"method": "allocate", "params": slot},
                {"method": "release", "params": {"id": first["result"]["id"]}},
                {"method": "allocate", "params": slot}])
    finally:
        holder.kill()
        holder.wait()

    assert over["error"]["code"] == ErrorCode.LIMIT_EXCEEDED, over
    assert released["result"]["state"] == "released", released
    assert under["result"]["state"] == "active", under
