"""The bench report: Markdown tables and SVG figures from a synthetic results document."""

from __future__ import annotations

import copy
import csv
import io
import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from dcp.bench import report
from dcp.bench.report import QUICK_VERDICTS, csv_tables, figures, fmt_size, markdown, svg_line_chart, write
from dcp.bench.scenarios import FIGURES, PROFILES, Steps, evaluate_targets, modes, plan
from dcp.bench.targets import IN_TREE, QUEUES, TARGETS

SVG = "{http://www.w3.org/2000/svg}"
KB, MB = 1024, 1024 * 1024
LAT_SIZES = [10, 100, KB, 10 * KB, 100 * KB, MB]
SUCC_SIZES = [KB, 10 * KB, 100 * KB, MB]
INTERVALS = [2, 3, 5, 10, 100, 1000]
NATS_WHY = "server not answering on 127.0.0.1:4222"


def results() -> dict[str, Any]:
    lat_cells: list[dict[str, Any]] = []
    for target, base in (("dcp-stateless", 180.0), ("dcp-commitlog", 500.0)):
        for i, size in enumerate(LAT_SIZES):
            lat_cells.append({
                "target": target, "size": size, "sent": 500, "received": 500 if target == "dcp-stateless" else 499,
                "success": 1.0 if target == "dcp-stateless" else 0.998,
                "p50_us": base * (1 + i / 2), "p90_us": base * 2, "p99_us": base * 5 + i, "max_us": 20000.0,
            })
    lat_cells += [{"target": "nats", "size": size, "skipped": NATS_WHY} for size in LAT_SIZES]
    succ_cells: list[dict[str, Any]] = []
    for target in ("dcp-stateless", "dcp-commitlog"):
        for size in SUCC_SIZES:
            for interval in INTERVALS:
                ok = 1.0 if target == "dcp-stateless" or interval >= 10 else 0.5
                succ_cells.append({"target": target, "size": size, "interval_ms": interval, "sent": 1000, "received": int(1000 * ok), "success": ok})
    succ_cells.append({"target": "nats", "size": MB, "interval_ms": 2, "skipped": NATS_WHY})
    # a rate just under 100 % must not read 100.0
    succ_cells[0] = {**succ_cells[0], "received": 9999, "sent": 10000, "success": 0.9999}
    tp_cells: list[dict[str, Any]] = []
    for target, mode, brokers in (
        ("dcp-stateless", "lossless", 1), ("dcp-stateless", "lossless", 2), ("dcp-stateless", "lossless", 5),
        ("dcp-stateless", "overload", 1), ("relay", "lossless", 1), ("nats", "best-effort", 1),
    ):
        for size in (KB, 64 * KB):
            cell: dict[str, Any] = {"target": target, "mode": mode, "brokers": brokers, "size": size}
            if target == "nats":
                tp_cells.append({**cell, "skipped": NATS_WHY})
                continue
            if target == "relay" and size > KB:
                tp_cells.append({**cell, "skipped": "failed: boom | pipe\nsecond line"})
                continue
            mb_s = 100.0 * brokers * (2 if size > KB else 1) * (1.5 if mode == "overload" else 1)
            delivered = 0.97 if (brokers, size) == (5, KB) else 1.0 if mode == "lossless" else 0.8
            tp_cells.append({
                **cell, "sent": 1000, "received": int(1000 * delivered), "delivered": delivered, "mb_s": mb_s,
                "msg_s": mb_s * MB / size, "cpu_s": 9.5, "cores_used": 1.9, "mb_s_per_core": mb_s / 1.9,
                "runs_mb_s": [mb_s - 10, mb_s, mb_s + 5],
            })
    return {
        "profile": "quick",
        "started_at": "2026-11-23T10:00:00Z",
        "duration_s": 123.4,
        "environment": {
            "cpu_count": 2, "loadavg": [0.5, 0.4, 0.3], "python": "3.11.7", "platform": "Linux-6.1-x86_64", "dcp": "0.1.0",
            "uvloop": "0.21.0",
            "targets": {
                "dcp-stateless": {"available": True, "version": "0.1.0"},
                "dcp-commitlog": {"available": True, "version": "builtin"},
                "relay": {"available": True, "version": "builtin"},
                "nats": {"available": False, "why": NATS_WHY},
            },
        },
        "latency": {"sizes": LAT_SIZES, "count": 500, "warmup": 50, "interval_ms": 5.0, "cells": lat_cells},
        "success": {"intervals_ms": INTERVALS, "sizes": SUCC_SIZES, "cell_s": 2.0, "cells": succ_cells},
        "throughput": {
            "brokers": [1, 2, 5], "sizes": [KB, 64 * KB], "duration_s": 5.0, "runs": 3, "cells": tp_cells,
            "modes": {target: modes(target) for target in ("dcp-stateless", "relay", "nats")},
        },
        "routing": {"rows": [
            {"brokers": 1, "x_bytes": 1, "x_bits": 4, "bound_bits": 65, "encode_us": 0.9, "stateless_ns": 270, "stateful_ns": 190, "ratio": 1.42},
            {"brokers": 10, "x_bytes": 80, "x_bits": 640, "bound_bits": 650, "encode_us": 12.5, "stateless_ns": 900, "stateful_ns": 200},
            {"brokers": 100, "x_bytes": 800, "x_bits": 6400, "bound_bits": 6500, "encode_us": 300.0, "stateless_ns": 7000, "stateful_ns": 210, "ratio": 33.33},
        ]},
        "targets": [
            {"goal": "p50 dcp-stateless <= 0.35 x dcp-commitlog at every size", "measured": "worst ratio 0.41 at 1 MB", "met": False},
            {"goal": "success 100 % | every interval", "measured": "lowest 99.9 %", "met": True},
        ],
    }


