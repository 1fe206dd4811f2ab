"""Shared work and requests, the producer's side (pure: no asyncio, no sockets).

Brokers stay stateless: for a stream whose consumers include share groups (the replicas
of an element, the offerers of a capability), the orchestrator hands the producer one
topology number per choice of one member in each group (:class:`Choices`), and the
producer picks one per frame: in turn, or by a key hashed onto the members
(rendezvous hashing, so a key keeps its member while the members stay, and only the
keys of a member that goes move).

A request is a frame on ``REQUESTS + capability`` whose payload starts with an
envelope (:func:`pack_request`): a correlation id and the number, tag and broker key of
the way back to the requester, which the orchestrator computed for the member the
frame goes to.  The member answers with a frame on :data:`REPLIES` carrying the same
correlation id (:func:`pack_reply`).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from hashlib import blake2b

from .errors import ConfigError, ProtocolError
from .patterns import validate_topic
from .routing import int_from_bytes, int_to_bytes

__all__ = [
    "REQUESTS", "REPLIES", "request_topic", "requestable", "Group", "Choices", "RequestEnvelope", "pack_request", "unpack_request",
    "pack_reply", "unpack_reply", "REPLY_OK", "REPLY_ERROR",
]

#: Topics of requests to a capability: ``REQUESTS + capability``; its offerers share them.
REQUESTS = "_req."
#: The topic of every reply (a reply reaches its requester by its number, not its topic).
REPLIES = "_reply"
REPLY_OK = 0
REPLY_ERROR = 1
_REQUEST = struct.Struct("!BQHHB")  # version, correlation id, reply X bytes, reply broker key bytes, tag bytes
_REPLY = struct.Struct("!BQB")  # version, correlation id, status
_VERSION = 1


def request_topic(capability: str) -> str:
    """The topic of requests to ``capability``.

    Raises:
        ConfigError: a capability name that cannot be part of a topic (a wildcard, an
            empty level).
    """
    topic = REQUESTS + capability
    try:
        validate_topic(topic)
    except ConfigError as exc:
        raise ConfigError(f"capability {capability!r} cannot be requested: {exc}") from None
    return topic


def requestable(capability: str) -> bool:
    try:
        request_topic(capability)
    except ConfigError:
        return False
    return True


@dataclass(frozen=True)
class Group:
    """One share group as the producer sees it: how it chooses, and among whom."""

    name: str
    mode: str  # "round_robin" or "key"
    members: tuple[str, ...]


class Choices:
    """The numbers of one stream with share groups, and the choice of one per frame.

    ``variants[i]`` reaches member ``i // stride_g % len(members_g)`` of each group
    ``g`` (the first group's stride is 1), and every consumer outside the groups.
    """

    __slots__ = ("groups", "variants", "_strides", "_turn")

    def __init__(self, groups: Sequence[Group], variants: Sequence[int]) -> None:
        strides = []
        size = 1
        for group in groups:
            if not group.members:
                raise ValueError(f"share group {group.name!r} has no member")
            strides.append(size)
            size *= len(group.members)
        if size != len(variants):
            raise ValueError(f"{len(variants)} numbers for {size} choices of members")
        self.groups = tuple(groups)
        self.variants = tuple(variants)
        self._strides = tuple(strides)
        self._turn = 0

    def pick(self, key: bytes | None = None) -> int:
        """The index of the number for the next frame: each group's member in turn, or,
        for a group that shares by key and a frame with one, the key's member."""
        turn = self._turn
        self._turn = turn + 1
        index = 0
        for group, stride in zip(self.groups, self._strides):
            if key is not None and group.mode == "key":
                member = _rendezvous(key, group.members)
            else:
                member = turn % len(group.members)
            index += member * stride
        return index

    def member(self, index: int, group: int = 0) -> str:
        """Which member of ``group`` the number ``index`` reaches."""
        members = self.groups[group].members
        return members[index // self._strides[group] % len(members)]


def _rendezvous(key: bytes, members: tuple[str, ...]) -> int:
    """The member with the highest hash of (key, member): stable while the members are."""
    best, chosen = -1, 0
    for i, member in enumerate(members):
        score = int.from_bytes(blake2b(key + b"\0" + member.encode(), digest_size=8).digest(), "big")
        if score > best:
            best, chosen = score, i
    return chosen


@dataclass(frozen=True)
class RequestEnvelope:
    """What a request carries besides its body: how to answer it."""

    correlation: int
    reply_x: int
    reply_broker_key: int
    reply_tag: bytes | None


def pack_request(envelope: RequestEnvelope) -> bytes:
    """The envelope that goes before a request's body."""
    x = int_to_bytes(envelope.reply_x)
    key = int_to_bytes(envelope.reply_broker_key)
    tag = envelope.reply_tag or b""
    return _REQUEST.pack(_VERSION, envelope.correlation, len(x), len(key), len(tag)) + x + key + tag


def unpack_request(payload: bytes | bytearray | memoryview) -> tuple[RequestEnvelope, memoryview]:
    """The envelope of a request and its body (a view, not a copy).

    Raises:
        ProtocolError: not a request envelope of this version.
    """
    view = memoryview(payload)
    if len(view) < _REQUEST.size:
        raise ProtocolError("a request shorter than its envelope")
    version, correlation, x_len, key_len, tag_len = _REQUEST.unpack_from(view)
    if version != _VERSION:
        raise ProtocolError(f"a request envelope of version {version}")
    end = _REQUEST.size + x_len + key_len + tag_len
    if len(view) < end:
        raise ProtocolError("a request shorter than its envelope says")
    at = _REQUEST.size
    x = int_from_bytes(bytes(view[at : at + x_len]))
    key = int_from_bytes(bytes(view[at + x_len : at + x_len + key_len]))
    tag = bytes(view[at + x_len + key_len : end]) or None
    return RequestEnvelope(correlation, x, key, tag), view[end:]


def pack_reply(correlation: int, status: int = REPLY_OK) -> bytes:
    """The envelope that goes before a reply's body."""
    return _REPLY.pack(_VERSION, correlation, status)


def unpack_reply(payload: bytes | bytearray | memoryview) -> tuple[int, int, memoryview]:
    """(correlation id, status, body) of a reply.

    Raises:
        ProtocolError: not a reply envelope of this version.
    """
    view = memoryview(payload)
    if len(view) < _REPLY.size:
        raise ProtocolError("a reply shorter than its envelope")
    version, correlation, status = _REPLY.unpack_from(view)
    if version != _VERSION or status not in (REPLY_OK, REPLY_ERROR):
        raise ProtocolError(f"a reply envelope of version {version}, status {status}")
    return correlation, status, view[_REPLY.size :]
