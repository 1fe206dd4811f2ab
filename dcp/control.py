"""The control protocol, sans-I/O: every op, its message, and who may send it where.

A control frame carries a msgpack map with an ``op`` (:mod:`dcp.wire`).  Each op has
one message type here, a frozen dataclass: build it and send ``to_body()``; take what
arrives with :func:`parse_request` (a daemon) or :func:`parse_answer` (a client), or
``Request.reply.from_body`` for the reply a request expects.
Parsing checks the type and range of every field the message has before anything
reads it, and raises :class:`~dcp.errors.BadRequest` naming the op and the field.
Fields a message does not know are ignored, so a newer peer may send more.  A field
that is absent, or nil, takes its default; a field with no default is required.

Requests go from a client to a daemon; replies (``ok``, ``error``, ``welcome``, ``pong``,
``stats``) answer them, with ``re`` the request's ``id``; pushes (``route``, ``assign``,
``unassign``, ``going_away``) come unasked.  A reply of op ``ok`` has one type per
request that says more than "done" (``Request.reply``).

:data:`BROKER` and :data:`ORCHESTRATOR` are the permission tables: which role may send
which op to each daemon, and the code a refused pair is answered with.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import MISSING, Field, dataclass, field, fields, replace
from typing import Any, ClassVar, Generic, NamedTuple, TypeVar, get_args, get_origin

from .errors import BadRequest, ConfigError, did_you_mean
from .routing import int_from_bytes, int_to_bytes
from .wire import ROUTE_TAG_SIZE, Limits

__all__ = [
    # op names
    "HELLO", "WELCOME", "PING", "PONG", "STATS", "POLICY", "SUBSCRIBE", "UNSUBSCRIBE", "LINK", "UNLINK",
    "OK", "ERROR", "GOING_AWAY", "REGISTER", "REPORT", "BROKER_STATE", "PORTS_CHANGED", "LOAD", "PIPELINES", "STATUS", "DEPLOY",
    "UNDEPLOY", "TOKEN", "ROUTE", "ASSIGN", "UNASSIGN",
    # vocabulary
    "SLOW_CONSUMER_POLICIES", "slow_consumer_policy", "ELEMENT_KINDS", "ELEMENT_COUNTERS", "MESSAGE_LIMIT", "ERROR_TEXT_LIMIT",
    # field kinds
    "Kind", "UINT", "PORT", "PORTS", "REMOTE_PORT", "STR", "NAME", "BOOL", "BIG_INT", "BIG_INTS", "TAG", "STRS", "MAP", "MAPS",
    "WAIT", "POSITIVE_SECONDS", "SLOW_CONSUMER_NAME", "ELEMENT_KIND", "LIMIT_FRAME", "LIMIT_TOPIC", "LIMIT_X_BITS",
    "COUNTERS", "LAST_ERRORS", "ASSIGNMENTS", "LINK_STATS", "LINK_REPORTS", "PORT_REPORTS", "TAGS", "SHARE_MODE", "SHARES",
    "MS", "RATE", "LINK_LOADS", "PORT_LOADS",
    # messages
    "Message", "Request", "Reply", "ElementPush", "Hello", "Welcome", "Ping", "Pong", "StatsRequest", "Stats",
    "SlowConsumerRequest", "SlowConsumerSet",
    "Subscribe", "Unsubscribe", "Link", "Linked", "Unlink", "Ok", "Error", "GoingAway", "Register", "Registered",
    "Report", "LinkReport", "PortReport", "BrokerState", "PortsChanged", "LinkLoad", "PortLoad", "Load", "Pipelines", "PipelinesView", "Status", "StatusView",
    "Deploy", "Deployed", "Undeploy", "Token", "Issued", "Route", "Share", "Assign", "Unassign",
    "REQUESTS", "ANSWERS", "parse_request", "parse_answer", "request_id",
    # permissions
    "Refusal", "Permissions", "BROKER", "ORCHESTRATOR", "FATAL_REFUSALS",
]

HELLO = "hello"
WELCOME = "welcome"
PING = "ping"
PONG = "pong"
STATS = "stats"
POLICY = "policy"
SUBSCRIBE = "subscribe"
UNSUBSCRIBE = "unsubscribe"
LINK = "link"
UNLINK = "unlink"
OK = "ok"
ERROR = "error"
GOING_AWAY = "going_away"
REGISTER = "register"
REPORT = "report"
BROKER_STATE = "broker_state"
PORTS_CHANGED = "ports_changed"
LOAD = "load"
PIPELINES = "pipelines"
STATUS = "status"
DEPLOY = "deploy"
UNDEPLOY = "undeploy"
TOKEN = "token"
ROUTE = "route"
ASSIGN = "assign"
UNASSIGN = "unassign"

#: What a port does when its consumer cannot keep up: drop the new frames, drop the
#: oldest queued ones, or stop reading from the publishers.  "drop" = "drop-newest".
SLOW_CONSUMER_POLICIES = ("drop-newest", "drop-oldest", "pause", "drop")


def slow_consumer_policy(name: object) -> str:
    """The slow-consumer policy ``name`` names, as a broker applies it (``drop`` is
    ``drop-newest``): the one check of a policy name, wherever one is given.

    Raises:
        ConfigError: not one of SLOW_CONSUMER_POLICIES.
    """
    if type(name) is not str or name not in SLOW_CONSUMER_POLICIES:
        near = did_you_mean(name, SLOW_CONSUMER_POLICIES) if type(name) is str else ""
        raise ConfigError(f"slow_consumer must be one of {', '.join(SLOW_CONSUMER_POLICIES)}, got {name!r}{near}")
    return "drop-newest" if name == "drop" else name


ELEMENT_KINDS = ("source", "stage", "sink")
#: The counters an agent reports of each element (``Report.elements``); ``busy``, the
#: share of the last report interval its handler ran, is its load for placement
#: (:mod:`dcp.placement`), so it is refused outside [0, 1].
ELEMENT_COUNTERS = ("in", "out", "errors", "latency_ms", "latency_max_ms", "busy")
#: Error messages may quote what the peer sent (an op, a role): cut to this many
#: characters, so that an error frame always fits max_control.
MESSAGE_LIMIT = 1024
#: The last error of an element (``Report.last_errors``) is cut to this many characters
#: by the agent, and refused longer: one line in ``dcp pipelines``, not a traceback.
ERROR_TEXT_LIMIT = 300


# --------------------------------------------------------------------------- field kinds


def _same(value: Any) -> Any:
    return value


class Kind(NamedTuple):
    """What one field holds on the wire (``what``, for errors; ``accepts``) and how it
    becomes the message's value (``decode``) and back (``encode``)."""

    what: str
    accepts: Callable[[Any], bool]
    decode: Callable[[Any], Any] = _same
    encode: Callable[[Any], Any] = _same


