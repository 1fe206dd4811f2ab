"""The data orchestrator (DO): registries, pipelines, delivery trees, topology numbers.

It never sits on the data path.  Brokers register and report their key, ports and
links (``broker_state``); data agents register their capabilities, the topics they
consume (patterns allowed) and produce, and where they are attached (broker key,
port).  A deployed pipeline assigns each stage to agents offering its capability.
For every stream (one producing agent, one topic) the DO builds the delivery tree to
the agents consuming it, allowed by the policy, and pushes the topology number, with
an epoch, to the producing agent only.  Brokers are told nothing about topics.
With ``--secret-file`` each number goes out with a route tag (:mod:`dcp.auth`) over
topic, X, epoch and an expiry ``--route-ttl-s`` ahead, re-signed and pushed again
when half of that is left, so brokers with ``--verify-routes`` can refuse forgeries.

Any event (an agent, broker or link joining or leaving, a deploy) marks the state
dirty; one recomputation per loop iteration rebuilds the trees (microseconds each)
and pushes only the numbers that changed.  Everything is kept in sqlite, so a
restart recovers registries, pipelines, assignments and epochs; agents and brokers
re-register by themselves when their connection comes back.

Control protocol: the messages of :mod:`dcp.control` over the dcp codec, on one TCP
connection per client (TLS with ``--tls-cert``/``--tls-key``); ``hello`` with role
``agent``, ``broker`` or ``admin`` first, and then what :data:`dcp.control.ORCHESTRATOR`
allows that role.  A malformed request gets an error frame (``bad_request`` ...), and
the connection goes on.  With ``--require-token`` the hello carries a token
(:mod:`dcp.auth`): agents and admins one this orchestrator issued (the admin op
``token``, ``dcp token``), brokers one they issue themselves from the shared secret.
"""

from __future__ import annotations

import asyncio
import logging
import time
from math import gcd
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any, cast

from . import control
from ._serving import Serving
from .auth import DEFAULT_TOKEN_TTL_S, ISSUED_ROLES, RouteSigner, expiry, issue_token, load_secret
from .config import OrchestratorConfig
from .errors import AuthError, BadRequest, ConfigError, DcpError, ProtocolError, RemoteProtocolError, RoutingError, SpecError
from .orchestrator_store import Store
from .patterns import Policy, topic_matches, validate_pattern, validate_topic
from .routing import int_to_bytes
from .spec import ElementSpec, PipelineSpec, check_spec, parse_spec
from .tls import server_context
from .topology import Overlay, OverlayLink, build_tree
from .wire import ControlFrame, Decoder, Limits, encode_control

__all__ = ["Orchestrator"]

log = logging.getLogger(__name__)


@dataclass
class BrokerRecord:
    name: str
    key: int
    address: str
    ports: int
    links: list[dict[str, Any]]  # {"port", "remote_key", "remote_port", "state"}
    conn: OrchestratorConnection | None = None
    gone_at: float = 0.0  # monotonic time its connection to us ended (or we started, if recovered)
    attached: list[dict[str, Any]] | None = None  # its ports with an agent on them: {"port", "name"}


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
    registered_at: float = 0.0
    gone_at: float = 0.0  # monotonic time its connection to us ended (or we started, if recovered)


