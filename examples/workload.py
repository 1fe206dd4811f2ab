"""What the real-workload examples (``isac_radar.py``, ``faces_opencv.py``) share: the
credits that bound a source's frames in flight, the clocks of the stages, and the
report of a run.  Needs numpy (the ``examples`` extra), as they do.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from dcp import arrays
from dcp.client import Message
from dcp.demo import Deployment, Plane
from dcp.spec import PipelineSpec, parse_spec

#: A stage's work: (array, the frame's meta, the element's params) -> the array it emits.
Work = Callable[[np.ndarray, dict[str, Any], dict[str, Any]], np.ndarray]
Handler = Callable[[Message, dict[str, Any]], Awaitable[Any]]


class Progress:
    """Shared by the agents' handlers and the run, all in one process: when the source may
    start, its credits, the compute time of each capability, each frame's latency."""

    def __init__(self, frames: int) -> None:
        self.frames = frames
        self.go = asyncio.Event()  # set once every stream has its route
        self.done = asyncio.Event()  # set once the last stage handled every frame
        self.credits = 0  # frames out of the pipeline, as its last topic told the source
        self._credit = asyncio.Event()
        self.compute_s: dict[str, list[float]] = defaultdict(list)
        self.end_to_end_s: list[float] = []
        self.first_ns = self.last_ns = 0

    async def credit(self, sent: int, window: int) -> None:
        """Return once fewer than ``window`` of the ``sent`` frames are in the pipeline: the
        source's flow control, so that no queue on the way grows past ``window`` frames."""
        if not self.first_ns:
            self.first_ns = time.time_ns()
        while sent - self.credits >= window:
            self._credit.clear()
            await self._credit.wait()

    async def returned(self, msg: Message) -> None:
        """A frame's result came out of the pipeline: one credit (the source consumes its last topic)."""
        self.credits += 1
        self._credit.set()

    def finished(self, t0_ns: int) -> None:
        """The last stage handled the frame its source stamped ``t0_ns``."""
        self.last_ns = time.time_ns()
        self.end_to_end_s.append((self.last_ns - t0_ns) / 1e9)
        if len(self.end_to_end_s) == self.frames:
            self.done.set()

    @contextmanager
    def timed(self, capability: str) -> Iterator[None]:
        began = time.perf_counter()
        yield
        self.compute_s[capability].append(time.perf_counter() - began)

    def stage(self, capability: str, work: Work) -> Handler:
        """A stage's handler: the array in (unpacked: a view of the payload), ``work`` on
        it, the result out with the same meta (packed: not copied); timed, unpacking and
        packing included."""

        async def handle(msg: Message, params: dict[str, Any]) -> Any:
            with self.timed(capability):
                array, meta = arrays.unpack(msg.payload)
                return arrays.pack(work(array, meta, params), **meta)

        return handle


def with_params(spec: PipelineSpec, capability: str, **params: Any) -> PipelineSpec:
    """``spec`` with ``params`` set on the element running ``capability``."""
    data = spec.to_dict()
    for kind in ("source", "stage", "sink"):
        for element in data.get(kind, []):
            if element.get("capability") == capability:
                element.setdefault("params", {}).update(params)
    return parse_spec(data)


async def until(check: Callable[[], bool], timeout: float) -> bool:
    """Whether ``check()`` holds within ``timeout`` s (checked every 10 ms: counters other tasks move)."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


def _ms(values: list[float]) -> str:
    return f"{1e3 * float(np.mean(values)):7.3f} / {1e3 * max(values):7.3f}" if values else f"{'-':>17}"


def report(plane: Plane, deployment: Deployment, progress: Progress, where: dict[str, str], out: Callable[[str], Any]) -> int:
    """Print each element's latency (``where``: agent -> broker), the latency end to end
    and the frame rate, and the brokers' counters; return the frames dropped, unrouted or
    lost anywhere."""
    spec = deployment.spec
    out("stages (transit: publish to handler, queueing included; compute: the handler, unpack and pack included)")
    out(f"  {'element':<14} {'agent':<14} {'broker':<6} {'in':>5} {'out':>5}   {'transit mean / max ms':>21}   {'compute mean / max ms':>21}")
    for element in spec.elements:
        agent = deployment.agent_of[element.name]
        counted = deployment.counted(element)
        c = counted.counters() if counted is not None else {"in": 0, "out": 0, "latency_ms": 0.0, "latency_max_ms": 0.0}
        transit = f"{c['latency_ms']:7.3f} / {c['latency_max_ms']:7.3f}" if c["in"] else f"{'-':>17}"
        out(f"  {element.name:<14} {agent:<14} {where.get(agent, '?'):<6} {c['in']:>5} {c['out']:>5}   {transit:>21}   "
            f"{_ms(progress.compute_s.get(element.capability or '', [])):>21}")
    e2e = sorted(progress.end_to_end_s)
    if e2e:
        elapsed = (progress.last_ns - progress.first_ns) / 1e9
        out(f"end to end (source -> last stage): mean {1e3 * float(np.mean(e2e)):.2f} ms, median {1e3 * e2e[len(e2e) // 2]:.2f} ms, "
            f"max {1e3 * e2e[-1]:.2f} ms; {len(e2e)} frames in {elapsed:.2f} s: {len(e2e) / elapsed:.1f} frames/s")
    drops = 0
    for data_agent in plane.agents.values():
        drops += sum(data_agent.counters()[k] for k in ("dropped", "unrouted", "lost"))
    for name, broker in plane.brokers.items():
        drops += sum(broker.drops.values())
        out(f"broker {name}: {broker.frames_in} frames in, {broker.frames_out} out, {sum(broker.drops.values())} dropped")
    return drops
