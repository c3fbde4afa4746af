"""The Prometheus exposition (textfile, GET /metrics, `mcpctl metrics --prometheus`) on a daemon on the GPU replay.

Every exposition is parsed with prometheus_client's parser and checked with `promtool check metrics`.
"""

from __future__ import annotations

import http.client
import os
import shutil
import socket
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from mcpresd.exposition import all_specs
from tests.conftest import CONFIG, H100_UUID, ROOT, DaemonProcess, cli, ok

POOL = """
[[pools]]
name = "halves"
factory = "slots"
parent = "slot"
slot_size = 1
min = 2
max = 2
"""
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def eventually(what: str, check: Any, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout}s")
        time.sleep(0.05)


def scrape(port: int, path: str = "/metrics", method: str = "GET") -> tuple[int, dict[str, str], str]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request(method, path)
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read().decode()
    finally:
        connection.close()


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample, by name and labels; the parser raises on anything that is not valid exposition text."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(found: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    matches = [v for (n, ls), v in found.items() if n == name and set(labels.items()) <= ls]
    assert len(matches) == 1, f"{name} {labels}: {len(matches)} samples"
    return matches[0]


def promtool_passes(text: str) -> None:
    if shutil.which("promtool") is None:
        pytest.skip("promtool not installed (Debian package prometheus; .ci/run installs it)")
    done = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.fixture
def busy(tmp_path: Path) -> Iterator[tuple[DaemonProcess, int, Path]]:
    """A daemon with a held allocation, a queued request, a pool, the textfile and the HTTP endpoint."""
    port = free_port()
    textfile = tmp_path / "textfile" / "mcpres.prom"
    textfile.parent.mkdir()
    daemon = DaemonProcess(tmp_path, config=CONFIG + POOL + f"""
[monitor]
interval = "0.5s"
prometheus_file = "{textfile}"

[metrics]
listen = "127.0.0.1:{port}"
""")
    daemon.start()
    try:
        ok(daemon, "allocate", "--res", "licence=2")
        ok(daemon, "allocate", "--res", "licence=1", "--wait", "1h", "--no-block")
        yield daemon, port, textfile
    finally:
        daemon.stop()


def test_every_exposition_parses_and_passes_promtool(busy: tuple[DaemonProcess, int, Path]) -> None:
    daemon, port, textfile = busy
    status, headers, served = scrape(port)
    eventually("a textfile written after the queue formed",
               lambda: textfile.exists() and 'mcpres_queue_length 1' in textfile.read_text())
    texts = {"http": served, "textfile": textfile.read_text(), "cli": ok(daemon, "metrics", "--prometheus")}

    assert status == 200 and headers["content-type"] == CONTENT_TYPE
    known = {spec.name.removesuffix("_total") for spec in all_specs()}
    for where, text in texts.items():
        promtool_passes(text)
        families = list(text_string_to_metric_families(text))
        assert {f.name for f in families} <= known, where
        assert all(f.documentation for f in families), where
    assert not list(textfile.parent.glob("*.tmp"))  # written whole, then renamed into place


def test_the_exposition_shows_what_only_the_broker_knows(busy: tuple[DaemonProcess, int, Path]) -> None:
    daemon, port, _ = busy
    owner = str(os.getuid())
    daemon.call("budgets.set", {"scope": "owner", "subject": owner, "period": "day", "limit": 100})
    eventually("the held licences cost something", lambda: value(
        samples(scrape(port)[2]), "mcpres_budget_spent", scope="owner", subject=owner, period="day") > 0)
    found = samples(scrape(port)[2])

    assert value(found, "mcpres_custom_capacity", resource="licence", unit="seats") == 2
    assert value(found, "mcpres_custom_allocated", resource="licence") == 2
    assert value(found, "mcpres_custom_free", resource="licence") == 0
    assert value(found, "mcpres_custom_capacity", resource="halves/0") == 1  # a pool's member
    assert value(found, "mcpres_custom_allocated", resource="slot") == 2  # the pool's share of its parent
    assert value(found, "mcpres_allocations", state="queued") == 1
    assert value(found, "mcpres_allocations", state="active") == 1
    assert value(found, "mcpres_queue_length") == 1
    assert value(found, "mcpres_queue_oldest_wait_seconds") > 0
    assert value(found, "mcpres_grants_total") == 1
    assert value(found, "mcpres_wait_seconds_count") == 1
    assert value(found, "mcpres_wait_seconds_bucket", le="+Inf") == 1
    assert value(found, "mcpres_rpc_requests_total", method="allocate") == 2
    assert value(found, "mcpres_rpc_requests_total", method="pools.create") == 0  # listed before its first call
    assert value(found, "mcpres_budget_limit", scope="owner", subject=owner, period="day") == 100
    assert value(found, "mcpres_budget_spent", subject=owner) < 1  # 2 seats at 1.5 an hour, for seconds


