"""``dcp demo``: the article's Figure 5 pipeline, end to end, in one process.

A camera publishes frames on ``video``; a face detector and a dog detector both
consume them; an age/gender classifier consumes ``faces`` and emits ``people``; a
printing sink consumes ``people`` and ``dogs``::

    camera --video--> detect_faces --faces--> classify_age_gender --people--> print
                  \\--> detect_dogs ----------------------------------dogs-----/

:func:`run_faces` starts a data orchestrator (state in a temporary sqlite file), two
linked brokers with keys of their own and five data agents spread over them (camera
and classifier on ``b0``; detectors and sink on ``b1``, so every stream crosses the
link), deploys :data:`DEMO_SPEC` through an admin connection, waits for the routes,
lets the camera emit its frames, prints every detection as the sink gets it, then
the pipeline as the orchestrator sees it and a summary (frames in/out, latency and
drops per element, the brokers' counters).  ``examples/faces.toml`` holds the same
spec as a file (``examples/faces.py`` runs it).

Frames and models are synthetic and deterministic, stand-ins for real ones: a frame
is a small header (frame number, width, height) and a grid of pixel bytes drawn from
a seeded RNG, below :data:`BACKGROUND_MAX`; some frames hold face or dog patches
(:data:`PATCH` x :data:`PATCH`, whose top row is :data:`FACE_MARK` or
:data:`DOG_MARK`, byte values no background pixel has).  The detectors scan for
those marks and emit one record per patch; the "classifier" buckets a hash of the
patch bytes into an age range and a gender.  Same frame, same detections; same
patch, same label.  Records between stages are msgpack maps.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import random
import struct
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import msgpack

from . import control
from .agent import DataAgent, Element, Handler
from .auth import broker_secret, issue_token, load_secret, new_secret, write_secret
from .broker import Broker
from .client import Connection, Message, connect
from .config import BrokerConfig, OrchestratorConfig
from .orchestrator import Orchestrator
from .spec import ElementSpec, PipelineSpec, parse_spec
from .views import format_pipelines

__all__ = [
    "DEMO_SPEC", "PLACEMENT", "PATCH", "FACE_MARK", "DOG_MARK", "BACKGROUND_MAX", "AGE_BUCKETS",
    "frame_plan", "make_frame", "parse_frame", "detect_faces", "detect_dogs", "classify_age_gender",
    "expected_counts", "run_faces", "run_demo", "Plane", "Deployment", "deploy", "REAL_EXAMPLES",
]

#: The pipeline (``examples/faces.toml`` is this same spec as a TOML file).  The
#: camera's ``frames`` and ``interval_s`` are replaced by what the demo is asked for.
DEMO_SPEC: dict[str, Any] = {
    "name": "faces",
    "source": [
        {"name": "camera", "capability": "camera", "emits": "video",
         "params": {"seed": 7, "width": 64, "height": 48, "frames": 12, "interval_s": 0.05}},
    ],
    "stage": [
        {"name": "face-detector", "capability": "detect_faces", "consumes": ["video"], "emits": "faces"},
        {"name": "dog-detector", "capability": "detect_dogs", "consumes": ["video"], "emits": "dogs"},
        {"name": "age-gender", "capability": "classify_age_gender", "consumes": ["faces"], "emits": "people"},
    ],
    "sink": [
        {"name": "printer", "capability": "print", "consumes": ["people", "dogs"]},
    ],
}

#: Data agents: (name, broker, capability it offers).
PLACEMENT: tuple[tuple[str, str, str], ...] = (
    ("edge-camera", "b0", "camera"),
    ("face-detector", "b1", "detect_faces"),
    ("dog-detector", "b1", "detect_dogs"),
    ("classifier", "b0", "classify_age_gender"),
    ("console", "b1", "print"),
)

# --------------------------------------------------------------------------- frames

PATCH = 8  #: side of a face or dog patch, pixels
BACKGROUND_MAX = 200  #: background pixels are below this
FACE_MARK = bytes(range(240, 240 + PATCH))  #: top row of a face patch
DOG_MARK = bytes(range(248, 248 + PATCH))  #: top row of a dog patch
HEADER = struct.Struct(">IHH")  # frame number, width, height
_BACKGROUND = bytes(i % BACKGROUND_MAX for i in range(256))
_FACES_PER_FRAME = (0, 0, 1, 1, 2, 3)
_DOGS_PER_FRAME = (0, 0, 0, 1, 1, 2)


def frame_plan(seed: int, number: int, width: int, height: int) -> dict[str, list[tuple[int, int]]]:
    """Where frame ``number`` has its faces and dogs: top-left corners (x, y), sorted by (y, x)."""
    if width < PATCH or height < PATCH or width > 0xFFFF or height > 0xFFFF:
        raise ValueError(f"a frame is {PATCH}..65535 pixels wide and high, got {width}x{height}")
    rng = random.Random(f"dcp-demo:{seed}:{number}:plan")
    cells = [(x, y) for y in range(0, height - PATCH + 1, PATCH) for x in range(0, width - PATCH + 1, PATCH)]
    faces = min(rng.choice(_FACES_PER_FRAME), len(cells))
    dogs = min(rng.choice(_DOGS_PER_FRAME), len(cells) - faces)
    chosen = rng.sample(cells, faces + dogs)
    by_row = lambda xy: (xy[1], xy[0])  # noqa: E731
    return {"faces": sorted(chosen[:faces], key=by_row), "dogs": sorted(chosen[faces:], key=by_row)}


def make_frame(seed: int, number: int, width: int, height: int) -> bytes:
    """Frame ``number`` of the camera seeded ``seed``: header, then ``width * height`` pixel bytes."""
    plan = frame_plan(seed, number, width, height)
    rng = random.Random(f"dcp-demo:{seed}:{number}:pixels")
    pixels = bytearray(rng.randbytes(width * height).translate(_BACKGROUND))
    for mark, corners in ((FACE_MARK, plan["faces"]), (DOG_MARK, plan["dogs"])):
        for x, y in corners:
            pixels[y * width + x:y * width + x + PATCH] = mark  # the rest of the patch is its texture
    return HEADER.pack(number, width, height) + bytes(pixels)


def parse_frame(frame: bytes) -> tuple[int, int, int, bytes]:
    """(number, width, height, pixels) of a frame."""
    number, width, height = HEADER.unpack_from(frame)
    pixels = bytes(frame[HEADER.size:])
    if len(pixels) != width * height:
        raise ValueError(f"frame {number}: {len(pixels)} pixel bytes for {width}x{height}")
    return number, width, height, pixels


def _detect(frame: bytes, mark: bytes) -> list[dict[str, Any]]:
    number, width, height, pixels = parse_frame(frame)
    found = []
    for y in range(height - PATCH + 1):
        row = pixels[y * width:(y + 1) * width]
        x = row.find(mark)
        while 0 <= x <= width - PATCH:
            patch = b"".join(pixels[(y + i) * width + x:(y + i) * width + x + PATCH] for i in range(PATCH))
            found.append({"frame": number, "box": [x, y, PATCH, PATCH], "patch": patch})
            x = row.find(mark, x + PATCH)
    return found


def detect_faces(frame: bytes) -> list[dict[str, Any]]:
    """Stand-in face detector: one record (frame, box [x, y, w, h], patch bytes) per face patch."""
    return _detect(frame, FACE_MARK)


def detect_dogs(frame: bytes) -> list[dict[str, Any]]:
    """Stand-in dog detector: one record (frame, box, patch bytes) per dog patch."""
    return _detect(frame, DOG_MARK)


AGE_BUCKETS = ("0-9", "10-19", "20-29", "30-39", "40-49", "50-59", "60+")


def classify_age_gender(patch: bytes) -> tuple[str, str]:
    """Stand-in age/gender classifier: a pure function of the patch bytes (a hash, bucketed)."""
    digest = hashlib.blake2b(patch, digest_size=8).digest()
    return AGE_BUCKETS[digest[0] % len(AGE_BUCKETS)], ("female", "male")[digest[1] & 1]


def expected_counts(seed: int, frames: int, width: int, height: int) -> dict[str, int]:
    """How many faces and dogs ``frames`` frames of the camera hold."""
    plans = [frame_plan(seed, n, width, height) for n in range(frames)]
    return {"faces": sum(len(p["faces"]) for p in plans), "dogs": sum(len(p["dogs"]) for p in plans)}


# --------------------------------------------------------------------------- the run

R = TypeVar("R", bound=control.Reply)


def _pack(record: Mapping[str, Any]) -> bytes:
    return msgpack.packb(record, use_bin_type=True)


def _unpack(payload: bytes) -> dict[str, Any]:
    return msgpack.unpackb(payload, raw=False)


async def _wait_for(check: Callable[[], Any], timeout: float, step: float = 0.01) -> bool:
    """Check ``check()`` every ``step`` s until true (True) or ``timeout`` (False)."""
    deadline = time.monotonic() + timeout
    while True:
        if await check() if asyncio.iscoroutinefunction(check) else check():
            return True
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(step)


def _spec_with(spec: PipelineSpec | Mapping[str, Any] | None, frames: int, interval_s: float) -> PipelineSpec:
    data = copy.deepcopy(dict(spec.to_dict() if isinstance(spec, PipelineSpec) else spec or DEMO_SPEC))
    parsed = parse_spec(data)
    cameras = [e for e in parsed.elements if e.capability == "camera"]
    wanted = {c for _, _, c in PLACEMENT}
    offered = {e.capability for e in parsed.elements}
    if len(cameras) != 1 or offered != wanted:
        raise ValueError(f"the faces pipeline needs one element per capability {sorted(wanted)}, got {sorted(map(str, offered))}")
    for source in data["source"]:
        if source.get("capability") == "camera":
            source.setdefault("params", {}).update(frames=frames, interval_s=interval_s)
    return parse_spec(data)


@dataclass(frozen=True)
class _Workload:
    """What the camera emits and, from the frame generator, what each element must count."""

    frames: int
    interval_s: float
    seed: int
    width: int
    height: int
    faces: int
    dogs: int

    @classmethod
    def of(cls, spec: PipelineSpec, frames: int, interval_s: float) -> _Workload:
        params = next(e for e in spec.elements if e.capability == "camera").params
        seed, width, height = int(params.get("seed", 0)), int(params.get("width", 64)), int(params.get("height", 48))
        expected = expected_counts(seed, frames, width, height)
        return cls(frames, interval_s, seed, width, height, expected["faces"], expected["dogs"])

    def io(self, capability: str | None) -> tuple[int, int]:
        """(frames in, frames out) of the element running ``capability``."""
        return {
            "camera": (0, self.frames), "detect_faces": (self.frames, self.faces), "detect_dogs": (self.frames, self.dogs),
            "classify_age_gender": (self.faces, self.faces), "print": (self.faces + self.dogs, 0),
        }[capability or ""]


class _Progress:
    """Shared by the agents' handlers and the run: when the camera may start, what the sink got."""

    def __init__(self, detections: int) -> None:
        self.detections = detections
        self.go = asyncio.Event()  # set once the whole pipeline has its routes
        self.done = asyncio.Event()  # set once the sink got every detection
        self.seen = {"people": 0, "dogs": 0}
        if detections == 0:
            self.done.set()

    def saw(self, topic: str) -> None:
        self.seen[topic] = self.seen.get(topic, 0) + 1
        if self.seen["people"] + self.seen["dogs"] >= self.detections:
            self.done.set()


