"""Peer links between brokers in this process: set-up, refusals, health, hold, loops.

Every broker here runs on the test's event loop, so the tests can read a broker's
attributes directly; state that changes without a reply to await (the far end of a
link, the hold timer) is waited for with ``until``, which polls a condition often
and fails with what it waited for.  No test sleeps to synchronise.
"""

from __future__ import annotations

import asyncio
import json
from functools import partial
from typing import Any

import pytest

import dcp
from dcp.broker import Broker
from dcp.views import format_stats, stats_as_json
from dcp.errors import ConfigError, LinkRefused, RemoteError
from dcp.config import BrokerConfig
from dcp.routing import KeyLayout, allocate_keys, encode, int_from_bytes, int_to_bytes
from dcp.wire import DEFAULT_HOPS, ControlFrame, Decoder, encode_control
from tests.waiting import until as wait_until

from .conftest import url_of
from .loopback import LoopbackServer

PORTS = 8


until = partial(wait_until, timeout=5)


def addr_of(broker: Broker) -> str:
    host, port = broker.address
    return f"{host}:{port}"




async def admin_stats(broker: Broker) -> dict[str, Any]:
    """The broker's stats as a client gets them (over the wire)."""
    async with dcp.connect(url_of(broker), role="admin", reconnect=False) as admin:
        return await admin.stats()


def only_link(broker: Broker) -> Any:
    (link,) = broker.links.values()
    return link


async def linked_pair(make_broker, **settings: Any) -> tuple[Broker, Broker, Any]:  # type: ignore[no-untyped-def]
    """Acceptor ``a`` and dialler ``b`` (its link to ``a`` up), with their own keys.

    An agent passes through ``a`` first, so the link has port 1 at ``a`` and port 0
    at ``b``: a mix-up of the two ends shows.
    """
    key_a, key_b = allocate_keys(2, PORTS)
    a = await make_broker(key=key_a, ports=PORTS, name="alpha", **settings)
    b = await make_broker(key=key_b, ports=PORTS, name="beta", **settings)
    async with dcp.connect(url_of(a), name="passing", reconnect=False):
        pass
    link = b.add_link(addr_of(a))
    await link.wait_up(5)
    assert (link.port, link.remote_port) == (0, 1)
    return a, b, link


# -- set-up ------------------------------------------------------------------------


async def test_peers_in_config_link_at_start_and_carry_frames(make_broker) -> None:  # type: ignore[no-untyped-def]
    key_a, key_b = allocate_keys(2, PORTS)
    a = await make_broker(key=key_a, ports=PORTS, name="alpha")
    pub = await dcp.connect(url_of(a), name="pub", reconnect=False)  # takes a's port 0: the link ends differ
    b = await make_broker(key=key_b, ports=PORTS, name="beta", peers=(addr_of(a),))
    await only_link(b).wait_up(5)

    stats_a, stats_b = await admin_stats(a), await admin_stats(b)
    (in_a,) = stats_a["links"]
    (out_b,) = stats_b["links"]
    assert (out_b["state"], out_b["direction"], out_b["remote_name"]) == ("up", "out", "alpha")
    assert (in_a["state"], in_a["direction"], in_a["remote_name"]) == ("up", "in", "beta")
    assert out_b["address"] == addr_of(a)
    assert (out_b["port"], in_a["port"]) == (0, 1)
    assert out_b["remote_port"] == in_a["port"] and in_a["remote_port"] == out_b["port"]
    assert int_from_bytes(out_b["remote_key"]) == key_a and int_from_bytes(in_a["remote_key"]) == key_b
    assert a.reserved == 1 << in_a["port"] and b.reserved == 1 << out_b["port"]

    async with pub, dcp.connect(url_of(b), name="sub") as sub:
        x = encode({key_a: 1 << in_a["port"], key_b: 1 << sub.port})
        await pub.publish("across", b"one link", route=x)
        msg = await sub.next_message(timeout=5)
        assert (msg.topic, msg.payload, msg.hops) == ("across", b"one link", DEFAULT_HOPS - 2)
        assert pub.pending == 0
    assert a.frames_in == b.frames_in == 1
    assert not any(a.drops.values()) and not any(b.drops.values())


