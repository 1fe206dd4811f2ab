"""``dcp mqtt``: the MQTT gateway with real third-party clients (paho-mqtt, mosquitto_pub,
mosquitto_sub), a real orchestrator and broker in this process on OS-chosen loopback
ports, and dcp data agents beside them; and its connection fed hostile bytes through a
fake transport.  Nothing waits a fixed time: tests wait on SUBACKs, routes, messages
and counters, with timeouts.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
import shutil
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
import uvloop
from hypothesis import given
from hypothesis import strategies as st
from paho.mqtt.enums import CallbackAPIVersion

import dcp
from dcp.auth import issue_token, load_secret
from dcp.bench.scenarios import run_pair
from dcp.bench.targets import GATEWAYS, start_server
from dcp.config import OrchestratorConfig
from dcp.mqtt_codec import V5, V311, ConnAck, Connect, Decoder, Disconnect, MqttError, Reason, Will, encode
from dcp.mqtt_gateway import Gateway, MqttConfig, MqttConnection
from dcp.orchestrator import Orchestrator

from . import mqtt_streams
from .conftest import url_of
from .fuzzing import executed, fuzz_settings, split
from .waiting import until

TIMEOUT_S = 10.0
needs_mosquitto = pytest.mark.skipif(
    shutil.which("mosquitto_pub") is None, reason="mosquitto_pub/mosquitto_sub missing (apt-get install mosquitto-clients; .ci/run does)",
)


# --------------------------------------------------------------------------- the plane and the gateway


@dataclass
class Plane:
    do_url: str
    broker_url: str


@pytest.fixture
async def plane(make_broker) -> AsyncIterator[Plane]:  # type: ignore[no-untyped-def]
    do = Orchestrator(OrchestratorConfig(listen="127.0.0.1:0", db=":memory:", insecure=True))
    await do.start()
    host, port = do.address
    broker = await make_broker(orchestrator=f"{host}:{port}")
    await until(lambda: broker.key in {b.key for b in do.brokers.values()}, "the broker registered")
    yield Plane(f"dcp://{host}:{port}", url_of(broker))
    await do.close()


@pytest.fixture
async def make_gateway(plane: Plane) -> AsyncIterator[Callable[..., Any]]:
    """``await make_gateway(**settings)``: a started gateway on a free port, closed at teardown."""
    made: list[Gateway] = []

    async def make(**settings: Any) -> Gateway:
        gateway = Gateway(MqttConfig(**{"listen": "127.0.0.1:0", "broker": (plane.broker_url,), "orchestrator": plane.do_url, **settings}))
        await gateway.start()
        made.append(gateway)
        return gateway

    yield make
    for gateway in made:
        await gateway.close()


@pytest.fixture
async def gateway(make_gateway) -> Gateway:  # type: ignore[no-untyped-def]
    return await make_gateway()


@pytest.fixture
async def agents(plane: Plane) -> AsyncIterator[Callable[[str], dcp.DataAgent]]:
    """``agents(name)``: a DataAgent on the plane, not started; stopped at teardown."""
    made: list[dcp.DataAgent] = []

    def make(name: str) -> dcp.DataAgent:
        agent = dcp.DataAgent(name, broker=plane.broker_url, orchestrator=plane.do_url)
        made.append(agent)
        return agent

    yield make
    for agent in made:
        await agent.stop()


# --------------------------------------------------------------------------- third-party clients


class Paho:
    """A paho-mqtt client; its callbacks, on paho's network thread, resolve futures in this loop."""

    def __init__(self, address: tuple[str, int], client_id: str = "", version: int = V5, keepalive: int = 60) -> None:
        self.address, self.keepalive = address, keepalive
        self.loop = asyncio.get_running_loop()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5 if version == V5 else paho.MQTTv311)
        self.messages: asyncio.Queue[paho.MQTTMessage] = asyncio.Queue()
        self.connected: asyncio.Future[int] = self.loop.create_future()
        self.disconnected: asyncio.Future[int] = self.loop.create_future()
        self._acks: dict[int, asyncio.Future[Any]] = {}
        c = self.client
        c.on_connect = lambda _c, _u, _f, reason, _p: self._soon(self._set, self.connected, reason.value)
        c.on_disconnect = lambda _c, _u, _f, reason, _p: self._soon(self._set, self.disconnected, reason.value)
        c.on_message = lambda _c, _u, message: self._soon(self.messages.put_nowait, message)
        c.on_subscribe = lambda _c, _u, mid, reasons, _p: self._soon(self._ack, mid, [r.value for r in reasons])
        c.on_unsubscribe = lambda _c, _u, mid, reasons, _p: self._soon(self._ack, mid, [r.value for r in reasons])
        c.on_publish = lambda _c, _u, mid, reason, _p: self._soon(self._ack, mid, reason.value)

    def _soon(self, fn: Callable[..., Any], *args: Any) -> None:
        if not self.loop.is_closed():
            self.loop.call_soon_threadsafe(fn, *args)

    @staticmethod
    def _set(future: asyncio.Future[int], value: int) -> None:
        if not future.done():
            future.set_result(value)

    def _future(self, mid: int) -> asyncio.Future[Any]:
        return self._acks.setdefault(mid, self.loop.create_future())

    def _ack(self, mid: int, value: Any) -> None:
        self._set(self._future(mid), value)

    async def start(self, **connect: Any) -> int:
        """Connect (``connect``: paho's connect() arguments); the CONNACK's reason code."""
        self.client.connect(*self.address, keepalive=self.keepalive, **connect)
        self.client.loop_start()
        return await asyncio.wait_for(self.connected, TIMEOUT_S)

    async def subscribe(self, *filters: tuple[str, int]) -> list[int]:
        """The SUBACK's reason codes."""
        _, mid = self.client.subscribe(list(filters))
        return await asyncio.wait_for(self._future(mid), TIMEOUT_S)  # type: ignore[no-any-return]

    async def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> int:
        """Once sent (QoS 0) or acknowledged (QoS 1): the PUBACK's reason code (0 at QoS 0)."""
        info = self.client.publish(topic, payload, qos, retain)
        return await asyncio.wait_for(self._future(info.mid), TIMEOUT_S)  # type: ignore[no-any-return]

    async def next(self) -> paho.MQTTMessage:
        return await asyncio.wait_for(self.messages.get(), TIMEOUT_S)

    async def stop(self) -> None:
        self.client.disconnect()
        await asyncio.to_thread(self.client.loop_stop)