def _ints(low: int, high: int) -> Kind:
    return Kind(f"an int in [{low}, {high}]", lambda v: type(v) is int and low <= v <= high)


def _one_of(choices: tuple[str, ...]) -> Kind:
    return Kind(f"one of {', '.join(choices)}", lambda v: type(v) is str and v in choices)


def _number(value: Any) -> bool:
    return type(value) is int or type(value) is float and math.isfinite(value)


def _limit(name: str) -> Kind:
    """A limit a broker declares in its welcome: what :class:`dcp.wire.Limits` takes."""

    def accepts(value: Any) -> bool:
        if type(value) is not int:
            return False
        try:
            Limits(**{name: value, "max_control": 1})
        except ValueError:
            return False
        return True

    return Kind(f"an int within the range of Limits.{name}", accepts)


def _counters(value: Any) -> bool:
    return type(value) is dict and all(
        type(key) is str and type(counts) is dict
        and all(k in ELEMENT_COUNTERS and _number(n) and (k != "busy" or 0 <= n <= 1) for k, n in counts.items())
        for key, counts in value.items()
    )


def _last_errors(value: Any) -> bool:
    return type(value) is dict and all(
        type(key) is str and type(text) is str and len(text) <= ERROR_TEXT_LIMIT for key, text in value.items()
    )


def _assignments(value: Any) -> bool:
    return type(value) is dict and all(
        type(key) is str and type(agents) is list and all(type(a) is str for a in agents) for key, agents in value.items()
    )


