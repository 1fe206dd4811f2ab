"""Topic patterns (NATS-style wildcards) and the policy of who may publish or consume what.

A topic is dot-separated tokens, e.g. ``sensors.cam1.video``.  A pattern may use
``*`` for exactly one token and, as its last token, ``>`` for one or more tokens.
Brokers route by topology number, not by topic, so matching happens here, where the
orchestrator wires pipelines and checks the policy before anything runs.
"""

from __future__ import annotations

import fnmatch
import json
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError, did_you_mean
from .wire import DEFAULT_LIMITS

__all__ = [
    "validate_topic",
    "validate_pattern",
    "topic_matches",
    "Rule",
    "Policy",
    "rules_from_list",
    "read_document",
]

ONE = "*"
REST = ">"
RULE_ACTIONS = ("allow", "deny")
ACCESS = ("publish", "consume")


def _tokens(text: object, what: str) -> list[str]:
    """Split after the checks shared by topics and patterns (the wire's topic limit)."""
    if not isinstance(text, str):
        raise ConfigError(f"{what} {text!r} must be a string")
    if not text:
        raise ConfigError(f"{what} must not be empty")
    try:
        size = len(text.encode())
    except UnicodeEncodeError:
        raise ConfigError(f"{what} {text!r} is not encodable as UTF-8") from None
    if size > DEFAULT_LIMITS.max_topic:
        raise ConfigError(f"{what} {text!r} is {size} bytes; at most {DEFAULT_LIMITS.max_topic} allowed")
    tokens = text.split(".")
    if "" in tokens:
        raise ConfigError(f"{what} {text!r} has an empty token")
    return tokens


def validate_topic(topic: str) -> None:
    """Raise ConfigError unless ``topic`` is concrete: something a publisher can send on."""
    for token in _tokens(topic, "topic"):
        if ONE in token or REST in token:
            raise ConfigError(f"topic {topic!r} contains a wildcard ('*' or '>'); a concrete topic is needed here")


def validate_pattern(pattern: str) -> None:
    """Raise ConfigError unless ``pattern`` is a topic in which wildcards are whole tokens."""
    tokens = _tokens(pattern, "pattern")
    for i, token in enumerate(tokens):
        if token == REST and i != len(tokens) - 1:
            raise ConfigError(f"pattern {pattern!r}: '>' may only be the last token")
        if token not in (ONE, REST) and (ONE in token or REST in token):
            raise ConfigError(f"pattern {pattern!r}: token {token!r} mixes a wildcard with text; '*' and '>' must be whole tokens")


def topic_matches(pattern: str, topic: str) -> bool:
    """Whether the concrete ``topic`` is one of the topics ``pattern`` names."""
    want = pattern.split(".")
    have = topic.split(".")
    if want[-1] == REST:
        want = want[:-1]
        if len(have) <= len(want):
            return False
        have = have[: len(want)]
    elif len(have) != len(want):
        return False
    return all(w == ONE or w == h for w, h in zip(want, have))


@dataclass(frozen=True)
class Rule:
    """One policy line: agents whose name matches the ``agent`` glob are allowed or denied these topics.

    ``topics``: the concrete topics the rule may decide about at all (None: every topic),
    and ``source`` where it comes from, for messages: a pipeline spec's rules are scoped
    to the topics its own elements emit (:meth:`dcp.spec.PipelineSpec.scoped_rules`).
    """

    agent: str
    action: str
    publish: tuple[str, ...] = ()
    consume: tuple[str, ...] = ()
    topics: frozenset[str] | None = None
    source: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "publish", tuple(self.publish))
        object.__setattr__(self, "consume", tuple(self.consume))
        if self.topics is not None:
            object.__setattr__(self, "topics", frozenset(self.topics))
        problem = _rule_problem(self.agent, self.action, self.publish, self.consume)
        if problem:
            raise ConfigError(f"rule.{problem[0]} {problem[1]}")

    def _pattern_for(self, agent: str, access: str, topic: str) -> str | None:
        """The first of this rule's ``access`` patterns that covers ``agent`` and ``topic``, if any."""
        if self.topics is not None and topic not in self.topics:
            return None
        if not fnmatch.fnmatchcase(agent, self.agent):
            return None
        return next((p for p in getattr(self, access) if topic_matches(p, topic)), None)

    def to_dict(self) -> dict[str, Any]:
        """The rule as a spec or a policy file writes it (its scope is not written)."""
        data: dict[str, Any] = {"agent": self.agent, "action": self.action}
        for access in ACCESS:
            if getattr(self, access):
                data[access] = list(getattr(self, access))
        return data


def _rule_problem(agent: object, action: object, publish: tuple[Any, ...], consume: tuple[Any, ...]) -> tuple[str, str] | None:
    """(sub-field, why) of the first thing wrong with a rule, so each caller can name the field its way."""
    if not isinstance(agent, str) or not agent:
        return "agent", "must be a non-empty name glob"
    if action not in RULE_ACTIONS:
        return "action", f"must be 'allow' or 'deny', got {action!r}"
    if not publish and not consume:
        return "publish", "or consume must list at least one topic pattern"
    for access, patterns in zip(ACCESS, (publish, consume)):
        for i, pattern in enumerate(patterns):
            try:
                validate_pattern(pattern)
            except ConfigError as exc:
                return f"{access}[{i}]", str(exc)
    return None


def _plain_error(field: str, why: str) -> Exception:
    return ConfigError(f"{field} {why}")


