"""The data orchestrator (DO): registries, pipelines, delivery trees, topology numbers.

It never sits on the data path.  Brokers register and report their keys, ports and
links (``broker_state``) and then their attachments as they change (``ports_changed``);
data agents register their capabilities, the topics they consume (patterns allowed)
and produce, and where they are attached (broker key, port).  A deployed pipeline
assigns each stage to agents offering its capability.  For every stream (one producing
agent, one topic) the DO builds the delivery tree to the agents consuming it, allowed by
the policy, and pushes the topology number, with an epoch, to the producing agent only.
Brokers are told nothing about topics.  With ``--secret-file`` each number goes out with
a route tag (:mod:`dcp.auth`) over topic, X, epoch and an expiry ``--route-ttl-s``
ahead, re-signed and pushed again when half of that is left, so brokers with
``--verify-routes`` can refuse forgeries.

Planning is incremental (:mod:`dcp.planner`): an event (an agent, broker or link joining
or leaving, a deploy) tells the planner what it touches, and the planner replans only
the streams that depend on it.  A round runs in slices of about :data:`SLICE_S`, one per
loop iteration, so that no event waits behind a long recomputation; the routes of a
round are stored in one sqlite transaction and then pushed, one write per agent.
Everything is kept in sqlite, so a restart recovers registries, pipelines, assignments
and epochs; agents and brokers re-register by themselves when their connection comes
back.

Control protocol: the messages of :mod:`dcp.control` over the dcp codec, on one TCP
connection per client (TLS with ``--tls-cert``/``--tls-key``); ``hello`` with role
``agent``, ``broker`` or ``admin`` first, and then what :data:`dcp.control.ORCHESTRATOR`
allows that role.  A malformed request gets an error frame (``bad_request`` ...), and
the connection goes on.  Unless it runs ``--insecure``, every hello carries a token
(:mod:`dcp.auth`): agents and admins one this orchestrator issued (the admin op
``token``, ``dcp token``), brokers one they issue themselves from the brokers' secret;
without ``--secret-file`` or ``--insecure`` it refuses to start.

Bounded as the broker is (:mod:`dcp._serving`): control frames only (``max_control``,
never a data frame's 8 MiB), a hello within ``hello_timeout_s``, at most
``max_connections_per_name`` (and ``_per_address``) connections, registrations of at
most ``max_capabilities``, ``max_consumes`` and ``max_produces`` entries, agent records
deleted once gone for longer than ``grace_s``, and planning that logs and skips a
stream it cannot plan rather than stop.  Names go into log lines through
:func:`dcp._guard.safe`.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import sys
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from math import gcd, inf
from typing import Any, cast

from . import control
from ._guard import safe
from ._loop import open_file_count, raise_open_file_limit
from ._serving import GuardedConnection, Quota, Serving, access_table, pre_hello_limits
from .auth import DEFAULT_TOKEN_TTL_S, ISSUED_ROLES, RouteSigner, expiry, is_broker_secret, issue_token, load_secret
from .config import OrchestratorConfig
from .daemon_metrics import PLANNING_BUCKETS, metrics_server, orchestrator_families, orchestrator_unready
from .errors import AuthError, BadRequest, ConfigError, DcpError, ProtocolError, RemoteProtocolError, RoutingError, SpecError
from .metrics import Histogram
from .metrics_http import MetricsServer
from .orchestrator_store import Store
from .patterns import Policy, topic_matches, validate_pattern, validate_topic
from .placement import Load, pick_move
from .planner import AgentView, Planner, ShareGroup, Stream
from .shares import REPLIES, REQUESTS, requestable
from .routing import KeyLayout, int_to_bytes
from .spec import ElementSpec, PipelineSpec, check_spec, parse_spec
from .tls import server_context
from .topology import Endpoint, LinkCost, Overlay, OverlayLink, distances, link_cost_us
from .wire import ControlFrame, Decoder, Limits, encode_control

#: What a connection to the orchestrator may send: control frames only, before and
#: after its hello (the orchestrator carries no data frames).
CONTROL_LIMITS = pre_hello_limits(Limits())
#: An agent's connection that has sent nothing for this long (or ``grace_s``, if longer)
#: no longer holds its name against a registration without a token (agents report every
#: second): a connection the network lost without a word does not lock its agent out.
SILENT_S = 5.0

__all__ = ["Orchestrator"]

log = logging.getLogger(__name__)

#: Planning and pushing per loop iteration, at most (about: one stream's tree is not cut).
SLICE_S = 0.01
#: A warning names at most this many consumers a stream misses: the pipelines view of a
#: stream that misses thousands still fits a control frame.
MISSES_NAMED = 3
#: Serving requests per loop iteration, at most (about: one request is not cut).
SERVE_S = 0.005
#: A connection with this many requests waiting is not read until half of them are served.
PENDING_LIMIT = 64
#: A round that keeps finding work commits, and pushes what it planned, this often.
ROUND_S = 0.25

#: Registrations and routes since the last ``gc.freeze()`` that make the next one due.
FREEZE_STEP = 1000
#: Seconds between sqlite checkpoints, run in a worker thread after a round.
CHECKPOINT_S = 1.0

ElementKey = tuple[str, str]  # (pipeline, element)


@dataclass
class BrokerRecord:
    name: str
    key: int
    address: str
    ports: int
    links: list[dict[str, Any]]  # {"port", "remote_key", "remote_port", "state"}
    conn: OrchestratorConnection | None = None
    gone_at: float = 0.0  # monotonic time its connection to us ended (or we started, if recovered)
    attached: dict[int, str] | None = None  # port -> the agent on it, as last reported; None: not known
    keys: list[int] | None = None  # its whole key layout (root first), when it has more keys than ``key``
    # From its load reports, one entry per port at most: each link's last figures
    # (rtt_ms, bytes_per_s, queue_bytes) and the cost planned with (a LinkCost, and its
    # planned value), and each attachment's output queue in bytes (left out: none waiting).
    link_load: dict[int, tuple[float, float, int]] = field(default_factory=dict)
    link_costs: dict[int, LinkCost] = field(default_factory=dict)
    costs: dict[int, int] = field(default_factory=dict)
    releasing: set[int] = field(default_factory=set)  # link ports with a hold-down release scheduled
    queues: dict[int, int] = field(default_factory=dict)

    @property
    def all_keys(self) -> list[int]:
        return self.keys or [self.key]


@dataclass
class AgentRecord:
    name: str
    capabilities: list[str]
    consumes: list[str]
    produces: list[str]
    broker_key: int
    port: int
    conn: OrchestratorConnection | None = None
    report: control.Report | None = None  # the agent's last report
    load: Load = field(default_factory=Load)  # from its reports and its port's queue at its broker
    registered_at: float = 0.0
    gone_at: float = 0.0  # monotonic time its connection to us ended (or we started, if recovered)


class Orchestrator(Serving):
    """The DO daemon: ``await start()``, then ``serve_forever()`` or ``close()``."""

    def __init__(self, config: OrchestratorConfig | None = None) -> None:
        self.config = config or OrchestratorConfig()
        self.store = Store(self.config.db)
        self.file_access_policy = Policy.load(self.config.policy_file) if self.config.policy_file else Policy()
        self.brokers: dict[str, BrokerRecord] = {}
        self.agents: dict[str, AgentRecord] = {}
        self.pipelines: dict[str, PipelineSpec] = {}
        self.deployed_at: dict[str, float] = {}
        self.assignments: dict[ElementKey, list[str]] = {}  # (pipeline, element) -> agents
        self.recomputations = 0  # planning rounds
        # Indexes, so that an event costs what it touches
        self._key_owner: dict[int, str] = {}  # every key of every broker record -> its name
        self._agents_at: dict[int, set[str]] = {}  # broker key -> the agents registered at it
        self._assigned: dict[str, dict[ElementKey, None]] = {}  # agent -> its elements
        self._load: Counter[str] = Counter()  # agent -> how many elements it has
        self._moved_at: dict[ElementKey, float] = {}  # element -> when it last moved for load (monotonic)
        self._capable: dict[str, set[str]] = {}  # capability -> the connected agents offering it
        # The orchestrator's secret (--secret-file): route tags and tokens; the brokers hold one derived from it
        self.secret = load_secret(self.config.secret_file) if self.config.secret_file else None
        if self.secret is not None and is_broker_secret(self.secret):
            raise ConfigError(
                f"{self.config.secret_file} holds the brokers' secret, which cannot issue agent and admin tokens: "
                "give the orchestrator its own secret (dcp secret), and the brokers the one derived from it (dcp secret --broker)"
            )
        self.signer = RouteSigner(self.secret) if self.secret is not None else None
        self.tls = server_context(self.config.tls_cert, self.config.tls_key) if self.config.tls_cert else None
        # Who may send which op: every role needs a token, so before its hello only a hello;
        # --insecure: no token at all; neither a secret nor --insecure: refused (ConfigError)
        self.permissions = access_table(control.ORCHESTRATOR, self.config)
        self.per_address = Quota(self.config.max_connections_per_address)  # by peer IP address, taken at accept
        self.per_name = Quota(self.config.max_connections_per_name)  # by (token) name, taken at hello
        self.hello_timeouts = 0  # connections refused with hello_timeout
        self.names_taken = 0  # registrations refused with name_taken
        self.expired = 0  # agent records deleted after their grace
        self._refusals_logged_at: dict[str, float] = {}  # refusal code -> when last logged
        self._loop: asyncio.AbstractEventLoop | None = None  # set by start(): the hello deadlines run on it
        self._inbox: deque[OrchestratorConnection] = deque()  # connections with requests waiting, in turn
        self._serving = False  # a _serve() is scheduled
        self._signed_until: dict[tuple[str, str], int] = {}  # stream -> expiry of the tag last pushed
        self._connections: set[OrchestratorConnection] = set()
        self._server: asyncio.Server | None = None
        self._closed: asyncio.Event | None = None
        # A planning round: what is left to tell the planner, and the pushes it made
        self._dirty = False  # a slice is scheduled
        self._overlay_dirty = True
        self._touched: dict[str, None] = {}  # agents whose view to compute again
        self._round_started: float | None = None  # its transaction is open
        self._outbox: dict[str, dict[str, Stream]] = {}  # agent -> routes to push once stored
        self._sending: deque[tuple[str, dict[str, Stream]]] = deque()  # stored, to push
        self._slices = 0
        self._longest_slice_s = 0.0
        self.round_seconds = Histogram(PLANNING_BUCKETS)  # planning rounds, for /metrics
        self.slice_seconds = Histogram(PLANNING_BUCKETS)
        self.route_pushes = 0  # route messages pushed to agents
        self.push_writes = 0  # writes of them, one per agent and round
        self.metrics: MetricsServer | None = None  # --metrics-listen, once started
        self._frozen = 0  # agents and streams at the last gc.freeze()
        self._checkpoint: asyncio.Future[None] | None = None  # running, or done at ``_checkpointed``
        self._checkpointed = 0.0
        streams = self._recover()
        self._touch(self.agents)
        self._policy = self.access_policy()
        self.planner = Planner(streams, self._policy)
        self.streams = self.planner.streams  # (producer, topic) -> its route

    # -- life cycle -------------------------------------------------------------

    def _recover(self) -> list[Stream]:
        """Registries, pipelines and assignments from sqlite; the stored routes, returned."""
        state = self.store.load()
        now = time.monotonic()
        for b in state["brokers"]:
            with _recovering("broker", b):
                record = BrokerRecord(b["name"], b["key"], b["address"], b["ports"], b["links"], gone_at=now, keys=b["keys"])
                _check_broker(record)
                self.brokers[record.name] = record
                for key in record.all_keys:
                    self._key_owner.setdefault(key, record.name)
        for a in state["agents"]:
            with _recovering("agent", a):
                agent = AgentRecord(a["name"], a["capabilities"], a["consumes"], a["produces"], a["broker_key"], a["port"], gone_at=now)
                _check_agent(agent)
                self.agents[agent.name] = agent
                self._agents_at.setdefault(agent.broker_key, set()).add(agent.name)
        for p in state["pipelines"]:
            with _recovering("pipeline", p):
                self.pipelines[p["name"]] = parse_spec(p["spec"], f"stored pipeline {p['name']!r}")
                self.deployed_at[p["name"]] = float(p["deployed_at"])
        for row in state["assignments"]:
            with _recovering("assignment", row):
                pipeline, element, agent = row
                self.pipelines[pipeline].element(element)  # KeyError: of no pipeline element
                if agent not in self.agents:
                    raise KeyError(f"no agent {agent!r}")
                self._add_assignment((pipeline, element), agent)
        streams = []
        for s in state["streams"]:
            with _recovering("stream", s):
                stream = Stream(s["producer"], s["topic"], s["epoch"], s["x"], s["consumers"])
                if not (type(stream.producer) is str and type(stream.topic) is str and type(stream.epoch) is int
                        and stream.epoch >= 0 and type(stream.x) is int and _strs(stream.consumers)):
                    raise ValueError("not a (producer, topic, epoch, x, consumers) of the right types")
                streams.append(stream)
        if any(state.values()):
            log.info(
                "recovered %d broker(s), %d agent(s), %d pipeline(s), %d stream(s) from %s",
                len(self.brokers), len(self.agents), len(self.pipelines), len(streams), self.store.path,
            )
        return streams

    async def start(self) -> None:
        loop = self._loop = asyncio.get_running_loop()
        self._closed = asyncio.Event()
        limits = raise_open_file_limit()  # an agent holds a connection: thousands of them
        host, port = self.config.address
        # A TLS handshake that does not finish within the hello deadline is cut as well.
        timeout = self.config.hello_timeout_s
        handshake = {"ssl_handshake_timeout": timeout} if self.tls and timeout else {}
        self._server = await loop.create_server(
            lambda: OrchestratorConnection(self), host, port, reuse_address=True, ssl=self.tls, **handshake
        )
        self.set_capacity(limits, open_file_count())
        host, port = self.address
        log.info(
            "dcp orchestrator listening on %s:%d db=%s%s%s", host, port, self.store.path,
            " tls" if self.tls else "", " insecure" if self.config.insecure else " require-token",
        )
        self.warn_exposure(host, port)
        if self.brokers or self.agents:  # recovered ones route until they are back, or the grace ends
            self.changed()
            loop.call_later(self.config.grace_s, self._grace_over)
            for record in list(self.agents.values()):  # deleted then, unless they registered again
                self._when_grace_ends(record, partial(self._agent_grace_over, record))
        if self.signer is not None:
            loop.call_later(self.config.route_ttl_s / 4, self._resign)
        if self.config.metrics_listen:
            self.metrics = metrics_server(self.config.metrics_listen, "orchestrator", lambda: orchestrator_families(self), lambda: orchestrator_unready(self))
            await self.metrics.start()

    @property
    def closing(self) -> bool:
        return self._closed is not None and (self._closed.is_set() or self._server is None or not self._server.is_serving())

    @property
    def connections(self) -> frozenset[OrchestratorConnection]:
        """Every open connection: brokers, agents, admins, those before their hello."""
        return frozenset(self._connections)

    async def close(self) -> None:
        if self._server is None or self._closed is None or self._closed.is_set():
            return
        self._server.close()
        for conn in list(self._connections):
            conn.close(control.GoingAway())
        if self._checkpoint is not None:
            await asyncio.gather(self._checkpoint, return_exceptions=True)
        self.store.close()
        if self.metrics is not None:
            await self.metrics.close()
        log.info("dcp orchestrator stopped")
        self._closed.set()

    # -- events -------------------------------------------------------------------

    def changed(self) -> None:
        """Something planning depends on changed: plan, a slice per loop iteration, from the next one."""
        if not self._dirty:
            self._dirty = True
            asyncio.get_running_loop().call_soon(self._recompute)

    def _touch(self, names: Iterable[str]) -> None:
        """These agents' views may have changed: compute them again in the next slice
        (the event then calls :meth:`changed`)."""
        for name in names:
            if name in self.agents:
                self._touched[name] = None

    def register_agent(self, conn: OrchestratorConnection, request: control.Register) -> control.Registered:
        """An agent (named by its hello) registers, or registers again.

        Raises:
            BadRequest: no name; a topic pattern it consumes or a topic it produces is
                not one; more capabilities, patterns or topics than the limits
                (``too_large``, naming the field and the limit).
            AuthError: ``name_taken`` (fatal): another live connection holds the name,
                and this one has no token for it (``--insecure``).
        """
        name = conn.name
        if not name:
            raise BadRequest(control.REGISTER, "name", "name is required: an agent registers under the name of its hello")
        config = self.config
        for field, values, limit, setting in (
            ("capabilities", request.capabilities, config.max_capabilities, "max_capabilities"),
            ("consumes", request.consumes, config.max_consumes, "max_consumes"),
            ("produces", request.produces, config.max_produces, "max_produces"),
        ):
            if len(values) > limit:
                raise BadRequest(
                    control.REGISTER, field, f"{field}: {len(values)} entries, over the limit of {limit} ({setting})", "too_large"
                )
        for field, check, topics in (("consumes", validate_pattern, request.consumes), ("produces", validate_topic, request.produces)):
            for i, topic in enumerate(topics):
                try:
                    check(topic)
                except ConfigError as exc:
                    raise BadRequest(control.REGISTER, f"{field}[{i}]", f"{field}[{i}]: {exc}") from None
        old = self.agents.get(name)
        if old is not None:
            if old.conn is not None and old.conn is not conn:
                if not conn.authenticated and old.conn.live(max(SILENT_S, config.grace_s)):
                    self.names_taken += 1
                    self.log_refusal("name_taken", "agent %s is connected already; refusing a registration without a token from %s", safe(name), conn.peer)
                    raise AuthError(
                        "name_taken",
                        f"an agent named {safe(name)!r} is connected already; a second registration under that name needs a token "
                        "for it (this orchestrator runs --insecure: see dcp token)",
                    )
                log.info("agent %s registered again from a new connection; dropping the old one", safe(name))
                old.conn.close(control.Error(code="replaced", message="the agent registered again", fatal=True))
            self._offline(old)
            self._agents_at[old.broker_key].discard(name)
        capabilities, consumes, produces, port = request.capabilities, request.consumes, request.produces, request.port
        record = AgentRecord(name, capabilities, consumes, produces, request.broker_key, port, conn, registered_at=time.time())
        self.agents[name] = record
        conn.agent = record
        self._agents_at.setdefault(record.broker_key, set()).add(name)
        for capability in capabilities:
            self._capable.setdefault(capability, set()).add(name)
        self.store.save_agent(name, capabilities, consumes, produces, record.broker_key, port)
        unplaced = self._unplaced(record)
        if unplaced:
            log.warning("agent %s (port %d) %s", safe(name), port, unplaced)
        else:
            log.info("agent %s registered at broker %s port %d", safe(name), safe(self._broker_name(record.broker_key) or "?"), port)
        offered = set(capabilities)
        self._assign_elements(lambda _, element: element.capability in offered)
        conn.send_all([self._assign_message(pipeline, element) for pipeline, element in self._assigned.get(name, ())])
        topics = self.planner.topics_of(name)
        if topics:  # its routes as they stand, pushed with this round's changes
            routes = self._outbox.setdefault(name, {})
            for topic in topics:
                routes.setdefault(topic, self.streams[(name, topic)])
        self._touch([name])
        self.changed()
        return control.Registered(assignments=len(self._assigned.get(name, ())))

    def _offline(self, record: AgentRecord) -> None:
        """``record`` no longer offers its capabilities to new elements."""
        for capability in record.capabilities:
            self._capable.get(capability, set()).discard(record.name)

    def agent_gone(self, record: AgentRecord) -> None:
        record.conn = None
        record.gone_at = time.monotonic()
        if self.agents.get(record.name) is not record:  # it registered again from another connection
            return
        log.info("agent %s disconnected", safe(record.name))
        self._offline(record)
        self._touch([record.name])
        self.changed()
        self._when_grace_ends(record, lambda: self._agent_grace_over(record))

    def _when_grace_ends(self, record: AgentRecord | BrokerRecord, then: Callable[[], None]) -> None:
        """Call ``then`` once ``record``'s grace has run out (a loop timer may fire a little early)."""
        left = record.gone_at + self.config.grace_s - time.monotonic()
        if left > 0:
            asyncio.get_running_loop().call_later(left, self._when_grace_ends, record, then)
        else:
            then()

    def _agent_grace_over(self, record: AgentRecord) -> None:
        """The agent has not come back: it is gone; its elements go to others, and its
        record is deleted."""
        if self.agents.get(record.name) is record and record.conn is None:
            self._gone([record.name])
            self._forget_agent(record)

    def _forget_agent(self, record: AgentRecord) -> None:
        """Delete the record of an agent gone for longer than the grace period, in memory
        and in sqlite, with its assignments (its elements go to others, or wait for an
        agent).  The records of its streams stay, so that their epochs only ever grow
        if it comes back."""
        name = record.name
        dropped = set()
        for key in list(self._assigned.get(name, ())):
            self._drop_assignment(key, name)
            self.store.delete_assignment(key[0], key[1], name)
            dropped.add(key)
        self._offline(record)
        del self.agents[name]
        self._assigned.pop(name, None)
        self._load.pop(name, None)
        self._touched.pop(name, None)
        at = self._agents_at.get(record.broker_key)
        if at is not None:
            at.discard(name)
            if not at:
                del self._agents_at[record.broker_key]
        self.planner.remove_agent(name)
        self.store.delete_agent(name)
        self.expired += 1
        log.info("agent %s gone for over %.1f s: its record is deleted", safe(name), self.config.grace_s)
        if dropped:
            self._assign_elements(lambda key, _: key in dropped)
        self.changed()

    def _gone(self, names: Iterable[str]) -> None:
        """These agents may be gone from the data plane: plan again, and hand their
        elements to agents that are here."""
        names = [name for name in names if name in self.agents]
        self._touch(names)
        dead = {key for name in names if not self._alive(self.agents[name]) for key in self._assigned.get(name, ())}
        if dead:
            self._assign_elements(lambda key, _: key in dead)
        self.changed()

    def _grace_over(self) -> None:
        """The grace of the recovered records has run out: whoever is not back is gone
        (the records of agents not back are deleted by their own timers)."""
        self._overlay_dirty = True
        self._touch(self.agents)
        self._assign_elements(lambda _, __: True)
        self.changed()

    def broker_state(self, conn: OrchestratorConnection, state: control.BrokerState) -> None:
        """A broker (named by its hello) reports its keys, ports, links and attachments
        (``attached``: all of them, or the first part, the rest in ``ports_changed``;
        None: as before).

        Its keys are checked here, so that one bad registration never stops the planning
        of every stream; keys are primes, so keys that differ can route together.

        Raises:
            BadRequest: no name; keys of no use for routing (``bad_key``: not primes
                above their ports' bitmaps, or ``keys`` not starting with ``key``); a key
                of another connected broker (``same_key``).  The record of a broker that
                is not connected and shares a key is dropped instead.
        """
        name = conn.name
        if not name:
            raise BadRequest(control.BROKER_STATE, "name", "name is required: a broker reports under the name of its hello")
        keys = state.keys or [state.key]
        if keys[0] != state.key:
            raise BadRequest(control.BROKER_STATE, "keys", f"keys: the first must be the root key {state.key}, got {keys[0]}", "bad_key")
        stale: dict[str, BrokerRecord] = {}
        for key in keys:
            owner = self._key_owner.get(key)
            if owner is None or owner == name:
                continue
            other = self.brokers[owner]
            if other.conn is not None:
                raise BadRequest(
                    control.BROKER_STATE, "key", f"key: broker {owner!r} already has key {key}; every broker needs its own key",
                    "same_key",
                )
            stale[owner] = other
        try:
            KeyLayout.from_keys(state.ports, keys)
        except RoutingError as exc:
            raise BadRequest(control.BROKER_STATE, "keys" if state.keys else "key", f"key: {exc}", "bad_key") from None
        for other in stale.values():  # a connected broker wins over the record of one that is not
            log.info(
                "broker %s (key %d) replaces the record of %s (key %d), which is not connected", safe(name), state.key, safe(other.name), other.key,
            )
            self._drop_broker(other)
        old = self.brokers.get(name)
        if old is not None and old.all_keys != keys:
            self._drop_broker(old)
        attached = {port.port: port.name for port in state.attached} if state.attached is not None else old.attached if old else None
        links = [asdict(link) for link in state.links]
        record = BrokerRecord(name, state.key, state.address, state.ports, links, conn, attached=attached, keys=state.keys)
        if old is not None and old.all_keys == keys:  # the load of the links that are still the same links
            same = {link["port"] for link in old.links if _same_link(link, links)}
            record.link_load = {port: load for port, load in old.link_load.items() if port in same}
            record.costs = {port: cost for port, cost in old.costs.items() if port in same}
            record.link_costs = {port: cost for port, cost in old.link_costs.items() if port in same}
            record.queues = {port: queue for port, queue in old.queues.items() if port < record.ports}
        self.brokers[name] = record
        conn.broker = record
        for key in keys:
            self._key_owner[key] = name
        self.store.save_broker(name, state.key, record.address, record.ports, links, state.keys)
        if old is None or old.conn is not conn or (old.all_keys, old.ports, old.links) != (keys, record.ports, links):
            self._overlay_dirty = True
        if old is None or old.conn is not conn or old.all_keys != keys or old.attached is None or attached is None:
            self._gone(self._agents_at.get(state.key, ()))  # new, back, another broker now, or no list to compare
        else:
            self._gone({agent for _, agent in old.attached.items() ^ attached.items()})  # on the ports that changed

    def ports_changed(self, conn: OrchestratorConnection, change: control.PortsChanged) -> None:
        """A broker's attachments since its last report: ``detached`` ports, then ``attached``
        ones.  Ignored (and logged) from a connection whose ``broker_state`` was not taken."""
        record = conn.broker
        if record is None or self.brokers.get(record.name) is not record:
            log.warning("broker %s sent ports_changed without a broker_state that was taken: ignored", safe(conn.name or conn.peer))
            return
        attached = record.attached = {} if record.attached is None else record.attached
        touched = set()
        for port in change.detached:
            agent = attached.pop(port, None)
            if agent is not None:
                touched.add(agent)
        for report in change.attached:
            before = attached.get(report.port)
            if before is not None:
                touched.add(before)
            attached[report.port] = report.name
            touched.add(report.name)
        self._gone(touched)

    def load(self, conn: OrchestratorConnection, report: control.Load) -> None:
        """A broker's load report: a link's cost is planned with once it moved past the
        hysteresis, and a cost that rose falls only after its hold-down
        (:class:`dcp.topology.LinkCost`), which replans the trees it changes; attachment
        queues are kept for placement.  Entries on ports the broker
        has no link on, or out of its range, are ignored: what is kept is one entry per
        port.  Ignored (logged) from a connection whose ``broker_state`` was not taken.
        With ``plan_by_hops`` the link figures are kept for ``status`` only."""
        record = conn.broker
        if record is None or self.brokers.get(record.name) is not record:
            log.warning("broker %s sent load without a broker_state that was taken: ignored", safe(conn.name or conn.peer))
            return
        link_ports = {link["port"] for link in record.links}
        now = time.monotonic()
        for entry in report.links:
            if entry.port not in link_ports:
                continue
            record.link_load[entry.port] = (entry.rtt_ms, entry.bytes_per_s, entry.queue_bytes)
            if self.config.plan_by_hops:
                continue  # shown in status, never planned with
            cost = record.link_costs.setdefault(entry.port, LinkCost())
            if cost.measure(link_cost_us(entry.rtt_ms, entry.queue_bytes, entry.bytes_per_s), now):
                self._plan_cost(record, entry.port, cost)
            elif cost.pending is not None and entry.port not in record.releasing:
                record.releasing.add(entry.port)
                assert self._loop is not None
                self._loop.call_later(cost.held_until - now, self._release_cost, record, entry.port, cost)
        for port_load in report.ports:
            if port_load.port >= record.ports:
                continue
            if port_load.queue_bytes:
                record.queues[port_load.port] = port_load.queue_bytes
            else:
                record.queues.pop(port_load.port, None)
            agent = self.agents.get((record.attached or {}).get(port_load.port, ""))
            if agent is not None and agent.broker_key == record.key and agent.port == port_load.port:
                agent.load.queued(port_load.queue_bytes, now)
                self._relieve(agent, now)
        if self._overlay_dirty:
            self.changed()

    def _plan_cost(self, record: BrokerRecord, port: int, cost: LinkCost) -> None:
        assert cost.planned is not None
        rtt_ms, bytes_per_s, queue_bytes = record.link_load[port]
        log.info("link %s port %d now costs %d us (rtt %.1f ms, %d B/s, %d B queued)", safe(record.name), port, cost.planned,
                 rtt_ms, bytes_per_s, queue_bytes)
        record.costs[port] = cost.planned
        self._overlay_dirty = True

    def _release_cost(self, record: BrokerRecord, port: int, cost: LinkCost) -> None:
        """A link's hold-down is over: the fall measured during it is planned with, if the
        link is still the same one of a broker still registered."""
        record.releasing.discard(port)
        if self.brokers.get(record.name) is not record or record.link_costs.get(port) is not cost:
            return
        now = time.monotonic()
        if cost.release(now):
            self._plan_cost(record, port, cost)
            self.changed()
        elif cost.pending is not None:  # it rose and fell again meanwhile: a longer hold
            record.releasing.add(port)
            assert self._loop is not None
            self._loop.call_later(cost.held_until - now, self._release_cost, record, port, cost)

    def _drop_broker(self, record: BrokerRecord) -> None:
        """Forget ``record`` (its keys now name another broker, or it took new ones)."""
        if self.brokers.get(record.name) is record:
            del self.brokers[record.name]
            self.store.delete_broker(record.name)
        for key in record.all_keys:
            if self._key_owner.get(key) == record.name:
                del self._key_owner[key]
        self._overlay_dirty = True
        self._gone(self._agents_at.get(record.key, ()))

    def broker_gone(self, record: BrokerRecord) -> None:
        record.conn = None
        record.gone_at = time.monotonic()
        if self.brokers.get(record.name) is not record:  # reported again since, from another connection
            return
        log.info("broker %s disconnected; its last report stands for %.1f s", safe(record.name), self.config.grace_s)
        self._touch(self._agents_at.get(record.key, ()))  # its reports of their ports no longer count
        self.changed()
        self._when_grace_ends(record, lambda: self._broker_grace_over(record))

    def _broker_grace_over(self, record: BrokerRecord) -> None:
        if self.brokers.get(record.name) is record and record.conn is None:
            self._overlay_dirty = True
            self._gone(self._agents_at.get(record.key, ()))

    def present(self, record: BrokerRecord) -> bool:
        """Whether a broker is part of the overlay: connected, or gone for less than the grace.

        A broker's connection to the orchestrator is not on the data path: losing it (or
        an orchestrator restart) says nothing about the broker's ports and links, which
        keep forwarding.  Its last report stands until it re-registers or the grace ends.
        """
        return record.conn is not None or time.monotonic() - record.gone_at < self.config.grace_s

    # -- pipelines ----------------------------------------------------------------------

    def access_policy(self) -> Policy:
        """Who may publish and consume what now: the policy file's rules, then every
        deployed spec's, each scoped to the topics its own elements emit
        (:meth:`PipelineSpec.scoped_rules`): a pipeline's rules say nothing of another's data."""
        rules = [rule for spec in self.pipelines.values() for rule in spec.scoped_rules()]
        return self.file_access_policy.extended(rules)

    def _policy_changed(self) -> None:
        self._policy = self.access_policy()
        self.planner.set_policy(self._policy)

    def deploy(self, data: dict[str, Any]) -> control.Deployed:
        """Deploy the pipeline spec ``data`` (a spec file's table).

        Raises:
            BadRequest: the spec does not parse, or does not check against the agents and
                pipelines there are now (code ``invalid_spec``, the field named).
        """
        try:
            return self._deploy(data)
        except SpecError as exc:
            raise BadRequest(control.DEPLOY, f"spec.{exc.field}", f"spec.{exc}", exc.code) from None

    def _deploy(self, data: dict[str, Any]) -> control.Deployed:
        spec = parse_spec(data)
        if spec.name in self.pipelines:
            raise SpecError("name", f"a pipeline named {spec.name!r} is already deployed; undeploy it first")
        online = [a for a in self.agents.values() if a.conn is not None]
        capabilities = {c for a in online for c in a.capabilities}
        external = {t for a in online for t in a.produces} | {
            spec_element.emits for other in self.pipelines.values() for spec_element in other.elements if spec_element.emits
        }
        access_policy = self.access_policy()  # check_spec adds the spec's own rules, scoped as they will be
        check_spec(
            spec,
            capabilities=capabilities,
            external_topics=external,
            agents=[a.name for a in online],
            access_policy=access_policy,
            agents_with=lambda capability: [a.name for a in online if capability in a.capabilities],
        )
        self.pipelines[spec.name] = spec
        self.deployed_at[spec.name] = time.time()
        self.store.save_pipeline(spec.name, spec.to_dict(), self.deployed_at[spec.name])
        self._policy_changed()
        self._assign_elements(lambda _, __: True)  # its policy may let other elements' candidates in too
        self.changed()
        log.info("pipeline %s deployed: %d element(s)", safe(spec.name), len(spec.elements))
        warnings = [f"{element}: {warning}" for element, found in self._warnings(spec).items() for warning in found]
        return control.Deployed(pipeline=spec.name, assignments=self._assignments_of(spec.name), warnings=warnings or None)

    def undeploy(self, name: str) -> None:
        """Raises BadRequest (``no_pipeline``) if no pipeline of that name is deployed."""
        spec = self.pipelines.pop(name, None)
        if spec is None:
            raise BadRequest(control.UNDEPLOY, "name", f"no pipeline named {name!r} is deployed", "no_pipeline")
        for element in spec.elements:
            key = (spec.name, element.name)
            for agent in list(self.assignments.get(key, ())):
                self._drop_assignment(key, agent)
                self._send_to_agent(agent, control.Unassign(pipeline=spec.name, element=element.name))
            self.assignments.pop(key, None)
            self._moved_at.pop(key, None)
        self.deployed_at.pop(spec.name, None)
        self.store.delete_pipeline(spec.name)
        self._policy_changed()
        self.changed()
        log.info("pipeline %s undeployed", safe(spec.name))

    def _assign_elements(self, which: Callable[[ElementKey, ElementSpec], bool]) -> None:
        """Give the elements ``which`` selects, in pipeline order, their replicas among
        the connected agents offering their capability."""
        for spec in self.pipelines.values():
            for element in spec.elements:
                key = (spec.name, element.name)
                if element.external or not which(key, element):
                    continue
                current = self.assignments.setdefault(key, [])
                for agent in list(current):
                    record = self.agents.get(agent)
                    if record is None or not self._alive(record):
                        if self._candidates(element, exclude=current):  # hand the element to an agent that is here
                            self._drop_assignment(key, agent)
                            self.store.delete_assignment(spec.name, element.name, agent)
                if sum(1 for a in current if a in self.agents and self._alive(self.agents[a])) >= element.replicas:
                    continue
                for candidate in self._candidates(element, exclude=current, spec=spec):
                    if len(current) >= element.replicas:
                        break
                    self._assign(key, candidate)

    def _assign(self, key: ElementKey, agent: str) -> None:
        """Give ``agent`` the element ``key``: stored, and pushed to it."""
        self._add_assignment(key, agent)
        self.store.save_assignment(key[0], key[1], agent)
        self._send_to_agent(agent, self._assign_message(*key))
        log.info("%s/%s assigned to %s", safe(key[0]), safe(key[1]), safe(agent))

    def _add_assignment(self, key: ElementKey, agent: str) -> None:
        self.assignments.setdefault(key, []).append(agent)
        self._assigned.setdefault(agent, {})[key] = None
        self._load[agent] += 1
        self._touch([agent])

    def _drop_assignment(self, key: ElementKey, agent: str) -> None:
        self.assignments[key].remove(agent)
        self._assigned[agent].pop(key, None)
        self._load[agent] -= 1
        self._touch([agent])

    def _candidates(self, element: ElementSpec, exclude: list[str], spec: PipelineSpec | None = None) -> list[str]:
        """Connected agents that may run ``element``, least loaded first (by reported load,
        then by how many elements they have), then by name; for an element of ``spec``
        with a latency budget, first those whose broker the agents of its producers in
        the pipeline reach within the budget (by the costs planned with)."""
        eligible = self._eligible(element, exclude)
        if spec is None or element.max_latency_ms is None:
            return sorted(eligible, key=self._placement_order)
        reach = [distances(self.planner.overlay, source) for source in self._producer_endpoints(spec, element)]
        budget_us = element.max_latency_ms * 1000

        def order(name: str) -> tuple[bool, int, int, str]:
            at = self._endpoint(self.agents[name])
            worst = max((costs.get(at[0], inf) for costs in reach), default=0) if at is not None else inf
            return (worst > budget_us, *self._placement_order(name))

        return sorted(eligible, key=order)

    def _producer_endpoints(self, spec: PipelineSpec, element: ElementSpec) -> set[Endpoint]:
        """Where the agents run that produce, in ``spec``, what ``element`` consumes (on brokers of the overlay)."""
        keys = self.planner.overlay.keys
        found = set()
        for topic, producer in spec.emitted().items():
            if any(topic_matches(pattern, topic) for pattern in element.consumes):
                for agent in self.assignments.get((spec.name, producer.name), []):
                    at = self._endpoint(self.agents[agent]) if agent in self.agents else None
                    if at is not None and at[0] in keys:
                        found.add(at)
        return found

    def _eligible(self, element: ElementSpec, exclude: list[str]) -> Iterator[str]:
        pool = self._capable.get(element.capability or "", set())
        if element.agent is not None:
            pool = pool & {element.agent}
        return (
            name for name in pool
            if name not in exclude and (not element.emits or self._policy.allows(name, "publish", element.emits))
        )

    def _placement_order(self, name: str) -> tuple[int, int, str]:
        return self.agents[name].load.step, self._load[name], name

    # -- placement by load ---------------------------------------------------------------

    def report(self, record: AgentRecord, report: control.Report) -> None:
        """An agent's report: its counters for ``pipelines``, and its load (O(its elements));
        an agent saturated for a while gets one of its elements moved off (:mod:`dcp.placement`)."""
        record.report = report
        now = time.monotonic()
        record.load.report(report, now)
        self._relieve(record, now)

    def _relieve(self, record: AgentRecord, now: float) -> None:
        """If ``record`` has been saturated long enough, move one of its elements to a
        candidate with clearly more room (:func:`dcp.placement.pick_move`).  Looked at once
        per MOVE_GAP_S at most: that look costs its elements' candidates; a report does not."""
        if not record.load.due(now) or self.agents.get(record.name) is not record:
            return
        record.load.looked_at = now
        held = {key: f"{key[0]}/{key[1]}" for key in self._assigned.get(record.name, ())}
        move = pick_move(record.load, held, self._least_loaded, self._moved_at, now)
        if move is not None:
            self._move(move[0], record.name, move[1], now)

    def _least_loaded(self, key: ElementKey) -> tuple[str, float] | None:
        """The candidate (and its load) that would get element ``key`` now, its holders aside."""
        name = min(self._eligible(self.pipelines[key[0]].element(key[1]), self.assignments[key]), key=self._placement_order, default=None)
        return None if name is None else (name, self.agents[name].load.value)

    def _move(self, key: ElementKey, source: str, target: str, now: float) -> None:
        """Move element ``key`` from ``source`` to ``target``: the new assignment first, then
        the old one dropped.  Both agents' views change in the same planning round, so the
        element's consumers get new routes, and a share group of its replicas a new epoch
        with the new member in place of the old: each frame still goes to one of them."""
        log.info("%s/%s moves from %s (load %.2f) to %s (load %.2f)", safe(key[0]), safe(key[1]), safe(source),
                 self.agents[source].load.value, safe(target), self.agents[target].load.value)
        self._assign(key, target)
        self._drop_assignment(key, source)
        self.store.delete_assignment(key[0], key[1], source)
        self._send_to_agent(source, control.Unassign(pipeline=key[0], element=key[1]))
        self._moved_at[key] = now
        self.changed()

    def _online(self, agent: str) -> bool:
        record = self.agents.get(agent)
        return record is not None and record.conn is not None

    def _alive(self, record: AgentRecord) -> bool:
        """Whether an agent still counts on the data plane.

        Its connection to us is not on the data path: while it is away (or we just
        restarted) the agent keeps its attachment, unless its broker reports that port
        detached, until the grace ends.
        """
        if record.conn is not None:
            return True
        if time.monotonic() - record.gone_at >= self.config.grace_s:
            return False
        broker = self._broker_at(record.broker_key)
        if broker is None:
            return False
        if broker.conn is not None and broker.attached is not None:
            return broker.attached.get(record.port) == record.name
        return True

    def _assign_message(self, pipeline: str, element_name: str) -> control.Assign:
        element = self.pipelines[pipeline].element(element_name)
        assert element.capability is not None  # external sources are never assigned
        return control.Assign(
            pipeline=pipeline, element=element.name, kind=element.kind, capability=element.capability,
            params=element.params, consumes=list(element.consumes), emits=element.emits,
        )

    def _assignments_of(self, pipeline: str) -> dict[str, list[str]]:
        return {element: agents for (p, element), agents in self.assignments.items() if p == pipeline}

    # -- planning -------------------------------------------------------------------

    def _effective(self, record: AgentRecord) -> tuple[list[str], list[str]]:
        """(consumes, produces) of an agent: its own, plus its assigned elements' (the
        inputs its replicas share aside: :meth:`_shares`)."""
        consumes, produces = list(record.consumes), list(record.produces)
        for pipeline, element_name in self._assigned.get(record.name, ()):
            spec = self.pipelines.get(pipeline)
            if spec is not None:
                element = spec.element(element_name)
                if not element.shared:
                    consumes.extend(element.consumes)
                if element.emits and not element.external:
                    produces.append(element.emits)
        return consumes, produces

    def _shares(self, record: AgentRecord) -> list[tuple[str, str, str]]:
        """What an agent takes as one of a share group, (pattern, group, mode): the inputs
        of its elements whose replicas share them, and the requests to each capability it
        offers (its offerers share them in turn)."""
        shares = [(REQUESTS + capability, REQUESTS + capability, "round_robin") for capability in record.capabilities if requestable(capability)]
        for pipeline, element_name in self._assigned.get(record.name, ()):
            spec = self.pipelines.get(pipeline)
            element = spec.element(element_name) if spec is not None else None
            if element is not None and element.shared:
                shares.extend((pattern, f"{pipeline}/{element_name}", element.share) for pattern in element.consumes)
        return shares

    def _view(self, record: AgentRecord) -> AgentView:
        """What the planner needs of an agent: where it counts on the data plane, if it does."""
        consumes, produces = self._effective(record)
        return AgentView(self._endpoint(record), record.conn is not None, tuple(consumes), tuple(produces), tuple(self._shares(record)))

    def _endpoint(self, record: AgentRecord) -> Endpoint | None:
        """Where an agent counts on the data plane: its port on a broker present, while it is alive."""
        broker = self._broker_at(record.broker_key)
        return (broker.name, record.port) if broker is not None and self._alive(record) else None

    def overlay(self) -> Overlay:
        """The brokers present and the links both ends report up."""
        layouts: dict[str, KeyLayout] = {}
        for b in self.brokers.values():
            if self.present(b):
                try:
                    layouts[b.name] = KeyLayout(b.ports, b.all_keys)
                except RoutingError as exc:  # a record from before the checks
                    log.error("broker %s cannot route with its keys (%s); planning without it", safe(b.name), exc)
        by_key = {layout.root: name for name, layout in layouts.items()}
        ends = {(name, link["port"]): link for name in layouts for link in self.brokers[name].links}
        links: dict[frozenset[tuple[str, int]], OverlayLink] = {}
        for (name, port), link in ends.items():
            other = by_key.get(link["remote_key"])
            if other is None or link["state"] != "up":
                continue
            back = ends.get((other, link["remote_port"]))
            if back is None or back["state"] != "up" or back["remote_key"] != layouts[name].root:
                continue
            edge = frozenset({(name, port), (other, link["remote_port"])})
            links.setdefault(edge, OverlayLink(name, port, other, link["remote_port"]))
        costs = {(name, port): cost for name in layouts for port, cost in self.brokers[name].costs.items()}
        try:
            return Overlay(layouts, links.values(), costs)
        except RoutingError as exc:
            kept = _routable(layouts)
            log.error(
                "the brokers report an inconsistent overlay (%s); planning with brokers %s only", safe(exc), safe(", ".join(kept) or "none", 1024),
            )
        usable = [link for link in links.values() if link.a in kept and link.b in kept]
        try:
            return Overlay(kept, usable, costs)
        except RoutingError as exc:
            log.error("their links are inconsistent too (%s); planning without links", safe(exc))
            return Overlay(kept)

    def _broker_at(self, key: int) -> BrokerRecord | None:
        """The broker present with root key ``key``, if any."""
        name = self._key_owner.get(key)
        record = self.brokers.get(name) if name is not None else None
        return record if record is not None and record.key == key and self.present(record) else None

    def _broker_name(self, key: int) -> str | None:
        record = self._broker_at(key)
        return record.name if record is not None else None

    def serve_later(self, conn: OrchestratorConnection) -> None:
        """``conn`` has requests waiting: serve them in turn with the others' (at once
        when the orchestrator runs without a loop, as in tests)."""
        if not conn.queued:
            conn.queued = True
            self._inbox.append(conn)
        if self._loop is None:
            self._serve(deadline=float("inf"))
        elif not self._serving:
            self._serving = True
            self._loop.call_soon(self._serve)

    def _serve(self, deadline: float | None = None) -> None:
        """Serve waiting requests, one per connection in turn, for :data:`SERVE_S` at
        most; the rest in the next iteration of the loop, after its timers and reads.
        A burst of thousands of registrations read in one iteration is served over many,
        and the loop stays free for timers, pings and planning meanwhile."""
        self._serving = False
        if deadline is None:
            deadline = time.perf_counter() + SERVE_S
        inbox = self._inbox
        while inbox:
            conn = inbox.popleft()
            conn.queued = False
            if conn.serve_one():
                conn.queued = True
                inbox.append(conn)
            if time.perf_counter() >= deadline:
                break
        if inbox and not self._serving and self._loop is not None:
            self._serving = True
            self._loop.call_soon(self._serve)

    def _recompute(self) -> None:
        """One slice of planning: events to the planner, dirty streams planned and stored
        in the round's transaction; once none is left (or the round is old), commit, and
        push what was stored, one write per agent.  Then, if work is left, the next slice."""
        self._dirty = False
        if self._closed is not None and self._closed.is_set():
            return
        started = time.perf_counter()
        deadline = started + SLICE_S
        if self._planning_left():
            if self._round_started is None:
                self._round_started = started
                self.recomputations += 1
                self.store.begin()
            self._plan(started + (SLICE_S / 2 if self._sending else SLICE_S))
        if self._round_started is not None and (not self._planning_left() or started - self._round_started >= ROUND_S):
            self._end_round()
        if self._round_started is None and self._outbox:
            self._sending.extend(self._outbox.items())
            self._outbox = {}
        self._send_routes(deadline)
        took = time.perf_counter() - started
        self.slice_seconds.observe(took)
        self._slices += 1
        self._longest_slice_s = max(self._longest_slice_s, took)
        if self._planning_left() or self._round_started is not None or self._sending:
            self.changed()

    def _planning_left(self) -> bool:
        return self._overlay_dirty or bool(self._touched) or self.planner.pending > 0

    def _plan(self, deadline: float) -> None:
        """Until ``deadline``: tell the planner what changed, then plan; store what changed
        (in the round's transaction) and queue its pushes."""
        if self._overlay_dirty:
            self._overlay_dirty = False
            self.planner.set_overlay(self.overlay())
        touched = self._touched
        while touched and time.perf_counter() < deadline:
            name, _ = touched.popitem()
            try:
                self.planner.set_agent(name, self._view(self.agents[name]))
            except Exception:  # a record nothing checked (an old file): this agent only, never the round
                log.exception("agent %s cannot be planned; ignored until it registers again", safe(name))
        if touched or not self.planner.pending:
            return
        changed = self.planner.step(max(0.0, deadline - time.perf_counter()))
        self.store.save_streams((s.producer, s.topic, s.epoch, s.x, s.consumers) for s in changed)
        for stream in changed:
            self._outbox.setdefault(stream.producer, {})[stream.topic] = stream
            log.debug(
                "route %s/%s epoch %d -> %s (%d bytes)", safe(stream.producer), safe(stream.topic), stream.epoch,
                safe(", ".join(stream.consumers) or "nobody"), len(int_to_bytes(stream.x)),
            )

    def _end_round(self) -> None:
        """Store the round's routes for good: from now on they may be pushed."""
        self.store.commit()
        took = time.perf_counter() - (self._round_started or 0.0)
        self.round_seconds.observe(took)
        self._round_started = None
        routes = sum(len(topics) for topics in self._outbox.values())
        if routes:
            partial = self.planner.partial
            log.info(
                "planning round %d: %d route(s) to push to %d agent(s), %.1f ms%s", self.recomputations, routes,
                len(self._outbox), took * 1000, f"; {partial} stream(s) cannot reach every consumer" if partial else "",
            )
        self._freeze()
        if (self._checkpoint is None or self._checkpoint.done()) and time.monotonic() - self._checkpointed >= CHECKPOINT_S:
            self._checkpointed = time.monotonic()
            self._checkpoint = asyncio.get_running_loop().run_in_executor(None, self.store.checkpoint)
            self._checkpoint.add_done_callback(_checkpoint_done)

    def _freeze(self) -> None:
        """Take the state planned so far out of the cyclic collector's sight, once it has grown.

        Registries, routes and indexes live as long as their agents, and are freed by
        reference counting, not by the collector; yet each full collection walks all of
        them: 100-400 ms at 10,000 agents, a stall of the loop.  Frozen (``gc.freeze()``),
        they are no longer walked, so a collection costs what came since.  What is frozen
        and later becomes cyclic garbage is not collected; the state frozen here breaks
        its cycles when it goes (a gone connection's record drops it).
        """
        size = len(self.agents) + len(self.streams)
        if size - self._frozen >= FREEZE_STEP:
            gc.freeze()
            self._frozen = size

    def _send_routes(self, deadline: float) -> None:
        """Push stored routes until ``deadline`` (one agent at least), one write per agent."""
        sending = self._sending
        while sending:
            name, streams = sending.popleft()
            record = self.agents.get(name)
            if record is not None and record.conn is not None:
                record.conn.send_all([self._route_message(stream) for stream in streams.values()])
                self.route_pushes += len(streams)
                self.push_writes += 1
            if time.perf_counter() >= deadline:
                return

    def _route_message(self, stream: Stream) -> control.Route:
        """The route push of ``stream``; with a secret, a fresh tag, which carries its own
        expiry and is valid only in frames its producer publishes on its source broker
        (none while that broker is not known here: X means nothing elsewhere)."""
        source = self.brokers.get(stream.broker)  # the agent uses X only while attached there
        tag = None
        variant_tags = None
        signer = self.signer if source is not None else None
        expires = int(time.time() + self.config.route_ttl_s)
        if signer is not None and stream.x and source is not None:
            tag = signer.sign(stream.topic, stream.x, stream.epoch, expires, producer=stream.producer, broker_key=source.key)
            if stream.variants:
                variant_tags = [
                    signer.sign(stream.topic, x, stream.epoch, expires, producer=stream.producer, broker_key=source.key)
                    for x in stream.variants
                ]
            self._signed_until[(stream.producer, stream.topic)] = expires
        shares = [self._share_message(group, expires) for group in stream.groups] if stream.groups else None
        return control.Route(
            topic=stream.topic, x=stream.x, epoch=stream.epoch, consumers=stream.consumers, refused=stream.refused or None,
            broker_key=None if source is None else source.key, tag=tag,
            variants=list(stream.variants) or None, variant_tags=variant_tags, shares=shares,
        )

    def _share_message(self, group: ShareGroup, expires: int) -> control.Share:
        """A share group of a route push; for a request stream, each member's way back,
        signed for that member on its broker (epoch 0: a reply route is bounded by its
        expiry alone, the requests of many requesters sharing the member's reply topic)."""
        if not group.replies:
            return control.Share(group=group.name, mode=group.mode, members=list(group.members))
        keys = []
        for member in group.members:
            record = self.agents.get(member)
            keys.append(record.broker_key if record is not None else 0)
        tags = None
        if self.signer is not None:
            tags = [
                self.signer.sign(REPLIES, x, 0, expires, producer=member, broker_key=key)
                for member, x, key in zip(group.members, group.replies, keys)
            ]
        return control.Share(
            group=group.name, mode=group.mode, members=list(group.members), replies=list(group.replies), reply_tags=tags,
            reply_keys=keys,
        )

    def _resign(self) -> None:
        """Push a fresh tag for every route whose tag has less than half its life left
        (same epoch, later expiry: a verifying broker takes it as the stream's newest)."""
        if self._closed is None or self._closed.is_set():
            return
        ttl = self.config.route_ttl_s
        now = time.time()
        for key, stream in self.streams.items():
            if stream.x and self._signed_until.get(key, 0) - now < ttl / 2:
                self._outbox.setdefault(stream.producer, {})[stream.topic] = stream  # signed when sent
        if self._outbox:
            self.changed()
        asyncio.get_running_loop().call_later(ttl / 4, self._resign)

    def issue(self, request: control.Token) -> control.Issued:
        """The admin op ``token``: a token for ``name`` in ``role`` (``agent`` or ``admin``), valid ``ttl_s`` seconds.

        Raises:
            ConfigError: no secret to sign with.
            BadRequest: a role it does not issue, or a lifetime over the longest.
        """
        if self.secret is None:
            raise ConfigError("this orchestrator has no --secret-file: it cannot issue tokens")
        name, role = request.name, request.role
        if role not in ISSUED_ROLES:
            raise BadRequest(control.TOKEN, "role", f"role must be one of {', '.join(ISSUED_ROLES)}, got {role!r}")
        try:
            expires = expiry(time.time(), DEFAULT_TOKEN_TTL_S if request.ttl_s is None else request.ttl_s)
        except ConfigError as exc:
            raise BadRequest(control.TOKEN, "ttl_s", str(exc)) from None
        log.info("token issued to %s (role %s), valid until %s UTC", safe(name), role, time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(expires)))
        return control.Issued(token=issue_token(self.secret, name, role, expires), name=name, role=role, expires=expires)

    def _send_to_agent(self, name: str, message: control.Message) -> None:
        record = self.agents.get(name)
        if record is not None and record.conn is not None:
            record.conn.send(message)

    # -- views ------------------------------------------------------------------------

    def pipelines_view(self) -> list[dict[str, Any]]:
        """Deployed pipelines with each element's agents, their live counters and last
        error, and the element's warnings (:meth:`_warnings`)."""
        view = []
        for name, spec in self.pipelines.items():
            elements = []
            warnings = self._warnings(spec)
            latencies = self._latencies(spec)
            for element in spec.elements:
                agents = []
                key = f"{name}/{element.name}"
                for agent in self.assignments.get((name, element.name), []):
                    record = self.agents.get(agent)
                    report = record.report if record else None
                    counters = report.elements.get(key, {}) if report else {}
                    agents.append({
                        "agent": agent, "online": self._online(agent), **counters,
                        "dropped": report.dropped if report else 0, "unrouted": report.unrouted if report else 0,
                        "last_error": (report.last_errors or {}).get(key, "") if report else "",
                    })
                latency = latencies[element.name]
                elements.append({
                    "name": element.name, "kind": element.kind, "capability": element.capability,
                    "consumes": list(element.consumes), "emits": element.emits, "agents": agents,
                    "warnings": warnings.get(element.name, []) + _unmet(latency), "latency": latency,
                })
            whole = _chain_latency(spec, latencies)
            view.append({
                "name": name, "deployed_at": self.deployed_at.get(name), "elements": elements, "latency": whole, "warnings": _unmet(whole),
            })
        return view

    def _latencies(self, spec: PipelineSpec) -> dict[str, dict[str, Any]]:
        """Per element, the latency into it: its budget, the estimate of the paths planned
        from its producers' agents to its own (the costs of the overlay planned with: the
        least there is, as trees are least-cost), and the largest mean publish-to-handle
        delay its agents report (None: nothing to estimate, or not reported yet)."""
        overlay = self.planner.overlay
        reach: dict[Endpoint, dict[str, int]] = {}  # producer endpoint -> costs from there, computed once
        emitted = spec.emitted()
        found: dict[str, dict[str, Any]] = {}
        for element in spec.elements:
            estimate: float | None = None
            producers = {emitted[topic] for topic in emitted if any(topic_matches(p, topic) for p in element.consumes)}
            for source in self._producer_endpoints(spec, element):
                costs = reach.get(source)
                if costs is None:
                    costs = reach[source] = distances(overlay, source)
                for agent in self.assignments.get((spec.name, element.name), []):
                    at = self._endpoint(self.agents[agent]) if agent in self.agents else None
                    if at is not None and at[0] in costs:
                        estimate = max(estimate or 0.0, costs[at[0]] / 1000)
            measured = [
                report.elements[f"{spec.name}/{element.name}"].get("latency_ms", 0.0)
                for agent in self.assignments.get((spec.name, element.name), [])
                for report in [self.agents[agent].report if agent in self.agents else None]
                if report is not None and f"{spec.name}/{element.name}" in report.elements
            ] if element.consumes else []
            found[element.name] = {
                "budget_ms": element.max_latency_ms, "estimate_ms": None if estimate is None else round(estimate, 3),
                "measured_ms": round(max(measured), 3) if measured else None,
                "producers": sorted(p.name for p in producers),
            }
        return found

    def _warnings(self, spec: PipelineSpec) -> dict[str, list[str]]:
        """Why routes of ``spec`` reach nobody, per element name: an agent of it on no broker
        of the overlay, and streams its agents emit that miss consumers.

        Read from the registries as they are now, not kept: a warning goes once its cause
        does (a broker that registers after its agents, a link that comes up)."""
        warnings: dict[str, list[str]] = {}
        for element in spec.elements:
            found = []
            assigned = self.assignments.get((spec.name, element.name), ())
            alive = sum(1 for agent in assigned if agent in self.agents and self._alive(self.agents[agent]))
            if not element.external and alive < element.replicas:
                found.append(
                    f"{alive} of {element.replicas} replicas running: no other connected agent offers {element.capability!r}"
                    + (" (each frame goes to one of those running)" if element.shared and alive else "")
                )
            for agent in assigned:
                record = self.agents.get(agent)
                if record is None or not self._alive(record):
                    continue  # shown offline; its element goes to another agent
                source = self._endpoint(record)
                if source is None:
                    found.append(f"agent {agent} {self._unplaced(record)}")
                elif element.emits:
                    found.extend(self._unreached(agent, source, element.emits))
            if found:
                warnings[element.name] = found
        return warnings

    def _unplaced(self, record: AgentRecord) -> str:
        """Why an agent is on no broker of the overlay, or "" if it is on one."""
        if self._broker_at(record.broker_key) is not None:
            return ""
        owner = self._key_owner.get(record.broker_key)
        if owner is not None:
            return f"is attached to broker {owner}, gone for over {self.config.grace_s:g} s: its routes reach nobody until that broker is back"
        return (
            f"is attached to a broker the orchestrator does not know (key {record.broker_key}): its routes reach nobody "
            "until that broker registers (start it with --orchestrator)"
        )

    def _unreached(self, producer: str, source: Endpoint, topic: str) -> list[str]:
        """A warning if the stream of ``topic`` from ``producer`` (at ``source``) has no
        consumer, or misses some, naming :data:`MISSES_NAMED` of them and why."""
        stream = f"stream {producer}/{topic}"
        policy = self._policy
        if not policy.allows(producer, "publish", topic):
            return [f"{stream} reaches nobody: {policy.why(producer, 'publish', topic)}"]
        consumers = self._consumers_of(topic)
        consumers.discard(producer)
        if not consumers:
            return [f"{stream} reaches nobody: no agent consumes {topic!r}"]
        planned = self.streams.get((producer, topic))
        unplanned = sorted(consumers - set(planned.consumers if planned is not None else ()))  # the others are reached
        reachable = self.planner.reachable(source[0]) if unplanned else set()
        misses = []
        for name in unplanned:
            record = self.agents[name]
            endpoint = self._endpoint(record)
            if endpoint is None:  # alive, so on no broker of the overlay
                misses.append(f"{name} {self._unplaced(record)}")
            elif endpoint[0] not in reachable:
                misses.append(f"{name} cannot be reached: no path of links that are up leads from broker {source[0]} to broker {endpoint[0]}")
        if not misses:
            return []
        named = "; ".join(misses[:MISSES_NAMED]) + (f"; and {len(misses) - MISSES_NAMED} more" if len(misses) > MISSES_NAMED else "")
        if len(misses) == len(consumers):
            return [f"{stream} reaches none of its {len(consumers)} consumer(s): {named}"]
        return [f"{stream} misses {len(misses)} of its {len(consumers)} consumer(s): {named}"]

    def _consumers_of(self, topic: str) -> set[str]:
        """The alive agents the policy lets consume ``topic`` whose patterns name it: those
        the planner indexes, those of deployed elements (assigned since its last slice
        too), and those at brokers the orchestrator does not know, which it does not index."""
        names = self.planner.consumers_of(topic)
        for spec in self.pipelines.values():
            for element in spec.elements:
                if any(topic_matches(pattern, topic) for pattern in element.consumes):
                    names.update(self.assignments.get((spec.name, element.name), ()))
        unindexed = (self.agents.get(name) for key, at in self._agents_at.items() if self._broker_at(key) is None for name in at)
        names.update(r.name for r in unindexed if r is not None and any(topic_matches(p, topic) for p in r.consumes))
        return {
            name for name in names
            if name in self.agents and self._alive(self.agents[name]) and self._policy.allows(name, "consume", topic)
        }

    def status(self, summary: bool = False) -> dict[str, Any]:
        """Brokers, agents and streams, and the planning counters; ``summary``: the counts
        of agents and streams instead of their lists."""
        counters = self.planner.counters
        listed: dict[str, Any] = {"agents": len(self.agents), "streams": len(self.streams)} if summary else {
            "agents": [
                {"name": a.name, "online": a.conn is not None, "broker": self._broker_name(a.broker_key), "port": a.port,
                 "capabilities": a.capabilities, "consumes": consumes, "produces": produces,
                 "shares": [{"pattern": pattern, "group": group, "mode": mode} for pattern, group, mode in self._shares(a)]}
                for a in self.agents.values()
                for consumes, produces in [self._effective(a)]
            ],
            "streams": [
                {"producer": s.producer, "topic": s.topic, "epoch": s.epoch, "x_bytes": len(int_to_bytes(s.x)),
                 "consumers": s.consumers, **({"refused": s.refused} if s.refused else {}),
                 **({"shares": [{"group": g.name, "mode": g.mode, "members": list(g.members)} for g in s.groups]} if s.groups else {})}
                for s in self.streams.values()
            ],
        }
        return {
            "brokers": [
                {"name": b.name, "key": str(b.key), "address": b.address, "online": b.conn is not None, "routing": self.present(b),
                 "links": [{**link, "remote_key": str(link["remote_key"]), **_load_view(b, link["port"])} for link in b.links]}
                for b in self.brokers.values()
            ],
            **listed,
            "connections": {
                "open": len(self._connections), "capacity": None if self.capacity == sys.maxsize else self.capacity,
                "refused": self.refused, "hello_timeouts": self.hello_timeouts,
                "refused_per_name": self.per_name.refused, "refused_per_address": self.per_address.refused,
                "names_taken": self.names_taken, "agents_expired": self.expired,
            },
            "recomputations": self.recomputations,
            "planning": {
                "rounds": self.recomputations, "slices": self._slices, "streams_planned": counters.planned,
                "routes_changed": counters.changed, "planning_ms": round(counters.seconds * 1000, 3),
                "longest_slice_ms": round(self._longest_slice_s * 1000, 3), "pending": self.planner.pending,
                "failing": self.planner.failing,
            },
        }


