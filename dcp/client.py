"""The dcp client SDK: attach to a broker, publish, receive; reconnects by itself.

.. code-block:: python

    async with dcp.connect("dcp://127.0.0.1:7400", name="camera") as conn:
        await conn.publish("video", frame_bytes, route=x)
        async for msg in conn.messages():
            ...

``connect()`` returns an object that is both awaitable and an async context
manager.  Received frames wait in a bounded queue: when it is full the client stops
reading from the socket (``overflow="pause"``, the default: nothing is lost here and
the broker's slow-consumer policy applies) or drops a frame and counts it: the newest
(``overflow="drop-newest"``, or ``"drop"``) or the oldest (``"drop-oldest"``).

Three ways to receive, from the most convenient to the cheapest per frame:
``async for msg in conn.messages()``; ``async for batch in conn.batches()`` (every
frame waiting, as a list: one wake-up per socket read instead of one per frame);
and ``on_message=callback``, called with each frame as it is decoded, with no
queue at all (the callback must not block; its exceptions are logged and counted in
``callback_errors``, and the connection carries on).

A ``dcps://`` URL connects over TLS.  A ``token`` goes in the hello of every
(re)connect; a server that refuses it is not dialled again.  A token sent over plain
TCP to an address other than loopback is logged, once per connection, at warning.

The limits a server announces in its welcome (``max_frame``, ``max_topic``,
``max_x_bits``) are adopted only up to the client's own (``limits=``, default
:class:`~dcp.wire.Limits`): a server cannot make a client accept 4 GiB frames.

Small publishes are gathered into one write per event-loop iteration (or per 64 KB),
so a fast publisher makes few system calls; a control frame, ``close()`` and the end
of the iteration flush them.  A publish waits only while the socket's output buffer
is over its high-water mark.  ``await conn.flush()`` returns once the OS has every
frame published so far; ``await conn.drain()`` takes no new frame, writes out the
rest, then closes.

A broker that shuts down says ``going_away`` and reads nothing more: from that frame
on publishes wait, what was not written yet is kept, and the broker is redialled with
the backoff (it may be restarting), the frames kept going first.  With
``failover=True`` (:class:`dcp.DataAgent`, which has other brokers to go to) the
connection ends at once instead.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import logging
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Generator
from typing import Any, TypeGuard, TypeVar, cast
from urllib.parse import urlsplit

from ._guard import safe, warn_cleartext_token
from ._loop import CoalescedWriter, no_delay
from .auth import REFUSALS
from .backoff import Backoff
from .control import (
    ERROR,
    UINT,
    Error,
    GoingAway,
    Hello,
    Link,
    Ping,
    Reply,
    Request,
    SlowConsumerRequest,
    StatsRequest,
    Subscribe,
    Unlink,
    Unsubscribe,
    Welcome,
    parse_answer,
    slow_consumer_policy,
)
from .control import Message as ControlMessage
from .errors import AuthError, BadRequest, ConfigError, ConnectionClosed, DcpError, DcpTimeout, ProtocolError, RemoteError, RoutingError
from .routing import KeyLayout, bitmap_of, encode
from .tls import client_context
from .wire import (
    DEFAULT_HOPS,
    ControlFrame,
    DataEncoder,
    DataFrame,
    Decoder,
    Limits,
    Payload,
    Rejected,
    encode_control,
    uncopied,
)

__all__ = ["connect", "Connect", "Connection", "Message", "Status", "Backoff", "DEFAULT_URL"]

log = logging.getLogger(__name__)

DEFAULT_URL = "dcp://127.0.0.1:7400"
OVERFLOW_POLICIES = ("pause", "drop-newest", "drop-oldest", "drop")
R = TypeVar("R", bound=Reply)
T = TypeVar("T")

#: A received data frame: ``topic``, ``payload``, ``route``, ``hops``, ``msg_id``,
#: ``timestamp_ns``, ``flags``.
Message = DataFrame


class Status(enum.Enum):
    """What a connection is doing (``conn.status``): connecting for the first time, open,
    reconnecting after a loss, closing (``drain()`` under way), or closed for good."""

    CONNECTING = "connecting"
    OPEN = "open"
    RECONNECTING = "reconnecting"
    CLOSING = "closing"  # drain() under way: no new frame is taken
    CLOSED = "closed"


_OPEN = Status.OPEN


class _Writer(CoalescedWriter):
    """A coalesced writer that can give back what it has not written yet: a broker
    going away reads nothing more, so that much can still go to the next one."""

    __slots__ = ()

    def take(self) -> bytearray:
        """What is queued and not yet handed to the transport; nothing is queued after."""
        unsent, self._buf = self._buf, bytearray()
        return unsent

    @property
    def queued(self) -> int:
        return len(self._buf)


def parse_url(url: str) -> tuple[str, str, int]:
    """``dcp://HOST:PORT``, ``dcps://HOST:PORT`` (TLS) or a bare ``HOST:PORT`` ->
    (scheme, host, port); the scheme of a bare one is ""."""
    parts = urlsplit(url if "://" in url else f"dcp://{url}")
    if parts.scheme not in ("dcp", "dcps") or not parts.hostname or parts.port is None:
        raise ConfigError(f"broker URL must look like dcp://HOST:PORT (or dcps:// for TLS), got {url!r}")
    return parts.scheme if "://" in url else "", parts.hostname, parts.port


def tls_context(url: str, context: ssl.SSLContext | None = None, ca: str | None = None) -> ssl.SSLContext | None:
    """What a connection to ``url`` verifies its server with; None: plain TCP.

    TLS is for ``dcps://`` URLs, and bare ``HOST:PORT`` ones given ``context`` or
    ``ca``: ``context`` as it is, or a default one trusting ``ca`` (a CA file), or the
    system's CAs.

    Raises:
        ConfigError: a ``dcp://`` URL with ``context`` or ``ca``; both given; a bad CA file.
    """
    scheme = parse_url(url)[0] or ("dcps" if context is not None or ca else "dcp")
    if context is not None and ca:
        raise ConfigError("give ssl (a context) or tls_ca (a CA file), not both")
    if scheme == "dcp":
        if context is not None or ca:
            raise ConfigError(f"TLS settings given for the plain URL {url!r}; use dcps:// for TLS")
        return None
    return context or client_context(ca)


def refused(exc: BaseException) -> TypeGuard[RemoteError]:
    """Whether ``exc`` is a server refusing our token: trying again will not help."""
    return isinstance(exc, RemoteError) and exc.code in REFUSALS


class _ClientProtocol(asyncio.BufferedProtocol):
    """Feeds the socket to the decoder and hands the events to the Connection; the
    socket reads into the decoder's buffers (a large payload straight into its own)."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.decoder = Decoder(conn.limits)
        self.transport: asyncio.Transport | None = None
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # a stream connection's transport
        no_delay(transport)
        self.transport.set_write_buffer_limits(high=self.conn.write_buffer_bytes)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.decoder.get_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        try:
            events = self.decoder.buffer_updated(nbytes)
        except ProtocolError as exc:
            log.error("broker sent an invalid stream: %s; closing", safe(exc))
            assert self.transport is not None
            self.transport.abort()
            return
        conn = self.conn
        on_message = conn.on_message
        for event in events:
            if type(event) is DataFrame:
                if on_message is None:
                    conn._deliver(event)
                    continue
                conn.received += 1
                try:
                    on_message(event)
                except Exception:
                    conn._callback_failed()
            elif type(event) is ControlFrame:
                conn._on_control(event.body)
            elif isinstance(event, Rejected):
                log.warning("skipped a frame from the broker: %s", safe(event.error))

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.conn._lost(self, exc)

    def pause_writing(self) -> None:
        self.conn._pause_writing()

    def resume_writing(self) -> None:
        self.conn._resume_writing()