class Plane:
    """A data orchestrator (state in a temporary sqlite file), two linked brokers, an admin
    connection to the orchestrator and the data agents, all in this process.

    Secured as a deployment would be: a fresh orchestrator's secret in the temporary
    folder (mode 0600), and the brokers' secret derived from it beside it, with which the
    brokers issue each other their tokens; the agents and the admin connection get
    tokens issued with the orchestrator's."""

    def __init__(self) -> None:
        self.tmp = tempfile.TemporaryDirectory(prefix="dcp-demo-")
        self.secret_file = str(Path(self.tmp.name) / "secret")
        self.broker_secret_file = str(Path(self.tmp.name) / "broker-secret")
        write_secret(self.secret_file, new_secret())
        self.secret = load_secret(self.secret_file)
        write_secret(self.broker_secret_file, broker_secret(self.secret))
        self.orchestrator = Orchestrator(OrchestratorConfig(
            listen="127.0.0.1:0", db=str(Path(self.tmp.name) / "orchestrator.sqlite"), secret_file=self.secret_file,
        ))
        self.brokers: dict[str, Broker] = {}
        self.agents: dict[str, DataAgent] = {}
        self.admin: Connection | None = None

    async def start(self, out: Callable[[str], Any]) -> None:
        """Start the orchestrator and the brokers (b1 links to b0); return once the orchestrator sees the link up."""
        await self.orchestrator.start()
        do_addr = "%s:%d" % self.orchestrator.address
        out(f"orchestrator  {do_addr}   (state in a temporary sqlite file; tokens from a fresh secret, for every agent and admin)")
        peers: tuple[str, ...] = ()
        for name in ("b0", "b1"):  # default settings: 10,000 ports, random keys of their own
            broker = Broker(BrokerConfig(listen="127.0.0.1:0", name=name, orchestrator=do_addr, peers=peers, secret_file=self.broker_secret_file))
            await broker.start()
            self.brokers[name] = broker
            peers = ("%s:%d" % broker.address,)
        self.admin = await connect(f"dcp://{do_addr}", role="admin", name="demo", reconnect=False, token=self.token("demo", "admin"))
        if not await _wait_for(self._overlay_up, 10.0, 0.02):
            raise RuntimeError("the two brokers did not link up within 10 s")
        for name, broker in self.brokers.items():
            links = "; ".join(f"link port {ln.port} <-> {ln.remote_name or '?'} port {ln.remote_port}" for ln in broker.links.values())
            keys = len(broker.layout.keys)
            out(f"broker {name}     %s:%d   key {broker.key} (+{keys - 1} bank keys)   {links}" % broker.address)

    async def _overlay_up(self) -> bool:
        status = (await self.call(control.Status())).status
        up = {b["name"] for b in status["brokers"] if b["online"] and any(link["state"] == "up" for link in b["links"])}
        return up >= set(self.brokers)

    async def call(self, request: control.Request[R]) -> R:
        """Ask the orchestrator, as an admin."""
        assert self.admin is not None, "start() first"
        return await self.admin.call(request)

    def token(self, name: str, role: str = "agent") -> str:
        """A token for ``name`` in ``role``, issued with the plane's secret (valid for an hour)."""
        return issue_token(self.secret, name, role, int(time.time()) + 3600)

    def add_agent(self, name: str, broker: str, agent_class: type[DataAgent] = DataAgent, **options: Any) -> DataAgent:
        """A data agent (an ``agent_class``, made with ``options`` too: a
        :class:`~dcp.storage.StorageAgent` and its ``path``...) attached to ``broker``
        (b0 or b1), reporting its counters often."""
        url = "dcp://%s:%d" % self.brokers[broker].address
        self.agents[name] = agent_class(
            name, broker=url, orchestrator="dcp://%s:%d" % self.orchestrator.address, report_interval_s=0.2, token=self.token(name),
            **options,
        )
        return self.agents[name]

    async def close(self) -> None:
        """Stop what was started, the agents first; each broker unlinks first, so its peer frees its end instead of redialling."""
        if self.admin is not None:
            await self.admin.close()
        await asyncio.gather(*(a.stop() for a in self.agents.values()), return_exceptions=True)
        for broker in reversed(list(self.brokers.values())):
            for link in list(broker.links.values()):
                broker.remove_link(link, notify=True)
            await broker.close()
        await self.orchestrator.close()
        self.tmp.cleanup()


