"""The control protocol (dcp.control) and the daemons that speak it, driven in process.

* exhaustive: every (role, op) of each daemon's permission table is allowed, or refused
  with the table's code;
* property: ``from_body(to_body(m)) == m`` for every message type, through the wire
  codec too; a field of another msgpack type is a BadRequest naming it, never another
  exception;
* fuzz (tests/fuzzing.py): random and mutated answers to a dialling link's hello, and
  random control bodies to the orchestrator;
* the malformed welcomes that raised TypeError in a broker's data_received and brought
  links up with such fields.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
from hypothesis import given
from hypothesis import strategies as st

import dcp
from dcp import control
from dcp.auth import issue_token
from dcp.broker import _HANDLERS as BROKER_HANDLERS
from dcp.broker import Broker, BrokerConnection
from dcp.client import Connection
from dcp.config import OrchestratorConfig
from dcp.errors import BadRequest, ConfigError, DcpError, LinkRefused, ProtocolError
from dcp.link import Link
from dcp.orchestrator import _HANDLERS as ORCHESTRATOR_HANDLERS
from dcp.orchestrator import Orchestrator, OrchestratorConnection
from dcp.routing import allocate_keys, int_to_bytes
from dcp.wire import CONTROL, DATA, HEADER_SIZE, ControlFrame, Decoder, decode_control, encode_control
from tests.purity import copy_with_import, loaded
from tests.waiting import until

from .fuzzing import KEY, PORTS, apply_mutations, executed, frame_starts, fuzz_settings, mutations, split
from .loopback import LoopbackServer
from .test_broker_protocol import FakeTransport, fresh_broker, quiet_broker_logs

FAR_KEY = allocate_keys(1, 8)[0]  # the key of the peer a link dials
ID = 7  # the id of every example request


class FakeServer:
    """Stands in for a broker's listening socket: ``stats`` says where it listens."""

    class _Socket:
        def getsockname(self) -> tuple[str, int]:
            return ("127.0.0.1", 7400)

    sockets = [_Socket()]


def served_broker(**settings: object) -> Broker:
    broker = fresh_broker(**settings)
    broker._server = FakeServer()  # type: ignore[assignment]
    return broker


def control_frames(transport: Any) -> list[ControlFrame]:
    """The control frames written to a fake transport (which must be well formed)."""
    decoder = Decoder()
    events = decoder.feed(bytes(transport.written)) if transport.written else []
    decoder.feed(b"")
    return [event for event in events if isinstance(event, ControlFrame)]


SPEC = {"name": "p", "sink": [{"name": "out", "capability": "collect", "consumes": ["t"]}]}

#: A valid message of every op (``stats``: the request).
EXAMPLES: dict[str, control.Message] = {message.op: message for message in (
    control.Hello(id=ID), control.Ping(id=ID), control.StatsRequest(id=ID), control.SlowConsumerRequest(id=ID, slow_consumer="pause"),
    control.Subscribe(id=ID, topic="t"), control.Unsubscribe(id=ID, topic="t"), control.Link(id=ID, peer="127.0.0.1:9"),
    control.Unlink(id=ID, port=9), control.Error(code="oops", message="a notice"), control.GoingAway(),
    control.Welcome(re=0, key=FAR_KEY, port=3, name="far"), control.Pong(re=ID), control.Ok(re=ID),
    control.Register(id=ID, capabilities=["collect"], consumes=["t"], produces=["u"], broker_key=KEY, port=0),
    control.Report(elements={"p/out": {"in": 1, "latency_ms": 0.5}}, published=1, unrouted=0, lost=0, dropped=0, pending=0),
    control.BrokerState(id=ID, key=KEY, address="127.0.0.1:1", ports=8, links=[], attached=[]),
    control.PortsChanged(id=ID, attached=[], detached=[]),
    control.Load(links=[control.LinkLoad(port=1, rtt_ms=0.5, bytes_per_s=1000, queue_bytes=0)], ports=[]),
    control.Pipelines(id=ID), control.Status(id=ID), control.Deploy(id=ID, spec=SPEC), control.Undeploy(id=ID, name="p"),
    control.Token(id=ID, name="cam"), control.Route(topic="t", x=5, epoch=1, consumers=["b"]),
    control.Assign(pipeline="p", element="e", kind="stage", capability="c", params={}, consumes=["t"]),
    control.Unassign(pipeline="p", element="e"),
)}
OPS = sorted({*control.REQUESTS, *control.ANSWERS, "no-such-op"})


def example(op: str) -> dict[str, Any]:
    return EXAMPLES[op].to_body() if op in EXAMPLES else {"op": op, "id": ID}


#: Every code a permission table refuses with, and those of a message refused unread.
REFUSAL_CODES = {code for table in (control.BROKER, control.ORCHESTRATOR) for _, _, code in table.pairs() if code}
REFUSAL_CODES |= {"unknown_op", "bad_request", "token_missing"}
#: The reply an allowed request gets when it is done (the others get a handler's error or nothing).
DONE = {"hello": "welcome", "ping": "pong", "stats": "stats", "policy": "ok", "subscribe": "ok", "unsubscribe": "ok",
        "register": "ok", "broker_state": "ok", "ports_changed": "ok", "pipelines": "ok", "status": "ok"}


def assert_decided(table: control.Permissions, role: str, op: str, body: dict[str, Any], conn: Any) -> None:
    """What ``conn`` answered ``body`` is the table's word: its refusal, or no refusal at all."""
    answers = control_frames(conn.transport)
    code = table.code(role, op)
    if code:
        [error] = answers
        fatal = code in control.FATAL_REFUSALS
        assert (error.op, error.body["code"], error.body.get("re"), error.body["fatal"]) == ("error", code, control.request_id(body), fatal), (role, op)
        assert conn.transport.closed == fatal
    else:
        assert not [a for a in answers if a.op == "error" and a.body["code"] in REFUSAL_CODES], (role, op, answers)
        if op in DONE:
            assert [(a.op, a.body.get("re")) for a in answers] == [(DONE[op], ID)], (role, op, answers)


# --------------------------------------------------------------------------- the tables


