"""Pipeline specs: the sources, stages and sinks an orchestrator compiles into routes.

A spec is checked twice.  :func:`parse_spec` checks its structure alone, so a bad file
is refused before anything is stored; :func:`check_spec` checks it against what the
orchestrator knows now (registered capabilities, agents, topics, policy), which can
change between the two.  Every error is a :class:`SpecError` naming the field.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .control import slow_consumer_policy
from .errors import ConfigError, SpecError, did_you_mean
from .patterns import Policy, Rule, read_document, rules_from_list, topic_matches, validate_pattern, validate_topic

__all__ = ["SpecError", "ElementSpec", "PipelineSpec", "parse_spec", "load_spec", "check_spec"]

KINDS = ("source", "stage", "sink")
NAME = re.compile(r"[A-Za-z0-9_.-]+")
_KEYS = {
    "source": ("name", "capability", "topic", "emits", "params", "replicas", "agent"),
    "stage": ("name", "capability", "consumes", "emits", "params", "replicas", "share", "agent", "max_latency_ms"),
    "sink": ("name", "capability", "consumes", "params", "replicas", "share", "agent", "max_latency_ms"),
}
#: The longest latency budget a spec may give, in milliseconds (an hour).
MAX_LATENCY_MS = 3_600_000
#: How the replicas of a stage or sink take its input: each frame to one of them, in
#: turn or by the publisher's key (the same key, the same replica), or every frame to all.
SHARES = ("round_robin", "key", "all")


@dataclass(frozen=True)
class ElementSpec:
    """One source, stage or sink of a pipeline spec, as planned (what an agent runs for it is
    :class:`dcp.agent.Element`); an external source has no capability and emits its ``topic``."""

    kind: str
    name: str
    capability: str | None
    consumes: tuple[str, ...]
    emits: str | None
    params: dict[str, Any] = field(default_factory=dict, hash=False, compare=True)
    replicas: int = 1
    share: str = "round_robin"
    agent: str | None = None
    #: The budget of the edges into this element: from a producer of what it consumes to it.
    max_latency_ms: float | None = None
    field_name: str = ""

    @property
    def shared(self) -> bool:
        """Whether each frame of its input goes to one of its replicas only."""
        return self.replicas > 1 and self.share != "all" and bool(self.consumes)

    @property
    def external(self) -> bool:
        """Whether an agent outside the pipeline already produces this source's topic."""
        return self.capability is None

    def to_dict(self) -> dict[str, Any]:
        if self.external:
            return {"name": self.name, "topic": self.emits}
        data: dict[str, Any] = {"name": self.name, "capability": self.capability}
        if self.consumes:
            data["consumes"] = list(self.consumes)
        if self.emits is not None:
            data["emits"] = self.emits
        if self.params:
            data["params"] = copy.deepcopy(self.params)
        if self.replicas != 1:
            data["replicas"] = self.replicas
        if self.share != "round_robin":
            data["share"] = self.share
        if self.agent is not None:
            data["agent"] = self.agent
        if self.max_latency_ms is not None:
            data["max_latency_ms"] = self.max_latency_ms
        return data


