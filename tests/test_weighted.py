"""Trees by cost (dcp.topology, pure): least-cost paths against a brute-force search,
and the hysteresis that keeps noise from changing a tree."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from dcp.routing import allocate_keys
from dcp.topology import (
    COST_STEP_US, HOP_COST_US, Endpoint, Overlay, OverlayLink, build_tree, link_cost_us, settled_cost, simulate,
)

NAMES = ["b0", "b1", "b2", "b3", "b4"]
KEYS = dict(zip(NAMES, allocate_keys(len(NAMES), 8)))  # ports 0..7; links on 0..4, agents on 5..7


@st.composite
def weighted_overlays(draw: st.DrawFn) -> Overlay:
    """Up to 5 brokers, random links (parallel ones too), a random cost on each end."""
    links: list[OverlayLink] = []
    used: set[Endpoint] = set()
    for a, b in draw(st.lists(st.lists(st.sampled_from(NAMES), min_size=2, max_size=2, unique=True), max_size=9)):
        port_a = next((p for p in range(5) if (a, p) not in used), None)
        port_b = next((p for p in range(5) if (b, p) not in used), None)
        if port_a is not None and port_b is not None:
            used |= {(a, port_a), (b, port_b)}
            links.append(OverlayLink(a, port_a, b, port_b))
    costs = {end: draw(st.integers(1, 3_000)) for end in sorted(used)}
    return Overlay(KEYS, links, costs)


def cheapest(overlay: Overlay, source: str, target: str) -> int | None:
    """The least cost from ``source`` to ``target`` over every simple path (brute force)."""
    best: int | None = None

    def walk(broker: str, cost: int, seen: frozenset[str]) -> None:
        nonlocal best
        if broker == target:
            best = cost if best is None else min(best, cost)
            return
        for port, other, _ in overlay.neighbours(broker):
            if other not in seen:
                walk(other, cost + overlay.cost(broker, port), seen | {other})

    walk(source, 0, frozenset({source}))
    return best


@settings(max_examples=300, deadline=None)
@given(overlay=weighted_overlays(), data=st.data())
def test_every_subscriber_gets_a_least_cost_path_and_one_copy(overlay: Overlay, data: st.DataObject) -> None:
    source = (data.draw(st.sampled_from(NAMES)), 5)
    reachable = [name for name in NAMES if cheapest(overlay, source[0], name) is not None]
    subscribers = data.draw(st.lists(st.tuples(st.sampled_from(reachable), st.integers(5, 7)), unique=True).filter(lambda s: source not in s))
    tree = build_tree(overlay, source, subscribers)
    cost = {source[0]: 0}
    for link in tree.links:  # parents before children
        cost[link.b] = cost[link.a] + overlay.cost(link.a, link.a_port)
    for broker, _ in subscribers:
        assert cost[broker] == cheapest(overlay, source[0], broker)
    delivery = simulate(overlay, tree.x, source, attached={name: 0b11100000 for name in NAMES})
    assert delivery.endpoints == {end: 1 for end in subscribers}


def triangle(direct: int, detour: int) -> Overlay:
    """b0 - b1 directly, and b0 - b2 - b1; each end of a link costs the given amount."""
    links = [OverlayLink("b0", 0, "b1", 0), OverlayLink("b0", 1, "b2", 0), OverlayLink("b2", 1, "b1", 1)]
    costs = {("b0", 0): direct, ("b1", 0): direct, ("b0", 1): detour, ("b2", 0): detour, ("b2", 1): detour, ("b1", 1): detour}
    return Overlay({name: KEYS[name] for name in ("b0", "b1", "b2")}, links, costs)


@settings(max_examples=200, deadline=None)
@given(
    direct=st.integers(HOP_COST_US, 20_000), detour=st.integers(HOP_COST_US, 20_000),
    noise=st.lists(st.tuples(st.floats(-0.15, 0.15), st.floats(-0.15, 0.15)), min_size=1, max_size=40),
)
def test_noise_under_the_hysteresis_never_changes_a_tree(direct: int, detour: int, noise: list[tuple[float, float]]) -> None:
    """Measurements within 15 % of their level, however close the two paths are: the
    costs planned with stay put, so the tree does too (no flapping)."""
    planned_direct, planned_detour = direct, detour
    first = build_tree(triangle(direct, detour), ("b0", 5), [("b1", 5)]).x
    for a, b in noise:
        planned_direct = settled_cost(planned_direct, int(direct * (1 + a)))
        planned_detour = settled_cost(planned_detour, int(detour * (1 + b)))
        assert build_tree(triangle(planned_direct, planned_detour), ("b0", 5), [("b1", 5)]).x == first


def test_a_congested_link_moves_the_tree_and_its_recovery_moves_it_back() -> None:
    calm = link_cost_us(0.3, 0, 1e6)
    congested = link_cost_us(300.0, 2_000_000, 125_000)  # 300 ms round trip, 2 MB queued at 1 Mbit/s
    assert congested > 100 * calm
    assert settled_cost(calm, congested) == congested and settled_cost(congested, calm) == calm
    assert settled_cost(calm, calm + COST_STEP_US) == calm  # a small rise is noise
    before = build_tree(triangle(calm, calm), ("b0", 5), [("b1", 5)])
    during = build_tree(triangle(congested, calm), ("b0", 5), [("b1", 5)])
    after = build_tree(triangle(calm, calm), ("b0", 5), [("b1", 5)])
    assert before.brokers == after.brokers == {"b0", "b1"} and during.brokers == {"b0", "b1", "b2"}


def test_without_costs_the_tree_is_the_fewest_hops_tree() -> None:
    even = triangle(HOP_COST_US, HOP_COST_US)
    assert even.costs == {}  # the default cost is not stored
    assert build_tree(even, ("b0", 5), [("b1", 5)]).brokers == {"b0", "b1"}


def test_a_cost_rises_at_once_and_falls_only_after_its_hold_down_which_grows_while_it_flaps() -> None:
    from dcp.topology import HOLD_DOWN_S, MAX_HOLD_DOWN_S, LinkCost

    cost = LinkCost()
    assert cost.measure(HOP_COST_US, 0.0) and cost.planned == HOP_COST_US
    assert not cost.measure(HOP_COST_US + 500, 0.5)  # noise: within the hysteresis
    assert cost.measure(400_000, 1.0) and cost.planned == 400_000  # congested: at once
    assert not cost.measure(HOP_COST_US, 2.0) and cost.planned == 400_000  # its streams left, it drained: held
    assert cost.pending == HOP_COST_US and cost.held_until == 1.0 + HOLD_DOWN_S
    assert not cost.release(1.0 + HOLD_DOWN_S - 0.1)
    assert cost.release(1.0 + HOLD_DOWN_S) and cost.planned == HOP_COST_US and cost.pending is None
    # back on it, congested again within a hold of falling: held twice as long, and so on up to the cap
    held = HOLD_DOWN_S
    at = 1.0 + HOLD_DOWN_S
    for _ in range(6):
        at += 1.0
        assert cost.measure(400_000, at)
        held = min(held * 2, MAX_HOLD_DOWN_S)
        assert cost.held_until == at + held
        assert not cost.measure(HOP_COST_US, at + 0.5)  # held
        at = cost.held_until
        assert cost.release(at)
    assert held == MAX_HOLD_DOWN_S
    # a rise long after the last fall starts again from the base hold
    assert cost.measure(400_000, at + 10 * MAX_HOLD_DOWN_S) and cost.held_until == at + 10 * MAX_HOLD_DOWN_S + HOLD_DOWN_S


def test_a_rise_during_the_hold_cancels_the_fall_that_waited() -> None:
    from dcp.topology import LinkCost

    cost = LinkCost()
    cost.measure(HOP_COST_US, 0.0)
    cost.measure(400_000, 1.0)
    assert not cost.measure(HOP_COST_US, 2.0) and cost.pending == HOP_COST_US
    assert not cost.measure(400_000, 3.0) and cost.pending is None  # as planned: nothing waits any more
    assert not cost.release(100.0) and cost.planned == 400_000


def test_a_further_rise_during_the_hold_holds_on_without_doubling() -> None:
    from dcp.topology import HOLD_DOWN_S, LinkCost

    cost = LinkCost()
    cost.measure(HOP_COST_US, 0.0)
    assert cost.measure(100_000, 1.0) and cost.held_until == 1.0 + HOLD_DOWN_S
    assert cost.measure(400_000, 2.0) and cost.planned == 400_000  # congested worse: at once
    assert cost.held_until == 2.0 + HOLD_DOWN_S and cost.hold_s == HOLD_DOWN_S  # from the latest rise, not doubled
