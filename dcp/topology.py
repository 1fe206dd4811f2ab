"""Delivery trees over a broker overlay, and a simulation of the data plane (pure, no I/O).

The orchestrator knows the overlay (brokers, their prime keys, the links between their
ports, what sending on each link costs) and, per stream, the source endpoint and the
subscriber endpoints. :func:`build_tree` turns that into a delivery tree of least cost
to each subscriber and its topology number ``X``
(:func:`dcp.routing.encode` of the tree's port bitmaps).  :func:`simulate` replays what
the brokers would do with ``X`` using :func:`dcp.routing.forward` alone, so the routing
invariants of docs/design.md (delivery contract: one copy per subscriber, none
elsewhere, nothing outside the tree, termination) are checked without sockets.
:func:`shape_edges` names the dial pairs of the overlay shapes the cluster launcher
builds.

Kept free of asyncio and socket so that the orchestrator, the tests and the benchmarks
can use it without an event loop.
"""

from __future__ import annotations

import heapq
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from math import gcd
from typing import Any

from .errors import RoutingError
from .routing import KeyLayout, encode, forward

__all__ = [
    "Endpoint",
    "OverlayLink",
    "Overlay",
    "Tree",
    "build_tree",
    "distances",
    "least_costs",
    "link_cost_us",
    "settled_cost",
    "LinkCost",
    "HOLD_DOWN_S",
    "MAX_HOLD_DOWN_S",
    "HOP_COST_US",
    "COST_HYSTERESIS",
    "COST_STEP_US",
    "MAX_COST_US",
    "Delivery",
    "simulate",
    "shape_edges",
    "SHAPES",
]

Endpoint = tuple[str, int]
"""``(broker name, port)``: one attachment of one broker."""

SHAPES = ("line", "ring", "star", "mesh")

_MAX_SIMULATION_STEPS = 10**6

#: What one hop costs on a link nothing has measured, and on top of what was measured on
#: one (forwarding, the local network), in microseconds: with no measurements every link
#: costs the same, and the least-cost tree is the fewest-hops tree.
HOP_COST_US = 200
#: A link cost is capped (a stalled link costs this), so that sums stay small ints.
MAX_COST_US = 60_000_000
#: The queueing term divides the bytes waiting by the link's throughput, at least this
#: (bytes/s): an idle link with a few bytes queued is not taken for a stalled one.
_MIN_RATE = 100_000
#: A planned cost follows a measurement only when they differ by more than this share of
#: the planned cost and by more than COST_STEP_US (:func:`settled_cost`).
COST_HYSTERESIS = 0.5
COST_STEP_US = 2_000
#: After a link's cost rose, it may fall again only this long after (:class:`LinkCost`),
#: doubled each time it rises again within a hold of falling, up to MAX_HOLD_DOWN_S.
HOLD_DOWN_S = 5.0
MAX_HOLD_DOWN_S = 60.0


def link_cost_us(rtt_ms: float, queue_bytes: int, bytes_per_s: float) -> int:
    """What sending one frame on a link costs, in microseconds: a hop, half the measured
    round trip (one way), and the time to drain what waits in its output queue.

    The round trip is measured by pings on the link's own connection, so it already
    grows when the link's queues do; the queue term sees a congested link before the
    next pong comes back.
    """
    drain_s = queue_bytes / max(bytes_per_s, _MIN_RATE)
    cost = HOP_COST_US + rtt_ms * 500 + drain_s * 1_000_000
    return int(min(cost, MAX_COST_US))


def settled_cost(planned: int | None, measured: int) -> int:
    """The cost to plan with, given the one planned with so far and a new measurement.

    Hysteresis: the planned cost moves only on a change of more than
    :data:`COST_HYSTERESIS` of itself and :data:`COST_STEP_US`, so that noise around a
    level never changes a tree, and routes do not flap between near-equal paths; a
    congested link (its cost many times higher) or one that recovered moves at once.
    """
    if planned is None or abs(measured - planned) > max(planned * COST_HYSTERESIS, COST_STEP_US):
        return measured
    return planned