def test_the_tables_say_what_the_daemons_did_before_them() -> None:
    broker, do = control.BROKER, control.ORCHESTRATOR
    assert broker.code("agent", "link") == "not_admin" and broker.code("admin", "link") == ""
    assert broker.code("admin", "subscribe") == "not_attached" and broker.code("agent", "subscribe") == ""
    assert broker.code("peer", "unlink") == "" and broker.code("agent", "unlink") == "not_admin"
    assert broker.code("agent", "register") == "unknown_op" and broker.code("agent", "welcome") == "unknown_op"
    assert broker.code("", "ping") == "" and broker.requiring_token().code("", "ping") == "token_missing"
    # admins only since the secure default: stats names every client, status and pipelines every agent
    assert broker.code("agent", "stats") == "not_admin" and broker.code("", "stats") == "not_admin"
    assert do.code("agent", "status") == "not_admin" and do.code("broker", "pipelines") == "not_admin"
    assert broker.token_roles == {"admin", "peer"} and do.token_roles == {"agent", "broker", "admin"}
    assert broker.insecure().needs_token("admin") is False and broker.needs_token("agent") is False
    assert broker.requiring_token().needs_token("agent") is True
    assert do.code("agent", "token") == "not_admin" and do.code("broker", "register") == "not_agent"
    assert do.code("agent", "broker_state") == "not_broker" and do.code("", "ping") == "hello_first"
    assert do.code("agent", "hello") == "already_attached" and do.code("admin", "subscribe") == "unknown_op"
    assert all(do.requiring_token().code("", op) == ("" if op == "hello" else "token_missing") for op in do.rows)


@pytest.mark.parametrize("table, handlers", [(control.BROKER, BROKER_HANDLERS), (control.ORCHESTRATOR, ORCHESTRATOR_HANDLERS)])
def test_every_op_a_table_allows_has_a_message_and_a_handler(table: control.Permissions, handlers: dict[Any, Any]) -> None:
    assert set(handlers) == {control.REQUESTS[op] for op in table.rows}
    assert all(role in ("", "agent", "admin", "peer", "broker") for role in table.roles)


def broker_connection(broker: Broker, role: str, token: str | None = None) -> BrokerConnection:
    """A connection in ``role``: ``peer`` is a link this broker dialled, the others say hello."""
    if role == "peer":
        link = Link(broker, broker._reserve_port(), address="127.0.0.1:9")
        broker.links[link.port] = link
        conn = broker.new_connection(link)
        conn.connection_made(FakeTransport())  # type: ignore[arg-type]
    else:
        conn = BrokerConnection(broker)
        conn.connection_made(FakeTransport())  # type: ignore[arg-type]
        if role:
            conn.data_received(encode_control(control.Hello(id=1, role=role, name=f"the-{role}", token=token).to_body()))
    conn.transport.written.clear()  # type: ignore[union-attr]
    assert conn.role == role and not conn.closing
    return conn


@pytest.mark.parametrize("role", control.BROKER.roles)
def test_the_broker_allows_or_refuses_every_op_of_every_role_as_its_table_says(role: str, caplog: pytest.LogCaptureFixture) -> None:
    quiet_broker_logs(caplog)
    for op in OPS:
        broker = served_broker(mode="stateful", key=KEY, ports=PORTS)
        conn = broker_connection(broker, role)
        body = example(op)
        conn.data_received(encode_control(body))
        assert_decided(control.BROKER, role, op, body, conn)


@pytest.mark.parametrize("op", OPS)
def test_before_its_hello_a_broker_requiring_tokens_takes_a_hello_only(op: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    quiet_broker_logs(caplog)
    secret = tmp_path / "secret"
    secret.write_text(secrets.token_hex(16))
    secret.chmod(0o600)
    broker = served_broker(key=KEY, ports=PORTS, require_token=True, secret_file=str(secret))
    conn = broker_connection(broker, "")
    body = example(op)
    if op == "hello":
        body["token"] = issue_token(secret.read_bytes(), "cam", "agent", int(time.time()) + 60)
    conn.data_received(encode_control(body))
    assert_decided(broker.permissions, "", op, body, conn)


async def orchestrator_connection(do: Orchestrator, role: str) -> OrchestratorConnection:
    conn = OrchestratorConnection(do)
    conn.connection_made(FakeTransport())  # type: ignore[arg-type]
    if role:
        conn.data_received(encode_control(control.Hello(id=1, role=role, name=f"the-{role}").to_body()))
    conn.transport.written.clear()  # type: ignore[union-attr]
    assert conn.role == role and not conn.closing
    return conn


@pytest.mark.parametrize("role", control.ORCHESTRATOR.roles)
async def test_the_orchestrator_allows_or_refuses_every_op_of_every_role_as_its_table_says(role: str) -> None:
    for op in OPS:
        do = Orchestrator(OrchestratorConfig(listen="127.0.0.1:0", db=":memory:", insecure=True))
        conn = await orchestrator_connection(do, role)
        body = example(op)
        conn.data_received(encode_control(body))
        assert_decided(control.ORCHESTRATOR, role, op, body, conn)


async def test_before_its_hello_an_orchestrator_requiring_tokens_takes_a_hello_only(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text(secrets.token_hex(16))
    secret.chmod(0o600)
    for op in OPS:
        do = Orchestrator(OrchestratorConfig(listen="127.0.0.1:0", db=":memory:", require_token=True, secret_file=str(secret)))
        conn = await orchestrator_connection(do, "")
        body = example(op)
        if op == "hello":
            body["token"] = issue_token(secret.read_bytes(), "cam", "agent", int(time.time()) + 60)
        conn.data_received(encode_control(body))
        assert_decided(do.permissions, "", op, body, conn)


# --------------------------------------------------------------------------- messages

scalars = (st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=False)
           | st.text(max_size=8) | st.binary(max_size=8))
#: Any value a msgpack map may hold (nil, bool, int, float, str, bin, array, map).
msgpack_values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3), max_leaves=6
)
numbers = st.integers(0, 10**9) | st.floats(0, 1e9)
text = st.text(max_size=12)

