"""Signed topology numbers: the orchestrator's route tags and ``--verify-routes``.

Pure checks of :mod:`dcp.auth` and of the codec's SIGNED_ROUTE field; brokers that
verify (unsigned, forged, expired and stale numbers are dropped, counted and reported
to their sender, while genuine traffic flows); and a whole plane where the orchestrator
signs and a publisher that forges X reaches nobody.  Tags are bound to their producer
and its broker: a consumer that copies the X field of a frame it received cannot
publish with it, and a producer cannot go back to an older epoch.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

import dcp
from dcp.auth import RouteSigner, RouteVerifier, issue_token, load_secret
from dcp.broker import Broker
from dcp.errors import AuthError
from dcp.config import BrokerConfig
from dcp.routing import encode
from dcp.wire import DATA, HEADER, HEADER_SIZE, ROUTE_TAG_SIZE, SIGNED_ROUTE, DataFrame, Decoder, Rejected, encode_control, encode_data

from .conftest import url_of
from .test_orchestrator import Plane
from .waiting import until

SECRET = b"0123456789abcdef-route-secret"
KEY = 1_000_003  # the root key of the broker the tags of the pure checks are for


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


def with_token(plane: Plane, name: str, broker: int) -> dcp.DataAgent:
    """An agent of ``plane`` with a token of its name (an orchestrator with a secret needs one)."""
    return plane.agent(name, broker, token=issue_token(SECRET, name, "agent", int(time.time()) + 3600))


def keep(agent: dcp.DataAgent, topic: str) -> list[bytes]:
    """Make ``agent`` consume ``topic``; the payloads it gets go to the list returned."""
    got: list[bytes] = []

    @agent.consume(topic)
    async def take(msg: dcp.Message) -> None:
        got.append(bytes(msg.payload))

    return got


def expiry(tag: bytes) -> int:
    """The expiry a route tag carries (after its epoch)."""
    return int.from_bytes(tag[4:8], "big")


def x_len(x: int) -> int:
    """The bytes of X in the X field (none for 0)."""
    return (x.bit_length() + 7) // 8


def x_field(x: int, tag: bytes) -> bytes:
    return x.to_bytes(x_len(x), "big") + tag


# -- dcp.auth ------------------------------------------------------------------------------


def sign(topic: str, x: int, epoch: int, expires: int, producer: str = "cam", broker_key: int = KEY) -> bytes:
    return RouteSigner(SECRET).sign(topic, x, epoch, expires, producer=producer, broker_key=broker_key)


@given(st.text(min_size=1, max_size=40), st.integers(1, 2**600), st.integers(0, 2**32 - 1))
@example("t", 0xFF, 1)  # X ^ 1 = 0xFE: a bit length that is a multiple of 8
@example("t", 1, 1)  # X ^ 1 = 0: no X bytes at all
def test_a_genuine_tag_passes_and_any_change_is_a_forgery(topic: str, x: int, epoch: int) -> None:
    now = 1_800_000_000
    tag = sign(topic, x, epoch, now + 60)
    assert len(tag) == ROUTE_TAG_SIZE
    check = RouteVerifier(SECRET, KEY).bind("cam").check
    assert check(x_field(x, tag), x_len(x), topic.encode(), now) is None
    # X ^ 1 in a field laid out exactly like a genuine one: with its own tag it passes,
    # so with X's tag it is refused for its MAC, not for a misread field.
    assert check(x_field(x ^ 1, sign(topic, x ^ 1, epoch, now + 60)), x_len(x ^ 1), topic.encode(), now) is None
    assert check(x_field(x ^ 1, tag), x_len(x ^ 1), topic.encode(), now) == "route_forged"
    assert check(x_field(x, tag), x_len(x), topic.encode() + b"!", now) == "route_forged"
    for i in range(ROUTE_TAG_SIZE):  # epoch, expiry and MAC bytes
        altered = bytearray(tag)
        altered[i] ^= 0x40
        assert check(x_field(x, bytes(altered)), x_len(x), topic.encode(), now) == "route_forged"
    assert RouteVerifier(SECRET + b"?", KEY).bind("cam").check(x_field(x, tag), x_len(x), topic.encode(), now) == "route_forged"
    # Another publisher, or the producer on another broker: the same bytes are no tag of theirs.
    assert RouteVerifier(SECRET, KEY).bind("spy").check(x_field(x, tag), x_len(x), topic.encode(), now) == "route_forged"
    assert RouteVerifier(SECRET, KEY + 2).bind("cam").check(x_field(x, tag), x_len(x), topic.encode(), now) == "route_forged"


def test_a_tag_does_not_verify_with_the_topic_producer_boundary_shifted() -> None:
    """The MAC covers each of topic, producer and broker key after its length: without the
    lengths, the tag of topic "ab" for producer "cx" would also sign topic "abc" for "x"."""
    now, expires = 1_000_000_000, 1_800_000_000
    tag = sign("ab", 5, 1, expires, producer="cx")
    verifier = RouteVerifier(SECRET, KEY)
    assert verifier.check(b"\x05" + tag, 1, b"ab", now, producer="cx") is None
    assert verifier.check(b"\x05" + tag, 1, b"abc", now, producer="x") == "route_forged"
    assert verifier.check(b"\x05" + tag, 1, b"a", now, producer="bcx") == "route_forged"


def test_a_tag_expires_and_the_verifier_remembers_boundedly() -> None:
    verifier = RouteVerifier(SECRET, KEY, cache_size=8)
    check = verifier.bind("cam").check
    tags = [sign("t", 5, 1, 1000 + i) for i in range(20)]
    for i, tag in enumerate(tags):
        assert check(b"\x05" + tag, 1, b"t", 999) is None
        assert check(b"\x05" + tag, 1, b"t", 1000 + i) == "route_expired"  # remembered, still expires
        assert len(verifier._genuine) <= 8 and len(verifier._latest) <= 8
    for i in range(20):  # as many streams: the newest epochs are forgotten, boundedly, with the tags
        assert verifier.check(b"\x05" + sign(f"t{i}", 5, 1, 1000), 1, f"t{i}".encode(), 999, producer="cam") is None
        assert len(verifier._genuine) <= 8 and len(verifier._latest) <= 8


def test_a_tag_remembered_for_one_producer_is_not_taken_from_another() -> None:
    """The memo is keyed by the connection's name too: one HMAC per (producer, route)."""
    verifier = RouteVerifier(SECRET, KEY)
    field = b"\x05" + sign("t", 5, 1, 2000)
    assert verifier.bind("cam").check(field, 1, b"t", 999) is None
    assert verifier.bind("cam").check(field, 1, b"t", 999) is None  # remembered
    assert verifier.bind("spy").check(field, 1, b"t", 999) == "route_forged"
    assert verifier.bind("").check(field, 1, b"t", 999) == "route_forged"
    assert list(verifier._genuine) == [("cam", field, b"t")]


