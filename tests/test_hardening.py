"""What an attacker-style review probed, each a test against real brokers on loopback.

* a connection that never says hello is cut after ``hello_timeout_s`` (``hello_timeout``),
  and what it held goes with it;
* before its hello a connection may send frames of ``max_control`` at most, not ``max_frame``;
* one peer address, and one name (a token's), hold a bounded number of connections
  (``connection_limit``);
* a peer that says hello and goes at once frees the port its link took at once;
* names and messages from peers are escaped in log lines;
* ``tls_ca`` with a ``dcp://`` URL is an error, a token over plain TCP off loopback a warning;
* a secret file others may read is refused;
* a client adopts a server's announced limits only up to its own.

Ports are chosen by the OS; waits are on conditions (``tests.waiting``) or on the
broker's own answers, never sleeps.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import stat
import time
from pathlib import Path
from typing import Any

import pytest

import dcp
from dcp import control
from dcp._guard import safe
from dcp.auth import issue_token, load_secret
from dcp.broker import Broker
from dcp.config import BrokerConfig
from dcp.errors import ConfigError, RemoteError
from dcp.forwarding import Control, Write
from dcp.routing import allocate_keys, encode, int_to_bytes
from dcp.wire import HEADER, HEADER_SIZE, VERSION, DATA, ControlFrame, Decoder, Limits, encode_control, encode_data

from .conftest import url_of
from .loopback import LoopbackServer
from .test_forwarding import data as data_frame, forwarder
from .waiting import until

PORTS = 8
SECRET = os.urandom(32).hex().encode()


# -- helpers -------------------------------------------------------------------------------


class Raw:
    """A bare TCP connection to a broker: write bytes, read the control frames it answers."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.decoder = Decoder()
        self.frames: list[dict[str, Any]] = []

    @classmethod
    async def open(cls, broker: Broker) -> Raw:
        host, port = broker.address
        return cls(*await asyncio.open_connection(host, port))

    async def hello(self, **fields: Any) -> dict[str, Any]:
        self.writer.write(encode_control({"op": "hello", "id": 1, **fields}))
        return await self.next_frame()

    async def next_frame(self, timeout: float = 10) -> dict[str, Any]:
        while not self.frames:
            data = await asyncio.wait_for(self.reader.read(65536), timeout)
            if not data:
                raise ConnectionError("closed")
            self.frames += [event.body for event in self.decoder.feed(data) if isinstance(event, ControlFrame)]
        return self.frames.pop(0)

    async def until_closed(self, timeout: float = 10) -> list[dict[str, Any]]:
        """Every control frame until the broker closes the connection."""
        got = []
        try:
            while True:
                data = await asyncio.wait_for(self.reader.read(65536), timeout)
                if not data:
                    break
                got += [event.body for event in self.decoder.feed(data) if isinstance(event, ControlFrame)]
        except ConnectionResetError:
            pass
        return self.frames + got

    def close(self) -> None:
        self.writer.transport.abort()


@pytest.fixture
async def raws() -> Any:
    opened: list[Raw] = []

    async def open_raw(broker: Broker) -> Raw:
        raw = await Raw.open(broker)
        opened.append(raw)
        return raw

    yield open_raw
    for raw in opened:
        raw.close()


@pytest.fixture
def secret_file(tmp_path: Path) -> str:
    path = tmp_path / "dcp.secret"
    path.write_bytes(SECRET)
    path.chmod(0o600)
    return str(path)


def token(name: str, role: str = "agent") -> str:
    return issue_token(SECRET, name, role, int(time.time()) + 600)


def header_of(payload_len: int, ftype: int = DATA) -> bytes:
    """A fixed header declaring a frame of ``payload_len`` payload bytes (no X, topic "")."""
    return HEADER.pack(VERSION, ftype, 0, 8, 0, 0, payload_len, 0, 0)


# -- the hello deadline ------------------------------------------------------------------------