@pytest.fixture
async def clients() -> AsyncIterator[Callable[..., Paho]]:
    made: list[Paho] = []

    def make(*args: Any, **kwargs: Any) -> Paho:
        client = Paho(*args, **kwargs)
        made.append(client)
        return client

    yield make
    for client in made:
        await client.stop()


async def mosquitto(tool: str, gateway: Gateway, *args: str) -> asyncio.subprocess.Process:
    host, port = gateway.address
    return await asyncio.create_subprocess_exec(
        tool, "-h", host, "-p", str(port), *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )


async def finished(process: asyncio.subprocess.Process) -> tuple[int, str]:
    out, err = await asyncio.wait_for(process.communicate(), TIMEOUT_S)
    assert process.returncode is not None
    return process.returncode, (out + err).decode()


class RawClient:
    """An MQTT client made of a socket and dcp's codec: for what real clients will not do
    (stay silent past their keep-alive, vanish without a DISCONNECT)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, version: int) -> None:
        self.reader, self.writer = reader, writer
        self.decoder = Decoder(version=version)
        self.version = version

    @classmethod
    async def connect(cls, gateway: Gateway, packet: Connect, receive_buffer: int = 0) -> tuple[RawClient, ConnAck]:
        """Connected and CONNACKed; ``receive_buffer``: its socket's SO_RCVBUF (0: the system's)."""
        sock = socket.socket()
        if receive_buffer:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, gateway.address)
        reader, writer = await asyncio.open_connection(sock=sock)
        client = cls(reader, writer, packet.version)
        writer.write(encode(packet))
        connack = await client.next()
        assert isinstance(connack, ConnAck)
        return client, connack

    async def next(self) -> Any:
        """The next packet, or None at the end of the stream."""
        while True:
            data = await asyncio.wait_for(self.reader.read(65536), TIMEOUT_S)
            packets = self.decoder.feed(data)
            if packets or not data:
                return packets[0] if packets else None

    def send(self, packet: Any) -> None:
        self.writer.write(encode(packet, self.version))


# --------------------------------------------------------------------------- pipelines


@needs_mosquitto
async def test_a_sensor_through_a_dcp_stage_to_an_mqtt_subscriber(gateway: Gateway, agents, clients) -> None:  # type: ignore[no-untyped-def]
    """mosquitto_pub is the sensor (MQTT 3.1.1, QoS 1); a DataAgent stage turns Celsius
    into Fahrenheit; a paho (5.0) subscriber gets the result, through the one gateway."""
    stage = agents("to-fahrenheit")

    @stage.process("sensors.*.celsius", emits="sensors.fahrenheit")
    async def convert(msg):  # type: ignore[no-untyped-def]
        return f"{msg.topic.split('.')[1]}={float(msg.payload) * 9 / 5 + 32:.1f}".encode()

    await stage.start()
    display = clients(gateway.address, "display")
    assert await display.start() == 0
    assert await display.subscribe(("sensors/fahrenheit", 1)) == [1]
    await stage.wait_route("sensors.fahrenheit")  # the orchestrator routes the stage's output to the gateway

    code, output = await finished(await mosquitto("mosquitto_pub", gateway, "-i", "sensor-1", "-q", "1", "-t", "sensors/s1/celsius", "-m", "21.5"))
    assert code == 0, output
    message = await display.next()
    assert (message.topic, message.payload) == ("sensors/fahrenheit", b"s1=70.7")
    # the first PUBLISH on the new topic waited for its route instead of going nowhere
    assert gateway.counters["route_waits"] == 1 and gateway.counters["unrouted"] == 0 and gateway.counters["forwarded"] == 1


async def test_dcp_producers_reach_mqtt_wildcard_subscribers_and_mqtt_publishers_reach_dcp_patterns(gateway: Gateway, agents, clients) -> None:  # type: ignore[no-untyped-def]
    watcher = clients(gateway.address, "watcher")
    await watcher.start()
    assert await watcher.subscribe(("a/+/c", 0), ("x/#", 1)) == [0, 1]
    assert sorted(gateway.patterns) == ["a.*.c", "x", "x.>"]
    producer = agents("producer")
    consumer = agents("consumer")
    got: asyncio.Queue[dcp.Message] = asyncio.Queue()

    @consumer.consume("m.>")
    async def take(msg):  # type: ignore[no-untyped-def]
        got.put_nowait(msg)

    await producer.start()
    await consumer.start()
    topics = ("a.b.c", "a.b.d", "x", "x.y.z", "a.b.c.d", "xx", "x.end")
    for topic in topics:
        await producer.declare_produces(topic)
    for topic in ("a.b.c", "x", "x.y.z", "x.end"):
        await producer.wait_route(topic)
    for topic in topics:
        await producer.publish(topic, topic.encode())
    received = []
    while not received or received[-1] != "x/end":
        message = await watcher.next()
        received.append(message.topic)
        assert message.payload == message.topic.replace("/", ".").encode()
    assert received == ["a/b/c", "x", "x/y/z", "x/end"]

    sensor = clients(gateway.address, "sensor", version=V311)
    await sensor.start()
    await sensor.publish("m/1", b"one", qos=1)  # a dcp pattern, m.>, reaches it
    assert (await asyncio.wait_for(got.get(), TIMEOUT_S)).payload == b"one"
    assert await sensor.publish("m", b"parent", qos=1) == 0  # m.> is not m: nobody in dcp, and MQTT 3.1.1 acks anyway
    assert gateway.counters["unrouted"] == 1


async def test_mqtt_clients_of_one_gateway_reach_each_other_with_mqtts_wildcards(gateway: Gateway, clients) -> None:  # type: ignore[no-untyped-def]
    sub = clients(gateway.address, "sub")
    await sub.start()
    assert await sub.subscribe(("home/#", 2), ("+/kitchen/+", 0)) == [1, 0]  # QoS 2 is granted as 1
    pub = clients(gateway.address, "pub", version=V311)
    await pub.start()
    for topic in ("home", "home/kitchen/light", "office/kitchen/light", "office/desk"):
        await pub.publish(topic, topic.encode(), qos=1)
    await pub.publish("home/end", b"", qos=1)
    received = [(m.topic, m.qos) for m in [await sub.next() for _ in range(4)]]
    # home/# matches its parent level; one copy per client, at the highest QoS of its matching subscriptions
    assert received == [("home", 1), ("home/kitchen/light", 1), ("office/kitchen/light", 0), ("home/end", 1)]


async def test_qos1_is_acknowledged_once_handed_to_the_broker(gateway: Gateway, agents, clients) -> None:  # type: ignore[no-untyped-def]
    consumer = agents("meter-reader")
    got: asyncio.Queue[dcp.Message] = asyncio.Queue()

    @consumer.consume("meters.>")
    async def take(msg):  # type: ignore[no-untyped-def]
        got.put_nowait(msg)

    await consumer.start()
    meter = clients(gateway.address, "meter-7")
    await meter.start()
    for n in range(5):
        assert await meter.publish("meters/7", b"%d" % n, qos=1) == 0
    assert gateway.counters["forwarded"] == 5  # each PUBACK came after its frame was written to the broker
    assert [bytes((await asyncio.wait_for(got.get(), TIMEOUT_S)).payload) for _ in range(5)] == [b"0", b"1", b"2", b"3", b"4"]
    # nobody consumes this one, in dcp or here: MQTT 5.0 says so in the PUBACK
    assert await meter.publish("gauges/nobody/reads/this", b"1", qos=1) == Reason.NO_MATCHING_SUBSCRIBERS
    # QoS 2: PUBREC once handed to the broker, then PUBREL and PUBCOMP; forwarded once
    assert await meter.publish("meters/8", b"exactly once", qos=2) == 0
    assert bytes((await asyncio.wait_for(got.get(), TIMEOUT_S)).payload) == b"exactly once"
    assert gateway.counters["forwarded"] == 6 and not got.qsize()


# --------------------------------------------------------------------------- sessions: keep-alive, wills, retained


async def test_keep_alive_timeout_closes_the_connection_and_publishes_the_will(gateway: Gateway, clients) -> None:  # type: ignore[no-untyped-def]
    monitor = clients(gateway.address, "monitor")
    await monitor.start()
    assert await monitor.subscribe(("status/#", 1)) == [1]
    silent, connack = await RawClient.connect(gateway, Connect("silent", V5, keep_alive=1, will=Will("status/silent", b"gone", 1)))
    assert connack.reason == 0
    started = time.monotonic()
    assert await silent.next() == Disconnect(Reason.KEEP_ALIVE_TIMEOUT)  # 1.5 x 1 s without a packet
    assert await silent.next() is None
    assert time.monotonic() - started >= 1.4
    message = await monitor.next()
    assert (message.topic, message.payload) == ("status/silent", b"gone")
    assert gateway.counters["keep_alive_timeouts"] == 1

    chatty, _ = await RawClient.connect(gateway, Connect("chatty", V311, keep_alive=1))
    for _ in range(2):  # pings keep it open past 1.5 s
        chatty.send(dcp.mqtt_codec.PingReq())
        assert await chatty.next() == dcp.mqtt_codec.PingResp()
        await asyncio.sleep(0.8)  # the client's own pace between pings, not a wait for the gateway
    assert gateway.counters["keep_alive_timeouts"] == 1


@needs_mosquitto
async def test_the_will_of_a_dropped_client_is_published_and_a_clean_disconnect_has_none(gateway: Gateway) -> None:
    sub = await mosquitto("mosquitto_sub", gateway, "-V", "mqttv311", "-t", "status/+", "-v", "-C", "2")
    await until(lambda: "status/+" in gateway.filters, "mosquitto_sub subscribed")
    polite, _ = await RawClient.connect(gateway, Connect("polite", V311, will=Will("status/polite", b"polite is gone")))
    polite.send(Disconnect())
    assert await polite.next() is None
    dropped, _ = await RawClient.connect(gateway, Connect("dropped", V5, will=Will("status/dropped", b"dropped is gone", retain=True)))
    dropped.writer.transport.abort()  # no DISCONNECT: the network went
    await until(lambda: gateway.counters["wills"] == 1, "the will published")
    code, _ = await finished(await mosquitto("mosquitto_pub", gateway, "-t", "status/end", "-m", "end"))
    assert code == 0
    code, output = await finished(sub)
    assert code == 0 and output.splitlines() == ["status/dropped dropped is gone", "status/end end"]


@needs_mosquitto
async def test_a_retained_message_reaches_a_late_subscriber_until_it_is_cleared(gateway: Gateway, clients) -> None:  # type: ignore[no-untyped-def]
    code, _ = await finished(await mosquitto("mosquitto_pub", gateway, "-q", "1", "-r", "-t", "doors/front", "-m", "open"))
    assert code == 0
    code, output = await finished(await mosquitto("mosquitto_sub", gateway, "-t", "doors/#", "-v", "-C", "1", "-W", "5"))
    assert (code, output) == (0, "doors/front open\n")
    late = clients(gateway.address, "late")
    await late.start()
    await late.subscribe(("doors/+", 1))
    message = await late.next()
    assert (message.topic, message.payload, message.retain) == ("doors/front", b"open", True)
    code, _ = await finished(await mosquitto("mosquitto_pub", gateway, "-q", "1", "-r", "-t", "doors/front", "-n"))
    assert code == 0 and gateway.retained == {}
    assert (await late.next()).payload == b""  # the clearing message itself goes to the subscriber
    later = clients(gateway.address, "later")
    await later.start()
    await later.subscribe(("doors/+", 1))
    await later.publish("doors/back", b"shut", qos=1)  # ... and nothing retained comes before it
    assert (await later.next()).topic == "doors/back"


# --------------------------------------------------------------------------- refusals


async def test_mqtt5_reason_codes_on_refusals(gateway: Gateway, clients) -> None:  # type: ignore[no-untyped-def]
    client = clients(gateway.address, "picky")
    await client.start()
    assert await client.subscribe(("a.b/c", 1), ("$share/g/t", 1), ("a//b", 0), ("ok/+", 2)) == [
        Reason.TOPIC_FILTER_INVALID, Reason.SHARED_SUBSCRIPTIONS_NOT_SUPPORTED, Reason.TOPIC_FILTER_INVALID, 1,
    ]
    assert await client.publish("a.b/c", b"1", qos=1) == Reason.TOPIC_NAME_INVALID  # '.' is dcp's separator
    assert await client.publish("a//b", b"1", qos=1) == Reason.TOPIC_NAME_INVALID  # dcp has no empty token
    assert await client.publish("ok/still", b"open", qos=1) in (0, Reason.NO_MATCHING_SUBSCRIBERS)  # the connection stays
    assert (await client.next()).topic == "ok/still"
    await client.publish("bad.topic", b"1", qos=0)  # QoS 0 has no acknowledgement: the DISCONNECT says why
    assert await asyncio.wait_for(client.disconnected, TIMEOUT_S) == Reason.TOPIC_NAME_INVALID
    assert gateway.refused_publishes["topic_name_invalid"] == 3

    _, connack = await RawClient.connect(gateway, Connect("auth", V5, properties=((0x15, "SCRAM-SHA-1"),)))
    assert connack == ConnAck(False, Reason.BAD_AUTHENTICATION_METHOD)  # enhanced authentication
    old_level = encode(Connect("old", V311)).replace(b"MQTT\x04", b"MQTT\x03")
    reader, writer = await asyncio.open_connection(*gateway.address)
    writer.write(old_level)
    assert Decoder(version=V311).feed(await asyncio.wait_for(reader.read(100), TIMEOUT_S)) == [ConnAck(False, 1)]  # unacceptable protocol version
    writer.close()


async def test_a_publish_the_policy_refuses_gets_not_authorized(make_broker, tmp_path: Path, clients) -> None:  # type: ignore[no-untyped-def]
    policy = tmp_path / "policy.toml"
    policy.write_text('[[rule]]\nagent = "mqtt-gateway"\naction = "deny"\npublish = ["secret.>"]\n')
    do = Orchestrator(OrchestratorConfig(listen="127.0.0.1:0", db=":memory:", insecure=True, policy_file=str(policy)))
    await do.start()
    host, port = do.address
    broker = await make_broker(orchestrator=f"{host}:{port}")
    gateway = Gateway(MqttConfig(listen="127.0.0.1:0", broker=(url_of(broker),), orchestrator=f"dcp://{host}:{port}"))
    await gateway.start()
    try:
        client = clients(gateway.address, "spy")
        await client.start()
        assert await client.publish("secret/plans", b"1", qos=1) == Reason.NOT_AUTHORIZED
        assert await client.publish("open/news", b"1", qos=1) in (0, Reason.NO_MATCHING_SUBSCRIBERS)  # the connection stays
        assert gateway.refused_publishes["not_authorized"] == 1
    finally:
        await gateway.close()
        await do.close()


async def test_a_malformed_packet_closes_that_connection_with_its_reason_and_nothing_else(gateway: Gateway, clients) -> None:  # type: ignore[no-untyped-def]
    bystander = clients(gateway.address, "bystander")
    await bystander.start()
    await bystander.subscribe(("news", 0))
    bad, _ = await RawClient.connect(gateway, Connect("bad", V5))
    bad.writer.write(b"\x36\x03\x00\x01t")  # PUBLISH at QoS 3
    assert await bad.next() == Disconnect(Reason.MALFORMED_PACKET)
    assert await bad.next() is None
    second, _ = await RawClient.connect(gateway, Connect("second", V5))
    second.send(Connect("again", V5))  # a second CONNECT is a protocol error
    assert await second.next() == Disconnect(Reason.PROTOCOL_ERROR)
    await bystander.publish("news", b"still here", qos=1)
    assert (await bystander.next()).payload == b"still here"
    assert gateway.counters["protocol_errors"] == 2


async def test_a_slow_subscriber_drops_its_oldest_messages_counted_and_slows_no_one(make_gateway, agents, clients) -> None:  # type: ignore[no-untyped-def]
    gateway = await make_gateway(client_queue=10, client_buffer_bytes=16 * 1024)
    stalled, _ = await RawClient.connect(gateway, Connect("stalled", V311), receive_buffer=4096)
    stalled.writer.transport.pause_reading()  # it reads nothing more: the sockets fill, then its queue
    stalled.send(dcp.mqtt_codec.Subscribe(1, (dcp.mqtt_codec.Subscription("feed", 0),)))
    fast = clients(gateway.address, "fast")
    await fast.start()
    await fast.subscribe(("feed", 0))
    await until(lambda: len(gateway.filters.get("feed", ())) == 2, "both subscribed")
    producer = agents("feeder")
    await producer.declare_produces("feed")
    await producer.start()
    await producer.wait_route("feed")
    count, payload = 3000, b"x" * 2048  # 6 MB: more than the kernel's socket buffers (4 MB on loopback here) hold
    for start in range(0, count, 100):  # in rounds the fast one takes in full; the stalled one takes nothing
        for n in range(start, start + 100):
            assert await producer.publish("feed", b"%06d" % n + payload)
        for n in range(start, start + 100):
            assert (await fast.next()).payload[:6] == b"%06d" % n
    (conn,) = [c for c in gateway.connections if c.client_id == "stalled"]
    assert gateway.dropped["queue_full"] == conn.dropped > 0 and len(conn.outbox) == 10


async def test_credentials_are_dcp_tokens_the_orchestrator_checks(make_broker, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    secret_file = tmp_path / "dcp.secret"
    secret_file.write_text("a" * 64 + "\n")
    secret_file.chmod(0o600)
    secret = load_secret(secret_file)
    do = Orchestrator(OrchestratorConfig(listen="127.0.0.1:0", db=":memory:", secret_file=str(secret_file)))
    await do.start()
    broker = await make_broker(secret_file=str(secret_file), insecure=False, orchestrator="%s:%d" % do.address)

    def token(name: str) -> str:
        return issue_token(secret, name, "agent", int(time.time()) + 60)

    gateway = Gateway(MqttConfig(listen="127.0.0.1:0", broker=(url_of(broker),), orchestrator="dcp://%s:%d" % do.address, token=token("mqtt-gateway")))
    await gateway.start()
    try:
        good = Paho(gateway.address, "sensor-1")
        good.client.username_pw_set("sensor-1", token("sensor-1"))
        assert await good.start() == 0
        await good.stop()
        for user, password, version in [("sensor-1", token("someone-else"), V5), ("sensor-1", "not a token", V5), (None, None, V5)]:
            refused = Paho(gateway.address, "sensor-1", version=version)
            if user is not None:
                refused.client.username_pw_set(user, password)
            assert await refused.start() == Reason.BAD_USER_NAME_OR_PASSWORD
            await refused.stop()
        _, connack = await RawClient.connect(gateway, Connect("sensor-1", V311, username="sensor-1", password=b"not a token"))
        assert connack == ConnAck(False, 4)  # 3.1.1's return code: bad user name or password
    finally:
        await gateway.close()
        await do.close()


# --------------------------------------------------------------------------- the command


@needs_mosquitto
async def test_dcp_mqtt_serves_until_sigterm_with_its_metrics(plane: Plane) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "dcp", "mqtt", "--listen", "127.0.0.1:0", "--broker", f"dcp://127.0.0.1:1,{plane.broker_url}",
        "--orchestrator", plane.do_url, "--metrics-listen", "127.0.0.1:0", "--name", "gw-cli", stderr=asyncio.subprocess.PIPE,
    )
    assert process.stderr is not None
    lines: list[str] = []
    address = metrics = None
    while address is None or metrics is None:
        line = (await asyncio.wait_for(process.stderr.readline(), 30)).decode()
        assert line, "".join(lines)
        lines.append(line)
        address = address or re.search(r"dcp mqtt listening on (\S+):(\d+)", line)
        metrics = metrics or re.search(r"metrics on http://(\S+):(\d+)/metrics", line)
    host, port = address[1], address[2]
    pub = await asyncio.create_subprocess_exec("mosquitto_pub", "-h", host, "-p", port, "-q", "1", "-t", "cli/test", "-m", "hi")
    assert await asyncio.wait_for(pub.wait(), TIMEOUT_S) == 0
    reader, writer = await asyncio.open_connection(metrics[1], int(metrics[2]))
    writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    body = (await asyncio.wait_for(reader.read(), TIMEOUT_S)).decode()
    assert "dcp_mqtt_published_total 1" in body and "dcp_mqtt_unrouted_total 1" in body and 'daemon="mqtt"' in body
    process.send_signal(signal.SIGTERM)
    await asyncio.wait_for(process.stderr.read(), 30)
    assert await process.wait() == 0


@pytest.mark.parametrize("target", GATEWAYS)
def test_dcp_bench_measures_mqtt_through_the_gateway(target: str, tmp_path: Path) -> None:
    """The bench targets: the three-process stack, an MQTT publisher (aiomqtt, the bench
    extra), and an MQTT subscriber of the gateway or a DataAgent on its broker."""
    pytest.importorskip("aiomqtt")
    server = start_server(target, tmp_path)
    try:
        sent, got = run_pair(target, server, size=100, count=50, interval_ms=1.0, keep_latencies=True)
    finally:
        assert server.stop() == 0
    assert sent["sent"] == 50 and got["received"] == 50 and got["duplicates"] == 0 and len(got["latencies_us"]) == 50


# --------------------------------------------------------------------------- hostile bytes, no sockets


class FakeTransport(asyncio.Transport):
    """Records what the gateway writes; never pushes back."""

    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()
        self.closed = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        assert not self.closed
        self.written += data

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    abort = close

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("192.0.2.1", 5) if name == "peername" else default

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


class UnpluggedGateway(Gateway):
    """A gateway never started: no broker, no orchestrator; a password of b"bad" is refused."""

    async def authenticate(self, name: str, password: bytes | None) -> int:
        return Reason.BAD_USER_NAME_OR_PASSWORD if password == b"bad" else 0


def broken(stream: bytes) -> bool:
    """Whether the codec finds ``stream`` (then its end) breaks MQTT."""
    decoder = Decoder(max_packet=4096)
    try:
        for read in [stream, b""] if stream else [b""]:
            decoder.feed(read)
    except MqttError:
        return True
    return False


async def idle(conn: MqttConnection) -> None:
    """Until the connection's task waits for packets, or has ended (each step a yield, no timer)."""
    assert conn._task is not None
    for _ in range(10_000):
        if conn._task.done() or (conn._wake is not None and not conn.inbox):
            return
        await asyncio.sleep(0)
    raise AssertionError("the connection's task never went idle")