# -- refusals ---------------------------------------------------------------------------


async def test_a_peer_with_the_same_key_is_refused_for_good_and_reported(make_broker, caplog: pytest.LogCaptureFixture) -> None:  # type: ignore[no-untyped-def]
    """A shared key cannot heal by redialling: the dialler stops, logs it once as an error,
    answers the admin at once, and shows the link as refused, with why, until it is unlinked."""
    caplog.set_level("WARNING", logger="dcp.link")
    (key,) = allocate_keys(1, PORTS)
    a = await make_broker(key=key, ports=PORTS, name="alpha")
    b = await make_broker(key=key, ports=PORTS, name="beta", link_retry_max_s=0.05)
    async with dcp.connect(url_of(b), role="admin", reconnect=False) as admin:
        with pytest.raises(RemoteError) as info:
            await admin.link(addr_of(a), wait=30)  # answered on the refusal, not after the wait
        assert info.value.code == "link_refused"
        assert "same_key" in info.value.message and str(key) in info.value.message and addr_of(a) in info.value.message
        link = only_link(b)
        await asyncio.wait_for(link._task, 5)  # the dialling task ended: nothing will redial
        assert (link.state, link.connects) == ("refused", 1)
        assert link.last_error.startswith("same_key: ") and str(key) in link.last_error
        (record,) = [r for r in caplog.records if r.name == "dcp.link"]
        assert record.levelname == "ERROR" and "same_key" in record.getMessage() and "not redialling" in record.getMessage()

        (row,) = (await admin.stats())["links"]
        assert (row["state"], row["last_error"]) == ("refused", link.last_error)
        text = format_stats(await admin.stats())
        assert f"refused: {link.last_error}" in text.splitlines()[-1]

        await admin.unlink(link.port)  # the way out: unlink, give a broker its own key, link again
    assert b.links == {} and b.reserved == 0
    assert a.links == {} and a.reserved == 0 and a.attached == 0


@pytest.mark.parametrize("dialler", ["many", "few"])
async def test_a_peer_sharing_a_bank_key_is_refused_whichever_end_dials(make_broker, dialler: str) -> None:  # type: ignore[no-untyped-def]
    """A broker of 200 ports whose last bank has the key of a 64-port broker: the keys
    could not route together, so the link is refused (``same_key``), from either end."""
    few = await make_broker(ports=64, name="few")
    many = Broker(BrokerConfig(listen="127.0.0.1:0", ports=200, name="many", insecure=True))
    many.layout = KeyLayout(200, (*many.layout.keys[:-1], few.key))
    await many.start()
    try:
        a, b = (many, few) if dialler == "many" else (few, many)
        async with dcp.connect(url_of(a), role="admin", reconnect=False) as admin:
            with pytest.raises(RemoteError) as info:
                await admin.link(addr_of(b), wait=30)
        assert info.value.code == "link_refused"
        assert only_link(a).state == "refused"
        assert "same_key" in only_link(a).last_error and str(few.key) in only_link(a).last_error
        assert b.links == {} and b.attached == 0
    finally:
        await many.close()


async def test_a_stateful_broker_takes_no_links(make_broker) -> None:  # type: ignore[no-untyped-def]
    key_s, key_l = allocate_keys(2, PORTS)
    stateful = await make_broker(key=key_s, ports=PORTS, mode="stateful", name="table")
    with pytest.raises(ConfigError, match="stateless"):
        stateful.add_link("127.0.0.1:9")
    async with dcp.connect(url_of(stateful), role="admin", reconnect=False) as admin:
        with pytest.raises(RemoteError) as info:
            await admin.link("127.0.0.1:9")
    assert info.value.code == "bad_link"
    assert stateful.links == {} and stateful.reserved == 0

    stateless = await make_broker(key=key_l, ports=PORTS, link_retry_max_s=0.05)
    link = stateless.add_link(addr_of(stateful))
    with pytest.raises(LinkRefused) as refused:
        await link.wait_up(30)
    assert refused.value.code == "wrong_mode" and addr_of(stateful) in str(refused.value)
    assert (link.state, link.connects, link.remote_port) == ("refused", 1, -1)  # not redialled: a mode does not heal
    assert "wrong_mode" in link.last_error and "stateless" in link.last_error
    assert stateful.links == {} and stateful.reserved == 0 and stateful.attached == 0


