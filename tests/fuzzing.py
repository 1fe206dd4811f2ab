"""What the fuzz tests share: how many inputs they run, how they count them, and how
they make hostile byte streams.

Scaling: every fuzz test (marked ``@pytest.mark.fuzz``) takes its number of inputs
from :func:`fuzz_settings` (hypothesis tests) or :func:`fuzz_inputs` (loops of their
own).  Unset, ``DCP_FUZZ_EXAMPLES`` leaves each test its small default, so the normal
suite stays fast; ``DCP_FUZZ_EXAMPLES=100000`` gives each fuzz test 100k inputs::

    DCP_FUZZ_EXAMPLES=100000 .venv/bin/python -m pytest -q -p no:cacheprovider -m fuzz

Every input a fuzz test really runs is counted in :data:`executed`, by family;
``conftest.py`` prints the counts at the end of the session.

Hostile streams are valid streams (:func:`hostile_stream`) put through
:func:`apply_mutations`, both driven by a ``random.Random``: seeded by hypothesis in
the in-process tests (which then shrink the mutations and the reads), by the test
itself over live sockets, so both fuzz the same shapes.
"""

from __future__ import annotations

import os
import random
import struct
from collections import Counter
from collections.abc import Sequence
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from dcp.wire import HEADER, HEADER_SIZE, VERSION, Limits, encode_control, encode_data

#: Inputs per fuzz test; 0: each test's own default.
SCALE = int(os.environ.get("DCP_FUZZ_EXAMPLES") or 0)

settings.register_profile(
    "dcp-fuzz",
    # Long runs meet GC pauses and slow inputs on purpose: no deadline, no speed checks.
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example,
                           # caplog, to keep the broker's warnings from piling up (see test_broker_protocol)
                           HealthCheck.function_scoped_fixture],
)

#: Inputs executed, by fuzz family ("decoder", "broker framing", "live socket").
executed: Counter[str] = Counter()


def fuzz_settings(default: int) -> settings:
    """Hypothesis settings of a fuzz test: ``default`` examples, or ``DCP_FUZZ_EXAMPLES``."""
    return settings(settings.get_profile("dcp-fuzz"), max_examples=SCALE or default)


def fuzz_inputs(default: int) -> int:
    """How many inputs a fuzz test with a loop of its own runs."""
    return SCALE or default


# --------------------------------------------------------------------------- framing

def frame_starts(stream: bytes | bytearray) -> list[int]:
    """Where the frames of ``stream`` start, as far as its headers delimit it."""
    starts, pos = [], 0
    while pos + HEADER_SIZE <= len(stream):
        starts.append(pos)
        pos += HEADER_SIZE + sum(struct.unpack_from("!HHI", stream, pos + 4))
    return starts


def split(data: bytes, cuts: Sequence[int]) -> list[bytes]:
    """``data`` cut at ``cuts`` (clamped, in any order) into non-empty reads."""
    points = sorted({min(max(c, 0), len(data)) for c in cuts})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:]) if b > a]


def split_frames(stream: bytes | bytearray) -> list[bytes]:
    """The whole frames of a well-delimited stream (what a broker writes to a port)."""
    ends = [*frame_starts(stream)[1:], len(stream)]
    return [bytes(stream[a:b]) for a, b in zip(frame_starts(stream), ends)]


# --------------------------------------------------------------------------- mutations

#: flip a bit, set a byte, insert a byte, delete a byte; set a byte of a frame's length
#: fields; move the boundary between a frame's X and its topic (same frame length).
MUTATIONS = ("flip", "set", "insert", "delete", "length", "shift")



def mutations(ops: Sequence[str] = MUTATIONS, min_size: int = 0, max_size: int = 6) -> st.SearchStrategy[list[tuple[str, int, int]]]:
    """Lists of (op, where, value) for :func:`apply_mutations`."""
    return st.lists(st.tuples(st.sampled_from(ops), st.integers(0, 10**6), st.integers(0, 255)), min_size=min_size, max_size=max_size)


def random_mutations(rng: random.Random) -> list[tuple[str, int, int]]:
    return [(rng.choice(MUTATIONS), rng.randrange(10**6), rng.randrange(256)) for _ in range(rng.randint(1, 6))]


