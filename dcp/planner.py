"""Incremental stream planning for the orchestrator (pure: no asyncio, sockets or sqlite).

The orchestrator tells a :class:`Planner` what changed: an agent's view (where it is
attached, whether it is connected, the topics it consumes and produces, pipeline
elements included), the overlay, the access policy.  Each event marks dirty only the
streams it can change, found through indexes, and :meth:`Planner.step` replans dirty
streams in slices of bounded time, returning the streams whose route changed, each
with its epoch one higher, for the orchestrator to store and push.

What a stream's plan depends on, and the index that finds it when that changes:

- its producer's view: the streams are keyed by producer;
- the consumers of its topic: consumer patterns in a trie over topic levels
  (:class:`_PatternIndex`, the consumers of a topic), produced topics in another
  (:class:`_TopicIndex`, the streams a pattern names);
- its tree: brokers and links -> the streams whose tree uses them; a link that comes
  up changes only trees that reach where it brings a broker closer to their source
  (:meth:`Planner._mark_shortcuts`);
- the policy: every stream.

A stream with a consumer left out (unreachable, or on a bad endpoint) or an unusable
source is replanned on every overlay change, so that nothing it waits for is missed.
So is a stream whose planning raised (a record nothing checked, a bug): the error is
logged once, the stream keeps its last route, and the others are planned.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import product
from typing import Generic, TypeVar

from ._guard import safe
from .errors import RoutingError
from .patterns import Policy
from .shares import REQUESTS
from .topology import Endpoint, Overlay, OverlayLink, build_tree, least_costs

__all__ = ["AgentView", "Stream", "ShareGroup", "Planner", "MAX_VARIANTS"]

log = logging.getLogger(__name__)

StreamKey = tuple[str, str]  # (producer, topic)
Edge = tuple[Endpoint, Endpoint]  # a link, its two ends in order: the same seen from either side
K = TypeVar("K")
V = TypeVar("V")
M = TypeVar("M", str, tuple[str, str, str])  # an index member: an agent, or (agent, group, mode) for a share

#: The numbers one stream may carry for its share groups: the product of their sizes at
#: most; groups past it take every frame (logged), so a push stays one control frame.
MAX_VARIANTS = 64


@dataclass(frozen=True)
class AgentView:
    """What planning knows of one agent.

    ``endpoint``: ``(broker, port)`` while the agent counts on the data plane (alive,
    and its broker present); None: it neither produces nor consumes.  ``online``: its
    connection to the orchestrator is up, so a route it no longer needs can be
    withdrawn (only the producer can be told).
    """

    endpoint: Endpoint | None
    online: bool
    consumes: tuple[str, ...] = ()
    produces: tuple[str, ...] = ()
    #: Patterns consumed as one member of a share group: (pattern, group, mode); each
    #: frame goes to one member of the group (mode "round_robin" or "key").
    shares: tuple[tuple[str, str, str], ...] = ()


@dataclass(frozen=True)
class ShareGroup:
    """The replicas that share a stream: each frame goes to one ``members`` (in order,
    the digits of the variant index), chosen by the producer in turn or by key.
    ``replies``: for a request stream, the number from each member back to the producer."""

    name: str
    mode: str
    members: tuple[str, ...]
    replies: tuple[int, ...] = ()


@dataclass(frozen=True)
class Stream:
    """The route of one stream (one producer, one topic) as last planned and pushed."""

    producer: str
    topic: str
    epoch: int
    x: int
    consumers: list[str]
    refused: str = ""  # why the producer may not publish, if it may not
    broker: str = ""  # the producer's broker X was computed for: X means nothing on another
    #: With share groups: one number per choice of one member in each group (the first
    #: group's member is the fastest digit), each also reaching every other consumer; x is
    #: the first.  Empty: x reaches every consumer.
    variants: tuple[int, ...] = ()
    groups: tuple[ShareGroup, ...] = ()


@dataclass
class _Tree:
    """Where a planned stream's tree lies, to find it again when that part changes."""

    source: str
    brokers: frozenset[str]
    edges: frozenset[Edge]
    partial: bool  # a consumer was left out, or the source cannot be planned