KIND_VALUES: dict[control.Kind, st.SearchStrategy[Any]] = {
    control.UINT: st.integers(0, 2**64 - 1),
    control.PORT: st.integers(0, 0xFFFF),
    control.REMOTE_PORT: st.integers(-1, 0xFFFF),
    control.STR: text,
    control.NAME: st.text(min_size=1, max_size=12),
    control.BOOL: st.booleans(),
    control.BIG_INT: st.integers(0, 2**300),
    control.BIG_INTS: st.lists(st.integers(0, 2**100), max_size=4),
    control.PORTS: st.lists(st.integers(0, 0xFFFF), max_size=4),
    control.TAG: st.binary(min_size=24, max_size=24),
    control.STRS: st.lists(text, max_size=4),
    control.MAP: st.dictionaries(st.text(max_size=6), msgpack_values, max_size=4),
    control.MAPS: st.lists(st.dictionaries(st.text(max_size=6), msgpack_values, max_size=3), max_size=3),
    control.WAIT: numbers,
    control.POSITIVE_SECONDS: st.integers(1, 10**9) | st.floats(1e-3, 1e9),
    control.SLOW_CONSUMER_NAME: st.sampled_from(control.SLOW_CONSUMER_POLICIES),
    control.ELEMENT_KIND: st.sampled_from(control.ELEMENT_KINDS),
    control.LIMIT_FRAME: st.integers(HEADER_SIZE + 1, 2**32 - 1),
    control.LIMIT_TOPIC: st.integers(1, 0xFFFF),
    control.LIMIT_X_BITS: st.integers(1, 0xFFFF * 8),
    control.COUNTERS: st.dictionaries(text, st.dictionaries(st.sampled_from(control.ELEMENT_COUNTERS), st.floats(0, 1)), max_size=3)
    | st.dictionaries(text, st.dictionaries(st.sampled_from([c for c in control.ELEMENT_COUNTERS if c != "busy"]), numbers), max_size=3),
    control.LAST_ERRORS: st.dictionaries(text, st.text(max_size=control.ERROR_TEXT_LIMIT), max_size=3),
    control.ASSIGNMENTS: st.dictionaries(text, st.lists(text, max_size=3), max_size=3),
    control.LINK_STATS: st.fixed_dictionaries({"port": st.integers(0, 99), "state": text, "remote_port": st.integers(-1, 99)}),
    control.TAGS: st.lists(st.binary(min_size=24, max_size=24), max_size=3),
    control.SHARE_MODE: st.sampled_from(("round_robin", "key")),
    control.MS: st.integers(0, 3_600_000) | st.floats(0, 3_600_000),
    control.RATE: st.integers(0, 10**12) | st.floats(0, 1e12),
}
RECORDS = {
    control.LINK_REPORTS: control.LinkReport, control.PORT_REPORTS: control.PortReport, control.SHARES: control.Share,
    control.LINK_LOADS: control.LinkLoad, control.PORT_LOADS: control.PortLoad,
}
MESSAGE_TYPES = sorted(
    (t for t in vars(control).values() if isinstance(t, type) and issubclass(t, control.Message)
     and t not in (control.Message, control.Request, control.Reply, control.ElementPush)),
    key=lambda t: t.__name__,
)


def values_of(f: dataclasses.Field[Any]) -> st.SearchStrategy[Any]:
    kind = f.metadata["kind"]
    if kind in RECORDS:
        values: st.SearchStrategy[Any] = st.lists(messages_of(RECORDS[kind]), max_size=3)
    else:
        values = KIND_VALUES[kind]
    return st.none() | values if f.default is None else values


def messages_of(cls: type[control.Message]) -> st.SearchStrategy[control.Message]:
    return st.builds(cls, **{f.name: values_of(f) for f in dataclasses.fields(cls)})


def test_every_kind_and_message_type_is_covered() -> None:
    kinds = {f.metadata["kind"] for t in MESSAGE_TYPES for f in dataclasses.fields(t)}
    assert kinds == {*KIND_VALUES, *RECORDS}
    assert {t.op for t in MESSAGE_TYPES if t.op} == {*control.REQUESTS, *control.ANSWERS}


@given(name=st.sampled_from(control.SLOW_CONSUMER_POLICIES) | msgpack_values)
def test_a_slow_consumer_policy_name_is_checked_one_way(name: Any) -> None:
    """Config, spec, SDK and broker all call slow_consumer_policy; the wire takes the same names."""
    if name in control.SLOW_CONSUMER_POLICIES and type(name) is str:
        assert control.slow_consumer_policy(name) == ("drop-newest" if name == "drop" else name)
        assert control.SLOW_CONSUMER_NAME.accepts(name)
    else:
        with pytest.raises(ConfigError, match="slow_consumer must be one of drop-newest, drop-oldest, pause, drop, got"):
            control.slow_consumer_policy(name)
        assert not control.SLOW_CONSUMER_NAME.accepts(name)


@given(message=st.sampled_from(MESSAGE_TYPES).flatmap(messages_of))
def test_a_message_survives_its_body_and_the_wire(message: control.Message) -> None:
    cls = type(message)
    body = message.to_body()
    assert cls.from_body(body) == message
    if cls.op:
        received = decode_control(encode_control(body)[HEADER_SIZE:]).body
        assert cls.from_body(received) == message
        registry = control.REQUESTS if control.REQUESTS.get(cls.op) is cls else control.ANSWERS
        if registry.get(cls.op) is cls:
            parse = control.parse_request if registry is control.REQUESTS else control.parse_answer
            assert parse(received) == message


@given(data=st.data())
def test_a_field_of_another_type_is_a_bad_request_naming_it(data: st.DataObject) -> None:
    cls = data.draw(st.sampled_from([t for t in MESSAGE_TYPES if dataclasses.fields(t)]))
    message = data.draw(messages_of(cls))
    f = data.draw(st.sampled_from(dataclasses.fields(cls)))
    kind = f.metadata["kind"]
    bad = data.draw(msgpack_values.filter(lambda v: v is not None and not kind.accepts(v)))
    with pytest.raises(BadRequest) as info:
        cls.from_body({**message.to_body(), f.name: bad})
    assert (info.value.op, info.value.field) == (cls.op, f.name)
    assert str(info.value).startswith(f"{cls.op}: {f.name} must be" if cls.op else f"{f.name} must be")