def test_gpu_series_carry_uuid_index_and_model(busy: tuple[DaemonProcess, int, Path]) -> None:
    _, port, _ = busy
    found = eventually("a sampled GPU", lambda: [
        (name, dict(labels)) for (name, labels), _ in samples(scrape(port)[2]).items()
        if name == "mcpres_gpu_temperature_celsius"])

    gpu = {"resource": "gpu:0", "uuid": H100_UUID, "index": "0", "model": "NVIDIA H100 80GB HBM3"}
    assert found == [("mcpres_gpu_temperature_celsius", gpu)]
    all_gpu = [dict(labels) for (name, labels) in samples(scrape(port)[2]) if name.startswith("mcpres_gpu_")]
    assert all_gpu and all(labels == gpu for labels in all_gpu)
    assert not any(name == "mcpres_gpu_fan_speed_ratio" for name, _ in samples(scrape(port)[2]))  # unsupported


def test_per_allocation_use_is_shown_for_active_allocations_only(busy: tuple[DaemonProcess, int, Path]) -> None:
    daemon, port, _ = busy
    holder = subprocess.Popen(["sleep", "300"])
    try:
        held = ok(daemon, "allocate", "--res", "slot=1", "--holder-pid", str(holder.pid)).strip()
        measured = eventually("the holder's use measured", lambda: {
            dict(labels)["allocation"]: v for (name, labels), v in samples(scrape(port)[2]).items()
            if name == "mcpres_allocation_memory_peak_bytes"}.get(held))
        assert measured > 0
        owner = {dict(labels)["owner"] for (name, labels) in samples(scrape(port)[2])
                 if name == "mcpres_allocation_memory_peak_bytes" and dict(labels)["allocation"] == held}
        assert owner == {str(os.getuid())}
        ok(daemon, "release", held)

        active = {a["id"] for a in daemon.call("allocations.list", {"state": "active"})}
        shown = {dict(labels)["allocation"] for (name, labels) in samples(scrape(port)[2])
                 if name.startswith("mcpres_allocation_")}
        assert held not in shown and shown <= active
    finally:
        holder.kill()
        holder.wait()


def test_counters_and_the_wait_histogram_survive_a_restart(tmp_path: Path) -> None:
    daemon = DaemonProcess(tmp_path)
    daemon.start()
    try:
        first = ok(daemon, "allocate", "--res", "licence=2").strip()
        queued = ok(daemon, "allocate", "--res", "licence=1", "--wait", "1h", "--no-block").strip()
        ok(daemon, "release", queued)  # a withdrawal
        assert cli(daemon, "allocate", "--res", "licence=1", "--wait", "1s").returncode == 3  # a timeout
        waiting = ok(daemon, "allocate", "--res", "licence=2", "--wait", "1h", "--no-block").strip()
        ok(daemon, "release", first)
        eventually("the waiting request granted",
                   lambda: daemon.call("allocations.get", {"id": waiting})["state"] == "active")
        counted = ("mcpres_grants_total", "mcpres_releases_total", "mcpres_withdrawals_total",
                   "mcpres_wait_timeouts_total", "mcpres_wait_seconds_count", "mcpres_wait_seconds_sum")
        before = samples(ok(daemon, "metrics", "--prometheus"))
        figures = {name: value(before, name) for name in counted}
        assert figures["mcpres_grants_total"] == 2 and figures["mcpres_releases_total"] == 1
        assert figures["mcpres_withdrawals_total"] == 2 and figures["mcpres_wait_timeouts_total"] == 1
        assert figures["mcpres_wait_seconds_count"] == 2 and figures["mcpres_wait_seconds_sum"] > 0
        assert value(before, "mcpres_wait_seconds_bucket", le="0.01") == 1  # the first, granted at once

        daemon.restart()

        after = samples(ok(daemon, "metrics", "--prometheus"))
        assert {name: value(after, name) for name in counted} == figures
    finally:
        daemon.stop()