class LinkCost:
    """The cost planned with for one link end, moved by measurements.

    :func:`settled_cost` keeps noise out.  A congested link's cost rises at once; but
    once its streams have left it, its queue drains and it measures cheap again, and
    planning by that alone would bring them back to congest it again, and so on.  So a
    cost that rose may fall only after a hold-down (:data:`HOLD_DOWN_S`), which doubles
    each time it rises again within a hold of falling, up to :data:`MAX_HOLD_DOWN_S`
    (route flap dampening).  A fall measured during the hold waits in ``pending``; the
    owner calls :meth:`release` at ``held_until``.
    """

    __slots__ = ("planned", "pending", "held_until", "hold_s", "fell_at")

    def __init__(self) -> None:
        self.planned: int | None = None
        self.pending: int | None = None  # a fall measured during the hold
        self.held_until = float("-inf")
        self.hold_s = HOLD_DOWN_S
        self.fell_at = float("-inf")

    def measure(self, measured: int, now: float) -> bool:
        """Take a measurement at ``now`` (monotonic seconds); whether ``planned`` changed."""
        settled = settled_cost(self.planned, measured)
        if self.planned is None or settled > self.planned:
            if self.planned is not None:  # a rise: at once, and held
                if now >= self.held_until:  # not a further rise during a hold: held longer if it keeps flapping
                    self.hold_s = min(self.hold_s * 2, MAX_HOLD_DOWN_S) if now < self.fell_at + self.hold_s else HOLD_DOWN_S
                self.held_until = max(self.held_until, now + self.hold_s)
            self.planned, self.pending = settled, None
            return True
        if settled == self.planned:
            self.pending = None
            return False
        if now < self.held_until:
            self.pending = settled
            return False
        self.planned, self.pending, self.fell_at = settled, None, now
        return True

    def release(self, now: float) -> bool:
        """The hold is over at ``now``: a fall that waited is planned with; whether it was."""
        if self.pending is None or now < self.held_until:
            return False
        self.planned, self.pending, self.fell_at = self.pending, None, now
        return True


@dataclass(frozen=True)
class OverlayLink:
    """An edge of the overlay graph: port a_port of broker a is linked to port b_port of
    broker b.  What the orchestrator plans with; the live link itself is :class:`dcp.link.Link`."""

    a: str
    a_port: int
    b: str
    b_port: int

    def reversed(self) -> OverlayLink:
        """The same link seen from b."""
        return OverlayLink(self.b, self.b_port, self.a, self.a_port)


