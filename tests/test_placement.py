"""Placement by load: an agent's load from its reports (dcp.placement, pure), the
hysteresis that keeps elements from flapping, and an orchestrator that places new
elements on the least loaded agent and moves one off an agent that stays saturated.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

import dcp
from dcp import control, placement
from dcp.placement import HIGH, LOW, MOVE_GAP_S, PENDING_FULL, QUEUE_FULL, SATURATED_S, Load, pick_move, worth_moving
from tests.test_orchestrator import Plane
from tests.waiting import until


def report(busy: dict[str, float] | None = None, pending: int = 0, dropped: int = 0) -> control.Report:
    elements = {key: {"in": 1, "busy": share} for key, share in (busy or {}).items()}
    return control.Report(elements=elements, published=0, unrouted=0, lost=0, dropped=dropped, pending=pending)


def test_the_load_is_the_tightest_resource() -> None:
    load = Load()
    load.report(report({"p/a": 0.3, "p/b": 0.2}), now=0.0)
    assert load.value == pytest.approx(0.5)
    load.report(report({"p/a": 0.1}, pending=PENDING_FULL * 3 // 4), now=1.0)
    assert load.value == pytest.approx(0.75)  # the receive queue, three quarters full
    load.queued(QUEUE_FULL * 2, now=2.0)
    assert load.value == 1.0  # its broker's queue towards it, over full
    load.queued(0, now=3.0)
    load.report(report(dropped=5), now=4.0)
    assert load.value == 1.0  # dropping
    load.report(report(dropped=5), now=5.0)
    assert load.value == 0.0  # no longer


def test_saturation_has_hysteresis() -> None:
    load = Load()
    for now, busy in enumerate([0.7, 0.79, 0.6, 0.75]):  # under HIGH: never saturated
        load.report(report({"p/a": busy}), now)
        assert load.saturated_since is None
    load.report(report({"p/a": HIGH}), now=10.0)
    for now, busy in enumerate([0.6, 0.79, LOW + 0.01, 0.9], start=11):  # over LOW: saturated still, since the first
        load.report(report({"p/a": busy}), now)
        assert load.saturated_since == 10.0
    assert not load.due(10.0 + SATURATED_S - 0.1) and load.due(10.0 + SATURATED_S)
    load.looked_at = 20.0
    assert not load.due(20.0 + MOVE_GAP_S - 0.1) and load.due(20.0 + MOVE_GAP_S)
    load.report(report({"p/a": LOW}), now=30.0)
    assert load.saturated_since is None and not load.due(100.0)


def test_a_move_needs_room_to_spare() -> None:
    assert worth_moving(load=0.9, share=0.45, target=0.0)
    assert not worth_moving(load=0.95, share=0.95, target=0.0)  # one element is the whole load: it would only move it
    assert not worth_moving(load=0.9, share=0.3, target=LOW + 0.01)  # the target has no room
    assert not worth_moving(load=0.9, share=0.4, target=0.45)  # it would end up as loaded as the source


def test_the_largest_share_moves_unless_it_moved_lately() -> None:
    load = Load()
    load.report(report({"p/a": 0.2, "p/b": 0.5, "p/c": 0.25}), now=0.0)
    held = {"a": "p/a", "b": "p/b", "c": "p/c"}
    to_idle = lambda key: ("idle", 0.0)  # noqa: E731
    assert pick_move(load, held, to_idle, {}, now=100.0) == ("b", "idle")
    assert pick_move(load, held, to_idle, {"b": 95.0}, now=100.0) == ("c", "idle")
    assert pick_move(load, held, lambda key: None, {}, now=100.0) is None  # no candidate
    unreported = Load(pending=PENDING_FULL)  # full, no busy figures: each of 2 elements counts half
    assert pick_move(unreported, {"a": "p/a", "b": "p/b"}, to_idle, {}, now=0.0) == ("a", "idle")
    assert pick_move(unreported, {"a": "p/a"}, to_idle, {}, now=0.0) is None  # its only element: the whole load


def simulate(seed: int, shares: dict[str, float], noise: float, ticks: int = 600) -> list[tuple[int, str, str, str]]:
    """Agents x, y, z with elements of the given ``shares`` (all on x at first) report every
    second their true load plus uniform noise; every due agent moves what ``pick_move``
    says.  The moves made, as (tick, element, from, to)."""
    rng = random.Random(seed)
    where = {element: "x" for element in shares}
    loads = {agent: Load() for agent in "xyz"}
    moved_at: dict[str, float] = {}
    moves = []
    for now in range(ticks):
        for agent, load in loads.items():
            mine = [e for e in where if where[e] == agent]
            jitter = {e: min(max(shares[e] + rng.uniform(-noise, noise), 0.0), 1.0) for e in mine}
            load.report(report({f"p/{e}": share for e, share in jitter.items()}), float(now))
        for agent, load in loads.items():
            if not load.due(now):
                continue
            load.looked_at = now
            held = {e: f"p/{e}" for e in where if where[e] == agent}
            others = sorted((loads[other].value, other) for other in loads if other != agent)
            move = pick_move(load, held, lambda e: (others[0][1], others[0][0]), moved_at, float(now))
            if move is not None:
                element, target = move
                moves.append((now, element, agent, target))
                where[element], moved_at[element] = target, float(now)
    return moves


@pytest.mark.parametrize("seed", range(20))
def test_no_flapping_under_noisy_reports(seed: int) -> None:
    """Three elements of 0.3 saturate x (0.9): they spread off it, each moving once at
    most, never back, over ten minutes of reports with ±0.1 noise on each element; a lone
    element of 0.9 never moves."""
    moves = simulate(seed, {"a": 0.3, "b": 0.3, "c": 0.3}, noise=0.1)
    assert 1 <= len(moves) <= 2, moves
    assert all(source == "x" for _, _, source, _ in moves) and moves[0][0] >= SATURATED_S
    assert len({element for _, element, _, _ in moves}) == len(moves)  # none moved twice
    assert len({target for _, _, _, target in moves}) == len(moves)  # none on top of another moved one
    assert simulate(seed, {"big": 0.9}, noise=0.1) == []


@pytest.mark.parametrize("seed", range(20))
def test_noise_about_the_high_mark_alone_moves_nothing(seed: int) -> None:
    """x carries 0.7 in two elements, reported as 0.5-0.9: saturated at times, yet a
    move would leave no room to spare once noise is taken off, so at most one happens and
    nothing comes back."""
    moves = simulate(seed, {"a": 0.35, "b": 0.35}, noise=0.1)
    assert len(moves) <= 1, moves


# -- in process ---------------------------------------------------------------------

SPEC = {
    "name": "p",
    "stage": [
        {"name": "w1", "capability": "work", "consumes": ["raw"], "emits": "done1"},
        {"name": "w2", "capability": "work", "consumes": ["raw"], "emits": "done2"},
    ],
}


@pytest.fixture
async def plane(tmp_path: Path) -> AsyncIterator[Plane]:
    plane = Plane(tmp_path / "do.db")
    await plane.start_do()
    await plane.start_brokers(1)
    yield plane
    await plane.close()


def worker(plane: Plane, name: str) -> dcp.DataAgent:
    """An agent offering ``work`` that sends no report of its own: the test sends them."""
    agent = dcp.DataAgent(name, broker=plane.url(0), orchestrator=plane.do_url, report_interval_s=3600)
    plane.agents.append(agent)

    @agent.capability("work")
    async def work(msg: dcp.Message, params: dict[str, Any]) -> bytes:
        return bytes(msg.payload)

    return agent


def send_report(agent: dcp.DataAgent, busy: dict[str, float]) -> None:
    assert agent.orchestrator is not None
    agent.orchestrator.send(report(busy).to_body())


async def test_elements_go_to_the_least_loaded_agent_and_move_off_a_saturated_one(
    plane: Plane, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(placement, "SATURATED_S", 0.0)  # due at the first saturated report
    do = plane.do
    assert do is not None
    source = plane.agent("src")
    await source.declare_produces("raw")
    a1, a2 = worker(plane, "a1"), worker(plane, "a2")
    for agent in (source, a1, a2):
        await agent.start()
    await until(lambda: {"a1", "a2"} <= set(do._capable.get("work", ())), "both workers registered")
    send_report(a1, {"other/x": 0.9})  # a1 is busy with something else: by name it would come first
    await until(lambda: do.agents["a1"].load.value == 0.9, "a1's report taken")

    deployed = await plane.admin({"op": "deploy", "spec": SPEC})
    assert deployed["assignments"] == {"w1": ["a2"], "w2": ["a2"]}
    await until(lambda: {"p/w1", "p/w2"} <= set(a2.elements), "a2 runs both")

    pushes: list[tuple[str, str, str]] = []
    send = do._send_to_agent

    def recorded(name: str, message: control.Message) -> None:
        pushes.append((name, message.op, getattr(message, "element", "")))
        send(name, message)

    monkeypatch.setattr(do, "_send_to_agent", recorded)
    send_report(a1, {})  # a1 is idle now
    await until(lambda: do.agents["a1"].load.value == 0.0, "a1's idle report taken")
    send_report(a2, {"p/w1": 0.3, "p/w2": 0.6})  # a2 saturates: w2, the larger share, moves
    await until(lambda: pushes, "a move")
    assert pushes == [("a1", control.ASSIGN, "w2"), ("a2", control.UNASSIGN, "w2")]  # the new one first
    assert do.assignments[("p", "w2")] == ["a1"] and do.assignments[("p", "w1")] == ["a2"]
    await until(lambda: "p/w2" in a1.elements and "p/w2" not in a2.elements, "w2 running on a1 only")
    await until(lambda: set(do.streams[("src", "raw")].consumers) == {"a1", "a2"}, "raw routed to both")

    send_report(a2, {"p/w1": 0.3, "p/w2": 0.6})  # saturated still, but looked at within MOVE_GAP_S
    send_report(a1, {"p/w2": 0.0})
    await until(lambda: do.agents["a1"].report is not None and "p/w2" in do.agents["a1"].report.elements, "a1's report taken")
    assert len(pushes) == 2  # nothing more moved