@dataclass(frozen=True)
class PipelineSpec:
    """A parsed pipeline: its elements in file order (sources, stages, sinks) and its own
    access-policy rules (the spec's ``[[policy]]`` tables)."""

    name: str
    elements: tuple[ElementSpec, ...]
    access_rules: tuple[Rule, ...] = ()
    #: The budget from a source to a sink, along any chain of the pipeline's elements.
    max_latency_ms: float | None = None

    def element(self, name: str) -> ElementSpec:
        for element in self.elements:
            if element.name == name:
                return element
        raise KeyError(name)

    def emitted(self) -> dict[str, ElementSpec]:
        """Concrete topic -> the element emitting it (external sources included)."""
        return {e.emits: e for e in self.elements if e.emits is not None}

    def scoped_rules(self) -> tuple[Rule, ...]:
        """The spec's ``[[policy]]`` rules as the orchestrator applies them: each decides
        only about the topics this pipeline's own elements emit (not an external
        source's), who may publish them and who may consume them, wherever they are
        consumed; so one pipeline's rules never decide about another's data."""
        topics = frozenset(e.emits for e in self.elements if e.emits is not None and not e.external)
        return tuple(replace(rule, topics=topics, source=f"pipeline {self.name!r}") for rule in self.access_rules)

    def consumers_of(self, topic: str) -> list[ElementSpec]:
        return [e for e in self.elements if any(topic_matches(p, topic) for p in e.consumes)]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe document that :func:`parse_spec` reads back to an equal spec."""
        data: dict[str, Any] = {"name": self.name}
        for kind in KINDS:
            items = [e.to_dict() for e in self.elements if e.kind == kind]
            if items:
                data[kind] = items
        if self.access_rules:
            data["policy"] = [rule.to_dict() for rule in self.access_rules]
        if self.max_latency_ms is not None:
            data["max_latency_ms"] = self.max_latency_ms
        return data


# --------------------------------------------------------------------------- parsing

def _string(item: Mapping[str, Any], key: str, here: str, *, required: bool) -> str | None:
    value = item.get(key)
    if value is None:
        if required:
            raise SpecError(f"{here}.{key}", "is required")
        return None
    if not isinstance(value, str) or not value:
        raise SpecError(f"{here}.{key}", f"must be a non-empty string, got {value!r}")
    return value


def _name(value: object, where: str) -> str:
    if value is None:
        raise SpecError(where, "is required")
    if not isinstance(value, str) or not NAME.fullmatch(value):
        raise SpecError(where, f"must be letters, digits, '_', '.' or '-', got {value!r}")
    return value


def _topic(value: Any, where: str) -> str:
    if value is None:
        raise SpecError(where, "is required")
    try:
        validate_topic(value)
    except ConfigError as exc:
        raise SpecError(where, str(exc)) from None
    assert isinstance(value, str)  # validate_topic accepts only strings
    return value


def _consumes(value: object, where: str) -> tuple[str, ...]:
    if value is None:
        raise SpecError(where, "is required: list the topic patterns this element reads")
    patterns = [value] if isinstance(value, str) else value
    if not isinstance(patterns, list) or not patterns:
        raise SpecError(where, f"must be a topic pattern or a non-empty list of them, got {value!r}")
    for i, pattern in enumerate(patterns):
        try:
            validate_pattern(pattern)
        except ConfigError as exc:
            raise SpecError(f"{where}[{i}]", str(exc)) from None
    return tuple(patterns)


def _json_copy(value: object, where: str) -> Any:
    """A copy of ``value`` made of JSON types only, since specs are stored as JSON."""
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise SpecError(where, f"key {key!r} is not a string")
            out[key] = _json_copy(item, f"{where}.{key}")
        return out
    if isinstance(value, (list, tuple)):
        return [_json_copy(item, f"{where}[{i}]") for i, item in enumerate(value)]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise SpecError(where, f"a value of type {type(value).__name__} cannot be stored as JSON")


def _element(kind: str, index: int, item: object) -> ElementSpec:
    here = f"{kind}[{index}]"
    if not isinstance(item, Mapping):
        raise SpecError(here, "must be a table")
    if kind == "sink" and "emits" in item:
        raise SpecError(f"{here}.emits", "a sink emits nothing; make it a [[stage]]")
    if kind == "source" and "consumes" in item:
        raise SpecError(f"{here}.consumes", "a source consumes nothing; make it a [[stage]]")
    unknown = sorted(set(item) - set(_KEYS[kind]))
    if unknown:
        near = did_you_mean(unknown[0], _KEYS[kind])
        raise SpecError(f"{here}.{unknown[0]}", f"unknown key{near}; a {kind} takes {', '.join(_KEYS[kind])}")
    name = _name(item.get("name"), f"{here}.name")
    if kind == "source" and "topic" in item:
        if "capability" in item:
            raise SpecError(here, "has both capability and topic; give a capability to run, or the topic of an external source")
        extra = sorted(set(item) - {"name", "topic"})
        if extra:
            raise SpecError(f"{here}.{extra[0]}", "an external source (topic) takes only name and topic")
        return ElementSpec(kind, name, None, (), _topic(item["topic"], f"{here}.topic"), field_name=here)
    if kind == "source" and item.get("capability") is None:
        raise SpecError(here, "needs a capability to run, or the topic of an external source")
    capability = _string(item, "capability", here, required=True)
    consumes = () if kind == "source" else _consumes(item.get("consumes"), f"{here}.consumes")
    emits = None if kind == "sink" else _topic(item.get("emits"), f"{here}.emits")
    params = item.get("params", {})
    if not isinstance(params, Mapping):
        raise SpecError(f"{here}.params", f"must be a table, got {params!r}")
    if "slow_consumer" in params:
        try:
            slow_consumer_policy(params["slow_consumer"])
        except ConfigError as exc:
            raise SpecError(f"{here}.params.slow_consumer", str(exc)) from None
    replicas = item.get("replicas", 1)
    if not isinstance(replicas, int) or isinstance(replicas, bool) or replicas < 1:
        raise SpecError(f"{here}.replicas", f"must be an integer >= 1, got {replicas!r}")
    share = item.get("share", "round_robin")
    if share not in SHARES:
        raise SpecError(f"{here}.share", f"must be one of {', '.join(SHARES)}, got {share!r}")
    return ElementSpec(
        kind,
        name,
        capability,
        consumes,
        emits,
        params=_json_copy(params, f"{here}.params"),
        replicas=replicas,
        share=share,
        agent=_string(item, "agent", here, required=False),
        max_latency_ms=_budget(item.get("max_latency_ms"), f"{here}.max_latency_ms"),
        field_name=here,
    )


def _budget(value: object, where: str) -> float | None:
    """A latency budget: None, or a number of milliseconds in (0, MAX_LATENCY_MS]."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= MAX_LATENCY_MS:
        raise SpecError(where, f"must be a number of milliseconds in (0, {MAX_LATENCY_MS}], got {value!r}")
    return float(value)