UINT = _ints(0, 2**64 - 1)
PORT = _ints(0, 0xFFFF)
REMOTE_PORT = _ints(-1, 0xFFFF)  # -1: not known yet
STR = Kind("a string", lambda v: type(v) is str)
NAME = Kind("a non-empty string", lambda v: type(v) is str and v != "")
BOOL = Kind("true or false", lambda v: type(v) is bool)
BIG_INT = Kind("bytes (a big-endian unsigned int)", lambda v: type(v) is bytes, int_from_bytes, int_to_bytes)
BIG_INTS = Kind(
    "a list of bytes (big-endian unsigned ints)",
    lambda v: type(v) is list and all(type(item) is bytes for item in v),
    lambda v: [int_from_bytes(item) for item in v],
    lambda v: [int_to_bytes(item) for item in v],
)
PORTS = Kind("a list of ints in [0, 65535]", lambda v: type(v) is list and all(type(p) is int and 0 <= p <= 0xFFFF for p in v))
TAG = Kind(f"{ROUTE_TAG_SIZE} bytes (a route tag)", lambda v: type(v) is bytes and len(v) == ROUTE_TAG_SIZE)
TAGS = Kind(
    f"a list of {ROUTE_TAG_SIZE}-byte route tags",
    lambda v: type(v) is list and all(type(item) is bytes and len(item) == ROUTE_TAG_SIZE for item in v),
)
SHARE_MODE = _one_of(("round_robin", "key"))
STRS = Kind("a list of strings", lambda v: type(v) is list and all(type(item) is str for item in v))
MAP = Kind("a map", lambda v: type(v) is dict)
MAPS = Kind("a list of maps", lambda v: type(v) is list and all(type(item) is dict for item in v))
WAIT = Kind("a number of seconds >= 0", lambda v: _number(v) and v >= 0)
POSITIVE_SECONDS = Kind("a positive number of seconds", lambda v: _number(v) and v > 0)
SLOW_CONSUMER_NAME = _one_of(SLOW_CONSUMER_POLICIES)
ELEMENT_KIND = _one_of(ELEMENT_KINDS)
LIMIT_FRAME, LIMIT_TOPIC, LIMIT_X_BITS = _limit("max_frame"), _limit("max_topic"), _limit("max_x_bits")
COUNTERS = Kind(f"a map of element names to maps of {', '.join(ELEMENT_COUNTERS)} (numbers; busy in [0, 1])", _counters)
LAST_ERRORS = Kind(f"a map of element names to strings of at most {ERROR_TEXT_LIMIT} characters", _last_errors)
ASSIGNMENTS = Kind("a map of element names to lists of agent names", _assignments)
#: A latency: at most an hour, in milliseconds.
MS = Kind("a number of milliseconds in [0, 3600000]", lambda v: _number(v) and 0 <= v <= 3_600_000)
#: A throughput: at most 10**12 bytes per second.
RATE = Kind("a number of bytes per second in [0, 1e12]", lambda v: _number(v) and 0 <= v <= 1e12)
LINK_STATS = Kind(
    "a map with port (int), state (str) and remote_port (int)",
    lambda v: type(v) is dict and type(v.get("port")) is int and type(v.get("state")) is str and type(v.get("remote_port")) is int,
)

_REQUIRED: Any = object()


def _field(kind: Kind, default: Any = _REQUIRED, code: str | None = None) -> Any:
    """A message field of ``kind``; ``code``: the error code of a bad value, if not ``bad_request``."""
    metadata = {"kind": kind, "code": code}
    if default is _REQUIRED:
        return field(metadata=metadata)
    return field(default=default, metadata=metadata)


def _records(cls: type[Message]) -> Kind:
    """A list of maps, each one ``cls`` (a record: a message with no op)."""

    def decode(items: list[dict[str, Any]]) -> list[Message]:
        records = []
        for i, item in enumerate(items):
            try:
                records.append(cls.from_body(item))
            except BadRequest as exc:
                raise BadRequest("", f"[{i}].{exc.field}", f"[{i}].{exc.reason}", exc.code) from None
        return records

    return Kind(
        f"a list of maps ({cls.__name__})",
        lambda v: type(v) is list and all(type(item) is dict for item in v),
        decode,
        lambda records: [record.to_body() for record in records],
    )


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:57]}..."


# --------------------------------------------------------------------------- messages

M = TypeVar("M", bound="Message")

#: Each message type's fields, looked up once (``dataclasses.fields`` walks the class).
_FIELDS: dict[type, tuple[Field[Any], ...]] = {}


def _fields_of(cls: type) -> tuple[Field[Any], ...]:
    found = _FIELDS.get(cls)
    if found is None:
        found = _FIELDS[cls] = fields(cls)
    return found


@dataclass(frozen=True, kw_only=True)
class Message:
    """Base of every message: ``op`` names it on the wire ("" for a record inside one)."""

    op: ClassVar[str] = ""

    def to_body(self) -> dict[str, Any]:
        """The msgpack map to send; fields that are None are left out."""
        body: dict[str, Any] = {"op": self.op} if self.op else {}
        for f in _fields_of(type(self)):
            value = getattr(self, f.name)
            if value is not None:
                body[f.name] = f.metadata["kind"].encode(value)
        return body

    @classmethod
    def from_body(cls: type[M], body: Mapping[str, Any]) -> M:
        """The message ``body`` holds, every field checked first.

        Raises:
            BadRequest: a field of the wrong type or range, a required one missing, or
                another op than this type's.
        """
        if cls.op and body.get("op") != cls.op:
            raise BadRequest(cls.op, "op", f"expected op {cls.op!r}, got {_short(body.get('op'))}")
        values = {}
        for f in _fields_of(cls):
            value = body.get(f.name)
            if value is None:
                if f.default is MISSING:
                    raise BadRequest(cls.op, f.name, f"{f.name} is required", f.metadata["code"])
                continue
            kind: Kind = f.metadata["kind"]
            if not kind.accepts(value):
                raise BadRequest(cls.op, f.name, f"{f.name} must be {kind.what}, got {_short(value)}", f.metadata["code"])
            try:
                values[f.name] = kind.decode(value)
            except BadRequest as exc:  # a record inside: say where
                raise BadRequest(cls.op, f.name + exc.field, f.name + exc.reason, exc.code) from None
        return cls(**values)


