"""The incremental planner (dcp.planner) against a plan from scratch, and what an event costs.

The reference below is the orchestrator's planning as it was before it was made
incremental: every stream rebuilt from every agent on every event.  The state machine
drives the planner with random events and checks, after each one, that the routes it
holds are the reference's, epochs included, and that it returned exactly the routes
that changed.  The orchestrator-level test checks that one planning round stores its
routes in one sqlite transaction and pushes them with one write per agent.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import dcp
from dcp.config import OrchestratorConfig
from dcp.errors import RoutingError
from dcp.orchestrator import Orchestrator
from dcp.patterns import Policy, Rule, topic_matches
from dcp.planner import AgentView, Planner, Stream
from dcp.routing import allocate_keys, int_to_bytes
from dcp.topology import HOP_COST_US, Endpoint, Overlay, OverlayLink, build_tree
from tests.purity import copy_with_import, loaded
from tests.waiting import until

KEYS = allocate_keys(6, 8)  # ports 0..7 on every broker
#: Link costs to draw: ties with the default, cheaper, dearer, congested.
COSTS = [HOP_COST_US, 1, 150, 300, 5_000, 1_000_000]
BROKERS = ["b0", "b1", "b2", "b3"]
AGENTS = ["a0", "a1", "a2", "a3", "a4", "a5"]
TOPICS = ["t.a", "t.b", "t.a.b", "u.a.b", "u.b"]
PATTERNS = ["t.a", "t.*", "t.>", "*.b", ">", "u.a.b", "*.a.*", "u.>"]
POLICIES = [
    Policy(),
    Policy([Rule("a1", "deny", publish=("t.*",))]),
    Policy([Rule("a2", "deny", consume=(">",)), Rule("a*", "deny", consume=("u.>",))]),
    Policy([Rule("a[0-3]", "allow", publish=(">",), consume=("t.>",))], default="deny"),
]


# -- the reference: a plan from scratch -----------------------------------------------


def number(overlay: Overlay, source: Endpoint, consumers: list[tuple[str, Endpoint]]) -> tuple[int, list[str]]:
    """X for every consumer reachable from ``source``, and who they are (0, [] if the
    source itself cannot be planned)."""
    try:
        return build_tree(overlay, source, [at for _, at in consumers]).x, [agent for agent, _ in consumers]
    except RoutingError:
        pass
    reachable = []
    for agent, at in consumers:
        try:
            build_tree(overlay, source, [at])
        except RoutingError:
            continue
        reachable.append((agent, at))
    try:
        return build_tree(overlay, source, [at for _, at in reachable]).x, [agent for agent, _ in reachable]
    except RoutingError:
        return 0, []


def from_scratch(
    agents: dict[str, AgentView], overlay: Overlay, policy: Policy, streams: dict[tuple[str, str], Stream]
) -> dict[tuple[str, str], Stream]:
    """Every stream planned again from ``streams`` (the routes before the event)."""
    planned = dict(streams)
    on = {name: view.endpoint for name, view in agents.items() if view.endpoint is not None}  # agent -> endpoint
    seen = set()
    for producer, source in on.items():
        for topic in dict.fromkeys(agents[producer].produces):
            seen.add((producer, topic))
            refused = "" if policy.allows(producer, "publish", topic) else policy.why(producer, "publish", topic)
            consumers = [] if refused else sorted(
                agent for agent in on
                if agent != producer and any(topic_matches(p, topic) for p in agents[agent].consumes)
                and policy.allows(agent, "consume", topic)
            )
            x, reached = number(overlay, source, [(agent, on[agent]) for agent in consumers])
            old = planned.get((producer, topic))
            if old is None or (old.x, old.consumers, old.refused, old.broker) != (x, reached, refused, source[0]):
                planned[(producer, topic)] = Stream(producer, topic, (old.epoch if old else 0) + 1, x, reached, refused, source[0])
    for key, stream in streams.items():
        view = agents.get(stream.producer)
        if key not in seen and stream.x and view is not None and view.online:
            planned[key] = Stream(stream.producer, stream.topic, stream.epoch + 1, 0, [])
    return planned


# -- random events --------------------------------------------------------------------

# mostly ports no link uses; else any, 8 (out of range) included
endpoints = st.tuples(st.sampled_from(BROKERS), st.integers(2, 7)) | st.tuples(st.sampled_from(BROKERS), st.integers(0, 8))
views = st.builds(
    AgentView,
    endpoint=st.none() | endpoints,
    online=st.booleans(),
    consumes=st.lists(st.sampled_from(PATTERNS), max_size=3).map(tuple),
    produces=st.lists(st.sampled_from(TOPICS), max_size=3).map(tuple),
)


class PlanningMachine(RuleBasedStateMachine):
    """Random events; after each, the planner's routes are the reference's."""

    def __init__(self) -> None:
        super().__init__()
        recovered = [Stream("a0", "t.a", 3, 12345, ["a1"]), Stream("a5", "u.b", 1, 0, [], "", "b0")]  # as from sqlite
        self.planner = Planner(recovered)
        self.keys: dict[str, int] = {}
        self.links: dict[tuple[Endpoint, Endpoint], OverlayLink] = {}
        self.costs: dict[Endpoint, int] = {}  # link end -> what sending out of it costs
        self.before = dict(self.planner.streams)
        self.changed: list[Stream] = []

    @initialize()
    def brokers_in_a_line(self) -> None:
        self.keys = dict(zip(BROKERS, KEYS))
        for i in range(len(BROKERS) - 1):
            self.add_link((BROKERS[i], 1), (BROKERS[i + 1], 0))
        self.planner.set_overlay(self.overlay())
        self.plan(None)

    def add_link(self, a: Endpoint, b: Endpoint) -> None:
        self.links[(a, b) if a < b else (b, a)] = OverlayLink(a[0], a[1], b[0], b[1])

    def overlay(self) -> Overlay:
        return Overlay(self.keys, self.links.values(), self.costs)

    def plan(self, budget: float | None) -> None:
        """Run the planner to the end, in one step or in many."""
        changed: dict[tuple[str, str], Stream] = {}
        while self.planner.pending:
            for stream in self.planner.step(budget):
                changed[(stream.producer, stream.topic)] = stream
        self.changed = list(changed.values())

    @rule(name=st.sampled_from(AGENTS), view=views, budget=st.sampled_from([None, 0.0]))
    def agent(self, name: str, view: AgentView, budget: float | None) -> None:
        self.planner.set_agent(name, view)
        self.plan(budget)

    @rule(name=st.sampled_from(AGENTS), endpoint=endpoints)
    def agent_moves(self, name: str, endpoint: Endpoint) -> None:
        view = self.planner.agents.get(name, AgentView(None, True, ("t.>",), ("t.a",)))
        self.planner.set_agent(name, AgentView(endpoint, view.online, view.consumes, view.produces))
        self.plan(None)

    @rule(name=st.sampled_from(AGENTS), consumes=st.lists(st.sampled_from(PATTERNS), max_size=3))
    def agent_consumes(self, name: str, consumes: list[str]) -> None:
        view = self.planner.agents.get(name, AgentView(("b0", 1), True))
        self.planner.set_agent(name, AgentView(view.endpoint, view.online, tuple(consumes), view.produces))
        self.plan(None)

    @rule(name=st.sampled_from(AGENTS), produces=st.lists(st.sampled_from(TOPICS), max_size=3))
    def agent_produces(self, name: str, produces: list[str]) -> None:
        view = self.planner.agents.get(name, AgentView(("b1", 2), True))
        self.planner.set_agent(name, AgentView(view.endpoint, view.online, view.consumes, tuple(produces)))
        self.plan(None)

    @rule(name=st.sampled_from(BROKERS), key=st.sampled_from(KEYS))
    def broker(self, name: str, key: int) -> None:
        if key in (k for other, k in self.keys.items() if other != name):
            return  # the orchestrator never plans with a key twice
        self.keys[name] = key
        self.planner.set_overlay(self.overlay())
        self.plan(None)

    @precondition(lambda self: self.keys)
    @rule(data=st.data())
    def broker_gone(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(sorted(self.keys)))
        del self.keys[name]
        self.links = {edge: link for edge, link in self.links.items() if name not in (link.a, link.b)}
        self.planner.set_overlay(self.overlay())
        self.plan(None)

    @precondition(lambda self: len(self.keys) >= 2)
    @rule(data=st.data())
    def link(self, data: st.DataObject) -> None:
        a, b = data.draw(st.lists(st.sampled_from(sorted(self.keys)), min_size=2, max_size=2, unique=True))
        used = {end for edge in self.links for end in edge}
        free_a = [p for p in range(8) if (a, p) not in used]
        free_b = [p for p in range(8) if (b, p) not in used]
        if not free_a or not free_b:
            return
        self.add_link((a, data.draw(st.sampled_from(free_a))), (b, data.draw(st.sampled_from(free_b))))
        self.planner.set_overlay(self.overlay())
        self.plan(data.draw(st.sampled_from([None, 0.0])))

    @precondition(lambda self: self.links)
    @rule(data=st.data())
    def unlink(self, data: st.DataObject) -> None:
        del self.links[data.draw(st.sampled_from(sorted(self.links)))]
        self.planner.set_overlay(self.overlay())
        self.plan(None)

    @precondition(lambda self: self.links)
    @rule(data=st.data(), cost=st.sampled_from(COSTS))
    def link_cost(self, data: st.DataObject, cost: int) -> None:
        """A link end congests or recovers."""
        edge = data.draw(st.sampled_from(sorted(self.links)))
        self.costs[data.draw(st.sampled_from(edge))] = cost
        self.planner.set_overlay(self.overlay())
        self.plan(data.draw(st.sampled_from([None, 0.0])))

    @rule(policy=st.sampled_from(POLICIES))
    def policy(self, policy: Policy) -> None:
        self.planner.set_policy(policy)
        self.plan(None)

    @invariant()
    def plans_as_from_scratch(self) -> None:
        planner = self.planner
        expected = from_scratch(planner.agents, planner.overlay, planner.policy, self.before)
        assert planner.streams == expected
        assert sorted(self.changed, key=repr) == sorted((s for k, s in expected.items() if self.before.get(k) != s), key=repr)
        self.before = dict(planner.streams)
        self.changed = []


TestPlanning = PlanningMachine.TestCase
TestPlanning.settings = settings(max_examples=200, stateful_step_count=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def linked_overlays(draw: st.DrawFn, brokers: int = 6) -> tuple[dict[str, int], list[OverlayLink]]:
    """Brokers with random links between them (ports 0..3; agents go on 4..7)."""
    names = BROKERS + [f"b{i}" for i in range(len(BROKERS), brokers)]
    keys = dict(zip(names, allocate_keys(brokers, 8)))
    links: list[OverlayLink] = []
    used: set[Endpoint] = set()
    for a, b in draw(st.lists(st.lists(st.sampled_from(names), min_size=2, max_size=2, unique=True), max_size=10)):
        port_a = next((p for p in range(4) if (a, p) not in used), None)
        port_b = next((p for p in range(4) if (b, p) not in used), None)
        if port_a is not None and port_b is not None:
            used |= {(a, port_a), (b, port_b)}
            links.append(OverlayLink(a, port_a, b, port_b))
    return keys, links


@settings(max_examples=300, deadline=None)
@given(overlay=linked_overlays(), data=st.data())
def test_links_that_come_and_go_replan_as_from_scratch(overlay: tuple[dict[str, int], list[OverlayLink]], data: st.DataObject) -> None:
    """Agents on ports no link uses, then links added and removed and costs changed: the
    trees a new or cheaper link shortens (or gives a new parent) are found, and only
    through the shortcut rules."""
    keys, links = overlay
    names = sorted(keys)
    agents = {
        f"a{i}": AgentView((data.draw(st.sampled_from(names)), 4 + i % 4), True, ("t.>",) if i % 2 else ("t.a",), (f"t.{'ab'[i % 2]}",))
        for i in range(8)
    }
    before_links = data.draw(st.lists(st.sampled_from(links), unique=True)) if links else []
    ends = [end for link in links for end in ((link.a, link.a_port), (link.b, link.b_port))]
    costs = st.dictionaries(st.sampled_from(ends), st.sampled_from(COSTS)) if ends else st.just({})
    planner = settled(Overlay(keys, before_links, data.draw(costs)), agents)
    before = dict(planner.streams)
    after = Overlay(keys, links, data.draw(costs))
    planner.set_overlay(after)
    planner.step()
    assert planner.streams == from_scratch(planner.agents, after, planner.policy, before)


# -- what an event costs --------------------------------------------------------------


def line(n: int, keys: list[int]) -> Overlay:
    """Brokers b0 - b1 - ... linked on ports 0 (to the left) and 1 (to the right)."""
    return Overlay({f"b{i}": keys[i] for i in range(n)}, [OverlayLink(f"b{i}", 1, f"b{i + 1}", 0) for i in range(n - 1)])


def settled(overlay: Overlay, agents: dict[str, AgentView]) -> Planner:
    planner = Planner()
    planner.set_overlay(overlay)
    for name, view in agents.items():
        planner.set_agent(name, view)
    planner.step()
    return planner


def test_an_agent_joining_replans_only_the_streams_it_produces_or_matches() -> None:
    keys = allocate_keys(3, 16)
    agents = {f"p{i}": AgentView((f"b{i % 3}", 2 + i // 3), True, (f"s.{(i + 1) % 30}",), (f"s.{i}",)) for i in range(30)}
    planner = settled(line(3, keys), agents)
    assert len(planner.streams) == 30 and all(s.consumers for s in planner.streams.values())
    planned = planner.counters.planned
    planner.set_agent("joiner", AgentView(("b2", 15), True, ("s.7", "s.12"), ("j.out",)))
    assert planner.pending == 3  # s.7, s.12 and its own j.out
    changed = planner.step()
    assert planner.counters.planned - planned == 3
    assert sorted((s.producer, s.topic) for s in changed) == [("joiner", "j.out"), ("p12", "s.12"), ("p7", "s.7")]
    assert planner.streams[("p7", "s.7")].consumers == ["joiner", "p6"]
    # a wildcard costs what it names: 's.*' names the 30 streams, 'x.*' none of them
    planner.set_agent("joiner", AgentView(("b2", 15), True, ("x.*",), ("j.out",)))
    assert planner.pending == 2  # s.7 and s.12 lose it; x.* names nothing
    planner.step()
    planner.set_agent("watcher", AgentView(("b0", 15), True, ("s.*",), ()))
    assert planner.pending == 30


def test_a_link_change_replans_only_the_streams_over_that_link() -> None:
    keys = allocate_keys(4, 16)
    # p0/c0 on b0 only, p1 b0 -> b1, p2 b1 -> b2, p3 b2 -> b3
    agents = {}
    for i, (src, dst) in enumerate([(0, 0), (0, 1), (1, 2), (2, 3)]):
        agents[f"p{i}"] = AgentView((f"b{src}", 4), True, (), (f"t{i}",))
        agents[f"c{i}"] = AgentView((f"b{dst}", 5 + i), True, (f"t{i}",), ())
    planner = settled(line(4, keys), agents)
    assert [planner.streams[(f"p{i}", f"t{i}")].consumers for i in range(4)] == [["c0"], ["c1"], ["c2"], ["c3"]]
    planned = planner.counters.planned
    cut = line(4, keys)
    planner.set_overlay(Overlay(cut.layouts, [link for link in cut.links if link.a != "b1"]))  # b1 - b2 goes
    assert planner.pending == 1  # p2's stream only (t3 is b2 -> b3)
    (withdrawn,) = planner.step()
    assert (withdrawn.producer, withdrawn.consumers, withdrawn.x) == ("p2", [], 0)
    assert planner.counters.planned - planned == 1
    planner.set_overlay(line(4, keys))  # back: it brings b2, b3 closer to b0 and b0, b1 to b2, where no tree goes
    assert planner.pending == 1  # p2's stream, which has waited for it
    planner.step()
    assert planner.streams[("p2", "t2")].consumers == ["c2"]
    # a parallel link between brokers at the same distance from a source changes no tree
    keys5 = allocate_keys(5, 16)
    star = Overlay({f"b{i}": keys5[i] for i in range(3)}, [OverlayLink("b0", 1, "b1", 0), OverlayLink("b0", 2, "b2", 0)])
    planner = settled(star, {"p": AgentView(("b0", 4), True, (), ("t",)), "c": AgentView(("b1", 4), True, ("t",), ())})
    planner.set_overlay(Overlay(star.layouts, [*star.links, OverlayLink("b1", 1, "b2", 1)]))  # b1, b2: both 1 hop from b0
    assert planner.pending == 0


@pytest.mark.parametrize("edges, new, tree", [
    # b0 - b1 - b2 - b3 - b4, then b0 - b4: b3 gets closer through b4, not in the tree before
    ([(0, 1), (1, 2), (2, 3), (3, 4)], (0, 4), ["b0", "b4", "b3"]),
    # b5 hangs on b3; b0 - b2 brings b2 next to b0, and b5 may now hang on b2 (a smaller name)
    ([(0, 3), (3, 5), (0, 1), (1, 4), (4, 2), (2, 5)], (0, 2), ["b0", "b2", "b5"]),
])
def test_a_new_link_replans_the_trees_it_shortens_or_gives_a_closer_parent(
    edges: list[tuple[int, int]], new: tuple[int, int], tree: list[str]
) -> None:
    keys = dict(zip([f"b{i}" for i in range(6)], allocate_keys(6, 16)))
    ports: dict[str, int] = {}

    def link(a: int, b: int) -> OverlayLink:
        ends = []
        for broker in (f"b{a}", f"b{b}"):
            ends.append((broker, ports.setdefault(broker, 0)))
            ports[broker] += 1
        return OverlayLink(ends[0][0], ends[0][1], ends[1][0], ends[1][1])

    links = [link(a, b) for a, b in edges]
    target = tree[-1]
    agents = {"p": AgentView(("b0", 10), True, (), ("t",)), "c": AgentView((target, 10), True, ("t",), ()),
              "other": AgentView(("b1", 11), True, (), ("u",))}  # a stream the new link cannot change
    planner = settled(Overlay(keys, links), agents)
    before = dict(planner.streams)
    after = Overlay(keys, [*links, link(*new)])
    planner.set_overlay(after)
    assert planner.pending == 1
    (stream,) = planner.step()
    assert planner.streams == from_scratch(planner.agents, after, planner.policy, before)
    assert stream.x == build_tree(after, ("b0", 10), [(target, 10)]).x != before[("p", "t")].x
    assert sorted(build_tree(after, ("b0", 10), [(target, 10)]).brokers) == sorted(tree)


def test_a_key_change_replans_the_streams_through_that_broker() -> None:
    keys = allocate_keys(4, 16)
    agents = {"p": AgentView(("b0", 4), True, (), ("t",)), "c": AgentView(("b1", 4), True, ("t",), ()),
              "q": AgentView(("b2", 4), True, (), ("u",)), "d": AgentView(("b2", 5), True, ("u",), ())}
    planner = settled(Overlay({"b0": keys[0], "b1": keys[1], "b2": keys[2]}, [OverlayLink("b0", 1, "b1", 0)]), agents)
    x = planner.streams[("p", "t")].x
    planner.set_overlay(Overlay({"b0": keys[0], "b1": keys[3], "b2": keys[2]}, [OverlayLink("b0", 1, "b1", 0)]))
    assert planner.pending == 1
    (stream,) = planner.step()
    assert stream.x != x and stream.x % keys[3] == 1 << 4 and stream.epoch == 2


def test_the_planner_imports_no_io_modules(tmp_path: Path) -> None:
    watched = ["asyncio", "socket", "sqlite3"]
    assert loaded(["planner"], watched) == "[]"
    files = ["errors.py", "wire.py", "routing.py", "topology.py", "patterns.py"]
    fake = copy_with_import(tmp_path, files, "planner.py", "import sqlite3\n")
    assert loaded(["planner"], watched, fake) == "['sqlite3']"


# -- the orchestrator: one round, one transaction, one write per agent --------------------


class CountingTransport:
    """A connection's real transport, counting its writes."""

    def __init__(self, transport: asyncio.Transport, name: str, writes: dict[str, int]) -> None:
        self.transport, self.name, self.writes = transport, name, writes

    def write(self, data: bytes) -> None:
        self.writes[self.name] = self.writes.get(self.name, 0) + 1
        self.transport.write(data)

    def __getattr__(self, attribute: str) -> Any:
        return getattr(self.transport, attribute)