def test_an_older_epoch_is_stale_once_a_newer_one_was_verified() -> None:
    verifier = RouteVerifier(SECRET, KEY)
    check = verifier.bind("cam").check
    old, new = b"\x05" + sign("t", 5, 7, 2000), b"\x06" + sign("t", 6, 8, 2000)
    assert check(old, 1, b"t", 999) is None  # epoch 7: the newest so far
    assert check(new, 1, b"t", 999) is None  # epoch 8 (a new X) replaces it
    assert check(old, 1, b"t", 999) == "route_stale"  # remembered, and now stale
    assert RouteVerifier(SECRET, KEY).bind("cam").check(new, 1, b"t", 999) is None
    # Re-signed (same epoch, later expiry): still the newest.  Other topics and producers: their own.
    assert check(b"\x06" + sign("t", 6, 8, 3000), 1, b"t", 999) is None
    assert check(b"\x05" + sign("u", 5, 1, 2000), 1, b"u", 999) is None
    assert verifier.bind("other").check(b"\x05" + sign("t", 5, 1, 2000, producer="other"), 1, b"t", 999) is None
    # A stale tag never seen before is refused as well, on its first frame.
    assert check(b"\x05" + sign("t", 5, 3, 2000), 1, b"t", 999) == "route_stale"
    # Once every tag of the newest epoch has expired (an orchestrator that lost its state
    # starts again at 1), an older epoch is taken, and is the newest from then on.
    assert check(new, 1, b"t", 3000) == "route_expired"
    fresh = b"\x05" + sign("t", 5, 1, 9000)
    assert check(fresh, 1, b"t", 3000) is None
    assert check(b"\x05" + sign("t", 5, 0, 9000), 1, b"t", 3000) == "route_stale"


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
    async with dcp.connect(url_of(broker), name="pub") as pub, dcp.connect(url_of(broker), name="sub") as sub, \
            dcp.connect(url_of(broker), name="other") as other:
        x = encode({broker.key: 1 << sub.port})
        both = encode({broker.key: 1 << sub.port | 1 << other.port})
        later = int(time.time()) + 60
        tag = sign("t", x, 1, later, producer="pub", broker_key=broker.key)
        await publish_unchecked(broker, "pub", "t", b"unsigned", x)  # the SDK refuses to (see below)
        await pub.publish("t", b"stretched", route=both, tag=tag)  # X changed to reach other too
        await pub.publish("u", b"other topic", route=x, tag=tag)
        await pub.publish("t", b"another broker's", route=x, tag=sign("t", x, 1, later, producer="pub", broker_key=broker.key + 2))
        await pub.publish("t", b"expired", route=x, tag=sign("t", x, 1, int(time.time()) - 1, producer="pub", broker_key=broker.key))
        await pub.publish("t", b"genuine", route=x, tag=tag)
        await other.publish("t", b"copied", route=x, tag=tag)  # the tag is pub's, not other's
        await pub.publish("t", b"stale", route=x, tag=sign("t", x, 0, later, producer="pub", broker_key=broker.key))
        msg = await sub.next_message(timeout=10)
        assert (msg.payload, msg.route) == (b"genuine", x)
        await until(lambda: broker.drops["route_stale"] == 1 and broker.drops["route_forged"] == 4, "the refused frames counted")
        assert {k: broker.drops[k] for k in ("route_unsigned", "route_forged", "route_expired", "route_stale")} == {
            "route_unsigned": 1, "route_forged": 4, "route_expired": 1, "route_stale": 1,
        }
        await until(lambda: pub.last_error is not None, "an error frame to the publisher")
        assert pub.last_error is not None and pub.last_error["code"] in ("route_unsigned", "route_forged", "route_expired", "route_stale")
        assert (sub.pending, other.pending) == (0, 0)
        for i in range(1000):  # the hot path: one verification, then the remembered tag
            await pub.publish("t", b"%d" % i, route=x, tag=tag)
        got = [(await sub.next_message(timeout=10)).payload for _ in range(1000)]
        assert got == [b"%d" % i for i in range(1000)]
        assert other.pending == 0


