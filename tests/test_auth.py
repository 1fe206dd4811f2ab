"""Agent tokens and TLS: ``dcp.auth``, ``--require-token`` on brokers and the orchestrator, TLS on every hop.

Brokers and orchestrators are real servers on OS-chosen loopback ports, in this
process (so tests read their state) or, for the ``dcp`` command, in their own.
Certificates come from a throwaway CA that the ``openssl`` command makes for this
session.  A refused peer is checked twice: it gets the error code, and traffic that
crosses the broker afterwards shows that nothing of its got through.
"""

from __future__ import annotations

import ast
import asyncio
import base64
import hashlib
import hmac
import json
import os
import re
import secrets
import socket
import ssl
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

import dcp
import dcp.auth
from dcp.auth import MAX_TOKEN_TTL_S, TOKEN_ROLES, Claims, RouteSigner, admit, expiry, issue_token, load_secret, verify_token
from dcp.broker import Broker
from dcp.cli import main
from dcp.config import BrokerConfig, OrchestratorConfig
from dcp.errors import AuthError, ConfigError, ConnectionClosed, RemoteError
from dcp.orchestrator import Orchestrator
from dcp.routing import allocate_keys, encode, int_to_bytes
from dcp.wire import ControlFrame, Decoder, encode_control, encode_data
from tests.conftest import url_of
from tests.test_pipelines import start_orchestrator_process
from tests.throwaway_ca import Certs, make_certs
from tests.waiting import until

NOW = 1_700_000_000
PORTS = 8
STRANGER = b"a secret nobody here shares, 32b"


@pytest.fixture(scope="session")
def secret_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("secret") / "dcp.secret"
    path.write_text(secrets.token_hex(32) + "\n")
    path.chmod(0o600)  # load_secret refuses a secret others may read
    return path


@pytest.fixture(scope="session")
def secret(secret_file: Path) -> bytes:
    return load_secret(secret_file)


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("tls"))


def token(secret: bytes, name: str, role: str = "agent", ttl_s: float = 60) -> str:
    return issue_token(secret, name, role, int(time.time() + ttl_s))


def code_of(call: Callable[[], Any]) -> str:
    with pytest.raises(AuthError) as info:
        call()
    return info.value.code


def addr_of(server: Broker | Orchestrator) -> str:
    return "%s:%d" % server.address


def tls_of(transport: Any) -> bool:
    return transport.get_extra_info("ssl_object") is not None


# -- dcp.auth -------------------------------------------------------------------------


def test_a_token_round_trips_to_its_claims(secret: bytes) -> None:
    issued = issue_token(secret, "camera", "agent", NOW + 60)
    assert verify_token(secret, issued, NOW) == Claims("camera", "agent", NOW + 60)
    assert verify_token(secret, issued, NOW + 59.9).name == "camera"


def test_a_token_from_another_secret_is_forged(secret: bytes) -> None:
    assert code_of(lambda: verify_token(secret, issue_token(STRANGER, "camera", "agent", NOW + 60), NOW)) == "token_forged"


@pytest.mark.parametrize("change", [{"role": "admin"}, {"name": "spy"}, {"exp": NOW + 10**6}])
def test_altered_claims_are_forged(secret: bytes, change: dict[str, Any]) -> None:
    prefix, body, *macs = issue_token(secret, "camera", "agent", NOW + 60).split(".")
    claims = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    altered = json.dumps({**claims, **change}, separators=(",", ":"), sort_keys=True).encode()
    forged = ".".join((prefix, base64.urlsafe_b64encode(altered).rstrip(b"=").decode(), *macs))
    assert code_of(lambda: verify_token(secret, forged, NOW)) == "token_forged"
    assert code_of(lambda: verify_token(dcp.auth.broker_secret(secret), forged, NOW)) == "token_forged"


def test_an_expired_token_is_refused(secret: bytes) -> None:
    issued = issue_token(secret, "camera", "agent", NOW)
    assert verify_token(secret, issued, NOW - 1).expires == NOW
    assert code_of(lambda: verify_token(secret, issued, NOW)) == "token_expired"
    assert code_of(lambda: verify_token(secret, issued, NOW + 3600)) == "token_expired"


@pytest.mark.parametrize(
    "bad, code",
    [(None, "token_missing"), ("", "token_missing"), (42, "token_malformed"), ("dcp1.two-parts", "token_malformed"),
     ("dcp1.a.b", "token_malformed"), ("dcp9.e30.AAAA", "token_malformed")],
)
def test_missing_and_malformed_tokens(secret: bytes, bad: object, code: str) -> None:
    assert code_of(lambda: verify_token(secret, bad, NOW)) == code


def test_a_hello_is_admitted_by_a_token_of_its_role_and_name(secret: bytes) -> None:
    agent, admin = token(secret, "cam"), token(secret, "ops", "admin")
    broker = issue_token(secret, "b0", "broker", int(time.time() + 60), ["10.0.0.2:7400"])
    now = time.time()
    assert admit(secret, {"role": "agent", "name": "cam", "token": agent}, now).name == "cam"
    assert admit(secret, {"role": "agent", "token": agent}, now).name == "cam"  # no name: the token's
    assert admit(secret, {"role": "admin", "name": "dcp-cli", "token": admin}, now).role == "admin"  # admins' names are free
    assert admit(secret, {"role": "peer", "name": "b0", "token": broker}, now, {"10.0.0.2:7400"}).role == "broker"
    assert admit(secret, {"role": "broker", "name": "b0", "token": broker}, now, {"b1", "10.0.0.2:7400"}).role == "broker"
    assert code_of(lambda: admit(secret, {"role": "admin", "token": agent}, now)) == "token_role"
    assert code_of(lambda: admit(secret, {"role": "agent", "token": admin}, now)) == "token_role"
    assert code_of(lambda: admit(secret, {"role": "peer", "name": "cam", "token": agent}, now)) == "token_role"
    assert code_of(lambda: admit(secret, {"role": "agent", "name": "spy", "token": agent}, now)) == "token_name"
    assert code_of(lambda: admit(secret, {"role": "broker", "name": "b1", "token": broker}, now, {"10.0.0.2:7400"})) == "token_name"


