"""What the two daemons (broker, orchestrator) share: the bound address and serving until told to stop."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any


class Serving:
    """Mixin for a server with ``_server`` (asyncio.AbstractServer), ``_closed`` (Event), ``start()``, ``close()``."""

    _server: asyncio.AbstractServer | None
    _closed: asyncio.Event | None

    async def start(self) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError

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
