"""Daemon configuration: one frozen dataclass per daemon, from defaults, a TOML table,
``DCP_<SECTION>_<KEY>`` environment variables and flags, each overriding the one before.

Every field carries its help text and, where it is not a plain str/int/float, how to
parse it; the CLI generates its flags from these fields, and the environment variables
are parsed the same way, so a setting exists in one place only.  Only flags actually
given on the command line override the others.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from .control import SLOW_CONSUMER_POLICIES, slow_consumer_policy
from .errors import ConfigError, did_you_mean
from .logs import FORMATS
from .routing import MAX_PORTS, KeyLayout
from .wire import DEFAULT_LIMITS, Limits

__all__ = ["BrokerConfig", "OrchestratorConfig", "MODES", "parse_address"]

MODES = ("stateless", "stateful")
LOG_LEVELS = ("debug", "info", "warning", "error")


def _opt(help: str, **extra: Any) -> Any:
    """A field's metadata: its help, and how the CLI parses it.  ``key``: the name users
    write, as TOML key and flag, where it differs from the attribute's."""
    return {"help": help, **extra}


# Settings both daemons have, with one meaning: each class gets its own field from here (_shared).
_ACCESS = {
    "require_token": (False, _opt(
        "admit only connections whose hello carries a valid token: agents and admins one the orchestrator issued "
        "(dcp token), brokers one they issue themselves from their secret (needs --secret-file)",
        action="store_true",
    )),
    "insecure": (False, _opt(
        "admit every role without a token: admins, brokers and peers, and at the orchestrator agents too (anyone who "
        "can connect may then link, deploy, register under a free name, read stats and status); without it the daemon "
        "needs --secret-file, and refuses to start otherwise. For a trusted network or loopback only: logged at warning",
        action="store_true",
    )),
    "tls_cert": ("", _opt("PEM certificate (chain) to serve TLS with (with --tls-key)")),
    "tls_key": ("", _opt("PEM private key of --tls-cert")),
    "hello_timeout_s": (5.0, _opt(
        "a connection that has not had its hello accepted this long after it was accepted is refused "
        "(hello_timeout) and closed, seconds (0: no deadline)", type=float,
    )),
    "max_connections": (0, _opt(
        "connections open at once, at most; past it a new connection is refused at accept (too_many_connections) "
        "(0: as many as the open-file limit leaves, raised to its hard limit at start)", type=int,
    )),
    "max_connections_per_address": (0, _opt(
        "connections one peer IP address may hold at once; past it a connection is refused at accept "
        "(connection_limit) (0: no limit, the default: many agents may share an address, behind NAT or on one host)",
        type=int,
    )),
    "max_connections_per_name": (16, _opt(
        "connections one name may hold at once: the token's name where the hello needs a token, else the name a "
        "hello gives (hellos without a name are not counted); past it the hello is refused (connection_limit) "
        "(0: no limit)", type=int,
    )),
}


# How both daemons log (dcp.logs).
_LOGGING = {
    "log_level": ("info", _opt("log level", choices=LOG_LEVELS)),
    "log_format": ("text", _opt("log lines as plain text, or one JSON object per line (time, level, logger, message, "
                                "daemon, fields)", choices=FORMATS)),
    "log_config": ("", _opt("a logging.config.dictConfig as a TOML or JSON file (.json), used instead of the log "
                            "level and format", metavar="FILE")),
}


# The metrics port of both daemons (dcp.metrics_http).
_METRICS = {
    "metrics_listen": ("", _opt(
        "HOST:PORT to serve HTTP on: /metrics (Prometheus text format), /healthz and /readyz (default: none; "
        "port 0: any free one)", metavar="HOST:PORT",
    )),
}


def _shared(name: str) -> Any:
    default, metadata = {**_ACCESS, **_LOGGING, **_METRICS}[name]
    return field(default=default, metadata=metadata)


