"""Latency and one-broker throughput of dcp-stateless at 1 KB and 128 KB, for before/after claims.

Runs the ``dcp bench`` harness's own latency and throughput scenarios (separate broker,
publisher and subscriber processes; 500 messages at 5 ms x 3 interleaved rounds; 3 runs
of 3 s per throughput cell, lossless and under overload) with only those sizes, and
prints one JSON line; a throughput entry is (mode, size, MB/s, delivered fraction).  To compare
two versions, run it from a checkout of each, alternately, on the same machine the same
day::

    (cd /tmp/before && /path/to/.venv/bin/python bench/before_after.py before1)
    (cd /tmp/after && /path/to/.venv/bin/python bench/before_after.py after1)

The worker processes import ``dcp`` from the current directory, so each checkout
measures its own code.
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace

from dcp.bench.scenarios import PROFILES, run

KB = 1024


def main(label: str) -> None:
    profile = replace(
        PROFILES["full"], latency_sizes=(KB, 128 * KB), latency_count=500, latency_rounds=3,
        throughput_brokers=(1,), throughput_sizes=(KB, 128 * KB), throughput_duration_s=3.0, throughput_runs=3,
    )
    results = run(["latency", "throughput"], profile, ["dcp-stateless"])
    print(json.dumps({
        "label": label,
        "load_after": results["environment"].get("loadavg_after"),
        "latency": [(c["size"], c["p50_us"], c["p99_us"], c["received"], c["sent"]) for c in results["latency"]["cells"]],
        "throughput": [(c["mode"], c["size"], c["mb_s"], c["delivered"]) for c in results["throughput"]["cells"]],
    }))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "run")