@given(data=st.data())
def test_any_body_is_a_message_or_a_bad_request(data: st.DataObject) -> None:
    cls = data.draw(st.sampled_from(MESSAGE_TYPES))
    names = [f.name for f in dataclasses.fields(cls)] or ["x"]
    body = data.draw(st.dictionaries(st.sampled_from(names) | st.text(max_size=4), msgpack_values, max_size=6))
    if cls.op:
        body["op"] = cls.op
    try:
        message = cls.from_body(body)
    except BadRequest as exc:
        assert exc.op == cls.op and exc.field and exc.reason in str(exc)
    else:
        assert type(message) is cls
    op = data.draw(msgpack_values | st.sampled_from(OPS))
    for parse in (control.parse_request, control.parse_answer):
        try:
            parse({**body, "op": op})
        except BadRequest:
            pass


def test_a_required_field_left_out_or_nil_is_named() -> None:
    for body in ({"op": "register", "consumes": [], "produces": [], "capabilities": [], "port": 0},
                 {"op": "register", "consumes": [], "produces": [], "capabilities": [], "port": 0, "broker_key": None}):
        with pytest.raises(BadRequest, match="^register: broker_key is required$") as info:
            control.parse_request(body)
        assert info.value.field == "broker_key" and info.value.code == "bad_request"


def test_a_bad_record_inside_a_message_is_named_with_its_index() -> None:
    state = control.BrokerState(key=KEY, links=[control.LinkReport(port=1, remote_key=3, remote_port=-1, state="up")]).to_body()
    state["links"].append({"port": 2, "remote_key": "3", "remote_port": 0, "state": "up"})
    with pytest.raises(BadRequest) as info:
        control.parse_request(state)
    assert info.value.field == "links[1].remote_key"
    assert str(info.value).startswith("broker_state: links[1].remote_key must be bytes")


def test_fields_with_older_codes_keep_them() -> None:
    cases: list[tuple[dict[str, Any], str]] = [({"op": "policy", "slow_consumer": "sometimes"}, "bad_policy"), ({"op": "subscribe", "topic": ""}, "bad_topic"),
             ({"op": "unlink", "port": [1]}, "no_link"), ({"op": "launch"}, "unknown_op"), ({"op": "ping", "id": -1}, "bad_request")]
    for body, code in cases:
        with pytest.raises(BadRequest) as info:
            control.parse_request(body)
        assert info.value.code == code, body


def test_an_error_message_is_cut_to_fit_its_frame() -> None:
    error = control.Error(code="x", message="m" * 100_000)
    assert len(error.message) == control.MESSAGE_LIMIT
    encode_control(error.to_body())


def test_control_imports_no_io_modules(tmp_path: Path) -> None:
    watched = ["asyncio", "socket", "sympy"]
    assert loaded(["control"], watched) == "[]"
    fake = copy_with_import(tmp_path, ["errors.py", "routing.py", "wire.py"], "control.py", "import asyncio\nimport socket\n")
    assert loaded(["control"], watched, fake) == "['asyncio', 'socket']"


# --------------------------------------------------------------------------- the client side


def test_a_malformed_push_or_answer_reaches_no_one(caplog: pytest.LogCaptureFixture) -> None:
    pushed: list[control.Message] = []
    conn = Connection("dcp://127.0.0.1:9", on_push=pushed.append)
    for body in ({"op": "route", "topic": 5, "x": b"", "epoch": 1, "consumers": []},  # a topic of the wrong type
                 {"op": "assign", "pipeline": "p", "element": "e", "kind": "oven", "capability": "c", "params": {}, "consumes": []},
                 {"op": "ok", "re": [1]},  # an unhashable re: was a TypeError in data_received
                 {"op": "error", "code": 3}):
        conn._on_control(body)
    assert pushed == [] and conn.last_error is None
    assert "route: topic must be" in caplog.text and "assign: kind must be one of source, stage, sink" in caplog.text
    conn._on_control(EXAMPLES["route"].to_body())
    assert pushed == [EXAMPLES["route"]]


# --------------------------------------------------------------------------- the link handshake

VALID_WELCOME = control.Welcome(re=0, key=FAR_KEY, port=5, name="far", mode="stateless", ports=8)
ANSWER_KEYS = ("re", "key", "port", "name", "mode", "ports", "max_frame", "max_topic", "max_x_bits", "slow_consumer",
               "verify_routes", "code", "message", "fatal", "count")


def dialling_link(loop: asyncio.AbstractEventLoop) -> tuple[Broker, Link, BrokerConnection]:
    """A broker's outbound link whose hello is out: it waits for the peer's answer."""
    broker = served_broker(key=KEY, ports=PORTS)
    link = Link(broker, broker._reserve_port(), address="127.0.0.1:9")
    broker.links[link.port] = link
    link._welcome = loop.create_future()  # what Link._dial waits on
    conn = broker.new_connection(link)
    conn.connection_made(FakeTransport())  # type: ignore[arg-type]
    return broker, link, conn


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    """A loop for futures only: nothing runs on it."""
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.mark.parametrize("field, value", [("key", "5"), ("port", "5"), ("name", 7)])
def test_a_malformed_welcome_refuses_the_link_and_says_why(loop, caplog: pytest.LogCaptureFixture, field: str, value: object) -> None:  # type: ignore[no-untyped-def]
    """A string key, a string port, an int name: each raised TypeError out of
    data_received, or brought the link up with that field."""
    broker, link, conn = dialling_link(loop)
    conn.data_received(encode_control({**VALID_WELCOME.to_body(), field: value}))
    refusal = link._welcome.exception()  # type: ignore[union-attr]
    assert isinstance(refusal, BadRequest) and (refusal.op, refusal.field) == ("welcome", field)
    assert link.state == "down" and not broker.attached >> link.port & 1
    assert (link.remote_key, link.remote_port, link.remote_name) == (0, -1, "")
    assert f"sent a malformed welcome: welcome: {field} must be" in caplog.text