async def test_a_connection_without_hello_is_cut_at_the_deadline(make_broker, raws) -> None:  # type: ignore[no-untyped-def]
    broker = await make_broker(ports=PORTS, hello_timeout_s=0.2)
    idle = await raws(broker)
    holding = await raws(broker)
    holding.writer.write(header_of(30_000) + b"x" * 20_000)  # a partial frame, held
    await until(lambda: any(conn.forwarder.held for conn in broker._connections), "the broker to hold the partial frame")
    for raw in (idle, holding):
        [error] = await raw.until_closed()
        assert (error["op"], error["code"], error["fatal"]) == ("error", "hello_timeout", True)
        assert "no hello within 0.2 s" in error["message"]
    await until(lambda: not broker._connections, "the broker to let both go")
    assert broker.hello_timeouts == 2
    stats = broker.stats()
    assert stats["hello_timeouts"] == 2 and stats["refused"] == 0


async def test_a_hello_in_time_stops_the_clock(make_broker, raws) -> None:  # type: ignore[no-untyped-def]
    broker = await make_broker(ports=PORTS, hello_timeout_s=1.0)  # room for a loaded machine to say hello in time
    async with dcp.connect(url_of(broker), name="prompt", reconnect=False) as agent:
        admin = await raws(broker)
        assert (await admin.hello(role="admin"))["op"] == "welcome"
        late = await raws(broker)  # opened after both: cut after their deadlines would have passed
        [error] = await late.until_closed()
        assert error["code"] == "hello_timeout"
        assert await agent.ping() >= 0
        admin.writer.write(encode_control({"op": "ping", "id": 2}))
        assert (await admin.next_frame())["op"] == "pong"
    assert broker.hello_timeouts == 1


def test_the_hello_deadline_is_a_setting() -> None:
    assert BrokerConfig().hello_timeout_s == 5.0
    assert BrokerConfig(hello_timeout_s=0).hello_timeout_s == 0  # no deadline
    with pytest.raises(ConfigError, match="hello_timeout_s must not be negative"):
        BrokerConfig(hello_timeout_s=-1)


async def test_without_a_deadline_a_quiet_connection_stays(make_broker, raws) -> None:  # type: ignore[no-untyped-def]
    broker = await make_broker(ports=PORTS, hello_timeout_s=0)
    await raws(broker)
    await until(lambda: len(broker._connections) == 1, "the connection")
    assert all(conn._hello_due is None for conn in broker._connections)


# -- frames before the hello -------------------------------------------------------------------


async def test_before_its_hello_a_connection_may_not_start_a_large_frame(make_broker, raws) -> None:  # type: ignore[no-untyped-def]
    broker = await make_broker(ports=PORTS)
    raw = await raws(broker)
    raw.writer.write(header_of(2 * 1024 * 1024) + b"x" * 1000)  # 2 MiB declared: within max_frame, not before hello
    [error] = await raw.until_closed()
    assert (error["code"], error["fatal"]) == ("frame_too_large", True)
    assert f"max_frame={HEADER_SIZE + broker.limits.max_control}" in error["message"]
    await until(lambda: not broker._connections, "the broker to close it")


async def test_a_control_frame_of_max_control_is_fine_before_hello(make_broker, raws, caplog) -> None:  # type: ignore[no-untyped-def]
    caplog.set_level(logging.INFO, logger="dcp.broker")
    broker = await make_broker(ports=PORTS)
    raw = await raws(broker)
    long_name = "n" * 60_000
    welcome = await raw.hello(name=long_name)
    assert welcome["op"] == "welcome"
    lines = [r.getMessage() for r in caplog.records if "attached" in r.getMessage()]
    assert lines and all(len(line) < 400 for line in lines)  # the name is cut in the log line
    assert "(60000 chars)" in lines[0]


async def test_after_its_hello_a_connection_sends_frames_up_to_max_frame_in_the_same_write(make_broker, raws) -> None:  # type: ignore[no-untyped-def]
    broker = await make_broker(ports=PORTS)
    async with dcp.connect(url_of(broker), name="sub", reconnect=False) as sub:
        raw = await raws(broker)
        payload = os.urandom(300_000)
        frame = encode_data("big", payload, encode({broker.key: 1 << sub.port}))
        raw.writer.write(encode_control({"op": "hello", "id": 1, "name": "pipelining"}) + frame)
        msg = await sub.next_message(timeout=10)
        assert (msg.topic, msg.payload) == ("big", payload)