class _PatternIndex(Generic[M]):
    """Consumer patterns by topic level: the consumers of a topic cost the levels of the
    topic and the wildcards on its way, not a scan of the agents."""

    __slots__ = ("children", "agents", "rest")

    def __init__(self) -> None:
        self.children: dict[str, _PatternIndex[M]] = {}
        self.agents: set[M] = set()  # patterns that end at this node
        self.rest: set[M] = set()  # patterns that end with '>' below this node

    def add(self, pattern: str, agent: M) -> None:
        *path, last = pattern.split(".")
        node = self
        for token in path:
            node = node.children.setdefault(token, _PatternIndex())
        if last == ">":
            node.rest.add(agent)
        else:
            node.children.setdefault(last, _PatternIndex()).agents.add(agent)

    def discard(self, pattern: str, agent: M) -> None:
        *path, last = pattern.split(".")
        trail = [self]
        for token in path:
            child = trail[-1].children.get(token)
            if child is None:
                return
            trail.append(child)
        if last == ">":
            trail[-1].rest.discard(agent)
        else:
            child = trail[-1].children.get(last)
            if child is None:
                return
            child.agents.discard(agent)
            trail.append(child)
        _prune(trail, pattern.split("."))

    def empty(self) -> bool:
        return not (self.children or self.agents or self.rest)

    def match(self, topic: str) -> set[M]:
        """The agents with a pattern that names ``topic``."""
        found: set[M] = set()
        frontier = [self]
        for token in topic.split("."):
            below = []
            for node in frontier:
                found |= node.rest  # '>' here takes this token and any after it
                for child in (node.children.get(token), node.children.get("*")):
                    if child is not None:
                        below.append(child)
            if not below:
                return found
            frontier = below
        for node in frontier:
            found |= node.agents
        return found


class _TopicIndex:
    """Produced topics by level: the streams a consumer pattern names cost the branches
    the pattern walks, not a scan of every stream."""

    __slots__ = ("children", "producers", "topic")

    def __init__(self, topic: str = "") -> None:
        self.children: dict[str, _TopicIndex] = {}
        self.producers: set[str] = set()  # of the topic that ends at this node
        self.topic = topic

    def add(self, topic: str, producer: str) -> None:
        node = self
        tokens = topic.split(".")
        for i, token in enumerate(tokens):
            child = node.children.get(token)
            if child is None:
                child = node.children[token] = _TopicIndex(".".join(tokens[: i + 1]))
            node = child
        node.producers.add(producer)

    def discard(self, topic: str, producer: str) -> None:
        tokens = topic.split(".")
        trail = [self]
        for token in tokens:
            child = trail[-1].children.get(token)
            if child is None:
                return
            trail.append(child)
        trail[-1].producers.discard(producer)
        _prune(trail, tokens)

    def empty(self) -> bool:
        return not (self.children or self.producers)

    def streams(self, pattern: str) -> Iterator[StreamKey]:
        """Every (producer, topic) whose topic ``pattern`` names."""
        tokens = pattern.split(".")
        pending = [(self, 0)]
        while pending:
            node, depth = pending.pop()
            if depth == len(tokens):
                yield from ((producer, node.topic) for producer in node.producers)
                continue
            token = tokens[depth]
            if token == ">":  # one or more levels: every topic under every child
                subtree = list(node.children.values())
                while subtree:
                    below = subtree.pop()
                    yield from ((producer, below.topic) for producer in below.producers)
                    subtree.extend(below.children.values())
            elif token == "*":
                pending.extend((child, depth + 1) for child in node.children.values())
            else:
                child = node.children.get(token)
                if child is not None:
                    pending.append((child, depth + 1))


def _prune(trail: list[_PatternIndex[str]] | list[_PatternIndex[tuple[str, str, str]]] | list[_TopicIndex], tokens: list[str]) -> None:
    """Drop the nodes of ``trail`` (root first, one per token) left empty, deepest first."""
    for depth in range(len(trail) - 1, 0, -1):
        if not trail[depth].empty():
            return
        del trail[depth - 1].children[tokens[depth - 1]]


