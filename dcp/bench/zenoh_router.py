"""A zenoh router for ``dcp bench``: one router-mode session in a process of its own.

``python -m dcp.bench.zenoh_router --listen tcp/127.0.0.1:7447`` opens a zenoh
session in router mode listening on that endpoint, prints ``zenoh router listening
on LOCATOR (zid ZID, zenoh VERSION)`` to stderr once the listener is bound, and runs
until SIGTERM or SIGINT (then closes the session and exits 0).  ``bench/peers``
starts it with the venv's python; the bench workers connect to it as zenoh clients.

The router is what ``zenohd`` would be with this configuration, minus the plugins
(no storage, no REST): multicast scouting off (it listens only on the endpoint it is
given, and never joins other zenoh nodes of the host), and the admin space on,
read-only.  The bench publisher's ``finish`` queries the admin space
(``@/<router zid>/router``) behind its data: see ``_pub_zenoh`` in
:mod:`dcp.bench.worker`.  The client library itself (``eclipse-zenoh``, the
``bench`` extra) is imported only in :func:`open_router`, so this module imports
without it.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from typing import Any

__all__ = ["DEFAULT_LISTEN", "router_config", "open_router", "main"]

DEFAULT_LISTEN = "tcp/127.0.0.1:7447"


def router_config(listen: str) -> Any:
    """The ``zenoh.Config`` of a router listening on ``listen`` (a zenoh endpoint)."""
    import zenoh

    config = zenoh.Config()
    config.insert_json5("mode", json.dumps("router"))
    config.insert_json5("listen/endpoints", json.dumps([listen]))
    # Only the endpoint given: no multicast scouting, no gossip towards other nodes of the host.
    config.insert_json5("scouting/multicast/enabled", "false")
    config.insert_json5("scouting/gossip/enabled", "false")
    # The publishers' finish asks the router's admin space a question behind their data (read only).
    config.insert_json5("adminspace/enabled", "true")
    config.insert_json5("adminspace/permissions", json.dumps({"read": True, "write": False}))
    return config


def open_router(listen: str) -> tuple[Any, dict[str, Any]]:
    """Open the router session; (session, its admin record: ``locators``, ``version``, ``zid``).

    Raises:
        zenoh.ZError: the endpoint is malformed or cannot be bound.
    """
    import zenoh

    session = zenoh.open(router_config(listen))
    try:
        # The router's own admin record, asked locally: it names the locators actually bound.
        record: dict[str, Any] = {}
        for reply in session.get(f"@/{session.zid()}/router", timeout=5.0):
            if reply.ok is not None:
                record = json.loads(reply.ok.payload.to_bytes())
        return session, record
    except BaseException:
        session.close()
        raise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dcp.bench.zenoh_router", description="A zenoh router for dcp bench.")
    parser.add_argument("--listen", default=DEFAULT_LISTEN, help=f"the zenoh endpoint to listen on (default {DEFAULT_LISTEN})")
    args = parser.parse_args(argv)
    try:
        import zenoh
    except ImportError as exc:
        print(f"zenoh router: the zenoh client is not installed ({exc}); pip install 'dcp-dataplane[bench]'", file=sys.stderr)
        return 1
    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        stop.set()

    # Installed before the session opens: a signal that comes while it starts still stops it.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, on_signal)
    try:
        session, record = open_router(args.listen)
    except zenoh.ZError as exc:
        print(f"zenoh router: cannot listen on {args.listen}: {exc}", file=sys.stderr, flush=True)
        return 1
    try:
        locators = ", ".join(record.get("locators") or [args.listen])
        version = str(record.get("version", "?")).split(" ", 1)[0].split("-", 1)[0]
        print(f"zenoh router listening on {locators} (zid {session.zid()}, zenoh {version})", file=sys.stderr, flush=True)
        # In slices: the handler runs in this (main) thread, whatever the wait does with signals.
        while not stop.wait(1.0):
            pass
    finally:
        session.close()
    print("zenoh router stopped", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