def parse_spec(data: Mapping[str, Any], where: str = "spec") -> PipelineSpec:
    """Check a spec document's structure and build it.

    ``where`` names the document in errors about it as a whole; other errors name the
    field, e.g. ``stage[1].emits``.

    Raises:
        SpecError: the first problem found.
    """
    if not isinstance(data, Mapping):
        raise SpecError(where, "must be a table")
    keys = ("name", *KINDS, "policy", "max_latency_ms")
    unknown = sorted(set(data) - set(keys))
    if unknown:
        if unknown[0] == "rule":  # a policy file's [[rule]] tables are a spec's [[policy]] ones
            near = " (did you mean 'policy'? a spec's access rules are [[policy]] tables)"
        else:
            near = did_you_mean(unknown[0], keys)
        raise SpecError(unknown[0], f"unknown key{near}; a pipeline spec takes {', '.join(keys)}")
    name = _name(data.get("name"), "name")
    elements: list[ElementSpec] = []
    for kind in KINDS:
        items = data.get(kind, [])
        if not isinstance(items, list):
            raise SpecError(kind, f"must be an array of tables ([[{kind}]])")
        elements.extend(_element(kind, i, item) for i, item in enumerate(items))
    if not elements:
        raise SpecError(where, "has no elements; add a [[source]], [[stage]] or [[sink]]")
    names: dict[str, ElementSpec] = {}
    emitters: dict[str, ElementSpec] = {}
    for element in elements:
        if element.name in names:
            raise SpecError(f"{element.field_name}.name", f"duplicate element name {element.name!r} (also {names[element.name].field_name})")
        names[element.name] = element
        if element.emits is None:
            continue
        if element.emits in emitters:
            other = emitters[element.emits]
            key = "topic" if element.external else "emits"
            raise SpecError(f"{element.field_name}.{key}", f"topic {element.emits!r} is already emitted by {other.field_name} ({other.name})")
        emitters[element.emits] = element
    return PipelineSpec(
        name, tuple(elements), rules_from_list(data.get("policy", []), "policy", SpecError),
        _budget(data.get("max_latency_ms"), "max_latency_ms"),
    )