def _chain_latency(spec: PipelineSpec, latencies: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The pipeline's latency: its budget, and the estimate and measure of its slowest
    chain from a source to a sink (the sums of the edges' along the chain; the spec has
    no cycle)."""
    totals: dict[str, tuple[float, float]] = {}

    def total(name: str) -> tuple[float, float]:
        if name not in totals:
            own = latencies[name]
            before = [total(producer) for producer in own["producers"] if producer != name]
            totals[name] = (
                (own["estimate_ms"] or 0.0) + max((b[0] for b in before), default=0.0),
                (own["measured_ms"] or 0.0) + max((b[1] for b in before), default=0.0),
            )
        return totals[name]

    worst = [total(element.name) for element in spec.elements]
    return {
        "budget_ms": spec.max_latency_ms, "estimate_ms": round(max(w[0] for w in worst), 3),
        "measured_ms": round(max(w[1] for w in worst), 3),
    }


def _unmet(latency: dict[str, Any]) -> list[str]:
    """The warning that a latency budget is not met, by the estimate or by the measure."""
    budget = latency["budget_ms"]
    if budget is None:
        return []
    over = [f"{what} {latency[key]} ms" for what, key in (("estimated", "estimate_ms"), ("measured", "measured_ms"))
            if latency[key] is not None and latency[key] > budget]
    return [f"latency budget of {budget:g} ms unmet: {', '.join(over)}"] if over else []


def _load_view(record: BrokerRecord, port: int) -> dict[str, Any]:
    """A link's last reported load and the cost planned with, for ``status``."""
    if port not in record.link_load:
        return {}
    rtt_ms, rate, queue = record.link_load[port]
    return {"rtt_ms": rtt_ms, "bytes_per_s": rate, "queue_bytes": queue, "cost_us": record.costs.get(port)}


def _same_link(link: dict[str, Any], links: list[dict[str, Any]]) -> bool:
    """Whether ``links`` has the link ``link`` is (same port and peer end), in any state."""
    return any((other["port"], other["remote_key"], other["remote_port"]) == (link["port"], link["remote_key"], link["remote_port"]) for other in links)


@contextmanager
def _recovering(kind: str, record: Any) -> Iterator[None]:
    """Recover one stored record: one that does not check (an old or damaged file) is
    logged and left out, and the others are recovered."""
    try:
        yield
    except Exception as exc:
        log.error("ignoring a stored %s record that does not check (%s): %s", kind, safe(exc), safe(record, 512))


def _strs(value: Any) -> bool:
    return type(value) is list and all(type(item) is str for item in value)


def _check_agent(record: AgentRecord) -> None:
    """Raises unless a recovered agent record is what a registration would have stored."""
    if not (type(record.name) is str and record.name and _strs(record.capabilities) and _strs(record.consumes)
            and _strs(record.produces) and type(record.broker_key) is int and type(record.port) is int and 0 <= record.port <= 0xFFFF):
        raise ValueError("fields of the wrong types")
    for pattern in record.consumes:
        validate_pattern(pattern)
    for topic in record.produces:
        validate_topic(topic)


def _check_broker(record: BrokerRecord) -> None:
    """Raises unless a recovered broker record has the types a broker_state would have stored."""
    if not (type(record.name) is str and record.name and type(record.key) is int and type(record.address) is str
            and type(record.ports) is int and type(record.links) is list
            and (record.keys is None or type(record.keys) is list and all(type(k) is int for k in record.keys))):
        raise ValueError("fields of the wrong types")
    for link in record.links:
        if not (type(link) is dict and type(link.get("port")) is int and type(link.get("remote_key")) is int
                and type(link.get("remote_port")) is int and type(link.get("state")) is str):
            raise ValueError(f"a link of the wrong shape: {link!r}")


def _checkpoint_done(checkpoint: asyncio.Future[None]) -> None:
    if not checkpoint.cancelled() and checkpoint.exception() is not None:
        log.warning("sqlite checkpoint failed (the log is copied at the next one): %s", checkpoint.exception())


def _routable(layouts: dict[str, KeyLayout]) -> dict[str, KeyLayout]:
    """The brokers, in name order, whose keys can route together: no key twice, roots
    coprime to those kept before (recovered records may predate the checks)."""
    kept: dict[str, KeyLayout] = {}
    owned: set[int] = set()
    for name, layout in sorted(layouts.items()):
        if owned.isdisjoint(layout.keys) and all(gcd(layout.root, other.root) == 1 for other in kept.values()):
            kept[name] = layout
            owned.update(layout.keys)
    return kept


class OrchestratorConnection(GuardedConnection, asyncio.Protocol):
    """One client of the DO: an agent, a broker or an admin (``dcp deploy`` ...)."""

    def __init__(self, orchestrator: Orchestrator) -> None:
        self.orchestrator = orchestrator
        self.decoder = Decoder(CONTROL_LIMITS)  # control frames only, before its hello and after
        self.transport: asyncio.Transport | None = None
        self.role = ""
        self.name = ""
        self.peer = "?"
        self.authenticated = False  # its hello's token was checked, for its name (not with --insecure)
        self.heard_at = time.monotonic()  # when it last sent anything
        self.agent: AgentRecord | None = None
        self.broker: BrokerRecord | None = None
        self.closing = False
        # requests read and not served yet (the orchestrator serves them in turn), and a
        # protocol error last if reading stopped at one; at PENDING_LIMIT, reading pauses
        self.pending: deque[dict[str, Any] | ProtocolError] = deque()
        self.queued = False  # in the orchestrator's inbox
        self._reading_paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # a stream server's transport
        peername = transport.get_extra_info("peername")
        if peername:
            self.peer = f"{peername[0]}:{peername[1]}"
        connections = self.orchestrator._connections
        connections.add(self)
        self.guard(peername[0] if peername else "", len(connections))

    @property
    def server(self) -> Orchestrator:
        return self.orchestrator

    def live(self, silent_s: float) -> bool:
        """Whether this connection still holds its name: open, and heard from within ``silent_s``."""
        return not self.closing and time.monotonic() - self.heard_at < silent_s

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        do = self.orchestrator
        do._connections.discard(self)
        self.release_guard()
        if self.agent is not None and self.agent.conn is self:
            do.agent_gone(self.agent)
        if self.broker is not None and self.broker.conn is self:
            do.broker_gone(self.broker)

    def data_received(self, data: bytes) -> None:
        """Queue what was read for the orchestrator to serve in turn; a ping with nothing
        queued before it is answered at once (keepalives and round trips measure the
        loop, not the queue)."""
        if self.closing:
            return
        self.heard_at = time.monotonic()
        pending = self.pending
        try:
            for event in self.decoder.feed(data):
                if not isinstance(event, ControlFrame):
                    raise RemoteProtocolError("the orchestrator carries no data frames")
                if not pending and event.op == control.PING:
                    self._control(event.body)
                    if self.closing:
                        return
                else:
                    pending.append(event.body)
        except ProtocolError as exc:
            pending.append(exc)
        if not pending:
            return
        if len(pending) >= PENDING_LIMIT and self.transport is not None and not self._reading_paused:
            self._reading_paused = True
            self.transport.pause_reading()
        self.orchestrator.serve_later(self)

    def serve_one(self) -> bool:
        """Serve the first waiting request (or protocol error); whether more wait."""
        pending = self.pending
        if self.closing or not pending:
            pending.clear()
            return False
        item = pending.popleft()
        if isinstance(item, ProtocolError):
            log.warning("closing %s: %s", self.peer, safe(item))
            self.close(control.Error(code=item.code, message=str(item), fatal=True))
        else:
            self._control(item)
        if self.closing:
            pending.clear()
            return False
        if self._reading_paused and len(pending) <= PENDING_LIMIT // 2 and self.transport is not None:
            self._reading_paused = False
            self.transport.resume_reading()
        return bool(pending)

    def hello_waiting(self) -> bool:
        return bool(self.pending)

    def _control(self, body: dict[str, Any]) -> None:
        """One control frame: refused by the permission table, refused as malformed or
        undoable, or handled; a request with an ``id`` gets its reply."""
        op = body["op"]
        request_id = control.request_id(body)
        refusal = self.orchestrator.permissions.refusal(self.role, op)
        if refusal is not None:
            self._error(refusal.code, refusal.message, request_id, refusal.fatal)
            return
        try:
            message = control.parse_request(body)
            reply = _HANDLERS[type(message)](self, message)
        except AuthError as exc:  # name_taken: this connection may not be that agent
            self._error(exc.code, str(exc), request_id, fatal=True)
            return
        except BadRequest as exc:
            if op == control.HELLO:
                self._error(exc.code, str(exc), request_id, fatal=True)
            elif op in (control.ERROR, control.GOING_AWAY):  # never answered
                log.warning("%s %s sent a malformed %s: %s", self.role, safe(self.name), safe(op), safe(exc))
            else:
                self._error(exc.code, str(exc), request_id)
            return
        except DcpError as exc:  # well formed, but not to be done now (a spec that does not check, no secret)
            self._error(exc.code, str(exc), request_id)
            return
        if reply is not None and request_id is not None and not self.closing:
            self.send(replace(reply, re=request_id))

    def _on_hello(self, hello: control.Hello) -> control.Welcome | None:
        do = self.orchestrator
        try:
            do.permissions.check_role(hello)
            hello, counted = do.admit_as(hello, self.peer)
        except (BadRequest, AuthError) as exc:
            self._error(exc.code, str(exc), hello.id, fatal=True)
            return None
        refusal = self.hello_accepted(counted)
        if refusal is not None:
            self._error("connection_limit", refusal, hello.id, fatal=True)
            return None
        self.role, self.name = hello.role, hello.name
        self.authenticated = do.permissions.needs_token(hello.role)
        return control.Welcome(name="orchestrator", mode="orchestrator")

    def _on_ping(self, _: control.Ping) -> control.Pong:
        return control.Pong()

    def _on_register(self, request: control.Register) -> control.Registered:
        return self.orchestrator.register_agent(self, request)

    def _on_report(self, report: control.Report) -> None:
        if self.agent is not None:  # else, not registered yet: nothing to count it for
            self.orchestrator.report(self.agent, report)

    def _on_broker_state(self, state: control.BrokerState) -> control.Ok:
        self.orchestrator.broker_state(self, state)
        return control.Ok()

    def _on_ports_changed(self, change: control.PortsChanged) -> control.Ok:
        self.orchestrator.ports_changed(self, change)
        return control.Ok()

    def _on_load(self, report: control.Load) -> None:
        self.orchestrator.load(self, report)

    def _on_pipelines(self, _: control.Pipelines) -> control.PipelinesView:
        return control.PipelinesView(pipelines=self.orchestrator.pipelines_view())

    def _on_status(self, request: control.Status) -> control.StatusView:
        """Raises BadRequest (``too_large``): the full status does not fit a control frame."""
        view = control.StatusView(status=self.orchestrator.status(bool(request.summary)))
        size = len(encode_control(view.to_body(), Limits(max_control=Limits().max_frame)))
        if size > self.decoder.limits.max_control:
            message = f"the full status takes {size} bytes, over the {self.decoder.limits.max_control} of a control frame; ask with summary=true"
            raise BadRequest(control.STATUS, "summary", message, "too_large")
        return view

    def _on_deploy(self, request: control.Deploy) -> control.Deployed:
        return self.orchestrator.deploy(request.spec)

    def _on_undeploy(self, request: control.Undeploy) -> control.Ok:
        self.orchestrator.undeploy(request.name)
        return control.Ok()

    def _on_token(self, request: control.Token) -> control.Issued:
        return self.orchestrator.issue(request)

    def _on_error(self, error: control.Error) -> None:
        log.info("%s %s reports %s: %s", self.role or "client", safe(self.name), safe(error.code), safe(error.message))

    def _on_going_away(self, _: control.GoingAway) -> None:
        log.info("%s %s is going away", self.role or "client", safe(self.name))

    def send(self, message: control.Message) -> None:
        if not self.closing and self.transport is not None:
            self.transport.write(encode_control(message.to_body()))

    def send_all(self, messages: list[control.Message]) -> None:
        """Several messages in one write (one system call, not one each)."""
        if messages and not self.closing and self.transport is not None:
            self.transport.write(b"".join(encode_control(message.to_body()) for message in messages))

    def _error(self, code: str, message: str, request_id: int | None = None, fatal: bool = False) -> None:
        """An error frame to the client; ``fatal``: then close."""
        error = control.Error(re=request_id, code=code, message=message, fatal=fatal)
        if fatal:
            self.close(error)
        else:
            self.send(error)

    def close(self, last: control.Message | None = None) -> None:
        if self.closing or self.transport is None:
            return
        if last is not None:
            self.send(last)
        self.closing = True
        self.transport.close()


_HANDLERS: dict[type[control.Message], Callable[[OrchestratorConnection, Any], control.Reply | None]] = {
    control.Hello: OrchestratorConnection._on_hello,
    control.Ping: OrchestratorConnection._on_ping,
    control.Register: OrchestratorConnection._on_register,
    control.Report: OrchestratorConnection._on_report,
    control.BrokerState: OrchestratorConnection._on_broker_state,
    control.PortsChanged: OrchestratorConnection._on_ports_changed,
    control.Load: OrchestratorConnection._on_load,
    control.Pipelines: OrchestratorConnection._on_pipelines,
    control.Status: OrchestratorConnection._on_status,
    control.Deploy: OrchestratorConnection._on_deploy,
    control.Undeploy: OrchestratorConnection._on_undeploy,
    control.Token: OrchestratorConnection._on_token,
    control.Error: OrchestratorConnection._on_error,
    control.GoingAway: OrchestratorConnection._on_going_away,
}
