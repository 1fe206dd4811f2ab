"""Text views of what the daemons report: the tables of ``dcp stats`` and ``dcp pipelines``."""

from __future__ import annotations

from typing import Any

from ._guard import safe
from .control import ERROR_TEXT_LIMIT
from .routing import int_from_bytes

__all__ = ["format_stats", "stats_as_json", "format_pipelines", "format_warning"]

#: What a printed warning keeps of the orchestrator's text: a few consumers, with why.
WARNING_LIMIT = 1024


def format_stats(stats: dict[str, Any]) -> str:
    """A broker's ``stats`` as the table ``dcp stats`` prints: counters, ports, links."""
    lines = [
        f"broker {stats['address']}  mode={stats['mode']}  key={int_from_bytes(stats['key'])}  "
        f"ports={stats['ports']}  slow_consumer={stats['slow_consumer']}  uptime={stats['uptime_s']}s",
        f"frames in={stats['frames_in']} out={stats['frames_out']}   bytes in={stats['bytes_in']} out={stats['bytes_out']}",
        "drops: " + ", ".join(f"{reason}={count}" for reason, count in stats["drops"].items()),
        f"{'port':>5} {'name':<16} {'role':<6} {'frames_in':>10} {'frames_out':>10} {'bytes_out':>12} {'dropped':>8} "
        f"{'buffered':>9} {'queued':>9} policy",
    ]
    for conn in stats["connections"]:
        port = conn["port"] if conn["port"] >= 0 else "-"
        lines.append(
            f"{port:>5} {conn['name'][:16]:<16} {conn['role'] or '-':<6} {conn['frames_in']:>10} "
            f"{conn['frames_out']:>10} {conn['bytes_out']:>12} {conn['dropped']:>8} {conn['buffered']:>9} "
            f"{conn['queued']:>9} {conn['policy']}"
        )
    if stats["links"]:
        lines.append(
            f"{'link':>5} {'dir':<3} {'peer':<22} {'state':<7} {'remote':>6} {'rtt_ms':>7} {'connects':>8} "
            f"{'frames_in':>10} {'frames_out':>10} {'undelivered':>11}"
        )
    for link in stats["links"]:
        peer = link["address"] or link["remote_name"] or str(int_from_bytes(link["remote_key"]))
        rtt = "-" if link["rtt_ms"] is None else f"{link['rtt_ms']:.2f}"
        lines.append(
            f"{link['port']:>5} {link['direction']:<3} {peer[:22]:<22} {link['state']:<7} {link['remote_port']:>6} "
            f"{rtt:>7} {link['connects']:>8} {link['frames_in']:>10} {link['frames_out']:>10} {link['undelivered']:>11}"
        )
        if link["state"] != "up" and link["last_error"]:  # why it is down, or refused for good
            lines.append(f"{'':>5} {link['state']}: {link['last_error']}")
    return "\n".join(lines)


def stats_as_json(stats: dict[str, Any]) -> dict[str, Any]:
    """Keys are big integers carried as bytes; JSON gets them as decimal strings."""
    links = [{**link, "remote_key": str(int.from_bytes(link["remote_key"], "big"))} for link in stats["links"]]
    return {**stats, "key": str(int.from_bytes(stats["key"], "big")), "links": links}


def format_pipelines(pipelines: list[dict[str, Any]]) -> str:
    """The orchestrator's ``pipelines`` view as the table ``dcp pipelines`` prints: under
    each agent's row its last error, if any, and under each element its warnings (the
    routes that reach nobody, and why), escaped as log lines are: agents write them."""
    if not pipelines:
        return "no pipelines deployed"
    lines = []
    for pipeline in pipelines:
        lines.append(f"pipeline {pipeline['name']}")
        if "latency" in pipeline:
            lines.append(f"  latency {_latency(pipeline['latency'])}")
        lines.extend(f"  {format_warning(warning)}" for warning in pipeline.get("warnings", ()))
        lines.append(
            f"  {'element':<16} {'kind':<6} {'capability':<20} {'agent':<18} {'in':>8} {'out':>8} {'errors':>8} {'dropped':>8}"
        )
        for element in pipeline["elements"]:
            rows = element["agents"] or [{"agent": "(none)", "online": False}]
            for row in rows:
                agent = row["agent"] + ("" if row["online"] else " (off)")
                lines.append(
                    f"  {element['name'][:16]:<16} {element['kind']:<6} {str(element['capability'])[:20]:<20} {agent[:18]:<18} "
                    f"{row.get('in', 0):>8} {row.get('out', 0):>8} {row.get('errors', 0):>8} {row.get('dropped', 0):>8}"
                )
                if row.get("last_error"):
                    lines.append(f"    last error: {safe(row['last_error'], ERROR_TEXT_LIMIT)}")
            latency = element.get("latency") or {}
            if latency.get("budget_ms") is not None or latency.get("estimate_ms") is not None:
                lines.append(f"    latency in {_latency(latency)}")
            lines.extend(f"    {format_warning(warning)}" for warning in element.get("warnings", ()))
    return "\n".join(lines)


def _latency(latency: dict[str, Any]) -> str:
    """Budget, estimate and measure of a latency, in ms ("-": none)."""
    def ms(key: str) -> str:
        value = latency.get(key)
        return "-" if value is None else f"{value:g} ms"

    return f"budget {ms('budget_ms')}, estimate {ms('estimate_ms')}, measured {ms('measured_ms')}"


def format_warning(warning: str) -> str:
    """One warning of the orchestrator (a route that reaches nobody, and why) as printed:
    escaped as a log line is, since it quotes names that agents chose."""
    return f"warning: {safe(warning, WARNING_LIMIT)}"


def format_status(status: dict[str, Any], pipelines: list[dict[str, Any]]) -> str:
    """The orchestrator's ``status`` and ``pipelines`` views as the text ``dcp status`` prints."""
    brokers = status["brokers"]
    lines = [f"brokers: {len(brokers)} ({sum(b['online'] for b in brokers)} online)"]
    for broker in brokers:
        links = broker["links"]
        up = sum(1 for link in links if link.get("state") == "up")
        lines.append(
            f"  {broker['name']:<16} {broker['address'] or '?':<22} {'online' if broker['online'] else 'offline':<8} "
            f"links {up}/{len(links)} up"
        )
    agents, streams = status["agents"], status["streams"]
    if isinstance(agents, int):  # a summary: counts only
        lines.append(f"agents: {agents}")
    else:
        lines.append(f"agents: {len(agents)} ({sum(a['online'] for a in agents)} online)")
        for agent in agents:
            where = f"{agent['broker']}:{agent['port']}" if agent["online"] else "offline"
            lines.append(f"  {agent['name']:<24} {where:<22} produces {len(agent['produces'])}, consumes {len(agent['consumes'])}")
    lines.append(f"pipelines: {len(pipelines)}" + (f" ({', '.join(p['name'] for p in pipelines)})" if pipelines else ""))
    if isinstance(streams, int):
        lines.append(f"streams: {streams}")
    else:
        lines.append(f"streams: {len(streams)}")
        for stream in streams:
            refused = f", refused {stream['refused']}" if stream.get("refused") else ""
            lines.append(
                f"  {stream['producer']}/{stream['topic']:<24} epoch {stream['epoch']}, {len(stream['consumers'])} consumer(s), "
                f"X {stream['x_bytes']} bytes{refused}"
            )
    connections = status["connections"]
    lines.append(f"connections: {connections['open']} open, {connections['refused']} refused")
    return "\n".join(lines)

