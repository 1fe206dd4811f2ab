"""Failures that explain themselves: routes that reach nobody are warned about, with why;
handler and source errors are counted per element and shown with the last one; a
capability of the wrong form says the right one.

An orchestrator and brokers in this process on loopback ports the OS chooses (the
``Plane`` of tests/test_orchestrator.py), agents as ``dcp.DataAgent``s, and the ``dcp``
command as a process.  Nothing waits a fixed time: tests wait on the orchestrator's views.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

import dcp
from dcp.broker import Broker
from dcp.config import BrokerConfig
from dcp.control import ERROR_TEXT_LIMIT
from dcp.routing import allocate_keys
from dcp.views import format_pipelines
from tests.loopback import LoopbackServer
from tests.test_orchestrator import Plane
from tests.waiting import until

#: A key Plane.start_brokers(1) does not give its broker (it takes the first).
_, SPARE_KEY = allocate_keys(2, 16)
SPEC = {
    "name": "p",
    "source": [{"name": "cam", "capability": "camera", "emits": "video", "params": {"count": 5}}],
    "stage": [{"name": "det", "capability": "detect", "consumes": ["video"], "emits": "faces"}],
    "sink": [{"name": "out", "capability": "collect", "consumes": ["faces"]}],
}
CAMERA_TO_SINK = {
    "name": "p",
    "source": [{"name": "cam", "capability": "camera", "emits": "video", "params": {"count": 5}}],
    "sink": [{"name": "out", "capability": "collect", "consumes": ["video"]}],
}
CAMERA_TO_DETECTOR_TOML = """\
name = "p"
[[source]]
name = "cam"
capability = "camera"
emits = "video"
params = { count = 5 }
[[stage]]
name = "det"
capability = "detect"
consumes = ["video"]
emits = "faces"
"""


@pytest.fixture
async def plane(tmp_path: Path) -> AsyncIterator[Plane]:
    plane = Plane(tmp_path / "do.db")
    await plane.start_do()
    yield plane
    await plane.close()


class HeldProxy(LoopbackServer):
    """A TCP relay to ``target`` holding every connection until ``release`` is set: a
    broker that dials the orchestrator through it registers when the test says so."""

    def __init__(self, target: tuple[str, int]) -> None:
        super().__init__()
        self.target = target
        self.release = asyncio.Event()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self.release.wait()
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        self.writers.add(up_writer)
        try:
            await asyncio.gather(relay(reader, up_writer), relay(up_reader, writer))
        finally:
            up_writer.transport.abort()
            self.writers.discard(up_writer)


async def relay(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
    """Copy ``source`` to ``sink`` until it ends; then end ``sink`` too."""
    while data := await source.read(65536):
        sink.write(data)
        await sink.drain()
    sink.transport.abort()


def counting_source(agent: dcp.DataAgent) -> None:
    """``agent`` offers ``camera``: ``count`` frames (a param), then it is done."""

    @agent.capability("camera")
    async def frames(params: dict[str, Any]) -> AsyncIterator[bytes]:
        for i in range(params["count"]):
            yield b"frame %d" % i


def collecting_sink(agent: dcp.DataAgent, capability: str = "collect") -> list[bytes]:
    """``agent`` offers ``capability``, a sink keeping the payloads in the list returned."""
    got: list[bytes] = []

    @agent.capability(capability)
    async def collect(msg: dcp.Message, params: dict[str, Any]) -> None:
        got.append(bytes(msg.payload))

    return got


def elements_of(view: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Element name -> its entry, in the pipelines view of a plane running pipeline ``p`` only."""
    (pipeline,) = view
    return {element["name"]: element for element in pipeline["elements"]}