def test_a_broker_token_is_admitted_only_by_its_audience(secret: bytes) -> None:
    """A broker's own token names whom it is for; another server refuses it (token_audience),
    and so does any server when it names nobody.  Agent and admin tokens name no audience."""
    now = time.time()
    expires = int(now + 60)
    for_b1 = issue_token(secret, "b0", "broker", expires, ["b1.example:7400", "10.0.0.2:7400"])
    assert verify_token(secret, for_b1, now).audience == ("b1.example:7400", "10.0.0.2:7400")
    hello = {"role": "peer", "name": "b0", "token": for_b1}
    assert admit(secret, hello, now, {"10.0.0.2:7400", "b1"}).name == "b0"
    assert admit(secret, hello, now, {"b1.example:7400"}).name == "b0"
    for elsewhere in ({"10.0.0.3:7400"}, {"orchestrator"}, set()):
        with pytest.raises(AuthError) as info:
            admit(secret, hello, now, elsewhere)
        assert (info.value.code, str(info.value)) == (
            "token_audience", "the broker token is for b1.example:7400, 10.0.0.2:7400, not for this server",
        )
    for_do = issue_token(secret, "b0", "broker", expires, ["orchestrator"])
    assert admit(secret, {"role": "broker", "name": "b0", "token": for_do}, now, {"orchestrator"}).role == "broker"
    assert code_of(lambda: admit(secret, {"role": "peer", "name": "b0", "token": for_do}, now, {"10.0.0.2:7400"})) == "token_audience"
    unbound = issue_token(secret, "b0", "broker", expires)  # as brokers issued them before
    assert verify_token(secret, unbound, now).audience == ()
    with pytest.raises(AuthError, match="names no audience") as info:
        admit(secret, {"role": "peer", "name": "b0", "token": unbound}, now, {"10.0.0.2:7400"})
    assert info.value.code == "token_audience"
    assert "token_audience" in dcp.auth.REFUSALS
    agent = token(secret, "cam")
    assert admit(secret, {"role": "agent", "name": "cam", "token": agent}, now, set()).audience == ()


@pytest.mark.parametrize("aud", ["b1:7400", [1], {"host": "b1"}, [["b1"]]])
def test_an_audience_that_is_not_a_list_of_names_is_malformed(secret: bytes, aud: object) -> None:
    body = json.dumps({"aud": aud, "exp": NOW + 60, "name": "b0", "role": "broker"}, separators=(",", ":"), sort_keys=True).encode()
    brokers = b"dcp-broker-secret:" + hmac.new(secret, b"dcp broker secret", hashlib.sha256).hexdigest().encode()
    mac = hmac.new(hmac.new(brokers, b"dcp token", hashlib.sha256).digest(), body, hashlib.sha256).digest()
    forged_free = "dcp1.%s.%s" % (base64.urlsafe_b64encode(body).rstrip(b"=").decode(), base64.urlsafe_b64encode(mac).rstrip(b"=").decode())
    assert code_of(lambda: verify_token(secret, forged_free, NOW)) == "token_malformed"


def test_an_endpoint_is_spelt_alike_at_both_ends() -> None:
    assert dcp.auth.endpoint("10.0.0.2", 7400) == "10.0.0.2:7400"
    assert dcp.auth.endpoint("::ffff:10.0.0.2", 7400) == "10.0.0.2:7400"  # a dual-stack socket's view of IPv4
    assert dcp.auth.endpoint("::1", 7400) == "[::1]:7400"
    assert dcp.auth.endpoint("0:0::1", 7400) == "[::1]:7400"
    assert dcp.auth.endpoint("b1.example", 7400) == "b1.example:7400"


def test_a_short_secret_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "short.secret"
    path.write_text("too short\n")
    with pytest.raises(ConfigError, match="at least 16"):
        load_secret(path)


@pytest.mark.parametrize("config_class", [BrokerConfig, OrchestratorConfig])
def test_config_checks_the_token_and_tls_settings(config_class: Any, secret_file: Path) -> None:
    with pytest.raises(ConfigError, match="require_token needs secret_file"):
        config_class(require_token=True)
    with pytest.raises(ConfigError, match="tls_cert and tls_key go together"):
        config_class(tls_cert="server.pem")
    assert config_class(require_token=True, secret_file=str(secret_file)).require_token