@pytest.mark.parametrize("cut", [None, 5, "in hello", "after hello", "in header", "in body"])
def test_a_forwarder_widened_by_the_hello_reads_what_follows_it_under_the_new_limits(cut: object) -> None:
    small = Limits(max_frame=HEADER_SIZE + 1000, max_control=1000)
    fw, _ = forwarder(port=-1, limits=small)
    hello = encode_control({"op": "hello", "id": 1, "name": "x" * 900})
    big = data_frame(0b10, payload=b"p" * 5000)
    stream = hello + big
    at = {None: len(stream), "in hello": len(hello) - 1, "after hello": len(hello), "in header": len(hello) + 5,
          "in body": len(hello) + 3000}.get(cut, cut)
    decisions = []
    for read in (stream[:at], stream[at:]):
        for decision in fw.receive(read):
            decisions.append(decision)
            if isinstance(decision, Control):  # what the broker does at an accepted hello
                fw.attach(0)
                fw.set_limits(Limits())
    assert isinstance(decisions[0], Control)
    writes = decisions[1:]
    assert all(isinstance(w, Write) and w.mask == 0b10 for w in writes) and sum(w.size for w in writes) == len(big)
    assert b"".join(bytes(c) for w in writes for c in w.chunks) == big[:3] + bytes([big[3] - 1]) + big[4:]


def test_before_the_hello_a_forwarder_refuses_a_frame_over_its_limits_in_any_read() -> None:
    from dcp.errors import FrameTooLarge

    small = Limits(max_frame=HEADER_SIZE + 1000, max_control=1000)
    big = data_frame(0b10, payload=b"p" * 5000)
    for at in (5, HEADER_SIZE, 100):
        fw, _ = forwarder(port=-1, limits=small)
        with pytest.raises(FrameTooLarge):
            list(fw.receive(big[:at]))
            list(fw.receive(big[at:]))


# -- connections per address, per name ----------------------------------------------------------


async def test_one_address_holds_at_most_max_connections_per_address(make_broker, raws) -> None:  # type: ignore[no-untyped-def]
    broker = await make_broker(ports=PORTS, max_connections_per_address=3)
    held = [await raws(broker) for _ in range(3)]
    for raw in held:
        assert (await raw.hello(role="admin"))["op"] == "welcome"
    extra = await raws(broker)
    [error] = await extra.until_closed()
    assert (error["code"], error["fatal"]) == ("connection_limit", True)
    assert "at most 3 connections from 127.0.0.1" in error["message"]
    assert broker.stats()["refused_per_address"] == 1
    held[0].close()
    await until(lambda: broker.per_address.counts.get("127.0.0.1") == 2, "the broker to see one go")
    again = await raws(broker)
    assert (await again.hello(role="admin"))["op"] == "welcome"


def test_the_connection_limits_default_to_off_per_address_and_16_per_name() -> None:
    config = BrokerConfig()
    assert (config.max_connections_per_address, config.max_connections_per_name) == (0, 16)
    with pytest.raises(ConfigError, match="max_connections_per_name must not be negative"):
        BrokerConfig(max_connections_per_name=-1)


async def test_one_token_holds_at_most_16_connections(make_broker, secret_file) -> None:  # type: ignore[no-untyped-def]
    broker = await make_broker(ports=32, secret_file=secret_file, require_token=True)
    cam = token("cam")
    conns = [await dcp.connect(url_of(broker), name="cam", token=cam, reconnect=False) for _ in range(16)]
    try:
        with pytest.raises(RemoteError) as info:
            await dcp.connect(url_of(broker), token=cam, reconnect=False)  # no name: the token's
        assert info.value.code == "connection_limit"
        assert "16 connections named 'cam'" in str(info.value)
        # Another token is not held back, nor is an admin's
        async with dcp.connect(url_of(broker), name="other", token=token("other"), reconnect=False):
            pass
        async with dcp.connect(url_of(broker), role="admin", name="cam", token=token("ops", "admin"), reconnect=False) as admin:
            stats = await admin.stats()
        assert stats["refused_per_name"] == 1
        # One goes; the next gets in, once the broker has seen it go
        await conns.pop().close()
        await until(lambda: broker.per_name.counts.get("cam") == 15, "the broker to see it go")
        conns.append(await dcp.connect(url_of(broker), name="cam", token=cam, reconnect=False))
    finally:
        for conn in conns:
            await conn.close()


