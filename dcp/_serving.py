"""What the two daemons (broker, orchestrator) share: the bound address, who needs a
token (:func:`access_table`: secure by default, ``--insecure`` only when asked, and
said at start by :meth:`Serving.warn_exposure`), admitting hellos by their token,
bounding what one address or one name may hold, and serving until told to stop.

What bounds a connection before its hello, for a daemon to adopt in a few lines (the
broker does): :func:`pre_hello_limits` for its decoder until the hello is accepted;
a ``loop.call_later(hello_timeout_s, ...)`` per connection, cancelled at the hello, that
refuses it with ``hello_timeout``; a :class:`Quota` per peer address, taken at accept,
and one per name (:meth:`Serving.admit_as` says which name counts), taken at the hello,
each given back when the connection is lost; refusals with ``connection_limit``.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

from ._guard import is_loopback, safe
from . import control
from .auth import ORCHESTRATOR_AUDIENCE, admit
from .control import Hello, Permissions
from .errors import AuthError, ConfigError
from .wire import HEADER_SIZE, Limits, encode_control

log = logging.getLogger(__name__)

#: A refusal code is logged at most once per this interval (:meth:`Serving.log_refusal`).
REFUSAL_LOG_INTERVAL_S = 1.0
#: How long a connection refused as it came may stay to read its error frame before it
#: is aborted (:meth:`GuardedConnection.refuse`).
REFUSE_LINGER_S = 2.0
#: File descriptors kept out of the connection capacity: the listening socket, the
#: orchestrator's connection, log files, name lookups, sqlite, and a burst of
#: connections accepted only to be refused (``too_many_connections``).
FD_RESERVE = 32

#: What an unauthenticated client may do at each daemon with ``--insecure``, for the
#: refusal to start without a secret and for the warning at start.
_UNGUARDED = {
    "broker": "link and unlink this broker, read its stats (every client's address and name) and link to it as a peer",
    "orchestrator": "register as a broker or under any free agent name, deploy and undeploy pipelines, and read status",
}


def access_table(table: Permissions, config: Any) -> Permissions:
    """The permission table a daemon serves with: ``table`` as it is (its ``token_roles``
    need a token), every role needing one with ``require_token`` (or when every role
    does anyway), none with ``insecure``.

    Raises:
        ConfigError: neither ``secret_file`` (to check tokens with) nor ``insecure``:
            the daemon refuses to start rather than admit its privileged roles unchecked.
    """
    if config.insecure:
        return table.insecure()
    if not config.secret_file:
        needs = ", ".join(role for role in table.hello_roles if table.needs_token(role))
        raise ConfigError(
            f"refusing to start without authentication: {needs} connections need a token, checked with a secret "
            f"(made by dcp secret); pass --secret-file FILE (secret_file), or --insecure (insecure) to "
            f"let anyone who can connect {_UNGUARDED.get(table.daemon, 'do anything')}"
        )
    if config.require_token or table.token_roles == set(table.hello_roles):
        return table.requiring_token()
    return table


def pre_hello_limits(limits: Limits) -> Limits:
    """What a connection may send before its hello is accepted: control frames only, so
    no frame longer than ``max_control`` and its header (64 KiB by default, not the 8 MiB
    of ``max_frame``): a connection nobody admitted holds that much at most."""
    return replace(limits, max_frame=min(limits.max_frame, HEADER_SIZE + limits.max_control))


class Quota:
    """Connections held per key (a peer address, a name) against ``limit`` (0: no limit,
    and nothing counted); O(1) per connection.  ``refused`` counts the refusals."""

    __slots__ = ("limit", "counts", "refused")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.counts: dict[str, int] = {}
        self.refused = 0

    def take(self, key: str) -> bool:
        """One more connection of ``key``: True if it fits (counted; give it back with
        :meth:`give`), False if ``key`` is at the limit (counted as refused)."""
        if not self.limit:
            return True
        count = self.counts.get(key, 0)
        if count >= self.limit:
            self.refused += 1
            return False
        self.counts[key] = count + 1
        return True

    def give(self, key: str) -> None:
        """A connection of ``key`` that :meth:`take` admitted is gone."""
        count = self.counts.get(key)
        if count is None:
            return
        if count > 1:
            self.counts[key] = count - 1
        else:
            del self.counts[key]


class Serving:
    """Mixin for a server with ``config`` (``insecure``, ``require_token``, ``tls_cert``,
    ``hello_timeout_s``), ``secret``, ``permissions`` (:func:`access_table`), the quotas
    ``per_address`` and ``per_name``, ``_server`` (asyncio.Server), ``_loop``,
    ``_closed`` (Event), ``start()``, ``close()``."""

    config: Any
    secret: bytes | None
    permissions: Permissions
    per_address: Quota
    per_name: Quota
    hello_timeouts: int
    _loop: asyncio.AbstractEventLoop | None
    #: connections at most (:meth:`set_capacity`), and those refused past it
    capacity: int = sys.maxsize
    refused: int = 0
    _refusals_logged_at: dict[str, float]  # refusal code -> when last logged (log_refusal)
    _server: asyncio.Server | None
    _closed: asyncio.Event | None

    async def start(self) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError

    def audiences(self, local: str) -> frozenset[str]:
        """What this server answers to as the audience of a broker token, on a connection
        whose local end is ``local`` (``HOST:PORT``, :func:`dcp.auth.endpoint`): the
        orchestrator's name for itself; the broker overrides it with its own."""
        return frozenset({ORCHESTRATOR_AUDIENCE})

    def admit(self, hello: Hello, peer: str) -> Hello:
        """The hello to go on with: as it came, or, where its role needs a token
        (``permissions.needs_token``), checked (:func:`dcp.auth.admit`) and named after
        its token if it gives no name.

        Raises:
            AuthError: the token does not admit it (logged); refuse the connection.
        """
        return self.admit_as(hello, peer)[0]

    def admit_as(self, hello: Hello, peer: str, local: str = "") -> tuple[Hello, str]:
        """:meth:`admit`, and the name the connection counts under for a per-name
        limit: its token's where its role needs one (an admin token's name too,
        whatever the hello says), else the name its hello gives ("" for none).  A
        broker token must name one of :meth:`audiences` for ``local``.

        Raises:
            AuthError: the token does not admit it (logged); refuse the connection.
        """
        permissions = self.permissions
        if not permissions.needs_token(hello.role):
            return hello, hello.name
        assert self.secret is not None  # access_table: a role needs a token only where there is a secret
        try:
            claims = admit(self.secret, hello.to_body(), time.time(), self.audiences(local))
        except AuthError as exc:
            log.warning("refusing the %s hello of %s (%s): %s", safe(hello.role), safe(hello.name or "-"), peer, safe(exc))
            if exc.code == "token_missing" and not permissions.token_required:
                raise AuthError(
                    "token_missing",
                    f"this {permissions.daemon} admits {hello.role} connections only with a token (see dcp token); "
                    "it was not started with --insecure",
                ) from None
            raise
        return replace(hello, name=hello.name or claims.name), claims.name

    def set_capacity(self, limits: tuple[int, int, int], open_now: int) -> None:
        """Connections at most, once listening: ``max_connections`` if set, and what the
        open-file limit leaves once the ``open_now`` files and :data:`FD_RESERVE` are set
        aside.  ``limits``: (soft before, soft now, hard), from
        :func:`dcp._loop.raise_open_file_limit`."""
        before, soft, hard = limits
        unlimited = resource.RLIM_INFINITY
        capacity = sys.maxsize if soft == unlimited else max(0, soft - open_now - FD_RESERVE)
        if self.config.max_connections:
            capacity = min(capacity, self.config.max_connections)
        self.capacity = capacity
        log.info(
            "open files: soft limit %s -> %s (hard %s); %s connections at most%s",
            *("unlimited" if n == unlimited else n for n in (before, soft, hard)),
            "unlimited" if capacity == sys.maxsize else capacity,
            " (max_connections)" if capacity == self.config.max_connections else "",
        )

    def refusing(self, open_now: int) -> bool:
        """Whether a connection just accepted, with ``open_now`` open in all, is past the
        capacity: counted, and logged at most once a second."""
        if open_now <= self.capacity:
            return False
        self.refused += 1
        self.log_refusal("too_many_connections", "%d open, capacity %d; %d refused so far", open_now - 1, self.capacity, self.refused)
        return True

    def log_refusal(self, code: str, message: str, *args: Any) -> None:
        """Log a refusal of ``code``, at most once a second per code (a flood of
        connections makes one line a second, not one per connection)."""
        now = time.monotonic()
        if now - self._refusals_logged_at.get(code, float("-inf")) >= REFUSAL_LOG_INTERVAL_S:
            self._refusals_logged_at[code] = now
            log.warning("refusing connections (%s): " + message, code, *args)

    def warn_exposure(self, host: str, port: int) -> None:
        """At start, one warning line per way this daemon is exposed: ``--insecure``
        (its privileged roles admit anyone), and no TLS on an address other than
        loopback (tokens, control frames and data in clear on the network)."""
        daemon = self.permissions.daemon
        if self.config.insecure:
            log.warning(
                "INSECURE: dcp %s on %s:%d runs with --insecure: anyone who can connect may %s, without a token",
                daemon, host, port, _UNGUARDED.get(daemon, "do anything"),
            )
        if not self.config.tls_cert and not is_loopback(host):
            log.warning(
                "dcp %s listens on %s:%d, beyond loopback, without TLS: tokens, control frames and data travel in clear "
                "(serve TLS with --tls-cert and --tls-key)", daemon, host, port,
            )

    @property
    def address(self) -> tuple[str, int]:
        """The (host, port) actually bound."""
        if self._server is None:
            raise RuntimeError(f"{type(self).__name__.lower()} not started")
        sockname = self._server.sockets[0].getsockname()
        return sockname[0], sockname[1]

    async def serve_forever(self, shutdown_trigger: Callable[[], Awaitable[Any]] | None = None) -> None:
        """Serve until ``shutdown_trigger()`` returns (or ``close()`` is called), then close."""
        if self._server is None:
            await self.start()
        assert self._closed is not None
        if shutdown_trigger is None:
            await self._closed.wait()
        else:
            trigger = asyncio.ensure_future(shutdown_trigger())
            closed = asyncio.ensure_future(self._closed.wait())
            await asyncio.wait({trigger, closed}, return_when=asyncio.FIRST_COMPLETED)
            for fut in (trigger, closed):
                fut.cancel()
        await self.close()


