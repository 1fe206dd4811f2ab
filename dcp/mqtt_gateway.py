"""``dcp mqtt``: an MQTT server (3.1.1 and 5.0) whose clients publish and subscribe on the data plane.

The gateway is one :class:`dcp.DataAgent` (``name``, default ``mqtt-gateway``) and an
``asyncio.Protocol`` server.  What its MQTT clients publish, it publishes on the topic's
dcp form (:mod:`dcp.mqtt_topics`) as the producer of that topic, so the orchestrator
routes it to every consumer of the overlay.  What they subscribe to becomes consume
patterns of the agent, registered at once (:meth:`DataAgent.set_consumes`), so
pipelines and policies reach them through any broker; what dcp delivers for those
patterns goes out to each matching client.  A message published and consumed by MQTT
clients of the same gateway goes from one to the other here (the orchestrator never
routes a stream back to its producer).

The first PUBLISH on a new topic waits, at most ``route_wait_s``, for the topic's route:
the orchestrator answers a new producer's topic with its number, or says nobody
consumes it.  Meanwhile the packets that connection sent after it wait behind it, so
a client's messages keep their order.

Per client (:class:`MqttConnection`): one task handles its packets in order; writes
never wait.  Messages for a subscriber go into its socket up to ``client_buffer_bytes``,
then into a queue of ``client_queue`` messages; past that the oldest is dropped and
counted, so a slow subscriber costs the data plane nothing.  QoS 1 to a subscriber
keeps at most ``max_inflight`` (or the client's Receive Maximum) unacknowledged.

Credentials: a client's user name (else its client identifier) and password are
presented to the orchestrator as a dcp agent's name and token; what the orchestrator
refuses (a secure one needs a token for that name) is refused with the CONNACK code
for it.  Sessions do not outlive their connection (a 5.0 CONNACK says Session Expiry
Interval 0; a 3.1.1 client asking to keep one gets session present 0), so the will of
a connection that ends without DISCONNECT is published at once.  A subscription
asking for QoS 2 is granted QoS 1; a QoS 2 PUBLISH goes through PUBREC/PUBREL/PUBCOMP
and is forwarded once.  Retained messages are kept here, at most ``max_retained`` of
them and ``max_retained_bytes`` in all.  Topic aliases from clients are taken (up to
``topic_alias_maximum``); the gateway sends none.  Not supported: shared
subscriptions and subscription identifiers (CONNACK says so), enhanced
authentication (CONNACK 0x8C), MQTT 3.1.

Every byte a client sends is hostile until decoded by :mod:`dcp.mqtt_codec`: a
malformed packet or a protocol error closes that connection, with the reason code
where the protocol has a packet for it, and nothing else.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import os
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, cast

from . import __version__
from ._guard import safe
from ._loop import no_delay
from .agent import DataAgent
from .client import Message, Status, connect, refused
from .config import _FromSources, _opt, _shared, check_logs_and_metrics, parse_address
from .errors import AuthError, ConfigError, DcpError, RemoteError
from .metrics import Family, ProcessMetrics, build_info
from .metrics_http import MetricsServer
from .mqtt_codec import (
    CONNACK_V311,
    V5,
    V311,
    ConnAck,
    Connect,
    Decoder,
    Disconnect,
    MqttError,
    Packet,
    PingReq,
    PingResp,
    Prop,
    Properties,
    PubAck,
    PubComp,
    PubRec,
    PubRel,
    Publish,
    Reason,
    SubAck,
    Subscribe,
    Unsubscribe,
    UnsubAck,
    Will,
    encode,
    property_value,
)
from .mqtt_topics import filter_matches, to_dcp_patterns, to_dcp_topic, to_mqtt_topic
from .tls import server_context
from .wire import DEFAULT_LIMITS

__all__ = ["MqttConfig", "Gateway", "MqttConnection"]

log = logging.getLogger(__name__)

#: Message properties a 5.0 subscriber gets as the publisher sent them (the others are per connection).
FORWARDED_PROPERTIES = frozenset({
    Prop.PAYLOAD_FORMAT_INDICATOR, Prop.MESSAGE_EXPIRY_INTERVAL, Prop.CONTENT_TYPE, Prop.RESPONSE_TOPIC,
    Prop.CORRELATION_DATA, Prop.USER_PROPERTY,
})
INBOX_HIGH, INBOX_LOW = 256, 64  # packets waiting for a connection's task: stop reading above, read again below
MAX_CLIENT_ID = 256  # bytes of a client identifier
MATCH_CACHE_SIZE = 4096  # topics whose subscribers are remembered until the subscriptions change
AUTH_CHECKS = 32  # credential checks with the orchestrator at once
MAX_PACKET = DEFAULT_LIMITS.max_frame // 2  # an MQTT packet's payload fits a dcp frame, with room for X and the topic


def _url_list(text: str) -> tuple[str, ...]:
    """``URL[,URL...]`` as a tuple."""
    return tuple(url.strip() for url in text.split(",") if url.strip())


@dataclass(frozen=True)
class MqttConfig(_FromSources):
    """Everything ``dcp mqtt`` needs; a ``[mqtt]`` TOML table, ``DCP_MQTT_<KEY>`` variables and flags."""

    SECTION = "mqtt"

    listen: str = field(default="127.0.0.1:1883", metadata=_opt("HOST:PORT the MQTT clients connect to (port 0: any free one)"))
    broker: tuple[str, ...] = field(
        default=("dcp://127.0.0.1:7400",),
        metadata=_opt("dcp broker URL(s), comma-separated: the gateway attaches to the first that answers, and moves on "
                      "when it goes", type=_url_list, metavar="URL[,URL...]"),
    )
    orchestrator: str = field(default="dcp://127.0.0.1:7300", metadata=_opt("the orchestrator's URL (dcp:// or dcps://)"))
    name: str = field(default="mqtt-gateway", metadata=_opt("the gateway's name as a data agent (policies and tokens name it)"))
    token: str = field(
        default="", metadata=_opt("the gateway's own dcp token, for an orchestrator and brokers that require one", secret=True),
    )
    tls_ca: str = field(default="", metadata=_opt("CA file to verify dcps:// brokers and the orchestrator with", metavar="FILE"))
    tls_cert: str = field(default="", metadata=_opt("PEM certificate (chain) to serve MQTT over TLS with (with --tls-key)", metavar="FILE"))
    tls_key: str = field(default="", metadata=_opt("PEM private key of --tls-cert", metavar="FILE"))
    max_packet: int = field(default=1024 * 1024, metadata=_opt("largest MQTT packet taken from a client, bytes (CONNACK says it)", type=int))
    max_clients: int = field(default=10_000, metadata=_opt("MQTT connections at once; past it a connection is closed at accept", type=int))
    client_queue: int = field(
        default=1000, metadata=_opt("messages queued for a subscriber whose socket is full; past it the oldest is dropped and counted", type=int),
    )
    client_buffer_bytes: int = field(default=256 * 1024, metadata=_opt("a subscriber's socket output buffer before its queue is used, bytes", type=int))
    max_inflight: int = field(
        default=32, metadata=_opt("QoS 1 messages sent to a subscriber and not yet acknowledged, and QoS 2 ones taken from a "
                                  "publisher and not yet released, at most (CONNACK's Receive Maximum)", type=int),
    )
    max_subscriptions: int = field(default=100, metadata=_opt("topic filters one client may subscribe to", type=int))
    max_patterns: int = field(
        default=1000, metadata=_opt("distinct dcp patterns the gateway consumes for all its clients (at most the orchestrator's "
                                    "max_consumes)", type=int),
    )
    max_topics: int = field(
        default=1000, metadata=_opt("distinct topics the gateway publishes for all its clients (at most the orchestrator's "
                                    "max_produces); a PUBLISH on one more is refused (quota exceeded)", type=int),
    )
    max_retained: int = field(default=10_000, metadata=_opt("retained messages kept", type=int))
    max_retained_bytes: int = field(default=64 * 1024 * 1024, metadata=_opt("payload bytes of the retained messages kept, in all", type=int))
    topic_alias_maximum: int = field(default=16, metadata=_opt("topic aliases a 5.0 client may set (0: none)", type=int))
    route_wait_s: float = field(
        default=2.0, metadata=_opt("how long the first PUBLISH on a new topic waits for the topic's route, seconds", type=float),
    )
    connect_timeout_s: float = field(default=10.0, metadata=_opt("a connection with no CONNECT this long after it opened is closed, seconds", type=float))
    log_level: str = _shared("log_level")
    log_format: str = _shared("log_format")
    log_config: str = _shared("log_config")
    metrics_listen: str = _shared("metrics_listen")

    def __post_init__(self) -> None:
        parse_address(self.listen)
        check_logs_and_metrics(self)
        brokers = _url_list(self.broker) if isinstance(self.broker, str) else self.broker
        if not isinstance(brokers, (tuple, list)) or not brokers or not all(isinstance(url, str) for url in brokers):
            raise ConfigError(f"broker must be one or more dcp URLs, got {self.broker!r}")
        object.__setattr__(self, "broker", tuple(brokers))
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("tls_cert and tls_key go together: give both to serve MQTT over TLS, or neither")
        for name in ("max_clients", "client_queue", "client_buffer_bytes", "max_inflight", "max_subscriptions", "max_patterns",
                     "max_topics", "max_retained", "max_retained_bytes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 64 <= self.max_packet <= MAX_PACKET:
            raise ConfigError(f"max_packet must be in [64, {MAX_PACKET}], got {self.max_packet}")
        if self.max_inflight > 0xFFFF or not 0 <= self.topic_alias_maximum <= 0xFFFF:
            raise ConfigError("max_inflight and topic_alias_maximum must fit two bytes (at most 65535)")
        if self.route_wait_s < 0 or self.connect_timeout_s <= 0:
            raise ConfigError("route_wait_s must not be negative, connect_timeout_s must be positive")

    @property
    def address(self) -> tuple[str, int]:
        return parse_address(self.listen)


class Outcome(enum.Enum):
    """What became of a message handed to the data plane."""

    HANDED = "handed"  # written to the broker connection
    UNROUTED = "unrouted"  # nobody in dcp consumes the topic
    FORBIDDEN = "forbidden"  # the orchestrator's policy keeps the gateway from publishing the topic
    LOST = "lost"  # routed, but the broker connection was gone
    REFUSED = "refused"  # one topic more than max_topics


@dataclass
class _Sub:
    """One client's subscription to one filter."""

    qos: int  # granted
    no_local: bool
    retain_as_published: bool
    patterns: tuple[str, ...]