def tables(text: str) -> list[list[str]]:
    """The Markdown tables of a text, each as its lines."""
    blocks: list[list[str]] = []
    current: list[str] = []
    for line in text.splitlines():
        if line.startswith("|"):
            current.append(line)
        elif current:
            blocks.append(current)
            current = []
    if current:
        blocks.append(current)
    return blocks


def columns(line: str) -> int:
    return len(re.findall(r"(?<!\\)\|", line)) - 1


def svg_series(svg: str) -> tuple[int, int, ET.Element]:
    root = ET.fromstring(svg)
    polylines = root.findall(f".//{SVG}polyline")
    legend = [g for g in root.iter(f"{SVG}g") if g.get("class") == "legend-entry"]
    return len(polylines), len(legend), root


def legend_names(root: ET.Element) -> list[str]:
    return [
        "".join(g.find(f"{SVG}text").itertext())  # type: ignore[union-attr]
        for g in root.iter(f"{SVG}g") if g.get("class") == "legend-entry"
    ]


@pytest.mark.parametrize(
    ("size", "text"),
    [(10, "10 B"), (100, "100 B"), (1024, "1 KB"), (10240, "10 KB"), (65536, "64 KB"), (102400, "100 KB"), (1048576, "1 MB"), (1536, "1.5 KB")],
)
def test_sizes_in_binary_units(size: int, text: str) -> None:
    assert fmt_size(size) == text