async def test_only_admins_link_and_unlink(broker: Broker) -> None:
    async with dcp.connect(url_of(broker), name="agent") as agent:
        with pytest.raises(RemoteError) as info:
            await agent.link("127.0.0.1:9")
        assert info.value.code == "not_admin"
        with pytest.raises(RemoteError) as info:
            await agent.unlink(0)
        assert info.value.code == "not_admin"
        assert broker.links == {} and broker.reserved == 0
        assert broker.attached == 1 << agent.port  # the agent keeps its port
        await agent.ping()


async def test_unlink_frees_the_port_at_both_ends(make_broker) -> None:  # type: ignore[no-untyped-def]
    (key_b,) = allocate_keys(1, PORTS)
    # One port only at the acceptor: after the unlink, an agent must get it back.
    a = await make_broker(key=allocate_keys(1, 1)[0], ports=1, name="alpha")
    b = await make_broker(key=key_b, ports=PORTS, name="beta")
    async with dcp.connect(url_of(b), role="admin", reconnect=False) as admin:
        made = await admin.link(addr_of(a), wait=5)
        assert (made["state"], made["remote_port"]) == ("up", 0)
        assert a.reserved == 1 and b.reserved == 1 << made["port"]
        with pytest.raises(RemoteError) as info:
            await admin.unlink(made["port"] + 1)
        assert info.value.code == "no_link"
        assert len(b.links) == 1
        await admin.unlink(made["port"])
        assert b.links == {} and b.reserved == 0
    await until(lambda: a.links == {}, "the acceptor to drop its end")
    assert a.reserved == 0 and a.attached == 0
    assert (await admin_stats(a))["links"] == [] and (await admin_stats(b))["links"] == []
    async with dcp.connect(url_of(a), name="agent", reconnect=False) as agent:
        assert agent.port == 0  # the freed port is handed out again


# -- health -----------------------------------------------------------------------------


async def test_pings_measure_the_round_trip_at_both_ends(make_broker) -> None:  # type: ignore[no-untyped-def]
    a, b, link = await linked_pair(make_broker, link_ping_interval_s=0.02)
    in_a = only_link(a)
    await until(lambda: link.rtt_s is not None and in_a.rtt_s is not None, "an RTT at both ends")
    for broker in (a, b):
        (stats,) = (await admin_stats(broker))["links"]
        assert isinstance(stats["rtt_ms"], float) and 0 < stats["rtt_ms"] < 5000, stats


class MutePeer(LoopbackServer):
    """Answers a link's hello with a welcome, then never says anything again."""

    def __init__(self, key: int) -> None:
        super().__init__()
        self.key = key
        self.hellos: list[dict[str, Any]] = []
        self.connections = 0
        self.second_hello = asyncio.Event()
        self.release = asyncio.Event()  # the welcome of later connections waits for this

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        number = self.connections
        decoder = Decoder()
        events: list[Any] = []
        while not events:
            data = await reader.read(65536)
            if not data:
                return
            events.extend(decoder.feed(data))
        assert isinstance(events[0], ControlFrame)
        self.hellos.append(events[0].body)
        if number >= 2:
            self.second_hello.set()
            await self.release.wait()
        welcome = {"op": "welcome", "re": 0, "key": int_to_bytes(self.key), "port": 5, "name": "mute"}
        writer.write(encode_control(welcome))
        while await reader.read(65536):  # pings: read, never answered
            pass

    async def close(self) -> None:
        self.release.set()
        await super().close()