def apply_mutations(data: bytes, ops: Sequence[tuple[str, int, int]]) -> bytes:
    stream = bytearray(data)
    for op, pos, value in ops:
        if not stream:
            stream.append(value)
            continue
        if op in ("length", "shift"):
            starts = frame_starts(stream)
            if starts:
                start = starts[pos % len(starts)]
                if op == "length":
                    stream[start + 4 + pos // len(starts) % 8] = value
                    continue
                x_len, topic_len = struct.unpack_from("!HH", stream, start + 4)
                shift = max(-x_len, topic_len - 0xFFFF, min(topic_len, 0xFFFF - x_len, value % 5 - 2))
                struct.pack_into("!HH", stream, start + 4, x_len + shift, topic_len - shift)
                continue
            op = "set"
        pos %= len(stream)
        if op == "flip":
            stream[pos] ^= 1 << (value % 8)
        elif op == "set":
            stream[pos] = value
        elif op == "insert":
            stream.insert(pos, value)
        else:
            del stream[pos]
    return bytes(stream)


# --------------------------------------------------------------------------- hostile streams

#: Topics of hostile frames.  A stream repeats its X and topic, and the codec and the
#: broker take shortcuts when they do, so few topics and routes: many repeats.
HOSTILE_TOPICS = ("t", "fuzz", "a/b", "é", "")
#: The topic of the well-behaved pair: no hostile template uses it.
PAIR_TOPIC = "pair/seq"
#: A prime over 2**64: the key of a 64-port broker, that fresh brokers need not look for.
KEY = 18446744073709551629
PORTS = 64
#: The bit of the port that the in-process tests' subscriber is on (port 1).
SUB_BIT = 1 << 1
#: Encodes what the broker's default limits refuse (X up to 65535 bytes).
WIDE = Limits(max_x_bits=0xFFFF * 8)

HELLOS = (
    {"op": "hello", "id": 1},
    {"op": "hello", "id": 2, "name": "fuzz", "slow_consumer": "drop-oldest"},
    {"op": "hello", "id": 3, "role": "admin"},
    {"op": "ping", "id": 4},  # no hello: data that follows is refused
)
CONTROLS = (
    {"op": "ping", "id": 5},
    {"op": "hello", "id": 6},
    {"op": "policy", "id": 7, "slow_consumer": "pause"},
    {"op": "policy", "id": 8, "slow_consumer": ["not", "a", "policy"]},
    {"op": "subscribe", "id": 9, "topic": "t"},
    {"op": "unsubscribe", "id": 10, "topic": "t"},
    {"op": "unlink", "id": 11, "port": 3},
    {"op": "no-such-op", "id": 12},
)


def hostile_stream(
    rng: random.Random,
    sub_bit: int,
    key: int,
    sizes: Sequence[int] = (0, 1, 10, 100, 1000),
    controls: Sequence[dict[str, Any]] = CONTROLS,
) -> bytes:
    """An opening control frame, then up to 8 frames a broker must forward, drop or
    answer: data frames (some with hop limit 0, some with X over ``max_x_bits``, half of
    them with the topic, route and flags of the data frame before), frames with no UTF-8
    topic or of no known type, control frames.

    ``sub_bit`` is the bit of a port the routes may name, ``key`` the broker's key.
    """
    routes = (0, sub_bit, sub_bit | 1, key + sub_bit, (1 << 64) - 1, (1 << 8192) - 1, 1 << 8192, 5, 0x561)
    choice = rng.choice
    parts = [encode_control(choice(HELLOS))]
    last = None  # (topic, route, flags) of the last data frame: the decoder's and the broker's repeat shortcuts
    for _ in range(rng.randint(1, 8)):
        kind = choice(("data", "data", "data", "control", "bad topic", "unknown type"))
        if kind == "control":
            parts.append(encode_control(choice(controls)))
            continue
        payload, msg_id, flags = rng.randbytes(choice(sizes)), rng.getrandbits(64), choice((0, 0, rng.getrandbits(8)))
        if kind == "data":
            topic, route, hops = choice(HOSTILE_TOPICS), choice(routes), choice((0, 1, 32))
            if last is not None and rng.random() < 0.5:
                topic, route, flags = last
            last = topic, route, flags
            # flags bit 0 (SIGNED_ROUTE) says a route tag follows X: mutations set it
            parts.append(encode_data(topic, payload, route, hops=hops, msg_id=msg_id, flags=flags & 0xFE, limits=WIDE))
        else:  # well delimited, but no UTF-8 topic / no known type: skipped, the stream goes on
            ftype, topic = (1, b"\xff\xfe") if kind == "bad topic" else (choice((0, 3, 255)), b"t")
            parts.append(HEADER.pack(VERSION, ftype, flags, 32, 1, len(topic), len(payload), msg_id, 0) + b"\x02" + topic + payload)
    return b"".join(parts)


#: Seeds of :func:`seeded_stream`.  Hypothesis draws a seed, not a stream: one draw per
#: stream, so 100k of them take minutes, not hours (it spends ~0.1 ms a draw), and what
#: it keeps of its last 10,000 examples is small (it holds on to what it drew).  What
#: shrinks is the mutations and the reads that come with them.
seeds = st.integers(0, 2**64 - 1)


def seeded_stream(seed: int, sub_bit: int = SUB_BIT, key: int = KEY, **options: Any) -> bytes:
    return hostile_stream(random.Random(seed), sub_bit, key, **options)


def random_input(rng: random.Random, sub_bit: int, key: int) -> bytes:
    """One live-socket input: random bytes (a third of them), else a mutated hostile stream."""
    if rng.random() < 1 / 3:
        return rng.randbytes(rng.randint(1, 300))
    return apply_mutations(hostile_stream(rng, sub_bit, key), random_mutations(rng))
