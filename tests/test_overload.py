"""Overload: per-port slow-consumer policies, exact drop accounting, bounded memory.

In process (fake transports, pushed back by hand): what drop-oldest keeps, drops and
delivers, and in what order.  Over sockets: the policy an agent asks for.  As a real
broker process: one stalled consumer among fast ones under 100k messages.
"""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from typing import Any

import pytest

import dcp
from dcp.broker import Broker, BrokerConnection
from dcp.routing import encode
from dcp.wire import HOPS_OFFSET, DataFrame, Decoder, encode_control, encode_data

from .conftest import admin_stats, url_of
from .test_broker_protocol import attached, fresh_broker
from .test_orchestrator import Plane
from .waiting import until


def frame(broker: Broker, port: int, seq: int, size: int = 100) -> bytes:
    return encode_data("t", seq.to_bytes(4, "big") + bytes(size - 4), encode({broker.key: 1 << port}), msg_id=seq)


def seqs(written: bytes | bytearray) -> list[int]:
    return [event.msg_id for event in Decoder().feed(bytes(written)) if isinstance(event, DataFrame)]


# -- drop-oldest, in process --------------------------------------------------------------


def behind(frames: int, out_buffer: int = 4096) -> tuple[Broker, BrokerConnection, BrokerConnection]:
    """A publisher, and a drop-oldest port that fell behind while ``frames`` frames came (one read each)."""
    broker = fresh_broker(out_buffer_bytes=out_buffer)
    pub, sub = attached(broker), attached(broker)
    sub.set_slow_consumer("drop-oldest")
    sub.pause_writing()
    for seq in range(frames):
        pub.data_received(frame(broker, sub.port, seq))
    return broker, pub, sub


def test_drop_oldest_keeps_the_newest_within_the_bound_and_drains_them_in_order() -> None:
    broker, pub, sub = behind(40, out_buffer=1024)  # one read per frame: each is its own queue entry
    one = len(frame(broker, sub.port, 0))
    kept = 1024 // one
    assert sub.queued_bytes == kept * one <= 1024
    assert sub.dropped == broker.drops["slow_consumer"] == 40 - kept
    assert sub.transport.written == b""  # type: ignore[union-attr]
    sub.resume_writing()
    assert seqs(sub.transport.written) == list(range(40 - kept, 40))  # type: ignore[union-attr]
    assert (sub.queued_bytes, sub.frames_out + sub.dropped) == (0, 40)


def test_drop_oldest_entries_are_reads_and_the_counts_stay_exact() -> None:
    broker = fresh_broker(out_buffer_bytes=2048)
    pub, sub = attached(broker), attached(broker)
    sub.set_slow_consumer("drop-oldest")
    sub.pause_writing()
    seq = 0
    for reads in range(30):  # reads of 1 to 5 frames
        batch = [frame(broker, sub.port, seq + i) for i in range(reads % 5 + 1)]
        seq += len(batch)
        pub.data_received(b"".join(batch))
    assert sub.queued_bytes <= 2048
    sub.resume_writing()
    got = seqs(sub.transport.written)  # type: ignore[union-attr]
    assert got == list(range(seq - len(got), seq))  # the newest, contiguous, in order
    assert len(got) + sub.dropped == seq == broker.frames_in


def test_a_drained_queue_stops_where_the_transport_pushes_back_again() -> None:
    broker, pub, sub = behind(10)
    transport = sub.transport
    pushes = iter([False, False, True])  # the third write fills the buffer again
    original = transport.write  # type: ignore[union-attr]

    def write(data: bytes) -> None:
        original(data)
        if next(pushes, False):
            sub.pause_writing()

    transport.write = write  # type: ignore[union-attr,method-assign]
    sub.resume_writing()
    assert seqs(transport.written) == [0, 1, 2] and sub.paused  # type: ignore[union-attr]
    pub.data_received(frame(broker, sub.port, 10))  # still behind: queued after the rest
    sub.resume_writing()
    assert seqs(transport.written) == list(range(11))  # type: ignore[union-attr]


def test_leaving_drop_oldest_hands_the_queue_over_in_order() -> None:
    broker, pub, sub = behind(5)
    sub.set_slow_consumer("drop-newest")
    pub.data_received(frame(broker, sub.port, 5))  # paused, drop-newest: dropped
    assert seqs(sub.transport.written) == [0, 1, 2, 3, 4]  # type: ignore[union-attr]
    assert (sub.queued_bytes, sub.dropped) == (0, 1)