async def test_an_admin_token_counts_under_its_own_name_whatever_the_hello_says(make_broker, secret_file) -> None:  # type: ignore[no-untyped-def]
    broker = await make_broker(ports=PORTS, secret_file=secret_file, require_token=True, max_connections_per_name=2)
    ops = token("ops", "admin")
    a = await dcp.connect(url_of(broker), role="admin", name="one", token=ops, reconnect=False)
    b = await dcp.connect(url_of(broker), role="admin", name="two", token=ops, reconnect=False)
    try:
        with pytest.raises(RemoteError, match="connection_limit"):
            await dcp.connect(url_of(broker), role="admin", name="three", token=ops, reconnect=False)
    finally:
        await a.close()
        await b.close()


async def test_without_tokens_names_count_and_nameless_hellos_do_not(make_broker) -> None:  # type: ignore[no-untyped-def]
    broker = await make_broker(ports=PORTS, max_connections_per_name=2)
    url = url_of(broker)
    async with dcp.connect(url, name="cam", reconnect=False), dcp.connect(url, name="cam", reconnect=False):
        with pytest.raises(RemoteError, match="connection_limit"):
            await dcp.connect(url, name="cam", reconnect=False)
        nameless = [await dcp.connect(url, reconnect=False) for _ in range(3)]
        for conn in nameless:
            await conn.close()


async def test_an_agent_reconnecting_before_its_old_connection_is_seen_gone_gets_in(make_broker) -> None:  # type: ignore[no-untyped-def]
    """Under the default limit a reconnect overlaps the old connection; the new one is
    admitted while the old is still open, and the old one's going frees its count."""
    broker = await make_broker(ports=PORTS)
    url = url_of(broker)
    old = await dcp.connect(url, name="cam", reconnect=False)
    new = await dcp.connect(url, name="cam", reconnect=False)
    assert broker.per_name.counts["cam"] == 2
    await old.close()
    await until(lambda: broker.per_name.counts.get("cam") == 1, "the old connection's count to go")
    await new.close()
    await until(lambda: "cam" not in broker.per_name.counts, "the count to go")


# -- a link that never came up ------------------------------------------------------------------


async def test_a_fake_peer_hello_frees_its_port_as_soon_as_it_goes(make_broker, raws) -> None:  # type: ignore[no-untyped-def]
    key_a, key_fake = allocate_keys(2, PORTS)
    broker = await make_broker(key=key_a, ports=PORTS)  # the default hold: 30 s
    for link_port in range(3):
        raw = await raws(broker)
        welcome = await raw.hello(role="peer", name="fake", key=int_to_bytes(key_fake + link_port * 2), link=link_port)
        assert welcome["op"] == "welcome"
        assert len(broker.links) == 1
        raw.close()
        await until(lambda: not broker.links, "the port of a link never heard from to be freed")
        assert broker.reserved == 0
    # its ports are free for agents
    conns = [await dcp.connect(url_of(broker), name=f"a{i}", reconnect=False) for i in range(PORTS)]
    for conn in conns:
        await conn.close()