@dataclass
class Stream:
    producer: str
    topic: str
    epoch: int
    x: int
    consumers: list[str]
    refused: str = ""  # why the producer may not publish, if it may not
    broker: str = ""  # the producer's broker X was computed for: X means nothing on another


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
        self.assignments: dict[tuple[str, str], list[str]] = {}  # (pipeline, element) -> agents
        self.streams: dict[tuple[str, str], Stream] = {}
        self.recomputations = 0
        # The secret shared with the brokers (--secret-file): route tags and tokens
        self.secret = load_secret(self.config.secret_file) if self.config.secret_file else None
        self.signer = RouteSigner(self.secret) if self.secret is not None else None
        self.tls = server_context(self.config.tls_cert, self.config.tls_key) if self.config.tls_cert else None
        # Who may send which op: before its hello, only a hello with --require-token
        self.permissions = control.ORCHESTRATOR.requiring_token() if self.config.require_token else control.ORCHESTRATOR
        self._signed_until: dict[tuple[str, str], int] = {}  # stream -> expiry of the tag last pushed
        self._dirty = False
        self._connections: set[OrchestratorConnection] = set()
        self._server: asyncio.Server | None = None
        self._closed: asyncio.Event | None = None
        self._recover()

    # -- life cycle -------------------------------------------------------------

    def _recover(self) -> None:
        state = self.store.load()
        for b in state["brokers"]:
            self.brokers[b["name"]] = BrokerRecord(b["name"], b["key"], b["address"], b["ports"], b["links"], gone_at=time.monotonic())
        for a in state["agents"]:
            self.agents[a["name"]] = AgentRecord(
                a["name"], a["capabilities"], a["consumes"], a["produces"], a["broker_key"], a["port"], gone_at=time.monotonic()
            )
        for p in state["pipelines"]:
            self.pipelines[p["name"]] = parse_spec(p["spec"], f"stored pipeline {p['name']!r}")
            self.deployed_at[p["name"]] = p["deployed_at"]
        for pipeline, element, agent in state["assignments"]:
            self.assignments.setdefault((pipeline, element), []).append(agent)
        for s in state["streams"]:
            self.streams[(s["producer"], s["topic"])] = Stream(s["producer"], s["topic"], s["epoch"], s["x"], s["consumers"])
        if any(state.values()):
            log.info(
                "recovered %d broker(s), %d agent(s), %d pipeline(s), %d stream(s) from %s",
                len(self.brokers), len(self.agents), len(self.pipelines), len(self.streams), self.store.path,
            )

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._closed = asyncio.Event()
        host, port = self.config.address
        self._server = await loop.create_server(lambda: OrchestratorConnection(self), host, port, reuse_address=True, ssl=self.tls)
        host, port = self.address
        log.info(
            "dcp orchestrator listening on %s:%d db=%s%s%s", host, port, self.store.path,
            " tls" if self.tls else "", " require-token" if self.config.require_token else "",
        )
        if self.brokers or self.agents:  # recovered ones route until they are back, or the grace ends
            loop.call_later(self.config.grace_s, self._grace_over)
        if self.signer is not None:
            loop.call_later(self.config.route_ttl_s / 4, self._resign)

    async def close(self) -> None:
        if self._server is None or self._closed is None or self._closed.is_set():
            return
        self._server.close()
        for conn in list(self._connections):
            conn.close(control.GoingAway())
        self.store.close()
        log.info("dcp orchestrator stopped")
        self._closed.set()

    # -- events -------------------------------------------------------------------

    def changed(self) -> None:
        """Something the trees depend on changed: recompute once, at the end of this loop iteration."""
        if not self._dirty:
            self._dirty = True
            asyncio.get_running_loop().call_soon(self._recompute)

    def register_agent(self, conn: OrchestratorConnection, request: control.Register) -> control.Registered:
        """An agent (named by its hello) registers, or registers again.

        Raises:
            BadRequest: no name, or a topic pattern it consumes or a topic it produces is not one.
        """
        name = conn.name
        if not name:
            raise BadRequest(control.REGISTER, "name", "name is required: an agent registers under the name of its hello")
        for field, check, topics in (("consumes", validate_pattern, request.consumes), ("produces", validate_topic, request.produces)):
            for i, topic in enumerate(topics):
                try:
                    check(topic)
                except ConfigError as exc:
                    raise BadRequest(control.REGISTER, f"{field}[{i}]", f"{field}[{i}]: {exc}") from None
        old = self.agents.get(name)
        if old is not None and old.conn is not None and old.conn is not conn:
            log.info("agent %s registered again from a new connection; dropping the old one", name)
            old.conn.close(control.Error(code="replaced", message="the agent registered again", fatal=True))
        capabilities, consumes, produces, port = request.capabilities, request.consumes, request.produces, request.port
        record = AgentRecord(name, capabilities, consumes, produces, request.broker_key, port, conn, registered_at=time.time())
        self.agents[name] = record
        conn.agent = record
        self.store.save_agent(name, capabilities, consumes, produces, record.broker_key, port)
        log.info("agent %s registered at broker %s port %d", name, self._broker_name(record.broker_key) or "?", port)
        self._assign_all()
        for (pipeline, element), agents in self.assignments.items():
            if name in agents:
                conn.send(self._assign_message(pipeline, element))
        for stream in self.streams.values():
            if stream.producer == name:
                conn.send(self._route_message(stream))
        self.changed()
        return control.Registered(assignments=sum(name in agents for agents in self.assignments.values()))

    def agent_gone(self, record: AgentRecord) -> None:
        record.conn = None
        record.gone_at = time.monotonic()
        log.info("agent %s disconnected", record.name)
        self.changed()
        asyncio.get_running_loop().call_later(self.config.grace_s, self._grace_over)

    def _grace_over(self) -> None:
        """Whoever has not come back by now is gone: hand their elements on, reroute."""
        self._assign_all()
        self.changed()

    def broker_state(self, conn: OrchestratorConnection, state: control.BrokerState) -> None:
        """A broker (named by its hello) reports its key, ports and links.

        A key that could not take part in the CRT with the others is refused here, so
        that one bad registration never stops the planning of every stream.

        Raises:
            BadRequest: no name; a key of no use for routing (``bad_key``: below 3, not
                above ``2**ports``, or sharing a factor with a connected broker's key); the
                key of another connected broker (``same_key``).  The record of a broker
                that is not connected and clashes is dropped instead.
        """
        name = conn.name
        if not name:
            raise BadRequest(control.BROKER_STATE, "name", "name is required: a broker reports under the name of its hello")
        key = state.key
        if key < 3 or key <= 1 << state.ports:
            raise BadRequest(
                control.BROKER_STATE, "key", f"key: {key} cannot route {state.ports} ports: it must be above 2**ports and at least 3",
                "bad_key",
            )
        for other in list(self.brokers.values()):
            if other.name == name or gcd(other.key, key) == 1:
                continue
            if other.conn is None:  # a connected broker wins over the record of one that is not
                log.info("broker %s (key %d) replaces the record of %s (key %d), which is not connected", name, key, other.name, other.key)
                del self.brokers[other.name]
                self.store.delete_broker(other.name)
            elif other.key == key:
                raise BadRequest(
                    control.BROKER_STATE, "key", f"key: broker {other.name!r} already has key {key}; every broker needs its own key",
                    "same_key",
                )
            else:
                raise BadRequest(
                    control.BROKER_STATE, "key",
                    f"key: {key} shares a factor with the key of broker {other.name!r}; keys must be pairwise coprime (distinct primes)",
                    "bad_key",
                )
        links = [asdict(link) for link in state.links]
        attached = [asdict(port) for port in state.attached or ()]
        record = BrokerRecord(name, state.key, state.address, state.ports, links, conn, attached=attached)
        self.brokers[name] = record
        conn.broker = record
        self.store.save_broker(name, state.key, record.address, record.ports, links)
        self._assign_all()  # an agent away from us whose port went too is gone
        self.changed()

    def broker_gone(self, record: BrokerRecord) -> None:
        record.conn = None
        record.gone_at = time.monotonic()
        log.info("broker %s disconnected; its last report stands for %.1f s", record.name, self.config.grace_s)
        asyncio.get_running_loop().call_later(self.config.grace_s, self._grace_over)

    def present(self, record: BrokerRecord) -> bool:
        """Whether a broker is part of the overlay: connected, or gone for less than the grace.

        A broker's connection to the orchestrator is not on the data path: losing it (or
        an orchestrator restart) says nothing about the broker's ports and links, which
        keep forwarding.  Its last report stands until it re-registers or the grace ends.
        """
        return record.conn is not None or time.monotonic() - record.gone_at < self.config.grace_s

    # -- pipelines ----------------------------------------------------------------------

    def access_policy(self) -> Policy:
        """Who may publish and consume what now: the policy file's rules, then every deployed spec's."""
        rules = [rule for spec in self.pipelines.values() for rule in spec.access_rules]
        return self.file_access_policy.extended(rules)

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
        access_policy = self.access_policy().extended(spec.access_rules)
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
        self._assign_all()
        self.changed()
        log.info("pipeline %s deployed: %d element(s)", spec.name, len(spec.elements))
        return control.Deployed(pipeline=spec.name, assignments=self._assignments_of(spec.name))

    def undeploy(self, name: str) -> None:
        """Raises BadRequest (``no_pipeline``) if no pipeline of that name is deployed."""
        spec = self.pipelines.pop(name, None)
        if spec is None:
            raise BadRequest(control.UNDEPLOY, "name", f"no pipeline named {name!r} is deployed", "no_pipeline")
        for element in spec.elements:
            for agent in self.assignments.pop((spec.name, element.name), []):
                self._send_to_agent(agent, control.Unassign(pipeline=spec.name, element=element.name))
        self.deployed_at.pop(spec.name, None)
        self.store.delete_pipeline(spec.name)
        self.changed()
        log.info("pipeline %s undeployed", spec.name)

    def _assign_all(self) -> None:
        """Give every element its replicas among the online agents offering its capability."""
        access_policy = self.access_policy()
        for spec in self.pipelines.values():
            for element in spec.elements:
                if element.external:
                    continue
                key = (spec.name, element.name)
                current = self.assignments.setdefault(key, [])
                for agent in list(current):
                    record = self.agents.get(agent)
                    if record is None or not self._alive(record):
                        candidates = self._candidates(element, access_policy, exclude=current)
                        if candidates:  # hand the element to an agent that is here
                            current.remove(agent)
                            self.store.delete_assignment(spec.name, element.name, agent)
                if sum(1 for a in current if a in self.agents and self._alive(self.agents[a])) >= element.replicas:
                    continue
                for candidate in self._candidates(element, access_policy, exclude=current):
                    if len(current) >= element.replicas:
                        break
                    current.append(candidate)
                    self.store.save_assignment(spec.name, element.name, candidate)
                    self._send_to_agent(candidate, self._assign_message(spec.name, element.name))
                    log.info("%s/%s assigned to %s", spec.name, element.name, candidate)

    def _candidates(self, element: ElementSpec, access_policy: Policy, exclude: list[str]) -> list[str]:
        load: dict[str, int] = {}
        for agents in self.assignments.values():
            for agent in agents:
                load[agent] = load.get(agent, 0) + 1
        found = []
        for record in self.agents.values():
            if record.conn is None or record.name in exclude or element.capability not in record.capabilities:
                continue
            if element.agent is not None and record.name != element.agent:
                continue
            if element.emits and not access_policy.allows(record.name, "publish", element.emits):
                continue
            found.append(record.name)
        return sorted(found, key=lambda name: (load.get(name, 0), name))

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
        broker = next((b for b in self.brokers.values() if b.key == record.broker_key and self.present(b)), None)
        if broker is None:
            return False
        if broker.conn is not None and broker.attached is not None:
            return any(a["port"] == record.port and a["name"] == record.name for a in broker.attached)
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

    # -- trees and numbers ------------------------------------------------------------

    def _effective(self, record: AgentRecord) -> tuple[list[str], list[str]]:
        """(consumes, produces) of an agent: its own, plus its assigned elements'."""
        consumes, produces = list(record.consumes), list(record.produces)
        for (pipeline, element_name), agents in self.assignments.items():
            if record.name in agents and pipeline in self.pipelines:
                element = self.pipelines[pipeline].element(element_name)
                consumes.extend(element.consumes)
                if element.emits and not element.external:
                    produces.append(element.emits)
        return consumes, produces

    def overlay(self) -> Overlay:
        """The brokers online and the links both ends report up."""
        online = {b.name: b for b in self.brokers.values() if self.present(b)}
        by_key = {b.key: name for name, b in online.items()}
        ends = {(name, link["port"]): link for name, b in online.items() for link in b.links}
        links: dict[frozenset[tuple[str, int]], OverlayLink] = {}
        for (name, port), link in ends.items():
            other = by_key.get(link["remote_key"])
            if other is None or link["state"] != "up":
                continue
            back = ends.get((other, link["remote_port"]))
            if back is None or back["state"] != "up" or back["remote_key"] != online[name].key:
                continue
            edge = frozenset({(name, port), (other, link["remote_port"])})
            links.setdefault(edge, OverlayLink(name, port, other, link["remote_port"]))
        try:
            return Overlay({name: b.key for name, b in online.items()}, links.values())
        except RoutingError as exc:
            keys = _coprime_keys({name: b.key for name, b in online.items()})
            log.error("the brokers report an inconsistent overlay (%s); planning with brokers %s only", exc, ", ".join(keys) or "none")
        kept = [link for link in links.values() if link.a in keys and link.b in keys]
        try:
            return Overlay(keys, kept)
        except RoutingError as exc:
            log.error("their links are inconsistent too (%s); planning without links", exc)
            return Overlay(keys)

    def _broker_name(self, key: int) -> str | None:
        for record in self.brokers.values():
            if record.key == key and self.present(record):
                return record.name
        return None

    def _recompute(self) -> None:
        self._dirty = False
        self.recomputations += 1
        overlay = self.overlay()
        access_policy = self.access_policy()
        attached = {}
        roles = {}
        for record in self.agents.values():
            broker = self._broker_name(record.broker_key)
            if broker is not None and self._alive(record):
                attached[record.name] = (broker, record.port)
                roles[record.name] = self._effective(record)
        seen = set()
        for producer, (_, produces) in roles.items():
            for topic in dict.fromkeys(produces):
                seen.add((producer, topic))
                self._update_stream(overlay, access_policy, attached, roles, producer, topic)
        for key, stream in self.streams.items():
            if key not in seen and stream.x and self._online(stream.producer):  # only it can be told
                # No longer produced, or its producer is not attached: it routes nowhere now.
                # The record stays, so the epoch only ever grows.
                self._set_stream(Stream(stream.producer, stream.topic, stream.epoch + 1, 0, []))

    def _update_stream(
        self,
        overlay: Overlay,
        access_policy: Policy,
        attached: dict[str, tuple[str, int]],
        roles: dict[str, tuple[list[str], list[str]]],
        producer: str,
        topic: str,
    ) -> None:
        refused = "" if access_policy.allows(producer, "publish", topic) else access_policy.why(producer, "publish", topic)
        consumers = []
        if not refused:
            for agent, (consumes, _) in roles.items():
                if agent == producer or not any(topic_matches(p, topic) for p in consumes):
                    continue
                if not access_policy.allows(agent, "consume", topic):
                    log.info("policy keeps %s from consuming %s: %s", agent, topic, access_policy.why(agent, "consume", topic))
                    continue
                consumers.append(agent)
        x, reached = self._number(overlay, attached[producer], [(a, attached[a]) for a in sorted(consumers)], topic)
        old = self.streams.get((producer, topic))
        broker = attached[producer][0]
        if old is not None and old.x == x and old.consumers == reached and old.refused == refused and old.broker == broker:
            return
        self._set_stream(Stream(producer, topic, (old.epoch if old else 0) + 1, x, reached, refused, broker))

    def _set_stream(self, stream: Stream) -> None:
        self.streams[(stream.producer, stream.topic)] = stream
        self.store.save_stream(stream.producer, stream.topic, stream.epoch, stream.x, stream.consumers)
        self._send_to_agent(stream.producer, self._route_message(stream))
        log.info(
            "route %s/%s epoch %d -> %s (%d bytes)",
            stream.producer, stream.topic, stream.epoch, ", ".join(stream.consumers) or "nobody", len(int_to_bytes(stream.x)),
        )

    def _number(
        self, overlay: Overlay, source: tuple[str, int], consumers: list[tuple[str, tuple[str, int]]], topic: str
    ) -> tuple[int, list[str]]:
        """The number reaching every consumer the overlay can reach from ``source``; who it reaches."""
        try:  # the usual case: everyone is reachable, one tree
            return build_tree(overlay, source, [endpoint for _, endpoint in consumers]).x, [agent for agent, _ in consumers]
        except RoutingError:
            pass
        reachable = []  # someone is not: find out who, leave them out
        for agent, endpoint in consumers:
            try:
                build_tree(overlay, source, [endpoint])
            except RoutingError as exc:
                log.warning("%s cannot get %s: %s", agent, topic, exc)
                continue
            reachable.append((agent, endpoint))
        tree = build_tree(overlay, source, [endpoint for _, endpoint in reachable])
        return tree.x, [agent for agent, _ in reachable]

    def _route_message(self, stream: Stream) -> control.Route:
        """The route push of ``stream``; with a secret, a fresh tag, which carries its own expiry."""
        source = self.brokers.get(stream.broker)  # the agent uses X only while attached there
        tag = None
        if self.signer is not None and stream.x:
            expires = int(time.time() + self.config.route_ttl_s)
            tag = self.signer.sign(stream.topic, stream.x, stream.epoch, expires)
            self._signed_until[(stream.producer, stream.topic)] = expires
        return control.Route(
            topic=stream.topic, x=stream.x, epoch=stream.epoch, consumers=stream.consumers, refused=stream.refused or None,
            broker_key=None if source is None else source.key, tag=tag,
        )

    def _resign(self) -> None:
        """Push a fresh tag for every route whose tag has less than half its life left."""
        if self._closed is None or self._closed.is_set():
            return
        ttl = self.config.route_ttl_s
        now = time.time()
        for key, stream in self.streams.items():
            if stream.x and self._signed_until.get(key, 0) - now < ttl / 2:
                self._send_to_agent(stream.producer, self._route_message(stream))
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
        log.info("token issued to %s (role %s), valid until %s UTC", name, role, time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(expires)))
        return control.Issued(token=issue_token(self.secret, name, role, expires), name=name, role=role, expires=expires)

    def _send_to_agent(self, name: str, message: control.Message) -> None:
        record = self.agents.get(name)
        if record is not None and record.conn is not None:
            record.conn.send(message)

    # -- views ------------------------------------------------------------------------

    def pipelines_view(self) -> list[dict[str, Any]]:
        """Deployed pipelines with each element's agents and their live counters."""
        view = []
        for name, spec in self.pipelines.items():
            elements = []
            for element in spec.elements:
                agents = []
                for agent in self.assignments.get((name, element.name), []):
                    record = self.agents.get(agent)
                    report = record.report if record else None
                    counters = report.elements.get(f"{name}/{element.name}", {}) if report else {}
                    agents.append({
                        "agent": agent, "online": self._online(agent), **counters,
                        "dropped": report.dropped if report else 0, "unrouted": report.unrouted if report else 0,
                    })
                elements.append({
                    "name": element.name, "kind": element.kind, "capability": element.capability,
                    "consumes": list(element.consumes), "emits": element.emits, "agents": agents,
                })
            view.append({"name": name, "deployed_at": self.deployed_at.get(name), "elements": elements})
        return view

    def status(self) -> dict[str, Any]:
        return {
            "brokers": [
                {"name": b.name, "key": str(b.key), "address": b.address, "online": b.conn is not None, "routing": self.present(b),
                 "links": [{**link, "remote_key": str(link["remote_key"])} for link in b.links]}
                for b in self.brokers.values()
            ],
            "agents": [
                {"name": a.name, "online": a.conn is not None, "broker": self._broker_name(a.broker_key), "port": a.port,
                 "capabilities": a.capabilities, "consumes": consumes, "produces": produces}
                for a in self.agents.values()
                for consumes, produces in [self._effective(a)]
            ],
            "streams": [
                {"producer": s.producer, "topic": s.topic, "epoch": s.epoch, "x_bytes": len(int_to_bytes(s.x)),
                 "consumers": s.consumers, **({"refused": s.refused} if s.refused else {})}
                for s in self.streams.values()
            ],
            "recomputations": self.recomputations,
        }


