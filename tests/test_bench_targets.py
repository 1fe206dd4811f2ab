"""The targets and measuring workers of ``dcp bench``: the raw relay, dcp with a commit log,
the payload stamp, and a publisher/subscriber worker pair against each in-tree target."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import dcp
from dcp.bench.commitlog import CommitLogBroker
from dcp.bench.relay import PUBLISH, SUBSCRIBE, SUBSCRIBE_PAUSING, Relay, frame
from dcp.bench.targets import IN_TREE, TARGETS, availability, start_server
from dcp.bench.worker import STAMP_SIZE, stamp, unstamp
from dcp.config import BrokerConfig
from dcp.wire import DataFrame, Decoder
from tests.waiting import until

# -- the raw relay ----------------------------------------------------------------------------


async def _relay_client(relay: Relay, role: bytes, rcvbuf: int = 0) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = relay.address
    sock = None
    if rcvbuf:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (host, port))
        reader, writer = await asyncio.open_connection(sock=sock, limit=2**24)
    else:
        reader, writer = await asyncio.open_connection(host, port, limit=2**24)
    writer.write(frame(role))
    if role in (SUBSCRIBE, SUBSCRIBE_PAUSING):
        assert await asyncio.wait_for(reader.readexactly(5), 5) == frame(SUBSCRIBE)  # registered
    return reader, writer


async def _read_frames(reader: asyncio.StreamReader, n: int) -> list[bytes]:
    frames = []
    for _ in range(n):
        length = int.from_bytes(await reader.readexactly(4), "big")
        frames.append(await reader.readexactly(length))
    return frames


class _Recorder:
    """A fake transport: records what the relay writes to it."""

    def __init__(self) -> None:
        self.written = bytearray()

    def write(self, data: bytes) -> None:
        self.written += data

    def writelines(self, chunks: list[bytes]) -> None:
        for chunk in chunks:
            self.written += chunk

    def is_closing(self) -> bool:
        return False

    def get_extra_info(self, name: str) -> None:
        return None

    def set_write_buffer_limits(self, high: int) -> None:
        pass


RELAY_BODIES = [bytes([i % 251]) * size for i, size in enumerate([0, 1, 10, 1000, 70_000, 3, 1_000_000, 5, 64 * 1024, 17])]


@pytest.mark.parametrize("cuts", [[1], [1, 2, 3, 7, 4096, 100_000, 333_333], [5], [70_005], [10**7]])
def test_relay_forwards_whole_frames_in_order_under_any_reads(cuts: list[int]) -> None:
    """Driven in process, so each read is exactly the piece given: prefixes and frames
    cut everywhere, a frame longer than many reads."""
    from dcp.bench.relay import RelayConnection

    relay = Relay()
    conns = []
    for role in (SUBSCRIBE, SUBSCRIBE, PUBLISH):
        conn = RelayConnection(relay)
        conn.connection_made(_Recorder())  # type: ignore[arg-type]
        conn.data_received(frame(role))
        conns.append(conn)
    sub1, sub2, pub = conns
    for sub in (sub1, sub2):
        assert sub.transport.written == frame(SUBSCRIBE)  # type: ignore[union-attr]  # "ready"
        sub.transport.written.clear()  # type: ignore[union-attr]
    stream = b"".join(frame(body) for body in RELAY_BODIES)
    pos = i = 0
    while pos < len(stream):
        step = cuts[i % len(cuts)]
        pub.data_received(stream[pos : pos + step])
        pos += step
        i += 1
    for sub in (sub1, sub2):
        assert bytes(sub.transport.written) == stream  # type: ignore[union-attr]
    assert pub.transport.written == b""  # type: ignore[union-attr]
    sub1.data_received(frame(b"from sub1"))  # a subscriber's frames go to the others, never back
    assert bytes(sub2.transport.written) == stream + frame(b"from sub1")  # type: ignore[union-attr]
    assert bytes(sub1.transport.written) == stream  # type: ignore[union-attr]
    assert relay.frames_in == len(RELAY_BODIES) + 1 and relay.dropped == 0


async def test_relay_forwards_whole_frames_in_order_to_subscribers_only() -> None:
    relay = Relay()
    await relay.start()
    try:
        sub1, sub1_w = await _relay_client(relay, SUBSCRIBE)
        sub2, sub2_w = await _relay_client(relay, SUBSCRIBE)
        pub, pub_w = await _relay_client(relay, PUBLISH)
        stream = b"".join(frame(body) for body in RELAY_BODIES)
        pub_w.write(stream)
        await pub_w.drain()
        for reader in (sub1, sub2):
            assert await asyncio.wait_for(_read_frames(reader, len(RELAY_BODIES)), 10) == RELAY_BODIES
        # a subscriber's own frame goes to the other subscriber, never back to it: what
        # sub1 reads next is the publisher's marker, sent after sub2 got sub1's frame
        sub1_w.write(frame(b"from sub1"))
        await sub1_w.drain()
        assert await asyncio.wait_for(_read_frames(sub2, 1), 5) == [b"from sub1"]
        pub_w.write(frame(b"marker"))
        await pub_w.drain()
        assert await asyncio.wait_for(_read_frames(sub1, 1), 5) == [b"marker"]
        assert await asyncio.wait_for(_read_frames(sub2, 1), 5) == [b"marker"]
        assert relay.frames_in == len(RELAY_BODIES) + 2
        assert relay.dropped == 0
        for writer in (sub1_w, sub2_w):
            writer.close()
    finally:
        await relay.close()
    assert await asyncio.wait_for(pub.read(), 5) == b""  # the publisher got nothing, then EOF
    pub_w.close()


async def test_relay_drops_and_counts_for_a_full_subscriber() -> None:
    relay = Relay(out_buffer_bytes=1024 * 1024)
    await relay.start()
    try:
        _stuck, stuck_w = await _relay_client(relay, SUBSCRIBE, rcvbuf=4096)  # never reads
        fast, fast_w = await _relay_client(relay, SUBSCRIBE)
        _pub, pub_w = await _relay_client(relay, PUBLISH)
        body = b"x" * 65536
        n = 200  # 13 MB: more than the stuck socket, the kernel and 1 MiB of buffer can hold
        for i in range(n):  # in lockstep with the reader, so only the stuck subscriber falls behind
            pub_w.write(frame(bytes([i % 256]) + body))
            assert await asyncio.wait_for(_read_frames(fast, 1), 5) == [bytes([i % 256]) + body]
        assert relay.frames_in == n
        assert relay.dropped > 0  # the stuck one lost frames, counted
        assert relay.frames_out + relay.dropped == 2 * n
        for writer in (stuck_w, fast_w, pub_w):
            writer.close()
    finally:
        await relay.close()


async def test_a_pausing_subscriber_pauses_the_publishers_and_loses_nothing() -> None:
    relay = Relay(out_buffer_bytes=1024 * 1024)
    await relay.start()
    try:
        slow, slow_w = await _relay_client(relay, SUBSCRIBE_PAUSING, rcvbuf=4096)  # reads only once the relay paused
        _pub, pub_w = await _relay_client(relay, PUBLISH)
        body = b"x" * 65536
        n = 200  # 13 MB: more than the socket, the kernel and 1 MiB of buffer can hold
        for i in range(n):
            pub_w.write(frame(bytes([i % 256]) + body))
        await until(lambda: relay.full_pausing == 1, "the relay never paused its publisher")
        assert await asyncio.wait_for(_read_frames(slow, n), 30) == [bytes([i % 256]) + body for i in range(n)]
        assert relay.dropped == 0 and relay.frames_in == n and relay.full_pausing == 0
        for writer in (slow_w, pub_w):
            writer.close()
    finally:
        await relay.close()


def test_relay_and_commitlog_processes_listen_and_exit_0_on_sigterm(tmp_path: Path) -> None:
    for target in ("relay", "dcp-commitlog"):
        server = start_server(target, tmp_path)
        host, port = server.address.rsplit(":", 1)
        socket.create_connection((host, int(port)), timeout=2).close()
        log_dir = server.workdir
        assert server.stop() == 0, server.output
        if target == "dcp-commitlog":
            assert "mode=stateful" in server.output
            assert log_dir is not None and not log_dir.exists()  # the commit log goes with the server


# -- dcp with a commit log ----------------------------------------------------------------------


def _frames_in_log(directory: Path) -> list[DataFrame]:
    data = b"".join(path.read_bytes() for path in sorted(directory.glob("*.log")))
    return [event for event in Decoder().feed(data) if isinstance(event, DataFrame)]


async def test_commitlog_forwards_like_a_stateful_broker_and_logs_every_forwarded_byte(tmp_path: Path) -> None:
    queue = CommitLogBroker(BrokerConfig(listen="127.0.0.1:0", insecure=True), log_dir=tmp_path)
    await queue.start()
    try:
        url = "dcp://%s:%d" % queue.address
        async with dcp.connect(url, reconnect=False) as sub, dcp.connect(url, reconnect=False) as pub:
            assert sub.broker_mode == "stateful"
            await sub.subscribe("t")
            payloads = [bytes([i]) * size for i, size in enumerate([1, 10, 1000, 200_000, 5, 70_000, 3])]
            for payload in payloads:
                await pub.publish("t", payload)
            await pub.publish("nobody", b"not forwarded, not logged")
            got = [await sub.next_message(5) for _ in payloads]
            assert [m.payload for m in got] == payloads
            await pub.ping()
        log = queue.commit_log
        assert log.offset == queue.bytes_out > sum(map(len, payloads))  # one subscriber: log == bytes forwarded
        assert log.size_on_disk() == log.offset
        assert [f.payload for f in _frames_in_log(tmp_path)] == payloads  # byte-identical frames, hop patched
        assert all(f.hops == got[0].hops for f in _frames_in_log(tmp_path))
    finally:
        await queue.close()


async def test_commitlog_rolls_segments_and_can_flush_every_write(tmp_path: Path) -> None:
    queue = CommitLogBroker(BrokerConfig(listen="127.0.0.1:0", insecure=True), log_dir=tmp_path, segment_bytes=10_000, fsync_interval_ms=0)
    await queue.start()
    try:
        url = "dcp://%s:%d" % queue.address
        async with dcp.connect(url, reconnect=False) as sub, dcp.connect(url, reconnect=False) as pub:
            await sub.subscribe("t")
            for i in range(60):
                await pub.publish("t", bytes(1000))
                await sub.next_message(5)
        log = queue.commit_log
        assert log.offset == queue.bytes_out
        assert log.syncs >= log.writes > 0
        assert len(list(tmp_path.glob("*.log"))) == 2  # at most two segments kept
        assert log.size_on_disk() < log.offset
    finally:
        await queue.close()


# -- the payload stamp ------------------------------------------------------------------------


def test_stamp_round_trip_and_minimum_size() -> None:
    before = time.time_ns() // 1000 % 2**48
    payload = stamp(7, STAMP_SIZE)
    after = time.time_ns() // 1000 % 2**48
    assert len(payload) == 10
    sent_us, seq = unstamp(payload)
    assert seq == 7 and before <= sent_us <= after
    big = stamp(2**32 + 5, 1000)  # the sequence number is a u32
    assert len(big) == 1000 and big[10:] == bytes(990) and unstamp(big)[1] == 5
    with pytest.raises(ValueError):
        stamp(1, 9)
    with pytest.raises(ValueError):
        unstamp(b"123456789")


# -- the workers, end to end --------------------------------------------------------------------


def _worker(role: str, target: str, address: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "dcp.bench.worker", role, "--target", target, "--address", address, "--topic", "bench", *args],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def _pair(
    target: str, address: str, count: int = 200, size: int = 1000, interval_ms: float = 1.0, client_args: tuple[str, ...] = ()
) -> tuple[dict, dict]:
    sub = _worker("sub", target, address, *client_args, "--expect", str(count), "--idle-timeout", "2", "--max-time", "30", "--keep-latencies")
    try:
        assert sub.stdout is not None
        ready = json.loads(sub.stdout.readline() or "{}")
        assert ready.get("ready") is True, sub.stderr.read() if sub.stderr else ""
        assert isinstance(ready["route"], str) and (ready["route"] != "") == (target in ("dcp-stateless", "dcp-verified"))
        args = [*client_args, "--size", str(size), "--count", str(count), "--interval-ms", str(interval_ms)]
        if ready["route"]:
            args += ["--route", ready["route"]]
        pub = subprocess.run(
            [sys.executable, "-m", "dcp.bench.worker", "pub", "--target", target, "--address", address, "--topic", "bench", *args],
            capture_output=True, text=True, timeout=30,
        )
        assert pub.returncode == 0, pub.stderr
        out, err = sub.communicate(timeout=30)
        assert sub.returncode == 0, err
        return json.loads(pub.stdout.strip().splitlines()[-1]), json.loads(out.strip().splitlines()[-1])
    finally:
        if sub.poll() is None:
            sub.kill()
            sub.wait()


@pytest.mark.parametrize("target", IN_TREE)
def test_worker_pair_against_each_in_tree_target(target: str, tmp_path: Path) -> None:
    server = start_server(target, tmp_path)
    try:
        sent, got = _pair(target, server.address, client_args=server.client_args)
        if target.startswith("dcp-"):
            stats = subprocess.run(
                [sys.executable, "-m", "dcp", "stats", "--json", server.address], capture_output=True, text=True, timeout=30
            )
            stats_json = json.loads(stats.stdout)
            assert stats_json["verify_routes"] == (target == "dcp-verified")
            assert stats_json["frames_out"] == 200 and not any(stats_json["drops"].values())
    finally:
        assert server.stop() == 0
    assert sent["sent"] == 200 and sent["bytes"] == 200_000
    assert sent["elapsed_s"] >= 0.19  # paced: 200 messages 1 ms apart
    assert sent["cpu_s"] > 0
    assert got["received"] == 200 and got["bytes"] == 200_000
    assert got["duplicates"] == 0 and got["out_of_order"] == 0 and got["max_seq"] == 199
    assert got["first_recv_ns"] <= got["last_recv_ns"]
    lat = got["latency_us"]
    assert set(lat) == {"p50", "p90", "p99", "max", "mean"}
    assert 0 <= lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"] < 5_000_000
    assert len(got["latencies_us"]) == 200


def test_subscriber_reports_when_stopped_by_sigterm(tmp_path: Path) -> None:
    server = start_server("relay", tmp_path)
    try:
        sub = _worker("sub", "relay", server.address, "--max-time", "60")
        assert sub.stdout is not None
        assert json.loads(sub.stdout.readline()) == {"ready": True, "route": ""}
        sub.send_signal(signal.SIGTERM)
        out, err = sub.communicate(timeout=10)
        assert sub.returncode == 0, err
        result = json.loads(out.strip().splitlines()[-1])
        assert result["received"] == 0 and result["latency_us"]["p50"] is None
    finally:
        server.stop()


# -- the external targets ------------------------------------------------------------------------


def test_availability_reports_without_raising() -> None:
    for target in TARGETS:
        ok, detail = availability(target)
        assert isinstance(ok, bool) and isinstance(detail, str) and detail
        if target in IN_TREE:
            assert ok and dcp.__version__ in detail
    assert availability("no-such-broker")[0] is False
