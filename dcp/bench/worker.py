"""The measuring processes of ``dcp bench``: one publisher or one subscriber, any target.

::

    python -m dcp.bench.worker sub --target T --address HOST:PORT --topic TOPIC
        [--expect N] [--idle-timeout S] [--max-time S] [--keep-latencies]
    python -m dcp.bench.worker pub --target T --address HOST:PORT --topic TOPIC
        --size BYTES --count N [--interval-ms MS] [--duration S] [--route X]

Every payload starts with a 10-byte stamp (:func:`stamp`): the send time in
microseconds since the epoch modulo 2**48 (6 bytes, big-endian) and a sequence
number (u32, big-endian), then zeros up to the message size.  The subscriber takes
``time.time_ns()`` the moment its client hands it a message (in the client's
callback, or as its iterator yields) and the latency is that minus the stamp: both
ends run on this host, on the same clock.

The subscriber prints ``{"ready": true, "route": "..."}`` once its subscription has
taken effect, then one result line when it is done (N messages, or idle for
``--idle-timeout`` after the first, or ``--max-time`` after ready, or SIGTERM/SIGINT).
The route is what the publisher must be given as ``--route``: the topology number X of a
dcp-stateless or dcp-verified subscriber (a decimal string); the subject of the
JetStream stream (nats-jetstream), the name of the quorum queue (rabbitmq-quorum) or
the stream key (redis-streams) the subscriber made for this run, and deletes when it
ends; empty for every other target.  The publisher prints one result line once
everything it sent has reached the server: for the persistent queues, once the server
has acknowledged every message as stored.  See :func:`main` for the keys.

The clients of the external brokers (nats-py, redis, aiomqtt, aio-pika,
eclipse-zenoh: the ``bench`` extra) are imported only by their adapters, each of
which says in its section what "ready", "received" and "reached the server" mean for
its broker: an adapter is ``_sub_X(args, rec, ready, stop)`` and ``_pub_X(args) ->
(send, finish)``, registered in FAMILIES, SUBSCRIBERS and PUBLISHERS.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import functools
import json
import signal
import struct
import sys
import time
import uuid
from collections.abc import Callable
from typing import Any, cast

from .._loop import CoalescedWriter, no_delay

__all__ = ["stamp", "unstamp", "STAMP_SIZE", "Recorder", "main"]

STAMP_SIZE = 10
_MASK48 = (1 << 48) - 1
_HALF48 = 1 << 47
_STAMP = struct.Struct("!HII")  # the 48-bit time as 16 + 32 bits, then the sequence number
_pack_stamp = _STAMP.pack
_unpack_stamp = _STAMP.unpack_from
_PADS: dict[int, bytes] = {}
FAMILIES = {
    "dcp-stateless": "dcp", "dcp-stateful": "dcp", "dcp-verified": "dcp", "dcp-commitlog": "dcp", "relay": "relay",
    "nats": "nats", "redis": "redis", "mqtt": "mqtt", "rabbitmq": "rabbitmq", "zenoh": "zenoh",
    "nats-jetstream": "nats-jetstream", "rabbitmq-quorum": "rabbitmq-quorum", "redis-streams": "redis-streams",
    "mqtt-gateway": "mqtt", "mqtt-gateway-dcp": "mqtt-gateway-dcp",
}
ROUTED = ("dcp-stateless", "dcp-verified")  # publishers route by the X their subscriber reports
# What a publisher needs from its subscriber's ready line ("route"), checked before anything else.
ROUTE_OF = {
    **dict.fromkeys(ROUTED, "X"), "nats-jetstream": "SUBJECT", "rabbitmq-quorum": "QUEUE", "redis-streams": "KEY",
}
EXCHANGE = "dcp-bench"  # RabbitMQ: a direct exchange, the topic is the routing key
CONNECT_TIMEOUT_S = 10.0


def stamp(seq: int, size: int) -> bytes:
    """A payload of ``size`` bytes (at least 10) stamped with the time now and ``seq``."""
    pad = _PADS.get(size)
    if pad is None:
        if size < STAMP_SIZE:
            raise ValueError(f"a payload needs at least {STAMP_SIZE} bytes for its stamp, got size={size}")
        pad = _PADS[size] = bytes(size - STAMP_SIZE)
    us = time.time_ns() // 1000 & _MASK48
    return _pack_stamp(us >> 32, us & 0xFFFFFFFF, seq & 0xFFFFFFFF) + pad


def unstamp(payload: bytes | bytearray | memoryview) -> tuple[int, int]:
    """(send time in µs since the epoch modulo 2**48, seq) of a stamped payload."""
    if len(payload) < STAMP_SIZE:
        raise ValueError(f"a stamped payload has at least {STAMP_SIZE} bytes, got {len(payload)}")
    hi, lo, seq = _unpack_stamp(payload, 0)
    return hi << 32 | lo, seq


# -- the subscriber's bookkeeping ----------------------------------------------------------


class Recorder:
    """Counts, sequence checks and latencies of the messages received."""

    def __init__(self, expect: int | None = None, keep: bool = False, every: int = 1) -> None:
        self.expect = expect
        self.keep = keep
        self.every = every  # keep the latency of one message in this many (sequence numbers), for long runs
        self.received = 0  # distinct sequence numbers
        self.bytes = 0
        self.duplicates = 0
        self.out_of_order = 0
        self.max_seq = -1
        self.first_ns: int | None = None
        self.last_ns: int | None = None
        self.latencies: list[int] = []
        self.errors = 0  # payloads too short to carry a stamp
        self.done = asyncio.Event()
        self._seen = bytearray(4096)

    def record(self, buf: Any, offset: int, size: int, now_ns: int) -> None:
        """One message: ``size`` payload bytes at ``buf[offset:]``, received at ``now_ns``."""
        if size < STAMP_SIZE:
            self.errors += 1
            return
        hi, lo, seq = _unpack_stamp(buf, offset)
        seen = self._seen
        if seq >= len(seen):
            seen.extend(bytes(max(seq + 1, 2 * len(seen)) - len(seen)))
        if seen[seq]:
            self.duplicates += 1
            return
        seen[seq] = 1
        latency = (now_ns // 1000 - (hi << 32 | lo)) & _MASK48
        if latency >= _HALF48:  # the stamp is ahead of our clock (it cannot be, on one host)
            latency -= 1 << 48
        if self.every == 1 or not seq % self.every:
            self.latencies.append(latency)
        if seq < self.max_seq:
            self.out_of_order += 1
        else:
            self.max_seq = seq
        if self.first_ns is None:
            self.first_ns = now_ns
        self.last_ns = now_ns
        self.bytes += size
        self.received += 1
        if self.received == self.expect:
            self.done.set()

    def result(self) -> dict[str, Any]:
        ordered = sorted(self.latencies)
        n = len(ordered)

        def pick(q: float) -> int | None:
            return ordered[min(int(q * n), n - 1)] if n else None

        out: dict[str, Any] = {
            "received": self.received,
            "bytes": self.bytes,
            "duplicates": self.duplicates,
            "out_of_order": self.out_of_order,
            "max_seq": self.max_seq,
            "first_recv_ns": self.first_ns,
            "last_recv_ns": self.last_ns,
            "latency_us": {
                "p50": pick(0.50), "p90": pick(0.90), "p99": pick(0.99),
                "max": ordered[-1] if n else None, "mean": round(sum(ordered) / n, 1) if n else None,
            },
        }
        if self.errors:
            out["malformed"] = self.errors
        if self.keep:
            out["latencies_us"] = self.latencies
        return out


def _emit(line: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(line, separators=(",", ":")) + "\n")
    sys.stdout.flush()


def _host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]") or "127.0.0.1", int(port)


Ready = Callable[[str], None]


# -- dcp (stateless, stateful, commitlog) ------------------------------------------------------


async def _sub_dcp(args: argparse.Namespace, rec: Recorder, ready: Ready, stop: asyncio.Event) -> None:
    from ..client import Message, connect

    record = rec.record

    def on_message(msg: Message) -> None:
        now = time.time_ns()
        payload = msg.payload
        record(payload, 0, len(payload), now)

    conn = await connect(
        f"dcp://{args.address}", name="bench-sub", reconnect=False, connect_timeout_s=CONNECT_TIMEOUT_S,
        slow_consumer=args.slow_consumer, on_message=on_message if args.receive == "callback" else None,
    )
    try:
        drain = None
        if args.receive == "iterator":
            async def consume() -> None:
                async for msg in conn.messages():
                    on_message(msg)

            drain = asyncio.ensure_future(consume())
        elif args.receive == "batches":
            async def consume_batches() -> None:
                async for batch in conn.batches():
                    now = time.time_ns()
                    for msg in batch:
                        payload = msg.payload
                        record(payload, 0, len(payload), now)

            drain = asyncio.ensure_future(consume_batches())
        if args.target in ROUTED:
            assert conn.port is not None  # welcomed
            ready(str(conn.route_to(conn.port)))
        else:
            await conn.subscribe(args.topic)
            ready("")
        await _until(stop, asyncio.ensure_future(_dcp_closed(conn)), drain)
    finally:
        await conn.close()


async def _dcp_closed(conn: Any) -> None:
    """Ends when the connection is closed for good (no reconnects here)."""
    from ..client import Status

    while conn.status is not Status.CLOSED:
        await asyncio.sleep(0.1)
    raise ConnectionError("the broker closed the connection")


async def _until(stop: asyncio.Event, *others: asyncio.Future[Any] | None) -> None:
    """Wait for ``stop``, or for any of ``others`` to end (its error is raised)."""
    waiting = asyncio.ensure_future(stop.wait())
    futures = {waiting, *(f for f in others if f is not None)}
    done, _ = await asyncio.wait(futures, return_when=asyncio.FIRST_COMPLETED)
    for fut in futures:
        if fut not in done:
            fut.cancel()
    for fut in done:
        if fut is not waiting and not fut.cancelled():
            exc = fut.exception()
            if exc is not None:
                raise exc


async def _pub_dcp(args: argparse.Namespace) -> Any:
    from ..client import connect

    conn = await connect(
        f"dcp://{args.address}", name="bench-pub", reconnect=False, connect_timeout_s=CONNECT_TIMEOUT_S, request_timeout_s=60.0
    )
    route = int(args.route or 0) if args.target in ROUTED else 0
    topic = args.topic
    publish = conn.publish
    tag = None
    if args.secret_file:  # dcp-verified: sign X as the orchestrator would
        from ..auth import RouteSigner, load_secret

        assert conn.broker_key is not None  # welcomed
        tag = RouteSigner(load_secret(args.secret_file)).sign(
            topic, route, 1, int(time.time()) + 3600, producer=conn.name, broker_key=conn.broker_key
        )

    send = functools.partial(publish, topic, route=route, tag=tag)  # publish itself, as an application calls it

    async def finish() -> None:
        try:
            await conn.ping()  # answered once the broker has read everything before it
        finally:
            await conn.close()

    return send, finish


# -- the raw relay -----------------------------------------------------------------------------


class _RelayClient(asyncio.Protocol):
    def __init__(self, rec: Recorder | None) -> None:
        self.rec = rec
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.acked: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._writable: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # a stream connection's transport
        no_delay(transport)
        self.transport.set_write_buffer_limits(high=1024 * 1024)

    def data_received(self, data: bytes) -> None:
        now = time.time_ns()
        buf = self.buf
        if buf:
            buf += data
            view: Any = buf
        else:
            view = data
        end = len(view)
        pos = 0
        record = self.rec.record if self.rec is not None else None
        while end - pos >= 4:
            length = int.from_bytes(view[pos : pos + 4], "big")
            if end - pos - 4 < length:
                break
            if not self.acked.done():
                self.acked.set_result(None)
            elif record is not None:
                record(view, pos + 4, length, now)
            pos += 4 + length
        if buf:
            del buf[:pos]
        elif pos < end:
            buf += data[pos:]

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(None)
        if not self.acked.done():
            self.acked.set_exception(ConnectionError("the relay closed the connection"))
        self.resume_writing()

    def pause_writing(self) -> None:
        if self._writable is None:
            self._writable = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        writable, self._writable = self._writable, None
        if writable is not None and not writable.done():
            writable.set_result(None)


async def _relay_connect(address: str, rec: Recorder | None, role: bytes) -> _RelayClient:
    from .relay import frame

    host, port = _host_port(address)
    loop = asyncio.get_running_loop()
    transport, client = await asyncio.wait_for(loop.create_connection(lambda: _RelayClient(rec), host, port), CONNECT_TIMEOUT_S)
    transport.write(frame(role))
    return client


async def _sub_relay(args: argparse.Namespace, rec: Recorder, ready: Ready, stop: asyncio.Event) -> None:
    from .relay import SUBSCRIBE, SUBSCRIBE_PAUSING

    client = await _relay_connect(args.address, rec, SUBSCRIBE_PAUSING if args.slow_consumer == "pause" else SUBSCRIBE)
    try:
        await asyncio.wait_for(asyncio.shield(client.acked), CONNECT_TIMEOUT_S)  # the relay answers b"S" once registered
        ready("")
        await _until(stop, client.lost)
    finally:
        assert client.transport is not None  # connected
        client.transport.close()


async def _pub_relay(args: argparse.Namespace) -> Any:
    from .relay import PUBLISH

    client = await _relay_connect(args.address, None, PUBLISH)
    client.acked.cancel()  # a publisher is not answered: nobody waits for it
    transport = client.transport
    assert transport is not None
    writer = CoalescedWriter(transport)  # small frames gathered as the dcp client does
    prefix = struct.Struct("!I").pack

    async def send(payload: bytes) -> None:
        if client._writable is not None:
            await client._writable
            if transport.is_closing():
                raise ConnectionError("the relay closed the connection")
        size = len(payload)
        writer.write_frame(prefix(size), b"", payload, size)

    async def finish() -> None:
        writer.flush()
        transport.close()  # flushes the buffer, then closes: the relay reads to the end
        await asyncio.wait_for(asyncio.shield(client.lost), 60)

    return send, finish


# -- NATS (nats-py) ---------------------------------------------------------------------------------------


async def _nats_error(exc: Exception) -> None:
    print(f"nats: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)


async def _nats_connect(address: str, **options: Any) -> Any:
    import nats

    # nats-py retries an unreachable server forever unless told a number of attempts
    return await asyncio.wait_for(
        nats.connect(
            f"nats://{address}", allow_reconnect=False, max_reconnect_attempts=1, reconnect_time_wait=0.1,
            connect_timeout=CONNECT_TIMEOUT_S, error_cb=_nats_error, **options,
        ),
        CONNECT_TIMEOUT_S,
    )


async def _nats_watched(address: str) -> tuple[Any, asyncio.Future[None]]:
    """A NATS connection, and a future done once it closes (for a subscriber to end on)."""
    lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def on_closed() -> None:
        if not lost.done():
            lost.set_result(None)

    return await _nats_connect(address, closed_cb=on_closed), lost


async def _sub_nats(args: argparse.Namespace, rec: Recorder, ready: Ready, stop: asyncio.Event) -> None:
    nc, lost = await _nats_watched(args.address)
    record = rec.record
    try:
        async def on_msg(msg: Any) -> None:
            now = time.time_ns()
            data = msg.data
            record(data, 0, len(data), now)

        await nc.subscribe(args.topic, cb=on_msg, pending_msgs_limit=1_000_000, pending_bytes_limit=1024 * 1024 * 1024)
        await nc.flush(timeout=CONNECT_TIMEOUT_S)  # the server has the subscription
        ready("")
        await _until(stop, lost)
    finally:
        if not nc.is_closed:
            await nc.close()


async def _pub_nats(args: argparse.Namespace) -> Any:
    nc = await _nats_connect(args.address)
    publish = nc.publish
    topic = args.topic

    async def send(payload: bytes) -> None:
        await publish(topic, payload)

    async def finish() -> None:
        try:
            await nc.flush(timeout=60)  # PING/PONG after everything: the server has read it all
        finally:
            await nc.close()

    return send, finish


# -- Redis (redis.asyncio pub/sub) --------------------------------------------------------------------


async def _sub_redis(args: argparse.Namespace, rec: Recorder, ready: Ready, stop: asyncio.Event) -> None:
    import redis.asyncio as aioredis

    host, port = _host_port(args.address)
    client = aioredis.Redis(host=host, port=port, socket_connect_timeout=CONNECT_TIMEOUT_S)
    pubsub = client.pubsub()
    try:
        await pubsub.subscribe(args.topic)
        while True:  # the SUBSCRIBE acknowledgement
            reply = await pubsub.get_message(timeout=CONNECT_TIMEOUT_S)
            if reply is None:
                raise TimeoutError("redis did not acknowledge SUBSCRIBE")
            if reply.get("type") == "subscribe":
                break
        record = rec.record

        async def consume() -> None:
            async for message in pubsub.listen():
                now = time.time_ns()
                if message.get("type") == "message":
                    data = message["data"]
                    record(data, 0, len(data), now)

        ready("")
        await _until(stop, asyncio.ensure_future(consume()))
    finally:
        try:
            await pubsub.aclose() if hasattr(pubsub, "aclose") else await pubsub.close()
            await client.aclose() if hasattr(client, "aclose") else await client.close()
        except Exception:
            pass


async def _pub_redis(args: argparse.Namespace) -> Any:
    topic = args.topic
    return await _redis_publisher(args, lambda target, payload: target.publish(topic, payload), lambda replies: None)


async def _redis_publisher(args: argparse.Namespace, command: Callable[[Any, bytes], Any], check: Callable[[list[Any]], None]) -> Any:
    """send and finish of a Redis publisher, one ``command`` (on the client or a pipeline)
    per message: awaited one by one when paced; else pipelined 64 at a time (or per MiB),
    like the other clients that write without waiting for a reply.  ``check`` sees the
    replies; ``finish`` returns once every command is answered: the server has them all."""
    import redis.asyncio as aioredis

    host, port = _host_port(args.address)
    client = aioredis.Redis(host=host, port=port, socket_connect_timeout=CONNECT_TIMEOUT_S)
    await client.ping()
    if args.interval_ms:

        async def send(payload: bytes) -> None:
            check([await command(client, payload)])

        async def flush() -> None:
            pass
    else:
        batch: list[bytes] = []
        batch_bytes = 0

        async def flush() -> None:
            nonlocal batch, batch_bytes
            if batch:
                pipe = client.pipeline(transaction=False)
                for payload in batch:
                    command(pipe, payload)
                batch, batch_bytes = [], 0
                check(await pipe.execute())

        async def send(payload: bytes) -> None:
            nonlocal batch_bytes
            batch.append(payload)
            batch_bytes += len(payload)
            if len(batch) >= 64 or batch_bytes >= 1024 * 1024:
                await flush()

    async def finish() -> None:
        try:
            await flush()
        finally:
            await client.aclose() if hasattr(client, "aclose") else await client.close()

    return send, finish


# -- MQTT (aiomqtt, QoS 0) ----------------------------------------------------------------------------------

# paho uses a plain socket and leaves Nagle on; with it a paced 1 KB stream waits for delayed
# ACKs (tens of ms).  Every other client here runs on asyncio/uvloop transports, which set
# TCP_NODELAY; so does this one, and bench/peers runs mosquitto with set_tcp_nodelay true.
_NODELAY = ((6, 1, 1),)  # (IPPROTO_TCP, TCP_NODELAY, 1)


async def _sub_mqtt(args: argparse.Namespace, rec: Recorder, ready: Ready, stop: asyncio.Event) -> None:
    import aiomqtt

    host, port = _host_port(args.address)
    async with aiomqtt.Client(host, port, timeout=CONNECT_TIMEOUT_S, socket_options=_NODELAY) as client:
        await client.subscribe(args.topic, qos=0)  # returns on SUBACK
        record = rec.record

        async def consume() -> None:
            async for message in client.messages:
                now = time.time_ns()
                data = message.payload
                record(data, 0, len(data), now)

        ready("")
        await _until(stop, asyncio.ensure_future(consume()))


async def _pub_mqtt(args: argparse.Namespace) -> Any:
    import aiomqtt

    host, port = _host_port(args.address)
    client = aiomqtt.Client(host, port, timeout=60, socket_options=_NODELAY)
    await client.__aenter__()
    publish = client.publish
    topic = args.topic

    async def send(payload: bytes) -> None:
        await publish(topic, payload, qos=0)  # waits only while paho cannot write it out

    async def finish() -> None:
        try:  # QoS 1 after everything: the PUBACK says the broker has read it all (in order, one connection)
            await publish(f"{topic}/bench-sync", b"", qos=1)
        finally:
            await client.__aexit__(None, None, None)

    return send, finish


async def _sub_gateway_dcp(args: argparse.Namespace, rec: Recorder, ready: Ready, stop: asyncio.Event) -> None:
    """dcp mqtt's other side: a DataAgent consuming the topic, which the orchestrator routes
    to it from the gateway (ready once registered: the gateway's first message waits for
    that route).  The publisher is the MQTT one (aiomqtt) to the gateway."""
    from ..agent import DataAgent

    agent = DataAgent("bench-sub", broker=args.dcp_broker, orchestrator=args.dcp_orchestrator)
    record = rec.record

    @agent.consume(args.topic)
    async def take(msg: Any) -> None:
        now = time.time_ns()
        payload = msg.payload
        record(payload, 0, len(payload), now)

    await agent.start(timeout=CONNECT_TIMEOUT_S)
    try:
        ready("")
        await stop.wait()
    finally:
        await agent.stop()


# -- RabbitMQ (aio-pika, AMQP 0-9-1) ------------------------------------------------------------------------


async def _rabbitmq_watched(address: str) -> tuple[Any, asyncio.Future[None]]:
    """An aio-pika connection, and a future done once it closes (for a subscriber to end on)."""
    import aio_pika

    conn = await aio_pika.connect(f"amqp://guest:guest@{address}/", timeout=CONNECT_TIMEOUT_S)
    lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def on_close(*_: Any) -> None:
        if not lost.done():
            lost.set_result(None)

    conn.close_callbacks.add(on_close)
    return conn, lost


async def _sub_rabbitmq(args: argparse.Namespace, rec: Recorder, ready: Ready, stop: asyncio.Event) -> None:
    import aio_pika

    conn, lost = await _rabbitmq_watched(args.address)
    try:
        channel = await conn.channel()
        exchange = await channel.declare_exchange(EXCHANGE, aio_pika.ExchangeType.DIRECT)
        queue = await channel.declare_queue("", exclusive=True, auto_delete=True)
        await queue.bind(exchange, routing_key=args.topic)
        record = rec.record

        async def on_message(message: Any) -> None:
            now = time.time_ns()
            body = message.body
            record(body, 0, len(body), now)

        await queue.consume(on_message, no_ack=True)  # returns on consume-ok
        ready("")
        await _until(stop, lost)
    finally:
        await conn.close()


async def _pub_rabbitmq(args: argparse.Namespace) -> Any:
    import aio_pika

    conn = await aio_pika.connect(f"amqp://guest:guest@{args.address}/", timeout=CONNECT_TIMEOUT_S)
    channel = await conn.channel(publisher_confirms=False)
    exchange = await channel.declare_exchange(EXCHANGE, aio_pika.ExchangeType.DIRECT)
    publish = exchange.publish
    Message = aio_pika.Message
    transient = aio_pika.DeliveryMode.NOT_PERSISTENT
    topic = args.topic

    async def send(payload: bytes) -> None:
        await publish(Message(payload, delivery_mode=transient), routing_key=topic)

    async def finish() -> None:
        try:  # a synchronous method on the same channel is answered after every publish before it
            await channel.declare_exchange(EXCHANGE, aio_pika.ExchangeType.DIRECT)
        finally:
            await conn.close()

    return send, finish


# -- zenoh (eclipse-zenoh, client sessions of the router bench/peers starts) -------------------------


def _zenoh_client(address: str) -> Any:
    """The config of a client-mode session of the router at ``address``, and nothing else."""
    import zenoh

    host, port = _host_port(address)
    config = zenoh.Config()
    config.insert_json5("mode", json.dumps("client"))
    config.insert_json5("connect/endpoints", json.dumps([f"tcp/{host}:{port}"]))
    config.insert_json5("scouting/multicast/enabled", "false")
    return config


async def _sub_zenoh(args: argparse.Namespace, rec: Recorder, ready: Ready, stop: asyncio.Event) -> None:
    import zenoh

    loop = asyncio.get_running_loop()
    record = rec.record
    # zenoh calls the callback on a thread of its own (one Python thread per subscriber, fed by
    # the network threads), while the Recorder belongs to the event loop: its done Event is an
    # asyncio.Event, and _watch reads it between messages.  So the callback only takes the
    # time (at delivery, where it must be taken) and the bytes, queues both, and wakes the loop
    # with call_soon_threadsafe once per batch, not once per message: a wake-up is a write to
    # the loop's self-pipe, the queue a deque (append and popleft are atomic).  The flag is
    # cleared before the loop drains, so a message queued while it drains schedules a new
    # drain rather than being left behind.  The callback is zenoh-python's default, "indirect"
    # one; the direct one (on a network thread, Callback(indirect=False)) delivered a paced
    # message no sooner here and cut the flat-out rate at 1 KB from ~300 to ~56 MB/s.
    arrived: collections.deque[tuple[bytes, int]] = collections.deque()
    scheduled = False
    probe_seen = asyncio.Event()

    def drain() -> None:
        nonlocal scheduled
        scheduled = False
        popleft = arrived.popleft
        while arrived:
            data, now = popleft()
            record(data, 0, len(data), now)

    def on_sample(sample: Any) -> None:
        nonlocal scheduled
        now = time.time_ns()
        data = sample.payload.to_bytes()
        if len(data) < STAMP_SIZE:  # our own readiness probe (a stamped payload is longer)
            if data == _ZENOH_PROBE:
                loop.call_soon_threadsafe(probe_seen.set)
            return
        arrived.append((data, now))
        if not scheduled:
            scheduled = True
            loop.call_soon_threadsafe(drain)

    session = await asyncio.to_thread(zenoh.open, _zenoh_client(args.address))
    try:
        subscriber = session.declare_subscriber(args.topic, on_sample)
        # A declaration is not acknowledged: the router learns of the subscription some time
        # after declare_subscriber returns.  Ready is when a put from another session, through
        # the router, comes back to this subscriber.
        await _zenoh_probe(args.address, args.topic, probe_seen)
        ready("")
        await _until(stop)
        subscriber.undeclare()
    finally:
        await asyncio.to_thread(session.close)
    drain()  # what the callback queued before the subscriber was undeclared


_ZENOH_PROBE = b"dcp-probe"  # shorter than a stamp: never recorded


async def _zenoh_probe(address: str, key: str, seen: asyncio.Event) -> None:
    """Put the probe on ``key`` from a session of its own every 20 ms until ``seen`` is set."""
    import zenoh

    session = await asyncio.to_thread(zenoh.open, _zenoh_client(address))
    try:
        deadline = time.monotonic() + CONNECT_TIMEOUT_S
        while not seen.is_set():
            if time.monotonic() > deadline:
                raise TimeoutError(f"the zenoh router did not route a put to the new subscriber within {CONNECT_TIMEOUT_S:.0f} s")
            session.put(key, _ZENOH_PROBE)
            try:
                await asyncio.wait_for(seen.wait(), 0.02)
            except asyncio.TimeoutError:
                pass
    finally:
        await asyncio.to_thread(session.close)


async def _pub_zenoh(args: argparse.Namespace) -> Any:
    import zenoh

    session = await asyncio.to_thread(zenoh.open, _zenoh_client(args.address))
    routers = session.info.routers_zid()
    if not routers:
        session.close()
        raise ConnectionError(f"no zenoh router at {args.address}")
    # BLOCK: when a queue on the way (this session's, the router's towards the subscriber) is
    # full, put waits instead of dropping, so the throughput figure is lossless; RELIABLE (the
    # default, spelt out) so nothing is dropped by the transport either.
    priority = zenoh.Priority.DATA
    publisher = session.declare_publisher(
        args.topic, congestion_control=zenoh.CongestionControl.BLOCK, reliability=zenoh.Reliability.RELIABLE, priority=priority,
    )
    put = publisher.put  # synchronous: copies the payload into zenoh's queue, or blocks while it is full

    async def send(payload: bytes) -> None:
        put(payload)

    def sync() -> None:
        # zenoh offers no acknowledgement of a put and no flush (session.close() only drains the
        # queue into the socket).  What this relies on is how its transport works, not an API
        # promise: a client session has one link to the router; messages of one priority leave
        # it in order, on a reliable (TCP) link; the router reads them in that order and routes
        # each (queues it for the subscriber, with BLOCK waiting for room) before the next.  So
        # a query sent behind the data, at the same priority and with BLOCK, is answered only
        # once the router has read and routed every put before it.  The router's admin space
        # answers it (dcp.bench.zenoh_router turns it on, read-only).  That says the router has
        # it all, as NATS's PING/PONG does; not that the subscriber has.
        replies = session.get(
            f"@/{routers[0]}/router", timeout=60.0, priority=priority, congestion_control=zenoh.CongestionControl.BLOCK,
        )
        if not any(reply.ok is not None for reply in replies):
            raise ConnectionError("the zenoh router did not answer the query behind the data (is its admin space on?)")

    async def finish() -> None:
        try:
            await asyncio.to_thread(sync)
        finally:
            publisher.undeclare()
            await asyncio.to_thread(session.close)

    return send, finish


# -- NATS JetStream (nats-py; file storage, acked publishes) ---------------------------------------

# What the publishers of the persistent queues keep in flight: messages sent whose ack (JetStream)
# or confirm (RabbitMQ) has not come yet.  Bounded in bytes too: 4000 at 1 KB, 512 at 128 KB,
# 64 at 1 MiB.
_WINDOW_MSGS = 4000
_WINDOW_BYTES = 64 * 1024 * 1024


def _window(size: int, most: int = _WINDOW_MSGS, bytes_: int = _WINDOW_BYTES) -> int:
    return max(16, min(most, bytes_ // max(size, 1)))


async def _sub_jetstream(args: argparse.Namespace, rec: Recorder, ready: Ready, stop: asyncio.Event) -> None:
    from nats.js.api import AckPolicy, ConsumerConfig, StorageType, StreamConfig

    nc, lost = await _nats_watched(args.address)
    js = nc.jetstream(timeout=CONNECT_TIMEOUT_S)
    token = uuid.uuid4().hex[:12]
    stream = f"dcp-bench-{token}"
    subject = f"{args.topic}.{token}"  # the publisher's --route
    record = rec.record
    # The server delivers at most this many unacknowledged messages, so the client's queue holds
    # at most this many: its byte limit is off (0) and its count limit above this, because a
    # message the client dropped as a slow consumer would be acknowledged by the next AckAll
    # ack, i.e. lost without a redelivery.  1024 is 1 MiB at 1 KB and 1 GiB at 1 MiB (the
    # largest size the bench sends), only while the subscriber lags; 64 and 20,000 measured no
    # better here (within the noise of runs on one host).
    max_ack_pending = 1024
    try:
        await js.add_stream(StreamConfig(name=stream, subjects=[subject], storage=StorageType.FILE, num_replicas=1))
        try:
            since_ack = 0
            holder: list[Any] = []

            async def on_msg(msg: Any) -> None:
                nonlocal since_ack
                now = time.time_ns()
                data = msg.data
                record(data, 0, len(data), now)
                since_ack += 1
                # AckPolicy.ALL: one ack covers every message before it.  Ack when caught up (nothing
                # more in the client's queue) or every 256: few acks under load, prompt ones when paced.
                if since_ack >= 256 or not (holder and holder[0].pending_msgs):
                    since_ack = 0
                    await msg.ack()

            # A push consumer: the server sends as messages are stored, with nothing to request per
            # batch.  Measured against a pull consumer fetching 256 at a time: 15-30 % more MB/s at
            # 1 KB and 128 KB, and a lower paced latency (p50 380 against 470 us).
            config = ConsumerConfig(ack_policy=AckPolicy.ALL, max_ack_pending=max_ack_pending, ack_wait=60.0)
            holder.append(await js.subscribe(
                subject, stream=stream, cb=on_msg, manual_ack=True, config=config,
                pending_msgs_limit=2 * max_ack_pending, pending_bytes_limit=0,
            ))
            await nc.flush(timeout=CONNECT_TIMEOUT_S)  # the server has the subscription to the consumer's deliveries
            ready(subject)
            await _until(stop, lost)
        finally:
            if nc.is_connected:
                await js.delete_stream(stream)
    finally:
        if not nc.is_closed:
            await nc.close()


async def _pub_jetstream(args: argparse.Namespace) -> Any:
    nc = await _nats_connect(args.address)
    # publish_async: the message goes out at once, its ack is a future; at most this many unacked
    js = nc.jetstream(timeout=60.0, publish_async_max_pending=_window(args.size))
    publish_async = js.publish_async
    subject = args.route
    failed: list[BaseException] = []

    def acked(future: asyncio.Future[Any]) -> None:
        if future.cancelled():
            failed.append(asyncio.CancelledError())
        elif future.exception() is not None:
            failed.append(cast(BaseException, future.exception()))

    async def send(payload: bytes) -> None:
        (await publish_async(subject, payload)).add_done_callback(acked)

    async def finish() -> None:
        # Every ack in: each message is in the stream, written to its file store (nats-server
        # does not fsync before each ack; it syncs the store's files on its own schedule).
        try:
            await asyncio.wait_for(js.publish_async_completed(), 60)
            if failed:
                raise RuntimeError(f"{len(failed)} publishes were not acknowledged, the first: {failed[0]!r}")
        finally:
            await nc.close()

    return send, finish


# -- RabbitMQ quorum queue (aio-pika; persistent messages, publisher confirms) ----------------------


async def _sub_rabbitmq_quorum(args: argparse.Namespace, rec: Recorder, ready: Ready, stop: asyncio.Event) -> None:
    conn, lost = await _rabbitmq_watched(args.address)
    name = f"{args.topic}.quorum.{uuid.uuid4().hex[:12]}"  # the publisher's --route
    queue = None
    consumer = ""
    try:
        channel = await conn.channel()
        # basic.qos: at most this many unacknowledged deliveries.  128 keeps the consumer supplied
        # (the publisher's confirms bound the rate, some thousands a second here) and the client's
        # buffer at 128 MiB with 1 MiB messages; acknowledged a quarter at a time (multiple=True).
        prefetch = 128
        await channel.set_qos(prefetch_count=prefetch)
        # x-expires: a queue left behind by a killed run goes an hour after its last use.
        queue = await channel.declare_queue(
            name, durable=True, arguments={"x-queue-type": "quorum", "x-expires": 3_600_000},
        )
        record = rec.record
        ack_every = max(prefetch // 4, 1)
        since_ack = 0

        async def on_message(message: Any) -> None:
            nonlocal since_ack
            now = time.time_ns()
            body = message.body
            record(body, 0, len(body), now)
            since_ack += 1
            if since_ack >= ack_every:  # one basic.ack(multiple) for the batch, well before prefetch runs out
                since_ack = 0
                await message.ack(multiple=True)

        consumer = await queue.consume(on_message, no_ack=False)  # returns on consume-ok
        ready(name)
        await _until(stop, lost)
    finally:
        try:
            if queue is not None and not conn.is_closed:
                if consumer:
                    await queue.cancel(consumer)  # before the delete, which would cancel it from the broker's side
                await queue.delete(if_unused=False, if_empty=False)
        finally:
            await conn.close()


async def _pub_rabbitmq_quorum(args: argparse.Namespace) -> Any:
    import aio_pika

    conn = await aio_pika.connect(f"amqp://guest:guest@{args.address}/", timeout=CONNECT_TIMEOUT_S)
    # Confirms on; an unroutable message (no such queue) is an error, not a silent return.
    channel = await conn.channel(publisher_confirms=True, on_return_raises=True)
    publish = channel.default_exchange.publish
    Message = aio_pika.Message
    persistent = aio_pika.DeliveryMode.PERSISTENT
    queue = args.route
    loop = asyncio.get_running_loop()
    # aio-pika's publish returns once its confirm is in: many at once, each in a task, at most
    # this many unconfirmed.  The tasks start in order and take the channel's lock in order.
    # The client's CPU is the limit here (~125 us a message); a window past a few hundred only
    # adds tasks waiting on that lock (measured: 64 to 256 is best, 1000 costs 20 % more).
    window = asyncio.Semaphore(_window(args.size, 256))
    pending: set[asyncio.Task[Any]] = set()
    failed: list[BaseException] = []

    def confirmed(task: asyncio.Task[Any]) -> None:
        pending.discard(task)
        window.release()
        if task.cancelled():
            failed.append(asyncio.CancelledError())
        elif task.exception() is not None:
            failed.append(cast(BaseException, task.exception()))

    async def send(payload: bytes) -> None:
        await window.acquire()
        task = loop.create_task(publish(Message(payload, delivery_mode=persistent), routing_key=queue))
        pending.add(task)
        task.add_done_callback(confirmed)

    async def finish() -> None:
        try:
            # Every confirm in: a quorum queue confirms a message once its Raft log has it on disk
            # (fsync'd) on a majority of its members, here the one node.
            if pending:
                await asyncio.wait(pending, timeout=60)
            if pending:
                raise TimeoutError(f"{len(pending)} publishes unconfirmed after 60 s")
            if failed:
                raise RuntimeError(f"{len(failed)} publishes were not confirmed, the first: {failed[0]!r}")
        finally:
            await conn.close()

    return send, finish


# -- Redis Streams (redis.asyncio; XADD, XREADGROUP + XACK) ------------------------------------------

_STREAM_GROUP = "dcp-bench"
_STREAM_FIELD = b"d"


async def _sub_redis_streams(args: argparse.Namespace, rec: Recorder, ready: Ready, stop: asyncio.Event) -> None:
    import redis.asyncio as aioredis

    host, port = _host_port(args.address)
    client = aioredis.Redis(host=host, port=port, socket_connect_timeout=CONNECT_TIMEOUT_S)
    key = f"{args.topic}:stream:{uuid.uuid4().hex[:12]}"  # the publisher's --route
    try:
        # The group reads from "$": every entry added after this, and the stream exists from now.
        await client.xgroup_create(key, _STREAM_GROUP, id="$", mkstream=True)
        record = rec.record

        async def consume() -> None:
            last = None
            ids: list[bytes] = []
            while True:
                pipe = client.pipeline(transaction=False)
                if ids:  # acknowledge the last batch in the same round trip as the next read
                    pipe.xack(key, _STREAM_GROUP, *ids)
                    # Redis holds a stream in memory: trim what is acknowledged, so the stream
                    # holds only the backlog (whole nodes only, "~": cheap).  Nothing unread goes.
                    pipe.xtrim(key, minid=last, approximate=True)
                pipe.xreadgroup(_STREAM_GROUP, "bench-sub", {key: ">"}, count=1000, block=1000)
                replies = await pipe.execute()
                now = time.time_ns()
                ids = []
                for _key, entries in replies[-1] or ():
                    for entry_id, fields in entries:
                        data = fields[_STREAM_FIELD]
                        record(data, 0, len(data), now)
                        ids.append(entry_id)
                if ids:
                    last = ids[-1]

        ready(key)
        await _until(stop, asyncio.ensure_future(consume()))
    finally:
        try:
            await client.delete(key)  # the stream, its group and what is left in it
        finally:
            await client.aclose() if hasattr(client, "aclose") else await client.close()


async def _pub_redis_streams(args: argparse.Namespace) -> Any:
    """XADD per message, NOMKSTREAM: a stream the subscriber has not made is an error.  An
    answered XADD is in the stream and in the AOF's buffer, which appendfsync everysec
    writes out and fsyncs once a second (not before the reply)."""
    key = args.route

    def check(ids: list[Any]) -> None:
        if any(entry_id is None for entry_id in ids):  # NOMKSTREAM: the subscriber's stream is gone
            raise RuntimeError(f"the stream {key} does not exist")

    return await _redis_publisher(args, lambda target, payload: target.xadd(key, {_STREAM_FIELD: payload}, nomkstream=True), check)


SUBSCRIBERS = {
    "dcp": _sub_dcp, "relay": _sub_relay, "nats": _sub_nats, "redis": _sub_redis, "mqtt": _sub_mqtt, "rabbitmq": _sub_rabbitmq,
    "zenoh": _sub_zenoh, "nats-jetstream": _sub_jetstream, "rabbitmq-quorum": _sub_rabbitmq_quorum, "redis-streams": _sub_redis_streams,
    "mqtt-gateway-dcp": _sub_gateway_dcp,
}
PUBLISHERS = {
    "dcp": _pub_dcp, "relay": _pub_relay, "nats": _pub_nats, "redis": _pub_redis, "mqtt": _pub_mqtt, "rabbitmq": _pub_rabbitmq,
    "zenoh": _pub_zenoh, "nats-jetstream": _pub_jetstream, "rabbitmq-quorum": _pub_rabbitmq_quorum, "redis-streams": _pub_redis_streams,
    "mqtt-gateway-dcp": _pub_mqtt,
}


# -- the two roles ---------------------------------------------------------------------------------------


async def run_sub(args: argparse.Namespace) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    rec = Recorder(args.expect, args.keep_latencies, args.latency_every)
    is_ready = asyncio.Event()

    def ready(route: str) -> None:
        _emit({"ready": True, "route": route})
        is_ready.set()

    adapter = asyncio.ensure_future(SUBSCRIBERS[FAMILIES[args.target]](args, rec, ready, stop))
    ready_wait = asyncio.ensure_future(is_ready.wait())
    stop_wait = asyncio.ensure_future(stop.wait())
    await asyncio.wait({adapter, ready_wait, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
    ready_wait.cancel()
    stop_wait.cancel()
    if not is_ready.is_set():  # the adapter failed, or a signal came, before it was ready: no line at all
        if adapter.done():
            exc = adapter.exception() if not adapter.cancelled() else None
            why = f"{type(exc).__name__}: {exc}" if exc else "it ended"
        else:
            adapter.cancel()
            why = "stopped by a signal"
        print(f"{args.target} subscriber could not get ready: {why}", file=sys.stderr, flush=True)
        return 1
    error = await _watch(args, rec, stop, adapter)
    stop.set()
    try:
        await asyncio.wait_for(adapter, 10)
    except asyncio.TimeoutError:
        pass
    except Exception as exc:
        error = error or f"{type(exc).__name__}: {exc}"
    result = rec.result()
    if error:
        result["error"] = error
        print(f"{args.target} subscriber: {error}", file=sys.stderr, flush=True)
    _emit(result)
    return 0


async def _watch(args: argparse.Namespace, rec: Recorder, stop: asyncio.Event, adapter: asyncio.Future[None]) -> str:
    """Until N messages, idle after the first, --max-time, a signal, or the adapter's end ('' or its error)."""
    started = time.monotonic()
    idle_ns = int(args.idle_timeout * 1e9)
    tick = min(0.05, args.idle_timeout / 4)
    waiters: set[asyncio.Future[Any]] = {asyncio.ensure_future(stop.wait()), asyncio.ensure_future(rec.done.wait()), adapter}
    try:
        while True:
            done, _ = await asyncio.wait(waiters, timeout=tick, return_when=asyncio.FIRST_COMPLETED)
            if adapter in done:
                exc = adapter.exception() if not adapter.cancelled() else None
                return f"the connection ended: {type(exc).__name__}: {exc}" if exc else ("" if stop.is_set() else "the connection ended")
            if done:
                return ""
            if rec.last_ns is not None and time.time_ns() - rec.last_ns >= idle_ns:
                return ""
            if time.monotonic() - started >= args.max_time:
                return ""
    finally:
        for waiter in waiters:
            if waiter is not adapter:
                waiter.cancel()


