"""Signed topology numbers: the orchestrator's route tags and ``--verify-routes``.

Pure checks of :mod:`dcp.auth` and of the codec's SIGNED_ROUTE field; brokers that
verify (unsigned, forged and expired numbers are dropped, counted and reported to
their sender, while genuine traffic flows); and a whole plane where the orchestrator
signs and a publisher that forges X reaches nobody.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

import dcp
from dcp.auth import RouteSigner, RouteVerifier, load_secret
from dcp.broker import Broker
from dcp.config import BrokerConfig
from dcp.routing import encode
from dcp.wire import ROUTE_TAG_SIZE, SIGNED_ROUTE, DataFrame, Decoder, Rejected, encode_data

from .conftest import url_of
from .test_orchestrator import Plane
from .waiting import until

SECRET = b"0123456789abcdef-route-secret"


@pytest.fixture
async def signing_plane(tmp_path: Path) -> AsyncIterator[Plane]:
    """A Plane whose orchestrator each test starts itself, with its signing settings."""
    plane = Plane(tmp_path / "do.db")
    yield plane
    await plane.close()


@pytest.fixture
def secret_file(tmp_path: Path) -> str:
    path = tmp_path / "secret"
    path.write_bytes(SECRET + b"\n")
    return str(path)


def x_field(x: int, tag: bytes) -> bytes:
    return x.to_bytes((x.bit_length() + 7) // 8, "big") + tag


# -- dcp.auth ------------------------------------------------------------------------------


@given(st.text(min_size=1, max_size=40), st.integers(1, 2**600), st.integers(0, 2**32 - 1))
def test_a_genuine_tag_passes_and_any_change_is_a_forgery(topic: str, x: int, epoch: int) -> None:
    now = 1_800_000_000
    tag = RouteSigner(SECRET).sign(topic, x, epoch, now + 60)
    assert len(tag) == ROUTE_TAG_SIZE
    x_len = (x.bit_length() + 7) // 8
    check = RouteVerifier(SECRET).check
    assert check(x_field(x, tag), x_len, topic.encode(), now) is None
    assert check(x_field(x ^ 1, tag), (x ^ 1).bit_length() // 8 + 1 if x ^ 1 else 0, topic.encode(), now) == "route_forged"
    assert check(x_field(x, tag), x_len, topic.encode() + b"!", now) == "route_forged"
    for i in range(ROUTE_TAG_SIZE):  # epoch, expiry and MAC bytes
        altered = bytearray(tag)
        altered[i] ^= 0x40
        assert check(x_field(x, bytes(altered)), x_len, topic.encode(), now) == "route_forged"
    assert RouteVerifier(SECRET + b"?").check(x_field(x, tag), x_len, topic.encode(), now) == "route_forged"


def test_a_tag_expires_and_the_verifier_remembers_boundedly() -> None:
    signer, verifier = RouteSigner(SECRET), RouteVerifier(SECRET, cache_size=8)
    tags = [signer.sign("t", 5, 1, 1000 + i) for i in range(20)]
    for i, tag in enumerate(tags):
        assert verifier.check(b"\x05" + tag, 1, b"t", 999) is None
        assert verifier.check(b"\x05" + tag, 1, b"t", 1000 + i) == "route_expired"  # remembered, still expires
        assert len(verifier._genuine) <= 8


def test_a_short_secret_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "s").write_bytes(b"short")
    with pytest.raises(dcp.ConfigError, match="at least 16 are needed"):
        load_secret(tmp_path / "s")
    with pytest.raises(dcp.ConfigError, match="cannot read"):
        load_secret(tmp_path / "missing")


# -- the codec ------------------------------------------------------------------------------


@given(st.integers(0, 2**700), st.binary(min_size=ROUTE_TAG_SIZE, max_size=ROUTE_TAG_SIZE), st.binary(max_size=100))
def test_a_signed_frame_decodes_to_its_x_and_the_tag_stays_out_of_the_route(x: int, tag: bytes, payload: bytes) -> None:
    frames = Decoder().feed(encode_data("t", payload, x, tag=tag) + encode_data("t", payload, x))
    signed, plain = frames
    assert isinstance(signed, DataFrame) and isinstance(plain, DataFrame)
    assert (signed.route, signed.payload, signed.flags & SIGNED_ROUTE) == (x, payload, SIGNED_ROUTE)
    assert (plain.route, plain.flags & SIGNED_ROUTE) == (x, 0)


def test_a_signed_frame_shorter_than_its_tag_is_skipped_and_the_stream_goes_on() -> None:
    bad = bytearray(encode_data("t", b"p", 7))
    bad[2] |= SIGNED_ROUTE
    events = Decoder().feed(bytes(bad) + encode_data("t", b"next", 7))
    assert isinstance(events[0], Rejected) and "shorter than its tag" in str(events[0].error)
    assert isinstance(events[1], DataFrame) and events[1].payload == b"next"


# -- a verifying broker --------------------------------------------------------------------


async def test_a_verifying_broker_forwards_genuine_numbers_only(make_broker, secret_file: str) -> None:  # type: ignore[no-untyped-def]
    broker: Broker = await make_broker(verify_routes=True, secret_file=secret_file)
    signer = RouteSigner(SECRET)
    async with dcp.connect(url_of(broker), name="pub") as pub, dcp.connect(url_of(broker), name="sub") as sub, \
            dcp.connect(url_of(broker), name="other") as other:
        x = encode({broker.key: 1 << sub.port})
        both = encode({broker.key: 1 << sub.port | 1 << other.port})
        later = int(time.time()) + 60
        tag = signer.sign("t", x, 1, later)
        await pub.publish("t", b"unsigned", route=x)
        await pub.publish("t", b"stretched", route=both, tag=tag)  # X changed to reach other too
        await pub.publish("u", b"other topic", route=x, tag=tag)
        await pub.publish("t", b"expired", route=x, tag=signer.sign("t", x, 1, int(time.time()) - 1))
        await pub.publish("t", b"genuine", route=x, tag=tag)
        msg = await sub.next_message(timeout=10)
        assert (msg.payload, msg.route) == (b"genuine", x)
        await until(lambda: broker.drops["route_expired"] == 1, "the expired frame counted")
        assert {k: broker.drops[k] for k in ("route_unsigned", "route_forged", "route_expired")} == {
            "route_unsigned": 1, "route_forged": 2, "route_expired": 1,
        }
        await until(lambda: pub.last_error is not None, "an error frame to the publisher")
        assert pub.last_error is not None and pub.last_error["code"] in ("route_unsigned", "route_forged", "route_expired")
        assert (sub.pending, other.pending) == (0, 0)
        for i in range(1000):  # the hot path: one verification, then the remembered tag
            await pub.publish("t", b"%d" % i, route=x, tag=tag)
        got = [(await sub.next_message(timeout=10)).payload for _ in range(1000)]
        assert got == [b"%d" % i for i in range(1000)]
        assert other.pending == 0


def test_verify_routes_needs_a_secret_and_stateless_mode(secret_file: str) -> None:
    with pytest.raises(dcp.ConfigError, match="secret_file"):
        BrokerConfig(verify_routes=True)
    with pytest.raises(dcp.ConfigError, match="stateless"):
        BrokerConfig(verify_routes=True, secret_file=secret_file, mode="stateful")


# -- a plane whose orchestrator signs -------------------------------------------------------------


async def test_signed_numbers_flow_across_verifying_brokers_and_a_forged_one_reaches_nobody(
    signing_plane: Plane, secret_file: str
) -> None:
    plane = signing_plane
    await plane.start_do(secret_file=secret_file, route_ttl_s=3600)
    brokers = await plane.start_brokers(2, verify_routes=True, secret_file=secret_file)
    got: list[bytes] = []
    producer = plane.agent("producer", 0)
    consumer = plane.agent("consumer", 1)
    outsider = plane.agent("outsider", 1)
    stolen: list[bytes] = []

    @consumer.consume("t")
    async def take(msg: dcp.Message) -> None:
        got.append(bytes(msg.payload))

    @outsider.consume("private")
    async def steal(msg: dcp.Message) -> None:
        stolen.append(bytes(msg.payload))

    await producer.declare_produces("t")
    for agent in (consumer, outsider, producer):
        await agent.start()
    await producer.wait_route("t")
    assert len(producer.route_tags["t"]) == ROUTE_TAG_SIZE
    for i in range(20):
        assert await producer.publish("t", b"%d" % i)
    await until(lambda: len(got) == 20, "20 frames over two verifying brokers")
    assert got == [b"%d" % i for i in range(20)]
    # The producer forges X to reach the outsider's port too, keeping its genuine tag.
    assert producer.broker is not None and outsider.broker is not None
    (link_port,) = brokers[0].links
    forged = encode({brokers[0].key: 1 << link_port, brokers[1].key: 1 << outsider.broker.port})
    await producer.broker.publish("private", b"forged", route=forged, tag=producer.route_tags["t"])
    await producer.broker.publish("private", b"unsigned", route=forged)
    await until(lambda: brokers[0].drops["route_forged"] + brokers[0].drops["route_unsigned"] == 2, "both refused at b0")
    assert await producer.publish("t", b"after")
    await until(lambda: got[-1:] == [b"after"], "genuine frames still flow")
    assert stolen == [] and brokers[1].drops["route_forged"] == 0


async def test_the_orchestrator_resigns_before_a_tag_expires(signing_plane: Plane, secret_file: str) -> None:
    plane = signing_plane
    await plane.start_do(secret_file=secret_file, route_ttl_s=2)
    await plane.start_brokers(1, verify_routes=True, secret_file=secret_file)
    producer, consumer = plane.agent("producer", 0), plane.agent("consumer", 0)
    got: list[bytes] = []

    @consumer.consume("t")
    async def take(msg: dcp.Message) -> None:
        got.append(bytes(msg.payload))

    await producer.declare_produces("t")
    for agent in (consumer, producer):
        await agent.start()
    await producer.wait_route("t")
    first: Any = producer.route_tags["t"]
    await until(lambda: producer.route_tags["t"] != first, "a fresh tag before the first expires", timeout=5)
    fresh = producer.route_tags["t"]
    assert fresh[:4] == first[:4] and int.from_bytes(fresh[4:8], "big") > int.from_bytes(first[4:8], "big")
    assert await producer.publish("t", b"still valid")
    await until(lambda: got == [b"still valid"], "delivery with the fresh tag")
