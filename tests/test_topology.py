"""Tests of dcp.topology: delivery trees over broker overlays, and the data-plane simulation.

The property test is the routing contract of docs/design.md on random overlays
(up to 30 brokers, cycles and parallel links): replaying ``forward`` with the tree's X
delivers exactly one copy to every subscriber and none anywhere else, touches no
broker outside the tree, and terminates.  Every non-link port is attached in the
simulation, so a wrong bit in X would deliver somewhere and fail the test.
"""

from __future__ import annotations

import re
import random
from collections import Counter, deque
from functools import lru_cache
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

import dcp.topology as topology
from tests.purity import copy_with_import, loaded
from dcp.errors import RoutingError
from dcp.routing import KeyLayout, allocate_keys, encode, x_bits
from dcp.topology import Delivery, Overlay, OverlayLink, Tree, build_tree, shape_edges, simulate


# Ports 0..3 for every key (primes just above 2**4).
K = allocate_keys(5, 4)  # [17, 19, 23, 29, 31]


def line3() -> Overlay:
    """A:0 -- 0:B:1 -- 0:C"""
    return Overlay({"A": K[0], "B": K[1], "C": K[2]}, [OverlayLink("A", 0, "B", 0), OverlayLink("B", 1, "C", 0)])


def ring4() -> Overlay:
    """A:1 -- 0:B:1 -- 0:C:1 -- 0:D:1 -- 0:A"""
    return Overlay(
        {"A": K[0], "B": K[1], "C": K[2], "D": K[3]},
        [OverlayLink("A", 1, "B", 0), OverlayLink("B", 1, "C", 0), OverlayLink("C", 1, "D", 0), OverlayLink("D", 1, "A", 0)],
    )


def check_x(overlay: Overlay, tree: Tree) -> None:
    assert tree.x == encode({k: r for b, bitmap in tree.bitmaps.items() for k, r in overlay.layouts[b].residues(bitmap).items()})
    for broker, bitmap in tree.bitmaps.items():
        assert overlay.layouts[broker].decode(tree.x) == bitmap


# --------------------------------------------------------------------------- worked examples


def test_line_of_three() -> None:
    overlay = line3()
    tree = build_tree(overlay, ("A", 3), [("C", 1), ("B", 2), ("C", 3)])
    assert tree.bitmaps == {"A": 0b0001, "B": 0b0110, "C": 0b1010}
    assert tree.links == (OverlayLink("A", 0, "B", 0), OverlayLink("B", 1, "C", 0))
    assert tree.brokers == {"A", "B", "C"}
    assert tree.depth == 3
    assert tree.source == ("A", 3)
    assert tree.subscribers == {("B", 2), ("C", 1), ("C", 3)}
    check_x(overlay, tree)
    delivery = simulate(overlay, tree.x, ("A", 3))
    assert delivery.endpoints == Counter({("B", 2): 1, ("C", 1): 1, ("C", 3): 1})
    assert delivery.visits == Counter({"A": 1, "B": 1, "C": 1})
    assert delivery.dropped_hop_limit == 0


def test_line_from_the_middle_and_local_only() -> None:
    overlay = line3()
    tree = build_tree(overlay, ("B", 3), [("A", 1), ("C", 2)])
    assert tree.bitmaps == {"A": 0b0010, "B": 0b0011, "C": 0b0100}
    assert tree.links == (OverlayLink("B", 0, "A", 0), OverlayLink("B", 1, "C", 0))
    assert tree.depth == 2
    local = build_tree(overlay, ("C", 3), [("C", 1), ("C", 2)])
    assert local.bitmaps == {"C": 0b0110}
    assert local.links == ()
    assert local.depth == 1
    assert local.x == 0b0110  # X mod key == X when X is below the key
    assert simulate(overlay, local.x, ("C", 3)).endpoints == Counter({("C", 1): 1, ("C", 2): 1})