async def test_a_peer_heard_from_keeps_its_port_for_the_hold(make_broker, raws) -> None:  # type: ignore[no-untyped-def]
    key_a, key_peer = allocate_keys(2, PORTS)
    broker = await make_broker(key=key_a, ports=PORTS)
    raw = await raws(broker)
    assert (await raw.hello(role="peer", name="real", key=int_to_bytes(key_peer), link=0))["op"] == "welcome"
    raw.writer.write(encode_control({"op": "ping", "id": 7}))
    assert (await raw.next_frame())["op"] == "pong"
    (link,) = broker.links.values()
    assert link.confirmed
    raw.close()
    await until(lambda: link.state == "down", "the link to go down")
    assert broker.links == {link.port: link} and broker.reserved == 1 << link.port  # held


async def test_linked_brokers_confirm_their_link_at_once(make_broker) -> None:  # type: ignore[no-untyped-def]
    key_a, key_b = allocate_keys(2, PORTS)
    a = await make_broker(key=key_a, ports=PORTS, name="alpha")
    b = await make_broker(key=key_b, ports=PORTS, name="beta", link_ping_interval_s=60)  # no periodic ping in time
    host, port = a.address
    link = b.add_link(f"{host}:{port}")
    await link.wait_up(5)
    await until(lambda: a.links and next(iter(a.links.values())).confirmed, "the acceptor to hear from the dialler")


# -- log lines ---------------------------------------------------------------------------------


def test_safe_escapes_control_characters_and_cuts_long_text() -> None:
    assert safe("camera-1") == "camera-1"
    assert safe("cam\nport 3 attached (x)") == "cam\\x0aport 3 attached (x)"
    assert safe("a\r\x1b[2Jb\u2028c\u202e") == "a\\x0d\\x1b[2Jb\\u2028c\\u202e"
    assert safe("back\\x0a") == "back\\\\x0a"  # an escape cannot be forged
    assert safe("n" * 1000).endswith("...(1000 chars)") and len(safe("n" * 1000)) < 160


async def test_a_name_with_a_newline_forges_no_log_line(make_broker, caplog, raws) -> None:  # type: ignore[no-untyped-def]
    caplog.set_level(logging.INFO, logger="dcp")
    key_a, key_fake = allocate_keys(2, PORTS)
    broker = await make_broker(key=key_a, ports=PORTS, max_connections_per_name=1)
    forged = "cam\nINFO dcp.broker: port 7 attached (admin 10.0.0.1:1)"
    async with dcp.connect(url_of(broker), name=forged, reconnect=False):
        with pytest.raises(RemoteError):
            await dcp.connect(url_of(broker), name=forged, reconnect=False)  # refused: logged with the name
    peer = await raws(broker)
    await peer.hello(role="peer", name=forged, key=int_to_bytes(key_fake), link=0)
    peer.close()
    await until(lambda: not broker.links, "the fake link to go")
    messages = [record.getMessage() for record in caplog.records]
    named = [m for m in messages if "cam" in m]
    assert len(named) >= 4, messages  # attached, refused, detached, the link's lines
    assert all("\n" not in m for m in named), named
    assert any("cam\\x0aINFO" in m for m in named)


# -- TLS and tokens on the client side ----------------------------------------------------------


def test_a_data_agent_with_tls_ca_refuses_a_plain_url() -> None:
    with pytest.raises(ConfigError, match=r"broker URL 'dcp://10\.0\.0\.1:7400' is plain dcp://.*dcps://10\.0\.0\.1:7400"):
        dcp.DataAgent("cam", broker="dcp://10.0.0.1:7400", orchestrator="dcps://10.0.0.1:7300", tls_ca="ca.pem")
    with pytest.raises(ConfigError, match=r"orchestrator URL 'dcp://127\.0\.0\.1:7300' \(the default\)"):
        dcp.DataAgent("cam", broker="dcps://10.0.0.1:7400", tls_ca="ca.pem")
    agent = dcp.DataAgent("cam", broker=["dcps://10.0.0.1:7400", "10.0.0.2:7400"], orchestrator="dcps://10.0.0.1:7300", tls_ca="ca.pem")
    assert agent.tls_ca == "ca.pem"
    with pytest.raises(ConfigError, match="use dcps://"):
        dcp.Connection("dcp://10.0.0.1:7400", tls_ca="ca.pem")