@pytest.mark.parametrize("missing", ["key", "port"])
def test_a_welcome_without_the_peers_key_or_port_refuses_the_link(loop, missing: str) -> None:  # type: ignore[no-untyped-def]
    broker, link, conn = dialling_link(loop)
    body = VALID_WELCOME.to_body()
    del body[missing]
    conn.data_received(encode_control(body))
    refusal = link._welcome.exception()  # type: ignore[union-attr]
    assert isinstance(refusal, BadRequest) and refusal.field == missing and link.state == "down"


def test_a_valid_welcome_brings_the_link_up_and_a_second_is_ignored(loop) -> None:  # type: ignore[no-untyped-def]
    broker, link, conn = dialling_link(loop)
    conn.data_received(encode_control(VALID_WELCOME.to_body()))
    conn.data_received(encode_control({**VALID_WELCOME.to_body(), "port": 6, "name": "other"}))
    assert link._welcome.result() is None and link.state == "up"  # type: ignore[union-attr]
    assert (link.remote_key, link.remote_port, link.remote_name) == (FAR_KEY, 5, "far")
    assert broker.attached >> link.port & 1 and not conn.closing


class MalformedPeer(LoopbackServer):
    """Answers every link hello with a welcome that has ``field`` set to ``value``."""

    def __init__(self, field: str, value: object) -> None:
        super().__init__()
        self.welcome = encode_control({**VALID_WELCOME.to_body(), field: value})

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(65536)  # the hello
        writer.write(self.welcome)
        await reader.read()  # until the broker gives up on it


@pytest.mark.parametrize("field, value", [("key", "5"), ("port", "5"), ("name", 7)])
async def test_a_live_link_to_a_peer_with_a_malformed_welcome_stays_down_and_says_why(make_broker, field: str, value: object) -> None:  # type: ignore[no-untyped-def]
    peer = MalformedPeer(field, value)
    address = await peer.start()
    try:
        broker = await make_broker(key=KEY, ports=PORTS, link_retry_max_s=0.05)
        link = broker.add_link(address)
        await until(lambda: link.connects >= 2, "a redial after the refusal")
        assert link.last_error.startswith(f"welcome: {field} must be"), link.last_error
        assert link.state == "down" and not broker.attached >> link.port & 1
    finally:
        await peer.close()


async def test_a_welcome_with_the_diallers_own_key_refuses_the_link_for_good(make_broker) -> None:  # type: ignore[no-untyped-def]
    """A peer that does not check keys itself welcomes the link: the dialler sees the
    shared key in the welcome, which no redial can change, and stops."""
    peer = MalformedPeer("key", int_to_bytes(KEY))
    address = await peer.start()
    try:
        broker = await make_broker(key=KEY, ports=PORTS, link_retry_max_s=0.05)
        link = broker.add_link(address)
        with pytest.raises(LinkRefused) as refused:
            await link.wait_up(30)
        assert refused.value.code == "same_key" and address in str(refused.value)
        assert (link.state, link.connects) == ("refused", 1) and link.last_error.startswith(f"same_key: the peer has this broker's key {KEY}")
        assert not broker.attached >> link.port & 1
    finally:
        await peer.close()


def test_a_malformed_pong_refuses_a_link_waiting_for_its_welcome(loop: asyncio.AbstractEventLoop) -> None:
    """Found by the link handshake fuzz run (``re: []``); a welcome after it changes nothing."""
    broker, link, conn = dialling_link(loop)
    conn.data_received(encode_control({"op": "pong", "re": []}) + encode_control(VALID_WELCOME.to_body()))
    assert link._welcome is not None and link._welcome.done()
    assert isinstance(link._welcome.exception(), BadRequest) and link.state != "up"


@pytest.mark.parametrize(("keys", "ports"), [([FAR_KEY], 200), ([FAR_KEY, 3, 5, 7], 200), ([5], 8)])
async def test_a_client_refuses_a_welcome_whose_keys_cannot_route(keys: list[int], ports: int) -> None:
    """Keys that do not fit the port count (too few, too small) would make route_to
    build numbers the broker reads otherwise: the connection is refused, saying why."""
    peer = MalformedPeer("keys", [])
    peer.welcome = encode_control(control.Welcome(re=1, key=keys[0], keys=keys, port=5, ports=ports).to_body())
    address = await peer.start()
    try:
        with pytest.raises(dcp.ConnectionClosed, match="keys that route nothing"):
            await dcp.connect(f"dcp://{address}", reconnect=False)
    finally:
        await peer.close()


@st.composite
def link_answers(draw: st.DrawFn) -> dict[str, Any]:
    """A body a peer might answer a link's hello with: valid, with one field changed, or random."""
    valid = draw(st.sampled_from([VALID_WELCOME.to_body(), control.Error(re=0, code="same_key", message="no").to_body(),
                                  control.Pong(re=1).to_body()]))
    shape = draw(st.sampled_from(("valid", "one field", "random")))
    if shape == "valid":
        return valid
    if shape == "one field":
        return {**valid, draw(st.sampled_from(ANSWER_KEYS)): draw(msgpack_values)}
    fields = draw(st.lists(st.tuples(st.sampled_from(ANSWER_KEYS), msgpack_values), max_size=5))
    return {**dict(fields), "op": draw(st.sampled_from(("welcome", "error", "pong")) | st.text(max_size=8))}


def decision(body: dict[str, Any]) -> str | None:
    """What an answer does to a link still waiting for its welcome: brings it ``up``,
    ``refused`` or ``closed`` it; None: nothing yet."""
    op = body["op"]
    if op == "welcome":
        try:
            welcome = control.Welcome.from_body(body)
        except BadRequest:
            return "refused"
        return "up" if welcome.key is not None and welcome.port is not None else "refused"
    if op == "error":
        return "refused"
    if op == "pong":  # a malformed one refuses the link too (found by this fuzz test: re=[])
        try:
            control.Pong.from_body(body)
        except BadRequest:
            return "refused"
        return None
    if op == "going_away":
        return "closed"
    if op == "unlink":
        try:
            control.Unlink.from_body(body)
        except BadRequest:
            return None
        return "closed"
    return None