class Overlay:
    """Brokers with their keys, and the links between them (an undirected multigraph).

    A broker is given by its :class:`~dcp.routing.KeyLayout`, or by one int key ``k``:
    then it has ports ``0 .. k.bit_length()-2`` (so that any bitmap of them is below
    ``k``; a key from ``allocate_keys(n, P)`` gives ports ``0 .. P-1``).  Overlays need
    not be connected; :func:`build_tree` raises when a subscriber is unreachable.
    ``costs`` maps a link end ``(broker, port)`` to what sending out of it costs
    (microseconds, >= 1; :func:`link_cost_us`); an end left out costs
    :data:`HOP_COST_US`, and costs of ends no link uses are dropped.

    Raises:
        RoutingError: a key below 3, not an int, owned by two brokers, or (a root key)
            sharing a factor with another root key; a link naming an unknown broker,
            joining a broker to itself, using a port out of range, or using a port that
            another link already uses; a cost that is not an int >= 1.
    """

    def __init__(
        self, keys: Mapping[str, int | KeyLayout], links: Iterable[OverlayLink] = (), costs: Mapping[Endpoint, int] | None = None,
    ) -> None:
        self.layouts: dict[str, KeyLayout] = {}
        self.links: tuple[OverlayLink, ...] = tuple(links)
        owner: dict[int, str] = {}
        for name, key in keys.items():
            if not isinstance(name, str) or not name:
                raise RoutingError(f"broker names are non-empty strings, got {name!r}")
            if isinstance(key, KeyLayout):
                layout = key
            elif not isinstance(key, int) or isinstance(key, bool):
                raise RoutingError(f"key of broker {name!r} is not an int: {key!r}")
            elif key < 3:
                raise RoutingError(f"key {key} of broker {name!r} is below 3")
            else:
                layout = KeyLayout.single(key)
            for other, other_layout in self.layouts.items():  # roots: any ints; the rest are primes
                if gcd(layout.root, other_layout.root) != 1:
                    raise RoutingError(
                        f"keys of brokers {other!r} ({other_layout.root}) and {name!r} ({layout.root}) are not coprime"
                    )
            for k in layout.keys:
                if owner.setdefault(k, name) != name:
                    raise RoutingError(f"brokers {owner[k]!r} and {name!r} both own key {k}")
            self.layouts[name] = layout
        self.keys: dict[str, int] = {name: layout.root for name, layout in self.layouts.items()}

        self._adjacent: dict[str, list[tuple[int, str, int]]] = {name: [] for name in self.keys}
        self._link_at: dict[Endpoint, OverlayLink] = {}
        for link in self.links:
            if not isinstance(link, OverlayLink):
                raise RoutingError(f"not an OverlayLink: {link!r}")
            for name in (link.a, link.b):
                if name not in self.keys:
                    raise RoutingError(f"link {link} names unknown broker {name!r}")
            if link.a == link.b:
                raise RoutingError(f"link {link} joins broker {link.a!r} to itself")
            for name, port in ((link.a, link.a_port), (link.b, link.b_port)):
                self._check_port(name, port, f"link {link}")
                used = self._link_at.get((name, port))
                if used is not None:
                    raise RoutingError(f"port {port} of broker {name!r} is used by two links: {used} and {link}")
                self._link_at[(name, port)] = link
            self._adjacent[link.a].append((link.a_port, link.b, link.b_port))
            self._adjacent[link.b].append((link.b_port, link.a, link.a_port))
        for neighbours in self._adjacent.values():
            neighbours.sort()
        self._link_ports: dict[str, int] = {name: 0 for name in self.keys}
        for name, port in self._link_at:
            self._link_ports[name] |= 1 << port
        self.costs: dict[Endpoint, int] = {}
        for end, cost in (costs or {}).items():
            if not isinstance(cost, int) or isinstance(cost, bool) or cost < 1:
                raise RoutingError(f"cost of link end {end!r} must be an int >= 1, got {cost!r}")
            if end in self._link_at and cost != HOP_COST_US:
                self.costs[end] = cost

    def cost(self, broker: str, port: int) -> int:
        """What sending out of ``port`` of ``broker`` (a link end) costs, microseconds."""
        return self.costs.get((broker, port), HOP_COST_US)

    def _check_port(self, broker: str, port: object, what: str) -> None:
        limit = self.layouts[broker].ports
        if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port < limit:
            raise RoutingError(
                f"{what}: port {port!r} of broker {broker!r} is out of range for its key "
                f"{self.keys[broker]} (ports 0..{limit - 1})"
            )

    def _known(self, broker: str, what: str) -> None:
        if broker not in self.keys:
            raise RoutingError(f"{what}: unknown broker {broker!r}")

    def neighbours(self, broker: str) -> list[tuple[int, str, int]]:
        """``(local port, other broker, other port)`` for every link of ``broker``, sorted."""
        self._known(broker, "neighbours")
        return list(self._adjacent[broker])

    def link_ports(self, broker: str) -> int:
        """The bitmap of ``broker``'s ports that links use."""
        self._known(broker, "link_ports")
        return self._link_ports[broker]

    def link_at(self, broker: str, port: int) -> OverlayLink | None:
        """The link on that port of that broker, seen from it (``a == broker``), or None."""
        link = self._link_at.get((broker, port))
        if link is None:
            return None
        return link if (link.a, link.a_port) == (broker, port) else link.reversed()

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Overlay:
        """Read ``{"brokers": {name: {"key": int} or {"ports": int, "keys": [int]}},
        "links": [{"a", "a_port", "b", "b_port"}]}``.

        A key may be an int or a decimal string (JSON has no big ints everywhere);
        extra fields of a broker are ignored; ``links`` may be left out.

        Raises:
            RoutingError: a missing or malformed field, or an invalid overlay.
        """
        try:
            brokers = data["brokers"]
            keys: dict[str, int | KeyLayout] = {}
            for name, entry in brokers.items():
                if "keys" in entry:
                    keys[name] = KeyLayout(int(entry["ports"]), [_int(k) for k in entry["keys"]])
                else:
                    keys[name] = _int(entry["key"])
            links = [
                OverlayLink(item["a"], int(item["a_port"]), item["b"], int(item["b_port"]))
                for item in data.get("links", ())
            ]
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise RoutingError(f"malformed overlay description: {exc!r}") from None
        return cls(keys, links)

    def to_dict(self) -> dict[str, Any]:
        """The inverse of :meth:`from_dict`; keys written as ints."""
        return {
            "brokers": {
                name: {"key": layout.root} if len(layout.keys) == 1 else {"ports": layout.ports, "keys": list(layout.keys)}
                for name, layout in self.layouts.items()
            },
            "links": [
                {"a": link.a, "a_port": link.a_port, "b": link.b, "b_port": link.b_port} for link in self.links
            ],
        }

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Overlay):
            return NotImplemented
        return self.layouts == other.layouts and self.links == other.links and self.costs == other.costs

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Overlay({len(self.keys)} brokers, {len(self.links)} links)"