def load_spec(path: str | Path) -> PipelineSpec:
    """Read a spec file: TOML, or JSON when its name ends in ``.json``.

    Raises:
        ConfigError: the file cannot be read or is not valid TOML/JSON (naming the file).
        SpecError: the document is not a valid spec.
    """
    path = Path(path)
    return parse_spec(read_document(path), where=str(path))


# --------------------------------------------------------------------------- checking

def _cycle(spec: PipelineSpec) -> list[str] | None:
    """Names along one cycle of the graph A -> B (B consumes what A emits), closed, or None."""
    after = {e.name: [c.name for c in spec.consumers_of(e.emits)] if e.emits else [] for e in spec.elements}
    done: set[str] = set()
    path: list[str] = []

    def visit(name: str) -> list[str] | None:
        path.append(name)
        for nxt in after[name]:
            if nxt in path:
                return path[path.index(nxt):] + [nxt]
            if nxt not in done:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        done.add(name)
        return None

    for element in spec.elements:
        if element.name not in done:
            found = visit(element.name)
            if found:
                return found
    return None


def _refusal(access_policy: Policy, agent: str, consumed: list[str], emits: str | None) -> str | None:
    """Why ``access_policy`` stops ``agent`` from running an element, or None if it does not."""
    for topic in consumed:
        if not access_policy.allows(agent, "consume", topic):
            return f"{agent!r} may not consume {topic!r} ({access_policy.why(agent, 'consume', topic)})"
    if emits is not None and not access_policy.allows(agent, "publish", emits):
        return f"{agent!r} may not publish {emits!r} ({access_policy.why(agent, 'publish', emits)})"
    return None


def check_spec(
    spec: PipelineSpec,
    *,
    capabilities: Collection[str],
    external_topics: Collection[str],
    agents: Collection[str] = (),
    access_policy: Policy | None = None,
    agents_with: Callable[[str], Collection[str]] | None = None,
) -> None:
    """Check ``spec`` against what the orchestrator knows now.

    ``capabilities``, ``agents`` and ``external_topics`` are what registered data agents
    offer, are called and produce.  With ``agents_with(capability)`` (the agents offering
    it), some agent for each element must be allowed by ``access_policy`` followed by the spec's
    own ``[[policy]]`` rules (scoped to its topics, :meth:`PipelineSpec.scoped_rules`) to
    consume all it would get and to publish what it emits.

    Raises:
        SpecError: the first problem found, naming the field (``pipeline`` for a cycle).
    """
    for e in spec.elements:
        if e.external:
            if e.emits not in external_topics:
                raise SpecError(f"{e.field_name}.topic", f"no registered data agent produces {e.emits!r}")
            continue
        if e.capability not in capabilities:
            raise SpecError(f"{e.field_name}.capability", f"no registered data agent offers {e.capability!r}")
        if e.agent is not None and e.agent not in agents:
            raise SpecError(f"{e.field_name}.agent", f"no registered data agent is named {e.agent!r}")
    provided = sorted(set(spec.emitted()) | set(external_topics))
    for e in spec.elements:
        for pattern in e.consumes:
            if not any(topic_matches(pattern, topic) for topic in provided):
                raise SpecError(f"{e.field_name}.consumes", f"no producer for {pattern!r}")
    cycle = _cycle(spec)
    if cycle:
        raise SpecError("pipeline", f"cycle {' -> '.join(cycle)}")
    if agents_with is None or (access_policy is None and not spec.access_rules):
        return
    effective = (access_policy or Policy()).extended(spec.scoped_rules())
    for e in spec.elements:
        if e.capability is None:  # an external source: its producer is outside the pipeline
            continue
        consumed = [t for t in provided if any(topic_matches(p, t) for p in e.consumes)]
        candidates = [e.agent] if e.agent is not None else sorted(agents_with(e.capability))
        reasons = []
        for agent in candidates:
            reason = _refusal(effective, agent, consumed, e.emits)
            if reason is None:
                break
            reasons.append(reason)
        else:
            who = f"pinned agent {e.agent!r}" if e.agent is not None else f"every agent offering {e.capability!r}"
            raise SpecError(e.field_name, f"policy refuses {who}: {'; '.join(reasons) or 'none is registered'}")