def test_drop_newest_and_pause_hold_nothing_aside() -> None:
    broker = fresh_broker()
    pub, newest, paused = attached(broker), attached(broker), attached(broker)
    paused.set_slow_consumer("pause")
    newest.pause_writing()
    paused.pause_writing()
    x = encode({broker.key: 1 << newest.port | 1 << paused.port})
    data = encode_data("t", b"x", x)
    pub.data_received(data)
    assert (newest.dropped, newest.queued_bytes) == (1, 0)
    assert pub.reading_paused and pub in paused.blocked  # the publisher is held, the frame went out
    written = bytearray(data)
    written[HOPS_OFFSET] -= 1
    assert bytes(paused.transport.written) == bytes(written)  # type: ignore[union-attr]
    paused.resume_writing()
    assert not pub.reading_paused


# -- choosing a port's policy -----------------------------------------------------------


async def test_an_agent_chooses_its_ports_policy_in_its_hello_and_later(make_broker) -> None:  # type: ignore[no-untyped-def]
    broker = await make_broker()  # default: drop-newest
    async with dcp.connect(url_of(broker), slow_consumer="drop-oldest") as a, dcp.connect(url_of(broker)) as b:
        policies = {c["port"]: c["policy"] for c in (await admin_stats(url_of(broker)))["connections"]}
        assert (policies[a.port], policies[b.port]) == ("drop-oldest", "drop-newest")
        await b.set_slow_consumer("pause")
        policies = {c["port"]: c["policy"] for c in (await admin_stats(url_of(broker)))["connections"]}
        assert policies[b.port] == "pause"
        with pytest.raises(dcp.RemoteError) as info:
            await b._request({"op": "policy", "slow_consumer": "drop-everything"})
        assert info.value.code == "bad_policy"
        assert {c["port"]: c["policy"] for c in (await admin_stats(url_of(broker)))["connections"]}[b.port] == "pause"


async def test_a_hello_with_an_unknown_policy_is_refused(broker: Broker) -> None:
    host, port = broker.address
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(encode_control({"op": "hello", "id": 1, "slow_consumer": "sometimes"}))
    events = Decoder().feed(await reader.read())  # the broker answers, then closes
    assert [e.body["code"] for e in events] == ["bad_policy"]
    assert broker.attached == 0
    writer.close()


def test_the_sdk_refuses_an_unknown_policy_before_connecting() -> None:
    with pytest.raises(dcp.ConfigError, match="slow_consumer must be one of"):
        dcp.Connection("dcp://127.0.0.1:1", slow_consumer="sometimes")
    with pytest.raises(dcp.ConfigError, match="slow_consumer must be one of"):
        dcp.DataAgent("agent", slow_consumer="sometimes")
    assert dcp.Connection("dcp://127.0.0.1:1", slow_consumer="drop").slow_consumer == "drop-newest"
    assert dcp.DataAgent("agent", slow_consumer="drop").slow_consumer == "drop-newest"


# -- a stalled consumer among fast ones, 100k messages, a real broker process ----------------------


def _rss_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


COUNT, SIZE, OUT_BUFFER = 100_000, 1024, 512 * 1024
# Stated bound on what the broker may add to its memory in this test: the stalled port's
# output buffer and drop-oldest queue (2 x --out-buffer-bytes), the fast ports' buffers,
# reads in flight, and allocator slack; queuing the 100 MB sent would break it 3 times over.
MEMORY_BOUND_KIB = (4 * OUT_BUFFER + 24 * 1024 * 1024) // 1024


