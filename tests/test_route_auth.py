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

import pytest
from hypothesis import example, given
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
    path.chmod(0o600)  # load_secret refuses a secret others may read
    return str(path)


def expiry(tag: bytes) -> int:
    """The expiry a route tag carries (after its epoch)."""
    return int.from_bytes(tag[4:8], "big")


def x_len(x: int) -> int:
    """The bytes of X in the X field (none for 0)."""
    return (x.bit_length() + 7) // 8


def x_field(x: int, tag: bytes) -> bytes:
    return x.to_bytes(x_len(x), "big") + tag


# -- dcp.auth ------------------------------------------------------------------------------


@given(st.text(min_size=1, max_size=40), st.integers(1, 2**600), st.integers(0, 2**32 - 1))
@example("t", 0xFF, 1)  # X ^ 1 = 0xFE: a bit length that is a multiple of 8
@example("t", 1, 1)  # X ^ 1 = 0: no X bytes at all
def test_a_genuine_tag_passes_and_any_change_is_a_forgery(topic: str, x: int, epoch: int) -> None:
    now = 1_800_000_000
    signer = RouteSigner(SECRET)
    tag = signer.sign(topic, x, epoch, now + 60)
    assert len(tag) == ROUTE_TAG_SIZE
    check = RouteVerifier(SECRET).check
    assert check(x_field(x, tag), x_len(x), topic.encode(), now) is None
    # X ^ 1 in a field laid out exactly like a genuine one: with its own tag it passes,
    # so with X's tag it is refused for its MAC, not for a misread field.
    assert check(x_field(x ^ 1, signer.sign(topic, x ^ 1, epoch, now + 60)), x_len(x ^ 1), topic.encode(), now) is None
    assert check(x_field(x ^ 1, tag), x_len(x ^ 1), topic.encode(), now) == "route_forged"
    assert check(x_field(x, tag), x_len(x), topic.encode() + b"!", now) == "route_forged"
    for i in range(ROUTE_TAG_SIZE):  # epoch, expiry and MAC bytes
        altered = bytearray(tag)
        altered[i] ^= 0x40
        assert check(x_field(x, bytes(altered)), x_len(x), topic.encode(), now) == "route_forged"
    assert RouteVerifier(SECRET + b"?").check(x_field(x, tag), x_len(x), topic.encode(), now) == "route_forged"


def test_a_tag_does_not_verify_with_the_topic_stamp_boundary_shifted() -> None:
    """The MAC covers len(topic), topic, stamp, X: without the length, the tag of "ab" would
    also sign "abc" with the stamp and X moved one byte along (the same bytes, cut elsewhere)."""
    now, expires = 1_000_000_000, 1_800_000_000
    x, epoch = 0x0102030405, 0x63000001  # the epoch's first byte is "c"
    tag = RouteSigner(SECRET).sign("ab", x, epoch, expires)
    stamp, mac = tag[:8], tag[8:]
    x_bytes = x.to_bytes(5, "big")
    assert RouteVerifier(SECRET).check(x_bytes + tag, 5, b"ab", now) is None
    topic2, stamp2, x2 = b"ab" + stamp[:1], stamp[1:] + x_bytes[:1], x_bytes[1:]
    assert (topic2, topic2 + stamp2 + x2) == (b"abc", b"ab" + stamp + x_bytes)
    assert RouteVerifier(SECRET).check(x2 + stamp2 + mac, 4, topic2, now) == "route_forged"


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
    plane, ttl = signing_plane, 2
    await plane.start_do(secret_file=secret_file, route_ttl_s=ttl)
    (verifier,) = await plane.start_brokers(1, verify_routes=True, secret_file=secret_file)
    producer, consumer, got = await plane.pair("t")
    for agent in (consumer, producer):
        await agent.start()
    await producer.wait_route("t")
    tags: list[bytes] = [producer.route_tags["t"]]
    sent = 0
    # Publish, one frame delivered at a time, until two TTLs after the first tag expired:
    # every frame carries the tag the producer has, which must never have expired.
    while time.time() < expiry(tags[0]) + 2 * ttl:
        assert await producer.publish("t", b"%d" % sent)
        sent += 1
        await until(lambda: len(got) == sent or verifier.drops["route_expired"], f"frame {sent} delivered or dropped")
        assert verifier.drops["route_expired"] == 0, f"frame {sent - 1} was sent with an expired tag"
        if producer.route_tags["t"] != tags[-1]:  # a fresh tag: here before the one it replaces expires
            late = time.time() - expiry(tags[-1])
            assert late < 0, f"the fresh tag arrived {late:.3f} s after the one it replaces expired"
            tags.append(producer.route_tags["t"])
    assert got == [b"%d" % i for i in range(sent)]
    assert len(tags) >= 4  # re-signed at least every TTL / 2 + TTL / 4
    for old, fresh in zip(tags, tags[1:]):
        assert fresh[:4] == old[:4] and expiry(fresh) > expiry(old)  # the same epoch, a later expiry