async def hostile(reads: list[bytes]) -> tuple[UnpluggedGateway, MqttConnection, FakeTransport]:
    gateway = UnpluggedGateway(MqttConfig(listen="127.0.0.1:0", route_wait_s=0.0, max_packet=4096, topic_alias_maximum=2))
    conn, transport = MqttConnection(gateway), FakeTransport()
    conn.connection_made(transport)
    for read in reads:  # a client that waits for each answer: errors after the CONNACK get their DISCONNECT
        conn.data_received(read)
        await idle(conn)
    conn.eof_received()
    conn.connection_lost(None)
    assert conn._task is not None
    await asyncio.wait_for(conn._task, TIMEOUT_S)
    await asyncio.gather(*gateway._tasks)
    return gateway, conn, transport


@pytest.mark.fuzz
@fuzz_settings(100)
@given(data=st.data())
def test_fuzz_hostile_bytes_close_only_their_connection(caplog, data: st.DataObject) -> None:  # type: ignore[no-untyped-def]
    """Random or mutated streams in any reads: nothing escapes the connection's callbacks
    or its task (no traceback), every byte written back is well-formed MQTT ending, if
    the gateway closed the connection, with its DISCONNECT or a refusing CONNACK; a
    stream the codec finds broken is closed; the connection leaves nothing behind."""
    caplog.set_level(logging.WARNING, logger="dcp")
    executed["mqtt gateway"] += 1
    if data.draw(st.integers(0, 3), label="random bytes") == 0:
        stream = data.draw(st.binary(max_size=400), label="stream")
    else:
        version, packets = mqtt_streams.stream(random.Random(data.draw(st.integers(0, 2**64 - 1), label="seed")))
        raw, starts = mqtt_streams.encoded(version, packets)
        ops = data.draw(st.lists(st.tuples(st.sampled_from(mqtt_streams.MUTATIONS), st.integers(0, 10**6), st.integers(0, 255)), max_size=3), label="mutations")
        stream = mqtt_streams.mutate(raw, starts, ops)
    reads = split(stream, data.draw(st.lists(st.integers(0, len(stream)), max_size=6), label="cuts"))
    gateway, conn, transport = uvloop.run(hostile(reads))

    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], "an unexpected error in the gateway"
    answers = Decoder(version=conn.version).feed(bytes(transport.written))  # well-formed, or this raises
    if answers:
        assert isinstance(answers[0], ConnAck)
    if any(isinstance(a, Disconnect) for a in answers):
        assert isinstance(answers[-1], Disconnect) and conn.version == V5
    if broken(stream):
        assert transport.closed
    assert not gateway.connections and not gateway.clients and not gateway.filters and not gateway.patterns



def test_print_config_says_a_token_is_set_without_printing_it(capsys: pytest.CaptureFixture[str]) -> None:
    from dcp.cli import main

    token = "agent-token-that-must-not-be-printed"
    assert main(["mqtt", "--print-config", "--token", token, "--broker", "dcp://127.0.0.1:7400"]) == 0
    printed = capsys.readouterr().out
    assert token not in printed and "# token is set, not shown (flag)" in printed
    assert main(["mqtt", "--print-config", "--broker", "dcp://127.0.0.1:7400"]) == 0
    assert 'token = ""  # default' in capsys.readouterr().out  # none set: shown as it is