def expected_decision(stream: bytes) -> str | None:
    """The decision of the first answer that decides, read as a broker reads: up to the
    first frame that ends the connection (a broken stream, a control frame over the
    limits, a data frame from a peer not yet welcomed)."""
    decoder = Decoder()
    for frame in split(stream, frame_starts(stream)):
        ftype = frame[1] if len(frame) > 1 else None
        try:
            events = decoder.feed(frame)
        except ProtocolError:
            return None
        if ftype == DATA and events:
            return None
        for event in events:
            if ftype == CONTROL and not isinstance(event, ControlFrame):
                return None
            if isinstance(event, ControlFrame) and (found := decision(event.body)) is not None:
                return found
    return None


@pytest.mark.fuzz
@fuzz_settings(60)
@given(data=st.data())
def test_fuzz_link_handshake_comes_up_only_on_a_valid_welcome(caplog, data: st.DataObject) -> None:  # type: ignore[no-untyped-def]
    """Random and mutated answers to a dialling link's hello, in any reads: nothing is
    raised out of data_received; the link comes up if and only if the first answer that
    decides is a valid welcome, with the fields it gave; a refused link says why."""
    quiet_broker_logs(caplog)
    executed["link handshake"] += 1
    bodies = data.draw(st.lists(link_answers(), min_size=1, max_size=3), label="answers")
    stream = apply_mutations(b"".join(encode_control(body) for body in bodies), data.draw(mutations(max_size=3), label="mutations"))
    reads = split(stream, data.draw(st.lists(st.integers(0, len(stream)), max_size=4), label="cuts"))
    loop = asyncio.new_event_loop()
    try:
        broker, link, conn = dialling_link(loop)
        for read in reads:
            if conn.closing:
                break
            conn.data_received(read)
        welcome = link._welcome
        assert welcome is not None
        up = welcome.done() and welcome.exception() is None
        expected = expected_decision(stream)
        assert up == (expected == "up"), (expected, stream)
        if up:
            assert (type(link.remote_key), type(link.remote_port), type(link.remote_name)) == (int, int, str)
            assert link.remote_port >= 0 and link.remote_key > 0
        elif expected == "refused":
            assert welcome.done() and isinstance(welcome.exception(), DcpError)
        control_frames(conn.transport)  # what the broker answered is well formed
    finally:
        if link._welcome is not None and link._welcome.done():
            link._welcome.exception()  # retrieved: not logged as lost
        loop.close()


# --------------------------------------------------------------------------- the orchestrator

ORCHESTRATOR_OPS = sorted({*control.ORCHESTRATOR.rows, "welcome", "ok", "route", "no-such-op"})
REQUEST_KEYS = sorted({f.name for t in control.REQUESTS.values() for f in dataclasses.fields(t)})


@st.composite
def orchestrator_bodies(draw: st.DrawFn) -> dict[str, Any]:
    """A control body for the orchestrator: an example, one with a field changed, or random."""
    op = draw(st.sampled_from(ORCHESTRATOR_OPS))
    shape = draw(st.sampled_from(("valid", "one field", "random")))
    if shape == "valid":
        return example(op)
    if shape == "one field":
        return {**example(op), draw(st.sampled_from(REQUEST_KEYS)): draw(msgpack_values)}
    fields = draw(st.lists(st.tuples(st.sampled_from(REQUEST_KEYS) | st.text(max_size=4), msgpack_values), max_size=5))
    return {**dict(fields), "op": op}


async def drive_orchestrator(plan: list[tuple[int, bytes]]) -> tuple[list[OrchestratorConnection], list[dict[str, Any]]]:
    """Feed ``plan`` (connection, bytes) to an orchestrator's connections; what they
    wrote, and what the loop was left to report (exceptions in callbacks)."""
    loop = asyncio.get_running_loop()
    unhandled: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _, context: unhandled.append(context))
    do = Orchestrator(OrchestratorConfig(listen="127.0.0.1:0", db=":memory:", insecure=True))
    conns = [OrchestratorConnection(do) for _ in range(2)]
    for conn in conns:
        conn.connection_made(FakeTransport())  # type: ignore[arg-type]
    for index, read in plan:
        conns[index].data_received(read)
    if do._dirty:  # the recomputation the loop would run next
        do._recompute()
    return conns, unhandled


@pytest.mark.fuzz
@fuzz_settings(40)
@given(data=st.data())
def test_fuzz_orchestrator_control_gets_errors_or_valid_replies(caplog, data: st.DataObject) -> None:  # type: ignore[no-untyped-def]
    """Random control bodies (after a hello, mostly), some mutated, from two connections:
    nothing is raised out of data_received or a callback, and every frame the
    orchestrator writes is a valid answer (an error, a reply or a push)."""
    caplog.set_level(logging.ERROR, logger="dcp")
    executed["orchestrator control"] += 1
    reads = []
    for index in (0, 1):
        bodies = data.draw(st.lists(orchestrator_bodies(), max_size=5), label=f"bodies {index}")
        role = data.draw(st.sampled_from(("agent", "broker", "admin", "")), label=f"role {index}")
        if role:
            bodies.insert(0, control.Hello(id=1, role=role, name=f"{role}-{index}").to_body())
        stream = apply_mutations(b"".join(map(encode_control, bodies)), data.draw(mutations(max_size=2), label=f"mutations {index}"))
        reads.append(split(stream, data.draw(st.lists(st.integers(0, len(stream)), max_size=3), label=f"cuts {index}")))
    turns = data.draw(st.permutations([0] * len(reads[0]) + [1] * len(reads[1])), label="turns")  # each stream in order
    plan = [(index, reads[index].pop(0)) for index in turns]
    conns, unhandled = asyncio.run(drive_orchestrator(plan))
    assert unhandled == []
    for conn in conns:
        for frame in control_frames(conn.transport):
            control.parse_answer(frame.body)