@dataclass(frozen=True)
class Deployment:
    """A deployed pipeline: its spec, and the agent each element went to."""

    spec: PipelineSpec
    agent_of: dict[str, str]
    agents: dict[str, DataAgent]

    def counted(self, element: ElementSpec) -> Element | None:
        """What the agent running ``element`` counted of it (None: not running it yet)."""
        return self.agents[self.agent_of[element.name]].elements.get(f"{self.spec.name}/{element.name}")


# -- the agents' handlers: the stand-in models of the five capabilities

def _camera(go: asyncio.Event) -> Handler:
    async def camera_source(params: dict[str, Any]) -> Any:
        await go.wait()  # start once the whole pipeline has its routes
        seed, width, height = int(params.get("seed", 0)), int(params.get("width", 64)), int(params.get("height", 48))
        for number in range(int(params.get("frames", 0))):
            yield make_frame(seed, number, width, height)
            await asyncio.sleep(float(params.get("interval_s", 0)))
    return camera_source


def _detector(model: Callable[[bytes], list[dict[str, Any]]]) -> Handler:
    async def detect(msg: Message, params: dict[str, Any]) -> list[bytes]:
        return [_pack({**found, "t0": msg.timestamp_ns}) for found in model(bytes(msg.payload))]
    return detect


async def _classify(msg: Message, params: dict[str, Any]) -> bytes:
    face = _unpack(bytes(msg.payload))
    age, gender = classify_age_gender(face["patch"])
    return _pack({"frame": face["frame"], "box": face["box"], "age": age, "gender": gender, "t0": face["t0"]})


