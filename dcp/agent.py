"""``dcp.DataAgent``: a data agent (DA) of a pipeline, in any Python program.

An agent attaches to a broker, registers with the orchestrator (its name,
capabilities, the topics it consumes and produces, and where it is attached) and
then only handles frames: the orchestrator pushes it the topology number of every
topic it publishes, and assigns it pipeline elements (a source, a stage or a sink
running one of its capabilities).  It re-registers by itself after any reconnect,
to the same broker or to the next one of its list, and gets its routes and elements
back with no user code.  A broker that says it is going away (a shutdown, a rolling
restart) is left at once for the next one of the list, without redialling it (an
agent with one broker redials it with the backoff until it is back).

.. code-block:: python

    agent = dcp.DataAgent("face-detector", broker="dcp://127.0.0.1:7400")

    @agent.capability("detect_faces")          # assigned by a deployed pipeline
    async def detect(msg, params):
        return find_faces(msg.payload)         # published on the element's topic

    @agent.process("video", emits="thumbs")    # always on, declared at registration
    async def thumb(msg):
        return shrink(msg.payload)

    await agent.run()

Handlers run one at a time in arrival order; a handler returns a payload, a list of
payloads or None.  A source starts once its topic has a route (someone consumes it).
What a handler or a source raises is counted as an error of its element, and the last
one (one line) goes to the orchestrator with the counters, for ``dcp pipelines``; so
does a capability of the wrong form for the element it is assigned, which is not run.
Received frames wait in a bounded buffer whose overflow policy is declared (``pause``:
back-pressure to the broker; ``drop-newest``/``drop-oldest``: counted drops).  Upstream of that, the broker applies its own slow-consumer policy
to the agent's port (``slow_consumer=``, or a spec element's ``slow_consumer``
param: ``drop-newest``, ``drop-oldest`` or ``pause``).  Publishing a topic with no
route yet (nobody consumes it) sends nothing and is counted as ``unrouted``.

``token=`` goes in the hello to every broker and to the orchestrator (servers started
with ``--require-token``).  A refusal is never retried: ``start()`` raises it as a
``RemoteError`` (``token_expired`` ...); a broker refusing it at a reconnect stops
the agent and ``run()`` raises it; the orchestrator refusing it at a reconnect is
logged as an error and the agent goes on with the routes it has.  ``dcps://`` URLs
are dialled over TLS, verified with ``tls_ca=`` (a CA file) or the system's CAs.
``tls_ca=`` with a plain ``dcp://`` URL among them (the default orchestrator's
included) is a ``ConfigError``: the agent would talk to that server, token and all,
in clear.  A token sent over plain TCP to an address other than loopback is logged
at warning.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ._guard import safe
from .backoff import Backoff
from .client import OVERFLOW_POLICIES, Connection, Message, parse_url, refused
from .wire import Payload
from .control import ERROR_TEXT_LIMIT, Assign, Register, Report, Route, Unassign, slow_consumer_policy
from .control import Message as ControlMessage
from .errors import ConfigError, ConnectionClosed, DcpError, DcpTimeout, ProtocolError, RemoteError
from .patterns import topic_matches, validate_pattern, validate_topic
from .shares import (
    REPLIES, REPLY_ERROR, REPLY_OK, REQUESTS, Choices, Group, RequestEnvelope, pack_reply, pack_request, request_topic,
    unpack_reply, unpack_request,
)

__all__ = ["DataAgent", "Element"]

log = logging.getLogger(__name__)

DEFAULT_ORCHESTRATOR = "dcp://127.0.0.1:7300"
#: Counters that have not changed are reported this often anyway: the orchestrator holds
#: an agent's name for a connection heard from within 5 s (its ``SILENT_S``).
REPORT_KEEPALIVE_S = 4.0
#: How long ``stop()`` waits for the broker connection to write out what was published.
DRAIN_TIMEOUT_S = 5.0
Handler = Callable[..., Awaitable[Any]]
#: The two forms of a capability's handler, by the kinds of element they run.
FORMS = {
    "source": "a source is an async generator `async def f(params)` that yields the payloads to publish",
    "stage": "a stage or a sink is `async def f(msg, params)`, which returns what to publish (None: nothing)",
}


def _form(handler: Handler) -> str | None:
    """``source`` or ``stage`` (a stage or a sink): what ``handler`` can run, by its form;
    None: a form this cannot tell (a callable object), left to fail when called."""
    if inspect.isasyncgenfunction(handler):
        return "source"
    if inspect.iscoroutinefunction(handler):
        return "stage"
    return None


def _called(handler: Handler) -> str:
    """``name(arg, ...)``: how a handler is named in an error."""
    return f"{getattr(handler, '__name__', type(handler).__name__)}({', '.join(inspect.signature(handler).parameters)})"


def _check_capability(name: str, handler: Handler) -> None:
    """Raises ConfigError, saying both forms, if ``handler`` does not take the arguments of
    its form.  A handler of the wrong form for its element (``async def camera(msg, params)``
    run as a source) is told only when assigned (:func:`_misfit`): any kind may use a capability."""
    form = _form(handler)
    if form is None:
        return
    try:
        inspect.signature(handler).bind(*[None] * (1 if form == "source" else 2))
    except TypeError:
        raise ConfigError(f"capability {name!r}: {_called(handler)} takes the wrong arguments: {FORMS['source']}; {FORMS['stage']}") from None


def _misfit(handler: Handler, kind: str) -> str:
    """Why ``handler`` cannot run an element of ``kind`` ("" if it can, or if its form cannot be told)."""
    form, wanted = _form(handler), "source" if kind == "source" else "stage"
    if form is None or form == wanted:
        return ""
    return f"{_called(handler)} cannot run a {kind}: {FORMS[wanted]}"


def _error_text(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}"


def _check_tls(brokers: Sequence[str], orchestrator: str) -> None:
    """``tls_ca`` is given: every URL must be ``dcps://`` or bare (then dialled over TLS).

    Raises:
        ConfigError: a plain ``dcp://`` URL, which would be dialled without TLS.
    """
    named = [("broker", url) for url in brokers] + [("orchestrator", orchestrator)]
    for what, url in named:
        if parse_url(url)[0] == "dcp":
            default = " (the default)" if what == "orchestrator" and url == DEFAULT_ORCHESTRATOR else ""
            raise ConfigError(
                f"tls_ca is given, but the {what} URL {url!r}{default} is plain dcp://: this agent would talk to it, "
                f"token included, without TLS; use {'dcps://' + url[len('dcp://'):]!r} (tls_ca applies to every server the agent dials)"
            )


@dataclass
class Element:
    """One thing the agent runs: an assigned pipeline element, or a declared handler."""

    key: str  # "pipeline/element" for assigned ones, "process:NAME"/"source:NAME" (the handler) for declared ones
    kind: str  # "source", "stage", "sink"
    consumes: tuple[str, ...]
    emits: str | None
    handler: Handler
    params: dict[str, Any] | None = None  # assigned elements get their spec params
    batch: int = 1
    batch_timeout_s: float = 0.05
    window_s: float | None = None
    received: int = 0
    emitted: int = 0
    errors: int = 0
    last_error: str = ""  # what the last error said, for dcp pipelines
    runnable: bool = True  # False: its handler has the wrong form for its kind (last_error says the right one)
    latency_s: float = 0.0  # sum of publish-to-handle delays, for the mean
    latency_max_s: float = 0.0
    busy_s: float = 0.0  # the time its handler has run, in all
    busy_mark_s: float = 0.0  # busy_s at the last report tick
    busy: float = 0.0  # the share of the last report interval its handler ran: its load, for placement
    pending: list[Message] = field(default_factory=list)
    task: asyncio.Task[None] | None = None

    def failed(self, why: str) -> None:
        """Count an error, and keep what it said (one line, cut to fit a report) for ``dcp pipelines``."""
        self.errors += 1
        self.last_error = why[:ERROR_TEXT_LIMIT]

    def counters(self) -> dict[str, Any]:
        mean = self.latency_s / self.received if self.received else 0.0
        return {
            "in": self.received, "out": self.emitted, "errors": self.errors,
            "latency_ms": round(mean * 1000, 3), "latency_max_ms": round(self.latency_max_s * 1000, 3),
            "busy": self.busy,
        }

    def tick(self, interval_s: float) -> None:
        """A report interval of ``interval_s`` ended: ``busy`` is the share of it the handler
        ran (to 0.01, so that noise alone sends no report)."""
        ran = self.busy_s - self.busy_mark_s
        self.busy_mark_s = self.busy_s
        self.busy = round(min(ran / interval_s, 1.0), 2) if interval_s > 0 else 0.0


class DataAgent:
    """A data agent; see the module docstring."""

    def __init__(
        self,
        name: str,
        *,
        broker: str | Sequence[str] = "dcp://127.0.0.1:7400",
        orchestrator: str = DEFAULT_ORCHESTRATOR,
        buffer: int = 1000,
        overflow: str = "pause",
        report_interval_s: float = 1.0,
        failover_attempts: int = 3,
        slow_consumer: str | None = None,
        token: str | Callable[[], str | None] | None = None,
        tls_ca: str | None = None,
        max_requests: int = 1000,
    ) -> None:
        if not name:
            raise ConfigError("a data agent needs a name")
        if max_requests < 1:
            raise ConfigError("max_requests must be at least 1")
        self.name = name
        self.brokers = [broker] if isinstance(broker, str) else list(broker)
        if not self.brokers:
            raise ConfigError("a data agent needs at least one broker URL")
        if tls_ca:
            _check_tls(self.brokers, orchestrator)
        self.orchestrator_url = orchestrator
        self.buffer = buffer
        self.overflow = overflow
        self.report_interval_s = report_interval_s
        self._reported: dict[str, Any] | None = None  # the counters last reported, and when
        self._reported_at = float("-inf")
        self.failover_attempts = failover_attempts
        # the broker's slow-consumer policy for our port (None: the broker's default)
        self.slow_consumer = None if slow_consumer is None else slow_consumer_policy(slow_consumer)
        self.token = token  # sent to the brokers and the orchestrator (a function: called at every hello)
        self.tls_ca = tls_ca  # verifies the dcps:// servers among them (None: the system's CAs)
        #: Why the agent stopped by itself: a server refused its token.
        self.failure: RemoteError | None = None
        self.capabilities: dict[str, Handler] = {}
        self.elements: dict[str, Element] = {}
        self.produces: set[str] = set()
        self.routes: dict[str, tuple[int, int]] = {}  # topic -> (epoch, X)
        self.route_tags: dict[str, bytes] = {}  # topic -> the orchestrator's tag on X, if it signs
        self.route_brokers: dict[str, int] = {}  # topic -> key of the broker X was computed for
        self.consumers: dict[str, list[str]] = {}  # topic -> who the orchestrator says gets it
        self.refusals: dict[str, str] = {}  # topic -> why the policy refuses our publishing it
        self.choices: dict[str, Choices] = {}  # topic -> its numbers, one per choice of share group members
        self.variant_tags: dict[str, list[bytes]] = {}  # topic -> the tags of those numbers
        # request topic -> (the group of responders, and per member the way back: X, broker key, tag)
        self.reply_routes: dict[str, tuple[int, list[tuple[int, int, bytes | None]]]] = {}
        #: At most this many requests wait for their reply at once; more wait for a slot.
        self.max_requests = max_requests
        self.requests_sent = 0
        self.requests_served = 0  # answered here, errors included
        self.replies_unknown = 0  # replies to no request waiting here (timed out, or not ours): dropped
        self.replies_unroutable = 0  # requests whose way back was computed for another broker than ours: not answered
        self.requests_malformed = 0
        self._waiting: dict[int, asyncio.Future[bytes]] = {}  # correlation id -> the request's reply
        self._correlations = itertools.count(1)
        self._request_slots: asyncio.Semaphore | None = None
        self.published = 0
        self.unrouted = 0
        self.lost = 0  # publishes that failed because the broker connection was gone
        self.broker: Connection | None = None
        self.orchestrator: Connection | None = None
        self.route_changed = asyncio.Event()
        self._declared: dict[str, Element] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._attached = asyncio.Event()
        self._running = False
        self._stopped = asyncio.Event()
        if overflow not in OVERFLOW_POLICIES:
            raise ConfigError(f"overflow must be one of {', '.join(OVERFLOW_POLICIES)}; got {overflow!r}")
        if buffer < 1:
            raise ConfigError("buffer must be at least 1")

    # -- declaring what the agent does --------------------------------------------------

    def capability(self, name: str) -> Callable[[Handler], Handler]:
        """Offer a capability: ``async def f(msg, params)`` for stages and sinks (returns
        what to emit), or an async generator ``async def f(params)`` yielding payloads
        for sources.

        Raises:
            ConfigError: an async function of neither form (wrong arguments).
        """

        def register(handler: Handler) -> Handler:
            _check_capability(name, handler)
            self.capabilities[name] = handler
            return handler

        return register

    def process(
        self, consumes: str | Sequence[str], emits: str | None = None, *, batch: int = 1, batch_timeout_s: float = 0.05
    ) -> Callable[[Handler], Handler]:
        """Always handle ``consumes`` (topic patterns): ``async def f(msg)``, or ``f(list_of_msgs)``
        with ``batch > 1`` (called with up to ``batch`` frames, at most ``batch_timeout_s``
        after the first); what it returns is published on ``emits``."""
        if batch < 1:
            raise ConfigError("batch must be at least 1")
        return self._handling(consumes, emits, batch=batch, batch_timeout_s=batch_timeout_s)

    def consume(self, consumes: str | Sequence[str]) -> Callable[[Handler], Handler]:
        """A sink: ``async def f(msg)`` for every frame of ``consumes``."""
        return self.process(consumes)

    def aggregate(self, consumes: str | Sequence[str], *, window_s: float, emits: str | None = None) -> Callable[[Handler], Handler]:
        """Windowed aggregation: ``async def f(msgs)`` every ``window_s`` with the frames of
        that window (not called for an empty window)."""
        if window_s <= 0:
            raise ConfigError("window_s must be positive")
        return self._handling(consumes, emits, window_s=window_s)

    def _handling(
        self, consumes: str | Sequence[str], emits: str | None, *, batch: int = 1, batch_timeout_s: float = 0.05,
        window_s: float | None = None,
    ) -> Callable[[Handler], Handler]:
        """The decorator declaring a stage (with ``emits``) or a sink that handles ``consumes``."""
        patterns = (consumes,) if isinstance(consumes, str) else tuple(consumes)
        for pattern in patterns:
            validate_pattern(pattern)
        if emits is not None:
            validate_topic(emits)

        def register(handler: Handler) -> Handler:
            self._declare(Element(f"process:{handler.__name__}", "stage" if emits else "sink", patterns, emits, handler,
                                  batch=batch, batch_timeout_s=batch_timeout_s, window_s=window_s))
            return handler

        return register

    def source(self, emits: str, *, interval_s: float | None = None) -> Callable[[Handler], Handler]:
        """A source: an async generator ``async def f()`` whose items are published on
        ``emits``; or a coroutine ``async def f()`` called every ``interval_s``."""
        validate_topic(emits)

        def register(handler: Handler) -> Handler:
            if not inspect.isasyncgenfunction(handler) and interval_s is None:
                raise ConfigError("a source is an async generator, or a coroutine with interval_s")
            self._declare(Element(f"source:{handler.__name__}", "source", (), emits, handler, window_s=interval_s))
            return handler

        return register

    async def declare_produces(self, topic: str) -> None:
        """Declare at run time that this agent publishes ``topic``; the orchestrator then routes it."""
        validate_topic(topic)
        if topic in self.produces:
            return
        self.produces.add(topic)
        if self.orchestrator is not None and self.orchestrator.status.value == "open":
            await self._register(self.orchestrator)

    async def set_consumes(self, handler: Handler, patterns: Sequence[str]) -> None:
        """Replace at run time the patterns the declared sink or stage ``handler`` consumes
        (a gateway's subscriptions come and go); the orchestrator is told at once, or at the
        next registration while it is unreachable.

        Raises:
            ConfigError: ``handler`` is not declared here, or a pattern is not one.
        """
        element = self._declared.get(f"process:{getattr(handler, '__name__', '')}")
        if element is None:
            raise ConfigError(f"{handler!r} is not a handler declared with process() or consume()")
        for pattern in patterns:
            validate_pattern(pattern)
        element.consumes = tuple(patterns)
        if self.orchestrator is not None and self.orchestrator.status.value == "open":
            await self._register(self.orchestrator)

    def _declare(self, element: Element) -> None:
        if self._running:
            raise ConfigError("declare handlers before the agent starts")
        if element.key in self._declared:
            raise ConfigError(f"{element.key} is declared twice")
        self._declared[element.key] = element
        self.elements[element.key] = element
        if element.emits:
            self.produces.add(element.emits)

    # -- life cycle -------------------------------------------------------------------

    async def __aenter__(self) -> DataAgent:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.stop()

    async def start(self, timeout: float = 10.0) -> None:
        """Attach and register; returns once registered.

        Raises:
            DcpTimeout: (a TimeoutError) not attached to a broker within ``timeout`` s, or
                not registered with the orchestrator within ``timeout`` s more; it says
                which, and the addresses.
            RemoteError: a broker or the orchestrator refused the token (``token_expired`` ...).
        """

        async def within(step: Awaitable[None], missed: str, context: str) -> None:
            try:
                await asyncio.wait_for(step, timeout)
            except asyncio.TimeoutError:
                raise DcpTimeout(f"data agent {self.name!r}: {missed} within {timeout} s ({context})") from None

        self._running = True
        try:
            self._spawn(self._broker_loop())
            await within(
                self._attachment(), "not attached to a broker", f"dialling {', '.join(self.brokers)}; the log says why each try failed",
            )
            attached = self.broker.url if self.broker is not None else "none: stopped"
            self.orchestrator = self._connection(
                self.orchestrator_url, role="agent", on_open=self._register, on_push=self._on_push,
                reconnect=Backoff(initial_s=0.05, max_s=1.0),
            )
            await within(
                self.orchestrator.open(retry=True), f"not registered with the orchestrator at {self.orchestrator_url}",
                f"attached to the broker at {attached}",
            )
        except BaseException:
            await self.stop()
            raise
        for element in self._declared.values():
            if element.kind == "source":
                element.task = self._spawn(self._run_source(element))
        self._spawn(self._report_loop())

    async def run(self) -> None:
        """Start, then run until ``stop()`` is called.

        Raises:
            RemoteError: a broker refused the token (at the start, or at a reconnect).
        """
        await self.start()
        await self._stopped.wait()
        if self.failure is not None:
            await self.stop()
            raise self.failure

    async def stop(self) -> None:
        """Stop sources and handlers, hand the broker what is published (``drain()``, for
        at most :data:`DRAIN_TIMEOUT_S`), close both connections."""
        if not self._running:
            return
        self._running = False
        for waiting in self._waiting.values():  # their replies could only reach a port we give up
            if not waiting.done():
                waiting.set_exception(ConnectionClosed(f"{self.name} stopped before the reply came"))
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self.orchestrator is not None:
            await self.orchestrator.close()
        if self.broker is not None:
            try:
                await self.broker.drain(DRAIN_TIMEOUT_S)
            except DcpError as exc:  # timed out or lost: the rest of what was published is lost
                log.warning("%s: %s", safe(self.name), safe(exc))
        self._stopped.set()

    def _spawn(self, coro: Awaitable[Any]) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _connection(self, url: str, **options: Any) -> Connection:
        """A connection of this agent to ``url``, with its name, token and TLS CA (never
        a ``dcp://`` URL with a CA: the constructor refused that)."""
        return Connection(url, name=self.name, token=self.token, tls_ca=self.tls_ca, **options)

    # -- the broker side ------------------------------------------------------------------

    async def _attachment(self) -> None:
        """Wait for the first attachment to a broker.

        Raises:
            RemoteError: a broker refused the token first.
        """
        waits = [asyncio.ensure_future(event.wait()) for event in (self._attached, self._stopped)]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()
        if self.failure is not None:
            raise self.failure

    async def _broker_loop(self) -> None:
        """Stay attached: reconnect to the same broker, or move on to the next one; at
        once when it says it is going away (``failover``: it is not redialled, and the
        frames it did not take are dropped, their numbers being for its ports)."""
        single = len(self.brokers) == 1
        index = 0
        while self._running:
            url = self.brokers[index % len(self.brokers)]
            index += 1
            backoff = Backoff(initial_s=0.05, max_s=1.0, max_attempts=None if single else self.failover_attempts)
            conn = self._connection(url, reconnect=backoff, failover=True, max_pending=self.buffer, overflow=self.overflow,
                                    slow_consumer=self.slow_consumer, on_open=self._attached_again, intercept=self._take_reply)
            try:
                await conn.open(retry=True)
            except (DcpError, OSError) as exc:
                if refused(exc):  # the next broker would say the same: the same secret signs for all
                    log.error("%s: broker %s refused our token (%s); the agent stops", safe(self.name), url, safe(exc))
                    self.failure = exc
                    self._stopped.set()
                    return
                log.warning("%s: broker %s unreachable (%s)", safe(self.name), url, safe(exc))
                continue
            self.broker = conn
            try:
                async for msg in conn.messages():
                    await self._dispatch(msg)
            except ConnectionClosed as exc:
                level = logging.INFO if conn.went_away else logging.WARNING  # a restart or a shutdown is no fault
                log.log(level, "%s: lost broker %s for good (%s); trying the next one", safe(self.name), url, safe(exc.__cause__ or exc))
            await conn.close()  # closed already, but by the broker; stop() drains the one in use instead

    async def _set_slow_consumer(self, policy: str, element: str) -> None:
        """An element's spec asks the broker for this policy on our port (kept for reconnects)."""
        self.slow_consumer = policy
        broker = self.broker
        if broker is None:
            return  # the hello of the next attachment carries it
        try:
            await broker.set_slow_consumer(policy)
        except (DcpError, ConfigError) as exc:
            log.error("%s: the broker refused slow_consumer=%r for %s: %s", safe(self.name), policy, safe(element), safe(exc))

    async def _attached_again(self, conn: Connection) -> None:
        """Every (re)attachment: the port may have changed, so tell the orchestrator."""
        self.broker = conn
        self._attached.set()
        if self.orchestrator is not None and self.orchestrator.status.value == "open":
            self._spawn(self._reregister())

    async def _reregister(self) -> None:
        assert self.orchestrator is not None
        try:
            await self._register(self.orchestrator)
        except DcpError as exc:
            log.warning("%s: could not re-register: %s", safe(self.name), safe(exc))

    async def _register(self, conn: Connection) -> None:
        broker = self.broker
        assert broker is not None and broker.port is not None and broker.broker_key is not None
        consumes = sorted({p for e in self._declared.values() for p in e.consumes})
        self._reported = None  # the next report goes out whatever it says
        await conn.call(Register(
            capabilities=sorted(self.capabilities), consumes=consumes, produces=sorted(self.produces),
            broker_key=broker.broker_key, port=broker.port,
        ))

    # -- the orchestrator side -------------------------------------------------------------

    def _on_push(self, push: ControlMessage) -> None:
        """A push of the orchestrator, checked by the connection (a malformed one is logged
        there and never gets here)."""
        if isinstance(push, Route):
            self._route(push)
        elif isinstance(push, Assign):
            self._assign(push)
        elif isinstance(push, Unassign):
            element = self.elements.pop(push.key, None)
            if element is not None and element.task is not None:
                element.task.cancel()
        else:
            log.warning("%s: ignoring the orchestrator's unasked %s push", safe(self.name), safe(push.op))

    def _route(self, route: Route) -> None:
        topic = route.topic
        current = self.routes.get(topic)
        if current is not None and current[0] > route.epoch:
            return  # an older number arriving late
        self.routes[topic] = (route.epoch, route.x)
        if route.tag is not None:  # the orchestrator signs routes: brokers may verify them
            self.route_tags[topic] = route.tag
        else:
            self.route_tags.pop(topic, None)
        if route.broker_key is not None:
            self.route_brokers[topic] = route.broker_key
        else:
            self.route_brokers.pop(topic, None)
        self.consumers[topic] = list(route.consumers)
        self._share_route(route)
        if route.refused:
            self.refusals[topic] = route.refused
            log.warning("%s may not publish %s: %s", safe(self.name), safe(topic), safe(route.refused))
        else:
            self.refusals.pop(topic, None)
        self.route_changed.set()
        self.route_changed = asyncio.Event()

    def _share_route(self, route: Route) -> None:
        """The share groups of a route: its numbers, one per choice of members, and for a
        request stream each member's way back.  An inconsistent one is logged and the
        topic routes by ``x`` alone (every member gets every frame: nothing is lost)."""
        topic = route.topic
        self.choices.pop(topic, None)
        self.variant_tags.pop(topic, None)
        self.reply_routes.pop(topic, None)
        if not route.shares or not route.variants:
            return
        try:
            choices = Choices([Group(share.group, share.mode, tuple(share.members)) for share in route.shares], route.variants)
            if route.variant_tags is not None and len(route.variant_tags) != len(route.variants):
                raise ValueError(f"{len(route.variant_tags)} tags for {len(route.variants)} numbers")
            for index, share in enumerate(route.shares):
                if share.replies is None:
                    continue
                keys, tags = share.reply_keys or [], share.reply_tags
                if len(share.replies) != len(share.members) or len(keys) != len(share.members) or (tags is not None and len(tags) != len(share.members)):
                    raise ValueError(f"share group {share.group}: the ways back do not match its {len(share.members)} members")
                self.reply_routes[topic] = (index, [(x, key, tags[i] if tags else None) for i, (x, key) in enumerate(zip(share.replies, keys))])
        except ValueError as exc:
            log.warning("%s: a route for %s with inconsistent share groups (%s); it goes to every member", safe(self.name), safe(topic), safe(exc))
            self.reply_routes.pop(topic, None)
            return
        self.choices[topic] = choices
        if route.variant_tags is not None:
            self.variant_tags[topic] = route.variant_tags

    def _assign(self, assign: Assign) -> None:
        key = assign.key
        handler = self.capabilities.get(assign.capability)
        if handler is None or key in self.elements:
            return
        emits = assign.emits
        params = dict(assign.params)
        element = Element(key, assign.kind, tuple(assign.consumes), emits, handler, params=params)
        misfit = _misfit(handler, assign.kind)
        if misfit:  # kept, not run: dcp pipelines shows the error and the right form
            element.runnable = False
            element.failed(misfit)
            log.error("%s: %s (capability %s) %s", safe(self.name), safe(key), safe(assign.capability), misfit)
        if element.kind != "source":  # spec params may batch or window it, like the decorators' arguments
            try:
                element.batch = max(int(params.get("batch", 1)), 1)
                element.batch_timeout_s = float(params.get("batch_timeout_s", element.batch_timeout_s))
                element.window_s = float(params["window_s"]) if "window_s" in params else None
            except (TypeError, ValueError) as exc:
                element.failed(f"bad batch/window params: {_error_text(exc)}")
                log.error("%s: bad batch/window params for %s: %s", safe(self.name), safe(key), safe(repr(params), 512))
            if "slow_consumer" in params:
                self._spawn(self._set_slow_consumer(str(params["slow_consumer"]), key))
        self.elements[key] = element
        if emits:
            self.produces.add(emits)
        if element.kind == "source" and element.runnable:
            element.task = self._spawn(self._run_source(element))
        log.info("%s runs %s (%s)", safe(self.name), safe(key), safe(assign.capability))

    # -- running elements --------------------------------------------------------------

    async def _dispatch(self, msg: Message) -> None:
        topic = msg.topic
        if topic.startswith(REQUESTS):
            await self._answer(msg)
            return
        for element in list(self.elements.values()):
            if element.kind == "source" or not element.runnable or not any(topic_matches(p, topic) for p in element.consumes):
                continue
            element.received += 1
            delay = max(time.time_ns() - msg.timestamp_ns, 0) / 1e9
            element.latency_s += delay
            element.latency_max_s = max(element.latency_max_s, delay)
            if element.window_s is not None or element.batch > 1:
                element.pending.append(msg)
                if element.task is None:
                    wait = element.window_s if element.window_s is not None else element.batch_timeout_s
                    element.task = self._spawn(self._flush_later(element, wait))
                if element.window_s is None and len(element.pending) >= element.batch:
                    await self._flush(element)
                continue
            await self._call(element, msg)

    async def _flush_later(self, element: Element, wait: float) -> None:
        await asyncio.sleep(wait)
        element.task = None
        await self._flush(element)

    async def _flush(self, element: Element) -> None:
        batch, element.pending = element.pending, []
        if element.task is not None and element.task is not asyncio.current_task():
            element.task.cancel()
            element.task = None
        if batch:
            await self._call(element, batch)

    async def _call(self, element: Element, arg: Any) -> None:
        started = time.perf_counter()
        try:
            result = await (element.handler(arg, element.params) if element.params is not None else element.handler(arg))
        except Exception as exc:
            element.failed(_error_text(exc))
            log.exception("%s: handler of %s failed", safe(self.name), safe(element.key))
            return
        finally:
            element.busy_s += time.perf_counter() - started
        await self._emit(element, result)

    async def _emit(self, element: Element, result: Any) -> None:
        if result is None or element.emits is None:
            return
        for payload in result if isinstance(result, list) else [result]:
            if await self.publish(element.emits, payload):
                element.emitted += 1

    async def _run_source(self, element: Element) -> None:
        """Run a source once its topic routes somewhere: before that its frames would go nowhere."""
        assert element.emits is not None
        try:
            await self.wait_route(element.emits, timeout=None)
            if inspect.isasyncgenfunction(element.handler):
                stream: AsyncIterator[Any] = element.handler(element.params) if element.params is not None else element.handler()
                async for payload in stream:
                    await self._emit(element, payload)
            else:
                while True:
                    result = await (element.handler(element.params) if element.params is not None else element.handler())
                    await self._emit(element, result)
                    await asyncio.sleep(element.window_s or 0)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            element.failed(f"the source stopped: {_error_text(exc)}")
            log.exception("%s: source %s failed", safe(self.name), safe(element.key))

    # -- publishing and reporting ----------------------------------------------------------

    async def publish(self, topic: str, payload: Payload, *, key: bytes | str | None = None) -> bool:
        """Publish ``payload`` on ``topic`` with the number the orchestrator gave; False
        (and counted) when the topic has no route or the broker connection is gone.
        ``payload`` is any buffer, a numpy array included, or a tuple of buffers
        (:meth:`dcp.Connection.publish`), not copied here.

        Where replicas share the topic (a consuming element with ``replicas`` > 1), the
        frame goes to one of them: in turn, or, for an element with ``share = "key"``,
        the one ``key`` maps to (the same key, the same replica, while they stay).
        """
        return await self._publish(topic, payload, key) is not None

    async def _publish(self, topic: str, payload: Payload, key: bytes | str | None) -> int | None:
        """:meth:`publish`; the index of the number used (0 without share groups), or None."""
        route = self.routes.get(topic)
        if route is None or not route[1]:
            self.unrouted += 1
            return None
        broker = self.broker
        if broker is None:
            self.lost += 1
            return None
        if self.route_brokers.get(topic, broker.broker_key) != broker.broker_key:
            self.unrouted += 1  # X was computed for the broker we left: wait for the new one
            return None
        choices = self.choices.get(topic)
        if choices is None:
            index, x, tag = 0, route[1], self.route_tags.get(topic)
        else:
            index = choices.pick(key.encode() if isinstance(key, str) else key)
            tags = self.variant_tags.get(topic)
            x, tag = choices.variants[index], tags[index] if tags else None
        try:
            await broker.publish(topic, payload, route=x, tag=tag)
        except ConnectionClosed:
            self.lost += 1
            return None
        self.published += 1
        return index

    # -- requests and replies --------------------------------------------------------------

    async def request(self, capability: str, payload: bytes | bytearray | memoryview, *, timeout: float = 5.0) -> bytes:
        """Ask one agent offering ``capability`` (in turn, when several do) and return its
        reply: what its handler ``async def f(msg, params)`` returns (params ``{}``).

        The orchestrator routes the request and the way back, across brokers; at most
        ``max_requests`` wait at once (more wait for a slot, within ``timeout``).

        Raises:
            RemoteError: ``no_responder``: no agent offers the capability (at once, once
                the orchestrator has said so); ``request_refused``: the policy refuses it;
                ``request_failed``: the handler raised (its message).
            DcpTimeout: no reply within ``timeout`` seconds (a TimeoutError).
            ConfigError: a capability name that cannot be requested.
        """
        topic = request_topic(capability)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        if self._request_slots is None:
            self._request_slots = asyncio.Semaphore(self.max_requests)
        try:
            await asyncio.wait_for(self._request_slots.acquire(), timeout)
        except asyncio.TimeoutError:
            raise DcpTimeout(f"{self.name}: {self.max_requests} requests waiting already; no slot for one to {capability!r} within {timeout} s") from None
        try:
            if topic not in self.routes:
                await self.declare_produces(topic)
                try:
                    await asyncio.wait_for(self._until_routed(topic), max(0.0, deadline - loop.time()))
                except asyncio.TimeoutError:
                    raise DcpTimeout(f"{self.name}: the orchestrator at {self.orchestrator_url} gave no route for requests to {capability!r} within {timeout} s") from None
            return await self._ask(topic, capability, payload, deadline)
        finally:
            self._request_slots.release()

    async def _until_routed(self, topic: str) -> None:
        while topic not in self.routes:
            await self.route_changed.wait()

    async def _ask(self, topic: str, capability: str, payload: bytes | bytearray | memoryview, deadline: float) -> bytes:
        if topic in self.refusals:
            raise RemoteError("request_refused", f"requests to {capability!r}: {self.refusals[topic]}")
        ways = self.reply_routes.get(topic)
        choices = self.choices.get(topic)
        if not self.consumers.get(topic) or ways is None or choices is None:
            raise RemoteError("no_responder", f"no agent offers capability {capability!r} (none that this agent may ask, and can answer it)")
        correlation = next(self._correlations)
        index = choices.pick(None)
        group, members = ways
        reply_x, reply_key, reply_tag = members[choices.groups[group].members.index(choices.member(index, group))]
        envelope = pack_request(RequestEnvelope(correlation, reply_x, reply_key, reply_tag))
        reply: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._waiting[correlation] = reply
        try:
            broker = self.broker
            tags = self.variant_tags.get(topic)
            if broker is None or self.route_brokers.get(topic, broker.broker_key) != broker.broker_key:
                raise ConnectionClosed(f"{self.name}: not attached to the broker the route to {capability!r} is for")
            await broker.publish(topic, (envelope, payload), route=choices.variants[index], tag=tags[index] if tags else None)
            self.requests_sent += 1
            remaining = deadline - asyncio.get_running_loop().time()
            try:
                return await asyncio.wait_for(reply, max(0.0, remaining))
            except asyncio.TimeoutError:
                raise DcpTimeout(f"{self.name}: no reply from {choices.member(index, group)} to a request to {capability!r} in time") from None
        finally:
            self._waiting.pop(correlation, None)

    async def _answer(self, msg: Message) -> None:
        """A request for one of our capabilities: call its handler, send back what it returns."""
        try:
            envelope, body = unpack_request(msg.payload)
        except ProtocolError as exc:
            self.requests_malformed += 1
            log.debug("%s: a malformed request on %s: %s", safe(self.name), safe(msg.topic), safe(exc))
            return
        capability = msg.topic[len(REQUESTS):]
        handler = self.capabilities.get(capability)
        status, answer = REPLY_OK, memoryview(b"")
        try:
            if handler is None:
                raise LookupError(f"{self.name} does not offer {capability!r}")
            result = await handler(msg._replace(payload=bytes(body)), {})
            answer = memoryview(b"" if result is None else result).cast("B")  # sent as it is: no copy
        except Exception as exc:
            status, answer = REPLY_ERROR, memoryview(_error_text(exc)[:ERROR_TEXT_LIMIT].encode())
            log.warning("%s: a request to %s failed: %s", safe(self.name), safe(capability), safe(_error_text(exc)))
        self.requests_served += 1
        broker = self.broker
        if broker is None or broker.broker_key != envelope.reply_broker_key:
            self.replies_unroutable += 1  # its way back was computed for a broker we are not on
            return
        try:
            await broker.publish(REPLIES, (pack_reply(envelope.correlation, status), answer), route=envelope.reply_x, tag=envelope.reply_tag)
        except ConnectionClosed:
            self.lost += 1

    def _take_reply(self, msg: Message) -> bool:
        """A reply is taken as it is decoded, not queued: the handler awaiting it may be the
        one the queue waits on."""
        if msg.topic != REPLIES:
            return False
        self._replied(msg)
        return True

    def _replied(self, msg: Message) -> None:
        try:
            correlation, status, body = unpack_reply(msg.payload)
        except ProtocolError:
            self.replies_unknown += 1
            return
        waiting = self._waiting.pop(correlation, None)
        if waiting is None or waiting.done():
            self.replies_unknown += 1  # timed out, or a reply meant for an earlier holder of our port
            return
        if status == REPLY_OK:
            waiting.set_result(bytes(body))
        else:
            waiting.set_exception(RemoteError("request_failed", bytes(body).decode(errors="replace")))

    async def wait_route(self, topic: str, consumers: int = 1, timeout: float | None = 10.0) -> None:
        """Wait until ``topic`` routes to at least ``consumers`` agents (``timeout`` None: no limit).

        Raises:
            DcpTimeout: (a TimeoutError) not within ``timeout`` seconds; it says how far it got.
        """

        async def until() -> None:
            while len(self.consumers.get(topic, [])) < consumers or not self.routes.get(topic, (0, 0))[1]:
                await self.route_changed.wait()

        try:
            await asyncio.wait_for(until(), timeout)
        except asyncio.TimeoutError:
            raise DcpTimeout(
                f"{self.name}: {topic!r} routes to {len(self.consumers.get(topic, []))} agent(s), not {consumers}, "
                f"{timeout} s after asking (the orchestrator at {self.orchestrator_url} routes it once consumers register)"
            ) from None

    def counters(self) -> dict[str, Any]:
        broker = self.broker
        return {
            "elements": {key: element.counters() for key, element in self.elements.items()},
            "last_errors": {key: element.last_error for key, element in self.elements.items() if element.last_error},
            "published": self.published,
            "unrouted": self.unrouted,
            "lost": self.lost,
            "dropped": broker.dropped if broker is not None else 0,
            "pending": broker.pending if broker is not None else 0,
        }

    async def _report_loop(self) -> None:
        """Every ``report_interval_s``, the counters, if they changed since the last report
        (or the agent registered again since); unchanged, every :data:`REPORT_KEEPALIVE_S`
        anyway.  Thousands of idle agents cost the orchestrator little."""
        ticked = time.monotonic()
        while True:
            await asyncio.sleep(self.report_interval_s)
            now = time.monotonic()
            for element in self.elements.values():
                element.tick(now - ticked)
            ticked = now
            if self.orchestrator is None:
                continue
            counters = self.counters()
            if counters == self._reported and now - self._reported_at < REPORT_KEEPALIVE_S:
                continue
            self.orchestrator.send(Report(**counters).to_body())
            self._reported, self._reported_at = counters, now