# --------------------------------------------------------------------------- pinned by mutation testing
#
# The kinds, fields and record lists of dcp.control are built when the module is
# imported; these build their own at test time, so that a change in how they are
# built shows (docs/mutation.md).


@dataclasses.dataclass(frozen=True, kw_only=True)
class ProbeReply(control.Reply):
    op: ClassVar[str] = "probe_reply"


def probe_record() -> Any:
    """A record type (no op) with a required field and one with its own error code,
    made at test time (a module-level one would be made before a mutant is chosen)."""

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class ProbeRecord(control.Message):
        n: int = control._field(control.UINT)
        s: str = control._field(control.STR, "d", code="bad_s")

    return ProbeRecord


def test_an_int_kind_says_its_range_and_accepts_ints_within_it_only() -> None:
    kind = control._ints(-1, 3)
    assert kind.what == "an int in [-1, 3]"
    assert [kind.accepts(v) for v in (-1, 0, 3)] == [True, True, True]
    assert [kind.accepts(v) for v in (-2, 4, 1.0, "1", None, True)] == [False] * 6
    assert kind.decode(2) == kind.encode(2) == 2


def test_a_one_of_kind_names_its_choices_and_accepts_those_strings_only() -> None:
    kind = control._one_of(("a", "b"))
    assert kind.what == "one of a, b"
    assert [kind.accepts(v) for v in ("a", "b")] == [True, True]
    assert [kind.accepts(v) for v in ("c", "", b"a", ["a"], None)] == [False] * 5


def test_a_limit_kind_accepts_what_limits_takes() -> None:
    kind = control._limit("max_topic")
    assert kind.what == "an int within the range of Limits.max_topic"
    assert [kind.accepts(v) for v in (1, 255, 0xFFFF)] == [True, True, True]
    assert [kind.accepts(v) for v in (0, -1, 0x10000, 255.0, "255", None)] == [False] * 6
    frame = control._limit("max_frame")
    assert [frame.accepts(v) for v in (HEADER_SIZE, HEADER_SIZE + 1, 2**32 - 1, 2**32)] == [False, True, True, False]


def test_a_wait_of_true_is_not_a_number_of_seconds() -> None:
    with pytest.raises(BadRequest) as info:
        control.parse_request({"op": "link", "peer": "127.0.0.1:9", "wait": True})
    assert str(info.value) == "link: wait must be a number of seconds >= 0, got True"
    assert control.parse_request({"op": "link", "peer": "p", "wait": 0}) == control.Link(peer="p", wait=0)


def test_counters_are_element_names_to_maps_of_known_counters_to_numbers() -> None:
    accepts = control.COUNTERS.accepts
    assert accepts({}) and accepts({"e": {}}) and accepts({"e": {"in": 1, "latency_ms": 2.5}})
    assert accepts({"e": {"busy": 0}}) and accepts({"e": {"busy": 1.0}})
    bads: list[Any] = [
        [], {"e": 5}, {1: {"in": 1}}, {"e": {"bogus": 1}}, {"e": {"in": "x"}}, {"e": {"in": float("nan")}},
        {"e": {"busy": 1.01}}, {"e": {"busy": -0.1}},
    ]
    for bad in bads:
        assert not accepts(bad), bad


def test_last_errors_are_element_names_to_strings_no_longer_than_the_limit() -> None:
    accepts = control.LAST_ERRORS.accepts
    assert accepts({}) and accepts({"p/e": ""}) and accepts({"p/e": "x" * control.ERROR_TEXT_LIMIT})
    bads: list[Any] = [[], "", {"p/e": "x" * (control.ERROR_TEXT_LIMIT + 1)}, {"p/e": 5}, {"p/e": b"x"}, {1: "x"}]
    for bad in bads:
        assert accepts(bad) is False, bad
    with pytest.raises(BadRequest, match="last_errors must be a map of element names to strings of at most"):
        control.parse_request({**control.Report(elements={}, published=0, unrouted=0, lost=0, dropped=0, pending=0).to_body(),
                               "last_errors": {"p/e": "x" * (control.ERROR_TEXT_LIMIT + 1)}})


def test_assignments_are_element_names_to_lists_of_agent_names() -> None:
    accepts = control.ASSIGNMENTS.accepts
    assert accepts({}) and accepts({"e": []}) and accepts({"e": ["a", "b"]})
    bads: list[Any] = [[], "", {"e": 5}, {1: ["a"]}, {"e": [1]}, {"e": ["a", None]}]
    for bad in bads:
        assert accepts(bad) is False, bad


def test_a_field_is_required_unless_it_has_a_default_and_keeps_its_code() -> None:
    ProbeRecord = probe_record()
    assert ProbeRecord.from_body({"n": 1}) == ProbeRecord(n=1, s="d")
    assert ProbeRecord.from_body({"n": 1, "s": "x"}).to_body() == {"n": 1, "s": "x"}
    with pytest.raises(BadRequest) as info:
        ProbeRecord.from_body({"s": "x"})
    assert (str(info.value), info.value.field, info.value.code) == ("n is required", "n", "bad_request")
    with pytest.raises(BadRequest) as info:
        ProbeRecord.from_body({"n": 1, "s": 5})
    assert (str(info.value), info.value.field, info.value.code) == ("s must be a string, got 5", "s", "bad_s")
    [n, s] = dataclasses.fields(ProbeRecord)
    assert (n.default, dict(n.metadata)) == (dataclasses.MISSING, {"kind": control.UINT, "code": None})
    assert (s.default, dict(s.metadata)) == ("d", {"kind": control.STR, "code": "bad_s"})


def test_a_request_type_knows_the_type_of_its_reply() -> None:
    @dataclasses.dataclass(frozen=True, kw_only=True)
    class ProbeRequest(control.Request[ProbeReply]):
        op: ClassVar[str] = "probe"

    class ProbeAgain(ProbeRequest):  # not generic itself: its base's reply
        pass

    assert ProbeRequest.reply is ProbeReply and ProbeAgain.reply is ProbeReply
    assert control.Unsubscribe.reply is control.Ok and control.Hello.reply is control.Welcome