async def run_pub(args: argparse.Namespace) -> int:
    try:
        send, finish = await PUBLISHERS[FAMILIES[args.target]](args)
    except Exception as exc:
        print(f"{args.target} publisher could not connect: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        return 1
    size, count = args.size, args.count
    interval = args.interval_ms / 1000 if args.interval_ms else 0.0
    duration = args.duration
    clock = time.perf_counter
    sent = 0
    start = clock()
    stop_at = start + duration if duration else float("inf")
    try:
        if interval:
            for seq in range(count):
                delay = start + seq * interval - clock()
                if delay > 0:
                    await asyncio.sleep(delay)
                if clock() >= stop_at:
                    break
                await send(stamp(seq, size))
                sent += 1
        else:
            for seq in range(count):
                if clock() >= stop_at:
                    break
                await send(stamp(seq, size))
                sent += 1
        await finish()
    except Exception as exc:
        print(f"{args.target} publisher failed after {sent} messages: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        return 1
    elapsed = clock() - start
    _emit({"sent": sent, "bytes": sent * size, "elapsed_s": round(elapsed, 6), "cpu_s": round(time.process_time(), 4)})
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dcp.bench.worker", description="A dcp bench publisher or subscriber.")
    roles = parser.add_subparsers(dest="role", required=True)
    for role in ("sub", "pub"):
        p = roles.add_parser(role)
        p.add_argument("--target", required=True, choices=tuple(FAMILIES))
        p.add_argument("--address", required=True, help="HOST:PORT of the server")
        p.add_argument("--topic", default="bench")
        p.add_argument("--secret-file", default=None, help="dcp-verified: the secret the broker verifies route tags with")
        p.add_argument("--dcp-broker", default=None, help="mqtt-gateway-dcp: the broker the dcp subscriber attaches to")
        p.add_argument("--dcp-orchestrator", default=None, help="mqtt-gateway-dcp: the orchestrator it registers with")
    sub = roles.choices["sub"]
    sub.add_argument("--expect", type=int, default=None, help="stop after this many messages")
    sub.add_argument("--idle-timeout", type=float, default=2.0, help="stop after this long without a message, once one came (s)")
    sub.add_argument("--max-time", type=float, default=600.0, help="stop this long after ready, whatever came (s; default 600)")
    sub.add_argument(
        "--slow-consumer", choices=("drop-newest", "drop-oldest", "pause"), default=None,
        help="dcp targets and the relay: the server's policy for this subscriber when it falls behind (default: the server's)",
    )
    sub.add_argument(
        "--receive", choices=("callback", "batches", "iterator"), default="callback",
        help="dcp targets: how the subscriber takes its frames: on_message=, batches() or messages() (default: callback)",
    )
    sub.add_argument("--keep-latencies", action="store_true", help="add every latency, in arrival order, to the result")
    sub.add_argument(
        "--latency-every", type=int, default=1,
        help="take the latency of one message in this many (by sequence number), to bound memory on long runs (default 1: all)",
    )
    pub = roles.choices["pub"]
    pub.add_argument("--size", type=int, required=True, help=f"payload bytes (at least {STAMP_SIZE})")
    pub.add_argument("--count", type=int, required=True, help="messages to send")
    pub.add_argument("--interval-ms", type=float, default=None, help="send one message every this many ms (default: as fast as flow control allows)")
    pub.add_argument("--duration", type=float, default=None, help="stop sending after this many seconds")
    pub.add_argument("--route", default=None, help="dcp-stateless, dcp-verified: the topology number X (decimal) from the subscriber's ready line")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Subscriber result keys: received, bytes, duplicates, out_of_order, max_seq, first_recv_ns,
    last_recv_ns, latency_us {p50, p90, p99, max, mean}, latencies_us (with --keep-latencies), and
    error (only when the connection ended under it).  Publisher: sent, bytes, elapsed_s, cpu_s."""
    from .._loop import run

    args = build_parser().parse_args(argv)
    if args.role == "pub" and args.size < STAMP_SIZE:
        print(f"--size must be at least {STAMP_SIZE}", file=sys.stderr)
        return 2
    if args.role == "pub" and args.target in ROUTE_OF and not args.route:
        print(f"{args.target} needs --route {ROUTE_OF[args.target]} (the subscriber's ready line has it)", file=sys.stderr)
        return 2
    return run(run_sub(args) if args.role == "sub" else run_pub(args))


if __name__ == "__main__":
    sys.exit(main())
