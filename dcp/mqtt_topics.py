"""MQTT topics and topic filters as dcp topics and patterns, and back (pure).

=====================  ==================  =============================================
MQTT                   dcp                 note
=====================  ==================  =============================================
``a/b/c``              ``a.b.c``           ``/`` separates levels, ``.`` tokens
``a/+/c``              ``a.*.c``           one level
``a/#``                ``a`` and ``a.>``   MQTT's ``#`` also matches the parent level
``#``                  ``>``               everything
=====================  ==================  =============================================

What has no dcp form is refused with the MQTT 5.0 reason code (an :class:`MqttError`):
``TOPIC_NAME_INVALID`` (0x90) for a topic, ``TOPIC_FILTER_INVALID`` (0x8F) for a filter:

* an empty level (``a//b``, ``/a``, ``a/``): a dcp topic has no empty token;
* a level holding ``.``, ``*`` or ``>``: dcp's separator and wildcards;
* a topic beginning with ``$``, which MQTT keeps for the server;
* a wildcard in a topic name, or ``#``/``+`` that is not a whole level (``#`` last);
* over dcp's topic limit (255 bytes of UTF-8, :data:`dcp.wire.DEFAULT_LIMITS`);
* ``$share/...``: shared subscriptions, ``SHARED_SUBSCRIPTIONS_NOT_SUPPORTED`` (0x9E).

A dcp topic goes out to MQTT with its tokens joined by ``/``; one with a token holding
``/``, ``+``, ``#`` or U+0000 has no MQTT form (:func:`to_mqtt_topic` says None).
:func:`filter_matches` is MQTT's own matching, which the gateway applies to what it
delivers: a wildcard in the first level does not match a topic beginning with ``$``.
"""

from __future__ import annotations

from .errors import ConfigError
from .mqtt_codec import MqttError, Reason
from .patterns import validate_pattern, validate_topic

__all__ = ["to_dcp_topic", "to_dcp_patterns", "to_mqtt_topic", "filter_matches", "SHARED_PREFIX"]

SHARED_PREFIX = "$share/"
_DCP_RESERVED = (".", "*", ">")
_MQTT_RESERVED = ("/", "+", "#", "\x00")


def _levels(text: str, reason: int, what: str) -> list[str]:
    if text.startswith("$"):
        raise MqttError(reason, f"{what} {text!r} begins with '$', which MQTT keeps for the server")
    levels = text.split("/")
    for level in levels:
        if not level:
            raise MqttError(reason, f"{what} {text!r} has an empty level, which a dcp topic cannot have")
        if any(c in level for c in _DCP_RESERVED):
            raise MqttError(reason, f"{what} {text!r} has a level holding '.', '*' or '>' (dcp's separator and wildcards)")
    return levels


def to_dcp_topic(topic: str) -> str:
    """The dcp topic of the MQTT topic name ``topic``.

    Raises:
        MqttError: ``TOPIC_NAME_INVALID``: it has no dcp form, or holds a wildcard.
    """
    levels = _levels(topic, Reason.TOPIC_NAME_INVALID, "topic")
    if any("+" in level or "#" in level for level in levels):
        raise MqttError(Reason.TOPIC_NAME_INVALID, f"topic {topic!r} holds a wildcard ('+' or '#')")
    dcp_topic = ".".join(levels)
    try:
        validate_topic(dcp_topic)
    except ConfigError as exc:
        raise MqttError(Reason.TOPIC_NAME_INVALID, f"topic {topic!r}: {exc}") from None
    return dcp_topic


def to_dcp_patterns(topic_filter: str) -> tuple[str, ...]:
    """The dcp patterns that name what the MQTT ``topic_filter`` names: one, or two for a
    filter ending in ``/#`` (the parent level, and everything under it).

    Raises:
        MqttError: ``SHARED_SUBSCRIPTIONS_NOT_SUPPORTED`` for ``$share/...``;
            ``TOPIC_FILTER_INVALID``: it has no dcp form, or is not a valid filter.
    """
    if topic_filter.startswith(SHARED_PREFIX):
        raise MqttError(Reason.SHARED_SUBSCRIPTIONS_NOT_SUPPORTED, f"{topic_filter!r}: shared subscriptions are not supported")
    levels = _levels(topic_filter, Reason.TOPIC_FILTER_INVALID, "topic filter")
    tokens = []
    for i, level in enumerate(levels):
        if level == "#" and i == len(levels) - 1:
            tokens.append(">")
        elif level == "+":
            tokens.append("*")
        elif "#" in level or "+" in level:
            raise MqttError(Reason.TOPIC_FILTER_INVALID, f"topic filter {topic_filter!r}: '+' must be a whole level, '#' the whole last level")
        else:
            tokens.append(level)
    patterns = (".".join(tokens),) if len(tokens) == 1 or tokens[-1] != ">" else (".".join(tokens[:-1]), ".".join(tokens))
    try:
        for pattern in patterns:
            validate_pattern(pattern)
    except ConfigError as exc:
        raise MqttError(Reason.TOPIC_FILTER_INVALID, f"topic filter {topic_filter!r}: {exc}") from None
    return patterns


def to_mqtt_topic(dcp_topic: str) -> str | None:
    """The MQTT topic name of ``dcp_topic``, or None where it has none."""
    tokens = dcp_topic.split(".")
    if any(c in token for token in tokens for c in _MQTT_RESERVED):
        return None
    return "/".join(tokens)


def filter_matches(topic_filter: str, topic: str) -> bool:
    """Whether the MQTT ``topic`` is one ``topic_filter`` names (MQTT's rules, 4.7)."""
    want = topic_filter.split("/")
    have = topic.split("/")
    if topic.startswith("$") and want[0] in ("+", "#"):
        return False
    for i, level in enumerate(want):
        if level == "#":
            return True
        if i >= len(have) or (level != "+" and level != have[i]):
            return False
    return len(want) == len(have)