def test_markdown_sections_and_numbers() -> None:
    text = markdown(results())
    for title in ("# dcp bench report", "## Environment", "## Figure 7: latency", "## Figure 8: success rate",
                  "## Figure 9: throughput", "## Routing cost", "## Goals"):
        assert title in text
    for link in ("![Figure 7](latency.svg)", "![Figure 8](success.svg)", "![Figure 9](throughput.svg)", "![Routing cost](routing.svg)"):
        assert link in text
    # environment
    assert "- CPUs: 2" in text and "0.50 / 0.40 / 0.30" in text and "3.11.7" in text and "Linux-6.1-x86_64" in text
    assert "`dcp-stateless` (dcp, stateless: routes by the topology number in each frame): 0.1.0" in text
    assert f"`nats` (pub/sub broker, no storage): not available ({NATS_WHY})" in text
    assert "The reference queues (`nats-jetstream`, `rabbitmq-quorum`, `redis-streams`)" in text
    assert "`dcp-commitlog` is dcp with a commit log" in text
    assert "profile `quick`" in text and "took 123.4 s" in text
    # latency: p50 / p99 (success); a skipped target's cells say so
    lat = text.split("## Figure 7")[1].split("## Figure 8")[0]
    assert "| 10 B | 180 / 900 (100.0%) | 500 / 2,500 (99.8%) | skipped |" in lat
    assert "| 1 MB | 630 / 905 (100.0%) |" in lat
    assert f"`nats` skipped: {NATS_WHY}" in lat
    # success: one table per target, percent with one decimal, 99.99 % is not rounded up to 100.0
    succ = text.split("## Figure 8")[1].split("## Figure 9")[0]
    assert "### dcp-stateless" in succ and "### dcp-commitlog" in succ and "### nats" in succ
    assert "| interval | 1 KB | 10 KB | 100 KB | 1 MB |" in succ
    assert "| 2 ms | 99.9 | 100.0 | 100.0 | 100.0 |" in succ
    assert "| 2 ms | 50.0 | 50.0 | 50.0 | 50.0 |" in succ
    assert "| 2 ms | — | — | — | skipped |" in succ
    # throughput: how each target ran, then a lossless table (a loss flagged) and a goodput table with the mode
    tp = text.split("## Figure 9")[1].split("## Routing cost")[0]
    assert "- `relay`: lossless: the subscriber registers as pausing" in tp
    assert "- `nats`: best-effort: core NATS, at most once" in tp
    lossless, goodput = tp.split("### Lossless")[1].split("### Overload and best effort: goodput")
    assert "| target | brokers | 1 KB MB/s | 1 KB delivered % | 1 KB MB/s/core | 64 KB MB/s |" in lossless
    assert "| dcp-stateless | 2 | 200.0 | 100.0 | 105.3 | 400.0 | 100.0 | 210.5 |" in lossless
    assert "| dcp-stateless | 5 | 500.0 | 97.0 ⚠ | 263.2 | 1,000.0 | 100.0 | 526.3 |" in lossless
    assert "| relay | 1 | 100.0 | 100.0 | 52.6 | skipped | skipped | skipped |" in lossless
    assert "overload" not in lossless.split("|", 1)[1]
    assert "| dcp-stateless | overload | 1 | 150.0 | 80.0 | 78.9 | 300.0 | 80.0 | 157.9 |" in goodput
    assert "| nats | best-effort | 1 | skipped | skipped | skipped | skipped | skipped | skipped |" in goodput
    assert "⚠" not in goodput  # losses are the point of overload
    assert "`relay` skipped: failed: boom | pipe second line" in tp  # a list item, not a table row
    assert "| dcp-stateless | overload | 1 | 140.0 – 155.0 | 290.0 – 305.0 |" in tp  # the spread over the runs
    # routing: the ratio is computed where a row lacks it
    routing = text.split("## Routing cost")[1].split("## Goals")[0]
    assert "| 1 | 1 | 4 | 65 | 0.9 | 270 | 190 | 1.42 |" in routing
    assert "| 10 | 80 | 640 | 650 | 12.5 | 900 | 200 | 4.50 |" in routing
    # targets: plain words
    targets = text.split("## Goals")[1]
    assert "1 of 2 goals met." in targets
    assert "| p50 dcp-stateless <= 0.35 x dcp-commitlog at every size | worst ratio 0.41 at 1 MB | missed |" in targets
    assert "| success 100 % \\| every interval | lowest 99.9 % | met |" in targets


def test_markdown_tables_are_rectangular() -> None:
    blocks = tables(markdown(results()))
    assert len(blocks) == 1 + 3 + 3 + 1 + 1  # latency, success x 3 targets, throughput x 3 (lossless, goodput, spread), routing, goals
    for block in blocks:
        widths = {columns(line) for line in block}
        assert len(widths) == 1, block
        assert re.fullmatch(r"\|(:?---:?\|)+", block[1])