class GuardedConnection:
    """Mixin for a connection of a :class:`Serving` daemon (``server``): what bounds it
    before its hello (an address quota taken at accept, the hello deadline), the name
    quota taken at its hello, refusals as it comes, and all of it given back when it
    is lost (:meth:`release_guard`)."""

    transport: asyncio.Transport | None
    closing: bool
    peer: str
    role: str
    _hello_due: asyncio.TimerHandle | None = None  # the hello deadline, until the hello is accepted
    _linger: asyncio.TimerHandle | None = None  # refused as it came: the abort if the peer stays
    _address: str | None = None  # the peer address it counts under (per_address)
    _counted_name: str | None = None  # the name it counts under (per_name), from its hello

    @property
    def server(self) -> Serving:
        raise NotImplementedError

    def guard(self, address: str, open_now: int) -> bool:
        """A connection just accepted from ``address``, with ``open_now`` open in all:
        within the daemon's capacity and that address's quota (counted), and on the clock
        for its hello, True; else refused, False."""
        server = self.server
        daemon = server.permissions.daemon
        if server.refusing(open_now):
            self.refuse(
                "too_many_connections",
                f"this {daemon} is at its {server.capacity} connections (its open-file limit, or max_connections); try later",
            )
            return False
        if not server.per_address.take(address):
            limit = server.per_address.limit
            server.log_refusal("connection_limit", "%s holds %d connections already (max_connections_per_address)", safe(address), limit)
            self.refuse(
                "connection_limit",
                f"this {daemon} admits at most {limit} connections from {address}; close one, or try later",
            )
            return False
        if server.per_address.limit:
            self._address = address
        timeout = server.config.hello_timeout_s
        if timeout and server._loop is not None:  # (one driven without a loop, as in tests, has no clock)
            self._hello_due = server._loop.call_later(timeout, self._hello_overdue)
        return True

    def _hello_overdue(self) -> None:
        """No hello accepted within ``hello_timeout_s``: refused."""
        self._hello_due = None
        if self.closing or self.role or self.hello_waiting():
            return
        server = self.server
        server.hello_timeouts += 1
        timeout = server.config.hello_timeout_s
        server.log_refusal("hello_timeout", "no hello within %g s (%s); %d so far", timeout, self.peer, server.hello_timeouts)
        self.refuse("hello_timeout", f"no hello within {timeout:g} s of connecting (hello_timeout_s)")

    def hello_accepted(self, counted: str) -> str | None:
        """The hello is admitted, counting under the name ``counted`` ("": none): None if
        that name is within its quota (counted; no deadline any more), else the message
        of the ``connection_limit`` refusal to send."""
        server = self.server
        if counted and server.per_name.limit:
            if not server.per_name.take(counted):
                limit, daemon = server.per_name.limit, server.permissions.daemon
                server.log_refusal(
                    "connection_limit", "%s holds %d connections already (max_connections_per_name); refusing %s",
                    safe(counted), limit, self.peer,
                )
                return (
                    f"{limit} connections named {safe(counted)!r} are open on this {daemon} already "
                    f"(max_connections_per_name); close one, or try again once the {daemon} has seen a lost one go"
                )
            self._counted_name = counted
        if self._hello_due is not None:
            self._hello_due.cancel()
            self._hello_due = None
        return None

    def let_go(self) -> None:
        """What a refused connection holds, let go at once (the broker: a partial frame)."""

    def hello_waiting(self) -> bool:
        """Whether its hello was read and waits to be served (the deadline is for sending
        it, not for a busy daemon to get to it)."""
        return False

    def refuse(self, code: str, message: str) -> None:
        """Refused as it comes: a fatal error frame, our end shut, nothing more read.
        Closing at once could reset the connection (what it sent may be unread) and lose
        the frame, so the peer has :data:`REFUSE_LINGER_S` to read it and close first."""
        assert self.transport is not None
        transport = self.transport
        transport.write(encode_control(control.Error(code=code, message=message, fatal=True).to_body()))
        self.closing = True
        self.let_go()
        if transport.can_write_eof():
            transport.write_eof()
            self._linger = asyncio.get_running_loop().call_later(REFUSE_LINGER_S, transport.abort)
        else:  # TLS
            transport.close()

    def release_guard(self) -> None:
        """The connection is lost: its timers cancelled, its quotas given back."""
        for timer in (self._hello_due, self._linger):
            if timer is not None:
                timer.cancel()
        self._hello_due = self._linger = None
        server = self.server
        if self._address is not None:
            server.per_address.give(self._address)
            self._address = None
        if self._counted_name is not None:
            server.per_name.give(self._counted_name)
            self._counted_name = None