async def publish_unchecked(broker: Broker, name: str, topic: str, payload: bytes, x: int) -> None:
    """What a client that does not check the welcome can do: an untagged frame, written by hand."""
    reader, writer = await asyncio.open_connection(*broker.address)
    writer.write(encode_control({"op": "hello", "id": 1, "name": name}) + encode_data(topic, payload, x))
    await writer.drain()
    writer.close()
    await writer.wait_closed()


async def test_an_sdk_publish_without_a_tag_to_a_verifying_broker_fails_naming_the_broker(make_broker, secret_file: str) -> None:  # type: ignore[no-untyped-def]
    """The broker would drop it and say so only in the logs: the welcome says it verifies
    routes, so publish() refuses at once, and nothing goes out."""
    verifying: Broker = await make_broker(verify_routes=True, secret_file=secret_file)
    plain: Broker = await make_broker(secret_file=secret_file)
    async with dcp.connect(url_of(verifying), name="pub") as pub, dcp.connect(url_of(verifying), name="sub") as sub:
        assert pub.broker_verifies_routes
        x = encode({verifying.key: 1 << sub.port})
        with pytest.raises(AuthError) as refused:
            await pub.publish("t", b"untagged", route=x)
        assert refused.value.code == "route_unsigned"
        assert url_of(verifying) in str(refused.value) and "tag=" in str(refused.value)
        await pub.ping()  # answered once the broker has read all pub sent: nothing
        assert (pub.published, verifying.frames_in, verifying.drops["route_unsigned"]) == (0, 0, 0)
        await pub.publish("t", b"tagged", route=x, tag=sign("t", x, 1, int(time.time()) + 60, producer="pub", broker_key=verifying.key))
        assert (await sub.next_message(timeout=10)).payload == b"tagged"
    async with dcp.connect(url_of(plain), name="pub") as pub, dcp.connect(url_of(plain), name="sub") as sub:
        assert not pub.broker_verifies_routes
        await pub.publish("t", b"untagged", route=encode({plain.key: 1 << sub.port}))
        assert (await sub.next_message(timeout=10)).payload == b"untagged"


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
    producer = with_token(plane, "producer", 0)
    consumer = with_token(plane, "consumer", 1)
    outsider = with_token(plane, "outsider", 1)
    got = keep(consumer, "t")
    stolen = keep(outsider, "private")

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
    await publish_unchecked(brokers[0], "producer", "private", b"unsigned", forged)
    await until(lambda: brokers[0].drops["route_forged"] + brokers[0].drops["route_unsigned"] == 2, "both refused at b0")
    assert await producer.publish("t", b"after")
    await until(lambda: got[-1:] == [b"after"], "genuine frames still flow")
    assert stolen == [] and brokers[1].drops["route_forged"] == 0
    assert brokers[1].verifier is not None and brokers[1].verifier._genuine == {}  # what the link brought was not checked again