@dataclass(frozen=True, kw_only=True)
class Reply(Message):
    """A message that answers the request whose ``id`` is ``re``."""

    re: int | None = _field(UINT, None)


R = TypeVar("R", bound=Reply)


@dataclass(frozen=True, kw_only=True)
class Request(Message, Generic[R]):
    """A message a client sends a daemon; ``id``, if any, comes back as the reply's ``re``."""

    #: The type of the reply it gets (an error aside): the ``R`` of ``Request[R]``.
    reply: ClassVar[type[Reply]]
    id: int | None = _field(UINT, None)

    def __init_subclass__(cls, **options: Any) -> None:
        super().__init_subclass__(**options)
        for base in getattr(cls, "__orig_bases__", ()):
            if get_origin(base) is Request:
                cls.reply = get_args(base)[0]


@dataclass(frozen=True, kw_only=True)
class Ok(Reply):
    """A request was done; the ``ok`` replies below say more."""

    op: ClassVar[str] = OK


@dataclass(frozen=True, kw_only=True)
class Error(Reply):
    """A request refused, or (no ``re``) something the sender should know; ``fatal``: the
    connection is closed after it.  Never answered, or two brokers would argue forever."""

    op: ClassVar[str] = ERROR
    code: str = _field(STR)
    message: str = _field(STR, "")
    fatal: bool = _field(BOOL, False)
    count: int | None = _field(UINT, None)  # frames of this code since the last such error

    def __post_init__(self) -> None:
        if len(self.message) > MESSAGE_LIMIT:
            object.__setattr__(self, "message", self.message[:MESSAGE_LIMIT])


@dataclass(frozen=True, kw_only=True)
class Welcome(Reply):
    """The answer to a hello.  A broker's gives its key, its mode, its limits and, to an
    agent or a peer, the port it is on; the orchestrator's only its name and mode.  A
    broker with more than 64 ports also gives all its ``keys`` (:class:`dcp.routing.KeyLayout`).
    A broker that forwards only signed topology numbers (``--verify-routes``) says so
    (``verify_routes``), so that a client refuses an untagged publish instead of the
    broker dropping it out of sight."""

    op: ClassVar[str] = WELCOME
    key: int | None = _field(BIG_INT, None)
    keys: list[int] | None = _field(BIG_INTS, None)
    name: str = _field(STR, "")
    mode: str = _field(STR, "")
    port: int | None = _field(PORT, None)
    ports: int | None = _field(PORT, None)
    max_frame: int | None = _field(LIMIT_FRAME, None)
    max_topic: int | None = _field(LIMIT_TOPIC, None)
    max_x_bits: int | None = _field(LIMIT_X_BITS, None)
    slow_consumer: str | None = _field(SLOW_CONSUMER_NAME, None)
    verify_routes: bool | None = _field(BOOL, None)


@dataclass(frozen=True, kw_only=True)
class Hello(Request[Welcome]):
    """The first request on a connection: who is calling, in which role, with which token.

    A peer (a broker dialling a link) also gives its ``key``, all its ``keys`` when it
    has more than one, and the port the ``link`` has at its end; an agent may choose
    its port's ``slow_consumer`` policy.
    """

    op: ClassVar[str] = HELLO
    role: str = _field(STR, "agent")
    name: str = _field(STR, "")
    token: str | None = _field(STR, None)
    slow_consumer: str | None = _field(SLOW_CONSUMER_NAME, None, code="bad_policy")
    key: int | None = _field(BIG_INT, None)
    keys: list[int] | None = _field(BIG_INTS, None)
    link: int | None = _field(PORT, None)


@dataclass(frozen=True, kw_only=True)
class Pong(Reply):
    op: ClassVar[str] = PONG


@dataclass(frozen=True, kw_only=True)
class Ping(Request[Pong]):
    """Asks for a pong: a round trip; a broker's pong also says it read all sent before."""

    op: ClassVar[str] = PING


@dataclass(frozen=True, kw_only=True)
class Stats(Reply):
    """A broker's counters (``dcp stats``)."""

    op: ClassVar[str] = STATS
    stats: dict[str, Any] = _field(MAP)