async def test_a_peer_that_stops_answering_pings_is_cut_and_redialled(make_broker) -> None:  # type: ignore[no-untyped-def]
    key_mute, key_b = allocate_keys(2, PORTS)
    mute = MutePeer(key_mute)
    address = await mute.start()
    try:
        b = await make_broker(key=key_b, ports=PORTS, link_ping_interval_s=0.05, link_timeout_s=0.3, link_retry_max_s=0.05)
        link = b.add_link(address)
        await link.wait_up(5)
        hello = mute.hellos[0]
        assert (hello["op"], hello["role"], hello["link"]) == ("hello", "peer", link.port)
        assert int_from_bytes(hello["key"]) == key_b
        assert (link.remote_key, link.remote_port, link.remote_name) == (key_mute, 5, "mute")
        assert b.attached >> link.port & 1

        # The redial's welcome is held back, so the reason for the cut can be read.
        await asyncio.wait_for(mute.second_hello.wait(), 5)
        assert link.state == "down"
        assert "no answer" in link.last_error
        assert not b.attached >> link.port & 1 and b.reserved >> link.port & 1
        mute.release.set()
        await link.wait_up(5)
        assert link.connects >= 2 and mute.connections >= 2
        assert link.stats()["connects"] == link.connects and link.last_error == ""
    finally:
        await mute.close()


# -- the hold of an incoming link's port ------------------------------------------------


async def test_the_port_of_a_peer_gone_for_good_is_freed_after_the_hold(make_broker) -> None:  # type: ignore[no-untyped-def]
    a, b, _link = await linked_pair(make_broker, link_hold_s=0.4)
    in_a = only_link(a)
    port = in_a.port
    assert a.reserved == 1 << port
    await b.close()
    await until(lambda: in_a.state != "up", "the acceptor to see the link down")
    assert in_a.state == "down" and a.links == {port: in_a} and a.reserved == 1 << port  # held
    await until(lambda: a.links == {}, "the hold to expire", timeout=3)
    assert a.reserved == 0 and a.attached == 0
    assert (await admin_stats(a))["links"] == []


async def test_a_returning_peer_gets_its_port_back(make_broker) -> None:  # type: ignore[no-untyped-def]
    a, b, link = await linked_pair(make_broker)  # the default hold: 30 s
    in_a = only_link(a)
    remote_port = link.remote_port
    assert remote_port == in_a.port
    # Take the next port at the acceptor, so a new link would not get the same one.
    async with dcp.connect(url_of(a), name="squatter", reconnect=False) as squatter:
        assert squatter.port != in_a.port
        assert link.conn is not None
        link.conn.abort()
        await until(lambda: link.connects >= 2, "the dialler to redial")
        await link.wait_up(5)
        assert link.remote_port == remote_port
        assert a.links == {in_a.port: in_a} and a.reserved == 1 << in_a.port
        await until(lambda: in_a.state == "up", "the acceptor to see the link up")
        assert in_a.connects == 2 and in_a.conn is not None
        assert a.attached == (1 << in_a.port) | (1 << squatter.port)
    assert b.reserved == 1 << link.port and len(b.links) == 1


async def test_no_free_port_refuses_the_link_and_spares_the_agent(make_broker) -> None:  # type: ignore[no-untyped-def]
    (key_a,) = allocate_keys(1, 1)
    (key_b,) = allocate_keys(1, PORTS)
    a = await make_broker(key=key_a, ports=1, name="full")
    b = await make_broker(key=key_b, ports=PORTS, link_retry_max_s=0.05)
    async with dcp.connect(url_of(a), name="agent", reconnect=False) as agent:
        assert agent.port == 0
        link = b.add_link(addr_of(a))
        await until(lambda: link.connects >= 2 and link.last_error != "", "the refused link to be redialled")
        assert link.state == "down"
        assert "all 1 ports are taken" in link.last_error
        # The same code an agent gets when no port is free.
        assert link.last_error.startswith("no_free_port:"), link.last_error
        assert a.links == {} and a.reserved == 0 and a.attached == 1
        assert agent.status is dcp.Status.OPEN and agent.connects == 1
        await agent.ping()
        (conn,) = [c for c in (await admin_stats(a))["connections"] if c["role"] == "agent"]
        assert (conn["port"], conn["name"]) == (0, "agent")


# -- loops --------------------------------------------------------------------------------