def test_ring_of_four_prefers_a_predecessor_already_in_the_tree() -> None:
    overlay = ring4()
    # C is two hops away both ways; neither B nor D in the tree: the smaller name wins
    only_c = build_tree(overlay, ("A", 3), [("C", 2)])
    assert only_c.bitmaps == {"A": 0b0010, "B": 0b0010, "C": 0b0100}
    assert only_c.links == (OverlayLink("A", 1, "B", 0), OverlayLink("B", 1, "C", 0))
    # D (distance 1) goes in first, then C hangs on D although B < D
    c_and_d = build_tree(overlay, ("A", 3), [("C", 2), ("D", 2)])
    assert c_and_d.bitmaps == {"A": 0b0001, "C": 0b0100, "D": 0b0101}
    assert c_and_d.links == (OverlayLink("A", 0, "D", 1), OverlayLink("D", 0, "C", 1))
    assert c_and_d.brokers == {"A", "C", "D"}
    # both B and D in the tree: C hangs on B, the smaller name
    all_three = build_tree(overlay, ("A", 3), [("B", 2), ("C", 2), ("D", 2)])
    assert all_three.bitmaps == {"A": 0b0011, "B": 0b0110, "C": 0b0100, "D": 0b0100}
    assert all_three.links == (OverlayLink("A", 0, "D", 1), OverlayLink("A", 1, "B", 0), OverlayLink("B", 1, "C", 0))
    for tree in (only_c, c_and_d, all_three):
        check_x(overlay, tree)
        delivery = simulate(overlay, tree.x, ("A", 3))
        assert delivery.endpoints == Counter(dict.fromkeys(tree.subscribers, 1))
        assert delivery.visits == Counter(dict.fromkeys(tree.brokers, 1))


def test_parallel_links_use_the_lowest_port_pair() -> None:
    overlay = Overlay({"A": K[0], "B": K[1]}, [OverlayLink("A", 2, "B", 1), OverlayLink("B", 0, "A", 1), OverlayLink("A", 0, "B", 3)])
    down = build_tree(overlay, ("A", 3), [("B", 2)])
    assert down.links == (OverlayLink("A", 0, "B", 3),)
    assert down.bitmaps == {"A": 0b0001, "B": 0b0100}
    up = build_tree(overlay, ("B", 2), [("A", 3)])
    assert up.links == (OverlayLink("B", 0, "A", 1),)
    assert up.bitmaps == {"A": 0b1000, "B": 0b0001}
    for tree in (down, up):
        delivery = simulate(overlay, tree.x, tree.source)
        assert delivery.endpoints == Counter(dict.fromkeys(tree.subscribers, 1))
        assert delivery.visits == Counter({"A": 1, "B": 1})


def test_source_on_a_link_port_never_uses_that_link() -> None:
    """A frame injected from a link: the broker never sends back on the ingress port."""
    overlay = ring4()
    # enters A from D's link (A port 0): D must be reached the long way round
    tree = build_tree(overlay, ("A", 0), [("A", 2), ("D", 2)])
    assert tree.links == (OverlayLink("A", 1, "B", 0), OverlayLink("B", 1, "C", 0), OverlayLink("C", 1, "D", 0))
    assert tree.bitmaps["A"] == 0b0110
    delivery = simulate(overlay, tree.x, ("A", 0))
    assert delivery.endpoints == Counter({("A", 2): 1, ("D", 2): 1})
    assert delivery.visits == Counter({"A": 1, "B": 1, "C": 1, "D": 1})
    # on a line the only way out is the ingress link: unreachable
    with pytest.raises(RoutingError, match="'B' is unreachable"):
        build_tree(line3(), ("A", 0), [("B", 2)])


def test_no_subscribers_routes_nowhere() -> None:
    overlay = line3()
    tree = build_tree(overlay, ("B", 2), [])
    assert tree.bitmaps == {}
    assert tree.x == 0
    assert tree.links == ()
    assert tree.brokers == {"B"}
    assert tree.depth == 1
    delivery = simulate(overlay, 0, ("B", 2))
    assert delivery.endpoints == Counter()
    assert delivery.visits == Counter({"B": 1})