@pytest.fixture
async def orchestrator(tmp_path: Path) -> AsyncIterator[Orchestrator]:
    do = Orchestrator(OrchestratorConfig(listen="127.0.0.1:0", db=str(tmp_path / "do.db"), insecure=True))
    await do.start()
    yield do
    await do.close()


async def test_one_round_stores_in_one_transaction_and_writes_once_per_agent(orchestrator: Orchestrator) -> None:
    do = orchestrator
    url = "dcp://%s:%d" % do.address
    key, other_key = allocate_keys(2, 16)
    async with dcp.connect(url, role="broker", name="b0", reconnect=False) as broker:
        await broker.request({"op": "broker_state", "key": int_to_bytes(key), "ports": 16, "links": []})
        agents = []
        for i in range(12):  # each produces two topics that the next one consumes
            agent = await dcp.connect(url, role="agent", name=f"a{i}", reconnect=False)
            agents.append(agent)
            await agent.request({
                "op": "register", "capabilities": [], "consumes": [f"t{(i + 11) % 12}.*"], "produces": [f"t{i}.x", f"t{i}.y"],
                "broker_key": int_to_bytes(key), "port": i,
            })
        await until(lambda: sum(1 for s in do.streams.values() if s.consumers) == 24, "every stream routed")
        statements: list[str] = []
        do.store._db.set_trace_callback(statements.append)
        writes: dict[str, int] = {}
        for conn in do._connections:
            if conn.role == "agent" and conn.transport is not None:
                conn.transport = CountingTransport(conn.transport, conn.name, writes)  # type: ignore[assignment]
        rounds = do.recomputations
        # The broker takes another key: every X changes, in one round.
        await broker.request({"op": "broker_state", "key": int_to_bytes(other_key), "ports": 16, "links": []})
        await until(lambda: len(writes) == 12, "a push to every agent")
        await asyncio.sleep(0.05)
        assert do.recomputations == rounds + 1
        assert writes == {f"a{i}": 1 for i in range(12)}  # two routes each, in one write
        begins = [i for i, s in enumerate(statements) if s == "BEGIN"]
        commits = [i for i, s in enumerate(statements) if s == "COMMIT"]
        stored = [i for i, s in enumerate(statements) if "INTO streams" in s]
        assert len(begins) == len(commits) == 1 and len(stored) >= 1
        assert all(begins[0] < i < commits[0] for i in stored)
        assert do.status()["planning"]["rounds"] == do.recomputations
        for agent in agents:
            await agent.close()