@dataclass(frozen=True, kw_only=True)
class StatsRequest(Request[Stats]):
    op: ClassVar[str] = STATS


@dataclass(frozen=True, kw_only=True)
class SlowConsumerSet(Ok):
    slow_consumer: str = _field(SLOW_CONSUMER_NAME)


@dataclass(frozen=True, kw_only=True)
class SlowConsumerRequest(Request[SlowConsumerSet]):
    """The ``policy`` op: sets what the broker does with frames for this port when its
    consumer falls behind (its slow-consumer policy)."""

    op: ClassVar[str] = POLICY
    slow_consumer: str = _field(SLOW_CONSUMER_NAME, code="bad_policy")


@dataclass(frozen=True, kw_only=True)
class Subscribe(Request[Ok]):
    """Stateful mode: send frames of ``topic`` to this port."""

    op: ClassVar[str] = SUBSCRIBE
    topic: str = _field(NAME, code="bad_topic")


@dataclass(frozen=True, kw_only=True)
class Unsubscribe(Subscribe):
    op: ClassVar[str] = UNSUBSCRIBE


@dataclass(frozen=True, kw_only=True)
class Linked(Ok):
    link: dict[str, Any] = _field(LINK_STATS)


@dataclass(frozen=True, kw_only=True)
class Link(Request[Linked]):
    """Admin: link the broker to the broker at ``peer``; with ``wait``, answer once up."""

    op: ClassVar[str] = LINK
    peer: str = _field(STR)
    wait: float | None = _field(WAIT, None)


@dataclass(frozen=True, kw_only=True)
class Unlink(Request[Ok]):
    """Admin: close the link on ``port`` for good.  From a peer (no port): free its link."""

    op: ClassVar[str] = UNLINK
    port: int | None = _field(PORT, None, code="no_link")


@dataclass(frozen=True, kw_only=True)
class GoingAway(Message):
    """The sender is shutting down: it closes the connection after this."""

    op: ClassVar[str] = GOING_AWAY


@dataclass(frozen=True, kw_only=True)
class Registered(Ok):
    assignments: int = _field(UINT)


@dataclass(frozen=True, kw_only=True)
class Register(Request[Registered]):
    """An agent (named by its hello) tells the orchestrator what it does and where it is attached."""

    op: ClassVar[str] = REGISTER
    capabilities: list[str] = _field(STRS)
    consumes: list[str] = _field(STRS)
    produces: list[str] = _field(STRS)
    broker_key: int = _field(BIG_INT)
    port: int = _field(PORT)


@dataclass(frozen=True, kw_only=True)
class Report(Request[Ok]):
    """An agent's counters, sent now and then, never answered; ``last_errors``: the last
    error of each element that has failed (a field apart from ``elements``, whose maps
    hold numbers only, so that an orchestrator that does not know it still takes the report)."""

    op: ClassVar[str] = REPORT
    elements: dict[str, dict[str, float]] = _field(COUNTERS)
    published: int = _field(UINT)
    unrouted: int = _field(UINT)
    lost: int = _field(UINT)
    dropped: int = _field(UINT)
    pending: int = _field(UINT)
    last_errors: dict[str, str] | None = _field(LAST_ERRORS, None)


@dataclass(frozen=True, kw_only=True)
class LinkReport(Message):
    """One link in a broker_state: its port here, the peer's key and port, its state."""

    port: int = _field(PORT)
    remote_key: int = _field(BIG_INT)
    remote_port: int = _field(REMOTE_PORT)
    state: str = _field(STR)


@dataclass(frozen=True, kw_only=True)
class PortReport(Message):
    """One port in a broker_state with an agent on it."""

    port: int = _field(PORT)
    name: str = _field(STR)


LINK_REPORTS = _records(LinkReport)
PORT_REPORTS = _records(PortReport)


@dataclass(frozen=True, kw_only=True)
class BrokerState(Request[Ok]):
    """A broker's keys, ports, links and attachments, sent at registration and after a
    link changes; ``keys``: its whole key layout when it has more than one key."""

    op: ClassVar[str] = BROKER_STATE
    key: int = _field(BIG_INT)
    keys: list[int] | None = _field(BIG_INTS, None)
    address: str = _field(STR, "")
    ports: int = _field(PORT, 0)
    links: list[LinkReport] = _field(LINK_REPORTS)
    attached: list[PortReport] | None = _field(PORT_REPORTS, None)


@dataclass(frozen=True, kw_only=True)
class PortsChanged(Request[Ok]):
    """Attachments since a broker's last report: a report costs what changed, not
    what the broker holds (``detached`` are port numbers)."""

    op: ClassVar[str] = PORTS_CHANGED
    attached: list[PortReport] = _field(PORT_REPORTS)
    detached: list[int] = _field(PORTS)