def _edge(link: OverlayLink) -> Edge:
    a, b = (link.a, link.a_port), (link.b, link.b_port)
    return (a, b) if a <= b else (b, a)


def _adjacency(overlay: Overlay, edges: Iterable[Edge], dearer: dict[Endpoint, int] | None = None) -> dict[str, dict[str, int]]:
    """Broker -> its neighbours over ``edges``, with the least cost of sending to each
    (costs of ``overlay``, or of ``dearer`` where it has the end)."""
    dearer = dearer or {}
    adjacent: dict[str, dict[str, int]] = {}
    for ends in edges:
        for (a, port), (b, _) in (ends, ends[::-1]):
            cost = dearer.get((a, port)) or overlay.cost(a, port)
            out = adjacent.setdefault(a, {})
            out[b] = min(cost, out.get(b, cost))
    return adjacent


def _distances(adjacent: dict[str, dict[str, int]], source: str) -> dict[str, int]:
    """Least cost from ``source`` to every broker it reaches over ``adjacent`` (as build_tree)."""
    return least_costs(source, lambda broker: adjacent.get(broker, {}).items())


def _number(
    overlay: Overlay, source: Endpoint, consumers: list[tuple[str, Endpoint]]
) -> tuple[int, list[str], frozenset[str], frozenset[Edge], bool]:
    """The number reaching every consumer the overlay can reach from ``source``.

    Returns ``(x, consumers reached, tree brokers, tree links, partial)``; ``partial``:
    someone was left out (logged at debug), or the source itself cannot be planned (then
    ``x`` is 0).  Finding who is left out costs one tree per consumer broker, not one
    per consumer: the endpoint checks of :func:`build_tree`, then whether the broker is
    reachable.
    """
    try:  # the usual case: everyone is reachable, one tree
        tree = build_tree(overlay, source, [endpoint for _, endpoint in consumers])
        return tree.x, [agent for agent, _ in consumers], tree.brokers, frozenset(_edge(link) for link in tree.links), False
    except RoutingError:
        pass
    try:
        build_tree(overlay, source, [])
    except RoutingError as exc:  # the source itself: no broker of that name, or a bad port
        log.debug("no tree from %s: %s", source, exc)
        return 0, [], frozenset(), frozenset(), True
    reachable: dict[str, bool] = {}
    kept = []
    for agent, (broker, port) in consumers:
        layout = overlay.layouts.get(broker)
        if layout is None or not 0 <= port < layout.ports or (broker, port) == source or overlay.link_ports(broker) >> port & 1:
            log.debug("%s cannot get a stream of %s: endpoint %s", agent, source, (broker, port))
            continue
        if broker not in reachable:
            try:
                build_tree(overlay, source, [(broker, port)])
                reachable[broker] = True
            except RoutingError as exc:
                log.debug("%s cannot get a stream of %s: %s", agent, source, exc)
                reachable[broker] = False
        if reachable[broker]:
            kept.append((agent, (broker, port)))
    tree = build_tree(overlay, source, [endpoint for _, endpoint in kept])
    return tree.x, [agent for agent, _ in kept], tree.brokers, frozenset(_edge(link) for link in tree.links), True


@dataclass
class _Counters:
    planned: int = 0  # streams planned (dirty streams taken), since the start
    changed: int = 0  # of which the route changed
    seconds: float = 0.0  # spent in step()


