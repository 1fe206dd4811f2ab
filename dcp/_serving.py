"""What the two daemons (broker, orchestrator) share: the bound address, admitting
hellos by their token, bounding what one address or one name may hold, and serving
until told to stop.

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
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

from ._guard import safe
from .auth import admit
from .control import Hello
from .errors import AuthError
from .wire import HEADER_SIZE, Limits

log = logging.getLogger(__name__)


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
    """Mixin for a server with ``config`` (``require_token``), ``secret``, ``_server``
    (asyncio.Server), ``_closed`` (Event), ``start()``, ``close()``."""

    config: Any
    secret: bytes | None
    _server: asyncio.Server | None
    _closed: asyncio.Event | None

    async def start(self) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError

    def admit(self, hello: Hello, peer: str) -> Hello:
        """The hello to go on with: as it came, or, with ``--require-token``, checked
        (:func:`dcp.auth.admit`) and named after its token if it gives no name.

        Raises:
            AuthError: the token does not admit it (logged); refuse the connection.
        """
        return self.admit_as(hello, peer)[0]

    def admit_as(self, hello: Hello, peer: str) -> tuple[Hello, str]:
        """:meth:`admit`, and the name the connection counts under for a per-name
        limit: its token's with ``--require-token`` (an admin token's name too, whatever
        the hello says), else the name its hello gives ("" for none).

        Raises:
            AuthError: the token does not admit it (logged); refuse the connection.
        """
        if not self.config.require_token:
            return hello, hello.name
        assert self.secret is not None  # the config checks that require_token has secret_file
        try:
            claims = admit(self.secret, hello.to_body(), time.time())
        except AuthError as exc:
            log.warning("refusing the %s hello of %s (%s): %s", safe(hello.role), safe(hello.name or "-"), peer, exc)
            raise
        return replace(hello, name=hello.name or claims.name), claims.name

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