def test_counters_kept_in_memory_survive_sigkill_counted_once(tmp_path: Path) -> None:
    """The counters are written with the usage (each tick, any usage read); a kill -9 before that loses none
    of what was acknowledged, and what was written before it is not counted again at start-up."""
    daemon = DaemonProcess(tmp_path, config=CONFIG + '[scheduler]\ntick_interval = "60s"\n')
    daemon.start()
    counted = ("mcpres_grants_total", "mcpres_releases_total", "mcpres_withdrawals_total",
               "mcpres_wait_timeouts_total", "mcpres_wait_seconds_count", "mcpres_wait_seconds_sum")

    def figures() -> dict[str, float]:
        found = samples(ok(daemon, "metrics", "--prometheus"))
        return {**{name: value(found, name) for name in counted},
                **{f"le={le}": value(found, "mcpres_wait_seconds_bucket", le=le) for le in ("0.01", "10.0", "+Inf")}}

    def written_grants() -> int:
        with sqlite3.connect(f"file:{daemon.db}?mode=ro", uri=True) as db:
            return int(db.execute("SELECT grants FROM metric_totals").fetchone()[0])

    try:
        first = ok(daemon, "allocate", "--res", "licence=2").strip()
        assert cli(daemon, "allocate", "--res", "licence=1", "--wait", "1s").returncode == 3  # a timeout
        ok(daemon, "release", ok(daemon, "allocate", "--res", "slot=1").strip())
        ok(daemon, "usage")  # the read writes what the ended ones add (a held one is counted from its row at start)
        assert written_grants() == 1
        queued = ok(daemon, "allocate", "--res", "licence=1", "--wait", "1h", "--no-block").strip()
        ok(daemon, "release", queued)  # a withdrawal
        waiting = ok(daemon, "allocate", "--res", "licence=2", "--wait", "1h", "--no-block").strip()
        ok(daemon, "release", first)
        eventually("the waiting request granted",
                   lambda: daemon.call("allocations.get", {"id": waiting})["state"] == "active")
        ok(daemon, "release", ok(daemon, "allocate", "--res", "slot=1").strip())
        ok(daemon, "allocate", "--res", "slot=1")  # still held at the kill
        before = figures()
        assert before["mcpres_grants_total"] == 5 and before["mcpres_releases_total"] == 3
        assert before["mcpres_withdrawals_total"] == 2 and before["mcpres_wait_timeouts_total"] == 1
        assert before["le=0.01"] == 4 and before["le=+Inf"] == 5  # the waiting one waited longer
        assert written_grants() == 1  # no tick and no read since: the rest is only in memory

        daemon.kill()
        daemon.start()
        assert figures() == before
        ok(daemon, "usage")
        assert written_grants() == 3  # the ended ones; the two held are counted from their rows at start
        daemon.kill()
        daemon.start()
        assert figures() == before
    finally:
        daemon.stop()


def test_the_endpoint_answers_only_get_metrics(busy: tuple[DaemonProcess, int, Path]) -> None:
    _, port, _ = busy

    assert scrape(port, "/metrics?name[]=x")[0] == 200
    assert scrape(port, "/")[0] == 404
    assert scrape(port, "/metrics/x")[0] == 404
    status, headers, _ = scrape(port, method="POST")
    assert status == 405 and headers["allow"] == "GET"
    assert scrape(port, method="DELETE")[0] == 405
    with socket.create_connection(("127.0.0.1", port), timeout=30) as raw:
        raw.sendall(b"hello\r\n\r\n")
        assert raw.recv(100).startswith(b"HTTP/1.1 400 ")


