"""A TCP server on a loopback port the OS chooses, for the fake peers of the tests."""

from __future__ import annotations

import asyncio


class LoopbackServer:
    """Serves each connection with :meth:`serve`; :meth:`close` aborts them all.

    ``writers`` holds the connections still open (a subclass may add others it opens).
    """

    def __init__(self) -> None:
        self.writers: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None

    async def start(self) -> str:
        """Listen; return ``HOST:PORT``."""
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        host, port = self._server.sockets[0].getsockname()[:2]
        return f"{host}:{port}"

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.add(writer)
        try:
            await self.serve(reader, writer)
        except ConnectionError:
            pass
        finally:
            writer.transport.abort()
            self.writers.discard(writer)

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError

    def abort_all(self) -> None:
        for writer in list(self.writers):
            writer.transport.abort()

    async def close(self) -> None:
        self.abort_all()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