def test_figures_parse_and_have_the_expected_series() -> None:
    svgs = figures(results())
    assert set(svgs) == {"latency.svg", "success.svg", "throughput.svg", "routing.svg"}
    expected = {
        # p50 of dcp-stateless and commitlog (nats skipped throughout), p99 of dcp-stateless
        "latency.svg": ["dcp-stateless p50", "dcp-commitlog p50", "dcp-stateless p99"],
        # every target at the largest size, then dcp-stateless at every other size
        "success.svg": ["dcp-stateless 1 MB", "dcp-commitlog 1 MB", "dcp-stateless 100 KB", "dcp-stateless 10 KB", "dcp-stateless 1 KB"],
        # dcp-stateless, lossless: MB/s and MB/s per core per size
        "throughput.svg": ["1 KB MB/s", "1 KB MB/s per core", "64 KB MB/s", "64 KB MB/s per core"],
        "routing.svg": ["stateless (X mod key)", "stateful (topic table lookup)"],
    }
    for name, svg in svgs.items():
        lines, entries, root = svg_series(svg)
        assert lines == entries == len(expected[name]), name
        assert legend_names(root) == expected[name]
        assert root.tag == f"{SVG}svg"
        assert root.find(f"{SVG}title") is not None
        # every point has a tooltip
        points = [e for e in root.iter() if e.get("class") == "point"]
        assert points and all(p.find(f"{SVG}title") is not None for p in points)
    tp_lines = ET.fromstring(svgs["throughput.svg"]).findall(f".//{SVG}polyline")
    assert [len(line.get("points", "").split()) for line in tp_lines] == [3, 3, 3, 3]  # brokers 1, 2, 5: no overload point
    lat_root = ET.fromstring(svgs["latency.svg"])
    labels = {"".join(t.itertext()) for t in lat_root.iter(f"{SVG}text")}
    assert {"10 B", "1 KB", "1 MB"} <= labels  # the size ticks
    # p99 of dcp-stateless is dashed, in the colour of its p50
    polylines = lat_root.findall(f".//{SVG}polyline")
    assert polylines[2].get("stroke-dasharray") and polylines[2].get("stroke") == polylines[0].get("stroke")
    assert not polylines[0].get("stroke-dasharray")
    assert polylines[0].get("stroke") != polylines[1].get("stroke")


def test_throughput_falls_back_to_another_target() -> None:
    doc = results()
    doc["throughput"]["cells"] = [c for c in doc["throughput"]["cells"] if c["target"] != "dcp-stateless"]
    svg = figures(doc)["throughput.svg"]
    lines, entries, root = svg_series(svg)
    assert lines == entries == 2  # the relay measured 1 KB only
    assert "relay" in "".join(root.find(f"{SVG}title").itertext())  # type: ignore[union-attr]


def test_chart_escapes_text_and_skips_bad_points_on_log_axes() -> None:
    svg = svg_line_chart(
        {"a <&> \"b\"": [(0, 5), (1, 0), (10, -3), (100, 50), (1000, float("nan")), (1e4, 500)], "only bad": [(0, 0), (-1, 1)], "c": [(5, 5)]},
        title="T & <t>", x_label="x & y", y_label="µs", log_x=True, log_y=True,
    )
    lines, entries, root = svg_series(svg)
    assert lines == entries == 2  # "only bad" has no point left
    assert legend_names(root) == ['a <&> "b"', "c"]
    first = root.findall(f".//{SVG}polyline")[0]
    assert len(first.get("points", "").split()) == 2  # (100, 50) and (1e4, 500)
    labels = {"".join(t.itertext()) for t in root.iter(f"{SVG}text")}
    assert {"T & <t>", "x & y", "100", "1k", "10k"} <= labels  # decade ticks


def test_chart_with_nothing_to_draw() -> None:
    for log in (False, True):
        svg = svg_line_chart({"a": [], "b": [(0, 0) if log else (float("nan"), 1)]}, title="empty", x_label="x", y_label="y", log_x=log, log_y=log)
        lines, entries, root = svg_series(svg)
        assert lines == entries == 0
        assert "no data" in {"".join(t.itertext()) for t in root.iter(f"{SVG}text")}


def test_chart_fixed_range_and_custom_ticks() -> None:
    svg = svg_line_chart(
        {"s": [(2, 100.0), (5, 50.0), (1000, 100.0)]}, title="t", x_label="ms", y_label="%",
        log_x=True, y_min=0, y_max=100, x_ticks=[(2, "2"), (5, "5"), (1000, "1000"), (0, "zero")], width=500, height=300,
    )
    root = ET.fromstring(svg)
    labels = ["".join(t.itertext()) for t in root.find(f".//{SVG}g[@class='tick-labels']").iter(f"{SVG}text")]  # type: ignore[union-attr]
    assert labels == ["2", "5", "1000", "0", "20", "40", "60", "80", "100"]
    assert root.get("width") == "500"


def test_chart_single_point_and_many_series() -> None:
    series = {f"series {i}": [(1, i + 1), (2, i + 2)] for i in range(14)}
    series["one"] = [(3, 3)]
    svg = svg_line_chart(series, title="many", x_label="x", y_label="y")
    lines, entries, root = svg_series(svg)
    assert lines == entries == 15
    dashes = [p.get("stroke-dasharray") for p in root.findall(f".//{SVG}polyline")]
    assert not any(dashes[:10]) and all(dashes[10:14])  # the palette wraps with dashes
    colours = [p.get("stroke") for p in root.findall(f".//{SVG}polyline")][:10]
    assert len(set(colours)) == 10