def _int(value: int | str) -> int:
    """A key as JSON may carry it: an int or a decimal string."""
    return int(value, 10) if isinstance(value, str) else value


@dataclass(frozen=True)
class Tree:
    """A delivery tree and its topology number.

    ``bitmaps`` has one entry per broker that sends something (child links and local
    subscriber ports); with no subscribers it is empty and ``x == 0``, which routes
    nowhere (``0 mod key == 0``).  ``brokers`` always contains the source broker.
    ``links`` are ordered by the child's distance from the source, then parent name
    and port.
    """

    source: Endpoint
    subscribers: frozenset[Endpoint]
    bitmaps: dict[str, int] = field(hash=False)
    links: tuple[OverlayLink, ...]
    x: int

    @property
    def brokers(self) -> frozenset[str]:
        """The brokers the frame reaches: the source broker and every broker with a bitmap."""
        return frozenset(self.bitmaps) | {self.source[0]}

    @property
    def depth(self) -> int:
        """Brokers on the longest source-to-leaf path (1 for a single broker)."""
        level = {self.source[0]: 1}
        for link in self.links:  # parents come before their children
            level[link.b] = level[link.a] + 1
        return max(level.values())


def build_tree(overlay: Overlay, source: Endpoint, subscribers: Iterable[Endpoint]) -> Tree:
    """The delivery tree from ``source`` to ``subscribers`` over ``overlay``, with its ``X``.

    The frame enters the source broker on the source port.  Each subscriber broker
    hangs on a least-cost path from the source broker (:func:`distances`, costs of
    :meth:`Overlay.cost`; with no costs given, a fewest-hops path): the subscriber
    brokers in order of (distance, name), each walked back toward the root, at each
    step to a predecessor on a least-cost path that is already in the tree if there is
    one, else the smallest by (name, port), until a broker already in the tree.  Among
    parallel links of equal cost the lowest (parent port, child port) is used.  A
    source port that is a link port is allowed (a frame injected from a link); that
    link is then never used by the tree, since a broker never sends back on the port
    the frame came in on.  Deterministic: the same inputs give the same tree.

    Raises:
        RoutingError: the source or a subscriber names an unknown broker or a port out
            of range; a subscriber port is a link port, or is the source endpoint; a
            subscriber broker cannot be reached from the source broker.
    """
    src, src_port = source
    overlay._known(src, f"source {source!r}")
    overlay._check_port(src, src_port, f"source {source!r}")
    source = (src, src_port)

    wanted: set[Endpoint] = set()
    local: dict[str, int] = {}
    for endpoint in subscribers:
        broker, port = endpoint
        overlay._known(broker, f"subscriber {endpoint!r}")
        overlay._check_port(broker, port, f"subscriber {endpoint!r}")
        if (broker, port) == source:
            raise RoutingError(
                f"subscriber {endpoint!r} is the source endpoint (a broker never sends back on the ingress port)"
            )
        if overlay.link_ports(broker) >> port & 1:
            raise RoutingError(f"subscriber {endpoint!r} is on a link port of broker {broker!r}")
        wanted.add((broker, port))
        local[broker] = local.get(broker, 0) | 1 << port

    if not wanted:
        return Tree(source, frozenset(), {}, (), 0)

    distance = distances(overlay, source)

    for broker in sorted(local):
        if broker not in distance:
            raise RoutingError(f"subscriber broker {broker!r} is unreachable from source broker {src!r}")

    in_tree = {src}
    parent_link: dict[str, OverlayLink] = {}
    for target in sorted(local, key=lambda b: (distance[b], b)):
        child = target
        while child not in in_tree:
            closer = [
                (other, other_port, port)
                for port, other, other_port in overlay._adjacent[child]
                if other in distance and distance[other] + overlay.cost(other, other_port) == distance[child]
                and not (other == src and other_port == src_port)
            ]
            # min over (name, parent port, child port): among parallel links to the
            # chosen parent, the lowest (parent port, child port)
            joined = [c for c in closer if c[0] in in_tree]
            parent, parent_port, child_port = min(joined or closer)
            parent_link[child] = OverlayLink(parent, parent_port, child, child_port)
            in_tree.add(child)
            child = parent

    bitmaps = dict(local)
    for link in parent_link.values():
        bitmaps[link.a] = bitmaps.get(link.a, 0) | 1 << link.a_port
    bitmaps = {broker: bitmaps[broker] for broker in sorted(bitmaps)}
    links = tuple(sorted(parent_link.values(), key=lambda l: (distance[l.b], l.a, l.a_port, l.b_port)))
    residues: dict[int, int] = {}
    for broker, bitmap in bitmaps.items():
        residues.update(overlay.layouts[broker].residues(bitmap))
    x = encode(residues)
    return Tree(source, frozenset(wanted), bitmaps, links, x)


