"""What the broker and the orchestrator show on their metrics port (``--metrics-listen``).

Each scrape reads the counters where they are counted (no registry to keep in step)
and costs what the daemon holds: one pass over its connections and links.  Label
cardinality is bounded: reasons and directions are fixed sets; per-port series cover
the ``metrics_max_ports`` busiest attachments (by bytes since they attached; the
totals count every port); per-link series cover every link, which holds a port, and
so are bounded by the broker's ports.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from typing import Any, TypeAlias

from .config import parse_address
from .metrics import Family, Labels, ProcessMetrics, build_info
from .metrics_http import MetricsServer

# The daemons are typed Any here: dcp.broker and dcp.orchestrator import this module.
Broker: TypeAlias = Any
Orchestrator: TypeAlias = Any
Serving: TypeAlias = Any

__all__ = ["metrics_server", "broker_families", "broker_unready", "orchestrator_families", "orchestrator_unready"]

#: The orchestrator's planning time, seconds: a slice is bounded (tens of ms), a round may take seconds.
PLANNING_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_UNREADY_LISTED = 5  # links named in a /readyz answer; the rest are counted


def metrics_server(
    listen: str, daemon: str, families: Callable[[], list[Family]], unready: Callable[[], list[str]]
) -> MetricsServer:
    """The metrics port of a daemon (``listen``: its ``metrics_listen``), not started:
    ``families()`` after the build and process families every daemon shows."""
    process = ProcessMetrics()
    return MetricsServer(parse_address(listen), lambda: [*_common(daemon, process), *families()], unready)


def _connection_families(server: Serving, prefix: str, open_now: int) -> list[Family]:
    refused = Family(f"{prefix}_connections_refused_total", "counter", "connections refused, by reason")
    for reason, count in (
        ("too_many_connections", server.refused), ("hello_timeout", server.hello_timeouts),
        ("per_address", server.per_address.refused), ("per_name", server.per_name.refused),
    ):
        refused.add(count, (("reason", reason),))
    return [
        Family(f"{prefix}_connections", "gauge", "connections open").add(open_now),
        refused,
    ]


def _common(daemon: str, process: ProcessMetrics) -> list[Family]:
    from . import __version__  # dcp/__init__ sets it after importing what imports this module

    return [build_info(daemon, __version__), *process.families()]


def broker_families(broker: Broker) -> list[Family]:
    """Frames, bytes, drops, buffers, attachments, ports and links of ``broker``."""
    connections = broker.connections
    attachments = []
    buffered = queued = 0
    for conn in connections:  # one pass: a broker may hold tens of thousands
        buffered += conn.buffered_bytes
        queued += conn.queued_bytes
        if conn.port >= 0 and conn.link is None:
            attachments.append(conn)
    frames = Family("dcp_broker_frames_total", "counter", "data frames read (in) and written (out)")
    frames.add(broker.frames_in, (("direction", "in"),)).add(broker.frames_out, (("direction", "out"),))
    size = Family("dcp_broker_bytes_total", "counter", "bytes read (in) and forwarded (out)")
    size.add(broker.bytes_in, (("direction", "in"),)).add(broker.bytes_out, (("direction", "out"),))
    drops = Family("dcp_broker_drops_total", "counter", "data frames dropped, by reason")
    for reason, count in sorted(broker.drops.items()):
        drops.add(count, (("reason", reason),))
    families = [
        frames, size, drops,
        Family("dcp_broker_buffered_bytes", "gauge", "bytes in the output buffers of every connection").add(buffered),
        Family("dcp_broker_queued_bytes", "gauge", "bytes held by drop-oldest queues of paused ports").add(queued),
        Family("dcp_broker_attachments", "gauge", "agents and clients attached to a port").add(len(attachments)),
        Family("dcp_broker_ports", "gauge", "ports of this broker").add(broker.config.ports),
        *_connection_families(broker, "dcp_broker", len(connections)),
        *_port_families(attachments, broker.config.metrics_max_ports),
        *_link_families(broker),
    ]
    return families


def _port_families(attachments: list[Any], most: int) -> list[Family]:
    busiest = attachments if len(attachments) <= most else heapq.nlargest(most, attachments, key=lambda conn: conn.bytes_in + conn.bytes_out)
    frames = Family("dcp_broker_port_frames_total", "counter", f"data frames of a port, for the {most} busiest ports")
    size = Family("dcp_broker_port_bytes_total", "counter", f"bytes of a port, for the {most} busiest ports")
    dropped = Family("dcp_broker_port_dropped_total", "counter", "data frames dropped on their way to a port")
    buffered = Family("dcp_broker_port_buffered_bytes", "gauge", "bytes in a port's output buffer")
    queued = Family("dcp_broker_port_queued_bytes", "gauge", "bytes in a paused port's drop-oldest queue")
    for conn in sorted(busiest, key=lambda conn: conn.port):
        labels: Labels = (("port", str(conn.port)), ("name", conn.name))
        frames.add(conn.frames_in, (*labels, ("direction", "in"))).add(conn.frames_out, (*labels, ("direction", "out")))
        size.add(conn.bytes_in, (*labels, ("direction", "in"))).add(conn.bytes_out, (*labels, ("direction", "out")))
        dropped.add(conn.dropped, labels)
        buffered.add(conn.buffered_bytes, labels)
        queued.add(conn.queued_bytes, labels)
    return [frames, size, dropped, buffered, queued]


def _link_families(broker: Broker) -> list[Family]:
    up = Family("dcp_broker_link_up", "gauge", "1 when the link is up")
    rtt = Family("dcp_broker_link_rtt_seconds", "gauge", "the last measured round trip of a link's health ping, seconds")
    frames = Family("dcp_broker_link_frames_total", "counter", "data frames of a link")
    size = Family("dcp_broker_link_bytes_total", "counter", "bytes of a link")
    dropped = Family("dcp_broker_link_dropped_total", "counter", "data frames dropped on their way over a link")
    undelivered = Family("dcp_broker_link_undelivered_total", "counter", "data frames routed to a link while it was down")
    connects = Family("dcp_broker_link_connects_total", "counter", "times a link came up")
    for port, link in sorted(broker.links.items()):
        stats = link.stats()
        labels: Labels = (("port", str(port)), ("peer", link.address or link.remote_name))
        up.add(1 if link.state == "up" else 0, labels)
        if link.rtt_s is not None:
            rtt.add(link.rtt_s, labels)
        frames.add(stats["frames_in"], (*labels, ("direction", "in"))).add(stats["frames_out"], (*labels, ("direction", "out")))
        size.add(stats["bytes_in"], (*labels, ("direction", "in"))).add(stats["bytes_out"], (*labels, ("direction", "out")))
        dropped.add(stats["dropped"], labels)
        undelivered.add(link.undelivered, labels)
        connects.add(link.connects, labels)
    return [up, rtt, frames, size, dropped, undelivered, connects]


def broker_unready(broker: Broker) -> list[str]:
    """What keeps ``broker`` from being ready: shutting down, not registered with its
    orchestrator, links that are not up."""
    if broker.closing:
        return ["shutting down"]
    missing = []
    if broker.config.orchestrator and not broker.registered:
        missing.append(f"not registered with the orchestrator at {broker.config.orchestrator}")
    down = [link for _, link in sorted(broker.links.items()) if link.state != "up"]
    for link in down[:_UNREADY_LISTED]:
        missing.append(f"link on port {link.port} ({link.address or link.remote_name or 'incoming'}) is {link.state}")
    if len(down) > _UNREADY_LISTED:
        missing.append(f"{len(down) - _UNREADY_LISTED} more link(s) not up")
    return missing


def orchestrator_families(do: Orchestrator) -> list[Family]:
    """Brokers, agents, pipelines, streams, planning time and pushes of ``do``."""
    brokers_online = sum(1 for record in do.brokers.values() if record.conn is not None)
    agents_online = sum(1 for record in do.agents.values() if record.conn is not None)
    brokers = Family("dcp_orchestrator_brokers", "gauge", "brokers registered (offline: in their grace period)")
    brokers.add(brokers_online, (("state", "online"),)).add(len(do.brokers) - brokers_online, (("state", "offline"),))
    agents = Family("dcp_orchestrator_agents", "gauge", "agents registered (offline: in their grace period)")
    agents.add(agents_online, (("state", "online"),)).add(len(do.agents) - agents_online, (("state", "offline"),))
    return [
        brokers, agents,
        Family("dcp_orchestrator_pipelines", "gauge", "pipelines deployed").add(len(do.pipelines)),
        Family("dcp_orchestrator_streams", "gauge", "streams routed (one producer, one topic)").add(len(do.streams)),
        Family("dcp_orchestrator_streams_partial", "gauge", "streams that cannot reach every consumer").add(do.planner.partial),
        Family("dcp_orchestrator_planning_pending", "gauge", "streams waiting to be planned").add(do.planner.pending),
        do.round_seconds.family("dcp_orchestrator_planning_round_seconds", "planning rounds: events in, routes stored, seconds"),
        do.slice_seconds.family("dcp_orchestrator_planning_slice_seconds", "slices of planning, each one turn of the event loop, seconds"),
        Family("dcp_orchestrator_route_pushes_total", "counter", "route messages pushed to agents").add(do.route_pushes),
        Family("dcp_orchestrator_push_writes_total", "counter", "writes of pushes, one per agent and round").add(do.push_writes),
        *_connection_families(do, "dcp_orchestrator", len(do.connections)),
    ]


def orchestrator_unready(do: Orchestrator) -> list[str]:
    """What keeps ``do`` from being ready: shutting down."""
    return ["shutting down"] if do.closing else []