def check_logs_and_metrics(config: Any) -> None:
    """The checks of the ``_LOGGING`` and ``_METRICS`` settings, which every daemon has."""
    if config.metrics_listen:
        parse_address(config.metrics_listen)
    if config.log_level not in LOG_LEVELS:
        raise ConfigError(f"log_level must be one of {LOG_LEVELS}, got {config.log_level!r}")
    if config.log_format not in FORMATS:
        raise ConfigError(f"log_format must be one of {FORMATS}, got {config.log_format!r}")


def _check_shared(config: Any) -> None:
    """The checks of the ``_ACCESS``, ``_LOGGING`` and ``_METRICS`` settings."""
    check_logs_and_metrics(config)
    if config.hello_timeout_s < 0:
        raise ConfigError("hello_timeout_s must not be negative (0: no deadline)")
    for name in ("max_connections", "max_connections_per_address", "max_connections_per_name"):
        if getattr(config, name) < 0:
            raise ConfigError(f"{name} must not be negative (0: no limit), got {getattr(config, name)}")
    if config.require_token and not config.secret_file:
        raise ConfigError("require_token needs secret_file (the secret tokens are checked with)")
    if config.require_token and config.insecure:
        raise ConfigError("insecure and require_token contradict each other: give one of them")
    if bool(config.tls_cert) != bool(config.tls_key):
        raise ConfigError("tls_cert and tls_key go together: give both to serve TLS, or neither")


def parse_address(text: str, default_host: str = "127.0.0.1") -> tuple[str, int]:
    """Split ``HOST:PORT`` (``[::1]:PORT`` for IPv6, ``:PORT`` for the default host)."""
    host, sep, port = text.rpartition(":")
    if not sep:
        raise ConfigError(f"address {text!r} is not HOST:PORT")
    host = host.strip("[]") or default_host
    try:
        number = int(port)
    except ValueError:
        raise ConfigError(f"port in address {text!r} is not a number") from None
    if not 0 <= number <= 65535:
        raise ConfigError(f"port {number} in address {text!r} is out of range")
    return host, number


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off", "")


class _FromSources:
    """Defaults, then a TOML table (``SECTION``), then ``DCP_<SECTION>_<KEY>`` environment
    variables, then overrides (the flags given): shared by the daemons' configs."""

    SECTION = ""
    # Every subclass is a dataclass (what dataclasses.fields() needs).
    __dataclass_fields__: ClassVar[dict[str, dataclasses.Field[Any]]]

    @classmethod
    def from_sources(
        cls, file: str | Path | None = None, overrides: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None
    ) -> Any:
        """Defaults, then the ``[SECTION]`` table of a TOML file, then the environment
        (``environ``; none when not given), then ``overrides``.

        Raises:
            ConfigError: an unreadable file, an unknown key or variable, or an invalid value.
        """
        return cls.from_layers(cls.layers(file, overrides, environ))

    @classmethod
    def from_layers(cls, layers: Mapping[str, tuple[Any, str]]) -> Any:
        """The config of what :meth:`layers` found."""
        try:
            return cls(**{name: value for name, (value, _) in layers.items()})
        except TypeError as exc:
            raise ConfigError(str(exc)) from None

    @classmethod
    def layers(
        cls, file: str | Path | None = None, overrides: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None
    ) -> dict[str, tuple[Any, str]]:
        """Each setting some source gives, by attribute: (value, where it came from: the
        file's path, the variable's name, or "flag"); the later sources win.

        Raises:
            ConfigError: an unreadable file, an unknown key or variable, or a value that
                does not parse.
        """
        fields = {f.metadata.get("key", f.name): f for f in dataclasses.fields(cls)}
        found: dict[str, tuple[Any, str]] = {}
        if file is not None:
            table = _read_toml(Path(file), cls.SECTION)  # by the key users write
            unknown = sorted(set(table) - set(fields))
            if unknown:
                raise ConfigError(f"unknown {cls.SECTION} setting(s) in {file}: {_unknown(unknown, fields)}")
            found.update({fields[key].name: (value, str(file)) for key, value in table.items()})
        prefix = f"DCP_{cls.SECTION.upper()}_"
        for variable, text in sorted((environ or {}).items()):
            if not variable.startswith(prefix):
                continue
            key = variable[len(prefix) :].lower()
            if key not in fields:
                raise ConfigError(
                    f"{variable} names no {cls.SECTION} setting{did_you_mean(variable, (prefix + k.upper() for k in fields))}; "
                    f"they are {prefix}{{{', '.join(k.upper() for k in fields)}}}"
                )
            found[fields[key].name] = (_from_text(fields[key], variable, text), variable)
        known = {f.name for f in fields.values()}
        unknown = sorted(set(overrides or {}) - known)
        if unknown:
            raise ConfigError(f"unknown {cls.SECTION} setting(s): {_unknown(unknown, known)}")
        found.update({name: (value, "flag") for name, value in (overrides or {}).items()})
        return found

    def as_toml(self, layers: Mapping[str, tuple[Any, str]]) -> str:
        """The effective settings as a TOML table, each with where it came from (``--print-config``);
        a credential (a field marked ``secret``) only as a comment saying it is set."""
        lines = [f"[{self.SECTION}]"]
        for f in dataclasses.fields(self):
            key = f.metadata.get("key", f.name)
            value = getattr(self, f.name)
            origin = layers[f.name][1] if f.name in layers else "default"
            if value is None:
                lines.append(f"# {key} is unset ({origin})")
            elif value and f.metadata.get("secret"):  # a credential: said to be there, never printed
                lines.append(f"# {key} is set, not shown ({origin})")
            else:
                lines.append(f"{key} = {_toml_value(value)}  # {origin}")
        return "\n".join(lines) + "\n"


