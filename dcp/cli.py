"""The ``dcp`` command: ``broker``, ``stats``, ``demo``.

``main(argv) -> int``; argparse exits with status 2 on bad usage.  The library only
logs; this module configures logging.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging.config
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

from . import __version__
from ._loop import run
from .config import BrokerConfig
from .errors import DcpError

__all__ = ["main"]


def configure_logging(level: str) -> None:
    logging.config.dictConfig(
        {
            "version": 1,
            "disable_existing_loggers": False,
            "formatters": {"plain": {"format": "%(asctime)s %(levelname)-7s %(name)s: %(message)s"}},
            "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "plain", "stream": "ext://sys.stderr"}},
            "loggers": {"dcp": {"level": level.upper(), "handlers": ["stderr"], "propagate": False}},
        }
    )


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per BrokerConfig field; only flags given override the config file."""
    for field in dataclasses.fields(BrokerConfig):
        meta = dict(field.metadata)
        help_text = meta.pop("help")
        default = field.default if field.default is not None else "see help"
        parser.add_argument(
            "--" + field.name.replace("_", "-"),
            dest=field.name,
            default=argparse.SUPPRESS,
            help=f"{help_text} (default: {default})",
            **meta,
        )


def _config_from_args(args: argparse.Namespace) -> BrokerConfig:
    names = {field.name for field in dataclasses.fields(BrokerConfig)}
    overrides = {name: value for name, value in vars(args).items() if name in names}
    return BrokerConfig.from_sources(args.config, overrides)


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


async def _serve_broker(config: BrokerConfig) -> None:
    from .broker import Broker

    broker = Broker(config)
    stop = asyncio.Event()
    _install_shutdown_signals(stop)
    await broker.start()
    await broker.serve_forever(stop.wait)


def cmd_broker(args: argparse.Namespace) -> int:
    config = _config_from_args(args)
    configure_logging(config.log_level)
    run(_serve_broker(config))
    return 0


async def _fetch_stats(url: str) -> dict[str, Any]:
    from .client import connect

    async with connect(url, role="admin", reconnect=False) as conn:
        return await conn.stats()


def format_stats(stats: dict[str, Any]) -> str:
    from .routing import int_from_bytes

    lines = [
        f"broker {stats['address']}  mode={stats['mode']}  key={int_from_bytes(stats['key'])}  "
        f"ports={stats['ports']}  slow_consumer={stats['slow_consumer']}  uptime={stats['uptime_s']}s",
        f"frames in={stats['frames_in']} out={stats['frames_out']}   bytes in={stats['bytes_in']} out={stats['bytes_out']}",
        "drops: " + ", ".join(f"{reason}={count}" for reason, count in stats["drops"].items()),
        f"{'port':>5} {'name':<16} {'role':<6} {'frames_in':>10} {'frames_out':>10} {'bytes_out':>12} {'dropped':>8} {'buffered':>9}",
    ]
    for conn in stats["connections"]:
        port = conn["port"] if conn["port"] >= 0 else "-"
        lines.append(
            f"{port:>5} {conn['name'][:16]:<16} {conn['role'] or '-':<6} {conn['frames_in']:>10} "
            f"{conn['frames_out']:>10} {conn['bytes_out']:>12} {conn['dropped']:>8} {conn['buffered']:>9}"
        )
    return "\n".join(lines)


def cmd_stats(args: argparse.Namespace) -> int:
    stats = run(_fetch_stats(args.address))
    if args.json:
        stats = {**stats, "key": str(int.from_bytes(stats["key"], "big"))}
        print(json.dumps(stats, indent=2))
    else:
        print(format_stats(stats))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    configure_logging(args.log_level)
    return run(run_demo(count=args.count, interval_s=args.interval))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dcp", description="dcp: a stateless publish/subscribe data plane")
    parser.add_argument("--version", action="version", version=f"dcp {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    broker = commands.add_parser("broker", help="run a broker", description="Run a dcp broker until SIGINT/SIGTERM.")
    broker.add_argument("--config", metavar="FILE", help="TOML file with a [broker] table; flags override it")
    _add_config_flags(broker)
    broker.set_defaults(func=cmd_broker)

    stats = commands.add_parser("stats", help="show a broker's counters")
    stats.add_argument("address", metavar="HOST:PORT")
    stats.add_argument("--json", action="store_true", help="print JSON")
    stats.set_defaults(func=cmd_stats)

    demo = commands.add_parser("demo", help="run a broker with a publisher and two subscribers, printing what flows")
    demo.add_argument("--count", type=int, default=12, help="frames to publish (default: 12)")
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
