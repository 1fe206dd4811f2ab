"""The faces pipeline (the article's Figure 5): ``dcp demo`` and ``examples/faces.py``."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from dcp.demo import (
    AGE_BUCKETS,
    DEMO_SPEC,
    FACE_MARK,
    PATCH,
    REAL_EXAMPLES,
    classify_age_gender,
    detect_dogs,
    detect_faces,
    expected_counts,
    frame_plan,
    make_frame,
    parse_frame,
    run_faces,
)
from dcp.spec import load_spec, parse_spec

ROOT = Path(__file__).resolve().parent.parent
SEED, WIDTH, HEIGHT = (DEMO_SPEC["source"][0]["params"][k] for k in ("seed", "width", "height"))
ROW = re.compile(r"^  (\S+)\s+(\S+)\s+(b\d)\s+(\d+)\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+(\d+)\s+(\d+)\s+(\d+)$")
BROKER_ROW = re.compile(r"^  (b\d)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)$")


def _expected(frames: int) -> dict[str, tuple[int, int]]:
    """Element -> (in, out), from the generator and the stand-in models themselves."""
    faces = sum(len(detect_faces(make_frame(SEED, n, WIDTH, HEIGHT))) for n in range(frames))
    dogs = sum(len(detect_dogs(make_frame(SEED, n, WIDTH, HEIGHT))) for n in range(frames))
    assert expected_counts(SEED, frames, WIDTH, HEIGHT) == {"faces": faces, "dogs": dogs}
    return {
        "camera": (0, frames), "face-detector": (frames, faces), "dog-detector": (frames, dogs),
        "age-gender": (faces, faces), "printer": (faces + dogs, 0),
    }


def test_toml_spec_is_the_embedded_spec() -> None:
    assert load_spec(ROOT / "examples" / "faces.toml") == parse_spec(DEMO_SPEC)


def test_frames_and_detectors_are_deterministic() -> None:
    for n in range(40):
        frame = make_frame(SEED, n, WIDTH, HEIGHT)
        assert frame == make_frame(SEED, n, WIDTH, HEIGHT)
        number, width, height, pixels = parse_frame(frame)
        assert (number, width, height, len(pixels)) == (n, WIDTH, HEIGHT, WIDTH * HEIGHT)
        plan = frame_plan(SEED, n, WIDTH, HEIGHT)
        faces, dogs = detect_faces(frame), detect_dogs(frame)
        assert faces == detect_faces(frame) and dogs == detect_dogs(frame)
        # the detectors find exactly the patches the generator placed
        assert [tuple(f["box"]) for f in faces] == [(x, y, PATCH, PATCH) for x, y in plan["faces"]]
        assert [tuple(d["box"]) for d in dogs] == [(x, y, PATCH, PATCH) for x, y in plan["dogs"]]
        for face in faces:
            assert face["frame"] == n and len(face["patch"]) == PATCH * PATCH
            assert face["patch"][:PATCH] == FACE_MARK
    assert make_frame(SEED, 3, WIDTH, HEIGHT) != make_frame(SEED + 1, 3, WIDTH, HEIGHT)
    total = expected_counts(SEED, 40, WIDTH, HEIGHT)
    assert total["faces"] > 0 and total["dogs"] > 0


def test_classifier_is_a_pure_function() -> None:
    patches = [f["patch"] for n in range(30) for f in detect_faces(make_frame(SEED, n, WIDTH, HEIGHT))]
    labels = [classify_age_gender(p) for p in patches]
    assert labels == [classify_age_gender(bytes(p)) for p in patches]
    assert all(age in AGE_BUCKETS and gender in ("female", "male") for age, gender in labels)
    assert len(set(labels)) > 3  # the hash spreads patches over the buckets


def _check_summary(stdout: str, frames: int) -> None:
    expected = _expected(frames)
    rows = {m[1]: m.groups() for m in map(ROW.match, stdout.splitlines()) if m}
    assert set(rows) == set(expected), stdout
    for element, (n_in, n_out) in expected.items():
        _, _, _, got_in, got_out, _, _, dropped, unrouted, lost = rows[element]
        assert (int(got_in), int(got_out)) == (n_in, n_out), (element, stdout)
        assert (dropped, unrouted, lost) == ("0", "0", "0"), (element, stdout)
    brokers = {m[1]: m.groups() for m in map(BROKER_ROW.match, stdout.splitlines()) if m}
    assert set(brokers) == {"b0", "b1"}, stdout
    assert all(row[4] == "0" for row in brokers.values()), stdout
    # the frames cross the link: video b0 -> b1, faces b1 -> b0, people b0 -> b1; dogs stay on b1
    faces, dogs = expected["age-gender"][0], expected["dog-detector"][1]
    assert brokers["b0"][2:4] == (str(frames + 2 * faces), str(frames + 2 * faces)), stdout
    assert brokers["b1"][2:4] == (str(frames + 2 * faces + dogs), str(2 * frames + 2 * faces + dogs)), stdout
    assert "all delivered, 0 drop(s), 0 error(s)" in stdout
    faces_total, dogs_total = expected["face-detector"][1], expected["dog-detector"][1]
    assert len(re.findall(r"^  frame +\d+: face at \(\d+,\d+\) -> age \S+, (?:female|male)", stdout, re.M)) == faces_total
    assert len(re.findall(r"^  frame +\d+: dog at \(\d+,\d+\)", stdout, re.M)) == dogs_total


def test_dcp_demo_runs_the_pipeline() -> None:
    out = subprocess.run([sys.executable, "-m", "dcp", "demo", "--count", "8"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    _check_summary(out.stdout, 8)
    assert "pipeline faces" in out.stdout  # the DO's view (dcp.views.format_pipelines)
    assert out.stdout.rstrip().endswith(REAL_EXAMPLES)  # where the real workloads are


def test_examples_faces_script() -> None:
    script = ROOT / "examples" / "faces.py"
    out = subprocess.run([sys.executable, str(script), "--frames", "6", "--interval", "0.01"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    _check_summary(out.stdout, 6)


async def test_run_faces_returns_the_summary() -> None:
    lines: list[str] = []
    summary = await run_faces(5, 0, out=lines.append)
    expected = _expected(5)
    assert summary["ok"], "\n".join(lines)
    assert {name: (e["in"], e["out"]) for name, e in summary["elements"].items()} == expected
    assert all(sum(a.values()) == 0 for a in summary["agents"].values())
    assert all(b["drops"] == 0 for b in summary["brokers"].values())
    assert summary["expected"] == expected_counts(SEED, 5, WIDTH, HEIGHT)