def test_unreadable_tls_files_are_config_errors(tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.pem")
    with pytest.raises(ConfigError, match="cannot load the TLS certificate"):
        Broker(BrokerConfig(tls_cert=missing, tls_key=missing, insecure=True))
    with pytest.raises(ConfigError, match="cannot load the TLS CA file"):
        Broker(BrokerConfig(tls_ca=missing, insecure=True))
    with pytest.raises(ConfigError, match="cannot load the TLS CA file"):
        dcp.Connection("dcps://127.0.0.1:1", tls_ca=missing)


# -- a broker with --require-token ------------------------------------------------------


@pytest.fixture
async def guarded(make_broker, secret_file: Path) -> Broker:  # type: ignore[no-untyped-def]
    return await make_broker(secret_file=str(secret_file), require_token=True, ports=PORTS)


@pytest.mark.parametrize(
    "kind, code",
    [("none", "token_missing"), ("forged", "token_forged"), ("expired", "token_expired"), ("admin", "token_role"),
     ("another agent's", "token_name")],
)
async def test_a_publisher_without_a_valid_token_is_refused_and_forwards_nothing(guarded: Broker, secret: bytes, kind: str, code: str) -> None:
    bad = {
        "none": None,
        "forged": token(STRANGER, "pub"),
        "expired": token(secret, "pub", ttl_s=-1),
        "admin": token(secret, "pub", "admin"),
        "another agent's": token(secret, "sub"),
    }[kind]
    url = url_of(guarded)
    async with dcp.connect(url, name="sub", token=token(secret, "sub")) as sub, \
            dcp.connect(url, name="pub", token=token(secret, "pub")) as pub:
        route = encode({guarded.key: 1 << sub.port})
        reader, writer = await asyncio.open_connection(*guarded.address)
        hello: dict[str, Any] = {"op": "hello", "id": 1, "name": "pub", "role": "agent"}
        if bad is not None:
            hello["token"] = bad
        writer.write(encode_control(hello) + encode_data("video", b"sneaked in", route))  # one read for the broker
        events = Decoder().feed(await asyncio.wait_for(reader.read(), 10))  # to the broker's close
        writer.close()
        assert [type(e) for e in events] == [ControlFrame]
        error = events[0].body
        assert (error["op"], error["code"], error["re"], error["fatal"]) == ("error", code, 1, True)
        assert guarded.attached == 1 << sub.port | 1 << pub.port

        await pub.publish("video", b"genuine", route=route)
        msg = await sub.next_message(timeout=10)  # the refused frame, had it passed, would be first
        assert (msg.payload, sub.pending) == (b"genuine", 0)


async def test_open_with_retry_raises_a_refusal_at_once(guarded: Broker) -> None:
    conn = dcp.Connection(url_of(guarded), name="pub", reconnect=dcp.Backoff(initial_s=0.01, max_s=0.01))
    with pytest.raises(RemoteError) as info:
        await asyncio.wait_for(conn.open(retry=True), 10)  # a retried refusal would time out here
    assert info.value.code == "token_missing" and guarded.attached == 0
    await conn.close()


async def test_a_token_refused_at_a_reconnect_closes_the_connection_for_good(guarded: Broker, secret: bytes) -> None:
    good = {"now": True}
    conn = dcp.Connection(
        url_of(guarded), name="pub", reconnect=dcp.Backoff(initial_s=0.01, max_s=0.05),
        token=lambda: token(secret, "pub") if good["now"] else token(STRANGER, "pub"),
    )
    await conn.open()
    good["now"] = False
    (attached,) = guarded._connections
    attached.abort()
    await until(lambda: conn.status is not dcp.Status.OPEN, "the client to see its connection cut")
    with pytest.raises(ConnectionClosed) as info:
        await conn.wait_connected(timeout=10)  # endless redials would time out here
    assert isinstance(info.value.__cause__, RemoteError) and info.value.__cause__.code == "token_forged"
    assert conn.status is dcp.Status.CLOSED


async def test_admins_need_an_admin_token_even_for_stats(guarded: Broker, secret: bytes) -> None:
    async with dcp.connect(url_of(guarded), role="admin", token=token(secret, "ops", "admin"), reconnect=False) as admin:
        assert (await admin.stats())["ports"] == PORTS
    for bad, code in ((None, "token_missing"), (token(secret, "ops"), "token_role")):
        with pytest.raises(RemoteError) as info:
            await dcp.connect(url_of(guarded), role="admin", token=bad, reconnect=False)
        assert info.value.code == code
    reader, writer = await asyncio.open_connection(*guarded.address)
    writer.write(encode_control({"op": "stats", "id": 7}))  # no hello at all
    (event,) = Decoder().feed(await asyncio.wait_for(reader.read(), 10))
    writer.close()
    assert isinstance(event, ControlFrame)
    assert (event.body["code"], event.body["re"], event.body["fatal"]) == ("token_missing", 7, True)


async def test_an_agent_refused_by_its_brokers_stops_with_the_code(guarded: Broker, secret: bytes) -> None:
    agent = dcp.DataAgent(
        "cam", broker=[url_of(guarded), url_of(guarded)], orchestrator="dcp://127.0.0.1:1",
        token=token(secret, "cam", ttl_s=-1),
    )
    with pytest.raises(RemoteError) as info:
        await agent.start(timeout=10)  # trying broker after broker would time out here
    assert info.value.code == "token_expired" and agent.failure is info.value


async def test_an_agent_refused_at_a_reconnect_stops_and_run_says_why(guarded: Broker, secret: bytes, tmp_path: Path) -> None:
    do = Orchestrator(OrchestratorConfig(listen="127.0.0.1:0", db=str(tmp_path / "do.db"), insecure=True))
    await do.start()
    good = {"now": True}
    agent = dcp.DataAgent(
        "cam", broker=url_of(guarded), orchestrator=f"dcp://{addr_of(do)}",
        token=lambda: token(secret, "cam") if good["now"] else token(STRANGER, "cam"),
    )
    running = asyncio.ensure_future(agent.run())
    try:
        await until(lambda: "cam" in do.agents and do.agents["cam"].conn is not None, "cam registered")
        good["now"] = False
        (attached,) = guarded._connections
        attached.abort()
        with pytest.raises(RemoteError) as info:
            await asyncio.wait_for(running, 10)
        assert info.value.code == "token_forged" and guarded.attached == 0
    finally:
        running.cancel()
        await agent.stop()
        await do.close()


async def test_linked_brokers_requiring_tokens_link_and_forward(make_broker, secret_file: Path, secret: bytes, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    key_a, key_b, key_c = allocate_keys(3, PORTS)
    guarded = {"secret_file": str(secret_file), "require_token": True, "ports": PORTS}
    a = await make_broker(key=key_a, name="alpha", **guarded)
    b = await make_broker(key=key_b, name="beta", peers=(addr_of(a),), **guarded)  # a configured peer: it gets b's token
    (link,) = b.links.values()
    await link.wait_up(5)
    (back,) = a.links.values()
    async with dcp.connect(url_of(a), name="pub", token=token(secret, "pub")) as pub, \
            dcp.connect(url_of(b), name="sub", token=token(secret, "sub")) as sub:
        await pub.publish("across", b"linked", route=encode({key_a: 1 << back.port, key_b: 1 << sub.port}))
        msg = await sub.next_message(timeout=10)
        assert (msg.topic, msg.payload) == ("across", b"linked")

    other = tmp_path / "other.secret"
    other.write_text(secrets.token_hex(32))
    other.chmod(0o600)
    stranger = await make_broker(key=key_c, name="stranger", secret_file=str(other), ports=PORTS, peers=(addr_of(a),))
    (refused,) = stranger.links.values()
    await until(lambda: "token_forged" in refused.last_error, lambda: f"a refusal for the token, not {refused.last_error!r}")
    assert refused.state == "refused" and list(a.links.values()) == [back]  # another secret: it cannot heal


# -- the orchestrator with --require-token ---------------------------------------------------


@pytest.fixture
async def guarded_do(tmp_path: Path, secret_file: Path) -> AsyncIterator[Orchestrator]:
    do = Orchestrator(OrchestratorConfig(
        listen="127.0.0.1:0", db=str(tmp_path / "guarded.db"), secret_file=str(secret_file), require_token=True,
    ))
    await do.start()
    yield do
    await do.close()


async def test_the_orchestrator_refuses_agents_without_a_token_and_issues_tokens(  # type: ignore[no-untyped-def]
    guarded_do: Orchestrator, make_broker, secret_file: Path, secret: bytes
) -> None:
    broker = await make_broker(name="b0", secret_file=str(secret_file), orchestrator=addr_of(guarded_do))
    await until(lambda: "b0" in guarded_do.brokers and guarded_do.brokers["b0"].conn is not None, "b0 registered with its own token")
    do_url = f"dcp://{addr_of(guarded_do)}"
    with pytest.raises(RemoteError) as info:
        await dcp.DataAgent("cam", broker=url_of(broker), orchestrator=do_url).start(timeout=10)
    assert info.value.code == "token_missing" and "cam" not in guarded_do.agents

    async with dcp.connect(do_url, role="admin", token=token(secret, "ops", "admin"), reconnect=False) as admin:
        issued = await admin.request({"op": "token", "name": "cam", "role": "agent", "ttl_s": 60})
        with pytest.raises(RemoteError, match="role must be one of agent, admin"):
            await admin.request({"op": "token", "name": "cam", "role": "broker", "ttl_s": 60})
        for ttl in (0, -5, 2**63, "60", True):
            with pytest.raises(RemoteError, match="ttl_s must be a positive number"):
                await admin.request({"op": "token", "name": "cam", "ttl_s": ttl})
    claims = verify_token(secret, issued["token"], time.time())
    assert (claims.name, claims.role, claims.expires) == ("cam", "agent", issued["expires"])
    assert claims.expires <= time.time() + 60

    async with dcp.connect(do_url, role="agent", name="cam", token=issued["token"], reconnect=False) as agent_conn:
        with pytest.raises(RemoteError, match="token needs an admin connection"):
            await agent_conn.request({"op": "token", "name": "cam2"})
    agent = dcp.DataAgent("cam", broker=url_of(broker), orchestrator=do_url, token=issued["token"])
    await agent.start(timeout=10)
    try:
        assert guarded_do.agents["cam"].conn is not None
    finally:
        await agent.stop()
    with pytest.raises(RemoteError) as info:
        await dcp.DataAgent("spy", broker=url_of(broker), orchestrator=do_url, token=issued["token"]).start(timeout=10)
    assert info.value.code == "token_name" and "spy" not in guarded_do.agents


@pytest.fixture(scope="session")
def broker_secret_file(tmp_path_factory: pytest.TempPathFactory, secret_file: Path) -> Path:
    """The brokers' secret derived from ``secret_file``, written by ``dcp secret --broker``."""
    path = tmp_path_factory.mktemp("broker-secret") / "broker.secret"
    assert main(["secret", "--broker", "--secret-file", str(secret_file), "--out", str(path)]) == 0
    return path


async def test_brokers_with_the_brokers_secret_check_the_orchestrators_tokens_and_tags(  # type: ignore[no-untyped-def]
    guarded_do: Orchestrator, make_broker, broker_secret_file: Path, secret: bytes
) -> None:
    """A broker holding only the derived secret registers with a --require-token
    orchestrator (its own broker token), admits an agent by the token the orchestrator
    issued, and verifies the route tags the orchestrator signs: frames flow."""
    common = dict(secret_file=str(broker_secret_file), require_token=True, verify_routes=True, orchestrator=addr_of(guarded_do))
    b0 = await make_broker(name="b0", **common)
    b1 = await make_broker(name="b1", peers=(f"127.0.0.1:{b0.address[1]}",), **common)
    await until(lambda: {"b0", "b1"} <= {n for n, b in guarded_do.brokers.items() if b.conn is not None}, "both registered")
    do_url = f"dcp://{addr_of(guarded_do)}"
    cam = dcp.DataAgent("cam", broker=url_of(b0), orchestrator=do_url, token=token(secret, "cam"))
    viewer = dcp.DataAgent("viewer", broker=url_of(b1), orchestrator=do_url, token=token(secret, "viewer"))
    got: list[bytes] = []

    @viewer.consume("video")
    async def take(msg: dcp.Message) -> None:
        got.append(bytes(msg.payload))

    await cam.declare_produces("video")
    await viewer.start(timeout=10)
    await cam.start(timeout=10)
    try:
        await cam.wait_route("video")
        assert await cam.publish("video", b"frame")
        await until(lambda: got == [b"frame"], "the frame across both brokers, its tag verified at b0")
        assert b0.drops["route_forged"] == b0.drops["route_unsigned"] == 0
    finally:
        await cam.stop()
        await viewer.stop()


async def test_tokens_made_with_the_brokers_secret_admit_only_brokers_at_the_orchestrator(  # type: ignore[no-untyped-def]
    guarded_do: Orchestrator, make_broker, broker_secret_file: Path, secret: bytes
) -> None:
    """What a broker could make with its secret: an admin or agent token in the broker
    form (one MAC) is refused by the orchestrator as forged; a broker token for the
    orchestrator's audience is admitted (brokers register)."""
    brokers = load_secret(broker_secret_file)
    with pytest.raises(ConfigError, match="issues broker tokens only"):
        issue_token(brokers, "ops", "admin", int(time.time()) + 60)
    made = {}
    for role, name in (("admin", "ops"), ("agent", "cam")):
        body = json.dumps({"exp": int(time.time()) + 60, "name": name, "role": role}, separators=(",", ":"), sort_keys=True).encode()
        key = hmac.new(brokers, b"dcp token", hashlib.sha256).digest()
        made[role] = f"dcp1.{_b64url(body)}.{_b64url(hmac.new(key, body, hashlib.sha256).digest())}"
        assert verify_token(brokers, made[role], time.time()).role == role  # a broker cannot tell it from the orchestrator's
        with pytest.raises(AuthError, match="not issued by the orchestrator") as info:
            verify_token(secret, made[role], time.time())
        assert info.value.code == "token_forged"
        with pytest.raises(AuthError) as info:  # a second MAC that is not the orchestrator's
            verify_token(secret, made[role] + "." + _b64url(b"\0" * 32), time.time())
        assert info.value.code == "token_forged"
    do_url = f"dcp://{addr_of(guarded_do)}"
    for role, name in (("admin", "ops"), ("agent", "cam")):
        with pytest.raises(RemoteError) as refused:
            async with dcp.connect(do_url, role=role, name=name, token=made[role], reconnect=False):
                pass
        assert refused.value.code == "token_forged"
    broker_token = issue_token(brokers, "b9", "broker", int(time.time()) + 60, [dcp.auth.ORCHESTRATOR_AUDIENCE])
    async with dcp.connect(do_url, role="broker", name="b9", token=broker_token, reconnect=False):
        pass
    assert "ops" not in guarded_do.agents and "cam" not in guarded_do.agents


def test_an_orchestrator_refuses_the_brokers_secret(tmp_path: Path, broker_secret_file: Path) -> None:
    with pytest.raises(ConfigError, match="holds the brokers' secret"):
        Orchestrator(OrchestratorConfig(listen="127.0.0.1:0", db=str(tmp_path / "do.db"), secret_file=str(broker_secret_file)))


def test_dcp_secret_writes_new_files_of_mode_600_only(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "do.secret"
    assert main(["secret", "--out", str(out)]) == 0
    assert out.stat().st_mode & 0o777 == 0o600 and len(load_secret(out)) == 64
    assert not dcp.auth.is_broker_secret(load_secret(out))
    assert main(["secret", "--out", str(out)]) == 1  # never overwritten
    assert "File exists" in capsys.readouterr().err
    assert main(["secret"]) == 0 and len(capsys.readouterr().out.strip()) == 64
    assert main(["secret", "--broker", "--secret-file", str(out)]) == 0
    derived = capsys.readouterr().out.strip().encode()
    assert derived == dcp.auth.broker_secret(load_secret(out)) and dcp.auth.is_broker_secret(derived)
    assert main(["secret", "--broker"]) == 2 and main(["secret", "--secret-file", str(out)]) == 2
    assert main(["token", "ops", "--role", "admin", "--secret-file", str(out)]) == 0
    capsys.readouterr()
    broker_file = tmp_path / "broker.secret"
    assert main(["secret", "--broker", "--secret-file", str(out), "--out", str(broker_file)]) == 0
    assert main(["token", "ops", "--role", "admin", "--secret-file", str(broker_file)]) == 1
    assert "issues broker tokens only" in capsys.readouterr().err


class Trap:
    """A listener that a broker is pointed at: it keeps the hello of every connection, and answers nothing."""

    def __init__(self) -> None:
        self.hellos: list[dict[str, Any]] = []
        self.server: asyncio.Server | None = None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return "127.0.0.1:%d" % self.server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        decoder = Decoder()
        while data := await reader.read(65536):
            self.hellos += [event.body for event in decoder.feed(data) if isinstance(event, ControlFrame) and event.op == "hello"]
        writer.close()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()


async def test_a_broker_token_captured_by_what_a_broker_dialled_is_refused_elsewhere(  # type: ignore[no-untyped-def]
    guarded_do: Orchestrator, make_broker, secret_file: Path, secret: bytes, caplog
) -> None:
    """The probe of the review: a broker dials a listener, which keeps the token of its hello.
    The token names that listener as its audience, so neither the orchestrator nor another
    broker takes it; and a link to an address the broker was not configured with, without
    TLS, carries no token at all."""
    trap, elsewhere = Trap(), Trap()
    trap_address, elsewhere_address = await trap.start(), await elsewhere.start()
    try:
        key_a, key_b = allocate_keys(2, PORTS)
        victim = await make_broker(key=key_b, name="victim", secret_file=str(secret_file), require_token=True, ports=PORTS)
        alpha = await make_broker(
            key=key_a, name="alpha", secret_file=str(secret_file), ports=PORTS, peers=(trap_address,), orchestrator=addr_of(guarded_do),
        )
        await until(lambda: "alpha" in guarded_do.brokers and guarded_do.brokers["alpha"].conn is not None, "alpha registered")
        await until(lambda: trap.hellos, "alpha's hello at the trap")
        stolen = trap.hellos[0]["token"]
        claims = verify_token(secret, stolen, time.time())
        assert (claims.name, claims.role, claims.audience) == ("alpha", "broker", (trap_address,))  # dialled and reached: one address

        with pytest.raises(RemoteError) as info:  # at the orchestrator, as the broker it names
            await dcp.connect(f"dcp://{addr_of(guarded_do)}", role="broker", name="alpha", token=stolen, reconnect=False)
        assert info.value.code == "token_audience" and guarded_do.brokers["alpha"].conn is not None

        reader, writer = await asyncio.open_connection(*victim.address)  # at another broker, as a peer
        writer.write(encode_control({"op": "hello", "id": 1, "role": "peer", "name": "alpha", "key": int_to_bytes(key_a), "link": 0, "token": stolen}))
        (refusal,) = [event.body for event in Decoder().feed(await asyncio.wait_for(reader.read(), 10)) if isinstance(event, ControlFrame)]
        writer.close()
        assert (refusal["op"], refusal["code"], refusal["fatal"]) == ("error", "token_audience", True)
        assert victim.links == {} and victim.attached == 0

        # A link at run time to an address alpha was not configured with, without TLS: no token goes.
        caplog.set_level("WARNING", logger="dcp.link")
        alpha.add_link(elsewhere_address)
        await until(lambda: elsewhere.hellos, "alpha's hello at the other address")
        assert elsewhere.hellos[0].get("token") is None
        assert "dialling without this broker's token" in caplog.text
        # ... and a peer that needs a token refuses such a link.
        refused = alpha.add_link(addr_of(victim))
        await until(lambda: "token_missing" in refused.last_error, lambda: f"refused for want of a token, not {refused.last_error!r}")
        assert refused.state == "refused" and victim.links == {}

        # An admin whose token a broker checked may ask for a link: its token goes, for the address reached only.
        asked = Trap()
        asked_address = await asked.start()
        try:
            async with dcp.connect(url_of(victim), role="admin", token=token(secret, "ops", "admin"), reconnect=False) as admin:
                await admin.request({"op": "link", "peer": asked_address})
            await until(lambda: asked.hellos, "the victim's hello at the address its admin gave")
            assert verify_token(secret, asked.hellos[0]["token"], time.time()).audience == (asked_address,)
        finally:
            await asked.close()
    finally:
        await trap.close()
        await elsewhere.close()


async def test_a_verifying_broker_links_at_run_time_only_to_peers_it_can_vouch_for(make_broker, secret_file: Path) -> None:  # type: ignore[no-untyped-def]
    """What a link brings is forwarded unchecked at a broker that verifies routes, so it dials
    no peer that nothing vouches for (TLS, --peer, an admin with a token), and takes no peer
    without a broker token for itself, even where peers need none (--insecure)."""
    key_a, key_b = allocate_keys(2, PORTS)
    verifying = await make_broker(key=key_a, name="verifying", secret_file=str(secret_file), verify_routes=True, insecure=True, ports=PORTS)
    with pytest.raises(ConfigError, match="links only over TLS .*, to a configured --peer, or when an admin with a token asks"):
        verifying.add_link("127.0.0.1:9")
    async with dcp.connect(url_of(verifying), role="admin", reconnect=False) as admin:
        with pytest.raises(RemoteError) as info:
            await admin.request({"op": "link", "peer": "127.0.0.1:9"})
        assert info.value.code == "bad_link"
    reader, writer = await asyncio.open_connection(*verifying.address)
    writer.write(encode_control({"op": "hello", "id": 1, "role": "peer", "name": "fake", "key": int_to_bytes(key_b), "link": 0}))
    (refusal,) = [event.body for event in Decoder().feed(await asyncio.wait_for(reader.read(), 10)) if isinstance(event, ControlFrame)]
    writer.close()
    assert (refusal["code"], refusal["fatal"]) == ("token_missing", True) and "verifies routes" in refusal["message"]
    # A configured peer with the secret links, and frames cross it.
    other = await make_broker(key=key_b, name="other", secret_file=str(secret_file), insecure=True, ports=PORTS, peers=(addr_of(verifying),))
    (link,) = other.links.values()
    await link.wait_up(5)
    assert len(verifying.links) == 1


def _dcp(*args: str) -> subprocess.CompletedProcess[str]:
    env = {name: value for name, value in os.environ.items() if name != "DCP_TOKEN"}
    return subprocess.run([sys.executable, "-m", "dcp", *args], capture_output=True, text=True, timeout=60, env=env)


def test_dcp_token_asks_the_orchestrator_or_signs_offline(  # type: ignore[no-untyped-def]
    tmp_path: Path, secret_file: Path, secret: bytes, capsys
) -> None:
    assert main(["token", "ops", "--role", "admin", "--secret-file", str(secret_file), "--ttl-s", "60"]) == 0
    admin_token = capsys.readouterr().out.strip()
    assert verify_token(secret, admin_token, time.time())[:2] == ("ops", "admin")
    for ttl in ("0", "nan", "inf"):
        assert main(["token", "cam", "--ttl-s", ttl, "--secret-file", str(secret_file)]) == 2
    for bad_usage in (["token", "cam", "--orchestrator", "127.0.0.1:1", "--secret-file", str(secret_file)],
                      ["token", "cam", "--role", "broker"], ["token"]):
        with pytest.raises(SystemExit) as info:
            main(bad_usage)
        assert info.value.code == 2

    do = start_orchestrator_process(tmp_path / "do.db", extra=("--secret-file", str(secret_file), "--require-token"))
    try:
        refused = _dcp("token", "cam", "--orchestrator", do.address)
        assert refused.returncode == 1 and "token_missing" in refused.stderr, refused.stderr
        issued = _dcp("token", "cam", "--orchestrator", do.address, "--token", admin_token, "--ttl-s", "120")
        assert issued.returncode == 0, issued.stderr
        claims = verify_token(secret, issued.stdout.strip(), time.time())
        assert (claims.name, claims.role) == ("cam", "agent") and claims.expires <= time.time() + 120
    finally:
        code, log = do.stop()
    assert code == 0, log
    assert "token issued to cam (role agent)" in log


def test_dcp_stats_over_tls_with_an_admin_token(broker_process, certs: Certs, secret_file: Path, secret: bytes) -> None:  # type: ignore[no-untyped-def]
    broker = broker_process(
        "--tls-cert", str(certs.cert), "--tls-key", str(certs.key), "--secret-file", str(secret_file), "--require-token",
    )
    admin_token = token(secret, "ops", "admin")
    stats = _dcp("stats", broker.address, "--tls-ca", str(certs.ca), "--token", admin_token, "--json")
    assert stats.returncode == 0, stats.stderr
    assert json.loads(stats.stdout)["address"] == broker.address
    plain = _dcp("stats", broker.address, "--token", admin_token)
    assert plain.returncode == 1 and "(a TLS server? use dcps://)" in plain.stderr, plain.stderr
    no_token = _dcp("stats", broker.address, "--tls-ca", str(certs.ca))
    assert no_token.returncode == 1 and "token_missing" in no_token.stderr, no_token.stderr
    code, log = broker.stop()
    assert code == 0, log


# -- TLS ------------------------------------------------------------------------------------------


def assert_tls_transport(transport: Any, high: int) -> None:
    """TLS, with no Nagle delay and the write-buffer bound, as on plain TCP.

    ``no_delay`` reaches the socket through ``get_extra_info("socket")``, which a TLS
    transport must answer (uvloop sets TCP_NODELAY by itself too, so the option alone
    would not tell).
    """
    assert tls_of(transport)
    sock = transport.get_extra_info("socket")
    assert sock is not None and sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    assert transport.get_write_buffer_limits()[1] == high


async def test_clients_and_a_broker_over_tls(make_broker, certs: Certs) -> None:  # type: ignore[no-untyped-def]
    broker = await make_broker(tls_cert=str(certs.cert), tls_key=str(certs.key), out_buffer_bytes=64 * 1024)
    url = f"dcps://{addr_of(broker)}"
    context = ssl.create_default_context(cafile=str(certs.ca))
    async with dcp.connect(url, name="pub", tls_ca=str(certs.ca), write_buffer_bytes=32 * 1024) as pub, \
            dcp.connect(url, name="sub", ssl=context) as sub:
        route = encode({broker.key: 1 << sub.port})
        large = secrets.token_bytes(300_000)  # spans reads: forwarded as the reads that carry it
        for payload in (b"over tls", large, b"after"):
            await pub.publish("video", payload, route=route)
        got = [(await sub.next_message(timeout=10)).payload for _ in range(3)]
        assert got == [b"over tls", large, b"after"]
        for conn in broker._connections:
            assert_tls_transport(conn.transport, 64 * 1024)
        assert_tls_transport(pub._transport, 32 * 1024)


async def test_plaintext_and_tls_mismatches_fail_clearly(make_broker, certs: Certs, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    tls_broker = await make_broker(tls_cert=str(certs.cert), tls_key=str(certs.key))
    plain_broker = await make_broker()
    with pytest.raises(ConnectionClosed, match=r"before answering hello \(a TLS server\? use dcps://\)"):
        await asyncio.wait_for(dcp.connect(url_of(tls_broker), reconnect=False), 10)
    with pytest.raises(ConnectionClosed, match="not a TLS server"):
        await asyncio.wait_for(dcp.connect(f"dcps://{addr_of(plain_broker)}", tls_ca=str(certs.ca), reconnect=False), 10)
    other = make_certs(tmp_path)  # another CA, which did not sign the broker's certificate
    with pytest.raises(ConnectionClosed, match="certificate"):
        await asyncio.wait_for(dcp.connect(f"dcps://{addr_of(tls_broker)}", tls_ca=str(other.ca), reconnect=False), 10)
    with pytest.raises(ConfigError, match="use dcps://"):
        dcp.connect(url_of(tls_broker), tls_ca=str(certs.ca))
    assert tls_broker.attached == plain_broker.attached == 0


async def test_linked_brokers_over_tls_forward(make_broker, certs: Certs) -> None:  # type: ignore[no-untyped-def]
    key_a, key_b = allocate_keys(2, PORTS)
    tls = {"tls_cert": str(certs.cert), "tls_key": str(certs.key), "tls_ca": str(certs.ca), "ports": PORTS}
    a = await make_broker(key=key_a, name="alpha", **tls)
    b = await make_broker(key=key_b, name="beta", **tls)
    link = b.add_link(addr_of(a))
    await link.wait_up(5)
    (back,) = a.links.values()
    assert link.conn is not None and back.conn is not None
    assert tls_of(link.conn.transport) and tls_of(back.conn.transport)
    async with dcp.connect(f"dcps://{addr_of(a)}", name="pub", tls_ca=str(certs.ca)) as pub, \
            dcp.connect(f"dcps://{addr_of(b)}", name="sub", tls_ca=str(certs.ca)) as sub:
        await pub.publish("across", b"linked over tls", route=encode({key_a: 1 << back.port, key_b: 1 << sub.port}))
        msg = await sub.next_message(timeout=10)
        assert (msg.topic, msg.payload) == ("across", b"linked over tls")


async def test_an_agent_and_a_broker_talk_tls_to_a_tls_orchestrator(  # type: ignore[no-untyped-def]
    make_broker, certs: Certs, secret_file: Path, secret: bytes, tmp_path: Path
) -> None:
    do = Orchestrator(OrchestratorConfig(
        listen="127.0.0.1:0", db=str(tmp_path / "do.db"), tls_cert=str(certs.cert), tls_key=str(certs.key),
        secret_file=str(secret_file), require_token=True,
    ))
    await do.start()
    try:
        broker = await make_broker(
            name="b0", orchestrator=addr_of(do), tls_ca=str(certs.ca), tls_cert=str(certs.cert), tls_key=str(certs.key),
            secret_file=str(secret_file), require_token=True,
        )
        await until(lambda: "b0" in do.brokers and do.brokers["b0"].conn is not None, "b0 registered over TLS")
        assert tls_of(do.brokers["b0"].conn.transport)  # type: ignore[union-attr]
        agent = dcp.DataAgent(
            "cam", broker=f"dcps://{addr_of(broker)}", orchestrator=f"dcps://{addr_of(do)}", tls_ca=str(certs.ca),
            token=token(secret, "cam"),
        )
        await agent.start(timeout=10)
        try:
            record = do.agents["cam"]
            assert record.conn is not None and tls_of(record.conn.transport)
            assert agent.broker is not None and tls_of(agent.broker._transport)
        finally:
            await agent.stop()
        with pytest.raises(ConnectionClosed, match="a TLS server"):
            await asyncio.wait_for(dcp.connect(f"dcp://{addr_of(do)}", role="admin", reconnect=False), 10)
    finally:
        await do.close()


# -- constant-time MAC checks (a static check: `==` would pass every behavioural test) -------

_MAC_WORDS = ("mac", "tag", "digest")
_PLAIN_COMPARISONS = (ast.Eq, ast.NotEq, ast.In, ast.NotIn)


def _mac_valued(node: ast.AST) -> bool:
    """Whether an expression is a MAC, tag or digest, or made of one (a slice, a sum, a
    conversion, a method's result): not its length, nor a constant such as ``_MAC_SIZE``."""
    if isinstance(node, ast.Subscript):
        return _mac_valued(node.value)
    if isinstance(node, ast.BinOp):
        return _mac_valued(node.left) or _mac_valued(node.right)
    if isinstance(node, ast.Call):
        func = node.func
        name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
        if name in ("len", "compare_digest"):
            return False
        inner = [func.value] if isinstance(func, ast.Attribute) else []
        return _mac_name(name) or any(_mac_valued(arg) for arg in (*inner, *node.args))
    if isinstance(node, ast.Name):
        return _mac_name(node.id)
    if isinstance(node, ast.Attribute):
        return _mac_name(node.attr)
    return False


def _mac_name(name: str) -> bool:
    return not name.isupper() and any(word in name.lower() for word in _MAC_WORDS)


def _plain_mac_comparisons(source: str) -> list[str]:
    """Each ``==``, ``!=``, ``in`` or ``not in`` with a MAC-valued operand, as ``line: code``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare) and any(isinstance(op, _PLAIN_COMPARISONS) for op in node.ops):
            if any(_mac_valued(operand) for operand in (node.left, *node.comparators)):
                found.append(f"{node.lineno}: {ast.get_source_segment(source, node)}")
    return found


def _compare_digest_callers(source: str) -> set[str]:
    """The functions that call ``hmac.compare_digest``."""
    return {
        function.name
        for function in ast.walk(ast.parse(source))
        if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef))
        for call in ast.walk(function)
        if isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute) and call.func.attr == "compare_digest"
        and isinstance(call.func.value, ast.Name) and call.func.value.id == "hmac"
    }


@pytest.mark.parametrize("code, flagged", [
    ("ok = mac == _route_mac(key, topic, x, stamp)", True),
    ("ok = mac != hmac.new(key, body, hashlib.sha256).digest()", True),
    ("ok = tag[8:] in genuine", True),
    ("ok = bytes(mac) == expected", True),
    ("ok = mac.hex() != other", True),
    ("ok = len(mac) != _MAC_SIZE", False),
    ("ok = hmac.compare_digest(mac, hmac.new(key, body, hashlib.sha256).digest())", False),
    ("ok = prefix != _TOKEN_PREFIX", False),
])
def test_the_static_check_flags_plain_mac_comparisons_only(code: str, flagged: bool) -> None:
    assert _plain_mac_comparisons(code) == ([f"1: {code[5:]}"] if flagged else [])


def test_route_tags_and_token_macs_are_compared_in_constant_time_only() -> None:
    source = Path(dcp.auth.__file__).read_text()
    assert _plain_mac_comparisons(source) == []
    assert _compare_digest_callers(source) == {"check", "verify_token"}  # RouteVerifier.check, verify_token


# -- dcp.auth: formats, boundaries and messages pinned by mutation testing (docs/mutation.md) ----------

FIXED_SECRET = b"a fixed secret of 32 bytes, here"


#: The brokers' secret derived from FIXED_SECRET: its prefix, then HMAC(secret, "dcp broker secret") in hex.
FIXED_BROKER_SECRET = b"dcp-broker-secret:" + hmac.new(FIXED_SECRET, b"dcp broker secret", hashlib.sha256).hexdigest().encode()


def _hmac(key: bytes, message: bytes) -> bytes:
    return hmac.new(key, message, hashlib.sha256).digest()


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def auth_error(call: Callable[[], Any]) -> tuple[str, str]:
    with pytest.raises(AuthError) as info:
        call()
    return info.value.code, str(info.value)


def test_a_token_is_its_sorted_compact_claims_and_their_hmacs_in_base64url() -> None:
    """The token format, computed here from the stdlib: dcp1.B64(body).B64(HMAC(HMAC(brokers' secret,
    "dcp token"), body)), and but for broker tokens .B64(HMAC(HMAC(secret, "dcp token orchestrator"), body))."""
    token_key = _hmac(FIXED_BROKER_SECRET, b"dcp token")
    issuer_key = _hmac(FIXED_SECRET, b"dcp token orchestrator")
    assert dcp.auth.broker_secret(FIXED_SECRET) == FIXED_BROKER_SECRET
    for i in range(12):  # bodies of every length mod 3 (padding stripped or not) and mod 4 and 5 (padding added back)
        name, role, expires = "cam" + "x" * i, ("agent", "admin", "broker")[i % 3], NOW + 1 + i
        body = f'{{"exp":{expires},"name":"{name}","role":"{role}"}}'.encode()
        issued = issue_token(FIXED_SECRET, name, role, expires)
        first = f"dcp1.{_b64url(body)}.{_b64url(_hmac(token_key, body))}"
        assert issued == (first if role == "broker" else f"{first}.{_b64url(_hmac(issuer_key, body))}")
        assert "=" not in issued
        assert verify_token(FIXED_SECRET, issued, NOW) == Claims(name, role, expires)
        assert verify_token(FIXED_BROKER_SECRET, issued, NOW) == Claims(name, role, expires)
        if role == "broker":
            assert issue_token(FIXED_BROKER_SECRET, name, role, expires) == issued


def test_a_route_tag_is_its_stamp_and_a_truncated_hmac_of_topic_producer_broker_stamp_and_x() -> None:
    """The tag, computed here from the stdlib: !II (epoch mod 2**32, expires), then 16 bytes of
    HMAC(HMAC(brokers' secret, "dcp route producer"), topic, producer, broker key (each after its length
    as 4 bytes) + stamp + X); X and the key as their shortest big-endian bytes."""
    route_key = _hmac(FIXED_BROKER_SECRET, b"dcp route producer")
    signer = RouteSigner(FIXED_SECRET)
    assert RouteSigner(FIXED_BROKER_SECRET).sign("t", 5, 1, NOW, producer="p", broker_key=7) == signer.sign("t", 5, 1, NOW, producer="p", broker_key=7)

    def field(data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + data

    for topic, x, epoch, expires, producer, key in [
        ("t", 0, 0, 1, "", 0), ("cam.video", 2**70 + 5, 7, NOW, "camera", 2**64 + 13), ("é" * 200, 12345, 2**32 + 9, 2**32 - 1, "ü" * 70, 257),
    ]:
        stamp = struct.pack("!II", epoch % 2**32, expires)
        message = (
            field(topic.encode()) + field(producer.encode()) + field(key.to_bytes((key.bit_length() + 7) // 8, "big"))
            + stamp + x.to_bytes((x.bit_length() + 7) // 8, "big")
        )
        assert signer.sign(topic, x, epoch, expires, producer=producer, broker_key=key) == stamp + _hmac(route_key, message)[:16]


def test_an_unreadable_secret_file_names_the_os_reason(tmp_path: Path) -> None:
    missing = tmp_path / "missing.secret"
    with pytest.raises(ConfigError) as info:
        load_secret(missing)
    assert str(info.value) == f"cannot read the secret file {missing}: No such file or directory"


def test_a_secret_of_exactly_16_bytes_is_enough(tmp_path: Path) -> None:
    path = tmp_path / "16.secret"
    path.write_bytes(b"  " + b"s" * 16 + b"\n")
    path.chmod(0o600)
    assert load_secret(path) == b"s" * 16
    path.write_bytes(b"s" * 15)
    with pytest.raises(ConfigError) as info:
        load_secret(path)
    assert str(info.value) == f"the secret in {path} has 15 bytes; at least 16 are needed"


@pytest.mark.parametrize(
    ("now", "ttl_s", "expected"),
    [(1000, 1, 1001), (1000, 0.5, 1000), (1000.9, 60, 1060), (0, MAX_TOKEN_TTL_S, 315_360_000)],
)
def test_expiry_is_now_plus_the_ttl_rounded_down(now: float, ttl_s: float, expected: int) -> None:
    assert expiry(now, ttl_s) == expected


@pytest.mark.parametrize("ttl_s", [0, 0.0, -1, MAX_TOKEN_TTL_S + 1, float("nan"), float("inf"), True, False, "60", None])
def test_expiry_refuses_a_ttl_that_is_not_a_positive_number_up_to_ten_years(ttl_s: object) -> None:
    with pytest.raises(ConfigError) as info:
        expiry(1000, ttl_s)
    assert str(info.value) == f"ttl_s must be a positive number of seconds, at most 315360000; got {ttl_s!r}"


@pytest.mark.parametrize(
    ("bad", "code", "message"),
    [
        (None, "token_missing", "this server admits only connections with a token (see dcp token)"),
        (42, "token_malformed", "the token is not of the form dcp1.BODY.MAC[.MAC]"),
        ("dcp1.two-parts", "token_malformed", "the token is not of the form dcp1.BODY.MAC[.MAC]"),
        ("dcp1.e30.AAAA.AAAA.AAAA", "token_malformed", "the token is not of the form dcp1.BODY.MAC[.MAC]"),
        ("dcp1.e30.AAAA.A=A", "token_malformed", "the token is not valid base64url"),
        ("dcp1.a.AAAA", "token_malformed", "the token is not valid base64url"),
        ("dcp1.A=A.AAAA", "token_malformed", "the token is not valid base64url"),  # '=' inside, not padding
        ("dcp9.e30.AAAA", "token_malformed", "unknown token version 'dcp9'"),
        ("dcp1.e30.AAAA", "token_forged", "the token was not issued with this server's secret, or was altered"),
    ],
)
def test_refused_tokens_say_why(bad: object, code: str, message: str) -> None:
    assert auth_error(lambda: verify_token(FIXED_SECRET, bad, NOW)) == (code, message)


@pytest.mark.parametrize("body", [b"not json", b"[]", b'{"name":"cam","role":"agent"}', b'{"exp":"soon","name":"cam","role":"agent"}'])
def test_a_genuine_token_with_unreadable_claims_is_malformed(body: bytes) -> None:
    genuine = f"dcp1.{_b64url(body)}.{_b64url(_hmac(_hmac(FIXED_BROKER_SECRET, b'dcp token'), body))}"
    assert auth_error(lambda: verify_token(FIXED_SECRET, genuine, NOW)) == ("token_malformed", "the token's claims are unreadable")


def test_an_expired_token_names_its_agent() -> None:
    expired = issue_token(FIXED_SECRET, "cam", "agent", NOW)
    assert auth_error(lambda: verify_token(FIXED_SECRET, expired, NOW)) == ("token_expired", "the token of 'cam' expired")


def test_a_hello_without_a_role_is_an_agent() -> None:
    agent = issue_token(FIXED_SECRET, "cam", "agent", NOW + 60)
    assert admit(FIXED_SECRET, {"name": "cam", "token": agent}, NOW) == Claims("cam", "agent", NOW + 60)
    admin = issue_token(FIXED_SECRET, "ops", "admin", NOW + 60)
    assert auth_error(lambda: admit(FIXED_SECRET, {"name": "ops", "token": admin}, NOW)) == (
        "token_role", "a hello with role 'agent' needs a token of role 'agent'; this token's role is 'admin'"
    )


@pytest.mark.parametrize(
    "hello_role, token_role",
    [(hello, token) for hello, needed in sorted(TOKEN_ROLES.items()) for token in ("agent", "admin", "broker") if token != needed],
)
def test_a_token_of_another_role_is_refused_in_plain_english(hello_role: str, token_role: str) -> None:
    needed = TOKEN_ROLES[hello_role]
    token = issue_token(FIXED_SECRET, "cam", token_role, NOW + 60, audience=["here"] if token_role == "broker" else ())
    code, message = auth_error(lambda: admit(FIXED_SECRET, {"role": hello_role, "name": "cam", "token": token}, NOW, ["here"]))
    assert (code, message) == (
        "token_role", f"a hello with role {hello_role!r} needs a token of role {needed!r}; this token's role is {token_role!r}"
    )
    assert not re.search(r"\ba [aeiou]", message)  # never "a admin" or "a agent"


@pytest.mark.parametrize("role", [["agent"], {"agent": 1}, 5, None])
def test_a_hello_whose_role_is_not_a_string_needs_a_token_no_role_has(role: object) -> None:
    agent = issue_token(FIXED_SECRET, "cam", "agent", NOW + 60)
    assert auth_error(lambda: admit(FIXED_SECRET, {"role": role, "name": "cam", "token": agent}, NOW)) == (
        "token_role", f"no token admits a hello with role {role!r}"
    )


def test_a_token_of_another_name_says_both_names() -> None:
    agent = issue_token(FIXED_SECRET, "cam", "agent", NOW + 60)
    assert auth_error(lambda: admit(FIXED_SECRET, {"role": "agent", "name": "spy", "token": agent}, NOW)) == (
        "token_name", "the token was issued to 'cam', not to 'spy'"
    )
