"""The external targets of ``dcp bench`` added beside the plain pub/sub brokers: zenoh (through
the router of :mod:`dcp.bench.zenoh_router`) and the persistent queues nats-jetstream,
rabbitmq-quorum and redis-streams, each measured by a real publisher/subscriber worker pair.

The queue tests need the servers ``bench/peers start`` runs and are skipped, with the reason
``availability`` gives, where one is missing; the zenoh tests start a router of their own
on a free port and need only the ``eclipse-zenoh`` client.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from dcp.bench.targets import DEFAULT_ADDRESSES, EXTERNAL, QUEUES, _server_version, availability

WORKER = [sys.executable, "-m", "dcp.bench.worker"]
ROUTER_LISTENING = re.compile(r"zenoh router listening on tcp/(\S+):(\d+) ")


def _pair(target: str, address: str, count: int, size: int, interval_ms: float | None) -> tuple[dict[str, Any], dict[str, Any], str]:
    """Subscriber, then publisher; (publisher's result, subscriber's result, the ready line's route)."""
    sub = subprocess.Popen(
        [*WORKER, "sub", "--target", target, "--address", address, "--topic", "bench",
         "--expect", str(count), "--idle-timeout", "5", "--max-time", "60"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert sub.stdout is not None and sub.stderr is not None
        line = sub.stdout.readline()
        assert line, f"{target} subscriber exited: {sub.stderr.read()}"
        ready = json.loads(line)
        assert ready["ready"] is True
        route = ready["route"]
        args = ["--size", str(size), "--count", str(count)]
        if interval_ms is not None:
            args += ["--interval-ms", str(interval_ms)]
        if route:
            args += ["--route", route]
        pub = subprocess.run(
            [*WORKER, "pub", "--target", target, "--address", address, "--topic", "bench", *args],
            capture_output=True, text=True, timeout=60,
        )
        assert pub.returncode == 0, pub.stderr
        out, err = sub.communicate(timeout=60)
        assert sub.returncode == 0, err
        return json.loads(pub.stdout.strip().splitlines()[-1]), json.loads(out.strip().splitlines()[-1]), route
    finally:
        if sub.poll() is None:
            sub.kill()
            sub.wait()


def _assert_exact(sent: dict[str, Any], got: dict[str, Any], count: int, size: int) -> None:
    assert sent["sent"] == count and sent["bytes"] == count * size
    assert got["received"] == count and got["bytes"] == count * size, got
    assert got["duplicates"] == 0 and got["max_seq"] == count - 1 and "malformed" not in got
    assert got["out_of_order"] == 0  # one publisher, one queue or stream: delivered in order
    assert "error" not in got, got["error"]
    assert 0 <= got["latency_us"]["p50"] <= got["latency_us"]["max"] < 60_000_000


# -- the persistent queues, on the servers bench/peers runs ---------------------------------------------------


def _require(target: str) -> str:
    ok, detail = availability(target)
    if not ok:
        pytest.skip(f"{target} is not available here: {detail}")
    return DEFAULT_ADDRESSES[target]


async def _jetstream_stream_of(address: str, subject: str) -> str | None:
    import nats
    import nats.js.errors

    nc = await nats.connect(f"nats://{address}", allow_reconnect=False, max_reconnect_attempts=1)
    try:
        return str(await nc.jetstream().find_stream_name_by_subject(subject))
    except nats.js.errors.NotFoundError:
        return None
    finally:
        await nc.close()


async def _quorum_queue_exists(address: str, name: str) -> bool:
    import aio_pika
    import aiormq.exceptions

    conn = await aio_pika.connect(f"amqp://guest:guest@{address}/")
    try:
        channel = await conn.channel()
        try:
            await channel.declare_queue(name, passive=True)
        except aiormq.exceptions.ChannelNotFoundEntity:
            return False
        return True
    finally:
        await conn.close()


def _left_behind(target: str, address: str, route: str) -> bool:
    """Whether the run's stream, queue or key is still on the server."""
    if target == "nats-jetstream":
        return asyncio.run(_jetstream_stream_of(address, route)) is not None
    if target == "rabbitmq-quorum":
        return asyncio.run(_quorum_queue_exists(address, route))
    import redis

    host, port = address.rsplit(":", 1)
    client = redis.Redis(host=host, port=int(port))
    try:
        return bool(client.exists(route))
    finally:
        client.close()


@pytest.mark.parametrize("interval_ms", [None, 1.0], ids=["flat-out", "paced"])
@pytest.mark.parametrize("target", QUEUES)
def test_queue_pair_delivers_exactly_and_leaves_nothing_behind(target: str, interval_ms: float | None) -> None:
    address = _require(target)
    count, size = 300, 1024
    sent, got, route = _pair(target, address, count, size, interval_ms)
    _assert_exact(sent, got, count, size)
    assert route  # the stream's subject, the queue's or the stream key's name, made for this run
    assert not _left_behind(target, address, route)


@pytest.mark.parametrize("target", QUEUES)
def test_queue_pair_carries_large_messages(target: str) -> None:
    address = _require(target)
    sent, got, _ = _pair(target, address, 40, 128 * 1024, None)
    _assert_exact(sent, got, 40, 128 * 1024)


@pytest.mark.parametrize("target", QUEUES)
def test_queue_publisher_needs_the_route_of_its_subscriber(target: str) -> None:
    pub = subprocess.run(
        [*WORKER, "pub", "--target", target, "--address", "127.0.0.1:1", "--size", "100", "--count", "1"],
        capture_output=True, text=True, timeout=30,
    )
    assert pub.returncode == 2  # a usage error, found before any client is imported or dialled
    assert "--route" in pub.stderr and target in pub.stderr


# -- availability, on what the server says ---------------------------------------------------------------------


def _probe(target: str, server_says: bytes) -> tuple[str, str]:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        theirs.sendall(server_says)
        return _server_version(target, ours)


def test_nats_jetstream_is_available_only_with_jetstream_on() -> None:
    info = b'INFO {"server_id":"X","version":"2.9.10","max_payload":8388608%s}\r\n'
    assert _probe("nats-jetstream", info % b',"jetstream":true') == ("nats-server 2.9.10, JetStream on", "")
    version, lacks = _probe("nats-jetstream", info % b"")
    assert version == "nats-server 2.9.10" and "JetStream" in lacks
    assert _probe("nats", info % b"") == ("nats-server 2.9.10", "")  # core NATS does not need it


def test_every_external_target_has_an_address_and_a_probe() -> None:
    assert set(DEFAULT_ADDRESSES) == set(EXTERNAL)
    for target in EXTERNAL:
        ok, detail = availability(target)
        assert isinstance(ok, bool) and detail


# -- zenoh: a router of its own ---------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _start_router() -> tuple[subprocess.Popen[str], str]:
    router = subprocess.Popen(
        [sys.executable, "-m", "dcp.bench.zenoh_router", "--listen", f"tcp/127.0.0.1:{_free_port()}"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    assert router.stderr is not None
    line = router.stderr.readline()
    match = ROUTER_LISTENING.search(line)
    if match is None:
        router.kill()
        raise AssertionError(f"the router did not listen: {line}{router.stderr.read()}")
    return router, f"{match.group(1)}:{match.group(2)}"


def _stop(router: subprocess.Popen[str], signum: int = signal.SIGTERM) -> tuple[int, str]:
    router.send_signal(signum)
    try:
        _, err = router.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        router.kill()
        router.communicate()
        raise
    return router.returncode, err


@pytest.fixture(scope="module")
def zenoh_router() -> Iterator[str]:
    pytest.importorskip("zenoh", reason="eclipse-zenoh (the bench extra) is not installed")
    router, address = _start_router()
    try:
        yield address
    finally:
        if router.poll() is None:
            _stop(router)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_zenoh_router_listens_answers_and_exits_0_on_a_signal(signum: int) -> None:
    zenoh = pytest.importorskip("zenoh", reason="eclipse-zenoh (the bench extra) is not installed")
    router, address = _start_router()
    try:
        config = zenoh.Config()
        config.insert_json5("mode", json.dumps("client"))
        config.insert_json5("connect/endpoints", json.dumps([f"tcp/{address}"]))
        config.insert_json5("scouting/multicast/enabled", "false")
        with zenoh.open(config) as session:
            routers = session.info.routers_zid()
            assert len(routers) == 1  # a router, not a peer
            replies = [r.ok for r in session.get(f"@/{routers[0]}/router", timeout=5.0) if r.ok is not None]
            assert replies and json.loads(replies[0].payload.to_bytes())["version"].startswith("v")  # admin space: on
    finally:
        code, err = _stop(router, signum)
    assert code == 0, err
    assert "zenoh router stopped" in err


def test_zenoh_router_reports_an_endpoint_it_cannot_use() -> None:
    pytest.importorskip("zenoh", reason="eclipse-zenoh (the bench extra) is not installed")
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    with taken:
        port = taken.getsockname()[1]
        router = subprocess.run(
            [sys.executable, "-m", "dcp.bench.zenoh_router", "--listen", f"tcp/127.0.0.1:{port}"],
            capture_output=True, text=True, timeout=30,
        )
    assert router.returncode == 1
    assert "cannot listen" in router.stderr


@pytest.mark.parametrize(
    ("count", "size", "interval_ms"), [(500, 1024, None), (300, 1024, 1.0), (40, 128 * 1024, None)], ids=["flat-out", "paced", "128KiB"]
)
def test_zenoh_pair_delivers_exactly(zenoh_router: str, count: int, size: int, interval_ms: float | None) -> None:
    sent, got, route = _pair("zenoh", zenoh_router, count, size, interval_ms)
    _assert_exact(sent, got, count, size)
    assert route == ""


def test_zenoh_publisher_fails_without_a_router() -> None:
    pytest.importorskip("zenoh", reason="eclipse-zenoh (the bench extra) is not installed")
    pub = subprocess.run(
        [*WORKER, "pub", "--target", "zenoh", "--address", f"127.0.0.1:{_free_port()}", "--size", "100", "--count", "1"],
        capture_output=True, text=True, timeout=30,
    )
    assert pub.returncode == 1 and "could not connect" in pub.stderr