def _unknown(keys: list[str], known: Iterable[str]) -> str:
    """The unknown ``keys``, each with the known one nearest to it, if any."""
    return ", ".join(key + did_you_mean(key, known) for key in keys)


def _from_text(f: dataclasses.Field[Any], variable: str, text: str) -> Any:
    """A setting's value from its environment variable, parsed as its flag is."""
    meta = f.metadata
    if meta.get("action") == "store_true":
        if text.strip().lower() not in _TRUE + _FALSE:
            raise ConfigError(f"{variable}={text!r}: say 1/true/yes/on or 0/false/no/off")
        return text.strip().lower() in _TRUE
    if meta.get("action") == "append":
        return tuple(item.strip() for item in text.split(",") if item.strip())
    kind = meta.get("type")
    if kind is None:
        return text
    try:
        return kind(text)
    except ValueError:
        raise ConfigError(f"{variable}={text!r} is not a valid {kind.__name__}") from None


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, tuple):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    return json.dumps(str(value))  # a TOML basic string is a JSON string


@dataclass(frozen=True)
class BrokerConfig(_FromSources):
    """Everything a broker needs to run; defaults are safe for one host."""

    SECTION = "broker"

    listen: str = field(default="127.0.0.1:7400", metadata=_opt("HOST:PORT to listen on (port 0: any free one)"))
    name: str = field(default="", metadata=_opt("name of this broker in logs and on its links (default: its address)"))
    key: int | None = field(
        default=None,
        metadata=_opt(
            "prime root key of this broker: above 2**ports up to 64 ports, above 2**(64 + banks or directories under the root) "
            "beyond (default: a random prime of that size; the other keys of a broker with over 64 ports are always random)",
            type=int,
        ),
    )
    ports: int = field(default=10_000, metadata=_opt("number of ports (attachments) of this broker", type=int))
    mode: str = field(default="stateless", metadata=_opt("routing mode", choices=MODES))
    slow_consumer: str = field(
        default="drop-newest",
        metadata=_opt(
            "default policy of a port whose consumer cannot keep up: drop the new frames, drop the oldest queued ones "
            "(both counted), or pause the publishers; an agent may choose its own port's policy",
            choices=SLOW_CONSUMER_POLICIES,
        ),
    )
    out_buffer_bytes: int = field(
        default=4 * 1024 * 1024,
        metadata=_opt("output buffer bound of one port, bytes (drop-oldest queues up to as much again)", type=int),
    )
    max_frame: int = field(default=DEFAULT_LIMITS.max_frame, metadata=_opt("largest frame accepted, bytes", type=int))
    max_topic: int = field(default=DEFAULT_LIMITS.max_topic, metadata=_opt("longest topic accepted, bytes", type=int))
    max_x_bits: int = field(default=DEFAULT_LIMITS.max_x_bits, metadata=_opt("largest topology number accepted, bits", type=int))
    peers: tuple[str, ...] = field(
        default=(),
        metadata=_opt("HOST:PORT of a broker to link to; repeat for several (a link takes one port at each end)", flag="--peer", action="append", metavar="HOST:PORT"),
    )
    link_ping_interval_s: float = field(default=1.0, metadata=_opt("seconds between health pings on a link", type=float))
    link_timeout_s: float = field(default=5.0, metadata=_opt("a link with no answer for this long is cut and redialled, seconds", type=float))
    link_retry_max_s: float = field(default=2.0, metadata=_opt("longest delay between redials of a link, seconds", type=float))
    orchestrator: str = field(
        default="",
        metadata=_opt("HOST:PORT of the data orchestrator to register with and report links and ports to (default: none)"),
    )
    link_hold_s: float = field(
        default=30.0,
        metadata=_opt("how long the port of an incoming link stays reserved for its peer to come back, seconds", type=float),
    )
    shutdown_timeout_s: float = field(default=5.0, metadata=_opt("how long a shutdown waits for output to flush, seconds", type=float))
    hello_timeout_s: float = _shared("hello_timeout_s")
    max_connections: int = _shared("max_connections")
    max_connections_per_address: int = _shared("max_connections_per_address")
    max_connections_per_name: int = _shared("max_connections_per_name")
    secret_file: str = field(
        default="",
        metadata=_opt(
            "file holding the brokers' secret (dcp secret --broker), or the orchestrator's: it checks tokens and route tags "
            "and issues this broker's own tokens"
        ),
    )
    verify_routes: bool = field(
        default=False,
        metadata=_opt(
            "forward only data frames whose topology number carries a genuine, unexpired tag from the orchestrator "
            "(needs --secret-file)", action="store_true",
        ),
    )
    require_token: bool = _shared("require_token")
    insecure: bool = _shared("insecure")
    tls_cert: str = _shared("tls_cert")
    tls_key: str = _shared("tls_key")
    tls_ca: str = field(
        default="",
        metadata=_opt("CA file to verify the peers and the orchestrator this broker dials; with it, it dials them over TLS"),
    )
    log_level: str = _shared("log_level")
    log_format: str = _shared("log_format")
    log_config: str = _shared("log_config")
    metrics_listen: str = _shared("metrics_listen")
    metrics_max_ports: int = field(
        default=100,
        metadata=_opt("per-port series on /metrics for this many ports at most, the busiest (the totals count every port)", type=int),
    )

    def __post_init__(self) -> None:
        parse_address(self.listen)
        _check_shared(self)
        if self.metrics_max_ports < 0:
            raise ConfigError(f"metrics_max_ports must not be negative, got {self.metrics_max_ports}")
        if self.verify_routes and not self.secret_file:
            raise ConfigError("verify_routes needs secret_file (the brokers' secret, which checks the tags)")
        if self.verify_routes and self.mode != "stateless":
            raise ConfigError("verify_routes needs stateless mode: a stateful broker routes by its own table, not by X")
        if isinstance(self.peers, str) or not all(isinstance(peer, str) for peer in self.peers):
            raise ConfigError(f"peers must be a list of HOST:PORT strings, got {self.peers!r}")
        object.__setattr__(self, "peers", tuple(self.peers))
        for peer in self.peers:
            parse_address(peer)
        if self.orchestrator:
            parse_address(self.orchestrator)
        for name in ("link_ping_interval_s", "link_timeout_s", "link_retry_max_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.link_hold_s < 0:
            raise ConfigError("link_hold_s must not be negative")
        if not 1 <= self.ports <= MAX_PORTS:
            raise ConfigError(f"ports must be in [1, {MAX_PORTS}], got {self.ports}")
        width = KeyLayout.root_width(self.ports)
        if self.key is not None and self.key <= 1 << width:
            raise ConfigError(f"key {self.key} must be greater than 2**{width} = {1 << width} (the root of {self.ports} ports)")
        if self.mode not in MODES:
            raise ConfigError(f"mode must be one of {MODES}, got {self.mode!r}")
        slow_consumer_policy(self.slow_consumer)
        if self.out_buffer_bytes < 1024:
            raise ConfigError(f"out_buffer_bytes must be at least 1024, got {self.out_buffer_bytes}")
        if self.shutdown_timeout_s < 0:
            raise ConfigError("shutdown_timeout_s must not be negative")
        try:
            self.limits
        except ValueError as exc:
            raise ConfigError(str(exc)) from None

    @property
    def limits(self) -> Limits:
        # a control frame is a frame: under a small max_frame, max_frame bounds it too
        max_control = min(DEFAULT_LIMITS.max_control, self.max_frame)
        return Limits(max_frame=self.max_frame, max_topic=self.max_topic, max_x_bits=self.max_x_bits, max_control=max_control)

    @property
    def address(self) -> tuple[str, int]:
        return parse_address(self.listen)


@dataclass(frozen=True)
class OrchestratorConfig(_FromSources):
    """Everything the data orchestrator needs to run."""

    SECTION = "orchestrator"

    listen: str = field(default="127.0.0.1:7300", metadata=_opt("HOST:PORT to listen on (port 0: any free one)"))
    db: str = field(default="dcp-orchestrator.db", metadata=_opt("sqlite file holding the registries and pipelines (:memory: for none)"))
    policy_file: str = field(
        default="", metadata=_opt("TOML/JSON file of publish/consume rules (default: allow everything)", key="policy")
    )
    grace_s: float = field(
        default=10.0,
        metadata=_opt(
            "how long a broker's or agent's last registration stands after its connection to the orchestrator ends "
            "(also after a restart), seconds", type=float,
        ),
    )
    secret_file: str = field(
        default="",
        metadata=_opt(
            "file holding the orchestrator's secret (dcp secret): it issues the tokens and signs the topology numbers "
            "(route tags); the brokers get the secret derived from it (dcp secret --broker)"
        ),
    )
    route_ttl_s: float = field(
        default=3600.0,
        metadata=_opt("how long a signed topology number stays valid; it is re-signed when half of it is left, seconds", type=float),
    )
    plan_by_hops: bool = field(
        default=False,
        metadata=_opt(
            "plan fewest-hops trees: the links' measured cost (load reports) is shown in status but never changes a "
            "tree, so a congested link is not routed around (for comparison; bench/congestion.py)", action="store_true",
        ),
    )
    require_token: bool = _shared("require_token")
    insecure: bool = _shared("insecure")
    tls_cert: str = _shared("tls_cert")
    tls_key: str = _shared("tls_key")
    hello_timeout_s: float = _shared("hello_timeout_s")
    max_connections: int = _shared("max_connections")
    max_connections_per_address: int = _shared("max_connections_per_address")
    max_connections_per_name: int = _shared("max_connections_per_name")
    max_capabilities: int = field(
        default=64, metadata=_opt("capabilities one agent may register; a register with more is refused (too_large)", type=int)
    )
    max_consumes: int = field(
        default=1024, metadata=_opt("topic patterns one agent may consume; a register with more is refused (too_large)", type=int)
    )
    max_produces: int = field(
        default=1024, metadata=_opt("topics one agent may produce; a register with more is refused (too_large)", type=int)
    )
    log_level: str = _shared("log_level")
    log_format: str = _shared("log_format")
    log_config: str = _shared("log_config")
    metrics_listen: str = _shared("metrics_listen")

    def __post_init__(self) -> None:
        parse_address(self.listen)
        _check_shared(self)
        if self.grace_s < 0:
            raise ConfigError("grace_s must not be negative")
        for name in ("max_capabilities", "max_consumes", "max_produces"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.route_ttl_s < 2:
            raise ConfigError(f"route_ttl_s must be at least 2 seconds, got {self.route_ttl_s}")

    @property
    def address(self) -> tuple[str, int]:
        return parse_address(self.listen)


def _read_toml(path: Path, section: str) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    table = data.get(section, data)
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: [{section}] must be a table")
    return dict(table)