def non_loopback_address() -> str | None:
    """An address of this host other than loopback, if it has one."""
    for probe in ("192.0.2.1", "10.255.255.255", "8.8.8.8"):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            try:
                sock.connect((probe, 9))
            except OSError:
                continue
            address = sock.getsockname()[0]
            if not address.startswith("127."):
                return address
    return None


async def test_a_token_over_plain_tcp_off_loopback_is_a_warning(make_broker, caplog) -> None:  # type: ignore[no-untyped-def]
    caplog.set_level(logging.WARNING, logger="dcp.client")
    local = await make_broker(ports=PORTS)
    async with dcp.connect(url_of(local), name="cam", token="dcp1.a.b", reconnect=False):
        pass
    assert not [r for r in caplog.records if "without TLS" in r.getMessage()]
    address = non_loopback_address()
    if address is None:
        pytest.skip("this host has no address but loopback")
    remote = await make_broker(ports=PORTS, listen=f"{address}:0")
    host, port = remote.address
    async with dcp.connect(f"dcp://{host}:{port}", name="cam", token="dcp1.a.b", reconnect=False):
        pass
    [warning] = [r for r in caplog.records if "without TLS" in r.getMessage() and r.name == "dcp.client"]  # the broker warns too
    assert warning.levelno == logging.WARNING and f"sending a token to {host}" in warning.getMessage()


# -- the secret file ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620, 0o602])
def test_a_secret_file_others_may_read_or_write_is_refused(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "dcp.secret"
    path.write_bytes(SECRET)
    path.chmod(mode)
    with pytest.raises(ConfigError) as info:
        load_secret(path)
    assert f"(mode {mode:03o})" in str(info.value) and f"chmod 600 {path}" in str(info.value)
    with pytest.raises(ConfigError, match="chmod 600"):
        Broker(BrokerConfig(secret_file=str(path)))


@pytest.mark.parametrize("mode", [0o600, 0o400])
def test_a_secret_file_of_its_owner_only_is_loaded(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "dcp.secret"
    path.write_bytes(SECRET + b"\n")
    path.chmod(mode)
    assert load_secret(path) == SECRET
    assert stat.S_IMODE(path.stat().st_mode) == mode


# -- what a client takes from a server ---------------------------------------------------------


class GreedyServer(LoopbackServer):
    """Answers every hello with a welcome announcing the largest limits the wire allows."""

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        decoder = Decoder()
        (key,) = allocate_keys(1, PORTS)
        while data := await reader.read(65536):
            for event in decoder.feed(data):
                if isinstance(event, ControlFrame) and event.body["op"] == "hello":
                    welcome = control.Welcome(
                        re=event.body["id"], key=key, name="greedy", mode="stateless", port=0, ports=PORTS,
                        max_frame=0xFFFFFFFF, max_topic=0xFFFF, max_x_bits=0xFFFF * 8,
                    )
                    writer.write(encode_control(welcome.to_body()))


@pytest.fixture
async def greedy() -> Any:
    server = GreedyServer()
    address = await server.start()
    yield address
    await server.close()


async def test_a_client_clamps_the_limits_a_server_announces(greedy: str) -> None:
    own = Limits()
    async with dcp.connect(f"dcp://{greedy}", name="cam", reconnect=False) as conn:
        assert (conn.limits.max_frame, conn.limits.max_topic, conn.limits.max_x_bits) == (own.max_frame, own.max_topic, own.max_x_bits)
    mine = Limits(max_frame=1 << 20, max_topic=64, max_x_bits=1024, max_control=1 << 16)
    async with dcp.connect(f"dcp://{greedy}", name="cam", reconnect=False, limits=mine) as conn:
        assert conn.limits == mine


async def test_a_client_takes_the_lower_limits_of_a_server(make_broker) -> None:  # type: ignore[no-untyped-def]
    broker = await make_broker(ports=PORTS, max_frame=1 << 16, max_topic=32)
    async with dcp.connect(url_of(broker), name="cam", reconnect=False) as conn:
        assert (conn.limits.max_frame, conn.limits.max_topic) == (1 << 16, 32)