def _printer(progress: _Progress, out: Callable[[str], Any]) -> Handler:
    async def show(msg: Message, params: dict[str, Any]) -> None:
        record = _unpack(bytes(msg.payload))
        x, y = record["box"][:2]
        ms = (time.time_ns() - record["t0"]) / 1e6
        if msg.topic == "people":
            what = f"face at ({x},{y}) -> age {record['age']}, {record['gender']}"
        else:
            what = f"dog at ({x},{y})"
        out(f"  frame {record['frame']:>3}: {what:<40} {ms:7.2f} ms camera->sink")
        progress.saw(msg.topic)
    return show


# -- the run, step by step

async def _start_agents(plane: Plane, progress: _Progress, out: Callable[[str], Any]) -> None:
    """The agents of :data:`PLACEMENT`, each offering its capability, started."""
    handlers: dict[str, Handler] = {
        "camera": _camera(progress.go), "detect_faces": _detector(detect_faces), "detect_dogs": _detector(detect_dogs),
        "classify_age_gender": _classify, "print": _printer(progress, out),
    }
    for name, broker, capability in PLACEMENT:
        plane.add_agent(name, broker).capability(capability)(handlers[capability])
    await asyncio.gather(*(a.start() for a in plane.agents.values()))
    for b in plane.brokers:
        names = [name for name, broker, _ in PLACEMENT if broker == b]
        out(f"agents on {b}: {', '.join(names)}")