class Planner:
    """The routes of every stream, kept up to date one event at a time.

    Feed it events (:meth:`set_agent`, :meth:`set_overlay`, :meth:`set_policy`), then
    call :meth:`step` until :attr:`pending` is 0.  ``streams`` are the routes planned
    so far (recovered ones included), which only ever grow in epoch.
    """

    def __init__(self, streams: Iterable[Stream] = (), policy: Policy | None = None) -> None:
        self.streams: dict[StreamKey, Stream] = {}
        self._topics_of: dict[str, dict[str, None]] = {}  # producer -> topics with a route record
        for stream in streams:
            self._record(stream)
        self.agents: dict[str, AgentView] = {}
        self.overlay = Overlay({})
        self.policy = policy or Policy()
        self.counters = _Counters()
        self._dirty: dict[StreamKey, None] = {}
        self._consumers: _PatternIndex[str] = _PatternIndex()  # patterns of the agents with an endpoint
        self._members: _PatternIndex[tuple[str, str, str]] = _PatternIndex()  # their shared patterns: (agent, group, mode)
        self._produced = _TopicIndex()  # topics of the agents with an endpoint
        self._at: dict[Endpoint, set[str]] = {}  # endpoint -> agents there
        self._trees: dict[StreamKey, _Tree] = {}
        self._by_broker: dict[str, set[StreamKey]] = {}  # broker -> streams whose tree reaches it
        self._by_edge: dict[Edge, set[StreamKey]] = {}  # link -> streams whose tree uses it
        self._by_source: dict[str, set[StreamKey]] = {}  # broker -> streams that start there
        self._partial: set[StreamKey] = set()
        self._failing: set[StreamKey] = set()  # streams whose planning raised (logged once), retried

    @property
    def pending(self) -> int:
        """Dirty streams not yet planned."""
        return len(self._dirty)

    @property
    def partial(self) -> int:
        """Streams planned without some consumer (unreachable, or on a bad endpoint), or without a usable source."""
        return len(self._partial)

    @property
    def failing(self) -> int:
        """Streams whose planning raised the last time: they keep their last route."""
        return len(self._failing)

    def consumers_of(self, topic: str) -> set[str]:
        """The agents with an endpoint whose patterns (their elements' included) name
        ``topic``, as last told; the policy aside."""
        return self._consumers.match(topic)

    def reachable(self, source: str) -> set[str]:
        """The brokers the overlay's links reach from broker ``source``, itself included:
        where a tree from there can go (:func:`build_tree` walks the same links)."""
        return set(_distances(_adjacency(self.overlay, (_edge(link) for link in self.overlay.links)), source))

    def topics_of(self, producer: str) -> list[str]:
        """The topics ``producer`` has a route for (withdrawn ones too)."""
        return list(self._topics_of.get(producer, ()))

    # -- events -----------------------------------------------------------------

    def set_agent(self, name: str, view: AgentView) -> None:
        """Agent ``name`` is now ``view``: dirty what it produces, and what its patterns
        name, of the old view and the new."""
        old = self.agents.get(name)
        if old == view:
            return
        self.agents[name] = view
        was = old.endpoint if old is not None else None
        now = view.endpoint
        old_topics = set(old.produces) if old is not None and was is not None else set()
        new_topics = set(view.produces) if now is not None else set()
        old_patterns = set(old.consumes) if old is not None and was is not None else set()
        new_patterns = set(view.consumes) if now is not None else set()
        old_shares = set(old.shares) if old is not None and was is not None else set()
        new_shares = set(view.shares) if now is not None else set()
        if old is None or old.online != view.online:
            self._mark((name, topic) for topic in self._topics_of.get(name, ()))  # withdrawals depend on it
        moved = was != now  # then all of it changes, else only what was added or dropped
        self._mark((name, topic) for topic in (old_topics | new_topics if moved else old_topics ^ new_topics))
        for pattern in old_patterns | new_patterns if moved else old_patterns ^ new_patterns:
            self._mark(self._produced.streams(pattern))
        for pattern, _, _ in old_shares | new_shares if moved else old_shares ^ new_shares:
            self._mark(self._produced.streams(pattern))
        for topic in old_topics - new_topics:
            self._produced.discard(topic, name)
        for topic in new_topics - old_topics:
            self._produced.add(topic, name)
        for pattern in old_patterns - new_patterns:
            self._consumers.discard(pattern, name)
        for pattern in new_patterns - old_patterns:
            self._consumers.add(pattern, name)
        for pattern, group, mode in old_shares - new_shares:
            self._members.discard(pattern, (name, group, mode))
        for pattern, group, mode in new_shares - old_shares:
            self._members.add(pattern, (name, group, mode))
        if moved and was is not None:
            _unindex(self._at, was, name)
        if moved and now is not None:
            self._at.setdefault(now, set()).add(name)

    def remove_agent(self, name: str) -> None:
        """Forget agent ``name`` (gone for good): what it produced and consumed is dirty,
        as when it loses its endpoint.  The records of its streams stay (``streams``,
        :meth:`topics_of`), so their epochs only ever grow if it comes back."""
        if name not in self.agents:
            return
        self.set_agent(name, AgentView(None, False))
        del self.agents[name]

    def set_policy(self, policy: Policy) -> None:
        """A new access policy: every produced stream is dirty."""
        if policy == self.policy:
            return
        self.policy = policy
        for name, view in self.agents.items():
            if view.endpoint is not None:
                self._mark((name, topic) for topic in view.produces)

    def set_overlay(self, overlay: Overlay) -> None:
        """A new overlay: dirty the streams over a broker whose keys changed, a link that
        went or got dearer, the sources for which a new or cheaper link may shorten a
        path, and the partial."""
        old = self.overlay
        self.overlay = overlay
        for name in old.layouts.keys() | overlay.layouts.keys():
            if old.layouts.get(name) != overlay.layouts.get(name):
                self._mark(self._by_broker.get(name, ()))
        old_edges = {_edge(link): link for link in old.links}
        new_edges = {_edge(link): link for link in overlay.links}
        gone = old_edges.keys() - new_edges.keys()
        came = new_edges.keys() - old_edges.keys()
        kept = old_edges.keys() & new_edges.keys()
        dearer: dict[Endpoint, int] = {}  # kept ends whose cost went up: their new cost
        cheaper = set()
        for edge in kept:
            for end in edge:
                before, after = old.cost(*end), overlay.cost(*end)
                if after > before:
                    dearer[end] = after
                    self._mark(self._by_edge.get(edge, ()))
                elif after < before:
                    cheaper.add(edge)
        for edge in gone:
            self._mark(self._by_edge.get(edge, ()))
        if came or cheaper:
            # From the old links at their new costs where dearer (the trees over those are
            # dirty already; no other tree changes for them) to the new overlay, costs only
            # fall: the shortcut rules find what that changes.
            self._mark_shortcuts(_adjacency(old, kept, dearer), _adjacency(overlay, new_edges), came | cheaper)
        # An agent on a link's port: build_tree treats it apart (ingress, or not a subscriber).
        ends = {end for edge in gone | came for end in edge} | {end for edge in new_edges for end in edge}
        for end in ends & self._at.keys():
            for agent in self._at[end]:
                self._mark_agent(agent)
        self._mark(list(self._partial))
        self._mark(list(self._failing))

    def _mark_agent(self, name: str) -> None:
        """Dirty everything agent ``name`` (with an endpoint) produces or consumes."""
        view = self.agents[name]
        self._mark((name, topic) for topic in view.produces)
        for pattern in {*view.consumes, *(pattern for pattern, _, _ in view.shares)}:
            self._mark(self._produced.streams(pattern))

    def _mark_shortcuts(self, before: dict[str, dict[str, int]], after: dict[str, dict[str, int]], came: set[Edge]) -> None:
        """Dirty the trees that new or cheaper links (``came``) may change, where costs
        only fell from ``before`` to ``after``.

        build_tree hangs each broker on a neighbour on a least-cost path from the source,
        so a tree can change only where a broker got closer, where a broker further on
        from such a broker can now hang on it, or at an end of a link in ``came`` that
        can now hang on the other.
        Every other tree, from every source, stays as it is.
        """
        for source, keys in self._by_source.items():
            old = _distances(before, source)
            new = _distances(after, source)
            closer = {broker for broker, cost in new.items() if old.get(broker) != cost}
            touched = set(closer)
            for broker in closer:
                touched.update(other for other, step in after[broker].items() if new.get(other) == new[broker] + step)
            for ends in came:  # a broker that can hang on the other end now
                for (a, _), (b, _) in (ends, ends[::-1]):
                    if a in new and b in new and new[a] + after[a][b] == new[b]:
                        touched.add(b)
            touched.discard(source)  # never hung on anything
            for broker in touched:
                self._mark(keys & self._by_broker.get(broker, set()))

    def _mark(self, keys: Iterable[StreamKey]) -> None:
        dirty = self._dirty
        for key in keys:
            dirty[key] = None

    # -- planning ---------------------------------------------------------------

    def step(self, budget_s: float | None = None) -> list[Stream]:
        """Plan dirty streams for about ``budget_s`` seconds (at least one; None: all).

        Returns the streams whose route (X, consumers, refusal or source broker)
        changed, each with its epoch one higher; they are in ``streams`` already.
        """
        started = time.perf_counter()
        deadline = None if budget_s is None else started + budget_s
        changed = []
        dirty = self._dirty
        planned = 0
        while dirty:
            key, _ = dirty.popitem()
            planned += 1
            try:
                stream = self._plan(key)
                self._failing.discard(key)
            except Exception:  # this stream only: it keeps its last route, the others are planned
                stream = None
                if key not in self._failing:
                    self._failing.add(key)
                    log.exception("cannot plan stream %s/%s; it keeps its last route", safe(key[0]), safe(key[1]))
            if stream is not None:
                self._record(stream)
                changed.append(stream)
            if deadline is not None and time.perf_counter() >= deadline:
                break
        counters = self.counters
        counters.planned += planned
        counters.changed += len(changed)
        counters.seconds += time.perf_counter() - started
        return changed

    def _plan(self, key: StreamKey) -> Stream | None:
        """The new route of ``key``, or None if it stays as it is."""
        producer, topic = key
        view = self.agents.get(producer)
        old = self.streams.get(key)
        if view is None or view.endpoint is None or topic not in view.produces:
            self._untrack(key)
            # No longer produced, or its producer is not attached: it routes nowhere now.
            # The record stays, so the epoch only ever grows; only the producer can be told.
            if old is not None and old.x and view is not None and view.online:
                return Stream(producer, topic, old.epoch + 1, 0, [])
            return None
        policy = self.policy
        refused = "" if policy.allows(producer, "publish", topic) else policy.why(producer, "publish", topic)
        consumers: dict[str, Endpoint] = {}  # every frame to each
        members: dict[tuple[str, str], dict[str, Endpoint]] = {}  # (group, mode) -> its members
        if not refused:
            for agent in sorted(self._consumers.match(topic)):
                if self._may_consume(agent, producer, topic):
                    consumers[agent] = self._endpoint(agent)
            for agent, group, mode in sorted(self._members.match(topic)):
                if agent not in consumers and self._may_consume(agent, producer, topic):
                    members.setdefault((group, mode), {})[agent] = self._endpoint(agent)
        endpoint = view.endpoint
        everyone = [*consumers.items(), *((agent, at) for group in members.values() for agent, at in group.items())]
        x, reached, brokers, edges, partial = _number(self.overlay, endpoint, everyone)
        variants: tuple[int, ...] = ()
        groups: tuple[ShareGroup, ...] = ()
        if members:
            present = set(reached)
            shared = [(name, mode, {a: at for a, at in group.items() if a in present}) for (name, mode), group in members.items()]
            groups, variants, brokers, edges, left_out = self._shares(key, endpoint, consumers, shared, present, brokers, edges)
            partial = partial or left_out
            x = variants[0] if variants else x
            reached = list(dict.fromkeys(reached))
        self._track(key, _Tree(endpoint[0], brokers, edges, partial))
        broker = endpoint[0]
        if (
            old is not None and old.x == x and old.consumers == reached and old.refused == refused and old.broker == broker
            and old.variants == variants and old.groups == groups
        ):
            return None
        return Stream(producer, topic, (old.epoch if old else 0) + 1, x, reached, refused, broker, variants, groups)

    def _may_consume(self, agent: str, producer: str, topic: str) -> bool:
        if agent == producer:
            return False
        if not self.policy.allows(agent, "consume", topic):
            log.debug("policy keeps %s from consuming %s: %s", agent, topic, self.policy.why(agent, "consume", topic))
            return False
        return True

    def _endpoint(self, agent: str) -> Endpoint:
        at = self.agents[agent].endpoint
        assert at is not None  # only agents with an endpoint are indexed
        return at

    def _shares(
        self, key: StreamKey, source: Endpoint, consumers: dict[str, Endpoint], shared: list[tuple[str, str, dict[str, Endpoint]]],
        present: set[str], brokers: frozenset[str], edges: frozenset[Edge],
    ) -> tuple[tuple[ShareGroup, ...], tuple[int, ...], frozenset[str], frozenset[Edge], bool]:
        """The share groups of a stream and its numbers, one per choice of one member in
        each group (every consumer reached by each), with the trees' brokers and links
        grown by the reply paths of a request stream.  Groups past :data:`MAX_VARIANTS`
        choices take every frame; members no reply path reaches are left out (the last
        value says whether one was)."""
        everyone = [at for agent, at in consumers.items() if agent in present]
        groups: list[tuple[str, str, dict[str, Endpoint]]] = []
        choices = 1
        requests = key[1].startswith(REQUESTS)
        replies: dict[str, tuple[int, frozenset[str], frozenset[Edge]]] = {}
        left_out = False
        for name, mode, group in shared:
            if requests:
                for agent in list(group):
                    back = self._reply(group[agent], source)
                    if back is None:
                        del group[agent]
                        left_out = True
                    else:
                        replies[agent] = back
            if not group:
                continue
            if choices * len(group) > MAX_VARIANTS:
                log.warning("stream %s/%s: share group %s would make over %d numbers; it takes every frame", safe(key[0]), safe(key[1]), safe(name), MAX_VARIANTS)
                everyone.extend(group.values())
                continue
            choices *= len(group)
            groups.append((name, mode, group))
        variants = []
        for choice in product(*(list(group.values()) for _, _, group in reversed(groups))):  # the first group varies fastest
            variants.append(build_tree(self.overlay, source, [*everyone, *choice]).x)
        for _, reply_brokers, reply_edges in replies.values():
            brokers, edges = brokers | reply_brokers, edges | reply_edges
        share_groups = tuple(
            ShareGroup(name, mode, tuple(group), tuple(replies[agent][0] for agent in group) if requests else ())
            for name, mode, group in groups
        )
        return share_groups, tuple(variants), brokers, edges, left_out

    def _reply(self, member: Endpoint, requester: Endpoint) -> tuple[int, frozenset[str], frozenset[Edge]] | None:
        """The number from a request's responder back to its requester, and that tree's
        brokers and links; None when no path of links that are up leads back."""
        try:
            tree = build_tree(self.overlay, member, [requester])
        except RoutingError:
            return None
        return tree.x, tree.brokers, frozenset(_edge(link) for link in tree.links)

    def _record(self, stream: Stream) -> None:
        self.streams[(stream.producer, stream.topic)] = stream
        self._topics_of.setdefault(stream.producer, {})[stream.topic] = None

    def _track(self, key: StreamKey, tree: _Tree) -> None:
        """Index ``key`` under its new tree."""
        old = self._trees.get(key)
        if old == tree:
            return
        self._untrack(key)
        self._trees[key] = tree
        self._by_source.setdefault(tree.source, set()).add(key)
        for broker in tree.brokers:
            self._by_broker.setdefault(broker, set()).add(key)
        for edge in tree.edges:
            self._by_edge.setdefault(edge, set()).add(key)
        if tree.partial:
            self._partial.add(key)

    def _untrack(self, key: StreamKey) -> None:
        tree = self._trees.pop(key, None)
        if tree is None:
            return
        _unindex(self._by_source, tree.source, key)
        for broker in tree.brokers:
            _unindex(self._by_broker, broker, key)
        for edge in tree.edges:
            _unindex(self._by_edge, edge, key)
        self._partial.discard(key)


def _unindex(index: dict[K, set[V]], at: K, item: V) -> None:
    """Take ``item`` out of ``index[at]``, and the entry with it once empty."""
    items = index[at]
    items.discard(item)
    if not items:
        del index[at]