def distances(overlay: Overlay, source: Endpoint) -> dict[str, int]:
    """The least cost (microseconds, :meth:`Overlay.cost` per link) from ``source``'s
    broker to every broker it reaches (Dijkstra).  The link on the source port is not
    used: a broker never sends back on the port a frame came in on."""
    src, src_port = source

    def steps(broker: str) -> Iterator[tuple[str, int]]:
        for port, other, _ in overlay._adjacent[broker]:
            if broker != src or port != src_port:
                yield other, overlay.cost(broker, port)

    return least_costs(src, steps)


def least_costs(source: str, steps: Callable[[str], Iterable[tuple[str, int]]]) -> dict[str, int]:
    """The least cost from ``source`` to every broker it reaches (Dijkstra), where
    ``steps(broker)`` gives each neighbour of a broker and what the step there costs."""
    distance = {source: 0}
    done: set[str] = set()
    heap = [(0, source)]
    while heap:
        cost, broker = heapq.heappop(heap)
        if broker in done:
            continue
        done.add(broker)
        for other, step in steps(broker):
            through = cost + step
            if through < distance.get(other, through + 1):
                distance[other] = through
                heapq.heappush(heap, (through, other))
    return distance


@dataclass(frozen=True)
class Delivery:
    """What the data plane did with one frame (see :func:`simulate`)."""

    endpoints: Counter[Endpoint]
    """Copies delivered to non-link ports (local attachments)."""
    visits: Counter[str]
    """How many times each broker received the frame (dropped copies included)."""
    dropped_hop_limit: int
    """Copies dropped because their hop limit had reached 0."""


