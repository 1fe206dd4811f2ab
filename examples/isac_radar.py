#!/usr/bin/env python3
"""ISAC sensing on dcp: an FMCW radar's I/Q frames through a pipeline of data agents, in one process.

    .venv/bin/pip install -e '.[examples]'        # numpy (and OpenCV, scikit-image for faces_opencv.py)
    .venv/bin/python examples/isac_radar.py [--frames N] [--interval S] [--window W] [--seed N] [--targets N]

What runs: a data orchestrator and two linked brokers (``dcp.demo.Plane``), and seven
data agents spread over them, deployed as the pipeline ``isac_radar.toml`` (beside this
file)::

    radar --radar.iq--> range FFT --radar.range--> Doppler FFT --radar.rd--> CA-CFAR
      ^                                                                        |
      |                                                                   radar.cells
      |                                                                        v
      +--------------- radar.tracks <-- tracker <--radar.detections-- clustering
                            |                            |
                            +-----------> DSF <----------+

    b0: radar, Doppler FFT, clustering        b1: range FFT, CA-CFAR, tracker, DSF

so every stream crosses the link.  The radar simulates a 77 GHz FMCW radar (150 MHz
sweeps: 1 m range bins; 64 chirps of 256 complex samples a frame, a frame every 50 ms
of simulated time) looking at ``--targets`` targets moving at constant speeds, from
``--seed``: each frame is a complex64 array of 128 KiB, published with
:func:`dcp.arrays.pack` (not copied) and read with :func:`dcp.arrays.unpack` (not
copied); every stage passes the frame's ``meta`` on.  The radar keeps at most
``--window`` frames in the pipeline: it consumes the tracker's output, one frame of
tracks per frame of I/Q, as credits.  A DSF (:class:`dcp.storage.StorageAgent`)
stores the detections and the tracks.

At the end the run reads the detections back from the DSF and checks them against the
simulated ground truth: at least 95 % of (frame, target) pairs detected within 1.5 m and
1 m/s, at most 5 % of the detections false; and the tracker must hold exactly one
confirmed track per target, within 1 m and 0.5 m/s.  It prints the tracks against the
truth, the latency of each stage and the frame rate; it exits 0 only if every check
passed and nothing was dropped.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from workload import Progress, Work, report, until, with_params  # beside this file

from dcp import arrays
from dcp._loop import run
from dcp.demo import Plane, deploy
from dcp.logs import configure as configure_logging
from dcp.spec import load_spec
from dcp.storage import StorageAgent

SPEC = Path(__file__).with_name("isac_radar.toml")
C = 299_792_458.0  # m/s

#: Data agents: (name, broker, capability it offers); the DSF is added apart.
PLACEMENT = (
    ("radar", "b0", "fmcw_radar"),
    ("range-dpf", "b1", "range_fft"),
    ("doppler-dpf", "b0", "doppler_fft"),
    ("cfar-dpf", "b1", "ca_cfar"),
    ("cluster-dpf", "b0", "cluster"),
    ("tracker", "b1", "track"),
)
DSF = ("dsf", "b1")

# What the checks accept (see the module docstring).
DETECTION_TOLERANCE = (1.5, 1.0)  # m, m/s
TRACK_TOLERANCE = (1.0, 0.5)
MIN_DETECTED = 0.95
MAX_FALSE = 0.05


# --------------------------------------------------------------------------- the radar


@dataclass(frozen=True)
class Radar:
    """An FMCW radar's waveform; it travels in every frame's ``meta``."""

    carrier_hz: float = 77e9
    bandwidth_hz: float = 150e6
    samples: int = 256  # complex samples of a chirp (fast time)
    chirps: int = 64  # chirps of a frame (slow time)
    chirp_s: float = 25.6e-6  # the sweep, sampled
    repeat_s: float = 40e-6  # chirp to chirp
    frame_s: float = 0.05

    @property
    def range_bin_m(self) -> float:
        return C / (2 * self.bandwidth_hz)

    @property
    def velocity_bin_mps(self) -> float:
        return C / self.carrier_hz / (2 * self.chirps * self.repeat_s)

    @property
    def max_velocity_mps(self) -> float:
        return self.velocity_bin_mps * self.chirps / 2


@dataclass(frozen=True)
class Target:
    range_m: float  # at frame 0
    velocity_mps: float  # positive: moving away
    snr_db: float  # per I/Q sample, before the FFTs' gain of chirps x samples

    def at(self, frame: int, radar: Radar) -> tuple[float, float]:
        """(range, velocity) at frame ``frame``."""
        return self.range_m + self.velocity_mps * frame * radar.frame_s, self.velocity_mps


SPEEDS = (-12.0, -8.0, -4.0, 4.0, 8.0, 12.0)  # m/s, give or take 0.4: targets 4 m/s apart


def scene(seed: int, count: int, frames: int, radar: Radar) -> list[Target]:
    """``count`` targets that stay within 10..240 m for ``frames`` frames, with speeds
    at least 4 m/s apart (Doppler keeps them apart, whatever their ranges)."""
    rng = np.random.default_rng(seed)
    travel = frames * radar.frame_s
    if not 0 < count <= len(SPEEDS):
        raise ValueError(f"1 to {len(SPEEDS)} targets, not {count}")
    speeds = rng.permutation(SPEEDS)[:count] + rng.uniform(-0.4, 0.4, count)
    targets = []
    for v in speeds:
        low, high = 10 + max(0.0, -v * travel), 240 - max(0.0, v * travel)
        if low >= high:
            raise ValueError(f"{frames} frames: a target at {v:.1f} m/s leaves the range of 10..240 m")
        targets.append(Target(float(rng.uniform(low, high)), float(v), float(rng.uniform(-14, -8))))
    return targets


def iq_frame(radar: Radar, targets: list[Target], frame: int, rng: np.random.Generator) -> np.ndarray:
    """The dechirped I/Q samples of frame ``frame``: (chirps, samples) complex64.

    A target at range R and velocity v beats at 2 S R / c + f_d in fast time (S the
    sweep's slope, f_d = 2 v / lambda its Doppler shift) and turns by 2 pi f_d T per
    chirp in slow time; the noise is complex Gaussian of unit power.
    """
    t = np.arange(radar.samples) * (radar.chirp_s / radar.samples)
    m = np.arange(radar.chirps)[:, None] * radar.repeat_s
    slope = radar.bandwidth_hz / radar.chirp_s
    shape = (radar.chirps, radar.samples)
    signal = (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)) / np.sqrt(2)
    for target in targets:
        r, v = target.at(frame, radar)
        doppler = 2 * v * radar.carrier_hz / C
        phase = 2 * np.pi * ((2 * slope * r / C + doppler) * t + doppler * m + 2 * radar.carrier_hz * r / C)
        signal += 10 ** (target.snr_db / 20) * np.exp(1j * phase)
    return signal.astype(np.complex64)


# --------------------------------------------------------------------------- the processing


def range_fft(iq: np.ndarray) -> np.ndarray:
    """Range profiles: a Hann-windowed FFT of each chirp (bin k: k range bins away)."""
    return np.fft.fft(iq * np.hanning(iq.shape[1]).astype(np.float32), axis=1).astype(np.complex64)


def doppler_fft(profiles: np.ndarray) -> np.ndarray:
    """The range-Doppler power map: a Hann-windowed FFT across chirps, zero speed in the
    middle row; (chirps, samples) float32."""
    window = np.hanning(profiles.shape[0]).astype(np.float32)[:, None]
    spectrum = np.fft.fftshift(np.fft.fft(profiles * window, axis=0), axes=0)
    return (np.abs(spectrum) ** 2).astype(np.float32)


def ca_cfar(power: np.ndarray, guard: tuple[int, int], train: tuple[int, int], pfa: float, min_range_bin: int = 3) -> np.ndarray:
    """Cell-averaging CFAR over the map: a cell is detected when its power exceeds alpha
    times the mean of the training cells around it (a ring outside ``guard`` cells, up
    to ``guard + train`` cells away, wrapping in Doppler), alpha set for the false-alarm
    probability ``pfa`` in complex Gaussian noise (whose power is exponential).  Returns (doppler bin, range bin, power) rows."""
    (gd, gr), (td, tr) = guard, train
    outer, inner = (gd + td, gr + tr), (gd, gr)
    padded = np.pad(power.astype(np.float64), ((outer[0], outer[0]), (outer[1], outer[1])), mode="wrap")
    integral = np.pad(padded.cumsum(0).cumsum(1), ((1, 0), (1, 0)))

    def box_sum(half: tuple[int, int]) -> np.ndarray:
        (hd, hr), (rows, cols) = half, power.shape
        top, left = outer[0] - hd, outer[1] - hr
        bottom, right = top + rows, left + cols
        size_d, size_r = 2 * hd + 1, 2 * hr + 1
        return (integral[top + size_d : bottom + size_d, left + size_r : right + size_r] - integral[top:bottom, left + size_r : right + size_r]
                - integral[top + size_d : bottom + size_d, left:right] + integral[top:bottom, left:right])

    cells = (2 * outer[0] + 1) * (2 * outer[1] + 1) - (2 * inner[0] + 1) * (2 * inner[1] + 1)
    noise = (box_sum(outer) - box_sum(inner)) / cells
    alpha = cells * (pfa ** (-1 / cells) - 1)
    hits = power > alpha * noise
    hits[:, :min_range_bin] = False  # the leakage around DC
    d, k = np.nonzero(hits)
    return np.column_stack([d, k, power[d, k]]).astype(np.float64)


def cluster(cells: np.ndarray, radar: Radar) -> np.ndarray:
    """Detections from CFAR cells: cells that touch (8-neighbours, wrapping in Doppler)
    are one target, at their power-weighted centre.  Returns (range m, velocity m/s,
    power dB) rows."""
    chirps = radar.chirps
    left = set(range(len(cells)))
    found = []
    while left:
        group, todo = [], [left.pop()]
        while todo:
            i = todo.pop()
            group.append(i)
            near = [j for j in left if abs(cells[j, 1] - cells[i, 1]) <= 1
                    and min((cells[j, 0] - cells[i, 0]) % chirps, (cells[i, 0] - cells[j, 0]) % chirps) <= 1]
            left.difference_update(near)
            todo += near
        member = cells[group]
        peak = member[np.argmax(member[:, 2])]
        offsets = (member[:, 0] - peak[0] + chirps / 2) % chirps - chirps / 2  # Doppler bins from the peak
        weights = member[:, 2] / member[:, 2].sum()
        doppler_bin = peak[0] + weights @ offsets
        range_bin = weights @ member[:, 1]
        found.append(((range_bin * radar.range_bin_m), (doppler_bin - chirps / 2) * radar.velocity_bin_mps, 10 * np.log10(peak[2])))
    return np.array(sorted(found), dtype=np.float64).reshape(-1, 3)


@dataclass
class Track:
    id: int
    range_m: float
    velocity_mps: float
    hits: int = 1
    misses: int = 0


class Tracker:
    """Nearest-neighbour tracking with an alpha-beta filter: pairs of a track's prediction
    and a detection within its gate are taken closest first, and the detection updates the
    track; one that none takes starts a track, confirmed
    after ``confirm`` hits; a track missed ``drop`` frames in a row ends."""

    def __init__(self, gate: tuple[float, float] = (3.0, 2.0), alpha: float = 0.5, beta: float = 0.3, confirm: int = 3, drop: int = 3) -> None:
        self.gate, self.alpha, self.beta, self.confirm, self.drop = gate, alpha, beta, confirm, drop
        self.tracks: list[Track] = []
        self._ids = 0

    def update(self, detections: np.ndarray, dt: float) -> np.ndarray:
        """Take one frame's (range, velocity, power) rows; return the confirmed tracks as
        (id, range m, velocity m/s, hits) rows."""
        for track in self.tracks:
            track.range_m += track.velocity_mps * dt
        pairs = sorted(
            (abs(r - t.range_m) / self.gate[0] + abs(v - t.velocity_mps) / self.gate[1], i, j)
            for i, t in enumerate(self.tracks) for j, (r, v, _) in enumerate(detections)
            if abs(r - t.range_m) <= self.gate[0] and abs(v - t.velocity_mps) <= self.gate[1]
        )
        taken_tracks: set[int] = set()
        taken_detections: set[int] = set()
        for _, i, j in pairs:
            if i in taken_tracks or j in taken_detections:
                continue
            taken_tracks.add(i)
            taken_detections.add(j)
            track, (r, v, _) = self.tracks[i], detections[j]
            track.range_m += self.alpha * (r - track.range_m)
            track.velocity_mps += self.beta * (v - track.velocity_mps)
            track.hits, track.misses = track.hits + 1, 0
        for i, track in enumerate(self.tracks):
            if i not in taken_tracks:
                track.misses += 1
        self.tracks = [t for t in self.tracks if t.misses < self.drop]
        for j, (r, v, _) in enumerate(detections):
            if j not in taken_detections:
                self._ids += 1
                self.tracks.append(Track(self._ids, float(r), float(v)))
        confirmed = [(t.id, t.range_m, t.velocity_mps, t.hits) for t in self.tracks if t.hits >= self.confirm]
        return np.array(confirmed, dtype=np.float64).reshape(-1, 4)


def matches(found: np.ndarray, truth: list[tuple[float, float]], tolerance: tuple[float, float]) -> list[int | None]:
    """For each true (range, velocity), the index of the nearest row of ``found`` (range,
    velocity) within ``tolerance`` (m, m/s), or None."""
    result: list[int | None] = []
    for r, v in truth:
        errors = [(abs(row[0] - r), abs(row[1] - v)) for row in found]
        near = [i for i, (er, ev) in enumerate(errors) if er <= tolerance[0] and ev <= tolerance[1]]
        result.append(min(near, key=lambda i: errors[i][0]) if near else None)
    return result


# --------------------------------------------------------------------------- the pipeline


def radar_source(progress: Progress) -> Callable[[dict[str, Any]], Any]:
    async def frames(params: dict[str, Any]) -> Any:
        radar, count, window = Radar(), int(params["frames"]), int(params["window"])
        targets = scene(int(params["seed"]), int(params["targets"]), count, radar)
        rng = np.random.default_rng(int(params["seed"]))
        await progress.go.wait()
        for number in range(count):
            await progress.credit(number, window)
            with progress.timed("fmcw_radar"):
                iq = iq_frame(radar, targets, number, rng)
            yield arrays.pack(iq, frame=number, t0=time.time_ns(), radar=asdict(radar))
            await asyncio.sleep(float(params["interval_s"]))

    return frames


def tracking(progress: Progress) -> Work:
    trackers: dict[int, Tracker] = {}  # one per assigned element

    def track(detections: np.ndarray, meta: dict[str, Any], params: dict[str, Any]) -> np.ndarray:
        tracker = trackers.setdefault(id(params), Tracker(tuple(params["gate"]), confirm=int(params["confirm"]), drop=int(params["drop"])))
        tracks = tracker.update(detections, Radar(**meta["radar"]).frame_s)
        progress.finished(meta["t0"])
        return tracks

    return track


def handlers(progress: Progress) -> dict[str, Any]:
    """The capabilities of :data:`PLACEMENT`, by name."""
    return {
        "fmcw_radar": radar_source(progress),
        "range_fft": progress.stage("range_fft", lambda iq, meta, params: range_fft(iq)),
        "doppler_fft": progress.stage("doppler_fft", lambda profiles, meta, params: doppler_fft(profiles)),
        "ca_cfar": progress.stage("ca_cfar", lambda power, meta, params: ca_cfar(
            power, tuple(params["guard"]), tuple(params["train"]), float(params["pfa"]))),
        "cluster": progress.stage("cluster", lambda cells, meta, params: cluster(cells, Radar(**meta["radar"]))),
        "track": progress.stage("track", tracking(progress)),
    }


# --------------------------------------------------------------------------- the run


@dataclass
class Verdict:
    """What the checks found."""

    pairs: int = 0  # (frame, target) pairs
    detected: int = 0  # of them, detected within DETECTION_TOLERANCE
    detections: int = 0
    false: int = 0  # detections near no target
    stored: int = 0  # frames the DSF holds
    tracked: int = 0  # targets with a confirmed track within TRACK_TOLERANCE
    extra_tracks: int = 0  # confirmed tracks of no target

    def failures(self, frames: int, targets: int) -> list[str]:
        why = []
        if self.stored != 2 * frames:
            why.append(f"the DSF holds {self.stored} frames, not {2 * frames}")
        if self.detected < MIN_DETECTED * self.pairs or not self.pairs:
            why.append(f"{self.detected} of {self.pairs} (frame, target) pairs detected, under {MIN_DETECTED:.0%}")
        if self.false > MAX_FALSE * self.detections:
            why.append(f"{self.false} false detections of {self.detections}, over {MAX_FALSE:.0%}")
        if self.tracked != targets or self.extra_tracks:
            why.append(f"{self.tracked} of {targets} targets tracked, {self.extra_tracks} confirmed track(s) of none")
        return why


def check(dsf: StorageAgent, targets: list[Target], radar: Radar, out: Callable[[str], Any]) -> Verdict:
    """Read the detections and tracks back from the DSF and hold them against the truth."""
    verdict = Verdict(stored=dsf.count("radar.>"))
    for _, _, _, payload in dsf.query(topic_pattern="radar.detections"):
        detections, meta = arrays.unpack(payload)
        truth = [t.at(meta["frame"], radar) for t in targets]
        hits = [i for i in matches(detections, truth, DETECTION_TOLERANCE) if i is not None]
        verdict.pairs += len(truth)
        verdict.detected += len(hits)
        verdict.detections += len(detections)
        verdict.false += len(detections) - len(set(hits))
    out(f"detections (read back from the DSF): {verdict.detected} of {verdict.pairs} (frame, target) pairs within "
        f"{DETECTION_TOLERANCE[0]} m and {DETECTION_TOLERANCE[1]} m/s; {verdict.false} false of {verdict.detections}")
    stored_tracks = dsf.query(topic_pattern="radar.tracks")
    if not stored_tracks:
        return verdict
    tracks, meta = arrays.unpack(stored_tracks[-1][3])
    truth = [t.at(meta["frame"], radar) for t in targets]
    found = matches(tracks[:, 1:3], truth, TRACK_TOLERANCE)
    verdict.tracked = len({i for i in found if i is not None})
    verdict.extra_tracks = len(tracks) - verdict.tracked
    out(f"tracks at frame {meta['frame']} (the last the DSF stored) against the ground truth:")
    out(f"  {'target':<7} {'true range':>10} {'true speed':>11}   {'track':<6} {'range':>8} {'speed':>9}   {'error':>16}")
    for n, ((r, v), i) in enumerate(zip(truth, found), 1):
        if i is None:
            out(f"  {n:<7} {r:>8.2f} m {v:>+7.2f} m/s   none")
            continue
        tid, tr, tv, _ = tracks[i]
        out(f"  {n:<7} {r:>8.2f} m {v:>+7.2f} m/s   #{int(tid):<5} {tr:>6.2f} m {tv:>+5.2f} m/s   {tr - r:>+5.2f} m {tv - v:>+5.2f} m/s")
    return verdict


async def run_radar(args: argparse.Namespace, out: Callable[[str], Any] = print) -> int:
    """Run the pipeline as the command line says; 0 when every check passed."""
    radar = Radar()
    spec = with_params(load_spec(args.spec), "fmcw_radar", seed=args.seed, targets=args.targets, frames=args.frames,
                       interval_s=args.interval, window=args.window)
    targets = scene(args.seed, args.targets, args.frames, radar)
    out(f"isac radar: {args.targets} targets, {args.frames} frames of {radar.chirps} chirps x {radar.samples} samples "
        f"(complex64, {radar.chirps * radar.samples * 8 // 1024} KiB), seed {args.seed}, at most {args.window} frames in flight; "
        f"range bins {radar.range_bin_m:.2f} m, speed bins {radar.velocity_bin_mps:.2f} m/s")
    progress = Progress(args.frames)
    plane = Plane()
    try:
        await plane.start(out)
        capabilities = handlers(progress)
        for name, broker, capability in PLACEMENT:
            plane.add_agent(name, broker).capability(capability)(capabilities[capability])
        plane.agents["radar"].consume("radar.tracks")(progress.returned)  # the radar's credits
        dsf = plane.add_agent(*DSF, StorageAgent, path=Path(plane.tmp.name) / "dsf.sqlite")
        assert isinstance(dsf, StorageAgent)
        await asyncio.gather(*(a.start() for a in plane.agents.values()))
        where = {name: broker for name, broker, *_ in (*PLACEMENT, DSF)}
        for b in plane.brokers:
            out(f"agents on {b}: {', '.join(name for name, on in where.items() if on == b)}")
        deployment = await deploy(plane, spec, out)
        await plane.agents["tracker"].wait_route("radar.tracks", consumers=2)  # the DSF, and the radar's credits
        progress.go.set()
        complete = True
        try:
            await asyncio.wait_for(progress.done.wait(), 30 + args.frames * (args.interval + 0.2))
        except asyncio.TimeoutError:
            complete = False
            out(f"timed out: the tracker got {len(progress.end_to_end_s)} of {args.frames} frames")
        complete = await until(lambda: dsf.stored == 2 * args.frames, 5.0 if complete else 0.0) and complete
        out("")
        verdict = check(dsf, targets, radar, out)
        drops = report(plane, deployment, progress, where, out)
    finally:
        await plane.close()
    failures = verdict.failures(args.frames, args.targets)
    if not complete:
        failures.append("not every frame came through")
    if drops:
        failures.append(f"{drops} frame(s) dropped, unrouted or lost")
    out("ok: the detections and tracks match the ground truth" if not failures else "FAILED: " + "; ".join(failures))
    return 0 if not failures else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=100, help="radar frames (default: 100; at most 200: the targets stay in range)")
    parser.add_argument("--interval", type=float, default=0.0, help="seconds between frames, credits allowing (default: 0)")
    parser.add_argument("--window", type=int, default=4, help="frames in the pipeline at most (default: 4)")
    parser.add_argument("--targets", type=int, default=3, help=f"moving targets (default: 3, at most {len(SPEEDS)})")
    parser.add_argument("--seed", type=int, default=1, help="seed of the scene and the noise (default: 1)")
    parser.add_argument("--spec", default=str(SPEC), help=f"pipeline spec (default: {SPEC.name} next to this script)")
    parser.add_argument("--log-level", default="warning", choices=("debug", "info", "warning", "error"))
    args = parser.parse_args(argv)
    if not 1 <= args.frames <= 200 or args.interval < 0 or args.window < 1 or not 1 <= args.targets <= len(SPEEDS):
        parser.error(f"--frames 1..200, --interval >= 0, --window >= 1, --targets 1..{len(SPEEDS)}")
    configure_logging(args.log_level)
    return run(run_radar(args))


if __name__ == "__main__":
    sys.exit(main())