class Connection:
    """An attachment to a broker.  Create it with :func:`connect`, whose docstring says
    what each option does; ``Connection(...)`` takes the same ones and does not open."""

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        name: str = "",
        role: str = "agent",
        reconnect: bool | Backoff = True,
        failover: bool = False,
        max_pending: int = 10_000,
        overflow: str = "pause",
        request_timeout_s: float = 5.0,
        connect_timeout_s: float = 5.0,
        write_buffer_bytes: int = 1024 * 1024,
        hops: int = DEFAULT_HOPS,
        slow_consumer: str | None = None,
        token: str | Callable[[], str | None] | None = None,
        ssl: ssl.SSLContext | None = None,
        tls_ca: str | None = None,
        limits: Limits | None = None,
        on_open: Callable[[Connection], Awaitable[None]] | None = None,
        on_push: Callable[[ControlMessage], None] | None = None,
        on_message: Callable[[Message], object] | None = None,
        intercept: Callable[[Message], bool] | None = None,
    ) -> None:
        if overflow not in OVERFLOW_POLICIES:
            raise ConfigError(f"overflow must be one of {', '.join(OVERFLOW_POLICIES)}; got {overflow!r}")
        if max_pending < 1:
            raise ConfigError("max_pending must be at least 1")
        self.url = url
        self.address = parse_url(url)[1:]
        #: The TLS context (``dcps://``); None: plain TCP.
        self.ssl = tls_context(url, ssl, tls_ca)
        #: Sent in every hello: a token, or a function making one (called at every hello).
        self.token = token
        self.name = name
        self.role = role
        self.backoff: Backoff | None = Backoff() if reconnect is True else (reconnect or None)
        #: A going_away ends the connection (the owner moves to another broker) instead of redialling.
        self.failover = failover
        self.max_pending = max_pending
        self.overflow = "drop-newest" if overflow == "drop" else overflow
        self.on_open = on_open
        self.on_push = on_push
        #: Called with every data frame as it is decoded, instead of queueing it.
        self.on_message = on_message
        #: Sees each data frame before it is queued, as it is decoded; True: it took the
        #: frame (a DataAgent takes the replies to its requests there, so that a handler
        #: awaiting one is not waiting behind itself in the queue).
        self.intercept = intercept
        #: Exceptions the ``on_message`` callback raised (each logged; the frame is consumed).
        self.callback_errors = 0
        self.request_timeout_s = request_timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.write_buffer_bytes = write_buffer_bytes
        self.hops = hops
        #: What the broker does with frames for us when we fall behind (None: its default).
        self.slow_consumer = None if slow_consumer is None else slow_consumer_policy(slow_consumer)
        self.limits = limits or Limits()
        #: The most this client takes, whatever a server announces (its welcome may lower it).
        self.own_limits = self.limits
        self._warned_cleartext = False
        #: The port this attachment got (it can change after a reconnect).
        self.port: int | None = None
        #: The broker's prime key (the root of its key layout).
        self.broker_key: int | None = None
        #: All the broker's keys (:meth:`route_to` builds topology numbers with them).
        self.broker_layout: KeyLayout | None = None
        #: The broker's mode, "stateless" or "stateful".
        self.broker_mode: str | None = None
        #: The broker forwards only routes the orchestrator signed (``--verify-routes``): publish() needs a tag.
        self.broker_verifies_routes = False
        self.status = Status.CONNECTING
        self.published = 0
        self.received = 0
        #: Frames dropped here because the queue was full (the drop overflow policies).
        self.dropped = 0
        #: Connections made, the first included.
        self.connects = 0
        #: The broker said ``going_away`` (a shutdown or a restart) on the last connection.
        self.went_away = False
        #: The last error frame the broker sent without a request (on this connection).
        self.last_error: dict[str, Any] | None = None
        self._encoder = DataEncoder(self.limits)
        self._protocol: _ClientProtocol | None = None
        self._transport: asyncio.Transport | None = None
        self._writer: _Writer | None = None
        self._queue: deque[Message] = deque()
        self._reading_paused = False
        self._waiter: asyncio.Future[None] | None = None
        self._writable: asyncio.Future[None] | None = None
        self._emptied: asyncio.Future[None] | None = None  # a flush() waits for the socket buffer to empty
        self._flushers = 0  # flush() calls waiting on _emptied
        self._carried = bytearray()  # frames a broker going away did not get: written first at the reconnect
        self._opened: asyncio.Event | None = None
        self._requests: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._request_ids = itertools.count(1)
        self._msg_ids = itertools.count(1)
        self._subscriptions: set[str] = set()
        self._reconnector: asyncio.Task[None] | None = None
        self._close_reason: BaseException | None = None
        self._user_closed = False

    # -- opening and closing -------------------------------------------------

    async def open(self, retry: bool = False) -> None:
        """Connect and attach.

        The first time, a refused connect raises, unless ``retry``: then the reconnect
        backoff applies from the start (for a peer that may not be up yet).
        """
        self._opened = asyncio.Event()
        delays = self.backoff.delays() if retry and self.backoff is not None else iter(())
        while True:
            try:
                await self._attach()
                return
            except (OSError, ProtocolError, ConnectionClosed, RemoteError, DcpTimeout) as exc:
                delay = next(delays, None)
                if delay is None or self._user_closed or refused(exc):
                    raise
                log.info("cannot reach %s:%d yet (%s); retrying", *self.address, safe(exc))
                await asyncio.sleep(delay)
                if self._user_closed:
                    raise self._closed("is closed") from None
                self.status = Status.CONNECTING

    async def _attach(self) -> None:
        loop = asyncio.get_running_loop()
        host, port = self.address
        self.last_error = None  # of this connection: a refusal may come before our hello
        try:
            transport, protocol = await asyncio.wait_for(
                loop.create_connection(lambda: _ClientProtocol(self), host, port, ssl=self.ssl),
                self.connect_timeout_s,
            )
        except asyncio.TimeoutError:
            raise DcpTimeout(f"no connection to {host}:{port} within {self.connect_timeout_s} s") from None
        except ssl.SSLError as exc:
            if exc.reason == "WRONG_VERSION_NUMBER":
                hint = "not a TLS server? use dcp://"
            else:  # a certificate that does not verify says why
                hint = getattr(exc, "verify_message", None) or exc.reason
            raise ConnectionClosed(f"TLS with {host}:{port} failed: {hint or exc}") from None
        except OSError as exc:  # the same error (ConnectionRefusedError ...), saying where: "Connection refused" alone does not
            raise type(exc)(exc.errno, f"cannot connect to {host}:{port}: {exc.strerror or exc}") from None
        self._transport = transport
        self._writer = _Writer(transport)
        self._protocol = protocol
        try:
            token = self.token() if callable(self.token) else self.token
            if token and self.ssl is None and not self._warned_cleartext:
                peername = transport.get_extra_info("peername")
                self._warned_cleartext = warn_cleartext_token(log, peername[0] if peername else host, f"connection to {self.url}")
            hello = Hello(name=self.name, role=self.role, slow_consumer=self.slow_consumer, token=token or None)
            welcome = await self.call(hello)
        except ConnectionClosed:
            transport.abort()
            refusal = self.last_error
            if refusal is not None and refusal.get("fatal"):  # said why before it read the hello (too_many_connections)
                raise RemoteError(refusal.get("code", ""), refusal.get("message", "")) from None
            hint = "" if self.ssl else " (a TLS server? use dcps://)"
            raise ConnectionClosed(f"{host}:{port} closed the connection before answering hello{hint}") from None
        except BaseException:
            transport.abort()
            raise
        try:
            layout = _layout_of(welcome)
        except RoutingError as exc:
            transport.abort()
            raise ConnectionClosed(f"{host}:{port} answered hello with keys that route nothing: {exc}") from None
        self.port = welcome.port
        self.broker_key = welcome.key
        self.broker_layout = layout
        self.broker_mode = welcome.mode
        self.broker_verifies_routes = bool(welcome.verify_routes)
        self.limits = _adopted(self.own_limits, welcome)
        self._encoder = DataEncoder(self.limits)
        for topic in sorted(self._subscriptions):
            await self.call(Subscribe(topic=topic))
        if self.on_open is not None:
            await self.on_open(self)
        if self._carried:  # published before the last broker went away, ahead of what waits now
            carried, self._carried = self._carried, bytearray()
            self._writer.write_uncopied(carried)
        self.connects += 1
        self.went_away = False
        self.status = Status.OPEN
        assert self._opened is not None
        self._opened.set()
        log.debug("attached to %s:%d as port %s", host, port, self.port)

    async def wait_connected(self, timeout: float | None = None) -> None:
        """Wait until the connection is open (again, after a reconnect).

        Raises:
            ConnectionClosed: it is closed for good.
            DcpTimeout: not open within ``timeout`` seconds.
        """
        try:
            await asyncio.wait_for(self._until_open(), timeout)
        except asyncio.TimeoutError:
            raise DcpTimeout(f"not connected to {self.url} within {timeout} s") from None

    def _closed(self, what: str) -> ConnectionClosed:
        """The error of a connection that ``what`` ("is closed"), naming the server: a caller may hold several."""
        return ConnectionClosed(f"the connection to {self.url} {what}")

    async def _until_open(self) -> None:
        while self.status is not Status.OPEN:
            if self.status is Status.CLOSING:
                raise self._closed("is draining (drain() was called): it takes no new frame")
            if self.status is Status.CLOSED:
                raise self._closed("is closed") from self._close_reason
            assert self._opened is not None
            await self._opened.wait()

    async def close(self) -> None:
        """Close the connection; idempotent.  Written frames are flushed first."""
        self._user_closed = True
        if self.status is Status.CLOSED:
            return
        self.status = Status.CLOSED
        self._close_reason = None
        if self._reconnector is not None:
            self._reconnector.cancel()
        if self._transport is not None and not self._transport.is_closing():
            assert self._writer is not None
            self._writer.flush()
            self._transport.close()
        self._wake_all(self._closed("is closed"))

    async def drain(self, timeout: float | None = None) -> None:
        """Close gracefully: take no new frame, write out what is buffered, wait until
        the OS has it all (see :meth:`flush`), then close; idempotent.  From the call on,
        ``publish()`` raises.  A connection that is not open (reconnecting) has nothing
        in a socket to hand over: it just closes, and the publishes waiting for the
        reconnect raise.

        Raises:
            DcpTimeout: not all written within ``timeout`` seconds; it is closed all the same.
            ConnectionClosed: lost before all was written.
        """
        if self.status is Status.OPEN:
            self.status = Status.CLOSING
        elif self.status is not Status.CLOSING:  # a second drain() joins the first
            await self.close()
            return
        try:
            await self.flush(timeout)
        finally:
            await self.close()

    async def flush(self, timeout: float | None = None) -> None:
        """Wait until every frame published so far is handed to the OS: nothing is left
        in this process, neither in the coalescing buffer nor in the transport's.
        Publishes wait meanwhile (a steady publisher would otherwise keep the buffer
        from ever emptying); a connection that is reconnecting is waited for first.

        Raises:
            DcpTimeout: not all written within ``timeout`` seconds; the rest stays queued.
            ConnectionClosed: the connection is closed, or was lost before all was written.
        """
        try:
            await asyncio.wait_for(self._written(), timeout)
        except asyncio.TimeoutError:
            raise DcpTimeout(f"what was published to {self.url} was not all written within {timeout} s") from None

    async def _written(self) -> None:
        if self.status is not Status.CLOSING:  # a drain writes out what is there; else wait out a reconnect
            await self._until_open()
        transport, writer = self._transport, self._writer
        if transport is None or writer is None:
            raise self._closed("was lost before what was published was written")
        writer.flush()
        if not transport.get_write_buffer_size():
            return
        if self._emptied is None:
            self._emptied = asyncio.get_running_loop().create_future()
            # No high-water mark: the transport calls pause_writing now, and resume_writing
            # once its buffer is empty (the low-water mark is 0 too), when _resume_writing wakes us.
            transport.set_write_buffer_limits(high=0)
        self._flushers += 1
        try:
            await asyncio.shield(self._emptied)
        finally:
            self._flushers -= 1
            if not self._flushers and self._emptied is not None:  # the last waiter gave up (a timeout)
                self._emptied = None
                if not transport.is_closing():
                    transport.set_write_buffer_limits(high=self.write_buffer_bytes)

    async def __aenter__(self) -> Connection:
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.close()

    # -- publishing -----------------------------------------------------------

    async def publish(
        self,
        topic: str,
        payload: Payload,
        route: int = 0,
        *,
        hops: int | None = None,
        tag: bytes | None = None,
    ) -> int:
        """Send one data frame; return its message id.

        ``payload`` is any C-contiguous buffer (bytes, bytearray, memoryview, a numpy
        array...) or a tuple of them sent back to back (:func:`dcp.arrays.pack` makes
        one for an array).  A payload over 8 KiB is not copied: the socket reads it
        from where it is, so it must not change until written (``await flush()``).

        ``route`` is the topology number X (stateless mode); a stateful broker routes
        by ``topic``.  ``tag`` is the route tag the orchestrator signed X with, for
        brokers that verify routes (``--verify-routes``).  Waits only while the connection is reconnecting or its output
        buffer is full.  A small frame goes out at the end of the current event-loop
        iteration, with the others published in it; ``await ping()`` returns once the
        broker has read everything published before it.

        Raises:
            ConnectionClosed: the connection is closed for good.
            LocalProtocolError: the frame breaks a limit (topic, size, X bits), or the
                payload is not a C-contiguous buffer.
            AuthError: ``route_unsigned``: no ``tag``, and the broker verifies routes; it
                would drop the frame, telling only its log and ours.
        """
        if self.status is not _OPEN:  # a module constant: an Enum member lookup costs a publish 80 ns
            await self._until_open()
        while self._writable is not None:
            await asyncio.shield(self._writable)
            if self.status is not Status.OPEN:
                await self._until_open()
        if tag is None and self.broker_verifies_routes:
            raise AuthError(
                "route_unsigned", f"{self.url} verifies routes (--verify-routes) and would drop this frame: publish it with "
                "tag=, the orchestrator's signature of the route (a DataAgent gets it with the route)",
            )
        msg_id = next(self._msg_ids)
        if type(payload) is bytes:
            size = len(payload)
        else:
            payload, size = uncopied(payload)
        head, tail = self._encoder.head(topic, size, route, self.hops if hops is None else hops, msg_id, time.time_ns(), 0, tag)
        writer = self._writer
        assert writer is not None
        writer.write_frame(head, tail, payload, size)
        self.published += 1
        return msg_id

    def _pause_writing(self) -> None:
        if self._writable is None:
            self._writable = asyncio.get_running_loop().create_future()

    def _resume_writing(self) -> None:
        writable, self._writable = self._writable, None
        if writable is not None and not writable.done():
            writable.set_result(None)
        emptied, self._emptied = self._emptied, None
        if emptied is not None:  # flush() set both water marks to 0: the buffer is empty
            emptied.set_result(None)
            if self._transport is not None and not self._transport.is_closing():
                self._transport.set_write_buffer_limits(high=self.write_buffer_bytes)

    # -- receiving ----------------------------------------------------------------

    def messages(self) -> AsyncIterator[Message]:
        """Iterate over received data frames until the connection is closed.

        Raises:
            ConfigError: the connection hands its frames to ``on_message`` instead.
        """
        self._check_queued()
        return _Messages(self)

    def batches(self) -> AsyncIterator[list[Message]]:
        """Iterate over received data frames a list at a time: each list holds every
        frame waiting when it is taken (at least one, at most ``max_pending``), in
        order, until the connection is closed.  The same frames as :meth:`messages`,
        with one wake-up per batch instead of one per frame.

        Raises:
            ConfigError: the connection hands its frames to ``on_message`` instead.
        """
        self._check_queued()
        return _Batches(self)

    def _check_queued(self) -> None:
        if self.on_message is not None:
            raise ConfigError("this connection hands every frame to on_message; it queues none to iterate over")

    async def next_message(self, timeout: float | None = None) -> Message:
        """The next received frame.

        Raises:
            DcpTimeout: none came within ``timeout`` seconds.
            ConnectionClosed: the connection closed and no frame is left.
            ConfigError: the connection hands its frames to ``on_message`` instead.
        """
        self._check_queued()
        try:
            return await asyncio.wait_for(self._next(), timeout)
        except asyncio.TimeoutError:
            raise DcpTimeout(f"no message from {self.url} within {timeout} s") from None

    def route_to(self, *ports: int) -> int:
        """The topology number that sends a frame to these ports of this connection's broker
        (what the orchestrator computes across brokers; here for one broker, by hand).

        Raises:
            DcpError: not connected to a stateless broker yet; RoutingError: a port out of range.
        """
        if self.broker_layout is None:
            raise DcpError("route_to needs a connection to a stateless broker: its welcome gives the keys")
        return encode(self.broker_layout.residues(bitmap_of(ports)))

    @property
    def pending(self) -> int:
        """Frames received and not yet consumed."""
        return len(self._queue)

    @property
    def unwritten(self) -> int:
        """Bytes published (or requested) and not yet handed to the OS: what :meth:`flush` waits for."""
        writer, transport = self._writer, self._transport
        if writer is None or transport is None:
            return len(self._carried)
        return writer.queued + transport.get_write_buffer_size()

    async def _next(self) -> Message:
        await self._wait_queued()
        message = self._queue.popleft()
        self._resume_reading()
        return message

    async def _next_batch(self) -> list[Message]:
        await self._wait_queued()
        queue = self._queue
        batch = list(queue)
        queue.clear()
        self._resume_reading()
        return batch

    async def _wait_queued(self) -> None:
        """Until a frame is queued; raises ConnectionClosed once closed with none left."""
        queue = self._queue
        while not queue:
            if self.status is Status.CLOSED:
                raise self._closed("is closed") from self._close_reason
            waiter = self._waiter = asyncio.get_running_loop().create_future()
            try:
                await waiter
            finally:
                self._waiter = None

    def _resume_reading(self) -> None:
        if self._reading_paused and len(self._queue) <= self.max_pending // 2:
            self._reading_paused = False
            if self._transport is not None and not self._transport.is_closing():
                self._transport.resume_reading()

    def _deliver(self, frame: Message) -> None:
        if self.intercept is not None and self.intercept(frame):
            self.received += 1
            return
        queue = self._queue
        if len(queue) >= self.max_pending:
            if self.overflow == "drop-newest":
                self.dropped += 1
                return
            if self.overflow == "drop-oldest":
                queue.popleft()
                self.dropped += 1
                queue.append(frame)
                self.received += 1
                return
            if not self._reading_paused and self._transport is not None:
                self._reading_paused = True
                self._transport.pause_reading()
        queue.append(frame)
        self.received += 1
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _callback_failed(self) -> None:
        """The ``on_message`` callback raised: counted, and logged with its traceback
        the 1st, 2nd, 4th, 8th ... time, so a callback failing on every frame cannot
        flood the log."""
        self.callback_errors += 1
        count = self.callback_errors
        if not count & (count - 1):
            log.error("on_message callback raised (%d so far); the connection carries on", count, exc_info=True)

    # -- requests -----------------------------------------------------------------

    async def ping(self) -> float:
        """Round-trip time to the broker, seconds."""
        start = time.perf_counter()
        await self.call(Ping())
        return time.perf_counter() - start

    async def subscribe(self, topic: str) -> None:
        """Stateful mode: ask the broker to send this topic here (kept over reconnects).

        Raises:
            RemoteError: the broker refused (e.g. ``wrong_mode`` on a stateless broker).
        """
        await self.call(Subscribe(topic=topic))
        self._subscriptions.add(topic)

    async def unsubscribe(self, topic: str) -> None:
        """Stateful mode: stop sending ``topic`` here (and no longer restore it after a reconnect)."""
        await self.call(Unsubscribe(topic=topic))
        self._subscriptions.discard(topic)

    async def set_slow_consumer(self, policy: str) -> None:
        """Change what the broker does with frames for this port when we fall behind
        ("drop-newest", "drop-oldest" or "pause"); kept for the hello of reconnects,
        also when this request fails for want of a connection."""
        self.slow_consumer = slow_consumer_policy(policy)
        await self.call(SlowConsumerRequest(slow_consumer=self.slow_consumer))

    async def stats(self) -> dict[str, Any]:
        """The broker's counters (see ``dcp stats``)."""
        return (await self.call(StatsRequest())).stats

    async def link(self, peer: str, wait: float | None = None) -> dict[str, Any]:
        """Admin: make the broker link to the broker at ``peer`` (``HOST:PORT``).

        Returns the link's stats (its ``port`` here, and once up its ``remote_port``
        and ``remote_key``).  With ``wait``, the reply comes once the link is up, or
        fails after ``wait`` seconds; the request timeout is stretched to match.

        Raises:
            RemoteError: ``bad_link`` (bad address, no free port, stateful mode),
                ``link_refused`` (the peer refused it in a way that cannot heal, such as
                a shared key: the broker no longer redials), ``link_timeout`` or ``not_admin``.
        """
        reply = await self.call(Link(peer=peer, wait=wait), timeout=None if wait is None else wait + self.request_timeout_s)
        return reply.link

    async def unlink(self, port: int) -> None:
        """Admin: close the broker's link on ``port`` for good and free both ends."""
        await self.call(Unlink(port=port))

    async def call(self, request: Request[R], timeout: float | None = None) -> R:
        """Send ``request`` (a :mod:`dcp.control` message) and return its reply, checked.

        Raises:
            RemoteError: the peer answered with an error frame.
            BadRequest: the reply is not the one ``request`` expects, or a field of it is malformed.
            DcpTimeout: no answer within ``timeout`` (default ``request_timeout_s``).
            ConnectionClosed: not connected, or lost before the answer.
        """
        reply = request.reply.from_body(await self._request(request.to_body(), timeout))
        return reply  # type: ignore[return-value]  # request.reply is R (Request.__init_subclass__)

    async def request(self, body: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
        """Send the control frame ``body`` (an ``op`` and its fields) and return the reply,
        as it came once checked (:func:`dcp.control.parse_answer`); see :meth:`call`.

        Raises:
            RemoteError, BadRequest, DcpTimeout, ConnectionClosed: as :meth:`call`.
        """
        reply = await self._request(body, timeout)
        parse_answer(reply)
        return reply

    def send(self, body: dict[str, Any]) -> None:
        """Send the control frame ``body`` (a message's ``to_body()``) with no reply expected;
        dropped if not connected."""
        if self._writer is not None and self._transport is not None and not self._transport.is_closing():
            self._writer.write_uncopied(encode_control(body))

    async def _request(self, body: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
        if self._transport is None or self._transport.is_closing():
            raise self._closed("is not open")
        request_id = next(self._request_ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._requests[request_id] = future
        assert self._writer is not None
        self._writer.write_uncopied(encode_control({**body, "id": request_id}))
        timeout = timeout or self.request_timeout_s
        try:
            return await asyncio.wait_for(future, timeout)
        except asyncio.TimeoutError:
            raise DcpTimeout(f"{self.url} did not answer {body['op']!r} within {timeout} s") from None
        finally:
            self._requests.pop(request_id, None)

    def _on_control(self, body: dict[str, Any]) -> None:
        """An answer to a pending request resolves it (checked by the requester); anything
        else is checked here: a malformed one is logged and ignored."""
        re = body.get("re")
        if re is not None:
            future = self._requests.get(re) if UINT.accepts(re) else None
            if future is None or future.done():
                log.debug("ignored an answer to no pending request (%s, re=%r)", safe(body["op"]), re)
            elif body["op"] == ERROR:
                future.set_exception(_remote_error(body))
            else:
                future.set_result(body)
            return
        try:
            message = parse_answer(body)
        except BadRequest as exc:
            log.warning("ignored a malformed control frame from %s:%d: %s", *self.address, safe(exc))
            return
        if isinstance(message, Error):
            self.last_error = body
            level = logging.ERROR if message.fatal else logging.WARNING
            log.log(level, "broker error %s: %s (x%s)", safe(message.code), safe(message.message, 1024), message.count or 1)
        elif isinstance(message, GoingAway):
            self._leave()
        elif self.on_push is not None:
            self.on_push(message)

    # -- losing the connection -------------------------------------------------------

    def _lost(self, protocol: _ClientProtocol, exc: Exception | None) -> None:
        if protocol is not self._protocol:
            return
        self._transport = None
        self._writer = None  # what it still held is lost with the connection (at most once)
        self._reading_paused = False
        if self._emptied is not None:  # a flush() waits for bytes that will never be written
            self._emptied.set_exception(self._closed("was lost before what was published was written"))
            self._emptied = None
        self._resume_writing()
        for future in self._requests.values():
            if not future.done():
                future.set_exception(self._closed("was lost before the answer"))
        if self.status is Status.CLOSED or self.status is Status.RECONNECTING:
            return  # closed for good, or an attempt of the reconnect loop failed: the loop goes on
        if self.backoff is None or self.status is Status.CONNECTING or self.status is Status.CLOSING:
            self._end(exc or self._closed("was closed by the server"))
            return
        log.warning("lost %s:%d (%s); reconnecting", *self.address, exc or "closed by broker")
        self._start_reconnecting()

    def _leave(self) -> None:
        """The broker is going away: it reads nothing after its going_away, and closes.
        Nothing more is written to it.  With ``failover`` the connection ends here; else
        it redials with the backoff (the broker may be restarting), and what was not
        written yet goes first on the new connection."""
        transport, writer = self._transport, self._writer
        if self.status is not Status.OPEN or transport is None or writer is None:
            return  # attaching (that attempt fails), or draining (the rest is lost with it)
        self.went_away = True
        unsent = writer.take()
        transport.abort()  # nothing more comes on it; connection_lost fails the requests waiting
        if self.failover or self.backoff is None:
            log.info("%s:%d is going away; the connection ends", *self.address)
            self._end(self._closed("ended: its server is going away"))
            return
        log.info("%s:%d is going away; redialling it with the backoff, %d bytes kept for it", *self.address, len(unsent))
        self._carried = unsent
        self._start_reconnecting()

    def _start_reconnecting(self) -> None:
        self.status = Status.RECONNECTING
        assert self._opened is not None
        self._opened.clear()
        self._reconnector = asyncio.get_running_loop().create_task(self._reconnect())

    def _end(self, reason: BaseException) -> None:
        """Closed for good, not by us: whoever waits is woken, and is told ``reason``."""
        self.status = Status.CLOSED
        self._close_reason = reason
        self._carried = bytearray()
        self._wake_all(reason)

    async def _reconnect(self) -> None:
        assert self.backoff is not None
        for delay in self.backoff.delays():
            await asyncio.sleep(delay)
            if self.status is Status.CLOSED:
                return
            try:
                await self._attach()
                log.info("reconnected to %s:%d as port %s", *self.address, self.port)
                return
            except (OSError, ProtocolError, ConnectionClosed, RemoteError, DcpTimeout) as exc:
                if refused(exc):
                    log.error("%s:%d refused our token (%s); not reconnecting", *self.address, safe(exc))
                    self._end(exc)
                    return
                log.debug("reconnect to %s:%d failed: %s", *self.address, safe(exc))
        self._end(ConnectionClosed(f"gave up reconnecting to {self.url}"))

    def _wake_all(self, exc: BaseException) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)
            self._writable = None
        if self._opened is not None:
            self._opened.set()


def _adopted(own: Limits, welcome: Welcome) -> Limits:
    """The limits to use with a server: what its welcome announces, but never more than
    ``own`` (a server announcing more is clamped, not trusted)."""
    max_frame = min(welcome.max_frame or own.max_frame, own.max_frame)
    return Limits(
        max_frame=max_frame,
        max_topic=min(welcome.max_topic or own.max_topic, own.max_topic),
        max_x_bits=min(welcome.max_x_bits or own.max_x_bits, own.max_x_bits),
        max_control=min(own.max_control, max_frame),
    )


def _remote_error(body: dict[str, Any]) -> RemoteError | BadRequest:
    """What a request answered with ``body``, an error frame, raises."""
    try:
        error = Error.from_body(body)
    except BadRequest as exc:
        return exc
    return RemoteError(error.code, error.message)


class _Messages:
    """``async for`` over a connection's frames; ends when the connection is closed."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn

    def __aiter__(self) -> _Messages:
        return self

    def __anext__(self) -> Awaitable[Message]:
        conn = self._conn
        if conn._queue and not conn._reading_paused:  # no coroutine needed
            future = asyncio.get_running_loop().create_future()
            future.set_result(conn._queue.popleft())
            return future
        return self._wait()

    async def _wait(self) -> Message:
        return await _or_end(self._conn, self._conn._next())


class _Batches:
    """``async for`` over a connection's frames, a list at a time; ends when it is closed."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn

    def __aiter__(self) -> _Batches:
        return self

    async def __anext__(self) -> list[Message]:
        return await _or_end(self._conn, self._conn._next_batch())


async def _or_end(conn: Connection, taking: Awaitable[T]) -> T:
    """What ``taking`` returns; the end of an iteration once ``conn`` is closed by us."""
    try:
        return await taking
    except ConnectionClosed:
        if conn._close_reason is None:  # closed by us: the iteration simply ends
            raise StopAsyncIteration from None
        raise


class Connect:
    """What :func:`connect` returns: ``await`` it, or ``async with`` it."""

    def __init__(self, connection: Connection) -> None:
        self.connection = connection

    def __await__(self) -> Generator[Any, None, Connection]:
        return self._open().__await__()

    async def _open(self) -> Connection:
        await self.connection.open()
        return self.connection

    async def __aenter__(self) -> Connection:
        return await self._open()

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.connection.close()


def connect(
    url: str = DEFAULT_URL,
    *,
    name: str = "",
    role: str = "agent",
    reconnect: bool | Backoff = True,
    failover: bool = False,
    max_pending: int = 10_000,
    overflow: str = "pause",
    request_timeout_s: float = 5.0,
    connect_timeout_s: float = 5.0,
    write_buffer_bytes: int = 1024 * 1024,
    hops: int = DEFAULT_HOPS,
    slow_consumer: str | None = None,
    token: str | Callable[[], str | None] | None = None,
    ssl: ssl.SSLContext | None = None,
    tls_ca: str | None = None,
    limits: Limits | None = None,
    on_open: Callable[[Connection], Awaitable[None]] | None = None,
    on_push: Callable[[ControlMessage], None] | None = None,
    on_message: Callable[[Message], object] | None = None,
    intercept: Callable[[Message], bool] | None = None,
) -> Connect:
    """Attach to the broker at ``url``: ``await`` the result, or ``async with`` it.

    The options are :class:`Connection`'s; they are checked here, at the call.

    Args:
        url: ``dcp://HOST:PORT``; ``dcps://HOST:PORT`` connects over TLS.
        name: who we are, in the broker's logs and stats (an agent token must be issued to it).
        role: ``agent`` (takes a port: publishes and receives), ``admin`` (``stats``,
            ``link``, ``unlink``), or ``peer`` (a broker's link).
        reconnect: True (the default :class:`Backoff`), False, or a :class:`Backoff`.
            A broker's ``going_away`` (it is shutting down) is a loss too: publishes
            wait from that frame on, and the broker is redialled with the backoff (it
            may be restarting) rather than at once; what had not been written to it
            yet is written first on the new connection.  One URL only: a stateless
            topology number names ports of one broker, so moving to another is for
            an owner that gets new numbers (``failover``, :class:`dcp.DataAgent`).
        failover: the owner moves to another broker by itself: a ``going_away`` ends
            this connection at once (the iterators and waiting publishes raise
            :class:`ConnectionClosed`), the broker that is leaving is not redialled,
            and what had not been written to it is dropped (numbers computed for it
            mean nothing elsewhere).
        max_pending: received frames held before ``overflow`` applies.
        overflow: when ``max_pending`` frames wait: ``pause`` (stop reading the socket),
            ``drop-newest`` (or ``drop``) or ``drop-oldest`` (counted in ``dropped``).
        request_timeout_s: how long a request waits for its reply.
        connect_timeout_s: how long a connection attempt may take.
        write_buffer_bytes: the socket's output buffer above which a publish waits.
        hops: the hop limit of published frames.
        slow_consumer: the broker's policy for our port when we fall behind:
            ``drop-newest``, ``drop-oldest`` or ``pause``; None: the broker's default.
        token: sent in every hello, for servers started with ``--require-token``: a
            string, or a function returning one; a refusal raises :class:`RemoteError`
            with its code (``token_expired`` ...) and is never retried.
        ssl: an ``ssl.SSLContext`` for a ``dcps://`` URL (not with ``tls_ca``).
        tls_ca: a CA file to verify the ``dcps://`` server with; default: the system's CAs.
        limits: the frame limits to start with; the broker's welcome sets them.
        on_open: awaited after every (re)connect, before the connection counts as open
            (re-register there).
        on_push: called with every control message, checked, that is not a reply, an
            error or ``going_away``: the orchestrator's pushes (:mod:`dcp.control`).
        on_message: called with every data frame as it is decoded, in order, instead
            of queueing it for :meth:`Connection.messages`: the cheapest way to
            receive.  It must not block; what it raises is logged and counted in
            ``callback_errors``.  ``max_pending`` and ``overflow`` do not apply (there
            is no queue); the broker's slow-consumer policy still does.
        intercept: sees each data frame as it is decoded, before it is queued; when it
            returns True it took the frame, which is not queued (a :class:`dcp.DataAgent`
            takes the replies to its requests there).  It must not block.

    Raises:
        ConfigError: a bad URL, TLS setting, ``overflow``, ``max_pending`` or ``slow_consumer``.
    """
    return Connect(Connection(
        url, name=name, role=role, reconnect=reconnect, failover=failover, max_pending=max_pending, overflow=overflow,
        request_timeout_s=request_timeout_s, connect_timeout_s=connect_timeout_s,
        write_buffer_bytes=write_buffer_bytes, hops=hops, slow_consumer=slow_consumer, token=token,
        ssl=ssl, tls_ca=tls_ca, limits=limits, on_open=on_open, on_push=on_push, on_message=on_message, intercept=intercept,
    ))


def _layout_of(welcome: Welcome) -> KeyLayout | None:
    """A broker's key layout from its welcome: ``keys`` past 64 ports, else its one key.

    Raises RoutingError: keys that do not fit its port count.
    """
    if welcome.key is None:
        return None
    if welcome.keys is not None:
        return KeyLayout(welcome.ports or 0, welcome.keys)
    return KeyLayout(welcome.ports, [welcome.key]) if welcome.ports else KeyLayout.single(welcome.key)