@dataclass(frozen=True, kw_only=True)
class LinkLoad(Message):
    """One link in a load report: the round trip its pings measure, the bytes it sent
    per second over the last interval, and the bytes waiting in its output queue."""

    port: int = _field(PORT)
    rtt_ms: float = _field(MS)
    bytes_per_s: float = _field(RATE)
    queue_bytes: int = _field(UINT)


@dataclass(frozen=True, kw_only=True)
class PortLoad(Message):
    """One attachment in a load report: the bytes waiting in its output queue."""

    port: int = _field(PORT)
    queue_bytes: int = _field(UINT)


LINK_LOADS = _records(LinkLoad)
PORT_LOADS = _records(PortLoad)


@dataclass(frozen=True, kw_only=True)
class Load(Request[Ok]):
    """What a broker's links and attachments carry, sent periodically and only for those
    whose figures changed much since they were last sent (never answered)."""

    op: ClassVar[str] = LOAD
    links: list[LinkLoad] = _field(LINK_LOADS)
    ports: list[PortLoad] = _field(PORT_LOADS)


@dataclass(frozen=True, kw_only=True)
class PipelinesView(Ok):
    pipelines: list[dict[str, Any]] = _field(MAPS)


@dataclass(frozen=True, kw_only=True)
class Pipelines(Request[PipelinesView]):
    """Deployed pipelines with their agents' counters."""

    op: ClassVar[str] = PIPELINES


@dataclass(frozen=True, kw_only=True)
class StatusView(Ok):
    status: dict[str, Any] = _field(MAP)


@dataclass(frozen=True, kw_only=True)
class Status(Request[StatusView]):
    """The orchestrator's brokers, agents and streams; with ``summary``, their counts
    only (a full status of thousands of agents does not fit a control frame)."""

    op: ClassVar[str] = STATUS
    summary: bool | None = _field(BOOL, None)


@dataclass(frozen=True, kw_only=True)
class Deployed(Ok):
    """``warnings``: the routes of the pipeline that reach no consumer now, and why."""

    pipeline: str = _field(STR)
    assignments: dict[str, list[str]] = _field(ASSIGNMENTS)
    warnings: list[str] | None = _field(STRS, None)


@dataclass(frozen=True, kw_only=True)
class Deploy(Request[Deployed]):
    """Admin: deploy a pipeline ``spec`` (the table of a spec file, :mod:`dcp.spec`)."""

    op: ClassVar[str] = DEPLOY
    spec: dict[str, Any] = _field(MAP)


@dataclass(frozen=True, kw_only=True)
class Undeploy(Request[Ok]):
    op: ClassVar[str] = UNDEPLOY
    name: str = _field(STR)


@dataclass(frozen=True, kw_only=True)
class Issued(Ok):
    token: str = _field(STR)
    name: str = _field(STR)
    role: str = _field(STR)
    expires: int = _field(UINT)


@dataclass(frozen=True, kw_only=True)
class Token(Request[Issued]):
    """Admin: a token for ``name`` in ``role``, valid ``ttl_s`` seconds (None: the default)."""

    op: ClassVar[str] = TOKEN
    name: str = _field(NAME)
    role: str = _field(STR, "agent")
    ttl_s: float | None = _field(POSITIVE_SECONDS, None)


@dataclass(frozen=True, kw_only=True)
class Share(Message):
    """One share group of a route: each frame goes to one ``members`` (the digits of the
    route's variant index, the first group the fastest), in turn or by the publisher's
    key.  For a request stream, ``replies`` holds the number from each member back to the
    producer, with its tag and the key of the broker it was computed for."""

    group: str = _field(NAME)
    mode: str = _field(SHARE_MODE)
    members: list[str] = _field(STRS)
    replies: list[int] | None = _field(BIG_INTS, None)
    reply_tags: list[bytes] | None = _field(TAGS, None)
    reply_keys: list[int] | None = _field(BIG_INTS, None)


SHARES = _records(Share)


@dataclass(frozen=True, kw_only=True)
class Route(Message):
    """Push: the topology number ``x`` for the producer's ``topic``, epoch ``epoch``.

    ``broker_key``: the broker X was computed for; ``tag``: the orchestrator's signature
    on X, carrying its own expiry; ``refused``: why the producer may not publish.  With
    share groups (``shares``), ``variants`` holds one number per choice of one member in
    each group, ``variant_tags`` their tags, and ``x`` is the first.
    """

    op: ClassVar[str] = ROUTE
    topic: str = _field(NAME)
    x: int = _field(BIG_INT)
    epoch: int = _field(UINT)
    consumers: list[str] = _field(STRS)
    refused: str | None = _field(STR, None)
    broker_key: int | None = _field(BIG_INT, None)
    tag: bytes | None = _field(TAG, None)
    variants: list[int] | None = _field(BIG_INTS, None)
    variant_tags: list[bytes] | None = _field(TAGS, None)
    shares: list[Share] | None = _field(SHARES, None)