async def test_a_forged_route_round_a_ring_ends_at_the_hop_limit(make_broker) -> None:  # type: ignore[no-untyped-def]
    keys = allocate_keys(3, PORTS)
    b0, b1, b2 = [await make_broker(key=key, ports=PORTS, name=f"b{i}") for i, key in enumerate(keys)]
    # The ring: b1 -> b0, b2 -> b1, b0 -> b2 (dialler -> acceptor).
    for dialler, acceptor in ((b1, b0), (b2, b1), (b0, b2)):
        await dialler.add_link(addr_of(acceptor)).wait_up(5)
    rings = (b0, b1, b2)
    for broker in rings:
        assert len(broker.links) == 2
        await until(lambda broker=broker: all(link.state == "up" for link in broker.links.values()), "every link up")

    def link_to(src: Broker, dst: Broker) -> int:
        (port,) = [p for p, link in src.links.items() if link.remote_key == dst.key]
        return port

    def totals() -> tuple[int, int, int]:
        return (
            sum(b.frames_in for b in rings),
            sum(b.frames_out for b in rings),
            sum(b.drops["hop_limit"] for b in rings),
        )

    hops = 6
    # Every broker sends a frame out on both its links (never back where it came
    # from): one copy circles each way until its hop limit runs out.
    forged = encode({b.key: sum(1 << port for port in b.links) for b in rings})
    async with dcp.connect(url_of(b0), name="pub", hops=hops) as pub, dcp.connect(url_of(b1), name="s1") as s1, dcp.connect(
        url_of(b2), name="s2"
    ) as s2:
        await pub.publish("loop", b"round and round", route=forged)
        # Each way: arrivals with hops 5, 4, ..., 0, the last one dropped.
        frames_in, frames_out, dropped = 1 + 2 * hops, 2 + 2 * (hops - 1), 2
        expected = (frames_in, frames_out, dropped)
        await until(lambda: all(t >= e for t, e in zip(totals(), expected)), "the copies to run out of hops")
        assert totals() == expected
        for b in rings:
            assert sum(b.drops.values()) == b.drops["hop_limit"]
        assert s1.pending == s2.pending == 0

        # The brokers still serve; a frame each way round the ring after the loop
        # (behind any stray copy on those links) arrives, and the totals grow by it alone.
        to_s2 = encode({b0.key: 1 << link_to(b0, b1), b1.key: 1 << link_to(b1, b2), b2.key: 1 << s2.port})
        to_s1 = encode({b0.key: 1 << link_to(b0, b2), b2.key: 1 << link_to(b2, b1), b1.key: 1 << s1.port})
        await pub.publish("after", b"to s2", route=to_s2, hops=DEFAULT_HOPS)
        await pub.publish("after", b"to s1", route=to_s1, hops=DEFAULT_HOPS)
        for sub, payload in ((s2, b"to s2"), (s1, b"to s1")):
            msg = await sub.next_message(timeout=5)
            assert (msg.topic, msg.payload, msg.hops) == ("after", payload, DEFAULT_HOPS - 3)
        await pub.ping()
        assert totals() == (frames_in + 6, frames_out + 6, dropped)
        assert s1.pending == s2.pending == 0


# -- what `dcp stats` shows ---------------------------------------------------------------


async def test_stats_text_and_json_show_the_links(make_broker) -> None:  # type: ignore[no-untyped-def]
    a, b, link = await linked_pair(make_broker)
    stats_b, stats_a = await admin_stats(b), await admin_stats(a)

    text_b = format_stats(stats_b)
    assert any(line.split()[:2] == ["link", "dir"] for line in text_b.splitlines())
    row_b = [line.split() for line in text_b.splitlines() if line.split()[1:3] == ["out", addr_of(a)]]
    assert len(row_b) == 1
    assert row_b[0][:5] == [str(link.port), "out", addr_of(a), "up", str(link.remote_port)]

    text_a = format_stats(stats_a)
    row_a = [line.split() for line in text_a.splitlines() if line.split()[1:3] == ["in", "beta"]]
    assert len(row_a) == 1
    assert row_a[0][:5] == [str(link.remote_port), "in", "beta", "up", str(link.port)]

    for stats, own, other in ((stats_a, a, b), (stats_b, b, a)):
        as_json = json.loads(json.dumps(stats_as_json(stats)))
        assert as_json["key"] == str(own.key)
        (one,) = as_json["links"]
        assert one["remote_key"] == str(other.key) and one["state"] == "up"
        assert isinstance(stats["links"][0]["remote_key"], bytes)  # the input is left alone