def test_an_oversized_request_is_refused(busy: tuple[DaemonProcess, int, Path]) -> None:
    _, port, _ = busy
    with socket.create_connection(("127.0.0.1", port), timeout=30) as raw:
        raw.sendall(b"GET /metrics HTTP/1.1\r\nX-Pad: " + b"a" * 100_000 + b"\r\n\r\n")
        answer = raw.recv(100)
    assert answer.startswith(b"HTTP/1.1 431 ")


def test_a_silent_client_neither_stalls_the_daemon_nor_stays(busy: tuple[DaemonProcess, int, Path]) -> None:
    daemon, port, _ = busy
    silent = [socket.create_connection(("127.0.0.1", port), timeout=60) for _ in range(3)]
    try:
        silent[1].sendall(b"GET /metrics HTTP/1.1\r\n")  # half a request, never finished

        assert scrape(port)[0] == 200
        assert daemon.call("daemon.status")
        for sock in silent:  # closed by the daemon after its read timeout (10 s), answered 408 at most
            answer = sock.recv(200)
            assert answer == b"" or answer.startswith(b"HTTP/1.1 408 ")
    finally:
        for sock in silent:
            sock.close()


@pytest.mark.parametrize("listen", ["0.0.0.0:{port}", "localhost:{port}", "[::]:{port}"])
def test_a_non_loopback_listen_address_is_refused_at_start(tmp_path: Path, listen: str) -> None:
    daemon = DaemonProcess(tmp_path, config=CONFIG + f'\n[metrics]\nlisten = "{listen.format(port=free_port())}"\n')

    done = subprocess.run(daemon.args, capture_output=True, text=True, timeout=60, cwd=ROOT)

    assert done.returncode != 0
    assert "[metrics] listen must be a loopback address" in done.stderr
    assert not Path(daemon.socket).exists()


def test_a_port_in_use_is_refused_at_start_with_what_to_do(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        daemon = DaemonProcess(tmp_path, config=CONFIG + f'\n[metrics]\nlisten = "127.0.0.1:{port}"\n')

        done = subprocess.run(daemon.args, capture_output=True, text=True, timeout=60, cwd=ROOT)

    assert done.returncode != 0
    assert f"cannot listen on 127.0.0.1:{port}" in done.stderr and "choose another port" in done.stderr


def test_a_client_that_never_reads_its_reply_is_dropped_while_others_are_served() -> None:
    """In-process, with a 64 MB exposition no socket buffer holds and a short write timeout."""
    import asyncio

    from mcpresd.metrics_http import MetricsEndpoint

    big = "x" * (64 << 20)

    async def produce() -> str:
        return big

    async def scenario() -> tuple[bytes, int, int]:
        # The write timeout bounds the whole reply: long enough for the reading client on this loop to take
        # 64 MB on a loaded machine (0.5 s cut it off too once), short enough to see the stuck one dropped.
        endpoint = MetricsEndpoint(produce, read_timeout=30.0, write_timeout=5.0, max_connections=2)
        port = free_port()
        await endpoint.start("127.0.0.1", port)
        try:
            _, stuck = await asyncio.open_connection("127.0.0.1", port)
            stuck.write(b"GET /metrics HTTP/1.1\r\n\r\n")  # and never reads
            await stuck.drain()
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /metrics HTTP/1.1\r\n\r\n")
            served = await asyncio.wait_for(reader.read(), 60)  # a reading client gets all of it meanwhile
            writer.close()
            deadline = asyncio.get_running_loop().time() + 60
            while endpoint.connections and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.05)
            left = endpoint.connections
            third_reader, third = await asyncio.open_connection("127.0.0.1", port)  # room again
            third.write(b"GET / HTTP/1.1\r\n\r\n")
            status = int((await asyncio.wait_for(third_reader.read(), 60)).split(b" ", 2)[1])
            stuck.close()
            third.close()
            return served, left, status
        finally:
            await endpoint.close()

    served, left, status = asyncio.run(scenario())

    assert served.startswith(b"HTTP/1.1 200 ") and served.endswith(big[-100:].encode())
    assert len(served) > len(big)
    assert left == 0  # the stuck client was dropped after the write timeout
    assert status == 404