def test_a_record_list_decodes_each_record_and_says_which_one_is_bad() -> None:
    ProbeRecord = probe_record()
    kind = control._records(ProbeRecord)
    assert kind.what == "a list of maps (ProbeRecord)"
    assert kind.accepts([]) and kind.accepts([{}, {"n": 1}])
    values: list[Any] = [{}, [1], [{}, "x"], None]
    assert [kind.accepts(v) for v in values] == [False] * 4
    assert kind.decode([{"n": 1}, {"n": 2, "s": "e"}]) == [ProbeRecord(n=1), ProbeRecord(n=2, s="e")]
    assert kind.encode([ProbeRecord(n=1), ProbeRecord(n=2, s="e")]) == [{"n": 1, "s": "d"}, {"n": 2, "s": "e"}]
    with pytest.raises(BadRequest) as info:
        kind.decode([{"n": 1}, {"n": 2, "s": 5}])
    error = info.value
    assert (error.op, error.field, error.reason, error.code) == ("", "[1].s", "[1].s must be a string, got 5", "bad_s")
    assert str(error) == "[1].s must be a string, got 5" and error.__cause__ is None and error.__suppress_context__

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class ProbeList(control.Message):
        op: ClassVar[str] = "probe_list"
        items: list[Any] = control._field(kind)

    with pytest.raises(BadRequest) as info:
        ProbeList.from_body({"op": "probe_list", "items": [{"n": 1, "s": 5}]})
    error = info.value
    assert (str(error), error.op, error.field, error.code) == (
        "probe_list: items[0].s must be a string, got 5", "probe_list", "items[0].s", "bad_s"
    )


def test_a_message_of_another_op_is_refused_naming_both() -> None:
    with pytest.raises(BadRequest) as info:
        control.Ping.from_body({"op": "pong", "id": 1})
    assert (str(info.value), info.value.op, info.value.field, info.value.code) == (
        "ping: expected op 'ping', got 'pong'", "ping", "op", "bad_request"
    )
    with pytest.raises(BadRequest, match="^ping: expected op 'ping', got None$"):
        control.Ping.from_body({})


def test_a_required_field_with_its_own_code_keeps_it_when_missing() -> None:
    for body, text, code in [
        ({"op": "subscribe"}, "subscribe: topic is required", "bad_topic"),
        ({"op": "policy"}, "policy: slow_consumer is required", "bad_policy"),
    ]:
        with pytest.raises(BadRequest) as info:
            control.parse_request(body)
        assert (str(info.value), info.value.code) == (text, code)


def test_a_quoted_value_is_cut_to_60_characters() -> None:
    assert control._short("a" * 58) == repr("a" * 58)  # 60 characters: kept
    assert control._short("a" * 59) == repr("a" * 59)[:57] + "..."
    assert len(control._short("a" * 59)) == 60 and control._short(5) == "5"
    with pytest.raises(BadRequest) as info:
        control.parse_request({"op": "ping", "id": -1})
    assert str(info.value) == "ping: id must be an int in [0, 18446744073709551615], got -1"


def test_a_record_body_has_no_op() -> None:
    assert control.PortReport(port=1, name="a").to_body() == {"port": 1, "name": "a"}
    assert control.Ping(id=3).to_body() == {"op": "ping", "id": 3}


@pytest.mark.parametrize("op, text", [("launch", "launch: unknown control op 'launch'"), (5, "5: unknown control op 5")])
def test_an_unknown_op_is_named(op: object, text: str) -> None:
    for parse in (control.parse_request, control.parse_answer):
        with pytest.raises(BadRequest) as info:
            parse({"op": op})
        assert (str(info.value), info.value.op, info.value.field, info.value.code) == (text, str(op), "op", "unknown_op")


def test_a_request_id_is_a_uint_or_none() -> None:
    assert control.request_id({"op": "ping", "id": 5}) == 5
    assert control.request_id({"id": 0}) == 0 and control.request_id({"id": 2**64 - 1}) == 2**64 - 1
    for body in ({}, {"id": -1}, {"id": 2**64}, {"id": "5"}, {"ID": 5}, {"re": 5}):
        assert control.request_id(body) is None, body


def test_a_permission_table_must_have_a_cell_per_role_and_known_codes_only() -> None:
    every_code = ("", *control._REASONS)
    roles = ("", *(f"r{i}" for i in range(len(every_code) - 1)))
    table = control.Permissions("x", roles, {"ping": every_code})  # every code used: accepted
    assert table.code("r0", "ping") == "already_attached"
    with pytest.raises(AssertionError, match="^x$"):
        control.Permissions("x", ("", "a"), {"ping": ("",)})
    with pytest.raises(AssertionError, match="^x$"):
        control.Permissions("x", ("a", ""), {"ping": ("", "")})
    with pytest.raises(AssertionError, match="^x$"):
        control.Permissions("x", ("", "a"), {"ping": ("", "nope")})


def test_a_refusal_says_the_op_the_role_and_the_daemon() -> None:
    assert control.BROKER.refusal("agent", "launch") == control.Refusal(
        "unknown_op", "unknown control op 'launch' for an agent connection to this broker", False
    )
    assert control.ORCHESTRATOR.refusal("", "token") == control.Refusal("hello_first", "send hello before token", False)
    assert control.BROKER.requiring_token().refusal("", "ping") == control.Refusal(
        "token_missing", "'ping' before hello: this broker admits only connections with a token", True
    )
    assert control.BROKER.refusal("peer", "subscribe") == control.Refusal(
        "not_attached", "subscribe needs an agent attached by its hello, not a peer link", False
    )
    assert control.BROKER.refusal("agent", "ping") is None


def test_a_hello_with_a_role_the_daemon_does_not_have_is_refused_naming_the_role() -> None:
    with pytest.raises(BadRequest) as info:
        control.BROKER.check_role(control.Hello(role="broker"))
    assert (str(info.value), info.value.op, info.value.field) == (
        "hello: role must be one of agent, admin, peer, got 'broker'", "hello", "role"
    )
    control.ORCHESTRATOR.check_role(control.Hello(role="broker"))
