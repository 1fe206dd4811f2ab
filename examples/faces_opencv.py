#!/usr/bin/env python3
"""The article's Figure 5 pipeline with a real face detector: OpenCV's Haar cascade, on scikit-image's sample images.

    .venv/bin/pip install -e '.[examples]'        # numpy, OpenCV (headless, 4.x), scikit-image
    .venv/bin/python examples/faces_opencv.py [--lfw N] [--interval S] [--window W]

What runs: a data orchestrator and two linked brokers (``dcp.demo.Plane``) and four data
agents, deployed as the pipeline ``faces_opencv.toml`` (beside this file)::

    camera --video--> face-detector --faces--> age-gender --people--> printer
      ^                                                                  |
      +------------------------------ people ----------------------------+   (credits)

    b0: camera, age-gender        b1: face-detector, printer

The camera publishes images that scikit-image ships, as arrays (:func:`dcp.arrays.pack`,
not copied): the astronaut Eileen Collins (512x512 RGB), three scenes without a human
face (Chelsea the cat, a cup of coffee, a rocket), and ``--lfw`` crops of the LFW subset
(25x25, float64): half faces, half background.  The face detector is OpenCV's
``haarcascade_frontalface_default.xml`` (it ships in opencv-python-headless 4.x, in
``cv2.data.haarcascades``); per frame it emits the faces' boxes and 64x64 grey chips, one
array (k, 64, 64).  The age/gender classifier is still :func:`dcp.demo.classify_age_gender`,
a stand-in (no such model ships in these packages), and the figure's dog detector is left
out (nor does a dog model).  The camera keeps at most ``--window`` frames in the
pipeline, taking the printer's input, one record per frame, as credits.

The results are checked against the faces' known positions: the astronaut's one face
must hold her eyes and mouth (where they are in the image, read off it to 3 px); the
scenes hold no face; at least 90 % of the LFW faces must be found, one face centred in
the crop (the LFW crops are centred on the face); at most 5 % of the background crops may
hold a "face".  The run prints the detections, the latency of each stage and the frame
rate; it exits 0 only if every check passed and nothing was dropped.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import msgpack
import numpy as np
import skimage.data
from workload import Handler, Progress, report, with_params  # beside this file

from dcp import arrays
from dcp._loop import run
from dcp.client import Message
from dcp.demo import Plane, classify_age_gender, deploy
from dcp.logs import configure as configure_logging
from dcp.spec import load_spec

SPEC = Path(__file__).with_name("faces_opencv.toml")

#: Data agents: (name, broker, capability it offers).
PLACEMENT = (
    ("camera", "b0", "sample_images"),
    ("face-detector", "b1", "detect_faces_haar"),
    ("age-gender", "b0", "classify_age_gender"),
    ("printer", "b1", "print"),
)
CHIP = 64  #: side of the face chips the detector emits, pixels

#: The astronaut's eyes and mouth, (x, y) pixels, read off the image (to 3 px).
ASTRONAUT_LANDMARKS = ((205, 101), (246, 104), (224, 144))
#: Scenes that scikit-image ships, without a human face.
NO_FACE = ("chelsea", "coffee", "rocket")
LFW_FACES = 100  #: the LFW subset's first 100 crops are faces, the next 100 background
MIN_LFW_FOUND = 0.90
MAX_LFW_FALSE = 0.05
CENTRED = 0.25  #: a face's centre within this fraction of the crop's side from the crop's centre


def frames(lfw: int) -> list[tuple[str, np.ndarray]]:
    """The camera's frames, (name, image): the astronaut, the scenes, then ``lfw`` LFW crops
    (half faces); :func:`check` knows each by its name."""
    crops = skimage.data.lfw_subset()
    half = lfw // 2
    return [
        ("astronaut", skimage.data.astronaut()),
        *((name, getattr(skimage.data, name)()) for name in NO_FACE),
        *((f"lfw-face-{i}", crops[i]) for i in range(half)),
        *((f"lfw-background-{i}", crops[LFW_FACES + i]) for i in range(lfw - half)),
    ]


def grey(image: np.ndarray) -> np.ndarray:
    """``image`` as 8-bit grey, as the cascade takes it (the LFW crops are floats in 0..1)."""
    if image.dtype != np.uint8:
        image = np.clip(image * 255 if image.max() <= 1 else image, 0, 255).astype(np.uint8)
    return cv2.cvtColor(image, cv2.COLOR_RGB2GRAY) if image.ndim == 3 else image


def detect_faces(cascade: cv2.CascadeClassifier, image: np.ndarray, params: dict[str, Any]) -> tuple[list[list[int]], np.ndarray]:
    """The faces in ``image``: boxes [x, y, w, h] in its pixels, and (k, CHIP, CHIP) grey chips.

    An image smaller than the cascade's working size (the LFW crops) is enlarged 4x and
    given a border: the cascade's 24-pixel window cannot find a 25-pixel face that fills
    the whole image.
    """
    pixels = grey(image)
    scale, border = 1, 0
    if min(pixels.shape) < int(params["small"]):
        scale = 4
        pixels = cv2.resize(pixels, None, fx=scale, fy=scale, interpolation=cv2.INTER_LINEAR)
        border = max(pixels.shape) * 3 // 10
        pixels = cv2.copyMakeBorder(pixels, border, border, border, border, cv2.BORDER_REPLICATE)
    found = cascade.detectMultiScale(pixels, scaleFactor=float(params["scale_factor"]),
                                     minNeighbors=int(params["min_neighbors"]), minSize=(int(params["min_size"]),) * 2)
    boxes, chips = [], []
    for x, y, w, h in found:
        chips.append(cv2.resize(pixels[y:y + h, x:x + w], (CHIP, CHIP), interpolation=cv2.INTER_AREA))
        boxes.append([round((int(v) - offset) / scale) for v, offset in ((x, border), (y, border), (w, 0), (h, 0))])
    return boxes, np.array(chips, dtype=np.uint8).reshape(-1, CHIP, CHIP)


# --------------------------------------------------------------------------- the agents' handlers


def camera(progress: Progress, lfw: int) -> Callable[[dict[str, Any]], Any]:
    async def images(params: dict[str, Any]) -> Any:
        window = int(params["window"])
        await progress.go.wait()
        for number, (name, image) in enumerate(frames(lfw)):
            await progress.credit(number, window)
            yield arrays.pack(image, frame=number, image=name, t0=time.time_ns())
            await asyncio.sleep(float(params["interval_s"]))

    return images


def face_detector(progress: Progress) -> Handler:
    cascades: dict[str, cv2.CascadeClassifier] = {}

    async def detect(msg: Message, params: dict[str, Any]) -> Any:
        with progress.timed("detect_faces_haar"):
            name = str(params["cascade"])
            cascade = cascades.get(name)
            if cascade is None:
                cascade = cv2.CascadeClassifier(str(Path(cv2.data.haarcascades) / name))
                if cascade.empty():
                    raise ValueError(f"no cascade {name!r} in {cv2.data.haarcascades}")
                cascades[name] = cascade
            image, meta = arrays.unpack(msg.payload)
            boxes, chips = detect_faces(cascade, image, params)
            return arrays.pack(chips, **meta, boxes=boxes)

    return detect


def age_gender(progress: Progress) -> Handler:
    async def classify(msg: Message, params: dict[str, Any]) -> bytes:
        with progress.timed("classify_age_gender"):
            chips, meta = arrays.unpack(msg.payload)
            labels = [classify_age_gender(chip.tobytes()) for chip in chips]
            return msgpack.packb({**meta, "people": [[*box, age, gender] for box, (age, gender) in zip(meta["boxes"], labels)]})

    return classify


def printer(progress: Progress, results: dict[str, list[list[Any]]], out: Callable[[str], Any]) -> Handler:
    async def show(msg: Message, params: dict[str, Any]) -> None:
        record = msgpack.unpackb(msg.payload)
        results[record["image"]] = record["people"]
        if not record["image"].startswith("lfw-"):
            found = "; ".join(f"face at ({x},{y}) {w}x{h} -> age {age}, {gender} (stand-in)" for x, y, w, h, age, gender in record["people"])
            out(f"  frame {record['frame']:>3} {record['image']:<10} {found or 'no face'}")
        progress.finished(record["t0"])

    return show


# --------------------------------------------------------------------------- the checks


def centred(box: list[int], side: int) -> bool:
    x, y, w, h = box
    return max(abs(x + w / 2 - side / 2), abs(y + h / 2 - side / 2)) <= CENTRED * side


def check(results: dict[str, list[list[Any]]], lfw: int, out: Callable[[str], Any]) -> list[str]:
    """Hold what the printer got against the known faces; return what failed."""
    failures = []
    astronaut = results.get("astronaut", [])
    inside = [all(x <= px <= x + w and y <= py <= y + h for px, py in ASTRONAUT_LANDMARKS) for x, y, w, h, *_ in astronaut]
    if inside != [True]:
        failures.append(f"the astronaut: {len(astronaut)} face(s), {sum(inside)} holding her eyes and mouth, not one")
    for name in NO_FACE:
        if results.get(name):
            failures.append(f"{name}: {len(results[name])} face(s) where there is none")
    side = skimage.data.lfw_subset().shape[1]
    faces = [results.get(f"lfw-face-{i}") for i in range(lfw // 2)]
    found = sum(1 for people in faces if people is not None and len(people) == 1 and centred(people[0][:4], side))
    backgrounds = [results.get(f"lfw-background-{i}") for i in range(lfw - lfw // 2)]
    false = sum(1 for people in backgrounds if people)
    out(f"LFW crops: {found} of {len(faces)} faces found, one face centred in the crop; "
        f"{false} of {len(backgrounds)} background crops with a face")
    if found < MIN_LFW_FOUND * len(faces):
        failures.append(f"LFW: {found} of {len(faces)} faces found, under {MIN_LFW_FOUND:.0%}")
    if false > MAX_LFW_FALSE * len(backgrounds):
        failures.append(f"LFW: {false} of {len(backgrounds)} background crops with a face, over {MAX_LFW_FALSE:.0%}")
    return failures


# --------------------------------------------------------------------------- the run


async def run_faces(args: argparse.Namespace, out: Callable[[str], Any] = print) -> int:
    """Run the pipeline as the command line says; 0 when every check passed."""
    spec = with_params(load_spec(args.spec), "sample_images", interval_s=args.interval, window=args.window)
    count = len(frames(args.lfw))
    out(f"faces with OpenCV {cv2.__version__}: {count} frames (the astronaut, {', '.join(NO_FACE)}, {args.lfw} LFW crops), "
        f"at most {args.window} in flight")
    progress = Progress(count)
    results: dict[str, list[list[Any]]] = {}
    capabilities: dict[str, Any] = {
        "sample_images": camera(progress, args.lfw), "detect_faces_haar": face_detector(progress),
        "classify_age_gender": age_gender(progress), "print": printer(progress, results, out),
    }
    plane = Plane()
    try:
        await plane.start(out)
        for name, broker, capability in PLACEMENT:
            plane.add_agent(name, broker).capability(capability)(capabilities[capability])
        plane.agents["camera"].consume("people")(progress.returned)  # the camera's credits
        await asyncio.gather(*(a.start() for a in plane.agents.values()))
        where = {name: broker for name, broker, _ in PLACEMENT}
        for b in plane.brokers:
            out(f"agents on {b}: {', '.join(name for name, on in where.items() if on == b)}")
        deployment = await deploy(plane, spec, out)
        await plane.agents["age-gender"].wait_route("people", consumers=2)  # the printer, and the camera's credits
        progress.go.set()
        complete = True
        try:
            await asyncio.wait_for(progress.done.wait(), 60 + count * (args.interval + 0.5))
        except asyncio.TimeoutError:
            complete = False
            out(f"timed out: the printer got {len(progress.end_to_end_s)} of {count} frames")
        out("")
        failures = check(results, args.lfw, out)
        drops = report(plane, deployment, progress, where, out)
        detecting = progress.compute_s["detect_faces_haar"]  # frame by frame, in order: one handler call at a time
        scenes = len(NO_FACE) + 1
        if len(detecting) > scenes:
            out(f"face detector: {1e3 * float(np.mean(detecting[:scenes])):.1f} ms a scene (RGB, 0.14 to 0.27 Mpixel), "
                f"{1e3 * float(np.mean(detecting[scenes:])):.2f} ms an LFW crop (25x25)")
    finally:
        await plane.close()
    if not complete:
        failures.append("not every frame came through")
    if drops:
        failures.append(f"{drops} frame(s) dropped, unrouted or lost")
    out("ok: the faces found are where the images have them" if not failures else "FAILED: " + "; ".join(failures))
    return 0 if not failures else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lfw", type=int, default=200, help="LFW crops, half faces (default: 200, all of them)")
    parser.add_argument("--interval", type=float, default=0.0, help="seconds between frames, credits allowing (default: 0)")
    parser.add_argument("--window", type=int, default=4, help="frames in the pipeline at most (default: 4)")
    parser.add_argument("--spec", default=str(SPEC), help=f"pipeline spec (default: {SPEC.name} next to this script)")
    parser.add_argument("--log-level", default="warning", choices=("debug", "info", "warning", "error"))
    args = parser.parse_args(argv)
    if not 0 <= args.lfw <= 2 * LFW_FACES or args.interval < 0 or args.window < 1:
        parser.error(f"--lfw 0..{2 * LFW_FACES}, --interval >= 0, --window >= 1")
    configure_logging(args.log_level)
    return run(run_faces(args))


if __name__ == "__main__":
    sys.exit(main())