def test_only_latency() -> None:
    doc = {"latency": results()["latency"]}
    text = markdown(doc)
    assert "## Figure 7: latency" in text and "## Figure 8" not in text and "## Goals" not in text
    assert "No environment recorded." in text
    svgs = figures(doc)
    assert list(svgs) == ["latency.svg"]
    lines, entries, _ = svg_series(svgs["latency.svg"])
    assert lines == entries == 3  # without the environment, the targets come from the cells


def test_sections_with_every_cell_skipped_or_empty() -> None:
    doc = {
        "latency": {"sizes": [10], "cells": [{"target": "nats", "size": 10, "skipped": "down"}]},
        "success": {"cells": []},
        "throughput": {},
        "routing": {"rows": []},
        "targets": [],
    }
    text = markdown(doc)
    for block in tables(text):
        assert len({columns(line) for line in block}) == 1
    assert "| 10 B | skipped |" in text
    assert "0 of 0 goals met." in text
    for svg in figures(doc).values():
        lines, entries, _ = svg_series(svg)
        assert lines == entries == 0


def test_write(tmp_path: Path) -> None:
    doc = results()
    original = copy.deepcopy(doc)
    out = tmp_path / "run" / "nested"
    paths = write(doc, out)
    assert doc == original
    names = [p.name for p in paths]
    assert names == [
        "results.json", "report.md", "latency.svg", "success.svg", "throughput.svg", "routing.svg",
        "latency.csv", "success.csv", "throughput.csv", "routing.csv",
    ]
    assert all(p.is_file() and p.parent == out for p in paths)
    assert json.loads((out / "results.json").read_text()) == doc
    assert list(json.loads((out / "results.json").read_text())) == list(doc)  # insertion order kept
    assert (out / "report.md").read_text() == markdown(doc)
    for p in paths[2:6]:
        ET.parse(p)
    assert all((out / name).read_text() == text for name, text in csv_tables(doc).items())
    only = write({"latency": doc["latency"]}, tmp_path / "one")
    assert [p.name for p in only] == ["results.json", "report.md", "latency.svg", "latency.csv"]


def test_module_exports() -> None:
    assert {"markdown", "svg_line_chart", "figures", "csv_tables", "write"} <= set(report.__all__)


def test_notes_of_a_run_come_under_its_run_line() -> None:
    text = markdown({**results(), "notes": ["figure 8 was measured | again", "second"]})
    lines = text.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("Run: "))
    assert lines[at + 2 : at + 4] == ["Note: figure 8 was measured \\| again", "Note: second"]
    assert "Note:" not in markdown(results())


def test_a_quick_report_says_at_the_top_and_above_the_goals_that_its_verdicts_are_not_comparable() -> None:
    lines = markdown(results()).splitlines()
    assert lines[2].startswith("**Quick profile**") and "not comparable with the full profile" in lines[2]
    assert "indicative only" in lines[2] and QUICK_VERDICTS in lines[2]
    goals = lines.index("## Goals")
    assert lines[goals + 2].endswith("goals met.") and lines[goals + 4] == QUICK_VERDICTS
    full = markdown({**results(), "profile": "full"})
    assert "Quick profile" not in full and QUICK_VERDICTS not in full


def test_every_csv_row_names_the_profile_of_its_run() -> None:
    for profile in ("quick", "full"):
        for name, text in csv_tables({**results(), "profile": profile}).items():
            header, *rows = csv.reader(io.StringIO(text))
            assert header[-1] == "profile" and rows and all(row[-1] == profile for row in rows), name
    unnamed = results()
    del unnamed["profile"]
    assert all("profile" not in text for text in csv_tables(unnamed).values())


