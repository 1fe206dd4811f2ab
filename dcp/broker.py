"""The dcp broker: forwards data frames by topology number, or by a topic table.

Data path: ``BrokerConnection.data_received`` hands each read to the connection's
:class:`~dcp.forwarding.Forwarder` (sans-I/O), which decides; this module writes and
counts.  Each run of consecutive frames with the same out bitmap goes to each target
port as one ``write`` of a memoryview slice; payloads are never decoded, and a frame
larger than one read goes out as the reads that carry it, uncopied.

Nothing is buffered without a bound: a connection holds at most one incomplete
frame (its declared length checked first), and a port whose output buffer is past
``out_buffer_bytes`` either loses the frames meant for it (``drop``, counted) or
stops the publishers that feed it until it drains (``pause``).

Bad input closes only the connection that sent it, after an error frame, when the
stream can no longer be trusted (bad version, length over a limit, malformed
control frame); a well-delimited frame that cannot be forwarded (hop limit 0, X over
``max_x_bits``, unknown type) is dropped and counted, and the sender gets a
rate-limited error frame.  A control message (:mod:`dcp.control`) that is well framed
but has a field of the wrong type or range, or that its sender's role may not send
(:data:`dcp.control.BROKER`), gets an error frame and the connection goes on; a bad
hello closes it.

Access is decided once, at hello, never per frame: an admin or peer hello (and, with
``--require-token``, an agent's) without a valid token of its role (:mod:`dcp.auth`)
gets a fatal error frame and the connection is closed unattached; a broker with
neither ``--secret-file`` nor ``--insecure`` refuses to start.  With ``--tls-cert``/``--tls-key`` the port serves
TLS; the data path is the same on a TLS transport.

At start the soft open-file limit is raised to the hard one; a connection accepted
past what that leaves (less :data:`dcp._serving.FD_RESERVE`), or past ``max_connections``,
gets the fatal ``too_many_connections`` and is closed, and the others go on.  Until its hello is accepted a connection may send
frames of ``max_control`` bytes at most (not ``max_frame``), and it has
``hello_timeout_s`` to do so (``hello_timeout``); one peer address and one name
(the token's, where the hello needs one) hold at most ``max_connections_per_address``
and ``max_connections_per_name`` connections (``connection_limit``).  Nothing per attachment or per frame walks the
ports: free ports come from a queue, targets from the set bits of the out bitmap, and
the orchestrator gets the attachments once per registration (chunked within
:data:`REPORT_FRAME_BYTES`), then only what changed, coalesced.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import sys
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from typing import Any, TypeVar, cast

import msgpack

from . import control
from .auth import ORCHESTRATOR_AUDIENCE, RouteVerifier, admit, endpoint, issue_token, load_secret
from .config import BrokerConfig, parse_address
from .daemon_metrics import broker_families, broker_unready, metrics_server
from .errors import AuthError, BadRequest, ConfigError, DcpError, LinkRefused, ProtocolError, RoutingError
from ._guard import safe, warn_cleartext_token
from ._loop import no_delay, open_file_count, raise_open_file_limit
from ._serving import GuardedConnection, Quota, Serving, access_table, pre_hello_limits
from .backoff import Backoff
from .link import Link
from .metrics_http import MetricsServer
from .routing import KeyLayout, int_to_bytes, ports_of
from .tls import client_context, server_context
from .forwarding import DROP_REASONS, Drop, Forwarder, Write
from .wire import DEFAULT_LIMITS, Limits, encode_control

__all__ = ["Broker", "BrokerConnection", "DROP_REASONS"]  # DROP_REASONS: from dcp.forwarding

log = logging.getLogger(__name__)
T = TypeVar("T")

# The out-bitmap -> target ports cache is cleared when it grows past this, so a
# publisher cycling through bitmaps cannot grow the broker's memory.
_TARGET_CACHE_LIMIT = 4096
# At most one non-fatal error frame per error code per connection per interval.
_ERROR_INTERVAL_S = 1.0
# Our own tokens are made afresh for every hello; this long covers clock skew between hosts.
_OWN_TOKEN_TTL_S = 300
#: No report frame to the orchestrator is larger (header included): its max_control.
#: A registration with more attachments than fit is sent as BrokerState, then PortsChanged frames.
REPORT_FRAME_BYTES = DEFAULT_LIMITS.max_control
#: Attach/detach reports are coalesced: at most one PortsChanged flush per this interval.
REPORT_INTERVAL_S = 0.05
#: Every this many seconds a broker reports its links' and attachments' load (Load), only
#: the figures that changed by more than LOAD_CHANGE of themselves and their floor.
LOAD_INTERVAL_S = 1.0
LOAD_CHANGE = 0.25
#: Floors of a significant change: round trip (ms), throughput (bytes/s), queue (bytes).
_LINK_FLOORS = (1.0, 10_000.0, 16_384.0)
_PORT_FLOORS = (16_384.0,)
#: Entries in one Load frame at most (about 60 bytes each: within REPORT_FRAME_BYTES);
#: the rest go in the next interval.
LOAD_ENTRIES = 800
# targets(): a mask with more bits than this is read from its binary string, not bit by bit.
_SPARSE_MASK_BITS = 16


class Broker(Serving):
    """One broker: a listening socket, its ports and counters.

    Use ``await start()``, then ``await serve_forever()`` or ``await close()``.
    """

    def __init__(self, config: BrokerConfig | None = None) -> None:
        self.config = config or BrokerConfig()
        self.layout = KeyLayout.random(self.config.ports, root=self.config.key)  # its keys: one per 64 ports, and a directory
        self.key: int = self.layout.root  # its name on links and to the orchestrator
        self.decoded: dict[int, int] = {}  # X -> the ports it names here (many keys only), bounded by the forwarder
        self.stateless = self.config.mode == "stateless"
        self.limits: Limits = self.config.limits
        self.hello_limits: Limits = pre_hello_limits(self.limits)  # of a connection until its hello is accepted
        self.slow_consumer = control.slow_consumer_policy(self.config.slow_consumer)  # of every port that does not choose its own
        # The brokers' secret, or the orchestrator's (--secret-file): checks route tags and tokens, issues its own
        self.secret = load_secret(self.config.secret_file) if self.config.secret_file else None
        # Who may send which op, and which roles need a token: admins and peers unless --insecure,
        # agents too with --require-token (then before its hello only a hello); no secret, no --insecure: refused
        self.permissions = access_table(control.BROKER, self.config)
        # --verify-routes: checks the orchestrator's tag on every topology number its agents publish,
        # bound to the agent's name and to this broker's root key (links are not checked again)
        self.verifier = RouteVerifier(self.secret, self.key) if self.secret is not None and self.config.verify_routes else None
        # TLS: served with --tls-cert/--tls-key; peers and the orchestrator are dialled with it given --tls-ca
        self.tls_server = server_context(self.config.tls_cert, self.config.tls_key) if self.config.tls_cert else None
        self.tls_client = client_context(self.config.tls_ca) if self.config.tls_ca else None
        self.name = self.config.name
        self.attached = 0  # bitmap of attached ports
        self.reserved = 0  # bitmap of the ports held by links, up or down
        self.links: dict[int, Link] = {}  # port -> link
        self._inbound: dict[tuple[int, int], Link] = {}  # (peer key, peer port) -> link
        self._tasks: set[asyncio.Task[None]] = set()  # control replies that wait
        self._orchestrator: Any = None  # a client Connection to the DO, with --orchestrator
        self._report_due = False  # a BrokerState for a link change is scheduled
        self._links_dirty = False  # a link changed since the last report of the links
        # agent ports changed since the last report: port -> (name reported, name now); None: no agent
        self._changes: dict[int, tuple[str | None, str | None]] = {}
        self._ports_flush: asyncio.Handle | None = None  # the next PortsChanged flush, when scheduled
        self._ports_flushed_at = float("-inf")  # loop time of the last one
        self._load_timer: asyncio.TimerHandle | None = None  # the next Load report
        self._load_at = 0.0  # monotonic time of the last one
        self._load_sent: dict[tuple[bool, int], tuple[float, ...]] = {}  # (is a link, port) -> figures last reported
        self._link_bytes: dict[int, int] = {}  # link port -> its sent_bytes at the last report
        self.table: dict[bytes, int] = {}  # stateful mode: topic -> bitmap of ports
        self.frames_in = 0
        self.bytes_in = 0
        self.frames_out = 0
        self.bytes_out = 0
        self.drops: Counter[str] = Counter({reason: 0 for reason in DROP_REASONS})
        self._ports: list[BrokerConnection | None] = [None] * self.config.ports
        self._never_used = 0  # ports below this were handed out at least once
        self._freed: deque[int] = deque()  # ports freed since, the longest free first
        self._targets: dict[int, tuple[BrokerConnection, ...]] = {}
        self._connections: set[BrokerConnection] = set()
        self.hello_timeouts = 0  # connections refused with hello_timeout
        self.per_address = Quota(self.config.max_connections_per_address)  # by peer IP address, taken at accept
        self.per_name = Quota(self.config.max_connections_per_name)  # by (token) name, taken at hello
        self._refusals_logged_at: dict[str, float] = {}  # refusal code -> when last logged
        self._server: asyncio.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # set by start(): the hello deadlines run on it
        self._started_at = 0.0
        self._closing = False
        self._closed: asyncio.Event | None = None
        self._no_connections: asyncio.Event | None = None
        self.metrics: MetricsServer | None = None  # --metrics-listen, once started

    # -- life cycle ---------------------------------------------------------

    async def start(self) -> None:
        """Raise the open-file limit, listen; log where, and how many connections fit."""
        loop = self._loop = asyncio.get_running_loop()
        self._closed = asyncio.Event()
        self._no_connections = asyncio.Event()
        self._no_connections.set()
        limits = raise_open_file_limit()
        host, port = self.config.address
        # A TLS handshake that does not finish within the hello deadline is cut as well.
        handshake = {"ssl_handshake_timeout": self.config.hello_timeout_s} if self.tls_server and self.config.hello_timeout_s else {}
        self._server = await loop.create_server(
            self.new_connection, host, port, reuse_address=True, backlog=1024, ssl=self.tls_server, **handshake
        )
        self._started_at = time.monotonic()
        self.set_capacity(limits, open_file_count())
        if self.capacity < self.config.ports:
            log.warning(
                "room for %d connections (the open-file limit, or max_connections), fewer than the %d ports; "
                "raise it (ulimit -n)", self.capacity, self.config.ports,
            )
        host, port = self.address
        if not self.name:  # a wildcard address means nothing to peers: name the host instead
            self.name = f"{socket.gethostname() if host in ('0.0.0.0', '::') else host}:{port}"
        log.info(
            "dcp broker listening on %s:%d mode=%s key=%d ports=%d%s%s",
            host, port, self.config.mode, self.key, self.config.ports,
            " tls" if self.tls_server else "", " require-token" if self.config.require_token else " insecure" if self.config.insecure else "",
        )
        self.warn_exposure(host, port)
        for peer in self.config.peers:
            self.add_link(peer)
        if self.config.orchestrator:
            self._spawn(self._report_to_orchestrator())
        if self.config.metrics_listen:
            self.metrics = metrics_server(self.config.metrics_listen, "broker", lambda: broker_families(self), lambda: broker_unready(self))
            await self.metrics.start()

    async def close(self) -> None:
        """Stop accepting, tell every peer we go away, flush, close; idempotent."""
        if self._closed is None:
            return
        if self._closing:
            await self._closed.wait()
            return
        self._closing = True
        assert self._server is not None and self._no_connections is not None
        self._server.close()
        if self._ports_flush is not None:
            self._ports_flush.cancel()
        if self._load_timer is not None:
            self._load_timer.cancel()
        going_away = encode_control(control.GoingAway().to_body())
        for conn in list(self._connections):
            conn.close(going_away)
        for link in self.links.values():
            link.close(notify=False)
        if self._orchestrator is not None:
            await self._orchestrator.close()
        try:
            await asyncio.wait_for(self._no_connections.wait(), self.config.shutdown_timeout_s)
        except asyncio.TimeoutError:
            log.warning("%d connection(s) did not flush in time; aborting them", len(self._connections))
            for conn in list(self._connections):
                conn.abort()
        if self.metrics is not None:  # /readyz said "shutting down" until here
            await self.metrics.close()
        log.info("dcp broker stopped: %s", self.summary())
        self._closed.set()

    @property
    def closing(self) -> bool:
        return self._closing

    def new_connection(self, link: Link | None = None) -> BrokerConnection:
        return BrokerConnection(self, link)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def token(self, audience: Iterable[str]) -> str | None:
        """A fresh ``broker`` token of our own for a hello we send (to a peer, to the
        orchestrator), valid only at the servers ``audience`` names (a peer's addresses,
        :data:`~dcp.auth.ORCHESTRATOR_AUDIENCE`); None without a secret."""
        if self.secret is None:
            return None
        return issue_token(self.secret, self.name, "broker", int(time.time()) + _OWN_TOKEN_TTL_S, audience)

    def audiences(self, local: str) -> frozenset[str]:
        """What this broker answers to as a broker token's audience: its name, the address
        it listens on and ``local``, the address the connection reached (a peer dialling
        by host name, or through an address translation, needs ``--name`` to be that)."""
        found = {self.name, local}
        if self._server is not None:
            found.add(endpoint(*self.address))
        found.discard("")
        return frozenset(found)

    # -- reporting to the orchestrator ---------------------------------------

    async def _report_to_orchestrator(self) -> None:
        """Register with the DO (again after every reconnect); it learns keys, ports, links
        and the agents on the ports, never topics.

        A registration reports everything (:meth:`_full_report`).  After it, a link change
        sends a BrokerState with ``attached`` None (attachments unchanged), and agents
        coming and going are PortsChanged deltas, coalesced (:meth:`_port_changed`).
        """
        from .client import Connection

        async def register(conn: Connection) -> None:
            state, rest = self._full_report()
            await conn.call(state)
            for frame in rest:  # before any delta: the deltas are relative to this snapshot
                conn.send(frame.to_body())
            asyncio.get_running_loop().call_soon(self._registered)  # the connection is open by then

        self._orchestrator = Connection(
            f"{'dcps' if self.tls_client else 'dcp'}://{self.config.orchestrator}", name=self.name, role="broker",
            on_open=register, reconnect=Backoff(initial_s=0.05, max_s=1.0), ssl=self.tls_client,
            token=lambda: self.token((ORCHESTRATOR_AUDIENCE,)),  # only to the orchestrator we were configured with
        )
        try:
            await self._orchestrator.open(retry=True)
        except DcpError as exc:
            if not self._closing:
                log.error("cannot register with the orchestrator at %s: %s", self.config.orchestrator, safe(exc))

    @property
    def registered(self) -> bool:
        """Whether reports reach the orchestrator now (False without one)."""
        return self._reporting()

    @property
    def connections(self) -> frozenset[BrokerConnection]:
        """Every open connection: agents and clients, links, admins, those before their hello."""
        return frozenset(self._connections)

    def _reporting(self) -> bool:
        """Registered, on a connection to the DO that is open: reports may go now.  (While
        not, changes wait; the next registration's snapshot covers them.)"""
        from .client import Status

        conn = self._orchestrator
        return conn is not None and not self._closing and conn.status is Status.OPEN

    def _registered(self) -> None:
        """What changed while registering goes now; load reports start, or start over."""
        self._load_sent.clear()
        if self._load_timer is None:
            self._load_at = time.monotonic()
            self._load_timer = asyncio.get_running_loop().call_later(LOAD_INTERVAL_S, self._report_load)
        if self._links_dirty:
            self.state_changed()
        if self._changes and self._ports_flush is None:
            self._ports_flush = asyncio.get_running_loop().call_soon(self._flush_ports)

    def state_changed(self) -> None:
        """A link changed: the DO gets a BrokerState (attachments left out: unchanged) at
        the end of this loop iteration."""
        if self._orchestrator is None:
            return  # the registration will report it
        self._links_dirty = True
        if not self._report_due:
            self._report_due = True
            asyncio.get_running_loop().call_soon(self._send_state)

    def _send_state(self) -> None:
        self._report_due = False
        if self._links_dirty and self._reporting():
            self._links_dirty = False
            self._orchestrator.send(self._state().to_body())

    def _port_changed(self, port: int, before: str | None, after: str | None) -> None:
        """The agent on ``port`` changed (``before``, ``after``: its name, None for no agent).

        Changes are collected per port, so a port that changes again before the flush
        nets out; they are flushed at the end of this loop iteration, or
        :data:`REPORT_INTERVAL_S` after the last flush if that is later.
        """
        if self._orchestrator is None:
            return  # the registration will report it
        change = self._changes.get(port)
        self._changes[port] = (before if change is None else change[0], after)
        if self._ports_flush is None:
            loop = asyncio.get_running_loop()
            wait = self._ports_flushed_at + REPORT_INTERVAL_S - loop.time()
            self._ports_flush = loop.call_later(wait, self._flush_ports) if wait > 0 else loop.call_soon(self._flush_ports)

    def _flush_ports(self) -> None:
        """Send what changed since the last report, as PortsChanged frames.

        A port is in at most one list of a frame: when another agent took a port within
        the interval, its detach goes first and its new agent in a later frame.
        """
        self._ports_flush = None
        if not self._changes or not self._reporting():
            return
        self._ports_flushed_at = asyncio.get_running_loop().time()
        changes, self._changes = self._changes, {}
        attached: list[control.PortReport] = []
        detached: list[int] = []
        replaced: list[control.PortReport] = []
        for port, (before, after) in changes.items():
            if before == after:
                continue  # came and went; or went and came back under the same name
            if after is None:
                detached.append(port)
            elif before is None:
                attached.append(control.PortReport(port=port, name=after))
            else:
                detached.append(port)
                replaced.append(control.PortReport(port=port, name=after))
        for frame in _ports_changed(attached, detached) + _ports_changed(replaced, []):
            self._orchestrator.send(frame.to_body())

    def _report_load(self) -> None:
        """Report the links (round trip, throughput, output queue) and attachments (output
        queue) whose figures changed much since last reported, in one Load frame.

        Computed from counters once per :data:`LOAD_INTERVAL_S`, never per frame; what is
        remembered is one entry per port.
        """
        self._load_timer = asyncio.get_running_loop().call_later(LOAD_INTERVAL_S, self._report_load)
        now = time.monotonic()
        elapsed, self._load_at = max(now - self._load_at, 1e-3), now
        before, self._link_bytes = self._link_bytes, {port: link.sent_bytes for port, link in self.links.items()}
        if not self._reporting():
            return
        links: list[control.LinkLoad] = []
        for port, link in sorted(self.links.items()):
            conn, rtt_s = self._ports[port], link.rtt_now_s(now)
            if link.state != "up" or conn is None or rtt_s is None:
                continue
            sent = self._link_bytes[port]
            figures = (rtt_s * 1000, max(0, sent - before.get(port, sent)) / elapsed, float(conn.buffered_bytes + conn.queued_bytes))
            if len(links) < LOAD_ENTRIES and _changed_much(self._load_sent.get((True, port)), figures, _LINK_FLOORS):
                self._load_sent[(True, port)] = figures
                rtt_ms, rate, queue = figures
                links.append(control.LinkLoad(port=port, rtt_ms=round(rtt_ms, 3), bytes_per_s=round(rate), queue_bytes=int(queue)))
        ports: list[control.PortLoad] = []
        for conn in self._connections:
            if conn.link is not None or conn.port < 0 or len(links) + len(ports) >= LOAD_ENTRIES:
                continue
            waiting = (float(conn.buffered_bytes + conn.queued_bytes),)
            if _changed_much(self._load_sent.get((False, conn.port), (0.0,)), waiting, _PORT_FLOORS):
                self._load_sent[(False, conn.port)] = waiting
                ports.append(control.PortLoad(port=conn.port, queue_bytes=int(waiting[0])))
        if links or ports:
            self._orchestrator.send(control.Load(links=links, ports=ports).to_body())

    def _full_report(self) -> tuple[control.BrokerState, list[control.PortsChanged]]:
        """Everything, for a (re)registration: a BrokerState with as many attachments as fit
        in :data:`REPORT_FRAME_BYTES`, and PortsChanged frames with the rest.  The changes
        not reported yet are in it."""
        self._changes.clear()
        self._links_dirty = False
        reports = [control.PortReport(port=p, name=conn.name) for p, conn in enumerate(self._ports) if conn is not None and conn.link is None]
        sizes = [_packed_size(report.to_body()) for report in reports]
        first_room = REPORT_FRAME_BYTES - len(encode_control(self._state(attached=[]).to_body())) - _ARRAY_HEADER
        first, *rest = _chunks(reports, sizes, first_room, _ports_changed_room())
        return self._state(attached=first), [control.PortsChanged(attached=chunk, detached=[]) for chunk in rest]

    def _state(self, attached: list[control.PortReport] | None = None) -> control.BrokerState:
        """Keys, ports, links; and ``attached``, when given (None: unchanged)."""
        host, port = self.address
        return control.BrokerState(
            key=self.key,
            keys=self.announced_keys,
            address=f"{host}:{port}",
            ports=self.config.ports,
            links=[
                control.LinkReport(port=p, remote_key=link.remote_key, remote_port=link.remote_port, state=link.state)
                for p, link in sorted(self.links.items())
            ],
            attached=attached,
        )

    # -- ports --------------------------------------------------------------

    def attach(self, conn: BrokerConnection, port: int | None = None) -> int | None:
        """Put ``conn`` on ``port`` (a link's own) or on a free port; None if none is free.

        Ports are handed out round-robin, so a port freed by a departed agent is
        the last to be reused and frames still addressed to it drain first.
        """
        if port is None:
            port = self._free_port()
            if port is None:
                return None
        if self._ports[port] is not None:  # a link's new connection replaces its old one
            self._targets.clear()
        # else no cached bitmap has this port: bitmaps are ANDed with ``attached`` first
        self._ports[port] = conn
        conn.port, conn.bit = port, 1 << port
        conn.forwarder.attach(port)
        self.attached |= 1 << port
        if conn.link is None:  # a link reports its own changes
            self._port_changed(port, None, conn.name)
        return port

    def _free_port(self) -> int | None:
        """The next port for an agent or a link, in O(1) amortised: each port once, in
        order, then the freed ones, longest free first; None when all are taken."""
        ports = self._ports
        while self._never_used < len(ports):
            port = self._never_used
            self._never_used += 1
            if ports[port] is None and not self.reserved >> port & 1:
                return port
        freed = self._freed
        while freed:
            port = freed.popleft()
            if ports[port] is None and not self.reserved >> port & 1:  # else taken since (a stale entry)
                return port
        return None

    def _port_freed(self, port: int) -> None:
        """``port`` has neither a connection nor a link now: it queues for reuse."""
        if port < self._never_used:  # a port never handed out is handed out in its turn
            self._freed.append(port)

    def detach(self, conn: BrokerConnection) -> None:
        port = conn.port
        if port < 0 or self._ports[port] is not conn:
            return
        self._ports[port] = None
        self.attached &= ~(1 << port)
        self._targets.clear()
        if not self.reserved >> port & 1:
            self._port_freed(port)
        if conn.link is None:
            self._port_changed(port, conn.name, None)
        for topic in conn.topics:
            self.unsubscribe(conn, topic)

    # -- links --------------------------------------------------------------

    def add_link(self, address: str, vouched: bool = False) -> Link:
        """Dial ``address`` and keep a link to it on a port of its own.

        ``vouched``: someone this broker authenticated asked for it (an admin whose token
        it checked); a configured ``--peer`` is vouched for too.  Only over TLS
        (``--tls-ca``) or to a vouched-for peer does the link's hello carry this broker's
        token (:meth:`Link.hello`).  With ``--verify-routes`` the frames a link brings are
        forwarded unchecked (the broker they entered at checked them), so such a broker
        dials no other peer.

        Raises:
            ConfigError: a bad address; stateful mode (links need topology numbers); a
                peer --verify-routes cannot vouch for.
            RoutingError: no free port.
        """
        parse_address(address)
        if not self.stateless:
            raise ConfigError("links need stateless mode: a stateful broker routes by its own table only")
        vouched = vouched or address in self.config.peers
        if self.verifier is not None and self.tls_client is None and not vouched:
            raise ConfigError(
                f"this broker verifies routes (--verify-routes) and forwards what its links bring unchecked: it links only "
                f"over TLS (--tls-ca), to a configured --peer, or when an admin with a token asks, and {address} is none of these"
            )
        link = Link(self, self._reserve_port(), address=address, vouched=vouched)
        self.links[link.port] = link
        link.start()
        return link

    def accept_link(self, conn: BrokerConnection, hello: control.Hello) -> Link:
        """A peer dialled us: its link gets (back) the port reserved for it.

        Raises:
            BadRequest: the hello lacks the peer's key or its port for the link.
            LinkRefused: the peer has our key, or this broker is stateful.
            RoutingError: no free port.
        """
        if hello.key is None or hello.link is None:
            missing = "key" if hello.key is None else "link"
            raise BadRequest(control.HELLO, missing, f"a peer hello needs {missing}: key (bytes) and link (its port for the link)")
        identity = (hello.key, hello.link)
        shared = self.shared_key(hello.key, hello.keys)
        if shared is not None:
            raise LinkRefused("same_key", f"the peer has this broker's key {shared}; give each broker its own --key")
        if not self.stateless:
            raise LinkRefused("wrong_mode", "links need stateless mode: a stateful broker routes by its own table only")
        link = self._inbound.get(identity)
        if link is None:
            link = Link(self, self._reserve_port(), identity=identity)
            self.links[link.port] = link
            self._inbound[identity] = link
        conn.link = link
        link.accepted(conn, hello.name)
        return link

    @property
    def announced_keys(self) -> list[int] | None:
        """All the keys, in hellos, welcomes and reports, when there is more than the root."""
        return list(self.layout.keys) if len(self.layout.keys) > 1 else None

    def shared_key(self, root: int, keys: list[int] | None) -> int | None:
        """A key of this broker that a peer announcing ``root`` (and ``keys``) also has:
        the two cannot route together; None if they share none."""
        own = set(self.layout.keys)
        return next((key for key in (root, *(keys or ())) if key in own), None)

    def remove_link(self, link: Link, notify: bool) -> None:
        """Close ``link`` and free its port; ``notify``: tell the peer to free its end too."""
        if self.links.get(link.port) is not link:
            return
        link.close(notify)
        del self.links[link.port]
        if link.identity is not None:
            self._inbound.pop(link.identity, None)
        self.reserved &= ~(1 << link.port)
        if self._ports[link.port] is None:  # else freed when its connection goes
            self._port_freed(link.port)
        self.state_changed()
        log.info("link port %d removed (%s)", link.port, link.address or safe(link.remote_name) or link.remote_key)

    def _reserve_port(self) -> int:
        port = self._free_port()
        if port is None:
            raise RoutingError(f"no free port for a link: all {self.config.ports} ports are taken")
        self.reserved |= 1 << port
        return port

    def count_link_down(self, ports: int) -> None:
        """Each link on ``ports`` had a frame routed to it while down."""
        while ports:
            low = ports & -ports
            link = self.links.get(low.bit_length() - 1)
            if link is not None:
                link.undelivered += 1
            ports ^= low

    def targets(self, mask: int) -> tuple[BrokerConnection, ...]:
        """The connections on the ports of ``mask`` (cached per bitmap)."""
        found = self._targets.get(mask)
        if found is None:
            if len(self._targets) >= _TARGET_CACHE_LIMIT:
                self._targets.clear()
            ports = self._ports
            found = tuple(conn for conn in (ports[port] for port in _bits(mask)) if conn is not None)
            self._targets[mask] = found
        return found

    def subscribe(self, conn: BrokerConnection, topic: bytes) -> None:
        self.table[topic] = self.table.get(topic, 0) | conn.bit
        conn.topics.add(topic)

    def unsubscribe(self, conn: BrokerConnection, topic: bytes) -> None:
        ports = self.table.get(topic, 0) & ~conn.bit
        if ports:
            self.table[topic] = ports
        else:
            self.table.pop(topic, None)

    # -- counters -----------------------------------------------------------

    def summary(self) -> str:
        drops = ", ".join(f"{k}={v}" for k, v in self.drops.items() if v)
        return (
            f"frames in={self.frames_in} out={self.frames_out}, "
            f"bytes in={self.bytes_in} out={self.bytes_out}, drops: {drops or 'none'}"
        )

    def stats(self) -> dict[str, Any]:
        """Counters: frames are data frames; bytes are every byte read or forwarded."""
        host, port = self.address
        return {
            "address": f"{host}:{port}",
            "mode": self.config.mode,
            "key": int_to_bytes(self.key),
            "ports": self.config.ports,
            "slow_consumer": self.slow_consumer,
            "verify_routes": self.verifier is not None,
            "uptime_s": round(time.monotonic() - self._started_at, 3),
            "capacity": None if self.capacity == sys.maxsize else self.capacity,  # connections at most
            "refused": self.refused,  # connections refused with too_many_connections
            "hello_timeouts": self.hello_timeouts,  # connections refused with hello_timeout
            "refused_per_address": self.per_address.refused,  # connection_limit at accept
            "refused_per_name": self.per_name.refused,  # connection_limit at hello
            "frames_in": self.frames_in,
            "bytes_in": self.bytes_in,
            "frames_out": self.frames_out,
            "bytes_out": self.bytes_out,
            "drops": dict(self.drops),
            "topics": len(self.table),
            "name": self.name,
            "links": [link.stats() for _, link in sorted(self.links.items())],
            "connections": [conn.stats() for conn in sorted(self._connections, key=lambda c: c.port)],
        }

    # -- bookkeeping from connections -----------------------------------------

    def _connected(self, conn: BrokerConnection) -> None:
        self._connections.add(conn)
        assert self._no_connections is not None
        self._no_connections.clear()

    def _disconnected(self, conn: BrokerConnection) -> None:
        self.detach(conn)
        self._connections.discard(conn)
        if not self._connections and self._no_connections is not None:
            self._no_connections.set()


def _changed_much(before: tuple[float, ...] | None, after: tuple[float, ...], floors: tuple[float, ...]) -> bool:
    """Whether figures are worth a report: none sent yet, or one moved by more than
    :data:`LOAD_CHANGE` of what was sent and more than its floor."""
    return before is None or any(abs(a - b) > max(LOAD_CHANGE * b, floor) for a, b, floor in zip(after, before, floors))


def _bits(mask: int) -> list[int]:
    """The set bits of ``mask``, lowest first, in time linear in the bits set (and, for
    a dense mask, in its length at C speed): never one step per port of the broker."""
    if mask.bit_count() <= _SPARSE_MASK_BITS:
        return ports_of(mask)
    digits = format(mask, "b")
    top = len(digits) - 1
    found = []
    i = digits.rfind("1")
    while i >= 0:
        found.append(top - i)
        i = digits.rfind("1", 0, i)
    return found


# -- report frames -----------------------------------------------------------

# What a msgpack array header can grow by, from an empty list's (1 byte) to array 32's.
_ARRAY_HEADER = 4


def _packed_size(value: Any) -> int:
    return len(msgpack.packb(value, use_bin_type=True))


def _ports_changed_room() -> int:
    """The bytes a PortsChanged frame has for its two lists' items."""
    empty = encode_control(control.PortsChanged(attached=[], detached=[]).to_body())
    return REPORT_FRAME_BYTES - len(empty) - 2 * _ARRAY_HEADER


def _ports_changed(attached: list[control.PortReport], detached: list[int]) -> list[control.PortsChanged]:
    """PortsChanged frames for ``attached`` and ``detached``, each within :data:`REPORT_FRAME_BYTES`."""
    if not attached and not detached:
        return []
    items: list[int | control.PortReport] = [*detached, *attached]
    sizes = [_packed_size(port) for port in detached] + [_packed_size(report.to_body()) for report in attached]
    room = _ports_changed_room()
    return [
        control.PortsChanged(
            attached=[item for item in chunk if isinstance(item, control.PortReport)],
            detached=[item for item in chunk if isinstance(item, int)],
        )
        for chunk in _chunks(items, sizes, room, room)
    ]


def _chunks(items: list[T], sizes: list[int], first_room: int, room: int) -> list[list[T]]:
    """``items``, in order, cut into lists whose ``sizes`` add up to at most ``first_room``
    for the first list (which may stay empty) and ``room`` for each other; an item larger
    than ``room`` alone is left out, and logged."""
    chunks: list[list[T]] = [[]]
    used, limit = 0, first_room
    for item, size in zip(items, sizes):
        if size > room:
            log.warning("left out of a report to the orchestrator: %s (%d bytes) does not fit in a frame", safe(repr(item)), size)
            continue
        if used + size > limit:
            chunks.append([])
            used, limit = 0, room
        chunks[-1].append(item)
        used += size
    return chunks


class BrokerConnection(GuardedConnection, asyncio.Protocol):
    """One TCP connection of the broker: an agent or a peer link on a port, or an admin client."""

    def __init__(self, broker: Broker, link: Link | None = None) -> None:
        self.broker = broker
        self.link = link  # the peer link this connection carries, if any
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self.name = ""
        self.role = ""
        self.port = -1
        self.bit = 0
        self.topics: set[bytes] = set()
        self.paused = False  # our output buffer is past the bound
        self.slow_consumer = broker.slow_consumer  # what to do with frames for us while paused
        self._queue: deque[tuple[bytes, int]] = deque()  # drop-oldest: (frames, count) held while paused
        self.queued_bytes = 0
        self.reading_paused = False
        self.blocked: set[BrokerConnection] = set()  # publishers paused because of us
        # Until its hello is accepted a connection sends control frames only: hello_limits.
        # A link we dial speaks first; its answers come under the broker's limits.
        # With --verify-routes an agent's frames are checked against the name its hello is admitted
        # under (bound at the hello; until then, no name: nothing passes); a link's are not checked.
        verifier = broker.verifier.bind("") if broker.verifier is not None and link is None else None
        self.forwarder = Forwarder(
            broker, broker.limits if link is not None else broker.hello_limits, stateless=broker.stateless, verifier=verifier
        )  # the decisions; this class writes and counts
        self.local = ""  # the address this connection reached (HOST:PORT, dcp.auth.endpoint): an audience of broker tokens
        self.bytes_in = 0
        self.frames_out = 0
        self.bytes_out = 0
        self.dropped = 0
        self.closing = False
        self._error_sent_at: dict[str, float] = {}
        self._errors_unsent: Counter[str] = Counter()

    # -- asyncio callbacks --------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # a stream server's transport
        no_delay(transport)
        peername = transport.get_extra_info("peername")
        if peername:
            self.peer = f"{peername[0]}:{peername[1]}"
        sockname = transport.get_extra_info("sockname")
        if isinstance(sockname, tuple) and len(sockname) >= 2:
            self.local = endpoint(str(sockname[0]), int(sockname[1]))
        self.transport.set_write_buffer_limits(high=self.broker.config.out_buffer_bytes)
        self.broker._connected(self)
        if self.broker._closing:
            self.close(encode_control(control.GoingAway().to_body()))
        elif self.link is not None:  # we dialled a peer
            self.role = "peer"
            self.link.connection_made(self)
            hello = self.link.hello(peername if isinstance(peername, tuple) else None)
            if hello.token and self.broker.tls_client is None and peername and not self.link.warned_cleartext:
                self.link.warned_cleartext = warn_cleartext_token(log, peername[0], f"link port {self.link.port} to {self.link.address}")
            self.send(hello)
        else:
            self.guard(peername[0] if peername else "", len(self.broker._connections))

    @property
    def server(self) -> Broker:
        return self.broker

    def let_go(self) -> None:
        self.forwarder.close()  # what it held (a partial frame) is let go at once

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self.forwarder.close()
        self.release_guard()
        if self.port >= 0:
            log.info("port %d detached (%s %s)", self.port, safe(self.name or "-"), self.peer)
        self._release_blocked()
        self.broker._disconnected(self)
        if self.link is not None:
            self.link.connection_lost(self)

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        if self._queue:
            self._drain_queue()
        if not self.paused:
            self._release_blocked()

    @property
    def frames_in(self) -> int:
        return self.forwarder.frames_in

    @property
    def buffered_bytes(self) -> int:
        """Bytes in the transport's output buffer."""
        return self.transport.get_write_buffer_size() if self.transport is not None and not self.closing else 0

    def eof_received(self) -> bool:
        drop = self.forwarder.eof()
        if drop is not None:
            self.broker.drops["truncated"] += 1
            log.info("%s: %s", self.peer, safe(drop.message))
        return False

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        size = len(data)
        self.bytes_in += size
        broker = self.broker
        broker.bytes_in += size
        before = self.forwarder.frames_in
        try:
            for decision in self.forwarder.receive(data):
                if isinstance(decision, Write):
                    self._emit(*decision)
                elif isinstance(decision, Drop):
                    self._count(decision)
                else:
                    self._control(decision.body)
                    if self.closing:  # nothing after a frame that closed us is read
                        break
        except ProtocolError as exc:
            self._fail(exc)
        finally:
            broker.frames_in += self.forwarder.frames_in - before

    # -- the data path: writing what the forwarder decided -------------------

    def _emit(self, mask: int, chunks: tuple[Any, ...], size: int, frames: int) -> None:
        """Write ``chunks`` (``frames`` whole frames, ``size`` bytes) to every port of ``mask``."""
        broker = self.broker
        for target in broker.targets(mask):
            if target.closing:
                continue
            if target.paused:
                policy = target.slow_consumer
                if policy == "drop-newest":
                    target.dropped += frames
                    broker.drops["slow_consumer"] += frames
                    continue
                if policy == "drop-oldest":
                    target._enqueue(chunks, size, frames)
                    continue
                target.blocked.add(self)
                self._pause_reading()
            assert target.transport is not None  # attached after connection_made
            if len(chunks) == 1:
                target.transport.write(chunks[0])
            else:  # a large frame's header and the reads that carry it: one system call, not one each
                target.transport.writelines(chunks)
            target.frames_out += frames
            target.bytes_out += size
            broker.frames_out += frames
            broker.bytes_out += size

    def _enqueue(self, chunks: tuple[Any, ...], size: int, frames: int) -> None:
        """drop-oldest: hold ``frames`` frames (copied out of the read buffer) until the
        transport drains, dropping the oldest held ones past ``out_buffer_bytes``.

        What is dropped is whole entries, each the frames of one read for this port,
        so the count is exact though not always one frame at a time.
        """
        queue = self._queue
        queue.append((b"".join(chunks), frames))
        self.queued_bytes += size
        bound = self.broker.config.out_buffer_bytes
        while self.queued_bytes > bound and len(queue) > 1:
            data, count = queue.popleft()
            self.queued_bytes -= len(data)
            self.dropped += count
            self.broker.drops["slow_consumer"] += count

    def _drain_queue(self, whole: bool = False) -> None:
        """Write the held frames, oldest first, until the transport pushes back again
        (or all of them, ``whole``)."""
        queue, broker = self._queue, self.broker
        assert self.transport is not None  # frames are held only after connection_made
        write = self.transport.write
        while queue and (whole or not self.paused):
            data, count = queue.popleft()
            self.queued_bytes -= len(data)
            write(data)
            self.frames_out += count
            self.bytes_out += len(data)
            broker.frames_out += count
            broker.bytes_out += len(data)

    def _count(self, drop: Drop) -> None:
        """Count a drop; tell the sender when it has a message, at most once a second per reason."""
        if drop.message:
            self._drop(drop.reason, drop.message, drop.count)
            return
        broker = self.broker
        broker.drops[drop.reason] += drop.count
        if drop.ports:
            broker.count_link_down(drop.ports)

    # -- control frames ----------------------------------------------------------

    def _control(self, body: dict[str, Any]) -> None:
        """One control frame: refused by the permission table, refused as malformed, or handled."""
        op = body["op"]
        refusal = self.broker.permissions.refusal(self.role, op)
        if refusal is not None:
            self._error(refusal.code, refusal.message, control.request_id(body), refusal.fatal)
            return
        try:
            message = control.parse_request(body)
        except BadRequest as exc:
            self._malformed(op, control.request_id(body), exc)
            return
        _HANDLERS[type(message)](self, message)

    def _malformed(self, op: str, request_id: int | None, exc: BadRequest) -> None:
        """A bad hello closes the connection; a bad request gets an error frame; a bad answer
        (error, welcome, pong) is not answered, and refuses a link still waiting for its welcome."""
        if op == control.HELLO:
            self._error(exc.code, str(exc), request_id, fatal=True)
        elif op in _NEVER_ANSWERED:
            log.warning("%s (port %d) sent a malformed %s: %s", self.peer, self.port, op, safe(exc))
            if self.link is not None:
                self.link.refuse(self, exc)
        else:
            self._error(exc.code, str(exc), request_id)

    def set_slow_consumer(self, name: object) -> None:
        """This port's slow-consumer policy (an agent's hello or ``policy`` request).

        Leaving drop-oldest hands what it held to the transport, so nothing is reordered.
        """
        self.slow_consumer = control.slow_consumer_policy(name)
        if self.slow_consumer != "drop-oldest" and self._queue and self.transport is not None:
            self._drain_queue(whole=True)

    def _on_hello(self, hello: control.Hello) -> None:
        broker = self.broker
        try:
            broker.permissions.check_role(hello)
            hello, counted = broker.admit_as(hello, self.peer, self.local)
            if hello.role == "peer":
                self._vouched_for(hello)
        except (BadRequest, AuthError) as exc:
            self._error(exc.code, str(exc), hello.id, fatal=True)
            return
        refusal = self.hello_accepted(counted)
        if refusal is not None:
            self._error("connection_limit", refusal, hello.id, fatal=True)
            return
        if hello.slow_consumer is not None:
            self.set_slow_consumer(hello.slow_consumer)
        self.name, self.role = hello.name, hello.role
        if hello.role == "admin":
            self.forwarder.refusal = "an admin connection cannot publish"
        port = None
        if hello.role == "peer":
            try:
                broker.accept_link(self, hello)
            except (LinkRefused, BadRequest, RoutingError) as exc:
                log.warning("refusing a link from %s (%s): %s", safe(self.name or "-"), self.peer, safe(exc))
                self._error("no_free_port" if isinstance(exc, RoutingError) else exc.code, str(exc), hello.id, fatal=True)
                return
            port = self.port
            self.forwarder.verifier = None  # what a link brings was checked where it entered
        elif hello.role == "agent":
            if broker.verifier is not None:  # its tags must name it, as the hello was admitted
                self.forwarder.verifier = broker.verifier.bind(self.name)
            port = broker.attach(self)
            if port is None:
                self._error("no_free_port", f"all {broker.config.ports} ports are taken", hello.id, fatal=True)
                return
            log.info("port %d attached (%s %s)", port, safe(self.name or "-"), self.peer)
        self.forwarder.set_limits(broker.limits)  # its hello accepted: frames up to max_frame
        limits = broker.limits
        self.send(control.Welcome(
            re=hello.id, key=broker.key, keys=broker.announced_keys, name=broker.name, mode=broker.config.mode, port=port,
            ports=broker.config.ports,
            max_frame=limits.max_frame, max_topic=limits.max_topic, max_x_bits=limits.max_x_bits, slow_consumer=self.slow_consumer,
            verify_routes=True if broker.verifier is not None else None,
        ))

    def _vouched_for(self, hello: control.Hello) -> None:
        """With ``--verify-routes`` a link's frames are forwarded unchecked, so a peer
        needs a valid broker token for this broker even where peers need none (``--insecure``).

        Raises:
            AuthError: it has none (logged).
        """
        broker = self.broker
        if broker.verifier is None or broker.permissions.needs_token("peer"):
            return  # nothing to vouch for, or admit_as checked it
        assert broker.secret is not None  # --verify-routes needs it
        try:
            admit(broker.secret, hello.to_body(), time.time(), broker.audiences(self.local))
        except AuthError as exc:
            log.warning("refusing the peer hello of %s (%s): %s (--verify-routes)", safe(hello.name or "-"), self.peer, safe(exc))
            raise AuthError(exc.code, f"{exc} (this broker verifies routes: its peers need a broker token)") from None

    def _on_ping(self, ping: control.Ping) -> None:
        if self.link is not None:
            self.link.heard(self)
        self.send(control.Pong(re=ping.id))

    def _on_stats(self, request: control.StatsRequest) -> None:
        self.send(control.Stats(re=request.id, stats=self.broker.stats()))

    def _on_slow_consumer(self, request: control.SlowConsumerRequest) -> None:
        self.set_slow_consumer(request.slow_consumer)
        self.send(control.SlowConsumerSet(re=request.id, slow_consumer=self.slow_consumer))

    def _on_subscribe(self, request: control.Subscribe) -> None:
        """``subscribe`` and ``unsubscribe``, in stateful mode."""
        broker = self.broker
        topic = request.topic.encode()
        if broker.stateless:
            self._error("wrong_mode", "subscribe needs a stateful broker; in stateless mode routes come from the orchestrator", request.id)
        elif len(topic) > broker.limits.max_topic:
            self._error("bad_topic", f"topic must be a non-empty string of at most {broker.limits.max_topic} bytes", request.id)
        else:
            if type(request) is control.Subscribe:
                broker.subscribe(self, topic)
            else:
                broker.unsubscribe(self, topic)
                self.topics.discard(topic)
            self.send(control.Ok(re=request.id))

    def _on_link(self, request: control.Link) -> None:
        """An admin's ``link``: dial a peer; answer now, or once the link is up (``wait``)."""
        broker = self.broker
        try:
            link = broker.add_link(request.peer, vouched=broker.permissions.needs_token("admin"))  # its token was checked
        except (ConfigError, RoutingError) as exc:
            self._error("bad_link", str(exc), request.id)
            return
        if not request.wait:
            self.send(control.Linked(re=request.id, link=link.stats()))
            return
        broker._spawn(self._reply_when_up(link, request.wait, request.id))

    async def _reply_when_up(self, link: Link, timeout: float, request_id: int | None) -> None:
        try:
            await link.wait_up(timeout)
        except DcpError as exc:
            self._error("link_refused" if isinstance(exc, LinkRefused) else "link_timeout", str(exc), request_id)
        else:
            self.send(control.Linked(re=request_id, link=link.stats()))

    def _on_unlink(self, request: control.Unlink) -> None:
        """An admin's ``unlink`` closes a link for good; a peer's frees the link it carries."""
        broker = self.broker
        if self.role == "peer":
            assert self.link is not None  # a peer connection carries its link
            broker.remove_link(self.link, notify=False)
            return
        link = broker.links.get(request.port) if request.port is not None else None
        if link is None:
            self._error("no_link", f"no link on port {request.port}", request.id)
            return
        broker.remove_link(link, notify=True)
        self.send(control.Ok(re=request.id))

    def _on_error(self, error: control.Error) -> None:
        log.warning("%s (port %d) reports %s: %s", self.peer, self.port, safe(error.code), safe(error.message))
        if self.link is not None:
            self.link.refused(self, error)
        if error.fatal:
            self.close()

    def _on_going_away(self, _: control.GoingAway) -> None:
        self.close()

    def _on_welcome(self, welcome: control.Welcome) -> None:
        assert self.link is not None  # only a peer link may send one
        self.link.welcomed(self, welcome)

    def _on_pong(self, pong: control.Pong) -> None:
        assert self.link is not None  # only a peer link may send one
        self.link.heard(self)
        self.link.pong(pong.re)

    # -- errors and output ------------------------------------------------------

    def send(self, message: control.Message) -> None:
        if not self.closing and self.transport is not None:
            self.transport.write(encode_control(message.to_body()))

    def _error(self, code: str, message: str, request_id: int | None = None, fatal: bool = False) -> None:
        """An error frame to the peer; ``fatal``: then close."""
        error = control.Error(re=request_id, code=code, message=message, fatal=fatal)
        if fatal:
            self.close(encode_control(error.to_body()))
        else:
            self.send(error)

    def _drop(self, reason: str, message: str, count: int = 1) -> None:
        """Count ``count`` dropped frames and tell their sender, at most once a second per reason."""
        self.broker.drops[reason] += count
        self._errors_unsent[reason] += count
        now = time.monotonic()
        if now - self._error_sent_at.get(reason, -_ERROR_INTERVAL_S) >= _ERROR_INTERVAL_S:
            self._error_sent_at[reason] = now
            count = self._errors_unsent.pop(reason)
            self.send(control.Error(code=reason, message=message, count=count))

    def _fail(self, exc: ProtocolError) -> None:
        log.warning("closing %s (port %d): %s", self.peer, self.port, safe(exc))
        self._error(exc.code, str(exc), fatal=True)

    def close(self, last_frame: bytes | None = None) -> None:
        """Send ``last_frame`` if given, flush, close; nothing more is read or forwarded."""
        if self.closing or self.transport is None:
            return
        if last_frame is not None:
            self.transport.write(last_frame)
        self.closing = True
        self.forwarder.close()
        self.broker.detach(self)
        self.transport.close()

    def abort(self) -> None:
        self.closing = True
        if self.transport is not None:
            self.transport.abort()

    def _pause_reading(self) -> None:
        if not self.reading_paused and self.transport is not None:
            self.reading_paused = True
            self.transport.pause_reading()

    def _release_blocked(self) -> None:
        blocked, self.blocked = self.blocked, set()
        for publisher in blocked:
            if publisher.reading_paused and not publisher.closing and publisher.transport is not None:
                publisher.reading_paused = False
                publisher.transport.resume_reading()

    def stats(self) -> dict[str, Any]:
        return {
            "port": self.port,
            "name": self.name,
            "role": self.role,
            "peer": self.peer,
            "frames_in": self.frames_in,
            "bytes_in": self.bytes_in,
            "frames_out": self.frames_out,
            "bytes_out": self.bytes_out,
            "dropped": self.dropped,
            "policy": self.slow_consumer,
            "queued": self.queued_bytes,
            "buffered": self.buffered_bytes,
            "paused": self.paused,
            "reading_paused": self.reading_paused,
        }


#: The answers: never answered, or two brokers would argue forever.
_NEVER_ANSWERED = (control.ERROR, control.GOING_AWAY, control.WELCOME, control.PONG)
_HANDLERS: dict[type[control.Message], Callable[[BrokerConnection, Any], None]] = {
    control.Hello: BrokerConnection._on_hello,
    control.Ping: BrokerConnection._on_ping,
    control.StatsRequest: BrokerConnection._on_stats,
    control.SlowConsumerRequest: BrokerConnection._on_slow_consumer,
    control.Subscribe: BrokerConnection._on_subscribe,
    control.Unsubscribe: BrokerConnection._on_subscribe,
    control.Link: BrokerConnection._on_link,
    control.Unlink: BrokerConnection._on_unlink,
    control.Error: BrokerConnection._on_error,
    control.GoingAway: BrokerConnection._on_going_away,
    control.Welcome: BrokerConnection._on_welcome,
    control.Pong: BrokerConnection._on_pong,
}