async def test_the_orchestrator_resigns_before_a_tag_expires(signing_plane: Plane, secret_file: str) -> None:
    plane, ttl = signing_plane, 2
    await plane.start_do(secret_file=secret_file, route_ttl_s=ttl)
    (verifier,) = await plane.start_brokers(1, verify_routes=True, secret_file=secret_file)
    producer, consumer = with_token(plane, "producer", 0), with_token(plane, "consumer", 0)
    got = keep(consumer, "t")
    await producer.declare_produces("t")
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


# -- the replay of a received X field ---------------------------------------------------------


class Tap:
    """A decoder that keeps the bytes the socket reads into it."""

    def __init__(self, decoder: Decoder, reads: list[bytes]) -> None:
        self.decoder, self.reads = decoder, reads
        self.lent = memoryview(b"")

    def get_buffer(self) -> memoryview:
        self.lent = self.decoder.get_buffer()
        return self.lent

    def buffer_updated(self, nbytes: int) -> list[object]:
        self.reads.append(self.lent[:nbytes].tobytes())
        return self.decoder.buffer_updated(nbytes)  # type: ignore[return-value]


def x_fields(reads: list[bytes], topic: bytes) -> list[bytes]:
    """The X fields (X, then its tag) of the signed data frames of ``topic`` in ``reads``,
    read from the bytes as they came, as a consumer that wants to replay them would."""
    data, pos, found = b"".join(reads), 0, []
    while pos + HEADER_SIZE <= len(data):
        _, ftype, flags, _, x_len, topic_len, payload_len, _, _ = HEADER.unpack_from(data, pos)
        body = pos + HEADER_SIZE
        if ftype == DATA and flags & SIGNED_ROUTE and data[body + x_len : body + x_len + topic_len] == topic:
            found.append(data[body : body + x_len])
        pos = body + x_len + topic_len + payload_len
    return found