async def deploy(plane: Plane, spec: PipelineSpec, out: Callable[[str], Any]) -> Deployment:
    """Deploy ``spec``; return once every stream it makes has its route."""
    reply = await plane.call(control.Deploy(spec=spec.to_dict()))
    assigned = reply.assignments
    out(f"deployed pipeline {reply.pipeline}: " + ", ".join(f"{e} -> {', '.join(a)}" for e, a in assigned.items()))
    deployment = Deployment(spec, {e.name: (assigned.get(e.name) or ["?"])[0] for e in spec.elements}, plane.agents)
    for element in spec.elements:
        if element.emits is None:
            continue
        consumers = {deployment.agent_of[c.name] for c in spec.consumers_of(element.emits)}
        producer = plane.agents[deployment.agent_of[element.name]]
        await producer.wait_route(element.emits, consumers=len(consumers), timeout=10.0)
        epoch, x = producer.routes[element.emits]
        stream = f"{producer.name}/{element.emits}"
        out(f"  route {stream:<20} -> {', '.join(sorted(producer.consumers[element.emits])):<28} "
            f"X: {x.bit_length():>3} bits, epoch {epoch}")
    return deployment


async def _run_camera(
    deployment: Deployment, workload: _Workload, progress: _Progress, timeout_s: float, out: Callable[[str], Any]
) -> bool:
    """Let the camera go; whether, within ``timeout_s`` (plus the frames' time), the sink got
    every detection and every element counted what the generator implies."""
    w = workload
    out(f"camera: {w.frames} frame(s) of {w.width}x{w.height} (seed {w.seed}), one every {w.interval_s} s; "
        f"they hold {w.faces} face(s) and {w.dogs} dog(s)")
    progress.go.set()
    complete = True
    try:
        await asyncio.wait_for(progress.done.wait(), timeout_s + w.frames * w.interval_s)
    except asyncio.TimeoutError:
        complete = False
        out(f"timed out: the sink got {progress.seen['people']} of {w.faces} people and {progress.seen['dogs']} of {w.dogs} dogs")

    def all_counted() -> bool:
        for element in deployment.spec.elements:
            counted = deployment.counted(element)
            if counted is None or (counted.received, counted.emitted) != w.io(element.capability):
                return False
        return True

    return await _wait_for(all_counted, 2.0 if complete else 0.0) and complete