@dataclass
class _Retained:
    payload: bytes
    qos: int
    properties: Properties


class _Closed(Exception):
    """A connection's task stops handling packets: the connection is being closed."""


class MqttConnection(asyncio.Protocol):
    """One MQTT client: ``data_received`` decodes and queues, one task handles the packets in order."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.config = gateway.config
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self.decoder = Decoder(max_packet=gateway.config.max_packet)
        self.version = V311
        self.client_id = ""
        self.connecting = False  # its CONNECT is being handled (credentials checked)
        self.connected = False  # CONNACK sent
        self.failed = False  # the stream broke MQTT, or the gateway closed it: nothing more is acted upon
        self.lost = False  # the socket is gone (queued packets are still handled)
        self.keep_alive = 0
        self.last_heard = 0.0
        self.will: Will | None = None
        self.subscriptions: dict[str, _Sub] = {}
        self.aliases: dict[int, str] = {}  # topic aliases the client set
        self.qos2: set[int] = set()  # QoS 2 packet ids taken and not yet released (PUBREL)
        self.receive_maximum = gateway.config.max_inflight
        self.max_packet_out = 0  # the client's Maximum Packet Size (0: none)
        self.inflight: set[int] = set()  # QoS 1 packet ids sent and not acknowledged
        self.next_packet_id = 1
        self.outbox: deque[bytes | Publish] = deque()  # waiting for the socket (bytes) or an in-flight slot (Publish)
        self.paused = False  # the socket's output buffer is full
        self.reading_paused = False
        self.inbox: deque[Packet] = deque()
        self.dropped = 0
        self._wake: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[None] | None = None

    # -- the socket side ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "?"
        gateway = self.gateway
        gateway.connections.add(self)
        if len(gateway.connections) > self.config.max_clients or gateway.closing:
            gateway.count_refusal("too_many_clients" if not gateway.closing else "shutting_down")
            self.failed = True
            self.transport.abort()
            return
        no_delay(transport)
        self.transport.set_write_buffer_limits(high=self.config.client_buffer_bytes)
        loop = asyncio.get_running_loop()
        self.last_heard = loop.time()
        self._timer = loop.call_later(self.config.connect_timeout_s, self._check_alive)
        self._task = loop.create_task(self._run())

    def data_received(self, data: bytes) -> None:
        if self.failed:
            return
        try:
            packets = self.decoder.feed(data)
        except MqttError as exc:
            self._refuse_stream(exc)
            return
        if packets:
            self.last_heard = asyncio.get_running_loop().time()
            self.inbox.extend(packets)
            self._wake_task()
            if len(self.inbox) > INBOX_HIGH and self.transport is not None and not self.transport.is_closing():
                self.transport.pause_reading()
                self.reading_paused = True

    def eof_received(self) -> bool:
        if not self.failed:
            try:
                self.decoder.feed(b"")
            except MqttError as exc:
                self._refuse_stream(exc)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self._timer is not None:
            self._timer.cancel()
        self._wake_task()
        if self._task is None:  # refused at accept: no task to clean up after it
            self.gateway.connections.discard(self)

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self._pump()

    def _write(self, data: bytes) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(data)

    def _send(self, packet: Packet) -> None:
        self._write(encode(packet, self.version))

    def _refuse_stream(self, exc: MqttError) -> None:
        """A malformed or forbidden stream: say why where MQTT has a packet for it, and close."""
        self.gateway.counters["protocol_errors"] += 1
        log.info("mqtt %s (%s): %s; closing", self.peer, safe(self.client_id or "-"), safe(exc))
        if not self.connected and exc.reason == Reason.UNSUPPORTED_PROTOCOL_VERSION:
            self._write(encode(ConnAck(reason=CONNACK_V311[Reason.UNSUPPORTED_PROTOCOL_VERSION]), V311))
        self._fail(exc.reason)

    def _fail(self, reason: int | None) -> None:
        """Close: a 5.0 client that has its CONNACK gets DISCONNECT with ``reason`` first; its
        will is published (this is no DISCONNECT of its own)."""
        if self.connected and self.version == V5 and reason is not None:
            self._send(Disconnect(reason))
        self.failed = True
        if self.transport is not None:
            self.transport.close()
        self._wake_task()

    def _wake_task(self) -> None:
        wake = self._wake
        if wake is not None and not wake.done():
            wake.set_result(None)

    def _check_alive(self) -> None:
        """No CONNECT in time, or no packet for 1.5 keep-alive periods: close."""
        loop = asyncio.get_running_loop()
        if not self.connected:
            if not self.inbox and not self.connecting:  # a CONNECT being handled is in time
                self.gateway.count_refusal("connect_timeout")
                self._fail(None)
            return
        limit = 1.5 * self.keep_alive
        idle = loop.time() - self.last_heard
        if idle >= limit and not self.reading_paused and not self.inbox:
            self.gateway.counters["keep_alive_timeouts"] += 1
            log.info("mqtt %s (%s): nothing for %.1f s, 1.5 x its keep-alive; closing", self.peer, safe(self.client_id), idle)
            self._fail(Reason.KEEP_ALIVE_TIMEOUT)
            return
        self._timer = loop.call_later(max(limit - idle, 0.05), self._check_alive)

    # -- the task: packets in order ---------------------------------------------------------

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while not self.failed:
                while self.inbox and not self.failed:
                    await self._handle(self.inbox.popleft())
                    if self.reading_paused and len(self.inbox) < INBOX_LOW and self.transport is not None:
                        self.reading_paused = False
                        if not self.transport.is_closing():
                            self.transport.resume_reading()
                if self.lost:
                    break
                self._wake = loop.create_future()
                await self._wake
                self._wake = None
        except _Closed:
            pass
        except Exception:  # a bug: this connection only
            log.exception("mqtt %s (%s): closing after an unexpected error", self.peer, safe(self.client_id))
            if self.transport is not None:
                self.transport.abort()
        finally:
            if self._timer is not None:
                self._timer.cancel()
            self.gateway.forget(self)

    def _violation(self, reason: int, message: str) -> _Closed:
        """A protocol error found while handling a packet: close, and stop handling."""
        self.gateway.counters["protocol_errors"] += 1
        log.info("mqtt %s (%s): %s; closing", self.peer, safe(self.client_id or "-"), message)
        self._fail(reason)
        return _Closed()

    async def _handle(self, packet: Packet) -> None:
        if isinstance(packet, Connect) and not self.connected:  # the decoder takes no other first packet
            await self._on_connect(packet)
        elif isinstance(packet, Publish):
            await self._on_publish(packet)
        elif isinstance(packet, PubAck):
            self.inflight.discard(packet.packet_id)
            self._pump()
        elif isinstance(packet, PubRel):
            known = packet.packet_id in self.qos2
            self.qos2.discard(packet.packet_id)
            self._send(PubComp(packet.packet_id, 0 if known or self.version != V5 else Reason.PACKET_IDENTIFIER_NOT_FOUND))
        elif isinstance(packet, Subscribe):
            await self._on_subscribe(packet)
        elif isinstance(packet, Unsubscribe):
            await self._on_unsubscribe(packet)
        elif isinstance(packet, PingReq):
            self._send(PingResp())
        elif isinstance(packet, Disconnect):
            if packet.reason != Reason.DISCONNECT_WITH_WILL:
                self.will = None
            self.failed = True
            if self.transport is not None:
                self.transport.close()
            raise _Closed()
        elif isinstance(packet, (PubRec, PubComp)):
            pass  # the gateway never sends QoS 2: acknowledgements of nothing
        else:  # a second CONNECT, AUTH, or what only a server sends
            raise self._violation(Reason.PROTOCOL_ERROR, f"a {type(packet).__name__} from a client")

    # -- CONNECT ------------------------------------------------------------------------------

    def _refuse_connect(self, reason: int, why: str) -> _Closed:
        self.gateway.count_refusal(Reason(reason).name.lower())
        log.info("mqtt %s: refusing the CONNECT of %s: %s", self.peer, safe(self.client_id or "-"), why)
        self._send(ConnAck(reason=reason if self.version == V5 else CONNACK_V311.get(reason, 5)))
        self._fail(None)
        return _Closed()

    async def _on_connect(self, connect: Connect) -> None:
        self.connecting = True
        self.version = connect.version
        self.client_id = connect.client_id
        properties: list[tuple[int, Any]] = []
        if len(connect.client_id.encode()) > MAX_CLIENT_ID:
            raise self._refuse_connect(Reason.CLIENT_IDENTIFIER_NOT_VALID, f"a client identifier over {MAX_CLIENT_ID} bytes")
        if not connect.client_id:
            if self.version == V311 and not connect.clean_start:
                raise self._refuse_connect(Reason.CLIENT_IDENTIFIER_NOT_VALID, "no client identifier, and a session to keep")
            self.client_id = "dcp-" + os.urandom(8).hex()
            if self.version == V5:
                properties.append((Prop.ASSIGNED_CLIENT_IDENTIFIER, self.client_id))
        if property_value(connect.properties, Prop.AUTHENTICATION_METHOD) is not None:
            raise self._refuse_connect(Reason.BAD_AUTHENTICATION_METHOD, "enhanced authentication is not supported")
        if connect.will is not None:
            try:
                to_dcp_topic(connect.will.topic)
            except MqttError as exc:
                raise self._refuse_connect(Reason.TOPIC_NAME_INVALID if self.version == V5 else Reason.NOT_AUTHORIZED, str(exc)) from None
        reason = await self.gateway.authenticate(connect.username or self.client_id, connect.password)
        if reason:
            raise self._refuse_connect(reason, f"the orchestrator did not admit {safe(connect.username or self.client_id)!r}")
        if self.lost or self.failed:
            raise _Closed()
        receive_maximum = property_value(connect.properties, Prop.RECEIVE_MAXIMUM)
        if isinstance(receive_maximum, int):
            self.receive_maximum = min(receive_maximum, self.config.max_inflight)
        max_packet = property_value(connect.properties, Prop.MAXIMUM_PACKET_SIZE)
        self.max_packet_out = max_packet if isinstance(max_packet, int) else 0
        if self.version == V5:
            expiry = property_value(connect.properties, Prop.SESSION_EXPIRY_INTERVAL)
            if expiry:
                properties.append((Prop.SESSION_EXPIRY_INTERVAL, 0))  # sessions end with their connection
            properties += [
                (Prop.RECEIVE_MAXIMUM, self.config.max_inflight), (Prop.TOPIC_ALIAS_MAXIMUM, self.config.topic_alias_maximum),
                (Prop.MAXIMUM_PACKET_SIZE, self.config.max_packet), (Prop.SUBSCRIPTION_IDENTIFIER_AVAILABLE, 0),
                (Prop.SHARED_SUBSCRIPTION_AVAILABLE, 0),
            ]
        self.keep_alive = connect.keep_alive
        self.will = connect.will
        self.gateway.take_over(self)
        self._send(ConnAck(False, 0, tuple(properties)))
        self.connected, self.connecting = True, False
        self.gateway.counters["connects"] += 1
        log.debug("mqtt %s connected as %s (MQTT %s)", self.peer, safe(self.client_id), "5.0" if self.version == V5 else "3.1.1")
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.keep_alive:
            self._timer = asyncio.get_running_loop().call_later(1.5 * self.keep_alive, self._check_alive)

    # -- PUBLISH from the client --------------------------------------------------------------

    async def _on_publish(self, publish: Publish) -> None:
        topic = publish.topic
        alias = property_value(publish.properties, Prop.TOPIC_ALIAS)
        if isinstance(alias, int):
            if alias > self.config.topic_alias_maximum:
                raise self._violation(Reason.TOPIC_ALIAS_INVALID, f"topic alias {alias} over the maximum of {self.config.topic_alias_maximum}")
            if topic:
                self.aliases[alias] = topic
            elif alias in self.aliases:
                topic = self.aliases[alias]
            else:
                raise self._violation(Reason.PROTOCOL_ERROR, f"topic alias {alias} was never set")
        elif not topic and self.version == V5:
            raise self._violation(Reason.PROTOCOL_ERROR, "a PUBLISH with neither a topic nor a topic alias")
        if publish.qos == 2 and publish.packet_id in self.qos2:
            self._send(PubRec(publish.packet_id))  # a resend: taken already, not forwarded twice
            return
        if publish.qos == 2 and len(self.qos2) >= self.config.max_inflight:
            raise self._violation(Reason.RECEIVE_MAXIMUM_EXCEEDED, f"over {self.config.max_inflight} QoS 2 messages not released")
        try:
            dcp_topic = to_dcp_topic(topic)
        except MqttError as exc:
            self._refuse_publish(publish, exc.reason, str(exc))
            return
        properties = tuple(p for p in publish.properties if p[0] in FORWARDED_PROPERTIES)
        outcome, delivered = await self.gateway.publish(topic, dcp_topic, publish.payload, publish.qos, publish.retain, properties, self)
        if outcome is Outcome.REFUSED:
            self._refuse_publish(publish, Reason.QUOTA_EXCEEDED, f"one topic more than max_topics={self.config.max_topics}")
        elif outcome is Outcome.FORBIDDEN:
            self._refuse_publish(publish, Reason.NOT_AUTHORIZED, f"the orchestrator's policy refuses publishing {dcp_topic}")
        elif outcome is Outcome.LOST and not delivered and publish.qos:  # at QoS 0 only counted: no fault of the client's
            self._refuse_publish(publish, Reason.UNSPECIFIED_ERROR, "the broker connection is gone")
        elif publish.qos:
            reason = Reason.NO_MATCHING_SUBSCRIBERS if outcome is Outcome.UNROUTED and not delivered and self.version == V5 else 0
            self._ack(publish, reason)

    def _ack(self, publish: Publish, reason: int) -> None:
        if publish.qos == 1:
            self._send(PubAck(publish.packet_id, reason))
            return
        if reason < 0x80:
            self.qos2.add(publish.packet_id)
        self._send(PubRec(publish.packet_id, reason))

    def _refuse_publish(self, publish: Publish, reason: int, why: str) -> None:
        """A PUBLISH not taken: a 5.0 client's QoS 1 or 2 gets the reason in its acknowledgement;
        otherwise (QoS 0, which has none, or 3.1.1, whose have no reason) the connection
        closes, a 5.0 one with DISCONNECT and the reason."""
        self.gateway.refused_publishes[Reason(reason).name.lower()] += 1
        if self.version == V5 and publish.qos:
            log.debug("mqtt %s (%s): refusing a PUBLISH: %s", self.peer, safe(self.client_id), why)
            self._ack(publish, reason)
            return
        raise self._violation(reason, f"refusing a PUBLISH: {why}")

    # -- SUBSCRIBE and UNSUBSCRIBE -------------------------------------------------------------

    async def _on_subscribe(self, subscribe: Subscribe) -> None:
        if property_value(subscribe.properties, Prop.SUBSCRIPTION_IDENTIFIER) is not None:
            raise self._violation(Reason.SUBSCRIPTION_IDENTIFIERS_NOT_SUPPORTED, "a subscription identifier (CONNACK said: not available)")
        gateway = self.gateway
        reasons: list[int] = []
        retained_for: list[tuple[str, int]] = []  # (filter, granted QoS) that get the retained messages
        for sub in subscribe.subscriptions:
            topic_filter = sub.topic_filter
            try:
                patterns = to_dcp_patterns(topic_filter)
            except MqttError as exc:
                reasons.append(exc.reason if self.version == V5 else Reason.UNSPECIFIED_ERROR)
                gateway.refused_subscriptions[Reason(exc.reason).name.lower()] += 1
                continue
            new = topic_filter not in self.subscriptions
            if new and (len(self.subscriptions) >= self.config.max_subscriptions or not gateway.room_for(patterns)):
                reasons.append(Reason.QUOTA_EXCEEDED if self.version == V5 else Reason.UNSPECIFIED_ERROR)
                gateway.refused_subscriptions["quota_exceeded"] += 1
                continue
            granted = min(sub.qos, 1)  # QoS 2 is granted as 1
            gateway.subscribe(self, topic_filter, _Sub(granted, sub.no_local, sub.retain_as_published, patterns))
            reasons.append(granted)
            if sub.retain_handling == 0 or (sub.retain_handling == 1 and new):
                retained_for.append((topic_filter, granted))
        await gateway.register_patterns()
        self._send(SubAck(subscribe.packet_id, tuple(reasons)))
        for topic_filter, granted in retained_for:
            gateway.send_retained(self, topic_filter, granted)

    async def _on_unsubscribe(self, unsubscribe: Unsubscribe) -> None:
        reasons = []
        for topic_filter in unsubscribe.topic_filters:
            known = self.gateway.unsubscribe(self, topic_filter)
            reasons.append(0 if known else Reason.NO_SUBSCRIPTION_EXISTED)
        await self.gateway.register_patterns()
        self._send(UnsubAck(unsubscribe.packet_id, tuple(reasons) if self.version == V5 else ()))

    # -- messages to the client -----------------------------------------------------------------

    def deliver(self, topic: str, payload: bytes, qos: int, retain: bool, properties: Properties, shared: dict[tuple[int, bool], bytes]) -> None:
        """Queue one message for this client, never waiting: ``shared`` holds the QoS 0
        encodings the other subscribers of the same message use too."""
        if not self.connected or self.failed:
            return
        if qos == 0:
            key = (self.version, retain)
            data = shared.get(key)
            if data is None:
                data = shared[key] = encode(Publish(topic, payload, 0, retain, properties=properties if self.version == V5 else ()), self.version)
            if self.max_packet_out and len(data) > self.max_packet_out:
                self._drop("too_large")
                return
            if not self.outbox and not self.paused:
                self._write(data)
                self.gateway.counters["delivered"] += 1
                return
            self._queue(data)
            return
        # its packet identifier is given when it goes out (_pump)
        message = Publish(topic, payload, 1, retain, packet_id=1, properties=properties if self.version == V5 else ())
        if self.max_packet_out and len(encode(message, self.version)) > self.max_packet_out:
            self._drop("too_large")
            return
        self._queue(message)
        self._pump()

    def _queue(self, item: bytes | Publish) -> None:
        if len(self.outbox) >= self.config.client_queue:
            self.outbox.popleft()
            self._drop("queue_full")
        self.outbox.append(item)

    def _drop(self, reason: str) -> None:
        self.dropped += 1
        self.gateway.dropped[reason] += 1

    def _pump(self) -> None:
        """Write what waits, while the socket takes it and QoS 1 has a free slot."""
        outbox = self.outbox
        while outbox and not self.paused and not self.failed:
            head = outbox[0]
            if isinstance(head, Publish):
                if len(self.inflight) >= self.receive_maximum:
                    return
                packet_id = self._packet_id()
                self.inflight.add(packet_id)
                head = encode(Publish(head.topic, head.payload, 1, head.retain, packet_id=packet_id, properties=head.properties), self.version)
            outbox.popleft()
            self._write(head)
            self.gateway.counters["delivered"] += 1

    def _packet_id(self) -> int:
        while True:
            packet_id = self.next_packet_id
            self.next_packet_id = packet_id % 0xFFFF + 1
            if packet_id not in self.inflight:
                return packet_id

    def shut(self, reason: int) -> None:
        """The gateway closes this connection (it is taken over, or the gateway stops)."""
        self._fail(reason)


class Gateway:
    """The MQTT gateway: ``start()``, ``serve_forever()``, ``close()``; see the module docstring."""

    def __init__(self, config: MqttConfig) -> None:
        self.config = config
        self.agent = DataAgent(
            config.name, broker=list(config.broker), orchestrator=config.orchestrator, token=config.token or None,
            tls_ca=config.tls_ca or None,
        )
        self.agent.consume(())(self._from_plane)
        self.connections: set[MqttConnection] = set()
        self.clients: dict[str, MqttConnection] = {}  # client identifier -> its connection
        self.filters: dict[str, set[MqttConnection]] = {}  # topic filter -> who subscribes to it
        self.patterns: Counter[str] = Counter()  # dcp pattern -> subscriptions that need it
        self.retained: dict[str, _Retained] = {}
        self.retained_bytes = 0
        self.topics: dict[str, asyncio.Future[None] | None] = {}  # dcp topic -> its route wait (None: done)
        self.counters: Counter[str] = Counter()
        self.dropped: Counter[str] = Counter()  # messages for subscribers, by reason
        self.refusals: Counter[str] = Counter()  # connections, by reason
        self.refused_publishes: Counter[str] = Counter()
        self.refused_subscriptions: Counter[str] = Counter()
        self.closing = False
        self._matches: dict[str, dict[MqttConnection, tuple[int, bool, bool]]] = {}
        self._registered: list[str] = []
        self._registering = asyncio.Lock()
        self._auth_slots = asyncio.Semaphore(AUTH_CHECKS)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._server: asyncio.Server | None = None
        self._closed = asyncio.Event()
        self.metrics: MetricsServer | None = None
        if config.metrics_listen:
            process = ProcessMetrics()
            self.metrics = MetricsServer(parse_address(config.metrics_listen), lambda: [*_process(process), *self.families()], self.unready)

    # -- life cycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Attach to a broker and register (``DataAgent.start``), then listen.

        Raises:
            DcpTimeout, RemoteError: as :meth:`DataAgent.start`.
            ConfigError: a TLS file that does not load.
            OSError: the address cannot be bound.
        """
        ssl = server_context(self.config.tls_cert, self.config.tls_key) if self.config.tls_cert else None
        await self.agent.start()
        host, port = self.config.address
        try:
            self._server = await asyncio.get_running_loop().create_server(lambda: MqttConnection(self), host, port, ssl=ssl, reuse_address=True)
            if self.metrics is not None:
                await self.metrics.start()
        except BaseException:
            await self.close()
            raise
        host, port = self.address
        log.info(
            "dcp mqtt listening on %s:%d%s as agent %s, attached to %s, orchestrator %s", host, port, " (TLS)" if ssl else "",
            safe(self.config.name), self.agent.broker.url if self.agent.broker else "-", self.config.orchestrator,
        )

    @property
    def address(self) -> tuple[str, int]:
        if self._server is None:
            raise RuntimeError("the gateway is not started")
        sockname = self._server.sockets[0].getsockname()
        return sockname[0], sockname[1]

    async def serve_forever(self, shutdown_trigger: Callable[[], Awaitable[Any]] | None = None) -> None:
        """Serve until ``shutdown_trigger()`` returns (or ``close()`` is called), then close."""
        if self._server is None:
            await self.start()
        waits = [asyncio.ensure_future(self._closed.wait())]
        if shutdown_trigger is not None:
            waits.append(asyncio.ensure_future(shutdown_trigger()))
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for wait in waits:
            wait.cancel()
        await self.close()

    async def close(self) -> None:
        """Stop accepting, tell each 5.0 client the server is shutting down, close them all
        (no wills: the gateway is what goes), stop the agent; idempotent."""
        if self.closing:
            return
        self.closing = True
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            conn.will = None
            conn.shut(Reason.SERVER_SHUTTING_DOWN)
        tasks = {t for c in self.connections if (t := c._task) is not None}
        if tasks:  # a task may be waiting for a route or for the broker: not for long
            await asyncio.wait(tasks, timeout=self.config.route_wait_s + 1.0)
        for task in [*tasks, *self._tasks]:
            task.cancel()
        await asyncio.gather(*tasks, *self._tasks, return_exceptions=True)
        if self.metrics is not None:
            await self.metrics.close()
        await self.agent.stop()
        log.info("dcp mqtt stopped: %s", ", ".join(f"{k} {v}" for k, v in sorted(self.counters.items())) or "nothing handled")
        self._closed.set()

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def count_refusal(self, reason: str) -> None:
        self.refusals[reason] += 1

    # -- clients --------------------------------------------------------------------------------

    async def authenticate(self, name: str, password: bytes | None) -> int:
        """0 if the orchestrator admits an agent ``name`` with the token ``password`` (or
        none), else the CONNACK reason code for its answer."""
        try:
            token = None if password is None else password.decode("ascii")
        except UnicodeDecodeError:
            return Reason.BAD_USER_NAME_OR_PASSWORD
        async with self._auth_slots:
            try:
                conn = await connect(
                    self.config.orchestrator, name=name, role="agent", token=token, reconnect=False, connect_timeout_s=5.0,
                    tls_ca=self.config.tls_ca or None,
                )
            except RemoteError as exc:
                return Reason.BAD_USER_NAME_OR_PASSWORD if refused(exc) else Reason.NOT_AUTHORIZED
            except AuthError:
                return Reason.NOT_AUTHORIZED
            except (DcpError, OSError) as exc:
                log.warning("mqtt: cannot check the credentials of %s with the orchestrator: %s", safe(name), safe(exc))
                return Reason.SERVER_UNAVAILABLE
            await conn.close()
        return 0

    def take_over(self, conn: MqttConnection) -> None:
        """``conn`` has the client identifier of a connection that is still open: that one
        goes (5.0: DISCONNECT Session taken over), and its will is published."""
        old = self.clients.get(conn.client_id)
        self.clients[conn.client_id] = conn
        if old is not None and old is not conn:
            self.counters["taken_over"] += 1
            old.shut(Reason.SESSION_TAKEN_OVER)

    def forget(self, conn: MqttConnection) -> None:
        """A connection's task has ended: its subscriptions go, and its will, if it ended
        without a DISCONNECT of its own, is published."""
        self.connections.discard(conn)
        if self.clients.get(conn.client_id) is conn:
            del self.clients[conn.client_id]
        if conn.subscriptions:
            for topic_filter in list(conn.subscriptions):
                self.unsubscribe(conn, topic_filter)
            self._spawn(self.register_patterns())
        will = conn.will
        if will is not None and conn.connected and not self.closing:
            conn.will = None
            self.counters["wills"] += 1
            self._spawn(self._publish_will(will))

    async def _publish_will(self, will: Will) -> None:
        try:
            dcp_topic = to_dcp_topic(will.topic)  # checked at CONNECT
        except MqttError:
            return
        properties = tuple(p for p in will.properties if p[0] in FORWARDED_PROPERTIES)
        await self.publish(will.topic, dcp_topic, will.payload, will.qos, will.retain, properties, None)

    # -- subscriptions ----------------------------------------------------------------------------

    def room_for(self, patterns: Iterable[str]) -> bool:
        """Whether the dcp patterns of a new subscription fit ``max_patterns``."""
        return len(set(self.patterns) | set(patterns)) <= self.config.max_patterns

    def subscribe(self, conn: MqttConnection, topic_filter: str, sub: _Sub) -> None:
        if topic_filter in conn.subscriptions:
            self.unsubscribe(conn, topic_filter)
        conn.subscriptions[topic_filter] = sub
        self.filters.setdefault(topic_filter, set()).add(conn)
        self.patterns.update(sub.patterns)
        self._matches.clear()

    def unsubscribe(self, conn: MqttConnection, topic_filter: str) -> bool:
        sub = conn.subscriptions.pop(topic_filter, None)
        if sub is None:
            return False
        subscribers = self.filters.get(topic_filter)
        if subscribers is not None:
            subscribers.discard(conn)
            if not subscribers:
                del self.filters[topic_filter]
        self.patterns.subtract(sub.patterns)
        self.patterns += Counter()  # drops the patterns nobody needs any more
        self._matches.clear()
        return True

    async def register_patterns(self) -> None:
        """Tell the orchestrator the patterns the subscriptions need, if they changed
        (concurrent calls coalesce: each registers what is wanted when its turn comes)."""
        async with self._registering:
            wanted = sorted(self.patterns)
            if wanted == self._registered or self.closing:
                return
            try:
                await self.agent.set_consumes(self._from_plane, wanted)
            except DcpError as exc:  # kept: the agent registers them when the orchestrator is back
                log.warning("mqtt: could not register %d consume pattern(s) with the orchestrator yet: %s", len(wanted), safe(exc))
            self._registered = wanted

    def send_retained(self, conn: MqttConnection, topic_filter: str, granted: int) -> None:
        for topic, message in list(self.retained.items()):
            if filter_matches(topic_filter, topic):
                conn.deliver(topic, message.payload, min(message.qos, granted), True, message.properties, {})

    # -- messages ---------------------------------------------------------------------------------

    async def publish(
        self, topic: str, dcp_topic: str, payload: bytes, qos: int, retain: bool, properties: Properties, origin: MqttConnection | None,
    ) -> tuple[Outcome, int]:
        """A message from an MQTT client (or its will): kept if retained, handed to the data
        plane, delivered to this gateway's subscribers; (what became of it in dcp, how many
        of the gateway's own subscribers got it)."""
        self.counters["published"] += 1
        outcome = await self.forward(dcp_topic, payload)
        if outcome is Outcome.REFUSED:
            return outcome, 0
        if retain:
            self._retain(topic, payload, qos, properties)
        delivered = self.fan_out(topic, payload, qos, retain, properties, origin)
        return outcome, delivered

    def _retain(self, topic: str, payload: bytes, qos: int, properties: Properties) -> None:
        old = self.retained.pop(topic, None)
        if old is not None:
            self.retained_bytes -= len(old.payload)
        if not payload:
            return  # an empty retained message clears the topic's
        if len(self.retained) >= self.config.max_retained or self.retained_bytes + len(payload) > self.config.max_retained_bytes:
            self.counters["retained_refused"] += 1
            return
        self.retained[topic] = _Retained(payload, min(qos, 1), properties)
        self.retained_bytes += len(payload)

    async def forward(self, dcp_topic: str, payload: bytes) -> Outcome:
        """Hand ``payload`` to the data plane; the first message on a topic waits, at most
        ``route_wait_s``, until the orchestrator has answered the topic's declaration."""
        agent = self.agent
        if dcp_topic not in self.topics:
            if len(self.topics) >= self.config.max_topics:
                return Outcome.REFUSED
            waiting = asyncio.get_running_loop().create_future()
            self.topics[dcp_topic] = waiting
            try:
                await self._declare(dcp_topic)
            finally:
                self.topics[dcp_topic] = None
                waiting.set_result(None)
        else:
            pending = self.topics[dcp_topic]
            if pending is not None:  # another message declared it and waits: so does this one, behind it
                await asyncio.shield(pending)
        if dcp_topic in agent.refusals:  # counted with the refused publishes, by reason
            return Outcome.FORBIDDEN
        route = agent.routes.get(dcp_topic)
        if route is None or not route[1]:
            self.counters["unrouted"] += 1
            return Outcome.UNROUTED
        try:
            if await agent.publish(dcp_topic, payload):
                self.counters["forwarded"] += 1
                return Outcome.HANDED
        except DcpError as exc:  # route_unsigned: a broker that verifies routes, and no tag yet
            log.debug("mqtt: %s not handed to the broker: %s", safe(dcp_topic), safe(exc))
        self.counters["lost"] += 1
        return Outcome.LOST

    async def _declare(self, dcp_topic: str) -> None:
        agent = self.agent
        self.counters["route_waits"] += 1

        async def answered() -> None:
            await agent.declare_produces(dcp_topic)
            while dcp_topic not in agent.routes:
                await agent.route_changed.wait()

        try:
            await asyncio.wait_for(answered(), self.config.route_wait_s)
        except asyncio.TimeoutError:
            self.counters["route_wait_timeouts"] += 1
        except DcpError as exc:
            log.warning("mqtt: could not declare topic %s to the orchestrator: %s", safe(dcp_topic), safe(exc))

    def fan_out(
        self, topic: str, payload: bytes, qos: int, retain: bool, properties: Properties, origin: MqttConnection | None,
    ) -> int:
        """Queue the message for every subscriber of this gateway whose filters match; how many."""
        matches = self._matches.get(topic)
        if matches is None:
            matches = self._match(topic)
        shared: dict[tuple[int, bool], bytes] = {}
        delivered = 0
        for conn, (granted, no_local, retain_as_published) in matches.items():
            if no_local and conn is origin:
                continue
            conn.deliver(topic, payload, min(qos, granted), retain and retain_as_published, properties, shared)
            delivered += 1
        return delivered

    def _match(self, topic: str) -> dict[MqttConnection, tuple[int, bool, bool]]:
        """Each subscriber of ``topic``, once, with the highest QoS of its matching
        subscriptions, whether all of them are no-local, and whether any keeps the retain flag."""
        matches: dict[MqttConnection, tuple[int, bool, bool]] = {}
        for topic_filter, subscribers in self.filters.items():
            if not filter_matches(topic_filter, topic):
                continue
            for conn in subscribers:
                sub = conn.subscriptions[topic_filter]
                qos, no_local, keep = matches.get(conn, (0, True, False))
                matches[conn] = (max(qos, sub.qos), no_local and sub.no_local, keep or sub.retain_as_published)
        if len(self._matches) >= MATCH_CACHE_SIZE:
            self._matches.clear()
        self._matches[topic] = matches
        return matches

    async def _from_plane(self, msg: Message) -> None:
        """A frame dcp routed here for the subscriptions: out to the matching clients."""
        topic = to_mqtt_topic(msg.topic)
        if topic is None:
            self.dropped["unmappable"] += 1
            return
        self.counters["from_dcp"] += 1
        self.fan_out(topic, bytes(msg.payload), 1, False, (), None)

    # -- what it shows ----------------------------------------------------------------------------

    def unready(self) -> list[str]:
        missing = []
        if self._server is None or self.closing:
            missing.append("not listening" if not self.closing else "shutting down")
        broker = self.agent.broker
        if broker is None or broker.status is not Status.OPEN:
            missing.append("not attached to a broker")
        orchestrator = self.agent.orchestrator
        if orchestrator is None or orchestrator.status is not Status.OPEN:
            missing.append("not connected to the orchestrator")
        return missing

    def families(self) -> list[Family]:
        """The gateway's metrics (``dcp_mqtt_*``)."""
        counters = self.counters

        def counter(name: str, help: str, value: float) -> Family:
            return Family(f"dcp_mqtt_{name}_total", "counter", help).add(value)

        def gauge(name: str, help: str, value: float) -> Family:
            return Family(f"dcp_mqtt_{name}", "gauge", help).add(value)

        def by_reason(name: str, help: str, counts: Counter[str]) -> Family:
            family = Family(f"dcp_mqtt_{name}_total", "counter", help)
            for reason, count in sorted(counts.items()):
                family.add(count, (("reason", reason),))
            return family

        return [
            gauge("connections", "MQTT connections open", len(self.connections)),
            gauge("clients", "MQTT clients connected (CONNACK sent)", len(self.clients)),
            counter("connects", "CONNECTs accepted", counters["connects"]),
            by_reason("connections_refused", "connections refused or closed before CONNACK, by reason", self.refusals),
            counter("protocol_errors", "connections closed for a malformed packet or a protocol error", counters["protocol_errors"]),
            counter("keep_alive_timeouts", "connections closed after 1.5 keep-alive periods without a packet", counters["keep_alive_timeouts"]),
            counter("wills", "will messages published", counters["wills"]),
            counter("published", "messages published by MQTT clients (wills included)", counters["published"]),
            by_reason("publishes_refused", "PUBLISH packets refused, by reason code", self.refused_publishes),
            counter("forwarded", "messages handed to the dcp broker", counters["forwarded"]),
            counter("unrouted", "messages no dcp agent consumes", counters["unrouted"]),
            counter("lost", "messages routed but not handed to the broker (connection gone)", counters["lost"]),
            counter("route_waits", "first messages on a topic that waited for its route", counters["route_waits"]),
            counter("route_wait_timeouts", "route waits that ran out (route_wait_s)", counters["route_wait_timeouts"]),
            counter("from_dcp", "frames dcp delivered for the subscriptions", counters["from_dcp"]),
            counter("delivered", "PUBLISH packets written to subscribers", counters["delivered"]),
            by_reason("dropped", "messages for subscribers dropped, by reason (queue_full, too_large, unmappable)", self.dropped),
            by_reason("subscriptions_refused", "topic filters refused, by reason code", self.refused_subscriptions),
            gauge("subscriptions", "topic filters subscribed to, all clients", sum(len(s) for s in self.filters.values())),
            gauge("patterns", "dcp patterns the gateway consumes", len(self.patterns)),
            gauge("topics", "dcp topics the gateway publishes", len(self.topics)),
            gauge("retained", "retained messages kept", len(self.retained)),
            gauge("retained_bytes", "payload bytes of the retained messages", self.retained_bytes),
            counter("retained_refused", "retained messages not kept (max_retained, max_retained_bytes)", counters["retained_refused"]),
        ]


def _process(process: ProcessMetrics) -> list[Family]:
    return [*process.families(), build_info("mqtt", __version__)]