@pytest.mark.parametrize("stalled_policy", ["drop-newest", "drop-oldest"])
async def test_a_stalled_consumer_among_fast_ones_costs_them_nothing_and_memory_stays_bounded(
    broker_process, stalled_policy: str
) -> None:  # type: ignore[no-untyped-def]
    proc = broker_process("--out-buffer-bytes", str(OUT_BUFFER), "--slow-consumer", "drop-newest")
    # The stalled consumer: a raw socket that never reads (until the end).  Its kernel
    # buffers stay at their defaults: a tiny receive window would make the final read
    # crawl at the pace of TCP's zero-window probes.
    stalled = socket.create_connection((proc.host, proc.port))
    stalled.sendall(encode_control({"op": "hello", "id": 1, "name": "stalled", "slow_consumer": stalled_policy}))
    welcome = Decoder().feed(stalled.recv(4096))[0]
    stalled_port = welcome.body["port"]
    fast_options = {"slow_consumer": "pause", "max_pending": 1000}  # lossless: they hold the publisher
    async with dcp.connect(proc.url, name="pub") as pub, dcp.connect(proc.url, name="fast1", **fast_options) as f1, \
            dcp.connect(proc.url, name="fast2", **fast_options) as f2:
        baseline = _rss_kib(proc.process.pid, "VmRSS")
        x = encode({proc.key: 1 << f1.port | 1 << f2.port | 1 << stalled_port})

        async def publish() -> None:
            for seq in range(COUNT):
                await pub.publish("load", seq.to_bytes(4, "big") + bytes(SIZE - 4), route=x)
            await pub.ping()

        async def consume(conn: dcp.Connection) -> int:
            expected = 0
            while expected < COUNT:
                msg = await conn.next_message(timeout=30)
                assert int.from_bytes(msg.payload[:4], "big") == expected  # nothing lost, in order
                expected += 1
            return expected

        publishing = asyncio.ensure_future(publish())
        assert await asyncio.gather(consume(f1), consume(f2)) == [COUNT, COUNT]
        await publishing
        stats = await admin_stats(proc.url)
        peak = _rss_kib(proc.process.pid, "VmHWM")
    ports = {c["port"]: c for c in stats["connections"]}
    stalled_stats = ports[stalled_port]
    assert stalled_stats["dropped"] == stats["drops"]["slow_consumer"] > 0
    assert stalled_stats["buffered"] + stalled_stats["queued"] <= 2 * OUT_BUFFER + 256 * 1024
    growth = f"{stalled_policy}: broker memory grew {peak - baseline} KiB (bound {MEMORY_BOUND_KIB} KiB)"
    print(growth, f"stalled port dropped {stalled_stats['dropped']} of {COUNT}")
    assert peak - baseline <= MEMORY_BOUND_KIB, growth
    # Unstall: every frame is either read now or counted as dropped, exactly.
    stalled.setblocking(False)
    decoder, got = Decoder(), []
    loop = asyncio.get_running_loop()
    while len(got) + stalled_stats["dropped"] < COUNT:
        data = await asyncio.wait_for(loop.sock_recv(stalled, 1 << 20), 30)
        assert data, "the broker closed the stalled consumer"
        got += [int.from_bytes(e.payload[:4], "big") for e in decoder.feed(data) if isinstance(e, DataFrame)]
    assert len(got) + stalled_stats["dropped"] == COUNT
    assert got == sorted(set(got))  # in order, no duplicates
    if stalled_policy == "drop-newest":
        assert got[0] == 0 and got[-1] < COUNT - 1  # it kept the first frames
    else:
        assert got[-1] == COUNT - 1  # it kept the newest
    stalled.close()
    code, log = proc.stop()
    assert code == 0, log


async def test_a_spec_element_sets_its_agents_port_policy(tmp_path: Path) -> None:
    """The orchestrator hands an element's ``slow_consumer`` param to the agent it assigns,
    which asks its broker for that policy on its port (and keeps it for reconnects)."""
    plane = Plane(tmp_path / "do.db")
    try:
        await plane.start_do()
        (broker,) = await plane.start_brokers(1)
        source, sink = plane.agent("source", 0), plane.agent("sink", 0)

        @source.capability("emit")
        async def emit(params: dict[str, Any]) -> Any:
            yield b"x"

        @sink.capability("keep")
        async def keep(msg: dcp.Message, params: dict[str, Any]) -> None:
            return None

        for agent in (source, sink):
            await agent.start()
        spec = {
            "name": "p",
            "source": [{"name": "src", "capability": "emit", "emits": "t"}],
            "sink": [{"name": "out", "capability": "keep", "consumes": ["t"], "params": {"slow_consumer": "drop-oldest"}}],
        }
        await plane.admin({"op": "deploy", "spec": spec})

        def policies() -> dict[str, str]:
            return {c["name"]: c["policy"] for c in broker.stats()["connections"] if c["role"] == "agent"}

        await until(lambda: policies().get("sink") == "drop-oldest", lambda: f"the sink's port policy (now {policies()})")
        assert policies()["source"] == broker.slow_consumer == "pause"  # the broker default the plane sets
        assert sink.slow_consumer == "drop-oldest" and sink.broker is not None and sink.broker.slow_consumer == "drop-oldest"
    finally:
        await plane.close()