async def _show_orchestrator_view(plane: Plane, deployment: Deployment, out: Callable[[str], Any]) -> None:
    """Print the pipeline as the orchestrator sees it, once the agents' reports caught up with their counters."""

    async def reported() -> bool:
        view = (await plane.call(control.Pipelines())).pipelines
        rows = {e["name"]: e["agents"] for p in view if p["name"] == deployment.spec.name for e in p["elements"]}
        for element in deployment.spec.elements:
            counted = deployment.counted(element)
            got = rows.get(element.name) or [{}]
            if counted is None or (got[0].get("in"), got[0].get("out")) != (counted.received, counted.emitted):
                return False
        return True

    await _wait_for(reported, 3.0, 0.05)
    out("")
    out("the pipeline as the orchestrator sees it (from the agents' reports):")
    out(format_pipelines((await plane.call(control.Pipelines())).pipelines))


def _summary(plane: Plane, deployment: Deployment, workload: _Workload, complete: bool, elapsed: float) -> dict[str, Any]:
    """What :func:`run_faces` returns (see there), from the agents' and brokers' counters."""
    where = {name: broker for name, broker, _ in PLACEMENT}
    elements = {}
    for element in deployment.spec.elements:
        counted = deployment.counted(element)
        counters = counted.counters() if counted is not None else {"in": 0, "out": 0, "errors": 0, "latency_ms": 0.0, "latency_max_ms": 0.0, "busy": 0.0}
        name = deployment.agent_of[element.name]
        elements[element.name] = {"agent": name, "broker": where.get(name, "?"), "capability": element.capability, **counters}
    agents = {}
    for name, a in plane.agents.items():
        c = a.counters()
        agents[name] = {"dropped": c["dropped"], "unrouted": c["unrouted"], "lost": c["lost"]}
    brokers: dict[str, dict[str, Any]] = {
        name: {"frames_in": b.frames_in, "frames_out": b.frames_out, "drops": sum(b.drops.values()),
               "drop_reasons": {k: v for k, v in b.drops.items() if v}}
        for name, b in plane.brokers.items()
    }
    drops = sum(sum(a.values()) for a in agents.values()) + sum(b["drops"] for b in brokers.values())
    errors = sum(e["errors"] for e in elements.values())
    return {
        "ok": complete and drops == 0 and errors == 0, "frames": workload.frames,
        "expected": {"faces": workload.faces, "dogs": workload.dogs}, "elements": elements, "agents": agents,
        "brokers": brokers, "elapsed_s": round(elapsed, 3), "complete": complete, "drops": drops, "errors": errors,
    }


