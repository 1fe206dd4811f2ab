"""Peer links: a broker-to-broker connection that holds one port at each end.

For the data path a link is a port like any other: frames arriving on it are
forwarded by ``X mod key``, frames routed to it are written to it.  What makes it a
link is its life cycle.  The dialling end redials with backoff after any failure
but a refusal that cannot heal (:data:`FINAL_REFUSALS`), which it logs once and keeps
in the link's state (``refused``, the reason in ``last_error``) until it is unlinked;
both ends ping to measure the round trip and to cut a link that stopped answering;
both ends keep the link's port reserved while it is down, so the topology numbers
that name it stay valid and delivery resumes, with no process restarted, when it
comes back.  Frames routed to a link that is down are counted (``link_down``), not
queued.  The accepting end knows a returning peer by (peer key, peer port) and
frees the port if the peer stays away for ``link_hold_s``, once the link has carried a
ping or a pong from the peer (the dialler pings as soon as it is welcomed); a peer that
said hello and went without one (never up, or a fake hello) frees its port at once.

With ``--tls-ca`` the dialling end speaks TLS and verifies the peer's certificate;
with a secret its hello carries a short-lived ``broker`` token it issues itself, which
the peer checks (:mod:`dcp.auth`).  The token names its audience, the address dialled
and the address the connection reached, so the peer refuses one meant for another
server; and it goes only to a peer the broker trusts: over verified TLS, to an address
it was configured with (``--peer``), or to one an admin it authenticated (a token
checked) asked for.  A link to any other address (e.g. the admin op ``link`` on a
broker run ``--insecure``) dials without one, and says so in the log.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import Counter
import ssl
from collections.abc import Iterable
from typing import Any, Protocol

from ._guard import safe
from .auth import REFUSALS, endpoint
from .backoff import Backoff
from .config import BrokerConfig, parse_address
from .control import WELCOME, Error, Hello, Message, Ping, Unlink, Welcome
from .errors import BadRequest, ConnectionClosed, DcpError, DcpTimeout, LinkRefused, RemoteError
from .routing import int_to_bytes

__all__ = ["Link", "LinkHost", "LinkConnection", "LINK_COUNTERS", "FINAL_REFUSALS"]

log = logging.getLogger(__name__)

#: Per-link counters, summed over every connection the link has had.
LINK_COUNTERS = ("frames_in", "bytes_in", "frames_out", "bytes_out", "dropped")
#: Refusals of a link that redialling cannot heal, so the dialler stops: the peer has one
#: of this broker's keys, routes by a table, or will not take this broker's token (none
#: sent, another secret, a wrong role, name or audience).  Not ``token_expired``: each
#: dial issues a fresh token, so that one means clocks that disagree, which can be fixed
#: while the link waits.
FINAL_REFUSALS = frozenset({"same_key", "wrong_mode", *(REFUSALS - {"token_expired"})})


class LinkConnection(Protocol):
    """What a link needs of the connection that carries it (a broker's).

    The link sets ``name`` (the peer's, from its welcome) and only reads the rest:
    the address and the counters (``LINK_COUNTERS``), which the connection may
    keep as attributes or properties.
    """

    name: str

    @property
    def peer(self) -> str: ...

    @property
    def frames_in(self) -> int: ...

    @property
    def bytes_in(self) -> int: ...

    @property
    def frames_out(self) -> int: ...

    @property
    def bytes_out(self) -> int: ...

    @property
    def dropped(self) -> int: ...

    def send(self, message: Message) -> None: ...

    def close(self) -> None: ...

    def abort(self) -> None: ...


class LinkHost(Protocol):
    """What a link needs of its broker."""

    config: BrokerConfig
    name: str
    key: int
    tls_client: ssl.SSLContext | None

    @property
    def announced_keys(self) -> list[int] | None: ...

    def shared_key(self, root: int, keys: list[int] | None) -> int | None:
        """A key this broker shares with a peer announcing ``root`` and ``keys``, if any."""

    @property
    def closing(self) -> bool: ...

    def new_connection(self, link: Link) -> asyncio.Protocol:
        """A connection protocol that carries ``link`` (it calls the link's callbacks)."""

    def attach(self, conn: Any, port: int) -> int | None:
        """Put ``conn`` on the link's ``port``."""

    def state_changed(self) -> None: ...

    def remove_link(self, link: Link, notify: bool) -> None: ...

    def token(self, audience: Iterable[str]) -> str | None:
        """A fresh ``broker`` token for the servers named in ``audience``; None without a secret."""


class Link:
    """One link of a broker: outbound (``address`` given, redialled) or inbound."""

    def __init__(
        self, broker: LinkHost, port: int, *, address: str | None = None, identity: tuple[int, int] | None = None,
        vouched: bool = False,
    ) -> None:
        self.broker = broker
        self.port = port
        self.address = address or ""  # what an outbound link dials
        self.outbound = address is not None
        self.vouched = vouched  # outbound: configured (--peer), or asked for by an admin whose token was checked
        self.identity = identity  # inbound: (peer key, peer's port for this link)
        self.state = "down"
        self.conn: LinkConnection | None = None
        self.remote_key = identity[0] if identity else 0
        self.remote_port = identity[1] if identity else -1
        self.remote_name = ""
        self.rtt_s: float | None = None
        self.connects = 0
        self.undelivered = 0  # frames routed here while the link was down
        self.last_error = ""
        #: Inbound: the peer has sent a ping or a pong on this link (it was up both ways):
        #: only then is its port held for ``link_hold_s`` after its connection ends.
        self.confirmed = False
        self.warned_cleartext = False  # outbound: a token went over plain TCP, and we said so
        self.warned_untrusted = False  # outbound: a token was held back from an untrusted peer, and we said so
        self._totals: Counter[str] = Counter()
        self._task: asyncio.Task[None] | None = None
        self._expiry: asyncio.TimerHandle | None = None
        self._welcome: asyncio.Future[None] | None = None
        self._lost = asyncio.Event()
        self._settled = asyncio.Event()  # set while the link is up, or refused for good: what wait_up waits for
        self._refusal: LinkRefused | None = None
        self._pings: dict[int, float] = {}
        self._ping_ids = itertools.count(1)

    def __repr__(self) -> str:
        direction = f"to {self.address}" if self.outbound else f"from {self.remote_name or self.remote_key}"
        return f"<Link port {self.port} {direction} {self.state}>"

    # -- life cycle ---------------------------------------------------------

    def start(self) -> None:
        """Outbound: dial now and redial whenever the link is lost, until ``close()``."""
        self._task = asyncio.get_running_loop().create_task(self._dial_forever())

    async def wait_up(self, timeout: float) -> None:
        """Return once the link is up.

        Raises:
            LinkRefused: the peer refused it in a way that cannot heal; it no longer redials.
            DcpTimeout: not up after ``timeout`` seconds; it keeps redialling until unlinked.
        """
        try:
            await asyncio.wait_for(self._settled.wait(), timeout)
        except asyncio.TimeoutError:
            raise DcpTimeout(
                f"link on port {self.port} to {self.address or self._describe()} not up after {timeout}s "
                f"({self.last_error or self.state}); it keeps redialling until unlinked"
            ) from None
        if self._refusal is not None:
            raise self._refusal

    def close(self, notify: bool) -> None:
        """Stop the link for good; ``notify``: ask the peer to free its end now."""
        self.state = "closed"
        if self._task is not None:
            self._task.cancel()
        if self._expiry is not None:
            self._expiry.cancel()
        conn = self.conn
        if conn is not None:
            if notify:
                conn.send(Unlink())
            conn.close()

    async def _dial_forever(self) -> None:
        host, port = parse_address(self.address)
        config = self.broker.config
        delays = None
        while self.state != "closed":
            try:
                await self._dial(host, port)
            except (OSError, asyncio.TimeoutError, ConnectionClosed, RemoteError, BadRequest, LinkRefused) as exc:
                conn = self.conn
                if conn is not None:
                    self._connection_gone(conn)
                    conn.abort()
                if isinstance(exc, (RemoteError, LinkRefused)) and exc.code in FINAL_REFUSALS:
                    self._give_up(exc.code, exc.message if isinstance(exc, RemoteError) else str(exc))
                    return
                reason = safe(str(exc) or type(exc).__name__, 512)
                if reason != self.last_error:
                    log.warning("link port %d to %s: %s; redialling", self.port, self.address, reason)
                self.last_error = reason
                if delays is None:
                    delays = Backoff(initial_s=0.05, max_s=config.link_retry_max_s).delays()
                await asyncio.sleep(next(delays))
                continue
            delays = None
            await self._supervise()

    def _give_up(self, code: str, message: str) -> None:
        """Outbound: the peer refused the link for good; stop redialling and say why, once."""
        self.state = "refused"
        self.last_error = safe(f"{code}: {message}", 512)
        self._refusal = LinkRefused(code, f"link on port {self.port} to {self.address} refused: {self.last_error}")
        self._settled.set()
        self.broker.state_changed()
        log.error(
            "link port %d to %s refused: %s; not redialling, as that cannot heal by itself: fix the cause, then link "
            "again (dcp unlink, dcp link) or restart this broker", self.port, self.address, self.last_error,
        )

    async def _dial(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        timeout = self.broker.config.link_timeout_s
        self._welcome = loop.create_future()
        self._lost.clear()
        connect = loop.create_connection(lambda: self.broker.new_connection(self), host, port, ssl=self.broker.tls_client)
        await asyncio.wait_for(connect, timeout)
        await asyncio.wait_for(self._welcome, timeout)

    @property
    def trusted(self) -> bool:
        """Outbound: a peer our token may go to: verified by TLS (``--tls-ca``), or
        :attr:`vouched` for, not merely named at run time by someone unauthenticated."""
        return self.broker.tls_client is not None or self.vouched

    def hello(self, reached: tuple[Any, ...] | None = None) -> Hello:
        """What the dialling end says first; with a secret and a :attr:`trusted` peer, a
        token of our own (role ``broker``) for ``reached`` (the connection's peer address)
        and, when TLS verified it or it was configured, for the address as dialled."""
        broker = self.broker
        audience = []
        if broker.tls_client is not None or self.address in broker.config.peers:
            audience.append(self.address)  # a host name only where nobody else chose it, or TLS checked it
        if reached:
            audience.append(endpoint(str(reached[0]), int(reached[1])))
        token = broker.token(dict.fromkeys(audience))
        if token is not None and not self.trusted:
            token = None
            if not self.warned_untrusted:
                self.warned_untrusted = True
                log.warning(
                    "link port %d to %s: dialling without this broker's token: the address is not a configured --peer, no "
                    "admin with a token asked for it, and the link is not TLS (--tls-ca), so nothing vouches for who answers; "
                    "a peer that needs a token refuses it",
                    self.port, safe(self.address),
                )
        return Hello(id=0, role="peer", name=broker.name, key=broker.key, keys=broker.announced_keys, link=self.port, token=token)

    def welcomed(self, conn: LinkConnection, welcome: Welcome) -> None:
        """Outbound: the peer accepted the link and gave it port ``welcome.port``.

        A welcome without the peer's key or port refuses the link, as a malformed one
        does (:meth:`refuse`); one nobody waits for is ignored.
        """
        waiting = self._waiting(conn)
        if waiting is None:
            log.warning("link port %d (%s): ignoring a welcome it did not wait for", self.port, self._describe())
            return
        if welcome.key is None or welcome.port is None:
            missing = "key" if welcome.key is None else "port"
            self.refuse(conn, BadRequest(WELCOME, missing, f"{missing} is required: a link needs the peer's key and its port"))
            return
        shared = self.broker.shared_key(welcome.key, welcome.keys)
        if shared is not None:
            self.refuse(conn, LinkRefused("same_key", f"the peer has this broker's key {shared}; give each broker its own --key"))
            return
        self.remote_key, self.remote_port = welcome.key, welcome.port
        self.remote_name = conn.name = welcome.name
        self.broker.attach(conn, self.port)
        self._set_up(conn)
        self._ping(conn)  # at once: the accepting end holds the port of a link only once it heard from it
        waiting.set_result(None)

    def refused(self, conn: LinkConnection, error: Error) -> None:
        """Outbound: the peer answered the hello with an error."""
        self.refuse(conn, RemoteError(error.code, error.message))

    def refuse(self, conn: LinkConnection, reason: DcpError) -> None:
        """Outbound: the answer to the hello refuses the link (the dialler logs ``reason``
        and redials, or with one of :data:`FINAL_REFUSALS` stops); nothing if ``conn`` no
        longer waits for one."""
        waiting = self._waiting(conn)
        if waiting is not None:
            waiting.set_exception(reason)

    def _waiting(self, conn: LinkConnection) -> asyncio.Future[None] | None:
        """The answer to the hello of this outbound link, if ``conn`` is its and still waits for it."""
        welcome = self._welcome
        return welcome if welcome is not None and not welcome.done() and conn is self.conn else None

    def accepted(self, conn: LinkConnection, name: str) -> None:
        """Inbound: the peer dialled (again); ``conn`` now carries the link."""
        old = self.conn
        if old is not None and old is not conn:
            log.info("link port %d: %s dialled again; dropping the old connection", self.port, safe(name))
            self._connection_gone(old)
            old.abort()
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        self.remote_name = name
        self.conn = conn
        self.broker.attach(conn, self.port)
        self._set_up(conn)
        self._lost.clear()
        self._task = asyncio.get_running_loop().create_task(self._supervise())

    def connection_made(self, conn: LinkConnection) -> None:
        self.conn = conn
        self.connects += 1

    def heard(self, conn: LinkConnection) -> None:
        """The peer sent a ping or a pong on ``conn``: the link was up both ways."""
        if conn is self.conn:
            self.confirmed = True

    def connection_lost(self, conn: LinkConnection) -> None:
        if conn is not self.conn:
            return
        self._connection_gone(conn)
        if self._welcome is not None and not self._welcome.done():
            self._welcome.set_exception(ConnectionClosed("connection closed before the peer accepted the link"))
        if not self.outbound and self.state != "closed" and not self.broker.closing:
            if not self.confirmed:  # a hello, then nothing from the peer: nothing to hold the port for
                log.info("link port %d (%s) went before the peer was heard from; freeing its port now", self.port, self._describe())
                self.broker.remove_link(self, False)
                return
            self._expiry = asyncio.get_running_loop().call_later(
                self.broker.config.link_hold_s, self.broker.remove_link, self, False
            )

    def _connection_gone(self, conn: LinkConnection) -> None:
        for name in LINK_COUNTERS:
            self._totals[name] += getattr(conn, name)
        self.conn = None
        self._lost.set()
        self._settled.clear()
        self._pings.clear()
        if self.state == "up":
            log.warning("link port %d (%s) down", self.port, self._describe())
            self.state = "down"
            self.broker.state_changed()

    def _set_up(self, conn: LinkConnection) -> None:
        if not self.outbound:
            self.connects += 1
        self.state = "up"
        self.last_error = ""
        self._settled.set()
        self.broker.state_changed()
        log.info(
            "link up: port %d <-> %s port %d key=%d%s",
            self.port, self._describe(), self.remote_port, self.remote_key, "" if self.outbound else " (incoming)",
        )

    def _describe(self) -> str:
        if self.outbound:
            return f"{safe(self.remote_name)} ({self.address})" if self.remote_name else self.address
        return safe(self.remote_name) or str(self.remote_key)

    # -- health ---------------------------------------------------------------

    async def _supervise(self) -> None:
        """Ping every interval until the connection is lost; cut it if pings go unanswered."""
        config = self.broker.config
        while self.conn is not None:
            try:
                await asyncio.wait_for(self._lost.wait(), config.link_ping_interval_s)
                return
            except asyncio.TimeoutError:
                pass
            conn = self.conn
            if conn is None:
                return
            now = time.monotonic()
            if self._pings and now - min(self._pings.values()) > config.link_timeout_s:
                self.last_error = f"no answer to pings for {config.link_timeout_s}s"
                log.warning("link port %d (%s): %s; cutting it", self.port, self._describe(), self.last_error)
                self._connection_gone(conn)
                conn.abort()
                return
            self._ping(conn, now)

    def _ping(self, conn: LinkConnection, now: float | None = None) -> None:
        ping_id = next(self._ping_ids)
        self._pings[ping_id] = time.monotonic() if now is None else now
        conn.send(Ping(id=ping_id))

    def pong(self, ping_id: int | None) -> None:
        if ping_id is None:
            return
        sent = self._pings.pop(ping_id, None)
        if sent is not None:
            self.rtt_s = time.monotonic() - sent
            self._pings = {i: t for i, t in self._pings.items() if i > ping_id}

    def rtt_now_s(self, now: float) -> float | None:
        """The last round trip, or longer while a ping has waited longer for its pong: a
        link whose queues grow shows it before the pong comes back.  None: none measured."""
        if not self._pings:
            return self.rtt_s
        return max(self.rtt_s or 0.0, now - min(self._pings.values()))

    # -- counters ---------------------------------------------------------------

    @property
    def sent_bytes(self) -> int:
        """Bytes sent on the link since it was made, over every connection it had."""
        return self._totals["bytes_out"] + (self.conn.bytes_out if self.conn is not None else 0)

    def stats(self) -> dict[str, Any]:
        counters = Counter(self._totals)
        if self.conn is not None:
            for name in LINK_COUNTERS:
                counters[name] += getattr(self.conn, name)
        return {
            "port": self.port,
            "direction": "out" if self.outbound else "in",
            "address": self.address,
            "peer": self.conn.peer if self.conn is not None else "",
            "remote_name": self.remote_name,
            "remote_key": int_to_bytes(self.remote_key),
            "remote_port": self.remote_port,
            "state": self.state,
            "rtt_ms": None if self.rtt_s is None else round(self.rtt_s * 1000, 3),
            "connects": self.connects,
            "undelivered": self.undelivered,
            **{name: counters[name] for name in LINK_COUNTERS},
            "last_error": self.last_error,
        }
