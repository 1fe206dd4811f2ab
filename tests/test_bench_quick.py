"""``dcp bench --quick``, once: the harness runs every figure and writes well-formed outputs.

Never a timing assert: the numbers are whatever this machine measures; the test checks
that every cell was measured (or skipped with a reason) and the files parse.
"""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from dcp.bench.report import QUICK_VERDICTS


def test_quick_profile_writes_a_complete_report(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "dcp", "bench", "--quick", "--no-external", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["profile"] == "quick" and results["environment"]["cpu_count"] >= 1
    targets = {"dcp-stateless", "dcp-stateful", "dcp-verified", "dcp-commitlog", "relay"}
    for figure, key in (("latency", "p50_us"), ("success", "success"), ("throughput", "mb_s")):
        cells = results[figure]["cells"]
        assert {c["target"] for c in cells} == targets, figure
        failed = [c for c in cells if "skipped" in c]
        assert not failed, failed  # the in-tree targets are always available
    for cell in results["latency"]["cells"] + results["success"]["cells"]:
        assert 0 < cell["received"] <= cell["sent"], cell  # loopback in-tree targets deliver something
    for cell in results["latency"]["cells"]:
        assert 0 < cell["p50_us"] <= cell["p99_us"], cell
    for cell in results["success"]["cells"]:
        assert cell["success"] == pytest.approx(cell["received"] / cell["sent"], abs=1e-3), cell
    for cell in results["throughput"]["cells"]:
        assert cell["mb_s"] > 0 and 0 < cell["delivered"] <= 1, cell
    rows = {(c["target"], c["mode"], c["brokers"]) for c in results["throughput"]["cells"]}
    dcp = ("dcp-stateless", "dcp-stateful", "dcp-verified", "dcp-commitlog")
    assert rows == {
        *((t, m, 1) for t in dcp for m in ("lossless", "overload")), ("dcp-stateless", "lossless", 2), ("relay", "lossless", 1),
    }
    assert set(results["throughput"]["modes"]) == targets
    assert [row["brokers"] for row in results["routing"]["rows"]] == [1, 2, 5]
    requests = results["requests"]["cells"]  # request/reply: dcp on one broker and across two (NATS is external)
    assert [(c["target"], c["brokers"], c["size"]) for c in requests] == [
        ("dcp-stateless", brokers, size) for brokers in (1, 2) for size in (100, 100 * 1024)
    ]
    assert all(0 < c["p50_us"] <= c["p99_us"] <= c["max_us"] and c["count"] == 50 for c in requests), requests
    assert results["targets"] and all(isinstance(t["met"], bool) for t in results["targets"])
    report = (tmp_path / "report.md").read_text()
    assert report.startswith("# dcp bench report\n\n**Quick profile**")
    for title in ("Figure 7", "Figure 8", "Figure 9", "### Lossless", "### Overload", "Route verification cost", "Routing cost", "Request/reply", "Goals"):
        assert title in report
    assert report.count(QUICK_VERDICTS) == 2  # at the top and above the goals
    for name in ("latency", "success", "throughput", "routing", "requests"):
        if name != "requests":  # a table, no figure
            ET.parse(tmp_path / f"{name}.svg")
        with (tmp_path / f"{name}.csv").open(newline="") as f:
            header, *cells = list(csv.reader(f))
        assert len(cells) == len(results[name]["rows" if name == "routing" else "cells"]), name
        assert header[-1] == "profile" and {row[-1] for row in cells} == {"quick"}, name
    # stderr: every step numbered over the whole run, with the elapsed time and an ETA
    steps = [line for line in out.stderr.splitlines() if line.startswith("[")]
    total = len(steps)
    for i, line in enumerate(steps, 1):
        assert re.fullmatch(rf"\[{i}/{total}\] .+ \(elapsed (\d+m)?\d+s, ETA (\d+m)?\d+s\)", line), line
    # stdout: the warning that quick verdicts are not comparable, then one verdict line per target of results.json, in order
    warning, *lines = out.stdout.splitlines()
    assert warning == QUICK_VERDICTS and len(lines) == len(results["targets"])
    for line, verdict in zip(lines, results["targets"]):
        assert line == f"{'met   ' if verdict['met'] else 'MISSED'}  {verdict['goal']}: {verdict['measured']}"


@pytest.mark.parametrize("profile", ["quick", "full"])
def test_without_out_a_run_writes_to_a_new_timestamped_folder_outside_the_working_tree(tmp_path: Path, profile: str) -> None:
    checkout, temp = tmp_path / "checkout", tmp_path / "temp"
    (checkout / "bench" / "results").mkdir(parents=True)
    temp.mkdir()
    command = [sys.executable, "-m", "dcp", "bench", "routing", "--targets", "relay", *(["--quick"] if profile == "quick" else [])]
    folders = []
    for _ in range(2):  # every run gets a folder of its own
        out = subprocess.run(command, cwd=checkout, capture_output=True, text=True, timeout=120, env={**os.environ, "TMPDIR": str(temp)})
        assert out.returncode == 0, out.stderr[-3000:]
        folder = re.search(rf"^{profile} profile: writing to (\S+)$", out.stderr, re.M)
        assert folder, out.stderr
        folders.append(Path(folder.group(1)))
    assert folders[0] != folders[1]
    for folder in folders:
        assert folder.parent == temp and re.fullmatch(rf"dcp-bench-{profile}-\d{{8}}-\d{{6}}-\w+", folder.name), folder
        assert (folder / "routing.csv").is_file()
    assert [p for p in checkout.rglob("*") if p.is_file()] == []