def rows_of(view: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Element name -> the row of its one agent (its counters and last error)."""
    return {name: element["agents"][0] for name, element in elements_of(view).items()}


def warnings_of(plane: Plane) -> dict[str, list[str]]:
    assert plane.do is not None
    return {name: element["warnings"] for name, element in elements_of(plane.do.pipelines_view()).items()}


async def dcp_cli(plane: Plane, *args: str) -> str:
    """``python -m dcp ARGS`` against the plane's orchestrator; its output (it must succeed)."""
    assert plane.do is not None
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "dcp", *args, "--orchestrator", "%s:%d" % plane.do.address,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    return out.decode()


# --------------------------------------------------------------------------- routes that reach nobody


async def test_an_agent_at_a_broker_the_orchestrator_does_not_know_is_warned_about_until_the_broker_registers(plane: Plane) -> None:
    (b0,) = await plane.start_brokers(1)
    assert plane.do is not None
    proxy = HeldProxy(plane.do.address)
    try:
        late = Broker(BrokerConfig(
            listen="127.0.0.1:0", key=SPARE_KEY, ports=16, name="late", peers=("127.0.0.1:%d" % b0.address[1],),
            orchestrator=await proxy.start(), insecure=True,
        ))
        await late.start()
        plane.brokers.append(late)
        for link in late.links.values():
            await link.wait_up(5)
        camera, sink = plane.agent("camera", 1), plane.agent("sink", 0)
        counting_source(camera)
        got = collecting_sink(sink)
        await sink.start()
        await camera.start()

        reply = await plane.admin({"op": "deploy", "spec": CAMERA_TO_SINK})
        unknown = (
            f"agent camera is attached to a broker the orchestrator does not know (key {SPARE_KEY}): its routes reach "
            "nobody until that broker registers (start it with --orchestrator)"
        )
        assert reply["assignments"] == {"cam": ["camera"], "out": ["sink"]}
        assert reply["warnings"] == [f"cam: {unknown}"]
        view = (await plane.admin({"op": "pipelines"}))["pipelines"]
        assert {name: element["warnings"] for name, element in elements_of(view).items()} == {"cam": [unknown], "out": []}

        proxy.release.set()  # the broker registers, a moment after its agents
        await until(lambda: warnings_of(plane) == {"cam": [], "out": []}, lambda: f"the warning to clear, not {warnings_of(plane)}")
        await until(lambda: len(got) == 5, lambda: f"5 frames at the sink, not {got}")
        assert got == [b"frame %d" % i for i in range(5)]
    finally:
        await proxy.close()


async def test_a_deploy_whose_routes_reach_nobody_says_which_and_why_until_they_do(plane: Plane, tmp_path: Path) -> None:
    await plane.start_brokers(1)
    assert plane.do is not None
    apart = Broker(BrokerConfig(
        listen="127.0.0.1:0", key=SPARE_KEY, ports=16, name="b1", orchestrator="%s:%d" % plane.do.address, insecure=True,
    ))
    await apart.start()
    plane.brokers.append(apart)
    camera, detector = plane.agent("camera", 0), plane.agent("detector", 1)
    counting_source(camera)

    @detector.capability("detect")
    async def detect(msg: dcp.Message, params: dict[str, Any]) -> bytes:
        return bytes(msg.payload)

    await detector.start()
    await camera.start()
    do = plane.do
    await until(lambda: set(do.planner.overlay.layouts) == {"b0", "b1"}, "both brokers in the overlay the orchestrator plans with")
    spec = tmp_path / "p.toml"
    spec.write_text(CAMERA_TO_DETECTOR_TOML)

    unreachable = (
        "stream camera/video reaches none of its 1 consumer(s): "
        "detector cannot be reached: no path of links that are up leads from broker b0 to broker b1"
    )
    nobody = "stream detector/faces reaches nobody: no agent consumes 'faces'"
    assert (await dcp_cli(plane, "deploy", str(spec))).splitlines() == [
        "deployed p", "  cam: camera", "  det: detector", f"warning: cam: {unreachable}", f"warning: det: {nobody}",
    ]
    text = await dcp_cli(plane, "pipelines")
    assert f"    warning: {unreachable}\n" in text and f"    warning: {nobody}" in text, text

    async with dcp.connect(plane.url(0), role="admin", name="test", reconnect=False) as admin:
        await admin.link("127.0.0.1:%d" % apart.address[1], wait=5)
    await until(lambda: warnings_of(plane) == {"cam": [], "det": [nobody]}, lambda: f"the link to clear a warning: {warnings_of(plane)}")


# --------------------------------------------------------------------------- handler and source errors


async def test_handler_and_source_errors_are_counted_per_element_and_shown_with_the_last(plane: Plane) -> None:
    await plane.start_brokers(1)
    camera, detector, sink = plane.agent("camera", 0), plane.agent("detector", 0), plane.agent("sink", 0)

    @camera.capability("camera")
    async def frames(params: dict[str, Any]) -> AsyncIterator[bytes]:
        for i in range(3):
            yield b"%d" % i
        raise RuntimeError("camera unplugged")

    @detector.capability("detect")
    async def detect(msg: dcp.Message, params: dict[str, Any]) -> bytes:
        raise ValueError(f"no face in frame {bytes(msg.payload).decode()}\n" + "x" * 400)  # two lines, and too long

    collecting_sink(sink)
    for agent in (sink, detector, camera):
        await agent.start()
    await plane.admin({"op": "deploy", "spec": SPEC})
    assert plane.do is not None
    do = plane.do
    await until(lambda: rows_of(do.pipelines_view())["det"].get("errors") == 3, lambda: f"3 errors of det: {rows_of(do.pipelines_view())}")
    await until(lambda: rows_of(do.pipelines_view())["cam"].get("errors") == 1, lambda: f"the source's error: {rows_of(do.pipelines_view())}")
    # busy is the share of the last report interval: once nothing runs, 0, and the view stands still
    await until(lambda: rows_of(do.pipelines_view())["det"].get("busy") == 0, lambda: f"det idle: {rows_of(do.pipelines_view())}")

    view = (await plane.admin({"op": "pipelines"}))["pipelines"]
    last = "ValueError: no face in frame 2\n"
    counters = {name: (row["in"], row["out"], row["errors"], row["last_error"]) for name, row in rows_of(view).items()}
    assert counters == {
        "cam": (0, 3, 1, "the source stopped: RuntimeError: camera unplugged"),
        "det": (3, 0, 3, (last + "x" * 400)[:ERROR_TEXT_LIMIT]),
        "out": (0, 0, 0, ""),
    }
    assert json.loads(await dcp_cli(plane, "pipelines", "--json")) == view
    text = (await dcp_cli(plane, "pipelines")).splitlines()
    (det_row,) = [line for line in text if line.startswith("  det ")]
    assert det_row.split()[-4:] == ["3", "0", "3", "0"]  # in, out, errors, dropped
    escaped = "ValueError: no face in frame 2\\x0a" + "x" * (ERROR_TEXT_LIMIT - len(last))  # one line: the newline escaped
    assert text[text.index(det_row) + 1] == f"    last error: {escaped}"
    assert "    last error: the source stopped: RuntimeError: camera unplugged" in text


# --------------------------------------------------------------------------- capabilities of the wrong form


async def test_a_capability_of_the_wrong_form_for_its_element_is_an_error_that_says_the_right_form(plane: Plane) -> None:
    await plane.start_brokers(1)
    camera, detector, sink = plane.agent("camera", 0), plane.agent("detector", 0), plane.agent("sink", 0)
    called: list[str] = []

    @camera.capability("camera")
    async def camera_frames(msg: dcp.Message, params: dict[str, Any]) -> bytes:  # the natural guess for a source
        called.append("camera")
        return b""

    @detector.capability("detect")
    async def detect(params: dict[str, Any]) -> AsyncIterator[bytes]:  # a source's form, for a stage
        called.append("detect")
        yield b""

    collecting_sink(sink)
    for agent in (sink, detector, camera):
        await agent.start()
    await plane.admin({"op": "deploy", "spec": SPEC})
    assert plane.do is not None
    do = plane.do
    await until(
        lambda: all(rows_of(do.pipelines_view())[name].get("errors") == 1 for name in ("cam", "det")),
        lambda: f"an error for cam and det: {rows_of(do.pipelines_view())}",
    )
    rows = rows_of((await plane.admin({"op": "pipelines"}))["pipelines"])
    assert rows["cam"]["last_error"] == (
        "camera_frames(msg, params) cannot run a source: "
        "a source is an async generator `async def f(params)` that yields the payloads to publish"
    )
    assert rows["det"]["last_error"] == (
        "detect(params) cannot run a stage: a stage or a sink is `async def f(msg, params)`, which returns what to publish (None: nothing)"
    )
    assert (rows["cam"]["out"], rows["det"]["in"], rows["out"]["errors"]) == (0, 0, 0)
    assert camera.elements["p/cam"].task is None and called == []  # never run, so never failing inside
    assert "    last error: camera_frames(msg, params) cannot run a source: " in format_pipelines(do.pipelines_view())


def test_a_capability_whose_arguments_fit_neither_form_is_refused_when_declared() -> None:
    agent = dcp.DataAgent("a")
    with pytest.raises(dcp.ConfigError, match=r"capability 'camera': camera\(params\) takes the wrong arguments: "
                                              r"a source is an async generator `async def f\(params\)`.*; a stage or a sink is"):
        @agent.capability("camera")
        async def camera(params: dict[str, Any]) -> bytes:
            return b""

    with pytest.raises(dcp.ConfigError, match=r"capability 'frames': frames\(msg, params\) takes the wrong arguments"):
        @agent.capability("frames")
        async def frames(msg: dcp.Message, params: dict[str, Any]) -> AsyncIterator[bytes]:
            yield b""

    assert agent.capabilities == {}