def _print_summary(summary: dict[str, Any], plane: Plane, elapsed: float, out: Callable[[str], Any]) -> None:
    """The summary table: the verdict, then per element and per broker."""
    expected = summary["expected"]
    out("")
    out(f"summary: {summary['frames']} frames, {expected['faces']} faces, {expected['dogs']} dogs expected; "
        f"{'all delivered' if summary['complete'] else 'INCOMPLETE'}, {summary['drops']} drop(s), "
        f"{summary['errors']} error(s), {elapsed:.2f} s")
    out("  (latency: from publish to handling, over the frames each element received)")
    out(f"  {'element':<14} {'agent':<14} {'broker':<6} {'in':>5} {'out':>5} {'mean ms':>8} {'max ms':>8} "
        f"{'dropped':>7} {'unrouted':>8} {'lost':>5}")
    for name, e in summary["elements"].items():
        a = summary["agents"].get(e["agent"], {"dropped": 0, "unrouted": 0, "lost": 0})
        out(f"  {name:<14} {e['agent']:<14} {e['broker']:<6} {e['in']:>5} {e['out']:>5} {e['latency_ms']:>8.3f} "
            f"{e['latency_max_ms']:>8.3f} {a['dropped']:>7} {a['unrouted']:>8} {a['lost']:>5}")
    out(f"  {'broker':<14} {'key':<29} {'frames in':>9} {'frames out':>10} {'drops':>6}")
    for name, b in summary["brokers"].items():
        reasons = ", ".join(f"{k}={v}" for k, v in b["drop_reasons"].items())
        out(f"  {name:<14} {plane.brokers[name].key:<29} {b['frames_in']:>9} {b['frames_out']:>10} {b['drops']:>6}"
            + (f"  ({reasons})" if reasons else ""))


async def run_faces(
    frames: int = 12,
    interval_s: float = 0.05,
    out: Callable[[str], Any] = print,
    *,
    spec: PipelineSpec | Mapping[str, Any] | None = None,
    timeout_s: float = 20.0,
) -> dict[str, Any]:
    """Run the faces pipeline (``spec``, :data:`DEMO_SPEC` by default) over ``frames`` frames.

    Prints through ``out``; returns the summary: ``ok`` (everything the generator
    implies arrived, nothing dropped), ``complete`` (everything arrived), ``drops``,
    ``errors``, ``expected``, ``elements`` (per element: agent, broker, in, out, errors,
    latency_ms, latency_max_ms), ``agents`` (dropped, unrouted, lost), ``brokers``
    (frames_in, frames_out, drops) and ``elapsed_s``.
    """
    if frames < 0 or interval_s < 0:
        raise ValueError("frames and interval_s must not be negative")
    pipeline = _spec_with(spec, frames, interval_s)
    workload = _Workload.of(pipeline, frames, interval_s)
    progress = _Progress(workload.faces + workload.dogs)
    started = time.monotonic()
    plane = Plane()
    try:
        await plane.start(out)
        await _start_agents(plane, progress, out)
        deployment = await deploy(plane, pipeline, out)
        complete = await _run_camera(deployment, workload, progress, timeout_s, out)
        await _show_orchestrator_view(plane, deployment, out)
        elapsed = time.monotonic() - started
        summary = _summary(plane, deployment, workload, complete, elapsed)
        _print_summary(summary, plane, elapsed, out)
        return summary
    finally:
        await plane.close()


#: What ``dcp demo`` ends with: where the same data plane carries real sensing and AI workloads.
REAL_EXAMPLES = """\
real workloads, in a checkout of dcp: pip install -e '.[examples]' (numpy, OpenCV, scikit-image), then
  python examples/isac_radar.py     FMCW radar I/Q frames -> range and Doppler FFTs -> CA-CFAR -> clustering -> tracking
  python examples/faces_opencv.py   this pipeline with OpenCV's Haar face detector, on scikit-image's sample images"""


async def run_demo(count: int = 12, interval_s: float = 0.05) -> int:
    """``dcp demo``: :func:`run_faces` on :data:`DEMO_SPEC`; 0 when everything arrived and nothing dropped."""
    print("dcp demo: camera -> face detector + dog detector -> age/gender classifier -> printing sink")
    print("(synthetic frames; the detectors and the classifier are deterministic stand-ins for real models)")
    summary = await run_faces(count, interval_s)
    print()
    print(REAL_EXAMPLES)
    return 0 if summary["ok"] else 1
