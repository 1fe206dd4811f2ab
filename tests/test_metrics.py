"""The metrics port: /metrics read with Prometheus' own parser (prometheus_client), counters
that move with traffic, /healthz and /readyz, and what a hostile or slow client gets.

Brokers and the orchestrator run in this process on OS-chosen loopback ports, each with
``metrics_listen = "127.0.0.1:0"``; the daemon test runs ``dcp broker`` as a process.
"""

from __future__ import annotations

import asyncio
import math
import re
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from hypothesis import given, settings, strategies as st
from prometheus_client.parser import text_string_to_metric_families

import dcp
from dcp import metrics_http
from dcp.broker import Broker
from dcp.config import OrchestratorConfig
from dcp.metrics import Family, Histogram, render
from dcp.metrics_http import BadHttpRequest, MetricsServer, parse_head
from dcp.orchestrator import Orchestrator

from .conftest import start_daemon, url_of
from .waiting import until

METRICS = {"metrics_listen": "127.0.0.1:0"}


# --------------------------------------------------------------------------- an HTTP client


async def http(address: tuple[str, int], raw: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send ``raw``; the status, headers and body of the answer, read until the server closes."""
    reader, writer = await asyncio.open_connection(*address)
    writer.write(raw)
    answer = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body


async def get(address: tuple[str, int], path: str) -> tuple[int, bytes]:
    status, _, body = await http(address, f"GET {path} HTTP/1.1\r\nHost: test\r\n\r\n".encode())
    return status, body


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def scrape(address: tuple[str, int]) -> Samples:
    """Every sample of /metrics, parsed by prometheus_client, by (name, sorted labels)."""
    status, body = await get(address, "/metrics")
    assert status == 200
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
    }


def metrics_address(daemon: Broker | Orchestrator) -> tuple[str, int]:
    assert daemon.metrics is not None
    return daemon.metrics.address


# --------------------------------------------------------------------------- the pure parts


label_text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=20)


@settings(max_examples=200)
@given(values=st.lists(st.tuples(label_text, st.integers(0, 2**53)), min_size=1, max_size=5))
def test_any_label_value_reads_back_through_the_reference_parser(values: list[tuple[str, int]]) -> None:
    family = Family("dcp_test_total", "counter", 'help with "quotes", a \\ and a\nnewline')
    for index, (text, value) in enumerate(values):
        family.add(value, (("name", text), ("index", str(index))))
    [parsed] = text_string_to_metric_families(render([family]).decode())
    assert parsed.name == "dcp_test" and parsed.type == "counter"
    assert [(s.labels["name"], s.value) for s in parsed.samples] == [(text, float(value)) for text, value in values]


def test_a_histogram_is_cumulative_with_inclusive_bounds() -> None:
    histogram = Histogram((0.1, 1.0))
    for value in (0.05, 0.1, 0.5, 3.0):
        histogram.observe(value)
    [parsed] = text_string_to_metric_families(render([histogram.family("dcp_planning_seconds", "h")]).decode())
    samples = {(s.name, s.labels.get("le")): s.value for s in parsed.samples}
    assert samples[("dcp_planning_seconds_bucket", "0.1")] == 2  # 0.1 itself is in the 0.1 bucket
    assert samples[("dcp_planning_seconds_bucket", "1.0")] == 3
    assert samples[("dcp_planning_seconds_bucket", "+Inf")] == 4 == samples[("dcp_planning_seconds_count", None)]
    assert math.isclose(samples[("dcp_planning_seconds_sum", None)], 3.65)


def test_invalid_names_are_refused_where_they_are_made() -> None:
    with pytest.raises(ValueError):
        Family("dcp frames", "gauge", "")
    with pytest.raises(ValueError):
        Family("dcp_frames", "counter", "")  # a counter's name ends in _total
    with pytest.raises(ValueError):
        Family("dcp_frames", "gauge", "").add(1, (("__name__", "x"),))


def test_a_request_head_is_parsed_or_refused() -> None:
    assert parse_head(b"GET /metrics?x=1 HTTP/1.1\r\nHost: a\r\nContent-Length: 0") == ("GET", "/metrics")
    assert parse_head(b"HEAD /readyz HTTP/1.0") == ("HEAD", "/readyz")
    for bad in (
        b"GET /metrics", b"GET /metrics HTTP/2", b"GET metrics HTTP/1.1", b"G(T /metrics HTTP/1.1",
        b"GET /metrics HTTP/1.1\r\nno colon", b"GET /metrics HTTP/1.1\r\n folded: header",
        b"POST /metrics HTTP/1.1\r\nContent-Length: 5", b"GET /metrics HTTP/1.1\r\nTransfer-Encoding: chunked",
        b"GET /m\x00 HTTP/1.1",
    ):
        with pytest.raises(BadHttpRequest):
            parse_head(bad)


@given(st.binary(max_size=200))
def test_any_bytes_parse_or_raise_bad_http_request_only(head: bytes) -> None:
    try:
        method, path = parse_head(head)
    except BadHttpRequest:
        return
    assert path.startswith("/") and method


# --------------------------------------------------------------------------- the broker


async def test_broker_counters_move_with_traffic(make_broker: Callable[..., Any]) -> None:
    broker = await make_broker(**METRICS)
    address = metrics_address(broker)
    before = await scrape(address)
    assert before[("dcp_broker_frames_total", (("direction", "in"),))] == 0
    [build] = [dict(labels) for name, labels in before if name == "dcp_build_info"]
    assert (build["daemon"], build["version"]) == ("broker", dcp.__version__)
    async with dcp.connect(url_of(broker), name="camera") as pub, dcp.connect(url_of(broker), name="detector") as sub:
        assert sub.port is not None
        for _ in range(10):
            await pub.publish("video", b"x" * 100, route=pub.route_to(sub.port))
        await pub.publish("video", b"lost", route=pub.route_to(sub.port + 1))  # nobody holds that port
        for _ in range(10):
            await sub.next_message(timeout=10)

        async def moved() -> Samples | None:
            now = await scrape(address)
            return now if now[("dcp_broker_frames_total", (("direction", "in"),))] == 11 else None

        await until(moved, "the 11 frames on /metrics")
        after = await moved()
        assert after is not None
        assert after[("dcp_broker_frames_total", (("direction", "out"),))] == 10
        assert after[("dcp_broker_drops_total", (("reason", "unattached_port"),))] == 1
        assert after[("dcp_broker_bytes_total", (("direction", "in"),))] > 1000
        assert after[("dcp_broker_attachments", ())] == 2
        port = (("name", "detector"), ("port", str(sub.port)))
        assert after[("dcp_broker_port_frames_total", (("direction", "out"), *port))] == 10
        assert after[("dcp_broker_port_dropped_total", port)] == 0
        assert after[("process_open_fds", ())] > 0 and after[("process_resident_memory_bytes", ())] > 0
        assert after[("dcp_metrics_scrapes_total", ())] >= 2


async def test_per_port_series_are_bounded_to_the_busiest_ports(make_broker: Callable[..., Any]) -> None:
    broker = await make_broker(metrics_max_ports=2, **METRICS)
    async with dcp.connect(url_of(broker), name="pub") as pub:
        subs = [await dcp.connect(url_of(broker), name=f"sub-{i}") for i in range(4)]
        try:
            for count, sub in enumerate(subs):  # sub-3 gets the most, then sub-2
                for _ in range(count):
                    await pub.publish("t", b"y" * 1000, route=pub.route_to(sub.port))  # type: ignore[arg-type]
            await until(lambda: all(sub.pending == i for i, sub in enumerate(subs)), "every frame delivered")
            samples = await scrape(metrics_address(broker))
        finally:
            for sub in subs:
                await sub.close()
    named = {dict(labels)["name"] for name, labels in samples if name == "dcp_broker_port_dropped_total"}
    assert named == {"pub", "sub-3"}  # pub sent the most bytes in; sub-3 got the most out


async def test_readyz_waits_for_links_and_the_orchestrator(make_broker: Callable[..., Any], unused_tcp_port: int) -> None:
    peer = await make_broker()
    host, port = peer.address
    nobody = f"127.0.0.1:{unused_tcp_port}"
    broker = await make_broker(peers=(f"{host}:{port}", nobody), **METRICS)
    address = metrics_address(broker)
    assert await get(address, "/healthz") == (200, b"ok\n")
    ports = {link.address: port for port, link in broker.links.items()}
    up = (("peer", f"{host}:{port}"), ("port", str(ports[f"{host}:{port}"])))
    down = (("peer", nobody), ("port", str(ports[nobody])))
    await until(lambda: broker.links[ports[f"{host}:{port}"]].rtt_s is not None, "a ping answered on the link")
    status, body = await get(address, "/readyz")
    assert status == 503 and body.decode() == f"not ready: link on port {ports[nobody]} ({nobody}) is down\n"

    async def rtt_shown() -> Samples | None:
        samples = await scrape(address)
        return samples if ("dcp_broker_link_rtt_seconds", up) in samples else None

    await until(rtt_shown, "the link's RTT on /metrics")
    samples = await rtt_shown()
    assert samples is not None and samples[("dcp_broker_link_up", up)] == 1 and samples[("dcp_broker_link_up", down)] == 0
    assert ("dcp_broker_link_rtt_seconds", down) not in samples  # never measured
    async with dcp.connect(url_of(broker), role="admin", name="ops") as admin:
        await admin.unlink(ports[nobody])
    assert await get(address, "/readyz") == (200, b"ready\n")
    alone = await make_broker(orchestrator=f"127.0.0.1:{unused_tcp_port}", **METRICS)
    assert await get(metrics_address(alone), "/readyz") == (
        503, f"not ready: not registered with the orchestrator at 127.0.0.1:{unused_tcp_port}\n".encode()
    )


# --------------------------------------------------------------------------- the orchestrator


@pytest.fixture
async def orchestrator() -> AsyncIterator[Orchestrator]:
    do = Orchestrator(OrchestratorConfig(listen="127.0.0.1:0", db=":memory:", insecure=True, **METRICS))
    await do.start()
    yield do
    await do.close()


async def test_orchestrator_counts_brokers_agents_streams_planning_and_pushes(
    orchestrator: Orchestrator, make_broker: Callable[..., Any]
) -> None:
    host, port = orchestrator.address
    broker = await make_broker(orchestrator=f"{host}:{port}")
    address = metrics_address(orchestrator)
    consumer = dcp.DataAgent("consumer", broker=url_of(broker), orchestrator=f"dcp://{host}:{port}")
    producer = dcp.DataAgent("producer", broker=url_of(broker), orchestrator=f"dcp://{host}:{port}")

    @consumer.consume("t")
    async def sink(msg: Any) -> None:
        pass

    async with consumer, producer:
        await producer.declare_produces("t")
        await producer.wait_route("t")
        samples = await scrape(address)
        assert samples[("dcp_orchestrator_brokers", (("state", "online"),))] == 1
        assert samples[("dcp_orchestrator_agents", (("state", "online"),))] == 2
        assert samples[("dcp_orchestrator_streams", ())] == 1
        assert samples[("dcp_orchestrator_route_pushes_total", ())] >= 1
        rounds = samples[("dcp_orchestrator_planning_round_seconds_count", ())]
        assert rounds >= 1 and samples[("dcp_orchestrator_planning_round_seconds_bucket", (("le", "+Inf"),))] == rounds
        assert await get(address, "/readyz") == (200, b"ready\n")


# --------------------------------------------------------------------------- hostile and slow clients


@pytest.fixture
async def server() -> AsyncIterator[MetricsServer]:
    served = MetricsServer(("127.0.0.1", 0), lambda: [Family("dcp_x", "gauge", "x").add(1)], lambda: [])
    await served.start()
    yield served
    await served.close()


async def test_malformed_requests_get_400_and_the_connection_closes(server: MetricsServer) -> None:
    for raw in (b"GARBAGE\r\n\r\n", b"GET /metrics HTTP/9.9\r\n\r\n", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n"):
        status, headers, _ = await http(server.address, raw)
        assert (status, headers["connection"]) == (400, "close")
    status, _, _ = await http(server.address, b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 10_000 + b"\r\n\r\n")
    assert status == 431
    assert (await http(server.address, b"POST /metrics HTTP/1.1\r\n\r\n"))[:2] == (405, {
        "content-type": "text/plain", "content-length": "18", "allow": "GET, HEAD", "connection": "close"})
    assert (await get(server.address, "/"))[0] == 404
    assert (await get(server.address, "/metrics"))[0] == 200  # the port carries on
    assert server.bad_requests == 5


async def test_a_head_request_gets_no_body(server: MetricsServer) -> None:
    status, headers, body = await http(server.address, b"HEAD /metrics HTTP/1.1\r\n\r\n")
    assert status == 200 and body == b"" and int(headers["content-length"]) > 0


async def test_a_client_that_never_finishes_its_request_is_cut(server: MetricsServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics_http, "READ_TIMEOUT_S", 0.2)
    status, _, body = await http(server.address, b"GET /metrics HTTP/1.1\r\n")  # no blank line, ever
    assert status == 408 and b"no complete request" in body
    assert not server.clients


async def test_a_scraper_that_does_not_read_is_aborted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics_http, "WRITE_TIMEOUT_S", 0.3)
    big = Family("dcp_big", "gauge", "x")
    for i in range(100_000):  # megabytes: more than the socket buffers take
        big.add(i, (("i", str(i)),))
    served = MetricsServer(("127.0.0.1", 0), lambda: [big], lambda: [])
    await served.start()
    try:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, served.address)
        sock.send(b"GET /metrics HTTP/1.1\r\n\r\n")  # and never read
        await until(lambda: served.scrapes == 1 and not served.clients, "the stuck scraper aborted")
        sock.close()
    finally:
        await served.close()


async def test_past_the_client_limit_a_connection_gets_503(server: MetricsServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics_http, "MAX_CLIENTS", 2)
    idle = [await asyncio.open_connection(*server.address) for _ in range(2)]
    await until(lambda: len(server.clients) == 2, "two clients held")
    status, _, body = await http(server.address, b"GET /metrics HTTP/1.1\r\n\r\n")
    assert status == 503 and body == b"too many metrics clients at once\n"
    for _, writer in idle:
        writer.close()
    await until(lambda: not server.clients, "the idle clients gone")
    assert (await get(server.address, "/metrics"))[0] == 200


# --------------------------------------------------------------------------- the daemon


def test_a_broker_process_serves_metrics_from_its_environment_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DCP_BROKER_METRICS_LISTEN", "127.0.0.1:0")
    process, match, _ = start_daemon(["broker", "--insecure", "--listen", "127.0.0.1:0"], re.compile(r"metrics on http://(\S+):(\d+)/metrics"))
    try:
        address = (match[1], int(match[2]))
        samples = asyncio.run(scrape(address))
        assert samples[("dcp_broker_ports", ())] == 10_000
        assert asyncio.run(get(address, "/readyz")) == (200, b"ready\n")
    finally:
        process.terminate()
        assert process.wait(20) == 0