def test_csv_one_row_per_cell_with_skipped_ones_and_their_reason() -> None:
    doc = results()
    tables_ = {name: list(csv.reader(io.StringIO(text))) for name, text in csv_tables(doc).items()}
    assert list(tables_) == ["latency.csv", "success.csv", "throughput.csv", "routing.csv"]
    for name, figure in (("latency.csv", "latency"), ("success.csv", "success"), ("throughput.csv", "throughput")):
        header, *rows = tables_[name]
        assert header[-2:] == ["skipped", "profile"] and len(rows) == len(doc[figure]["cells"])
        assert all(len(row) == len(header) for row in rows)
    header, *rows = tables_["throughput.csv"]
    assert header[:4] == ["target", "mode", "brokers", "size"]
    by_key = {(r[0], r[1], r[2], r[3]): dict(zip(header, r)) for r in rows}
    assert by_key[("dcp-stateless", "lossless", "5", "1024")]["delivered"] == "0.97"
    assert by_key[("dcp-stateless", "lossless", "5", "1024")]["runs_mb_s"] == "490.0 500.0 505.0"
    assert by_key[("relay", "lossless", "1", "65536")]["skipped"] == "failed: boom | pipe\nsecond line"
    assert by_key[("relay", "lossless", "1", "65536")]["mb_s"] == ""
    header, *rows = tables_["routing.csv"]
    assert header[0] == "brokers" and "skipped" not in header and [r[0] for r in rows] == ["1", "10", "100"]
    assert rows[1][header.index("ratio")] == ""  # not computed into the data


def test_every_target_has_a_throughput_mode() -> None:
    for target in TARGETS:
        assert modes(target), target
    assert all(set(modes(t)) == {"lossless", "overload"} for t in IN_TREE if t.startswith("dcp-"))
    assert modes("relay").keys() == {"lossless"} and all(modes(q).keys() == {"lossless"} for q in QUEUES)
    assert modes("nats").keys() == {"best-effort"}


def test_plan_counts_the_steps_of_the_whole_run() -> None:
    full = PROFILES["full"]
    counted = plan(FIGURES, full, TARGETS)
    n = len(TARGETS)
    assert counted["latency"][0] == len(full.latency_sizes) * full.latency_rounds * n
    assert counted["success"][0] == n * len(full.success_sizes) * len(full.success_intervals_ms)
    # dcp-stateless: lossless x every broker count + overload; 3 other dcp targets x 2 modes; the rest once
    rows = len(full.throughput_brokers) + 1 + 3 * 2 + (n - 4)
    assert counted["throughput"][0] == rows * len(full.throughput_sizes)
    assert counted["routing"][0] == len(full.routing_sizes)
    assert all(seconds > 0 for _, seconds in counted.values())
    assert list(plan(["throughput"], full, ["relay"])) == ["throughput"]


def test_steps_number_the_lines_and_estimate_per_figure() -> None:
    now = [0.0]
    lines: list[str] = []
    steps = Steps({"latency": (3, 2.0), "throughput": (2, 10.0)}, lines.append, clock=lambda: now[0])
    steps.begin("latency")
    steps("a")  # nothing measured yet: the guesses, 3 x 2 + 2 x 10
    now[0] = 4.0
    steps("b")  # latency steps take 4 s: 2 left x 4 + 20
    now[0] = 8.0
    steps.drop(1)  # the last latency step will not run
    steps.begin("throughput")
    steps("c")
    now[0] = 74.0
    steps("d")  # 66 s for one throughput step
    assert lines == [
        "[1/5] a (elapsed 0s, ETA 26s)",
        "[2/5] b (elapsed 4s, ETA 28s)",
        "[3/4] c (elapsed 8s, ETA 20s)",
        "[4/4] d (elapsed 1m14s, ETA 1m06s)",
    ]


def verdicts_of(**p50: dict[int, float]) -> dict[str, dict[str, Any]]:
    return {v["goal"]: v for v in evaluate_targets({"latency": {"cells": [
        {"target": target.replace("_", "-"), "size": size, "p50_us": value} for target, sizes in p50.items() for size, value in sizes.items()
    ]}})}


def test_latency_goals_against_each_reference_queue_and_the_relay() -> None:
    sizes = (10, KB, 100 * KB, MB)
    got = verdicts_of(
        dcp_stateless=dict.fromkeys(sizes, 100.0), relay={10: 90.0, KB: 90.0, 100 * KB: 80.0, MB: 10.0},
        nats_jetstream=dict.fromkeys(sizes, 400.0), redis_streams={10: 400.0, MB: 200.0}, dcp_commitlog=dict.fromkeys(sizes, 300.0),
    )
    jet = next(v for goal, v in got.items() if "nats-jetstream" in goal)
    assert jet["met"] and jet["measured"] == "dcp / nats-jetstream: worst 0.25 (10 B)"
    streams = next(v for goal, v in got.items() if "redis-streams" in goal)
    assert not streams["met"] and streams["measured"] == "dcp / redis-streams: worst 0.50 (1 MB)"
    assert not any("rabbitmq-quorum" in goal for goal in got)  # not measured: no verdict
    commitlog = next(v for goal, v in got.items() if "dcp-commitlog" in goal)
    assert "not a reference queue" in commitlog["goal"] and commitlog["met"] is True
    relay = next(v for goal, v in got.items() if "1.3 x the raw relay" in goal)
    assert relay["met"] and relay["measured"] == "dcp / relay: worst 1.25 (100 KB)"  # 1 MB (10x) is beyond the goal
    flat = next(v for goal, v in got.items() if goal.startswith("flat latency"))
    assert flat["measured"] == "dcp +0 µs, relay -10 µs: the relay did not grow" and flat["met"] is True