def test_an_exposition_that_cannot_be_sent_is_a_503_not_a_connection_left_open() -> None:
    import asyncio

    from mcpresd.metrics_http import MetricsEndpoint

    async def produce() -> str:
        return "mcpres_x{mount=\"\udcff\"} 1\n"  # not encodable: whatever renders it, the scrape is answered

    async def scenario() -> tuple[bytes, int]:
        endpoint = MetricsEndpoint(produce, read_timeout=30.0)
        port = free_port()
        await endpoint.start("127.0.0.1", port)
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /metrics HTTP/1.1\r\n\r\n")
            answer = await asyncio.wait_for(reader.read(), 60)
            writer.close()
            deadline = asyncio.get_running_loop().time() + 60
            while endpoint.connections and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.05)
            return answer, endpoint.connections
        finally:
            await endpoint.close()

    answer, left = asyncio.run(scenario())

    assert answer.startswith(b"HTTP/1.1 503 ") and left == 0


def test_past_the_limit_the_longest_silent_connection_makes_room_for_a_scrape() -> None:
    """A local user holding every slot with connections that never send a request cannot keep Prometheus out."""
    import asyncio

    from mcpresd.metrics_http import MetricsEndpoint

    async def produce() -> str:
        return "# nothing\n"

    async def scenario() -> tuple[list[bytes], bytes]:
        endpoint = MetricsEndpoint(produce, read_timeout=30.0, max_connections=2)
        port = free_port()
        await endpoint.start("127.0.0.1", port)
        try:
            held = []
            for count in (1, 2):
                held.append(await asyncio.open_connection("127.0.0.1", port))
                deadline = asyncio.get_running_loop().time() + 30
                while endpoint.connections < count and asyncio.get_running_loop().time() < deadline:
                    await asyncio.sleep(0.01)
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /metrics HTTP/1.1\r\n\r\n")
            answered = await asyncio.wait_for(reader.read(), 30)
            dropped = []
            for held_reader, _ in held[:1]:
                try:
                    dropped.append(await asyncio.wait_for(held_reader.read(), 30))
                except ConnectionResetError:
                    dropped.append(b"")
            for _, w in held:
                w.close()
            writer.close()
            return dropped, answered
        finally:
            await endpoint.close()

    dropped, answered = asyncio.run(scenario())

    assert answered.startswith(b"HTTP/1.1 200 ") and answered.endswith(b"# nothing\n")
    assert dropped == [b""]  # the oldest silent one, closed without a reply


def test_past_the_limit_a_new_connection_is_closed_at_once_while_every_slot_is_being_answered() -> None:
    import asyncio

    from mcpresd.metrics_http import MetricsEndpoint

    release = asyncio.Event()
    producing: list[int] = []

    async def produce() -> str:
        producing.append(1)
        await release.wait()
        return "# nothing\n"

    async def scenario() -> tuple[bytes, list[bytes]]:
        endpoint = MetricsEndpoint(produce, read_timeout=30.0, max_connections=2)
        port = free_port()
        await endpoint.start("127.0.0.1", port)
        try:
            held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]
            for _, w in held:
                w.write(b"GET /metrics HTTP/1.1\r\n\r\n")
            deadline = asyncio.get_running_loop().time() + 30
            while len(producing) < 2 and asyncio.get_running_loop().time() < deadline:  # both requests read
                await asyncio.sleep(0.01)
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /metrics HTTP/1.1\r\n\r\n")
            try:
                refused = await asyncio.wait_for(reader.read(), 30)
            except ConnectionResetError:
                refused = b""
            release.set()
            answered = [await asyncio.wait_for(r.read(), 30) for r, _ in held]
            for _, w in held:
                w.close()
            writer.close()
            return refused, answered
        finally:
            await endpoint.close()

    refused, answered = asyncio.run(scenario())

    assert refused == b""
    assert all(a.startswith(b"HTTP/1.1 200 ") and a.endswith(b"# nothing\n") for a in answered)