@dataclass(frozen=True, kw_only=True)
class ElementPush(Message):
    """A push about ``element`` of ``pipeline``."""

    pipeline: str = _field(STR)
    element: str = _field(STR)

    @property
    def key(self) -> str:
        """How the agent knows the element: ``pipeline/element``."""
        return f"{self.pipeline}/{self.element}"


@dataclass(frozen=True, kw_only=True)
class Unassign(ElementPush):
    """Push: stop running the element."""

    op: ClassVar[str] = UNASSIGN


@dataclass(frozen=True, kw_only=True)
class Assign(ElementPush):
    """Push: run the element with ``capability`` and the spec's ``params``."""

    op: ClassVar[str] = ASSIGN
    kind: str = _field(ELEMENT_KIND)
    capability: str = _field(STR)
    params: dict[str, Any] = _field(MAP)
    consumes: list[str] = _field(STRS)
    emits: str | None = _field(NAME, None)


def _registry(*types: type[Message]) -> dict[str, type[Message]]:
    return {t.op: t for t in types}


#: What daemons receive: requests, and from a peer link the answers to a broker's hello and pings.
REQUESTS = _registry(
    Hello, Ping, StatsRequest, SlowConsumerRequest, Subscribe, Unsubscribe, Link, Unlink, Register, Report, BrokerState, PortsChanged,
    Load, Pipelines, Status, Deploy, Undeploy, Token, Error, GoingAway, Welcome, Pong,
)
#: What clients receive: replies (``ok`` as the plain :class:`Ok`) and pushes.
ANSWERS = _registry(Welcome, Ok, Error, Pong, Stats, GoingAway, Route, Assign, Unassign)


def _parse(body: Mapping[str, Any], registry: Mapping[str, type[Message]]) -> Message:
    op = body.get("op")
    kind = registry.get(op) if type(op) is str else None
    if kind is None:
        raise BadRequest(str(op), "op", f"unknown control op {_short(op)}", "unknown_op")
    return kind.from_body(body)


def parse_request(body: Mapping[str, Any]) -> Message:
    """The message of a control frame a daemon received.

    Raises:
        BadRequest: an op not in :data:`REQUESTS` (code ``unknown_op``) or a bad field.
    """
    return _parse(body, REQUESTS)


def parse_answer(body: Mapping[str, Any]) -> Message:
    """The message of a control frame a client received (an ``ok`` as plain :class:`Ok`).

    Raises:
        BadRequest: an op not in :data:`ANSWERS` (code ``unknown_op``) or a bad field.
    """
    return _parse(body, ANSWERS)


def request_id(body: Mapping[str, Any]) -> int | None:
    """The ``id`` of a request, if it has a valid one: the ``re`` of its answer, even when
    the rest of it is malformed."""
    value = body.get("id")
    return value if UINT.accepts(value) else None


# --------------------------------------------------------------------------- permissions


class Refusal(NamedTuple):
    """Why an op is refused: the error frame's ``code`` and ``message``; ``fatal``: the
    connection is closed after it."""

    code: str
    message: str
    fatal: bool


#: The refusals after which a connection is closed.
FATAL_REFUSALS = frozenset({"token_missing"})

_WHO = {
    "": "a connection before its hello",
    "agent": "an agent connection",
    "admin": "an admin connection",
    "peer": "a peer link",
    "broker": "a broker connection",
}
_REASONS = {
    "already_attached": "hello was already sent on this connection",
    "token_missing": "{op!r} before hello: this {daemon} admits only connections with a token",
    "hello_first": "send hello before {op}",
    "not_attached": "{op} needs an agent attached by its hello, not {who}",
    "not_admin": "{op} needs an admin connection",
    "not_agent": "{op} needs an agent connection",
    "not_broker": "{op} needs a broker connection",
    "unknown_op": "unknown control op {op!r} for {who} to this {daemon}",
}