def test_flat_latency_against_the_relays_growth() -> None:
    def flat(dcp_big: float, relay_big: float) -> dict[str, Any]:
        got = verdicts_of(dcp_stateless={10: 100.0, 100 * KB: dcp_big}, relay={10: 80.0, 100 * KB: relay_big})
        return next(v for goal, v in got.items() if goal.startswith("flat latency"))

    assert flat(200.0, 160.0) == {
        "goal": "flat latency: dcp-stateless's p50 growth from 10 B to 100 KB <= 1.3 x the raw relay's growth",
        "measured": "dcp +100 µs, relay +80 µs: 1.25 x", "met": True,
    }
    assert flat(210.0, 160.0)["met"] is False
    assert flat(101.0, 80.0)["met"] is False  # the relay did not grow: neither may dcp
    assert not any(goal.startswith("flat latency") for goal in verdicts_of(dcp_stateless={10: 1.0, 100 * KB: 2.0}))


def test_throughput_goals_judge_dcps_lossless_figure() -> None:
    def cell(target: str, mode: str, size: int, mb_s: float, brokers: int = 1) -> dict[str, Any]:
        return {"target": target, "mode": mode, "brokers": brokers, "size": size, "mb_s": mb_s, "delivered": 1.0}

    cells = [
        cell("dcp-stateless", "lossless", KB, 240.0), cell("dcp-stateless", "lossless", 128 * KB, 700.0),
        cell("dcp-stateless", "overload", KB, 900.0), cell("dcp-stateless", "overload", 128 * KB, 900.0),
        cell("dcp-stateless", "lossless", KB, 10.0, brokers=2),
        cell("relay", "lossless", KB, 280.0), cell("relay", "lossless", 128 * KB, 720.0),
        cell("zenoh", "lossless", KB, 200.0), cell("zenoh", "lossless", 128 * KB, 800.0),
        cell("nats", "best-effort", KB, 100.0), {"target": "nats", "mode": "best-effort", "brokers": 1, "size": 128 * KB, "skipped": "down"},
    ]
    got = {v["goal"]: v for v in evaluate_targets({"throughput": {"cells": cells}})}
    assert got["one broker, lossless: >= 228.0 MB/s at 1 KB (the article, 80 cores)"] == {
        "goal": "one broker, lossless: >= 228.0 MB/s at 1 KB (the article, 80 cores)", "measured": "240.0 MB/s, delivered 100.0 %", "met": True,
    }
    assert got["one broker, lossless: >= 714.6 MB/s at 128 KB (the article, 80 cores)"]["met"] is False  # overload's 900 does not count
    one_kb = got["one broker, lossless, 1 KB: dcp-stateless >= 0.8 x the raw relay's MB/s"]
    assert one_kb["met"] and one_kb["measured"] == "dcp / relay: 0.86 (1 KB)"
    big = got["one broker, lossless, 128 KB: dcp-stateless >= 0.95 x the raw relay's MB/s"]
    assert big["met"] and big["measured"] == "dcp / relay: 0.97 (128 KB)"
    assert got["one broker, 128 KB: dcp-stateless (lossless) ahead of zenoh"]["met"] is False
    zenoh = got["one broker: dcp-stateless (lossless) ahead of zenoh (lossless), every size"]
    assert zenoh["measured"] == "dcp / zenoh: worst 0.88 (128 KB)" and not zenoh["met"]
    nats = got["one broker: dcp-stateless (lossless) ahead of nats (best-effort), every size"]
    assert nats["measured"] == "dcp / nats: 2.40 (1 KB)" and nats["met"]
    assert not any("redis" in goal or "dcp-stateful" in goal or "mqtt" in goal for goal in got)  # not measured