async def test_a_consumer_that_copies_a_received_x_field_cannot_publish_with_it_nor_a_producer_an_older_epoch(
    signing_plane: Plane, secret_file: str, tmp_path: Path
) -> None:
    """The probe of the review, with tokens everywhere: ``spy`` consumes ``video`` next to
    its producer and may not publish it; it copies the X field, tag included, of a frame
    it received and publishes frames of its own with it.  Its broker refuses them (the tag
    names ``camera``), counted, and no consumer gets one.  The camera's frames still reach
    every consumer, across the link unchecked; and once its route has a newer epoch, the
    camera cannot go back to the older X (``route_stale``)."""
    policy = tmp_path / "policy.toml"
    policy.write_text('default = "allow"\n\n[[rule]]\nagent = "spy"\naction = "deny"\npublish = ["video"]\n')
    plane = signing_plane
    guarded: dict[str, Any] = {"secret_file": secret_file, "require_token": True}
    await plane.start_do(route_ttl_s=3600, policy_file=str(policy), **guarded)
    b0, b1 = await plane.start_brokers(2, verify_routes=True, **guarded)
    camera, spy, near, far = (with_token(plane, name, at) for name, at in (("camera", 0), ("spy", 0), ("near", 0), ("far", 1)))
    got = {name: keep(consumer, "video") for name, consumer in (("spy", spy), ("near", near), ("far", far))}
    await camera.declare_produces("video")
    await spy.declare_produces("video")  # the policy refuses it a route
    for each in (spy, near, far, camera):
        await each.start()
    await camera.wait_route("video")
    await until(lambda: sorted(camera.consumers["video"]) == ["far", "near", "spy"], "the route to the three consumers")
    await until(lambda: "video" in spy.routes, "the spy's refused route")
    assert spy.routes["video"][1] == 0 and await spy.publish("video", b"refused") is False

    # The spy reads the bytes its broker sends it.
    assert spy.broker is not None and spy.broker._protocol is not None
    reads: list[bytes] = []
    spy.broker._protocol.decoder = Tap(spy.broker._protocol.decoder, reads)  # type: ignore[assignment]
    assert await camera.publish("video", b"frame 0")
    await until(lambda: all(frames == [b"frame 0"] for frames in got.values()), "frame 0 at every consumer")
    (copied,) = x_fields(reads, b"video")
    epoch, x = camera.routes["video"]
    old_tag = camera.route_tags["video"]
    assert copied == x.to_bytes((x.bit_length() + 7) // 8, "big") + old_tag  # the camera's X field, tag included

    # The spy publishes 5 frames of its own with that X field, byte for byte.
    copied_x, copied_tag = int.from_bytes(copied[:-ROUTE_TAG_SIZE], "big"), copied[-ROUTE_TAG_SIZE:]
    spoofed = encode_data("video", b"spoofed", copied_x, tag=copied_tag)
    assert spoofed[HEADER_SIZE : HEADER_SIZE + len(copied)] == copied
    for i in range(5):
        await spy.broker.publish("video", b"spoofed %d" % i, route=copied_x, tag=copied_tag)
    await spy.broker.ping()  # answered once b0 has read them
    assert b0.drops["route_forged"] == 5
    await until(lambda: spy.broker is not None and spy.broker.last_error is not None, "an error frame to the spy")
    assert spy.broker.last_error is not None and spy.broker.last_error["code"] == "route_forged"

    # The camera's frames still reach everyone; the spy's reached no one.
    assert await camera.publish("video", b"frame 1")
    await until(lambda: all(frames[-1:] == [b"frame 1"] for frames in got.values()), "frame 1 at every consumer")
    assert got == {name: [b"frame 0", b"frame 1"] for name in got}

    # A consumer joins: the camera's route gets a newer epoch (and X).  The camera then
    # replays its older X field: stale at b0, while the newest one goes on flowing.
    late = with_token(plane, "late", 1)
    got["late"] = keep(late, "video")
    await late.start()
    await until(lambda: camera.routes["video"][0] > epoch and "late" in camera.consumers["video"], "the newer epoch")
    assert camera.routes["video"][1] != x
    assert await camera.publish("video", b"frame 2")
    await until(lambda: all(frames[-1:] == [b"frame 2"] for frames in got.values()), "frame 2 at every consumer")
    assert camera.broker is not None
    for i in range(3):
        await camera.broker.publish("video", b"replayed %d" % i, route=x, tag=old_tag)
    await camera.broker.ping()
    assert b0.drops["route_stale"] == 3
    assert await camera.publish("video", b"frame 3")
    await until(lambda: all(frames[-1:] == [b"frame 3"] for frames in got.values()), "frame 3 at every consumer")
    assert {name: frames[-2:] for name, frames in got.items()} == {name: [b"frame 2", b"frame 3"] for name in got}
    assert not any(payload.startswith((b"spoofed", b"replayed")) for frames in got.values() for payload in frames)

    # Frames that crossed the link were not checked again at b1: nothing verified there, nothing dropped.
    assert b1.verifier is not None and b1.verifier._genuine == {}
    assert all(b1.drops[reason] == 0 for reason in ("route_unsigned", "route_forged", "route_expired", "route_stale"))
    assert b0.drops["route_unsigned"] == b0.drops["route_expired"] == 0