@dataclass(frozen=True)
class Permissions:
    """Who may send which op to one daemon.

    ``roles`` are the columns: ``""`` is a connection before its hello, the others the
    roles a hello may name.  ``rows`` gives, for each op, per role, ``""`` (allowed) or
    the code it is refused with; an op with no row is refused everywhere, ``unknown_op``.
    ``token_roles``: the roles whose hello needs a token, unless the daemon runs
    ``--insecure`` (:meth:`insecure`: none).  ``token_required`` (``--require-token``,
    :meth:`requiring_token`): every role's hello needs one, and before its hello a
    connection may send nothing else, whatever its rows say (``token_missing``, fatal).
    """

    daemon: str
    roles: tuple[str, ...]
    rows: Mapping[str, tuple[str, ...]]
    token_required: bool = False
    token_roles: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        assert self.roles[0] == "" and all(len(row) == len(self.roles) for row in self.rows.values()), self.daemon
        assert {code for row in self.rows.values() for code in row} <= {"", *_REASONS}, self.daemon
        assert self.token_roles <= set(self.hello_roles), self.daemon

    @property
    def hello_roles(self) -> tuple[str, ...]:
        return self.roles[1:]

    def code(self, role: str, op: str) -> str:
        """``""`` if ``role`` may send ``op``, else the code of its refusal."""
        if self.token_required and not role and op != HELLO:
            return "token_missing"
        row = self.rows.get(op)
        return "unknown_op" if row is None else row[self.roles.index(role)]

    def refusal(self, role: str, op: str) -> Refusal | None:
        """None if ``role`` may send ``op``, else the refusal to answer it with."""
        code = self.code(role, op)
        if not code:
            return None
        message = _REASONS[code].format(op=op, who=_WHO[role], daemon=self.daemon)
        return Refusal(code, message[:MESSAGE_LIMIT], code in FATAL_REFUSALS)

    def check_role(self, hello: Hello) -> None:
        """Raises BadRequest unless the hello names a role of this daemon."""
        if hello.role not in self.hello_roles:
            raise BadRequest(HELLO, "role", f"role must be one of {', '.join(self.hello_roles)}, got {_short(hello.role)}")

    def needs_token(self, role: str) -> bool:
        """Whether a hello naming ``role`` is admitted only with a valid token."""
        return self.token_required or role in self.token_roles

    def requiring_token(self) -> Permissions:
        """The table of this daemon started with ``--require-token``: every role needs a token."""
        return replace(self, token_required=True, token_roles=frozenset(self.hello_roles))

    def insecure(self) -> Permissions:
        """The table of this daemon started with ``--insecure``: no role needs a token."""
        return replace(self, token_required=False, token_roles=frozenset())

    def pairs(self) -> Iterator[tuple[str, str, str]]:
        """Every (role, op, code) of the table's rows."""
        for op in self.rows:
            for role in self.roles:
                yield role, op, self.code(role, op)


_A, _AT, _UN = "already_attached", "not_attached", "unknown_op"
_NA, _HF = "not_admin", "hello_first"

BROKER = Permissions(
    "broker",
    ("", "agent", "admin", "peer"),
    {
        #             before hello  agent  admin  peer
        HELLO:        ("", _A, _A, _A),
        PING:         ("", "", "", ""),
        STATS:        (_NA, _NA, "", _NA),  # every client's address and name: admins only
        POLICY:       ("", "", "", ""),
        SUBSCRIBE:    (_AT, "", _AT, _AT),
        UNSUBSCRIBE:  (_AT, "", _AT, _AT),
        LINK:         (_NA, _NA, "", _NA),
        UNLINK:       (_NA, _NA, "", ""),  # a peer's frees its link
        ERROR:        ("", "", "", ""),
        GOING_AWAY:   ("", "", "", ""),
        WELCOME:      (_UN, _UN, _UN, ""),  # the answer to a link's hello
        PONG:         (_UN, _UN, _UN, ""),  # the answer to a link's ping
    },
    token_roles=frozenset({"admin", "peer"}),  # agents attach without one, unless --require-token
)

ORCHESTRATOR = Permissions(
    "orchestrator",
    ("", "agent", "broker", "admin"),
    {
        #             before hello  agent  broker  admin
        HELLO:        ("", _A, _A, _A),
        PING:         (_HF, "", "", ""),
        REGISTER:     (_HF, "", "not_agent", "not_agent"),
        REPORT:       (_HF, "", "not_agent", "not_agent"),
        BROKER_STATE: (_HF, "not_broker", "", "not_broker"),
        PORTS_CHANGED: (_HF, "not_broker", "", "not_broker"),
        LOAD:         (_HF, "not_broker", "", "not_broker"),
        PIPELINES:    (_HF, _NA, _NA, ""),
        STATUS:       (_HF, _NA, _NA, ""),
        DEPLOY:       (_HF, _NA, _NA, ""),
        UNDEPLOY:     (_HF, _NA, _NA, ""),
        TOKEN:        (_HF, _NA, _NA, ""),
        ERROR:        ("", "", "", ""),
        GOING_AWAY:   ("", "", "", ""),
    },
    token_roles=frozenset({"agent", "broker", "admin"}),  # every role: it runs as with --require-token
)
