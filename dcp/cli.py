"""The ``dcp`` command: ``broker``, ``orchestrator``, ``deploy``, ``undeploy``, ``pipelines``, ``status``, ``stats``,
``link``, ``unlink``, ``token``, ``secret``, ``mqtt``, ``cluster``, ``bench``, ``demo``.

``main(argv) -> int``; argparse exits with status 2 on bad usage.  The library only
logs; this module configures logging.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import os
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from . import __version__, control, logs
from ._loop import run
from .auth import DEFAULT_TOKEN_TTL_S, ISSUED_ROLES, broker_secret, expiry, issue_token, load_secret, new_secret, write_secret
from .config import BrokerConfig, OrchestratorConfig
from .errors import ConfigError, DcpError, RemoteError
from .systemd import Notifier
from .views import format_pipelines, format_stats, format_status, format_warning, stats_as_json

if TYPE_CHECKING:
    from ._serving import Serving
    from .mqtt_gateway import Gateway

__all__ = ["main"]

R = TypeVar("R", bound=control.Reply)


def _add_config_flags(parser: argparse.ArgumentParser, config_class: type = BrokerConfig) -> None:
    """One flag per config field; only flags given override the config file."""
    parser.set_defaults(config_class=config_class)
    for field in dataclasses.fields(config_class):
        meta = dict(field.metadata)
        help_text = meta.pop("help")
        key = meta.pop("key", field.name)
        flag = meta.pop("flag", "--" + key.replace("_", "-"))
        meta.pop("secret", None)  # how --print-config shows it, not how it parses
        # a default worth saying: not an empty string or list, nor None (the help says what happens then)
        shown = "" if field.default in (None, "", ()) else f" (default: {field.default})"
        parser.add_argument(flag, dest=field.name, default=argparse.SUPPRESS, help=help_text + shown, **meta)


def _config_layers(args: argparse.Namespace) -> dict[str, tuple[Any, str]]:
    """Each setting the file, the environment and the flags give: flags > env > TOML > defaults."""
    names = {field.name for field in dataclasses.fields(args.config_class)}
    overrides = {name: value for name, value in vars(args).items() if name in names}
    return args.config_class.layers(args.config, overrides, os.environ)


def _install_shutdown_signals(stop: asyncio.Event) -> None:
    """SIGINT/SIGTERM ask for a graceful stop; a second one exits at once."""
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        if stop.is_set():
            os._exit(128 + signum)
        logging.getLogger("dcp").info("received %s, shutting down", signal.Signals(signum).name)
        stop.set()

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_signal, signum)


async def _serve(daemon: str, config: Any) -> None:
    if daemon == "broker":
        from .broker import Broker

        server: Serving | Gateway = Broker(config)
    elif daemon == "mqtt":
        from .mqtt_gateway import Gateway

        server = Gateway(config)
    else:
        from .orchestrator import Orchestrator

        server = Orchestrator(config)
    stop = asyncio.Event()
    _install_shutdown_signals(stop)
    notifier = Notifier.from_environ()
    await server.start()
    notifier.ready("dcp %s listening on %s:%d" % (daemon, *server.address))

    async def stopped() -> None:
        await stop.wait()
        notifier.stopping()

    await server.serve_forever(stopped)


def cmd_daemon(args: argparse.Namespace) -> int:
    """``dcp broker`` and ``dcp orchestrator``: run until SIGINT/SIGTERM (or, with
    ``--print-config``, print the effective settings and where each came from)."""
    layers = _config_layers(args)
    config = args.config_class.from_layers(layers)
    if args.print_config:
        sys.stdout.write(config.as_toml(layers))
        return 0
    logs.configure(config.log_level, config.log_format, config.log_config, daemon=getattr(config, "name", "") or args.command)
    run(_serve(args.command, config))
    return 0


def _add_dial_flags(parser: argparse.ArgumentParser) -> None:
    """``--token`` and ``--tls-ca``, for the commands that dial a broker or the orchestrator."""
    parser.add_argument(
        "--token", default=os.environ.get("DCP_TOKEN"),
        help="admin token, for a server started with --require-token (default: $DCP_TOKEN)",
    )
    parser.add_argument(
        "--tls-ca", metavar="FILE",
        help="CA file to verify the server with: dials it over TLS (a dcps:// address does too, with the system's CAs)",
    )


def _admin(args: argparse.Namespace, url: str) -> Any:
    """An admin connection to ``url`` with the command's ``--token`` and ``--tls-ca``."""
    from .client import connect

    return connect(url, role="admin", name="dcp-cli", reconnect=False, token=args.token, tls_ca=args.tls_ca)


