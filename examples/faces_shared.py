#!/usr/bin/env python3
"""The Figure 5 pipeline with shared work: face-detector replicas that share the frames,
and the age/gender classifier called by request/reply.

    .venv/bin/python examples/faces_shared.py [--replicas 1 2 3] [--frames 300] [--work-ms 8]

For each replica count it starts, as processes, a data orchestrator, two linked brokers,
that many face detectors (spread over the brokers) and one age/gender classifier; the
camera and the sink run here.  It deploys ``faces_shared.toml`` with the detector's
``replicas`` set: each frame goes to one detector, in turn.  A detector spends
``--work-ms`` of CPU on a frame (a stand-in for a model), finds the faces (the
synthetic frames of ``dcp.demo``), and asks the classifier about each face with
``agent.request("classify_age_gender", face)``; it publishes the people it found.  The
camera keeps at most ``--window`` frames in flight and stops after ``--frames``.

It prints, per replica count, frames/s and how many frames each detector took, and
exits 0 when every frame was handled exactly once and every face came back
classified.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import dcp
from dcp._loop import run
from dcp.demo import classify_age_gender, detect_faces, expected_counts, make_frame, parse_frame
from dcp.spec import load_spec

SPEC = Path(__file__).with_name("faces_shared.toml")
SEED, WIDTH, HEIGHT = 7, 64, 48
DO_LISTENING = re.compile(r"dcp orchestrator listening on (\S+):(\d+) db=")
BROKER_LISTENING = re.compile(r"listening on (\S+):(\d+) mode=")


def _spawn(argv: list[str], listening: re.Pattern[str] | None = None) -> tuple[subprocess.Popen[str], re.Match[str] | None]:
    """A process of this example or of ``dcp``; once its log shows ``listening``, its
    stderr is drained so that it never blocks on a full pipe."""
    process = subprocess.Popen(
        [sys.executable, *argv], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert process.stderr is not None
    match = None
    if listening is not None:
        seen = []
        for line in process.stderr:
            seen.append(line)
            match = listening.search(line)
            if match:
                break
        else:
            raise SystemExit(f"{' '.join(argv)} exited with {process.wait()}:\n{''.join(seen)}")
    threading.Thread(target=lambda: [None for _ in process.stderr or ()], daemon=True).start()
    return process, match


def burn(frame: bytes, work_ms: float) -> None:
    """CPU work standing in for a model: hashing the frame for ``work_ms``."""
    deadline = time.process_time() + work_ms / 1000
    digest = frame
    while time.process_time() < deadline:
        digest = hashlib.sha256(digest).digest()


async def detector(name: str, broker: str, orchestrator: str, work_ms: float) -> None:
    agent = dcp.DataAgent(name, broker=broker, orchestrator=orchestrator, report_interval_s=0.2)

    @agent.capability("detect_faces")
    async def detect(msg: dcp.Message, params: dict[str, Any]) -> bytes:
        frame = bytes(msg.payload)
        burn(frame, work_ms)
        number = parse_frame(frame)[0]
        people = []
        for face in detect_faces(frame):
            reply = await agent.request("classify_age_gender", face["patch"], timeout=10)
            people.append({"box": face["box"], **json.loads(reply)})
        return json.dumps({"frame": number, "detector": name, "people": people}).encode()

    await agent.run()


async def classifier(broker: str, orchestrator: str) -> None:
    agent = dcp.DataAgent("age-gender", broker=broker, orchestrator=orchestrator)

    @agent.capability("classify_age_gender")
    async def classify(msg: dcp.Message, params: dict[str, Any]) -> bytes:
        age, gender = classify_age_gender(bytes(msg.payload))
        return json.dumps({"age": age, "gender": gender}).encode()

    await agent.run()


async def measure(replicas: int, frames: int, window: int, work_ms: float, workdir: Path) -> dict[str, Any]:
    """One run with ``replicas`` detectors: frames/s, frames per detector, and the check."""
    me = str(Path(__file__).resolve())
    do, match = _spawn(["-m", "dcp", "orchestrator", "--insecure", "--listen", "127.0.0.1:0", "--db", str(workdir / f"do-{replicas}.db")], DO_LISTENING)
    assert match is not None
    orchestrator = f"{match[1]}:{match[2]}"
    processes = [do]
    try:
        urls = []
        for i in range(2):
            peer = ["--peer", urls[0][len("dcp://"):]] if urls else []
            broker, found = _spawn(["-m", "dcp", "broker", "--insecure", "--listen", "127.0.0.1:0", "--orchestrator", orchestrator, *peer], BROKER_LISTENING)
            assert found is not None
            processes.append(broker)
            urls.append(f"dcp://{found[1]}:{found[2]}")
        do_url = f"dcp://{orchestrator}"
        for i in range(replicas):
            processes.append(_spawn([me, "--role", "detector", "--name", f"detector-{i}", "--broker", urls[i % 2], "--orchestrator", do_url, "--work-ms", str(work_ms)])[0])
        processes.append(_spawn([me, "--role", "classifier", "--broker", urls[1], "--orchestrator", do_url])[0])
        return await _drive(replicas, frames, window, urls, do_url)
    finally:
        for process in reversed(processes):
            process.terminate()
        for process in processes:
            process.wait(20)


async def _drive(replicas: int, frames: int, window: int, urls: list[str], do_url: str) -> dict[str, Any]:
    camera = dcp.DataAgent("camera", broker=urls[0], orchestrator=do_url)
    sink = dcp.DataAgent("sink", broker=urls[1], orchestrator=do_url)
    handled: collections.Counter[int] = collections.Counter()
    per_detector: collections.Counter[str] = collections.Counter()
    people = 0
    done = asyncio.Event()

    @sink.capability("collect")
    async def collect(msg: dcp.Message, params: dict[str, Any]) -> None:
        nonlocal people
        record = json.loads(msg.payload)
        handled[record["frame"]] += 1
        per_detector[record["detector"]] += 1
        people += sum(1 for person in record["people"] if "age" in person)
        if sum(handled.values()) >= frames:
            done.set()

    async with camera, sink:
        await camera.declare_produces("video")
        async with dcp.connect(do_url, role="admin", name="example", reconnect=False) as admin:
            await _until_registered(admin, replicas)
            spec = load_spec(SPEC).to_dict()
            spec["stage"][0]["replicas"] = replicas
            await admin.request({"op": "deploy", "spec": spec})
            await _until_streams(admin, replicas)
        await camera.wait_route("video", consumers=replicas, timeout=20)
        started = time.perf_counter()
        for number in range(frames):
            while number - sum(handled.values()) >= window:
                await asyncio.sleep(0.0005)
            await camera.publish("video", make_frame(SEED, number, WIDTH, HEIGHT))
        await asyncio.wait_for(done.wait(), 60)
        elapsed = time.perf_counter() - started
    expected = expected_counts(SEED, frames, WIDTH, HEIGHT)["faces"]
    ok = set(handled) == set(range(frames)) and set(handled.values()) == {1} and people == expected
    return {"replicas": replicas, "frames_s": frames / elapsed, "per_detector": dict(sorted(per_detector.items())), "people": people, "expected": expected, "ok": ok}


async def _until_streams(admin: dcp.Connection, detectors: int, timeout: float = 20) -> None:
    """Until every detector's ``people`` reaches the sink: a result published before its
    route would go nowhere (counted as unrouted by the detector)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        streams = (await admin.request({"op": "status"}))["status"]["streams"]
        routed = {s["producer"] for s in streams if s["topic"] == "people" and "sink" in s["consumers"]}
        if len(routed) >= detectors:
            return
        await asyncio.sleep(0.05)
    raise SystemExit(f"the detectors' results were not routed to the sink within {timeout} s")