def _coprime_keys(keys: dict[str, int]) -> dict[str, int]:
    """The brokers, in name order, whose keys can route together: each at least 3 and
    coprime to those kept before it (recovered records may predate the checks)."""
    kept: dict[str, int] = {}
    for name, key in sorted(keys.items()):
        if key >= 3 and all(gcd(key, other) == 1 for other in kept.values()):
            kept[name] = key
    return kept


class OrchestratorConnection(asyncio.Protocol):
    """One client of the DO: an agent, a broker or an admin (``dcp deploy`` ...)."""

    def __init__(self, orchestrator: Orchestrator) -> None:
        self.orchestrator = orchestrator
        self.decoder = Decoder(Limits())
        self.transport: asyncio.Transport | None = None
        self.role = ""
        self.name = ""
        self.peer = "?"
        self.agent: AgentRecord | None = None
        self.broker: BrokerRecord | None = None
        self.closing = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # a stream server's transport
        peername = transport.get_extra_info("peername")
        if peername:
            self.peer = f"{peername[0]}:{peername[1]}"
        self.orchestrator._connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self.orchestrator._connections.discard(self)
        if self.agent is not None and self.agent.conn is self:
            self.orchestrator.agent_gone(self.agent)
        if self.broker is not None and self.broker.conn is self:
            self.orchestrator.broker_gone(self.broker)

    def data_received(self, data: bytes) -> None:
        try:
            for event in self.decoder.feed(data):
                if self.closing:
                    return
                if not isinstance(event, ControlFrame):
                    raise RemoteProtocolError("the orchestrator carries no data frames")
                self._control(event.body)
        except ProtocolError as exc:
            log.warning("closing %s: %s", self.peer, exc)
            self.close(control.Error(code=exc.code, message=str(exc), fatal=True))

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
        except BadRequest as exc:
            if op == control.HELLO:
                self._error(exc.code, str(exc), request_id, fatal=True)
            elif op in (control.ERROR, control.GOING_AWAY):  # never answered
                log.warning("%s %s sent a malformed %s: %s", self.role, self.name, op, exc)
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
            hello = do.admit(hello, self.peer)
        except (BadRequest, AuthError) as exc:
            self._error(exc.code, str(exc), hello.id, fatal=True)
            return None
        self.role, self.name = hello.role, hello.name
        return control.Welcome(name="orchestrator", mode="orchestrator")

    def _on_ping(self, _: control.Ping) -> control.Pong:
        return control.Pong()

    def _on_register(self, request: control.Register) -> control.Registered:
        return self.orchestrator.register_agent(self, request)

    def _on_report(self, report: control.Report) -> None:
        if self.agent is not None:  # else, not registered yet: nothing to count it for
            self.agent.report = report

    def _on_broker_state(self, state: control.BrokerState) -> control.Ok:
        self.orchestrator.broker_state(self, state)
        return control.Ok()

    def _on_pipelines(self, _: control.Pipelines) -> control.PipelinesView:
        return control.PipelinesView(pipelines=self.orchestrator.pipelines_view())

    def _on_status(self, _: control.Status) -> control.StatusView:
        return control.StatusView(status=self.orchestrator.status())

    def _on_deploy(self, request: control.Deploy) -> control.Deployed:
        return self.orchestrator.deploy(request.spec)

    def _on_undeploy(self, request: control.Undeploy) -> control.Ok:
        self.orchestrator.undeploy(request.name)
        return control.Ok()

    def _on_token(self, request: control.Token) -> control.Issued:
        return self.orchestrator.issue(request)

    def _on_error(self, error: control.Error) -> None:
        log.info("%s %s reports %s: %s", self.role or "client", self.name, error.code, error.message)

    def _on_going_away(self, _: control.GoingAway) -> None:
        log.info("%s %s is going away", self.role or "client", self.name)

    def send(self, message: control.Message) -> None:
        if not self.closing and self.transport is not None:
            self.transport.write(encode_control(message.to_body()))

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
    control.Pipelines: OrchestratorConnection._on_pipelines,
    control.Status: OrchestratorConnection._on_status,
    control.Deploy: OrchestratorConnection._on_deploy,
    control.Undeploy: OrchestratorConnection._on_undeploy,
    control.Token: OrchestratorConnection._on_token,
    control.Error: OrchestratorConnection._on_error,
    control.GoingAway: OrchestratorConnection._on_going_away,
}