async def _fetch_stats(args: argparse.Namespace) -> dict[str, Any]:
    async with _admin(args, args.address) as conn:
        return await conn.stats()


def cmd_stats(args: argparse.Namespace) -> int:
    stats = run(_fetch_stats(args))
    if args.json:
        print(json.dumps(stats_as_json(stats), indent=2))
    else:
        print(format_stats(stats))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    if args.count < 0 or args.interval < 0:
        print("dcp demo: --count and --interval must not be negative", file=sys.stderr)
        return 2
    logs.configure(args.log_level)
    return run(run_demo(count=args.count, interval_s=args.interval))


async def _admin_link(args: argparse.Namespace, peer: str | None, port: int | None, wait: float) -> dict[str, Any] | None:
    async with _admin(args, args.address) as conn:
        if peer is not None:
            return await conn.link(peer, wait=wait or None)
        assert port is not None
        await conn.unlink(port)
        return None


def cmd_link(args: argparse.Namespace) -> int:
    link = run(_admin_link(args, args.peer, None, args.wait))
    assert link is not None
    remote = f" <-> {args.peer} port {link['remote_port']}" if link["state"] == "up" else f" to {args.peer} ({link['state']})"
    print(f"link on port {link['port']}{remote}")
    return 0


def cmd_unlink(args: argparse.Namespace) -> int:
    run(_admin_link(args, None, args.port, 0))
    print(f"link on port {args.port} removed")
    return 0


async def _orchestrator_request(args: argparse.Namespace, request: control.Request[R]) -> R:
    async with _admin(args, args.orchestrator) as conn:
        return await conn.call(request)


def cmd_deploy(args: argparse.Namespace) -> int:
    from .spec import load_spec

    spec = load_spec(args.spec)
    reply = run(_orchestrator_request(args, control.Deploy(spec=spec.to_dict())))
    print(f"deployed {reply.pipeline}")
    for element, agents in reply.assignments.items():
        print(f"  {element}: {', '.join(agents) or '(waiting for an agent)'}")
    for warning in reply.warnings or ():  # deployed all the same: a broker may register after its agents
        print(format_warning(warning))
    return 0


def cmd_undeploy(args: argparse.Namespace) -> int:
    run(_orchestrator_request(args, control.Undeploy(name=args.name)))
    print(f"undeployed {args.name}")
    return 0


def cmd_pipelines(args: argparse.Namespace) -> int:
    pipelines = run(_orchestrator_request(args, control.Pipelines())).pipelines
    print(json.dumps(pipelines, indent=2) if args.json else format_pipelines(pipelines))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """The orchestrator's view: brokers and their links, agents, pipelines and streams."""
    status, pipelines = run(_status(args))
    if args.json:
        print(json.dumps({**status, "pipelines": pipelines}, indent=2))
    else:
        print(format_status(status, pipelines))
    return 0


async def _status(args: argparse.Namespace) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    async with _admin(args, args.orchestrator) as conn:
        try:
            status = (await conn.call(control.Status(summary=args.summary or None))).status
        except RemoteError as exc:
            if exc.code != "too_large":
                raise
            print("dcp status: the full status does not fit a control frame; counts only", file=sys.stderr)
            status = (await conn.call(control.Status(summary=True))).status
        return status, (await conn.call(control.Pipelines())).pipelines


def cmd_token(args: argparse.Namespace) -> int:
    """Print a token: issued by the orchestrator, or here with ``--secret-file``."""
    try:
        expires = expiry(time.time(), args.ttl_s)
    except ConfigError as exc:
        print(f"dcp token: --ttl-s: {exc}", file=sys.stderr)
        return 2
    if args.secret_file:
        token = issue_token(load_secret(args.secret_file), args.name, args.role, expires)
    else:
        token = run(_orchestrator_request(args, control.Token(name=args.name, role=args.role, ttl_s=args.ttl_s))).token
    print(token)
    return 0