def simulate(
    overlay: Overlay,
    x: int,
    source: Endpoint,
    attached: Mapping[str, int] | None = None,
    hops: int = 32,
) -> Delivery:
    """Replay the stateless data plane for one frame with topology number ``x``.

    The frame enters broker ``source[0]`` on port ``source[1]`` with hop limit
    ``hops``.  A broker that receives a copy with hop limit 0 drops it; otherwise it
    sends one copy on each port of ``forward(x, layout, ingress, link ports | attached)``:
    a copy on a link port enters the broker at the other end with the hop limit minus
    one, a copy on any other port is delivered to that endpoint.  ``attached`` maps a
    broker to the bitmap of its attached local ports; a broker left out has every
    non-link port of its range attached.

    Raises:
        RoutingError: unknown source broker, negative port, ``x`` or ``hops``.
        RuntimeError: more than a million receptions (a forged ``x`` on a dense cyclic
            overlay can multiply copies at every hop).
    """
    src, src_port = source
    overlay._known(src, f"source {source!r}")
    if hops < 0:
        raise RoutingError(f"hop limit {hops} is negative")
    attached = {} if attached is None else attached
    masks: dict[str, int] = {}
    endpoints: Counter[Endpoint] = Counter()
    visits: Counter[str] = Counter()
    dropped = 0
    steps = 0
    queue: deque[tuple[str, int, int]] = deque([(src, src_port, hops)])
    while queue:
        broker, ingress, limit = queue.popleft()
        steps += 1
        if steps > _MAX_SIMULATION_STEPS:
            raise RuntimeError(f"simulation passed {_MAX_SIMULATION_STEPS} receptions; x={x} multiplies copies")
        visits[broker] += 1
        if limit <= 0:
            dropped += 1
            continue
        layout = overlay.layouts[broker]
        mask = masks.get(broker)
        if mask is None:
            links = overlay._link_ports[broker]
            default = ((1 << layout.ports) - 1) & ~links
            mask = masks[broker] = links | attached.get(broker, default)
        out = forward(x, layout, ingress, mask)
        while out:
            low = out & -out
            out ^= low
            port = low.bit_length() - 1
            link = overlay.link_at(broker, port)
            if link is None:
                endpoints[(broker, port)] += 1
            else:
                queue.append((link.b, link.b_port, limit - 1))
    return Delivery(endpoints, visits, dropped)


def shape_edges(shape: str, n: int) -> list[tuple[int, int]]:
    """Dial pairs ``(i, j)``, ``i > j``: broker ``i`` dials broker ``j``, for ``n`` brokers.

    ``line``: i -> i-1.  ``ring``: the line plus n-1 -> 0 when n >= 3.  ``star``:
    i -> 0.  ``mesh``: every i > j.  Ports are not named here: the brokers assign them
    when the links come up.

    Raises:
        RoutingError: an unknown shape or ``n < 1``.
    """
    if shape not in SHAPES:
        raise RoutingError(f"unknown overlay shape {shape!r} (known: {', '.join(SHAPES)})")
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise RoutingError(f"an overlay needs at least one broker, got n={n!r}")
    if shape == "line":
        return [(i, i - 1) for i in range(1, n)]
    if shape == "ring":
        return [(i, i - 1) for i in range(1, n)] + ([(n - 1, 0)] if n >= 3 else [])
    if shape == "star":
        return [(i, 0) for i in range(1, n)]
    return [(i, j) for i in range(1, n) for j in range(i)]
