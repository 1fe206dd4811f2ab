#!/usr/bin/env python3
"""The article's Figure 5 pipeline, end to end, in one process.

    .venv/bin/python examples/faces.py [--frames N] [--interval S]

Starts a data orchestrator, two linked brokers and five data agents (a synthetic
camera, a face detector, a dog detector, an age/gender classifier and a printing
sink, spread over the two brokers), deploys ``faces.toml`` (next to this file),
prints every detection as the sink gets it, then the pipeline as the orchestrator
sees it and a summary: frames in/out, latency and drops per element, and the
brokers' counters.  Exits 0 when everything the deterministic frame generator
implies arrived and nothing was dropped.

The pipeline code (camera, stand-in models, the runner) is ``dcp.demo``, which
``dcp demo`` runs too.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dcp._loop import run
from dcp.logs import configure as configure_logging
from dcp.demo import run_faces
from dcp.spec import load_spec

SPEC = Path(__file__).with_name("faces.toml")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=12, help="frames the camera emits (default: 12)")
    parser.add_argument("--interval", type=float, default=0.05, help="seconds between frames (default: 0.05)")
    parser.add_argument("--spec", default=str(SPEC), help=f"pipeline spec (default: {SPEC.name} next to this script)")
    parser.add_argument("--log-level", default="warning", choices=("debug", "info", "warning", "error"))
    args = parser.parse_args(argv)
    if args.frames < 0 or args.interval < 0:
        parser.error("--frames and --interval must not be negative")
    configure_logging(args.log_level)
    summary = run(run_faces(args.frames, args.interval, spec=load_spec(args.spec)))
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