async def _until_registered(admin: dcp.Connection, detectors: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        agents = (await admin.request({"op": "status"}))["status"]["agents"]
        offered = collections.Counter(c for a in agents if a["online"] for c in a["capabilities"])
        if offered["detect_faces"] >= detectors and offered["classify_age_gender"] and offered["collect"]:
            return
        await asyncio.sleep(0.05)
    raise SystemExit(f"the agents did not register within {timeout} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2, 3], help="detector replica counts to run (default: 1 2 3)")
    parser.add_argument("--frames", type=int, default=300, help="frames per run (default: 300)")
    parser.add_argument("--window", type=int, default=8, help="frames in flight at most (default: 8)")
    parser.add_argument("--work-ms", type=float, default=8.0, help="CPU per frame in a detector, ms (default: 8)")
    parser.add_argument("--role", choices=("detector", "classifier"), help=argparse.SUPPRESS)
    parser.add_argument("--name", help=argparse.SUPPRESS)
    parser.add_argument("--broker", help=argparse.SUPPRESS)
    parser.add_argument("--orchestrator", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.role == "detector":
        run(detector(args.name, args.broker, args.orchestrator, args.work_ms))
        return 0
    if args.role == "classifier":
        run(classifier(args.broker, args.orchestrator))
        return 0
    results = []
    with tempfile.TemporaryDirectory() as workdir:
        for replicas in args.replicas:
            result = run(measure(replicas, args.frames, args.window, args.work_ms, Path(workdir)))
            results.append(result)
            print(f"{replicas} detector(s): {result['frames_s']:6.1f} frames/s; frames per detector {result['per_detector']}; "
                  f"{result['people']}/{result['expected']} faces classified{'' if result['ok'] else '  FAILED'}", flush=True)
    return 0 if all(result["ok"] for result in results) else 1


if __name__ == "__main__":
    sys.exit(main())
