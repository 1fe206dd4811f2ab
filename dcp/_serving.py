"""What the two daemons (broker, orchestrator) share: the bound address, admitting
hellos by their token, and serving until told to stop."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

from .auth import admit
from .control import Hello
from .errors import AuthError

log = logging.getLogger(__name__)


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
        if not self.config.require_token:
            return hello
        assert self.secret is not None  # the config checks that require_token has secret_file
        try:
            claims = admit(self.secret, hello.to_body(), time.time())
        except AuthError as exc:
            log.warning("refusing the %s hello of %s (%s): %s", hello.role, hello.name or "-", peer, exc)
            raise
        return replace(hello, name=hello.name or claims.name)

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