def _pattern_list(value: object) -> tuple[Any, ...] | None:
    """A list of patterns (a single string accepted), or None when it is neither."""
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return tuple(value)
    return None


def rules_from_list(
    items: object,
    where: str,
    error: Callable[[str, str], Exception] = _plain_error,
) -> tuple[Rule, ...]:
    """Rules from a list of tables (``[[rule]]`` or a spec's ``[[policy]]``).

    ``where`` names the list in errors (``rule[1].action``); ``error(field, why)`` builds
    the exception raised, so a spec reports SpecErrors and a policy file ConfigErrors.
    """
    if not isinstance(items, list):
        raise error(where, "must be an array of tables")
    rules = []
    for i, item in enumerate(items):
        here = f"{where}[{i}]"
        if not isinstance(item, Mapping):
            raise error(here, "must be a table")
        keys = ("agent", "action", *ACCESS)
        unknown = sorted(set(item) - set(keys))
        if unknown:
            raise error(f"{here}.{unknown[0]}", f"is not a rule key ({', '.join(keys)}){did_you_mean(unknown[0], keys)}")
        lists = {}
        for access in ACCESS:
            patterns = _pattern_list(item.get(access, []))
            if patterns is None:
                raise error(f"{here}.{access}", "must be a list of topic patterns")
            lists[access] = patterns
        problem = _rule_problem(item.get("agent"), item.get("action"), lists["publish"], lists["consume"])
        if problem:
            raise error(f"{here}.{problem[0]}", problem[1])
        rules.append(Rule(item["agent"], item["action"], lists["publish"], lists["consume"]))
    return tuple(rules)


@dataclass(frozen=True, init=False)
class Policy:
    """Which data agent may publish or consume which topics: first matching rule wins, else the default."""

    rules: tuple[Rule, ...]
    default: str

    def __init__(self, rules: Iterable[Rule] = (), default: str = "allow") -> None:
        rules = tuple(rules)
        if not all(isinstance(rule, Rule) for rule in rules):
            raise ConfigError("policy rules must be Rule instances")
        if default not in RULE_ACTIONS:
            raise ConfigError(f"policy default must be 'allow' or 'deny', got {default!r}")
        object.__setattr__(self, "rules", rules)
        object.__setattr__(self, "default", default)

    def _decide(self, agent: str, access: str, topic: str) -> tuple[int, Rule, str] | None:
        if access not in ACCESS:
            raise ConfigError(f"access must be 'publish' or 'consume', got {access!r}")
        for i, rule in enumerate(self.rules):
            pattern = rule._pattern_for(agent, access, topic)
            if pattern is not None:
                return i, rule, pattern
        return None

    def allows(self, agent: str, action: str, topic: str) -> bool:
        """Whether ``agent`` may ``action`` ("publish" or "consume") on ``topic``."""
        decision = self._decide(agent, action, topic)
        return (decision[1].action if decision else self.default) == "allow"

    def why(self, agent: str, action: str, topic: str) -> str:
        """The rule (numbered as in ``rule[i]``) or default that decides :meth:`allows`, for messages."""
        decision = self._decide(agent, action, topic)
        if decision is None:
            return f"default {self.default}"
        i, rule, pattern = decision
        source = f" of {rule.source}" if rule.source else ""
        return f"rule {i}{source} ({rule.action} {action} {pattern!r} for {rule.agent!r})"

    def extended(self, rules: Iterable[Rule]) -> Policy:
        """This policy with ``rules`` after its own, so they only decide what it leaves to the default."""
        return Policy((*self.rules, *rules), self.default)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "policy") -> Policy:
        """Read ``{"default": ..., "rule": [{agent, action, publish, consume}, ...]}``.

        Raises:
            ConfigError: naming the field, e.g. ``policy: rule[1].action must be 'allow' or 'deny'``.
        """

        def error(field: str, why: str) -> Exception:
            return ConfigError(f"{where}: {field} {why}")

        if not isinstance(data, Mapping):
            raise ConfigError(f"{where}: must be a table")
        keys = ("default", "rule")
        unknown = sorted(set(data) - set(keys))
        if unknown:
            if unknown[0] == "policy":  # a spec's [[policy]] tables are a policy file's [[rule]] ones
                near = " (did you mean 'rule'? a policy file's rules are [[rule]] tables)"
            else:
                near = did_you_mean(unknown[0], keys)
            raise error(unknown[0], f"is not a policy key ({', '.join(keys)}){near}")
        default = data.get("default", "allow")
        if default not in RULE_ACTIONS:
            raise error("default", f"must be 'allow' or 'deny', got {default!r}")
        return cls(rules_from_list(data.get("rule", []), "rule", error), default)

    @classmethod
    def load(cls, path: str | Path) -> Policy:
        """Read a policy file: TOML, or JSON when its name ends in ``.json``."""
        path = Path(path)
        return cls.from_dict(read_document(path), where=str(path))


def read_document(path: Path) -> dict[str, Any]:
    """A TOML file's table, or a ``.json`` file's object; ConfigError naming the file otherwise."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    try:
        data = json.loads(raw) if path.suffix.lower() == ".json" else tomllib.loads(raw.decode())
    except ValueError as exc:  # JSONDecodeError, TOMLDecodeError and UnicodeDecodeError all are
        kind = "JSON" if path.suffix.lower() == ".json" else "TOML"
        raise ConfigError(f"{path} is not valid {kind}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: must hold a table (a JSON object)")
    return data
