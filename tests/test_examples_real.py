"""The real workloads: ``examples/isac_radar.py`` (FMCW radar I/Q -> FFTs -> CA-CFAR ->
clustering -> tracking, a DSF) and ``examples/faces_opencv.py`` (Figure 5 with OpenCV's
Haar face detector on scikit-image's sample images).

They need the ``examples`` extra (numpy, opencv-python-headless<5, scikit-image); without
it they are skipped, and ``.ci/run`` installs it and runs this file (``tests/extras.py``).  Each script runs end
to end (a short run) and must check its results itself and exit 0; a run whose CFAR is
set to see things must exit 1; the signal processing and the detector are tested apart.
"""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tests.extras import needs

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"

needs_numpy = needs("numpy")
needs_vision = needs("numpy", "cv2", "skimage")


def example(name: str) -> ModuleType:
    """``examples/<name>.py`` as a module (it imports ``workload.py`` beside it)."""
    if str(EXAMPLES) not in sys.path:
        sys.path.insert(0, str(EXAMPLES))
    return importlib.import_module(name)


def run_script(name: str, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(EXAMPLES / name), *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def stage_rows(stdout: str) -> dict[str, tuple[int, int]]:
    """element -> (in, out), from the stages table."""
    rows = re.findall(r"^  (\S+)\s+\S+\s+b\d\s+(\d+)\s+(\d+)\s", stdout, re.M)
    return {name: (int(n_in), int(n_out)) for name, n_in, n_out in rows}


def test_dcp_demo_names_the_real_examples_as_they_are() -> None:
    from dcp.demo import REAL_EXAMPLES

    scripts = re.findall(r"python (examples/\S+\.py)", REAL_EXAMPLES)
    assert sorted(scripts) == ["examples/faces_opencv.py", "examples/isac_radar.py"]
    assert all((ROOT / script).is_file() for script in scripts)
    assert "pip install -e '.[examples]'" in REAL_EXAMPLES


# -- the radar


@needs_numpy
def test_isac_radar_tracks_its_targets_across_two_brokers() -> None:
    out = run_script("isac_radar.py", "--frames", "40", "--targets", "4", "--seed", "3")
    assert out.returncode == 0, out.stdout + out.stderr
    stdout = out.stdout
    assert "ok: the detections and tracks match the ground truth" in stdout
    detected = re.search(r"detections \(read back from the DSF\): (\d+) of (\d+) .*; (\d+) false of (\d+)", stdout)
    assert detected and detected[2] == "160" and int(detected[1]) >= 152 and int(detected[3]) <= 0.05 * int(detected[4]), stdout
    assert len(re.findall(r"^  \d\s+[\d.]+ m\s+[+-][\d.]+ m/s\s+#\d+", stdout, re.M)) == 4  # a track per target
    stages = {"range-fft": (40, 40), "doppler-fft": (40, 40), "cfar": (40, 40), "cluster": (40, 40), "tracker": (40, 40),
              "radar": (0, 40), "store": (80, 0)}
    assert stage_rows(stdout) == stages, stdout
    assert re.search(r"40 frames in [\d.]+ s: [\d.]+ frames/s", stdout)
    assert re.findall(r"^broker b\d: \d+ frames in, \d+ out, (\d+) dropped", stdout, re.M) == ["0", "0"]
    assert "agents on b0: radar, doppler-dpf, cluster-dpf" in stdout and "agents on b1: range-dpf, cfar-dpf, tracker, dsf" in stdout


@needs_numpy
def test_isac_radar_fails_when_its_detections_do_not_match_the_truth(tmp_path: Path) -> None:
    spec = (EXAMPLES / "isac_radar.toml").read_text()
    assert "pfa = 1e-6" in spec
    noisy = tmp_path / "noisy.toml"
    noisy.write_text(spec.replace("pfa = 1e-6", "pfa = 1e-2"))  # a CFAR that sees ~160 noise cells a frame
    out = run_script("isac_radar.py", "--frames", "8", "--spec", str(noisy))
    assert out.returncode == 1, out.stdout + out.stderr
    assert re.search(r"^FAILED: .*false detections of \d+, over 5%", out.stdout, re.M), out.stdout


@pytest.fixture(scope="module")
def radar_module() -> Any:
    return example("isac_radar")


@needs_numpy
def test_the_ffts_put_a_target_in_its_range_and_doppler_bins(radar_module: Any) -> None:
    import numpy as np

    ir = radar_module
    radar = ir.Radar()
    target = ir.Target(range_m=40 * radar.range_bin_m, velocity_mps=5 * radar.velocity_bin_mps, snr_db=-5.0)
    power = ir.doppler_fft(ir.range_fft(ir.iq_frame(radar, [target], 0, np.random.default_rng(0))))
    assert power.shape == (radar.chirps, radar.samples) and power.dtype == np.float32
    doppler_bin, range_bin = np.unravel_index(np.argmax(power), power.shape)
    assert (int(doppler_bin), int(range_bin)) == (radar.chirps // 2 + 5, 40)


@needs_numpy
def test_ca_cfar_keeps_its_false_alarm_rate_in_noise(radar_module: Any) -> None:
    import numpy as np

    rng = np.random.default_rng(5)
    pfa, cells = 1e-3, 0
    maps = 40
    for _ in range(maps):
        noise = rng.exponential(size=(64, 256)).astype(np.float32)  # the power of complex Gaussian noise
        cells += len(radar_module.ca_cfar(noise, (2, 2), (4, 8), pfa, min_range_bin=0))
    rate = cells / (maps * 64 * 256)
    assert pfa / 2 < rate < 2 * pfa, rate


@needs_numpy
def test_clustering_merges_touching_cells_across_the_doppler_wrap(radar_module: Any) -> None:
    import numpy as np

    radar = radar_module.Radar()
    cells = np.array([[0, 50, 4.0], [63, 50, 2.0], [0, 51, 2.0], [20, 100, 1.0]])  # one target astride d=0/63, one apart
    found = radar_module.cluster(cells, radar)
    assert found.shape == (2, 3)
    near, far = found
    assert near[0] == pytest.approx(50.25 * radar.range_bin_m)
    assert near[1] == pytest.approx((-0.25 - radar.chirps / 2) * radar.velocity_bin_mps)
    assert far[:2] == pytest.approx([100 * radar.range_bin_m, (20 - radar.chirps / 2) * radar.velocity_bin_mps])


@needs_numpy
def test_a_track_is_confirmed_after_three_hits_and_ends_after_three_misses(radar_module: Any) -> None:
    import numpy as np

    tracker = radar_module.Tracker(confirm=3, drop=3)
    seen = [tracker.update(np.array([[100.0 + 0.5 * n, 10.0, 20.0]]), 0.05) for n in range(3)]
    assert [len(tracks) for tracks in seen] == [0, 0, 1]
    missed = [tracker.update(np.zeros((0, 3)), 0.05) for _ in range(3)]
    assert [len(tracks) for tracks in missed] == [1, 1, 0]


# -- the camera


@needs_vision
def test_faces_opencv_finds_the_faces_where_the_images_have_them() -> None:
    out = run_script("faces_opencv.py", "--lfw", "40")
    assert out.returncode == 0, out.stdout + out.stderr
    stdout = out.stdout
    assert "ok: the faces found are where the images have them" in stdout
    assert re.search(r"^  frame +0 astronaut +face at \(\d+,\d+\) \d+x\d+ -> age \S+, (female|male) \(stand-in\)$", stdout, re.M), stdout
    for scene in ("chelsea", "coffee", "rocket"):
        assert re.search(rf"^  frame +\d+ {scene} +no face$", stdout, re.M), stdout
    lfw = re.search(r"LFW crops: (\d+) of 20 faces found, one face centred in the crop; (\d+) of 20 background", stdout)
    assert lfw and int(lfw[1]) >= 18 and int(lfw[2]) <= 1, stdout
    frames = 4 + 40
    assert stage_rows(stdout) == {"camera": (0, frames), "face-detector": (frames, frames), "age-gender": (frames, frames),
                                  "printer": (frames, 0)}, stdout
    assert re.findall(r"^broker b\d: \d+ frames in, \d+ out, (\d+) dropped", stdout, re.M) == ["0", "0"]


@pytest.fixture(scope="module")
def faces_module() -> Any:
    return example("faces_opencv")


PARAMS = {"scale_factor": 1.1, "min_neighbors": 5, "min_size": 48, "small": 96}


@needs_vision
def test_the_haar_cascade_finds_the_astronauts_face_around_her_eyes_and_mouth(faces_module: Any) -> None:
    import cv2
    import skimage.data

    cascade = cv2.CascadeClassifier(str(Path(cv2.data.haarcascades) / "haarcascade_frontalface_default.xml"))
    boxes, chips = faces_module.detect_faces(cascade, skimage.data.astronaut(), PARAMS)
    assert len(boxes) == 1 and chips.shape == (1, 64, 64)
    x, y, w, h = boxes[0]
    assert all(x <= px <= x + w and y <= py <= y + h for px, py in faces_module.ASTRONAUT_LANDMARKS)
    boxes, chips = faces_module.detect_faces(cascade, skimage.data.coffee(), PARAMS)
    assert boxes == [] and chips.shape == (0, 64, 64)


@needs_vision
def test_the_checks_catch_a_misplaced_face_and_missed_lfw_faces(faces_module: Any) -> None:
    good: dict[str, list[list[Any]]] = {
        "astronaut": [[177, 66, 95, 95, "30-39", "female"]], "chelsea": [], "coffee": [], "rocket": [],
        **{f"lfw-face-{i}": [[3, 3, 19, 19, "0-9", "male"]] for i in range(10)},
        **{f"lfw-background-{i}": [] for i in range(10)},
    }
    lines: list[str] = []
    assert faces_module.check(good, 20, lines.append) == []
    wrong = {**good, "astronaut": [[300, 300, 95, 95, "30-39", "female"]], "coffee": [[1, 1, 50, 50, "0-9", "male"]],
             "lfw-face-0": [], "lfw-face-1": [[0, 0, 8, 8, "0-9", "male"]], "lfw-background-0": [[3, 3, 19, 19, "0-9", "male"]]}
    failures = faces_module.check(wrong, 20, lines.append)
    assert [f.split(":")[0] for f in failures] == ["the astronaut", "coffee", "LFW", "LFW"], failures