def cmd_secret(args: argparse.Namespace) -> int:
    """Make a fresh orchestrator's secret, or with ``--broker`` the brokers' secret
    derived from one; print it, or write it to a new file of mode 0600 (``--out``)."""
    if args.broker != bool(args.secret_file):
        print("dcp secret: --broker and --secret-file go together (the brokers' secret is derived from that file)", file=sys.stderr)
        return 2
    secret = broker_secret(load_secret(args.secret_file)) if args.broker else new_secret()
    if not args.out:
        print(secret.decode())
        return 0
    write_secret(args.out, secret)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import report
    from .bench.scenarios import FIGURES, PROFILES, run
    from .bench.targets import EXTERNAL, IN_TREE, TARGETS

    figures = args.figures or list(FIGURES)
    targets = args.targets or [*IN_TREE, *(() if args.no_external else EXTERNAL)]
    unknown = [f for f in figures if f not in FIGURES] + [t for t in targets if t not in TARGETS]
    if unknown:
        print(f"dcp bench: unknown figure or target: {', '.join(unknown)}", file=sys.stderr)
        return 2
    profile = PROFILES["quick" if args.quick else "full"]
    # without --out, a fresh folder outside the working tree: a run never replaces committed results by accident
    out = Path(args.out or tempfile.mkdtemp(prefix=f"dcp-bench-{profile.name}-{time.strftime('%Y%m%d-%H%M%S')}-"))
    print(f"{profile.name} profile: writing to {out}", file=sys.stderr, flush=True)

    def progress(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    results = run(figures, profile, targets, progress)
    for path in report.write(results, out):
        progress(f"wrote {path}")
    if args.quick and results["targets"]:
        print(report.QUICK_VERDICTS)
    for verdict in results["targets"]:
        print(f"{'met   ' if verdict['met'] else 'MISSED'}  {verdict['goal']}: {verdict['measured']}")
    return 0


def cmd_cluster(args: argparse.Namespace) -> int:
    from .cluster import ClusterSpec, run_cluster

    logs.configure(args.log_level)
    spec = ClusterSpec.from_file(args.overlay) if args.overlay else ClusterSpec.shape(args.topology, args.n)
    broker_args = [*args.broker_args[1:]] if args.broker_args[:1] == ["--"] else list(args.broker_args)

    async def serve() -> int:
        stop = asyncio.Event()
        _install_shutdown_signals(stop)
        return await run_cluster(
            spec, stop, host=args.host, ports=args.ports, broker_args=broker_args, as_json=args.json, write=args.write,
            secret_file=args.secret_file or "", insecure=args.insecure,
        )

    return run(serve())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dcp", description="dcp: a stateless publish/subscribe data plane")
    parser.add_argument("--version", action="version", version=f"dcp {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    broker = commands.add_parser("broker", help="run a broker", description="Run a dcp broker until SIGINT/SIGTERM.")
    broker.add_argument(
        "--config", metavar="FILE",
        help="TOML file with a [broker] table; DCP_BROKER_<SETTING> environment variables override it, flags override both",
    )
    broker.add_argument("--print-config", action="store_true", help="print the effective settings as TOML, with where each came from, and exit")
    _add_config_flags(broker)
    broker.set_defaults(func=cmd_daemon)

    stats = commands.add_parser("stats", help="show a broker's counters")
    stats.add_argument("address", metavar="HOST:PORT")
    stats.add_argument("--json", action="store_true", help="print JSON")
    _add_dial_flags(stats)
    stats.set_defaults(func=cmd_stats)

    orchestrator = commands.add_parser(
        "orchestrator", help="run the data orchestrator", description="Run the data orchestrator (DO) until SIGINT/SIGTERM."
    )
    orchestrator.add_argument(
        "--config", metavar="FILE",
        help="TOML file with an [orchestrator] table; DCP_ORCHESTRATOR_<SETTING> environment variables override it, flags override both",
    )
    orchestrator.add_argument("--print-config", action="store_true", help="print the effective settings as TOML, with where each came from, and exit")
    _add_config_flags(orchestrator, OrchestratorConfig)
    orchestrator.set_defaults(func=cmd_daemon)

    do_url: dict[str, Any] = {
        "default": "127.0.0.1:7300",
        "help": "the orchestrator: HOST:PORT, or a dcp:// or dcps:// (TLS) URL (default: 127.0.0.1:7300)",
    }
    deploy = commands.add_parser("deploy", help="validate and deploy a pipeline spec")
    deploy.add_argument("spec", metavar="SPEC", help="pipeline spec file (TOML, or JSON)")
    deploy.add_argument("--orchestrator", **do_url)
    _add_dial_flags(deploy)
    deploy.set_defaults(func=cmd_deploy)

    undeploy = commands.add_parser("undeploy", help="remove a deployed pipeline")
    undeploy.add_argument("name", metavar="NAME")
    undeploy.add_argument("--orchestrator", **do_url)
    _add_dial_flags(undeploy)
    undeploy.set_defaults(func=cmd_undeploy)

    pipelines = commands.add_parser("pipelines", help="list deployed pipelines with live per-element counters")
    pipelines.add_argument("--orchestrator", **do_url)
    pipelines.add_argument("--json", action="store_true", help="print JSON")
    _add_dial_flags(pipelines)
    pipelines.set_defaults(func=cmd_pipelines)

    status = commands.add_parser(
        "status", help="the orchestrator's view: brokers and links, agents, pipelines, streams",
        description="Print the orchestrator's view of the data plane: brokers and their links, agents, pipelines and streams.",
    )
    status.add_argument("--orchestrator", **do_url)
    status.add_argument("--json", action="store_true", help="print JSON")
    status.add_argument("--summary", action="store_true", help="counts of agents and streams instead of their lists")
    _add_dial_flags(status)
    status.set_defaults(func=cmd_status)

    token = commands.add_parser(
        "token", help="issue a token for an agent or an admin",
        description="Print a token for NAME, for servers started with --require-token: ask the orchestrator, which "
        "signs it with its secret (with --token, an admin token, if it requires one), or, with --secret-file, sign it "
        "here with the orchestrator's secret.",
    )
    token.add_argument("name", metavar="NAME", help="who it is for: an agent gives this name in its hello")
    token.add_argument("--role", default="agent", choices=ISSUED_ROLES, help="(default: agent)")
    token.add_argument(
        "--ttl-s", type=float, default=DEFAULT_TOKEN_TTL_S, help=f"seconds it is valid (default: {DEFAULT_TOKEN_TTL_S:.0f})"
    )
    source = token.add_mutually_exclusive_group()
    source.add_argument("--orchestrator", **do_url)
    source.add_argument("--secret-file", metavar="FILE", help="issue it offline with the orchestrator's secret in FILE")
    _add_dial_flags(token)
    token.set_defaults(func=cmd_token)

    secret = commands.add_parser(
        "secret", help="make the orchestrator's secret, or the brokers' one derived from it",
        description="Print a fresh secret for the orchestrator's --secret-file; with --broker, the brokers' secret "
        "derived from the orchestrator's in --secret-file (it checks tokens and route tags and issues the brokers' own "
        "tokens, but cannot issue agent or admin tokens). With --out FILE, write it to a new file of mode 0600.",
    )
    secret.add_argument("--broker", action="store_true", help="the brokers' secret, derived from --secret-file")
    secret.add_argument("--secret-file", metavar="FILE", help="the orchestrator's secret (with --broker)")
    secret.add_argument("--out", metavar="FILE", help="write it to FILE (created with mode 0600; an existing FILE is an error)")
    secret.set_defaults(func=cmd_secret)

    link = commands.add_parser("link", help="link a running broker to another one", description="Ask the broker at "
                               "HOST:PORT to link to PEER; the link takes a port at each end and is redialled after failures.")
    link.add_argument("address", metavar="HOST:PORT")
    link.add_argument("peer", metavar="PEER", help="HOST:PORT of the broker to link to")
    link.add_argument("--wait", type=float, default=5.0, help="seconds to wait for the link to come up; 0: do not wait (default: 5)")
    _add_dial_flags(link)
    link.set_defaults(func=cmd_link)

    unlink = commands.add_parser("unlink", help="remove a broker's link", description="Close the link on PORT of the "
                                 "broker at HOST:PORT for good; both ends free their port.")
    unlink.add_argument("address", metavar="HOST:PORT")
    unlink.add_argument("port", type=int, metavar="PORT", help="the link's port on that broker (see dcp stats)")
    _add_dial_flags(unlink)
    unlink.set_defaults(func=cmd_unlink)

    bench = commands.add_parser(
        "bench",
        help="run the benchmarks (Figures 7-9 of the article, routing cost)",
        description="Measure dcp against the raw relay, the pub/sub brokers and the reference queues that are "
        "running (see bench/peers); write results.json, report.md, a CSV and an SVG plot per figure.",
    )
    bench.add_argument("figures", nargs="*", metavar="FIGURE", help="latency, success, throughput, routing, requests (default: all)")
    bench.add_argument("--quick", action="store_true", help="the short profile (about a minute; checks the outputs, indicative only)")
    bench.add_argument(
        "--out", default=None, help="output folder (default: a new timestamped folder in the temporary directory, printed)"
    )
    bench.add_argument("--targets", nargs="+", metavar="TARGET", help="targets to measure (default: all)")
    bench.add_argument("--no-external", action="store_true", help="leave out the external brokers")
    bench.set_defaults(func=cmd_bench)

    from .mqtt_gateway import MqttConfig

    mqtt = commands.add_parser(
        "mqtt", help="run an MQTT gateway: MQTT devices publish and subscribe on the data plane",
        description="Serve MQTT 3.1.1 and 5.0 clients until SIGINT/SIGTERM, as a data agent: what they publish goes to the "
        "topic's dcp consumers, what they subscribe to is consumed for them (a/b/c <-> a.b.c, + <-> *, # <-> >).",
    )
    mqtt.add_argument(
        "--config", metavar="FILE",
        help="TOML file with an [mqtt] table; DCP_MQTT_<SETTING> environment variables override it, flags override both",
    )
    mqtt.add_argument("--print-config", action="store_true", help="print the effective settings as TOML, with where each came from, and exit")
    _add_config_flags(mqtt, MqttConfig)
    mqtt.set_defaults(func=cmd_daemon)

    cluster = commands.add_parser(
        "cluster",
        help="run N linked broker processes on this host",
        description="Start N dcp broker processes with keys of their own, link them into an overlay, print "
        "their addresses, keys and link ports, and stop them all on SIGINT/SIGTERM. "
        "Arguments after -- go to every broker (e.g. -- --slow-consumer pause).",
    )
    cluster.add_argument("-n", type=int, default=3, help="number of brokers (default: 3)")
    cluster.add_argument("--topology", default="line", choices=("line", "ring", "star", "mesh"), help="overlay shape (default: line)")
    cluster.add_argument("--overlay", metavar="FILE", help="TOML/JSON file: brokers = [names], links = [[dialer, acceptor], ...]")
    cluster.add_argument("--host", default="127.0.0.1", help="address the brokers listen on (default: 127.0.0.1)")
    cluster.add_argument("--ports", type=int, default=64, help="ports of each broker (default: 64: one key each; more: key layouts)")
    cluster.add_argument("--json", action="store_true", help="print the overlay as one JSON line")
    cluster.add_argument("--write", metavar="FILE", help="also write the overlay JSON to FILE")
    access = cluster.add_mutually_exclusive_group()
    access.add_argument(
        "--secret-file", metavar="FILE",
        help="the secret the brokers share (admin and peer tokens; and with an orchestrator, give it the same file) "
        "(default: a fresh one in a temporary file, deleted when the cluster stops; its path goes to stderr)",
    )
    access.add_argument(
        "--insecure", action="store_true",
        help="start the brokers with --insecure: anyone who can connect may link, unlink and read stats",
    )
    cluster.add_argument("--log-level", default="warning", choices=("debug", "info", "warning", "error"))
    cluster.add_argument("broker_args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    cluster.set_defaults(func=cmd_cluster)

    demo = commands.add_parser(
        "demo",
        help="run the faces pipeline (camera, face and dog detectors, age/gender classifier, sink), printing what flows",
        description="Start a data orchestrator, two linked brokers and five data agents in this process, deploy the "
        "faces pipeline (examples/faces.toml: camera -> face and dog detectors -> age/gender classifier -> printing "
        "sink; synthetic frames, deterministic stand-in models), print every detection, then the frames, latency and "
        "drops of every stage. Exits 0 when everything arrived and nothing was dropped.",
    )
    demo.add_argument("--count", type=int, default=12, help="frames the camera emits (default: 12)")
    demo.add_argument("--interval", type=float, default=0.05, help="seconds between frames (default: 0.05)")
    demo.add_argument("--log-level", default="warning", choices=("debug", "info", "warning", "error"))
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except DcpError as exc:
        print(f"dcp {args.command}: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"dcp {args.command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