def test_trees_are_deterministic_and_independent_of_input_order() -> None:
    overlay = ring4()
    flipped = Overlay(overlay.layouts, [link.reversed() for link in reversed(overlay.links)])
    subs = [("B", 2), ("C", 2), ("D", 3)]
    first = build_tree(overlay, ("A", 3), subs)
    assert build_tree(overlay, ("A", 3), reversed(subs)) == first
    assert build_tree(flipped, ("A", 3), iter(subs)) == first
    assert hash(first) == hash(build_tree(overlay, ("A", 3), subs))


def test_a_wrong_bit_is_caught_by_the_simulation() -> None:
    """The property test is not vacuous: one extra bit in a bitmap delivers a stray copy."""
    overlay = ring4()
    tree = build_tree(overlay, ("A", 3), [("C", 2)])
    bitmaps = dict(tree.bitmaps, B=tree.bitmaps["B"] | 0b1000)
    forged = encode({overlay.keys[b]: r for b, r in bitmaps.items()})
    delivery = simulate(overlay, forged, ("A", 3))
    assert delivery.endpoints == Counter({("C", 2): 1, ("B", 3): 1})
    # and a port left unattached drops it
    quiet = simulate(overlay, forged, ("A", 3), attached={"B": 0b0100})
    assert quiet.endpoints == Counter({("C", 2): 1})


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("keys", "links", "message"),
    [
        ({"A": 17, "B": 19}, [OverlayLink("A", 0, "Z", 0)], "unknown broker 'Z'"),
        ({"A": 17, "B": 19}, [OverlayLink("A", 0, "A", 1)], "joins broker 'A' to itself"),
        ({"A": 17, "B": 19, "C": 23}, [OverlayLink("A", 0, "B", 0), OverlayLink("C", 0, "A", 0)], "port 0 of broker 'A' is used by two links"),
        ({"A": 17, "B": 19}, [OverlayLink("A", 0, "B", 0), OverlayLink("A", 1, "B", 0)], "port 0 of broker 'B' is used by two links"),
        ({"A": 17, "B": 19}, [OverlayLink("A", 4, "B", 0)], "port 4 of broker 'A' is out of range"),
        ({"A": 17, "B": 19}, [OverlayLink("A", 0, "B", -1)], "port -1 of broker 'B' is out of range"),
        ({"A": 17, "B": 2}, [], "key 2 of broker 'B' is below 3"),
        ({"A": 17, "B": 17}, [], "brokers 'A' (17) and 'B' (17) are not coprime"),
        ({"A": 15, "B": 35}, [], "brokers 'A' (15) and 'B' (35) are not coprime"),
        ({"A": 17, "B": "19"}, [], "key of broker 'B' is not an int"),
    ],
)
def test_overlay_validation(keys: dict, links: list[OverlayLink], message: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(RoutingError, match=re.escape(message)):
        Overlay(keys, links)


def test_port_range_follows_the_key() -> None:
    # 2**4 < 17 < 2**5: ports 0..3; a link on the key's top bit would let bitmaps reach the key
    Overlay({"A": 17, "B": 2**61 - 1}, [OverlayLink("A", 3, "B", 59)])
    with pytest.raises(RoutingError, match="port 60 of broker 'B'"):
        Overlay({"A": 17, "B": 2**61 - 1}, [OverlayLink("A", 3, "B", 60)])


@pytest.mark.parametrize(
    ("source", "subscribers", "message"),
    [
        (("Z", 1), [("B", 2)], "unknown broker 'Z'"),
        (("A", 1), [("Y", 2)], "unknown broker 'Y'"),
        (("A", 1), [("B", 1)], r"subscriber \('B', 1\) is on a link port of broker 'B'"),
        (("A", 1), [("B", 4)], "port 4 of broker 'B' is out of range"),
        (("A", 1), [("B", -2)], "port -2 of broker 'B' is out of range"),
        (("A", 9), [("B", 2)], r"source \('A', 9\): port 9 of broker 'A' is out of range"),
        (("A", 1), [("B", 2), ("A", 1)], r"subscriber \('A', 1\) is the source endpoint"),
        (("A", 1), [("B", 2), ("D", 1)], "subscriber broker 'D' is unreachable from source broker 'A'"),
    ],
)
def test_build_tree_validation(source: tuple[str, int], subscribers: list[tuple[str, int]], message: str) -> None:
    overlay = Overlay({"A": K[0], "B": K[1], "C": K[2], "D": K[3]}, [OverlayLink("A", 0, "B", 0), OverlayLink("B", 1, "C", 0)])
    with pytest.raises(RoutingError, match=message):
        build_tree(overlay, source, subscribers)


def test_neighbours_and_link_ports() -> None:
    overlay = ring4()
    assert overlay.neighbours("A") == [(0, "D", 1), (1, "B", 0)]
    assert overlay.neighbours("C") == [(0, "B", 1), (1, "D", 0)]
    assert overlay.link_ports("A") == 0b11
    lonely = Overlay({"A": 17, "B": 19, "C": 23}, [OverlayLink("C", 3, "A", 2)])
    assert lonely.neighbours("B") == []
    assert lonely.link_ports("B") == 0
    assert lonely.link_ports("A") == 0b0100
    assert lonely.neighbours("A") == [(2, "C", 3)]
    with pytest.raises(RoutingError, match="unknown broker 'Q'"):
        overlay.neighbours("Q")


def test_dict_round_trip() -> None:
    overlay = ring4()
    data = overlay.to_dict()
    assert data["brokers"]["A"] == {"key": K[0]}
    assert data["links"][0] == {"a": "A", "a_port": 1, "b": "B", "b_port": 0}
    assert Overlay.from_dict(data) == overlay
    assert Overlay.from_dict(data).to_dict() == data
    big = 2**127 - 1
    text_keys = {"brokers": {"A": {"key": "17", "host": "10.0.0.1"}, "B": {"key": str(big)}}, "links": [{"a": "A", "a_port": 0, "b": "B", "b_port": 100}]}
    read = Overlay.from_dict(text_keys)
    assert read.keys == {"A": 17, "B": big}
    assert read.to_dict()["brokers"] == {"A": {"key": 17}, "B": {"key": big}}
    assert Overlay.from_dict({"brokers": {"A": {"key": 17}}}).links == ()
    layout = _layout(200, 0)
    many = Overlay({"A": 17, "B": layout}, [OverlayLink("A", 0, "B", 199)])
    assert many.to_dict()["brokers"]["B"] == {"ports": 200, "keys": list(layout.keys)}
    assert Overlay.from_dict(many.to_dict()) == many


@pytest.mark.parametrize(
    "data",
    [{}, {"brokers": {"A": {}}}, {"brokers": {"A": {"key": "x17"}}}, {"brokers": {"A": {"key": 17}}, "links": [{"a": "A"}]}],
)
def test_from_dict_rejects_malformed_data(data: dict) -> None:  # type: ignore[type-arg]
    with pytest.raises(RoutingError, match="malformed overlay"):
        Overlay.from_dict(data)


def test_shape_edges() -> None:
    assert shape_edges("line", 1) == []
    assert shape_edges("line", 4) == [(1, 0), (2, 1), (3, 2)]
    assert shape_edges("ring", 2) == [(1, 0)]
    assert shape_edges("ring", 4) == [(1, 0), (2, 1), (3, 2), (3, 0)]
    assert shape_edges("star", 4) == [(1, 0), (2, 0), (3, 0)]
    assert shape_edges("mesh", 4) == [(1, 0), (2, 0), (2, 1), (3, 0), (3, 1), (3, 2)]
    assert len(shape_edges("mesh", 10)) == 45
    for shape in topology.SHAPES:
        assert all(i > j >= 0 for i, j in shape_edges(shape, 7))
    with pytest.raises(RoutingError, match="unknown overlay shape 'tree'"):
        shape_edges("tree", 3)
    with pytest.raises(RoutingError, match="n=0"):
        shape_edges("ring", 0)


# --------------------------------------------------------------------------- simulation


def test_forged_x_on_a_cycle_terminates_and_counts_hop_limit_drops() -> None:
    overlay = ring4()
    # a forged X that names both ring links at every broker: copies circle both ways
    flood = encode({k: 0b0011 for k in overlay.keys.values()})
    delivery = simulate(overlay, flood, ("A", 3), hops=5)
    # A forwards at limit 5; one copy each way round is received at limits 4, 3, 2, 1, 0
    assert sum(delivery.visits.values()) == 1 + 2 * 5
    assert delivery.visits["A"] == 1 + 2  # it came back to A from both sides
    assert delivery.dropped_hop_limit == 2
    assert delivery.endpoints == Counter()
    assert simulate(overlay, flood, ("A", 3), hops=0) == Delivery(Counter(), Counter({"A": 1}), 1)


@settings(max_examples=60, deadline=None)
@given(shape=st.sampled_from(["ring", "mesh"]), n=st.integers(3, 6), x=st.integers(0, 2**200), hops=st.integers(1, 4))
def test_random_x_terminates_and_drops_exactly_the_last_level(shape: str, n: int, x: int, hops: int) -> None:
    """Receptions come in levels, one per hop: the copies dropped at limit 0 are the last level."""
    names = [f"n{i}" for i in range(n)]
    used = dict.fromkeys(names, 0)
    links = []
    for i, j in shape_edges(shape, n):
        links.append(OverlayLink(names[i], used[names[i]], names[j], used[names[j]]))
        used[names[i]] += 1
        used[names[j]] += 1
    overlay = Overlay(dict(zip(names, allocate_keys(n, 8))), links)
    runs = [simulate(overlay, x, ("n0", 7), hops=h) for h in (hops - 1, hops)]
    assert runs[1].dropped_hop_limit == sum(runs[1].visits.values()) - sum(runs[0].visits.values())
    assert runs[1].visits >= runs[0].visits  # the shorter run is a prefix of the longer
    assert runs[1].endpoints >= runs[0].endpoints


def test_simulation_caps_its_work(monkeypatch: pytest.MonkeyPatch) -> None:
    # a full mesh with every link bit set multiplies copies at every hop
    keys = allocate_keys(6, 8)
    names = [f"m{i}" for i in range(6)]
    free = dict.fromkeys(names, 0)
    links = []
    for i, j in shape_edges("mesh", 6):
        links.append(OverlayLink(names[i], free[names[i]], names[j], free[names[j]]))
        free[names[i]] += 1
        free[names[j]] += 1
    overlay = Overlay(dict(zip(names, keys)), links)
    flood = encode({k: 0b11111 for k in keys})
    assert simulate(overlay, flood, ("m0", 7), hops=3).dropped_hop_limit == 5 * 4 * 4
    assert topology._MAX_SIMULATION_STEPS == 10**6
    monkeypatch.setattr(topology, "_MAX_SIMULATION_STEPS", 10_000)  # 5 * 4**31 copies otherwise
    with pytest.raises(RuntimeError, match="multiplies copies"):
        simulate(overlay, flood, ("m0", 7), hops=32)


# --------------------------------------------------------------------------- property


@lru_cache(maxsize=None)
def _keys(ports: int) -> tuple[int, ...]:
    return tuple(allocate_keys(30, ports))


@lru_cache(maxsize=None)
def _layout(ports: int, seed: int) -> KeyLayout:
    return KeyLayout.random(ports, rng=random.Random(f"{ports}/{seed}"))


@st.composite
def overlays(draw: st.DrawFn) -> tuple[Overlay, dict[str, list[int]]]:
    """A random connected overlay: a random spanning tree plus extra edges (cycles, parallel
    links); and the port numbers each broker uses.  Some brokers may have a key layout of
    many ports, of which 8 to 16 are used, in its banks as in its root."""
    n = draw(st.integers(1, 30))
    ports = draw(st.integers(8, 16))
    names = [f"b{i}" for i in range(n)]  # b10 < b2: names do not sort like indices
    keys: dict[str, int | KeyLayout] = dict(zip(names, draw(st.permutations(_keys(ports)[:n]))))
    usable = {name: list(range(ports)) for name in names}
    for i in draw(st.lists(st.integers(0, n - 1), unique=True, max_size=n)):
        layout = _layout(draw(st.sampled_from([200, 1100, 10_000])), i)
        keys[names[i]] = layout
        usable[names[i]] = sorted(random.Random(i).sample(range(layout.ports), ports))
    free = {name: set(usable[name]) for name in names}
    reserve = 2  # every broker keeps local ports for a source or subscribers

    def take(name: str) -> int:
        port = draw(st.sampled_from(sorted(free[name])))
        free[name].remove(port)
        return port

    links: list[OverlayLink] = []
    for i in range(1, n):
        parents = [names[j] for j in range(i) if len(free[names[j]]) > reserve]
        parent = draw(st.sampled_from(parents))
        links.append(OverlayLink(names[i], take(names[i]), parent, take(parent)))
    for _ in range(draw(st.integers(0, 2 * n if n > 1 else 0))):
        a, b = draw(st.lists(st.sampled_from(names), min_size=2, max_size=2, unique=True))
        if len(free[a]) > reserve and len(free[b]) > reserve:
            links.append(OverlayLink(a, take(a), b, take(b)))  # may repeat a pair: parallel links
    links = draw(st.permutations(links))
    return Overlay(keys, links), usable


def _distances(overlay: Overlay, source: str) -> dict[str, int]:
    distance = {source: 0}
    queue = deque([source])
    while queue:
        broker = queue.popleft()
        for _, other, _ in overlay.neighbours(broker):
            if other not in distance:
                distance[other] = distance[broker] + 1
                queue.append(other)
    return distance


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_every_subscriber_gets_exactly_one_copy(data: st.DataObject) -> None:
    overlay, usable = data.draw(overlays())
    local = {b: [p for p in usable[b] if not overlay.link_ports(b) >> p & 1] for b in overlay.keys}
    endpoints = sorted((b, p) for b, ps in local.items() for p in ps)
    source = data.draw(st.sampled_from(endpoints), label="source")
    others = [e for e in endpoints if e != source]
    if data.draw(st.booleans(), label="everyone") and len(others) < 200:
        subscribers = set(others)
    else:
        subscribers = set(data.draw(st.lists(st.sampled_from(others), max_size=40), label="subscribers"))

    tree = build_tree(overlay, source, subscribers)
    attached = {b: sum(1 << p for p in ps) for b, ps in local.items()}
    delivery = simulate(overlay, tree.x, source, attached=attached, hops=32)

    # the routing contract
    assert delivery.endpoints == Counter(dict.fromkeys(subscribers, 1))
    assert set(delivery.visits) <= tree.brokers
    assert delivery.visits == Counter(dict.fromkeys(tree.brokers, 1))
    assert delivery.dropped_hop_limit == 0
    assert x_bits(tree.x) <= sum(k.bit_length() for b in tree.brokers for k in overlay.layouts[b].keys)
    check_x(overlay, tree)

    # the tree: overlay links, parent before child, shortest paths, no useless leaves
    assert tree.subscribers == subscribers
    assert len(tree.links) == len(tree.brokers) - 1
    overlay_links = set(overlay.links)
    distance = _distances(overlay, source[0])
    seen = {source[0]}
    for link in tree.links:
        assert link in overlay_links or link.reversed() in overlay_links
        assert link.a in seen and link.b not in seen
        assert distance[link.b] == distance[link.a] + 1
        seen.add(link.b)
    hosts = {b for b, _ in subscribers}
    parents = {link.a for link in tree.links}
    assert all(b in hosts for b in tree.brokers - parents - {source[0]})
    if subscribers:
        assert tree.depth == max(distance[b] for b in hosts) + 1
    assert tree.depth <= max(distance.values()) + 1
    expected: dict[str, int] = {}
    for broker, port in [(link.a, link.a_port) for link in tree.links] + sorted(subscribers):
        expected[broker] = expected.get(broker, 0) | 1 << port
    assert tree.bitmaps == expected  # child links and local subscribers, nothing else

    # deterministic, whatever the order of the links and of the subscribers
    shuffled = Overlay(overlay.layouts, [link.reversed() for link in reversed(overlay.links)])
    assert build_tree(shuffled, source, sorted(subscribers, reverse=True)) == tree


# --------------------------------------------------------------------------- imports

def test_topology_imports_no_io_modules() -> None:
    assert loaded(["topology"], ["asyncio", "socket"]) == "[]"


def test_import_probe_detects_io_imports(tmp_path: Path) -> None:
    """The probe is not vacuous: a topology.py that imports asyncio is caught."""
    fake = copy_with_import(tmp_path, ["errors.py", "routing.py"], "topology.py", "import asyncio\n")
    assert loaded(["topology"], ["asyncio", "socket"], fake) == "['asyncio', 'socket']"


# --------------------------------------------------------------------------- pinned by mutation testing (docs/mutation.md)


def ring3() -> Overlay:
    """A:1 -- 0:B:1 -- 0:C:1 -- 0:A, so that X with bitmap 0b10 everywhere sends one copy round forever."""
    return Overlay({"A": K[0], "B": K[1], "C": K[2]}, [OverlayLink("A", 1, "B", 0), OverlayLink("B", 1, "C", 0), OverlayLink("C", 1, "A", 0)])


ROUND = encode({K[0]: 0b10, K[1]: 0b10, K[2]: 0b10})
NOTHING_ATTACHED = {"A": 0, "B": 0, "C": 0}


def routing_error(call, *args, **kwargs) -> str:  # type: ignore[no-untyped-def]
    with pytest.raises(RoutingError) as info:
        call(*args, **kwargs)
    return str(info.value)


@pytest.mark.parametrize(
    ("keys", "links", "message"),
    [
        ({"": 17}, [], "broker names are non-empty strings, got ''"),
        ({5: 17}, [], "broker names are non-empty strings, got 5"),
        ({"A": 17, "B": 19}, [("A", 0, "B", 0)], "not an OverlayLink: ('A', 0, 'B', 0)"),
        (
            {"A": 17, "B": 19},
            [OverlayLink("A", 4, "B", 0)],
            "link OverlayLink(a='A', a_port=4, b='B', b_port=0): port 4 of broker 'A' is out of range for its key 17 (ports 0..3)",
        ),
        (
            {"A": 17, "B": 19},
            [OverlayLink("A", True, "B", 0)],  # type: ignore[arg-type]
            "link OverlayLink(a='A', a_port=True, b='B', b_port=0): port True of broker 'A' is out of range for its key 17 (ports 0..3)",
        ),
    ],
)
def test_overlay_errors_in_full(keys: dict, links: list, message: str) -> None:  # type: ignore[type-arg]
    assert routing_error(Overlay, keys, links) == message


def test_a_key_of_3_is_the_least_and_gives_one_port() -> None:
    overlay = Overlay({"A": 3, "B": 5}, [OverlayLink("A", 0, "B", 0)])
    assert overlay.link_ports("A") == 1
    assert routing_error(Overlay, {"A": 3}, [OverlayLink("A", 1, "A", 0)]) == "link OverlayLink(a='A', a_port=1, b='A', b_port=0) joins broker 'A' to itself"
    assert routing_error(Overlay, {"A": 3, "B": 5}, [OverlayLink("A", 1, "B", 0)]).endswith("is out of range for its key 3 (ports 0..0)")


def test_lookups_of_an_unknown_broker_say_which_lookup() -> None:
    assert routing_error(ring3().neighbours, "Q") == "neighbours: unknown broker 'Q'"
    assert routing_error(ring3().link_ports, "Q") == "link_ports: unknown broker 'Q'"


def test_overlays_are_equal_when_keys_and_links_are() -> None:
    keys = {"A": K[0], "B": K[1]}
    assert Overlay(keys, [OverlayLink("A", 0, "B", 0)]) == Overlay(dict(keys), [OverlayLink("A", 0, "B", 0)])
    assert Overlay(keys, [OverlayLink("A", 0, "B", 0)]) != Overlay(keys, [])
    assert Overlay(keys, [OverlayLink("A", 0, "B", 0)]) != Overlay(keys, [OverlayLink("A", 0, "B", 1)])
    assert Overlay(keys, []) != Overlay({"A": K[0], "B": K[2]}, [])


@pytest.mark.parametrize(
    ("source", "subscribers", "message"),
    [
        (("Z", 1), [("B", 2)], "source ('Z', 1): unknown broker 'Z'"),
        (("A", 2), [("Y", 2)], "subscriber ('Y', 2): unknown broker 'Y'"),
        (("A", 2), [("B", 4)], "subscriber ('B', 4): port 4 of broker 'B' is out of range for its key 19 (ports 0..3)"),
    ],
)
def test_build_tree_errors_in_full(source: tuple[str, int], subscribers: list[tuple[str, int]], message: str) -> None:
    assert routing_error(build_tree, ring3(), source, subscribers) == message


def test_simulate_has_a_hop_limit_of_32_by_default() -> None:
    delivery = simulate(ring3(), ROUND, ("A", 2), NOTHING_ATTACHED)
    assert delivery.visits == Counter({"A": 11, "B": 11, "C": 11})  # received at limits 32 .. 0
    assert delivery.dropped_hop_limit == 1


def test_simulate_errors_in_full() -> None:
    assert routing_error(simulate, ring3(), ROUND, ("Z", 0)) == "source ('Z', 0): unknown broker 'Z'"
    assert routing_error(simulate, ring3(), ROUND, ("A", 2), hops=-1) == "hop limit -1 is negative"


def test_simulation_cap_counts_receptions_exactly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(topology, "_MAX_SIMULATION_STEPS", 100)
    delivery = simulate(ring3(), ROUND, ("A", 2), NOTHING_ATTACHED, hops=99)  # one copy: 100 receptions
    assert sum(delivery.visits.values()) == 100 and delivery.dropped_hop_limit == 1
    with pytest.raises(RuntimeError) as info:
        simulate(ring3(), ROUND, ("A", 2), NOTHING_ATTACHED, hops=100)
    assert str(info.value) == f"simulation passed 100 receptions; x={ROUND} multiplies copies"


def test_by_default_every_port_in_the_keys_range_is_attached() -> None:
    alone = Overlay({"A": 17})  # ports 0..3
    assert simulate(alone, 0b0111, ("A", 3)).endpoints == Counter({("A", 0): 1, ("A", 1): 1, ("A", 2): 1})
    # 16 % 17 names port 4, which a key of 17 does not have
    assert simulate(alone, 16, ("A", 3)) == Delivery(Counter(), Counter({"A": 1}), 0)


def test_simulate_counts_every_copy_an_endpoint_gets() -> None:
    # A also delivers to its port 3 each time the copy comes round: received at limits 5 and 2
    x = encode({K[0]: 0b1010, K[1]: 0b10, K[2]: 0b10})
    delivery = simulate(ring3(), x, ("A", 2), {"A": 0b1000, "B": 0, "C": 0}, hops=5)
    assert delivery.endpoints == Counter({("A", 3): 2})
    assert delivery.visits == Counter({"A": 2, "B": 2, "C": 2})


def test_shape_edges_boundaries_and_errors() -> None:
    assert shape_edges("ring", 3) == [(1, 0), (2, 1), (2, 0)]
    assert routing_error(shape_edges, "tree", 3) == "unknown overlay shape 'tree' (known: line, ring, star, mesh)"
    assert routing_error(shape_edges, "line", True) == "an overlay needs at least one broker, got n=True"
