"""systemd's notify protocol, with the standard library: ``Type=notify`` units.

A daemon started by systemd with ``NOTIFY_SOCKET`` set tells it ``READY=1`` once it
listens, ``STOPPING=1`` when it starts shutting down, and, when the unit sets
``WatchdogSec=`` (``WATCHDOG_USEC``), ``WATCHDOG=1`` every half of that interval
from its event loop, so a stuck loop is restarted.  Without ``NOTIFY_SOCKET`` every
call does nothing.  A datagram that cannot be sent is logged at debug and dropped:
notification never stops a daemon.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Mapping

__all__ = ["Notifier"]

log = logging.getLogger(__name__)


class Notifier:
    """Sends sd_notify datagrams to ``address`` (None: not started by systemd)."""

    def __init__(self, address: str | None, watchdog_s: float | None = None) -> None:
        self.address = address
        #: Seconds between watchdog pings (half of WatchdogSec); None: no watchdog.
        self.watchdog_s = watchdog_s
        self._pinger: asyncio.Task[None] | None = None

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] = os.environ, pid: int | None = None) -> Notifier:
        """The notifier systemd's variables describe: ``NOTIFY_SOCKET``, and ``WATCHDOG_USEC``
        (for this process only, when ``WATCHDOG_PID`` names another)."""
        address = environ.get("NOTIFY_SOCKET") or None
        watchdog_s = None
        usec = environ.get("WATCHDOG_USEC", "")
        owner = environ.get("WATCHDOG_PID", "")
        if usec.isdigit() and int(usec) > 0 and (not owner or owner == str(pid if pid is not None else os.getpid())):
            watchdog_s = int(usec) / 2e6
        return cls(address, watchdog_s)

    def notify(self, *assignments: str) -> bool:
        """Send ``KEY=VALUE`` lines in one datagram; whether it was sent."""
        if not self.address:
            return False
        target = "\0" + self.address[1:] if self.address.startswith("@") else self.address  # @: the abstract namespace
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto("\n".join(assignments).encode(), target)
        except OSError as exc:
            log.debug("cannot notify systemd at %s: %s", self.address, exc)
            return False
        return True

    def ready(self, status: str) -> None:
        """Listening: systemd may start what depends on this unit; the watchdog starts."""
        self.notify("READY=1", f"STATUS={status}")
        if self.watchdog_s and self._pinger is None:
            self._pinger = asyncio.get_running_loop().create_task(self._ping(self.watchdog_s))

    def stopping(self) -> None:
        """Shutting down: no more watchdog pings."""
        if self._pinger is not None:
            self._pinger.cancel()
            self._pinger = None
        self.notify("STOPPING=1")

    async def _ping(self, interval_s: float) -> None:
        while True:
            self.notify("WATCHDOG=1")
            await asyncio.sleep(interval_s)
