"""The report of a ``dcp bench`` run: Markdown tables and hand-written SVG figures.

The input is the results document the driver builds (and saves as ``results.json``):
``profile``, ``started_at``, ``duration_s``, ``environment`` and the sections
``latency`` (Figure 7), ``success`` (Figure 8), ``throughput`` (Figure 9), ``routing``,
``requests`` (request/reply round trips) and ``targets`` (the goals' verdicts).  Any section may be missing and any cell may be
skipped (a cell with a ``skipped`` reason instead of numbers); the report shows what is
there.  A throughput cell has a ``mode``: ``lossless`` (nothing may be lost), ``overload``
(dcp's default policy, which drops) or ``best-effort`` (an at-most-once broker); the
section's ``modes`` says, per target, how each mode comes about.

* :func:`markdown` -- the report as Markdown, one section and table per figure;
* :func:`svg_line_chart` -- a self-contained SVG line chart (standard library only);
* :func:`figures` -- the figures of a results document, file name -> SVG text;
* :func:`csv_tables` -- one CSV per figure, one row per cell, file name -> CSV text;
* :func:`write` -- ``results.json``, ``report.md``, the SVG and the CSV files in a folder.

Sizes are shown in binary units: 10 B, 1 KB, 100 KB, 1 MB with 1 KB = 1024 B.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeGuard

from .targets import PUBSUB, QUEUES

__all__ = ["markdown", "svg_line_chart", "figures", "csv_tables", "write", "fmt_size", "PALETTE", "DASHES", "QUICK_VERDICTS"]

PRIMARY = "dcp-stateless"
LOSSLESS, OVERLOAD, BEST_EFFORT = "lossless", "overload", "best-effort"  # a throughput cell's mode
#: What each target is, for the list of targets in the report.
ROLES = {
    "dcp-stateless": "dcp, stateless: routes by the topology number in each frame",
    "dcp-stateful": "dcp, stateful: routes by a topic table",
    "dcp-verified": "dcp-stateless with --verify-routes: every topology number signed and checked",
    "dcp-commitlog": "dcp with a commit log: the stateful broker appending every frame to disk before forwarding",
    "relay": "the raw relay: length-prefixed frames, no routing; the floor for a Python broker",
    **{name: "pub/sub broker, no storage" for name in PUBSUB},
    **{name: "reference queue: an established persistent queue" for name in QUEUES},
}
DASH = "\u2014"  # a cell with nothing measured
#: Said by a quick run's report and by ``dcp bench --quick`` above its verdicts.
QUICK_VERDICTS = (
    "Quick-profile numbers are not comparable with the full profile's, and so neither are these verdicts: "
    "the goals are set for the full profile."
)
PALETTE = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
    "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
]
DASHES = ["", "7 4", "2 3", "9 3 2 3", "14 4", "4 2 1 2"]
MARKERS = ["circle", "square", "triangle", "diamond"]

FIGURE_FILES = {"latency": "latency.svg", "success": "success.svg", "throughput": "throughput.svg", "routing": "routing.svg"}
CSV_FILES = {
    "latency": "latency.csv", "success": "success.csv", "throughput": "throughput.csv", "routing": "routing.csv",
    "requests": "requests.csv",
}


# -- numbers ---------------------------------------------------------------------------------------


def _isnum(value: Any) -> TypeGuard[float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _trim(value: float, digits: int = 2) -> str:
    text = f"{value:.{digits}f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


def fmt_size(size: Any) -> str:
    """``10 B``, ``1 KB``, ``100 KB``, ``1 MB``, ``1.5 KB`` (1 KB = 1024 B)."""
    if not _isnum(size):
        return str(size)
    for unit, scale in (("GB", 1024**3), ("MB", 1024**2), ("KB", 1024)):
        if abs(size) >= scale:
            return f"{_trim(size / scale)} {unit}"
    return f"{_trim(float(size))} B"


def _fixed(value: Any, digits: int) -> str:
    return f"{value:,.{digits}f}" if _isnum(value) else DASH


def _us(value: Any) -> str:
    """Microseconds: whole numbers from 100 up, one decimal below."""
    if not _isnum(value):
        return DASH
    return _fixed(value, 0 if abs(value) >= 100 else 1)


def _pct(fraction: Any) -> str:
    """A fraction as a percentage with one decimal; only a fraction of exactly 1 reads 100.0."""
    if not _isnum(fraction):
        return DASH
    percent = fraction * 100
    text = f"{percent:.1f}"
    if text == "100.0" and percent < 100:
        text = "99.9"
    return text


def _ms(value: Any) -> str:
    return f"{_trim(value, 3)} ms" if _isnum(value) else str(value)


# -- the document ----------------------------------------------------------------------------------


def _section(results: Mapping[str, Any], name: str) -> Mapping[str, Any] | None:
    section = results.get(name)
    return section if isinstance(section, Mapping) else None


def _cells(section: Mapping[str, Any] | None) -> list[Mapping[str, Any]]:
    if not section:
        return []
    cells = section.get("cells")
    return [c for c in cells if isinstance(c, Mapping)] if isinstance(cells, list) else []


def _routing_rows(section: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    rows = section.get("rows")
    return [r for r in rows if isinstance(r, Mapping)] if isinstance(rows, list) else []


def _measured(cells: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return [c for c in cells if "skipped" not in c]


def _index(cells: Iterable[Mapping[str, Any]], *keys: str) -> dict[tuple[Any, ...], Mapping[str, Any]]:
    return {tuple(c.get(k) for k in keys): c for c in cells}


def _axis(declared: Any, cells: Iterable[Mapping[str, Any]], key: str) -> list[Any]:
    """The declared values in their order, then any other value the cells have, sorted."""
    values: list[Any] = []
    for value in declared if isinstance(declared, list) else []:
        if value not in values:
            values.append(value)
    extra = {c.get(key) for c in cells if c.get(key) is not None and c.get(key) not in values}
    return values + sorted(extra, key=lambda v: (not _isnum(v), v if _isnum(v) else str(v)))


def _targets(results: Mapping[str, Any]) -> list[str]:
    """Every target named anywhere, in the environment's order, then in order of appearance."""
    names: list[str] = []
    env = results.get("environment")
    if isinstance(env, Mapping) and isinstance(env.get("targets"), Mapping):
        names.extend(str(t) for t in env["targets"])
    for section in ("latency", "success", "throughput"):
        for cell in _cells(_section(results, section)):
            target = cell.get("target")
            if target is not None and str(target) not in names:
                names.append(str(target))
    return names


def _section_targets(results: Mapping[str, Any], cells: Sequence[Mapping[str, Any]]) -> list[str]:
    present = {str(c.get("target")) for c in cells if c.get("target") is not None}
    return [t for t in _targets(results) if t in present]


def _colours(results: Mapping[str, Any]) -> dict[str, str]:
    """One colour per target, the same in every figure."""
    return {target: PALETTE[i % len(PALETTE)] for i, target in enumerate(_targets(results))}


# -- Markdown --------------------------------------------------------------------------------------


def _md(value: Any) -> str:
    text = re.sub(r"\s+", " ", str(value)).strip()
    return text.replace("|", "\\|") or " "


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]], left: int = 1) -> list[str]:
    """A Markdown table; the first ``left`` columns are left-aligned, the others right-aligned."""
    for row in rows:
        if len(row) != len(headers):
            raise ValueError(f"row of {len(row)} cells under {len(headers)} headers")
    lines = ["| " + " | ".join(_md(h) for h in headers) + " |"]
    lines.append("|" + "|".join(":---" if i < left else "---:" for i in range(len(headers))) + "|")
    lines.extend("| " + " | ".join(_md(v) for v in row) + " |" for row in rows)
    return lines


def _skip_notes(cells: Iterable[Mapping[str, Any]], targets: Sequence[str]) -> list[str]:
    """One line per target and distinct skip reason."""
    reasons: dict[str, list[str]] = {}
    for cell in cells:
        if "skipped" in cell:
            why = re.sub(r"\s+", " ", str(cell.get("skipped"))).strip() or "no reason given"
            seen = reasons.setdefault(str(cell.get("target")), [])
            if why not in seen:
                seen.append(why)
    order = [t for t in targets if t in reasons] + [t for t in reasons if t not in targets]
    return [f"- `{target}` skipped: {'; '.join(reasons[target])}" for target in order]


def _environment_lines(results: Mapping[str, Any]) -> list[str]:
    env = results.get("environment")
    if not isinstance(env, Mapping):
        return ["No environment recorded."]
    lines = []

    def load(value: Any) -> str:
        return " / ".join(_fixed(v, 2) for v in value) if isinstance(value, list) else str(value)

    labels = [
        ("cpu_count", "CPUs"), ("loadavg", "load average (1/5/15 min)"), ("loadavg_after", "load average after the run"),
        ("python", "Python"), ("platform", "platform"), ("dcp", "dcp"), ("uvloop", "uvloop"),
    ]
    for key, label in labels:
        if key in env:
            value = load(env[key]) if key.startswith("loadavg") else env[key]
            lines.append(f"- {label}: {_md(value)}")
    for key, value in env.items():
        if key not in dict(labels) and key != "targets" and not isinstance(value, (Mapping, list)):
            lines.append(f"- {_md(key)}: {_md(value)}")
    targets = env.get("targets")
    if isinstance(targets, Mapping) and targets:
        lines.append("- targets:")
        for name, info in targets.items():
            role = f" ({ROLES[name]})" if name in ROLES else ""
            if isinstance(info, Mapping) and info.get("available", True) and "why" not in info:
                lines.append(f"  - `{name}`{role}: {_md(info.get('version', 'available'))}")
            elif isinstance(info, Mapping):
                lines.append(f"  - `{name}`{role}: not available ({_md(info.get('why', 'no reason given'))})")
            else:
                lines.append(f"  - `{name}`{role}: {_md(info)}")
        lines += [
            "",
            f"The reference queues ({', '.join(f'`{q}`' for q in QUEUES)}) are established persistent queues, lossless "
            "by acks: the article compares dcp with a persistent queue (RocketMQ). `dcp-commitlog` is dcp with a commit "
            "log, what persistence costs dcp itself; it is not a reference queue.",
        ]
    return lines


def _latency_md(results: Mapping[str, Any], section: Mapping[str, Any]) -> list[str]:
    cells = _cells(section)
    targets = _section_targets(results, cells)
    sizes = _axis(section.get("sizes"), cells, "size")
    lines = ["## Figure 7: latency", ""]
    params = []
    if _isnum(section.get("count")):
        params.append(f"{section['count']} messages per cell")
    if _isnum(section.get("rounds")) and section["rounds"] > 1:
        params.append(f"in {section['rounds']} rounds that take the targets in turn (rotating order)")
    if _isnum(section.get("warmup")):
        params.append(f"each after {section['warmup']} warm-up messages")
    if _isnum(section.get("interval_ms")):
        params.append(f"one every {_ms(section['interval_ms'])}")
    lead = (", ".join(params) + ". ") if params else ""
    lines += [f"{lead}Each cell: p50 / p99 latency in µs (success rate, %).", ""]
    index = _index(cells, "target", "size")
    rows = []
    for size in sizes:
        row = [fmt_size(size)]
        for target in targets:
            cell = index.get((target, size))
            if cell is None:
                row.append(DASH)
            elif "skipped" in cell:
                row.append("skipped")
            else:
                row.append(f"{_us(cell.get('p50_us'))} / {_us(cell.get('p99_us'))} ({_pct(cell.get('success'))}%)")
        rows.append(row)
    lines += _table(["size", *targets], rows)
    notes = _skip_notes(cells, targets)
    lines += ([""] + notes if notes else []) + ["", "![Figure 7](latency.svg)"]
    return lines


def _success_md(results: Mapping[str, Any], section: Mapping[str, Any]) -> list[str]:
    cells = _cells(section)
    targets = _section_targets(results, cells)
    sizes = _axis(section.get("sizes"), cells, "size")
    intervals = _axis(section.get("intervals_ms"), cells, "interval_ms")
    lines = ["## Figure 8: success rate", ""]
    per = f" for {_trim(section['cell_s'], 3)} s per cell" if _isnum(section.get("cell_s")) else ""
    lines += [f"Messages received, in % of those sent, per send interval and size{per}.", ""]
    index = _index(cells, "target", "size", "interval_ms")
    for target in targets:
        lines += [f"### {target}", ""]
        rows = []
        for interval in intervals:
            row = [_ms(interval)]
            for size in sizes:
                cell = index.get((target, size, interval))
                row.append(DASH if cell is None else "skipped" if "skipped" in cell else _pct(cell.get("success")))
            rows.append(row)
        lines += _table(["interval", *(fmt_size(s) for s in sizes)], rows)
        notes = _skip_notes([c for c in cells if str(c.get("target")) == target], [target])
        lines += ([""] + notes if notes else []) + [""]
    if not targets:
        lines += ["No cells.", ""]
    lines.append("![Figure 8](success.svg)")
    return lines


def _throughput_md(results: Mapping[str, Any], section: Mapping[str, Any]) -> list[str]:
    cells = _cells(section)
    targets = _section_targets(results, cells)
    sizes = _axis(section.get("sizes"), cells, "size")
    lines = ["## Figure 9: throughput", ""]
    per = f" for {_trim(section['duration_s'], 3)} s per cell" if _isnum(section.get("duration_s")) else ""
    runs = section.get("runs")
    median = (
        f" Each cell is the run of median MB/s out of {runs}; the spread of MB/s over the runs is in the last table."
        if _isnum(runs) and runs > 1 else ""
    )
    lines += [
        f"N brokers, each with its own publisher and subscriber sending as fast as flow control allows{per}: "
        f"delivered MB/s (goodput) over the set, the delivered fraction (%), and MB/s per CPU core used.{median}",
        "",
    ]
    modes = section.get("modes")
    if isinstance(modes, Mapping) and modes:
        grouped: dict[str, list[str]] = {}  # the targets that run the same way share a line
        for target, how in modes.items():
            text = "; ".join(f"{mode}: {why}" for mode, why in how.items()) if isinstance(how, Mapping) else str(how)
            grouped.setdefault(text, []).append(f"`{target}`")
        lines += ["How each target ran:", "", *(f"- {', '.join(names)}: {_md(text)}" for text, names in grouped.items()), ""]
    lines += [
        "### Lossless", "",
        "⚠ marks a cell that lost messages all the same.",
        "", *_mode_table([c for c in cells if c.get("mode") == LOSSLESS], sizes, show_mode=False),
        "", "### Overload and best effort: goodput", "",
        "What reached the subscriber when nothing holds the publisher back, and the fraction of what was sent.",
        "", *_mode_table([c for c in cells if c.get("mode") != LOSSLESS], sizes, show_mode=True),
    ]
    notes = _skip_notes(cells, targets)
    lines += [""] + notes if notes else []
    lines += _spread_md(cells, sizes)
    lines += ["", "![Figure 9](throughput.svg)"]
    return lines


def _row_keys(cells: Iterable[Mapping[str, Any]]) -> list[tuple[Any, Any, Any]]:
    """(target, mode, brokers) of each row of a throughput table, in the order of the cells."""
    return list(dict.fromkeys((c.get("target"), c.get("mode"), c.get("brokers")) for c in cells))


def _mode_table(cells: Sequence[Mapping[str, Any]], sizes: Sequence[Any], show_mode: bool) -> list[str]:
    """Throughput cells as rows of target (mode) and brokers, and per size MB/s, delivered % and MB/s per core."""
    if not cells:
        return ["No cells."]
    index = _index(cells, "target", "mode", "brokers", "size")
    rows = []
    for target, mode, n in _row_keys(cells):
        row = [str(target), *([DASH if mode is None else str(mode)] if show_mode else []), str(n)]
        for size in sizes:
            cell = index.get((target, mode, n, size))
            if cell is None:
                row += [DASH] * 3
            elif "skipped" in cell:
                row += ["skipped"] * 3
            else:
                delivered = cell.get("delivered")
                lost = mode == LOSSLESS and _isnum(delivered) and delivered < 1
                row += [_fixed(cell.get("mb_s"), 1), _pct(delivered) + (" ⚠" if lost else ""), _fixed(cell.get("mb_s_per_core"), 1)]
        rows.append(row)
    headers = ["target", *(["mode"] if show_mode else []), "brokers"]
    for size in sizes:
        headers += [f"{fmt_size(size)} MB/s", f"{fmt_size(size)} delivered %", f"{fmt_size(size)} MB/s/core"]
    return _table(headers, rows, left=len(headers) - 3 * len(sizes))


def _spread_md(cells: Sequence[Mapping[str, Any]], sizes: Sequence[Any]) -> list[str]:
    """The lowest and highest MB/s over the runs of each cell, when a cell ran more than once."""
    def spread(cell: Mapping[str, Any] | None) -> str:
        runs = cell.get("runs_mb_s") if cell is not None else None
        if not isinstance(runs, list) or not runs or not all(_isnum(r) for r in runs):
            return DASH
        return f"{_fixed(min(runs), 1)} – {_fixed(max(runs), 1)}"

    if not any(isinstance(c.get("runs_mb_s"), list) and len(c["runs_mb_s"]) > 1 for c in cells):
        return []
    index = _index(cells, "target", "mode", "brokers", "size")
    rows = []
    for target, mode, n in _row_keys(cells):
        row = [str(target), DASH if mode is None else str(mode), str(n), *(spread(index.get((target, mode, n, size))) for size in sizes)]
        if any(value != DASH for value in row[3:]):
            rows.append(row)
    headers = ["target", "mode", "brokers", *(fmt_size(s) for s in sizes)]
    return ["", "MB/s over the runs of each cell, lowest – highest:", "", *_table(headers, rows, left=3)]


def _verification_md(results: Mapping[str, Any]) -> list[str]:
    """dcp-verified (--verify-routes) next to dcp-stateless: what route authentication costs."""
    pairs = []  # (what, size, stateless value, verified value)
    latency = _index(_measured(_cells(_section(results, "latency"))), "target", "size")
    for (target, size), cell in latency.items():
        other = latency.get(("dcp-verified", size))
        if target == "dcp-stateless" and other is not None:
            pairs.append(("p50 latency, µs", size, cell.get("p50_us"), other.get("p50_us")))
    throughput = _index(_measured(_cells(_section(results, "throughput"))), "target", "mode", "brokers", "size")
    for (target, mode, brokers, size), cell in throughput.items():
        other = throughput.get(("dcp-verified", mode, brokers, size))
        if target == "dcp-stateless" and brokers == 1 and other is not None:
            pairs.append((f"one broker, {mode}, MB/s", size, cell.get("mb_s"), other.get("mb_s")))
    if not pairs:
        return []
    rows = [
        [what, fmt_size(size), _fixed(plain, 1), _fixed(verified, 1),
         _fixed(verified / plain, 2) if _isnum(plain) and _isnum(verified) and plain else DASH]
        for what, size, plain, verified in pairs
    ]
    return [
        "## Route verification cost", "",
        "The same measurements with every topology number signed and checked (`dcp-verified`: "
        "`--verify-routes`) and without (`dcp-stateless`); ratio = verified / stateless.", "",
        *_table(["measure", "size", "dcp-stateless", "dcp-verified", "ratio"], rows, left=2), "",
    ]


def _ratio(row: Mapping[str, Any]) -> Any:
    if _isnum(row.get("ratio")):
        return row["ratio"]
    a, b = row.get("stateless_ns"), row.get("stateful_ns")
    return a / b if _isnum(a) and _isnum(b) and b else None


def _routing_md(section: Mapping[str, Any]) -> list[str]:
    rows_in = _routing_rows(section)
    lines = [
        "## Routing cost",
        "",
        "The topology number X per tree of N brokers (bytes, bits, and the bound: the bits of every key), "
        "the orchestrator's encode time, and one forward decision: stateless (X mod key) "
        "vs stateful (a topic table lookup), in ns; ratio = stateless / stateful.",
        "",
    ]
    rows = [
        [
            str(r.get("brokers", DASH)), _fixed(r.get("x_bytes"), 0), _fixed(r.get("x_bits"), 0), _fixed(r.get("bound_bits"), 0),
            _fixed(r.get("encode_us"), 1), _fixed(r.get("stateless_ns"), 0), _fixed(r.get("stateful_ns"), 0), _fixed(_ratio(r), 2),
        ]
        for r in rows_in
    ]
    headers = ["brokers", "X bytes", "X bits", "bound bits", "encode µs", "stateless ns", "stateful ns", "ratio"]
    lines += _table(headers, rows, left=0)
    lines += ["", "![Routing cost](routing.svg)"]
    return lines


def _requests_md(section: Mapping[str, Any]) -> list[str]:
    cells = _cells(section)
    lines = ["## Request/reply", ""]
    if _isnum(section.get("count")):
        lines += [
            f"{section['count']} requests per cell, one after another, after {section.get('warmup', 0)} warm-up ones; "
            "the round trip in µs. dcp: `agent.request` to a responder agent on the same broker (1) or on a linked one "
            "(2: the request and the reply each cross the link); nats: `nc.request` to a responder on the server.",
            "",
        ]
    rows = [
        [str(c.get("target", DASH)), str(c.get("brokers", DASH)), "skipped", DASH, DASH, DASH] if "skipped" in c else
        [str(c.get("target", DASH)), str(c.get("brokers", DASH)), fmt_size(c["size"]) if _isnum(c.get("size")) else DASH,
         _us(c.get("p50_us")), _us(c.get("p99_us")), _us(c.get("max_us"))]
        for c in cells
    ]
    lines += _table(["target", "brokers", "size", "p50 µs", "p99 µs", "max µs"], rows, left=1)
    notes = _skip_notes(cells, sorted({str(c.get("target")) for c in cells}))
    return lines + ([""] + notes if notes else [])


def _goals_md(verdicts: list[Any], quick: bool) -> list[str]:
    items = [v for v in verdicts if isinstance(v, Mapping)]
    met = sum(1 for v in items if v.get("met") is True)
    lines = ["## Goals", "", f"{met} of {len(items)} goals met.", ""]
    if quick:  # said again where the verdicts are, for a reader who skipped the top
        lines += [QUICK_VERDICTS, ""]
    rows = [
        [v.get("goal", DASH), v.get("measured", DASH), "met" if v.get("met") is True else "missed" if v.get("met") is False else DASH]
        for v in items
    ]
    return lines + _table(["goal", "measured", "met"], rows, left=3)


def markdown(results: Mapping[str, Any]) -> str:
    """The report of a results document as Markdown; sections that are missing are left out."""
    quick = results.get("profile") == "quick"
    lines = ["# dcp bench report", ""]
    if quick:
        lines += [f"**Quick profile**: few and short cells, indicative only. {QUICK_VERDICTS}", ""]
    facts = []
    if results.get("profile") is not None:
        facts.append(f"profile `{_md(results['profile'])}`")
    if results.get("started_at") is not None:
        facts.append(f"started {_md(results['started_at'])}")
    if _isnum(results.get("duration_s")):
        facts.append(f"took {_trim(results['duration_s'], 1)} s")
    if facts:
        lines += ["Run: " + ", ".join(facts) + ".", ""]
    notes = results.get("notes")
    if isinstance(notes, list) and notes:  # what happened to this run that its numbers do not say
        lines += [*(f"Note: {_md(note)}" for note in notes), ""]
    lines += ["## Environment", "", *_environment_lines(results), ""]
    for name, render in (("latency", _latency_md), ("success", _success_md), ("throughput", _throughput_md)):
        section = _section(results, name)
        if section is not None:
            lines += render(results, section) + [""]
    lines += _verification_md(results)
    routing = _section(results, "routing")
    if routing is not None:
        lines += _routing_md(routing) + [""]
    requests = _section(results, "requests")
    if requests is not None:
        lines += _requests_md(requests) + [""]
    if isinstance(results.get("targets"), list):
        lines += _goals_md(results["targets"], quick) + [""]
    return "\n".join(lines).rstrip("\n") + "\n"


# -- SVG -------------------------------------------------------------------------------------------

_BAD_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


def _esc(value: Any) -> str:
    text = _BAD_XML.sub("", str(value))
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


def _n(value: float) -> str:
    """A coordinate, two decimals at most."""
    return _trim(value, 2) if value == value else "0"


def _g(value: float) -> str:
    text = f"{value:.6g}"
    return text.rstrip("0").rstrip(".") if "." in text and "e" not in text else text


def _tick_label(value: float, compact: bool = True) -> str:
    """A tick label: 1k, 10k, 1M on a log axis (``compact``), 1,000 on a linear one."""
    if value == 0:
        return "0"
    if not compact and abs(value) < 1e6:
        return f"{value:,.0f}" if abs(value) >= 1000 and value == int(value) else _g(value)
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return _g(value / scale) + suffix
    return _g(value)


def _nice_step(span: float, count: int = 6) -> float:
    raw = span / count
    magnitude = 10 ** math.floor(math.log10(raw))
    for m in (1, 2, 2.5, 5, 10):
        if span / (m * magnitude) <= count:
            return m * magnitude
    return 10 * magnitude


def _linear_ticks(lo: float, hi: float) -> list[float]:
    step = _nice_step(hi - lo)
    first, last = math.ceil(lo / step - 1e-9), math.floor(hi / step + 1e-9)
    return [round(k * step, 12) for k in range(first, last + 1)]


def _log_ticks(lo: float, hi: float) -> tuple[list[float], list[float]]:
    """Major ticks (decades, thinned to 8 at most; 1-2-5 where fewer than 2 decades fit) and minor ones."""
    k0, k1 = math.ceil(math.log10(lo) - 1e-9), math.floor(math.log10(hi) + 1e-9)
    decades = [10.0**k for k in range(k0, k1 + 1)]
    if len(decades) >= 2:
        step = max(1, math.ceil(len(decades) / 8))
        minor: list[float] = []
        if step == 1:
            minor = [m * 10.0**k for k in range(k0 - 1, k1 + 1) for m in range(2, 10) if lo <= m * 10.0**k <= hi]
        return decades[::step], minor
    lo_k, hi_k = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    for mults in ((1, 2, 5), range(1, 10)):
        ticks = sorted(m * 10.0**k for k in range(lo_k, hi_k + 1) for m in mults if lo * (1 - 1e-9) <= m * 10.0**k <= hi * (1 + 1e-9))
        if len(ticks) >= 2:
            return ticks, []
    return [lo, hi], []


def _domain(values: list[float], log: bool, lo_fixed: float | None, hi_fixed: float | None, pad_only: bool) -> tuple[float, float]:
    """The range of an axis: the data (and fixed ticks), widened to decades on a log axis and to
    round values on a linear one, or only padded a little when ``pad_only``; ``lo_fixed`` and
    ``hi_fixed`` (ignored where unusable: not positive on a log axis, or the wrong way round) stay."""

    def usable(value: float | None) -> bool:
        return _isnum(value) and (not log or value > 0)

    lo_fixed = lo_fixed if usable(lo_fixed) else None
    hi_fixed = hi_fixed if usable(hi_fixed) else None
    if lo_fixed is not None and hi_fixed is not None and hi_fixed <= lo_fixed:
        lo_fixed = hi_fixed = None
    default = (1.0, 10.0) if log else (0.0, 1.0)
    lo = lo_fixed if lo_fixed is not None else min(values) if values else default[0]
    hi = hi_fixed if hi_fixed is not None else max(values) if values else default[1]
    if hi <= lo:  # one value, or every value beyond a fixed bound
        widen = max(abs(lo) * 0.1, 1.0)
        if lo_fixed is None and hi_fixed is None:
            lo, hi = (lo / math.sqrt(10), hi * math.sqrt(10)) if log else (lo - widen, hi + widen)
        elif hi_fixed is None:
            hi = lo * 10 if log else lo + widen
        else:
            lo = hi / 10 if log else hi - max(abs(hi) * 0.1, 1.0)
    if log:
        a, b = math.log10(lo), math.log10(hi)
        if pad_only:
            pad = max((b - a) * 0.04, 0.03)
            a, b = (a if lo_fixed is not None else a - pad), (b if hi_fixed is not None else b + pad)
        else:
            a = a if lo_fixed is not None else math.floor(a + 1e-9)
            b = b if hi_fixed is not None else math.ceil(b - 1e-9)
            b = b if b > a else a + 1
        return 10**a, 10**b
    if pad_only:
        pad = (hi - lo) * 0.04
        return (lo if lo_fixed is not None else lo - pad), (hi if hi_fixed is not None else hi + pad)
    step = _nice_step(hi - lo)
    if lo_fixed is None:
        lo = math.floor(lo / step + 1e-9) * step
    if hi_fixed is None:
        hi = math.ceil(hi / step - 1e-9) * step
    return lo, hi


def _scale(lo: float, hi: float, a: float, b: float, log: bool) -> Callable[[float], float]:
    if log:
        lo, hi = math.log10(lo), math.log10(hi)
    span = (hi - lo) or 1.0

    def to(value: float) -> float:
        v = math.log10(value) if log else value
        return a + (v - lo) / span * (b - a)

    return to


def _marker(shape: str, x: float, y: float, colour: str, tip: str) -> str:
    r = 3.5
    common = f'fill="{colour}" stroke="#ffffff" stroke-width="0.8" class="point"'
    title = f"<title>{_esc(tip)}</title>"
    if shape == "square":
        return f'<rect x="{_n(x - r)}" y="{_n(y - r)}" width="{_n(2 * r)}" height="{_n(2 * r)}" {common}>{title}</rect>'
    if shape == "triangle":
        pts = f"{_n(x)},{_n(y - r * 1.2)} {_n(x + r * 1.1)},{_n(y + r * 0.8)} {_n(x - r * 1.1)},{_n(y + r * 0.8)}"
        return f'<polygon points="{pts}" {common}>{title}</polygon>'
    if shape == "diamond":
        pts = f"{_n(x)},{_n(y - r * 1.3)} {_n(x + r * 1.1)},{_n(y)} {_n(x)},{_n(y + r * 1.3)} {_n(x - r * 1.1)},{_n(y)}"
        return f'<polygon points="{pts}" {common}>{title}</polygon>'
    return f'<circle cx="{_n(x)}" cy="{_n(y)}" r="{_n(r)}" {common}>{title}</circle>'


def svg_line_chart(
    series: Mapping[str, Sequence[tuple[float, float]]],
    *,
    title: str,
    x_label: str,
    y_label: str,
    log_x: bool = False,
    log_y: bool = False,
    width: int = 720,
    height: int = 420,
    y_min: float | None = None,
    y_max: float | None = None,
    x_ticks: Sequence[tuple[float, str]] | None = None,
    styles: Mapping[str, Mapping[str, str]] | None = None,
    x_format: Callable[[float], str] | None = None,
    y_format: Callable[[float], str] | None = None,
) -> str:
    """A self-contained SVG line chart, one polyline with markers per series, and a legend below.

    Points that are not finite numbers, or not positive on a log axis, are left out; a
    series with no point left is not drawn and not in the legend.  Series are sorted by x.
    ``styles`` may give a series its ``color``, ``dash`` (an SVG dash array, "" for solid)
    and ``marker`` (circle, square, triangle, diamond); by default the i-th series takes the
    i-th colour of :data:`PALETTE`, solid lines for the first ten, then dash patterns.
    ``x_ticks`` replaces the automatic x ticks (value, label); ``x_format``/``y_format``
    format the values in the point tooltips.
    """
    styles = styles or {}
    clean: dict[str, list[tuple[float, float]]] = {}
    for name, points in series.items():
        good = []
        for point in points:
            try:
                x, y = float(point[0]), float(point[1])
            except (TypeError, ValueError, IndexError):
                continue
            if not (math.isfinite(x) and math.isfinite(y)) or (log_x and x <= 0) or (log_y and y <= 0):
                continue
            good.append((x, y))
        if good:
            clean[str(name)] = sorted(good, key=lambda p: p[0])

    fx = x_format or _g
    fy = y_format or _g
    font_w = 6.6
    left, right, top = 74, 24, 46
    names = list(clean)
    entry_w = 44 + font_w * max((len(n) for n in names), default=0)
    columns = max(1, int((width - left - right) // entry_w)) if names else 1
    legend_rows = math.ceil(len(names) / columns) if names else 0
    legend_h = legend_rows * 18 + (8 if names else 0)
    height = max(height, top + 140 + 52 + legend_h)
    px0, px1 = left, width - right
    py0, py1 = top, height - 52 - legend_h

    tick_values = [float(v) for v, _ in (x_ticks or []) if _isnum(v) and (not log_x or v > 0)]
    xs = [x for pts in clean.values() for x, _ in pts]
    ys = [y for pts in clean.values() for _, y in pts]
    x_lo, x_hi = _domain(xs + tick_values, log_x, None, None, pad_only=bool(tick_values))
    y_lo, y_hi = _domain(ys, log_y, y_min, y_max, pad_only=False)
    to_x = _scale(x_lo, x_hi, px0, px1, log_x)
    to_y = _scale(y_lo, y_hi, py1, py0, log_y)

    def inside(value: float, lo: float, hi: float) -> bool:
        return lo * (1 - 1e-9) - 1e-12 <= value <= hi * (1 + 1e-9) + 1e-12 if lo > 0 else lo - 1e-12 <= value <= hi + 1e-12

    if tick_values:
        x_major = [(float(v), str(label)) for v, label in (x_ticks or []) if _isnum(v) and (not log_x or v > 0) and inside(float(v), x_lo, x_hi)]
        x_minor: list[float] = []
    elif log_x:
        major, x_minor = _log_ticks(x_lo, x_hi)
        x_major = [(v, _tick_label(v)) for v in major]
    else:
        x_major, x_minor = [(v, _tick_label(v, False)) for v in _linear_ticks(x_lo, x_hi)], []
    if log_y:
        major, y_minor = _log_ticks(y_lo, y_hi)
    else:
        major, y_minor = _linear_ticks(y_lo, y_hi), []
    y_major = [(v, _tick_label(v, log_y)) for v in major if inside(v, y_lo, y_hi)]

    clip = f"plot-{zlib.crc32(('|'.join([title, *names])).encode()):08x}"
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
        'font-family="Helvetica, Arial, sans-serif" font-size="12" role="img">',
        f"<title>{_esc(title)}</title>",
        f'<defs><clipPath id="{clip}"><rect x="{px0 - 6}" y="{py0 - 6}" width="{px1 - px0 + 12}" height="{_n(py1 - py0 + 12)}"/></clipPath></defs>',
        f'<rect x="0" y="0" width="{width}" height="{height}" fill="#ffffff"/>',
        '<g class="grid" stroke-width="1" fill="none">',
    ]
    for v in x_minor:
        out.append(f'<line x1="{_n(to_x(v))}" y1="{py0}" x2="{_n(to_x(v))}" y2="{_n(py1)}" stroke="#f0f0f0"/>')
    for v in y_minor:
        out.append(f'<line x1="{px0}" y1="{_n(to_y(v))}" x2="{px1}" y2="{_n(to_y(v))}" stroke="#f0f0f0"/>')
    for v, _ in x_major:
        out.append(f'<line x1="{_n(to_x(v))}" y1="{py0}" x2="{_n(to_x(v))}" y2="{_n(py1)}" stroke="#dddddd"/>')
    for v, _ in y_major:
        out.append(f'<line x1="{px0}" y1="{_n(to_y(v))}" x2="{px1}" y2="{_n(to_y(v))}" stroke="#dddddd"/>')
    out.append("</g>")
    out.append(f'<rect class="frame" x="{px0}" y="{py0}" width="{px1 - px0}" height="{_n(py1 - py0)}" fill="none" stroke="#888888"/>')
    out.append('<g class="axes" stroke="#333333" stroke-width="1">')
    out.append(f'<line x1="{px0}" y1="{_n(py1)}" x2="{px1}" y2="{_n(py1)}"/>')
    out.append(f'<line x1="{px0}" y1="{py0}" x2="{px0}" y2="{_n(py1)}"/>')
    for v, _ in x_major:
        out.append(f'<line x1="{_n(to_x(v))}" y1="{_n(py1)}" x2="{_n(to_x(v))}" y2="{_n(py1 + 5)}"/>')
    for v, _ in y_major:
        out.append(f'<line x1="{px0 - 5}" y1="{_n(to_y(v))}" x2="{px0}" y2="{_n(to_y(v))}"/>')
    out.append("</g>")
    out.append('<g class="tick-labels" fill="#333333">')
    for v, label in x_major:
        out.append(f'<text x="{_n(to_x(v))}" y="{_n(py1 + 18)}" text-anchor="middle">{_esc(label)}</text>')
    for v, label in y_major:
        out.append(f'<text x="{px0 - 8}" y="{_n(to_y(v))}" dy="0.32em" text-anchor="end">{_esc(label)}</text>')
    out.append("</g>")
    out.append(f'<text class="chart-title" x="{_n(width / 2)}" y="26" text-anchor="middle" font-size="15" font-weight="bold">{_esc(title)}</text>')
    out.append(f'<text class="x-label" x="{_n((px0 + px1) / 2)}" y="{_n(py1 + 38)}" text-anchor="middle">{_esc(x_label)}</text>')
    mid = (py0 + py1) / 2
    out.append(f'<text class="y-label" x="18" y="{_n(mid)}" text-anchor="middle" transform="rotate(-90 18 {_n(mid)})">{_esc(y_label)}</text>')

    resolved = []
    for i, name in enumerate(names):
        style = styles.get(name, {})
        colour = style.get("color") or PALETTE[i % len(PALETTE)]
        dash = style.get("dash")
        dash = DASHES[(i // len(PALETTE)) % len(DASHES)] if dash is None else dash
        marker = style.get("marker") or MARKERS[i % len(MARKERS)]
        resolved.append((name, colour, dash, marker))

    if not names:
        out.append(f'<text class="no-data" x="{_n((px0 + px1) / 2)}" y="{_n(mid)}" text-anchor="middle" fill="#888888">no data</text>')
    for name, colour, dash, marker in resolved:
        points = clean[name]
        coords = " ".join(f"{_n(to_x(x))},{_n(to_y(y))}" for x, y in points)
        dash_attr = f' stroke-dasharray="{_esc(dash)}"' if dash else ""
        out.append(f'<g class="series" clip-path="url(#{clip})">')
        out.append(f'<polyline class="line" points="{coords}" fill="none" stroke="{_esc(colour)}" stroke-width="2"{dash_attr} stroke-linejoin="round"><title>{_esc(name)}</title></polyline>')
        for x, y in points:
            out.append(_marker(marker, to_x(x), to_y(y), _esc(colour), f"{name}: {fx(x)}, {fy(y)}"))
        out.append("</g>")

    if names:
        out.append('<g class="legend">')
        legend_top = py1 + 52 + 4
        for i, (name, colour, dash, marker) in enumerate(resolved):
            col, row = i % columns, i // columns
            lx, ly = px0 + col * entry_w, legend_top + row * 18
            dash_attr = f' stroke-dasharray="{_esc(dash)}"' if dash else ""
            out.append('<g class="legend-entry">')
            out.append(f'<line x1="{_n(lx)}" y1="{_n(ly)}" x2="{_n(lx + 30)}" y2="{_n(ly)}" stroke="{_esc(colour)}" stroke-width="2"{dash_attr}/>')
            out.append(_marker(marker, lx + 15, ly, _esc(colour), name))
            out.append(f'<text x="{_n(lx + 36)}" y="{_n(ly)}" dy="0.32em">{_esc(name)}</text>')
            out.append("</g>")
        out.append("</g>")
    out.append("</svg>")
    return "\n".join(out) + "\n"


# -- the figures -----------------------------------------------------------------------------------


def _points(cells: Iterable[Mapping[str, Any]], x: str, y: str, scale: float = 1.0, **where: Any) -> list[tuple[float, float]]:
    return [
        (c[x], c[y] * scale)
        for c in cells
        if all(c.get(k) == v for k, v in where.items()) and _isnum(c.get(x)) and _isnum(c.get(y))
    ]


def _latency_svg(results: Mapping[str, Any], section: Mapping[str, Any]) -> str:
    cells = _measured(_cells(section))
    colours = _colours(results)
    sizes = [s for s in _axis(section.get("sizes"), _cells(section), "size") if _isnum(s)]
    series: dict[str, list[tuple[float, float]]] = {}
    styles: dict[str, dict[str, str]] = {}
    for target in _section_targets(results, cells):
        series[f"{target} p50"] = _points(cells, "size", "p50_us", target=target)
        styles[f"{target} p50"] = {"color": colours[target], "dash": ""}
    if PRIMARY in colours:
        series[f"{PRIMARY} p99"] = _points(cells, "size", "p99_us", target=PRIMARY)
        styles[f"{PRIMARY} p99"] = {"color": colours[PRIMARY], "dash": DASHES[1], "marker": "square"}
    return svg_line_chart(
        series, title="Figure 7: latency vs message size (p50; dashed: p99)", x_label="message size",
        y_label="latency (µs)", log_x=True, log_y=True, x_ticks=[(s, fmt_size(s)) for s in sizes],
        styles=styles, x_format=fmt_size, y_format=lambda v: f"{_us(v)} µs",
    )


def _success_svg(results: Mapping[str, Any], section: Mapping[str, Any]) -> str:
    cells = _measured(_cells(section))
    colours = _colours(results)
    intervals = [i for i in _axis(section.get("intervals_ms"), _cells(section), "interval_ms") if _isnum(i)]
    sizes = sorted({c["size"] for c in cells if _isnum(c.get("size")) and _isnum(c.get("success"))})
    series: dict[str, list[tuple[float, float]]] = {}
    styles: dict[str, dict[str, str]] = {}
    if sizes:
        largest = sizes[-1]
        for target in _section_targets(results, cells):
            name = f"{target} {fmt_size(largest)}"
            series[name] = _points(cells, "interval_ms", "success", 100.0, target=target, size=largest)
            styles[name] = {"color": colours[target], "dash": ""}
        for j, size in enumerate(s for s in reversed(sizes[:-1])):
            name = f"{PRIMARY} {fmt_size(size)}"
            series[name] = _points(cells, "interval_ms", "success", 100.0, target=PRIMARY, size=size)
            styles[name] = {
                "color": colours.get(PRIMARY, PALETTE[0]), "dash": DASHES[1 + j % (len(DASHES) - 1)], "marker": MARKERS[(j + 1) % len(MARKERS)],
            }
    return svg_line_chart(
        series, title="Figure 8: success rate vs send interval", x_label="send interval (ms)", y_label="success (%)",
        log_x=True, y_min=0, y_max=100, x_ticks=[(i, _g(i)) for i in intervals], styles=styles,
        x_format=lambda v: f"every {_g(v)} ms", y_format=lambda v: f"{_g(round(v, 2))} %",
    )


def _throughput_svg(results: Mapping[str, Any], section: Mapping[str, Any]) -> str:
    cells = [c for c in _measured(_cells(section)) if c.get("mode") == LOSSLESS]
    with_data = [t for t in _section_targets(results, cells) if _points(cells, "brokers", "mb_s", target=t)]
    target = PRIMARY if PRIMARY in with_data else (with_data[0] if with_data else PRIMARY)
    mine = [c for c in cells if c.get("target") == target]
    brokers = [b for b in _axis(section.get("brokers"), _cells(section), "brokers") if _isnum(b)]
    sizes = sorted({c["size"] for c in mine if _isnum(c.get("size"))})
    series: dict[str, list[tuple[float, float]]] = {}
    styles: dict[str, dict[str, str]] = {}
    for j, size in enumerate(sizes):
        colour = PALETTE[j % len(PALETTE)]
        series[f"{fmt_size(size)} MB/s"] = _points(mine, "brokers", "mb_s", size=size)
        styles[f"{fmt_size(size)} MB/s"] = {"color": colour, "dash": ""}
        series[f"{fmt_size(size)} MB/s per core"] = _points(mine, "brokers", "mb_s_per_core", size=size)
        styles[f"{fmt_size(size)} MB/s per core"] = {"color": colour, "dash": DASHES[1], "marker": "square"}
    return svg_line_chart(
        series, title=f"Figure 9: lossless throughput of {target} vs brokers (dashed: MB/s per core)", x_label="brokers",
        y_label="delivered MB/s", log_x=True, y_min=0, x_ticks=[(b, _g(b)) for b in brokers], styles=styles,
        x_format=lambda v: f"{_g(v)} broker(s)", y_format=lambda v: f"{_fixed(v, 1)} MB/s",
    )


def _routing_svg(section: Mapping[str, Any]) -> str:
    rows = _routing_rows(section)
    brokers = sorted({r["brokers"] for r in rows if _isnum(r.get("brokers")) and r["brokers"] > 0})
    series = {
        "stateless (X mod key)": _points(rows, "brokers", "stateless_ns"),
        "stateful (topic table lookup)": _points(rows, "brokers", "stateful_ns"),
    }
    return svg_line_chart(
        series, title="Routing cost: one forward decision vs brokers in the tree", x_label="brokers in the tree",
        y_label="ns per decision", log_x=True, log_y=True, x_ticks=[(b, _g(b)) for b in brokers],
        x_format=lambda v: f"{_g(v)} broker(s)", y_format=lambda v: f"{_fixed(v, 0)} ns",
    )


def figures(results: Mapping[str, Any]) -> dict[str, str]:
    """File name -> SVG text, one per section of the results that is there (``latency.svg``,
    ``success.svg``, ``throughput.svg``, ``routing.svg``)."""
    out: dict[str, str] = {}
    latency = _section(results, "latency")
    if latency is not None:
        out[FIGURE_FILES["latency"]] = _latency_svg(results, latency)
    success = _section(results, "success")
    if success is not None:
        out[FIGURE_FILES["success"]] = _success_svg(results, success)
    throughput = _section(results, "throughput")
    if throughput is not None:
        out[FIGURE_FILES["throughput"]] = _throughput_svg(results, throughput)
    routing = _section(results, "routing")
    if routing is not None:
        out[FIGURE_FILES["routing"]] = _routing_svg(routing)
    return out


def _csv(rows: Sequence[Mapping[str, Any]], last: Sequence[str]) -> str:
    """A header row of every key the rows have (in order of appearance, ``last`` at the end), then the rows;
    a list is one field of space-separated values."""
    keys = [k for k in dict.fromkeys(k for row in rows for k in row) if k not in last]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([*keys, *last])
    for row in rows:
        writer.writerow([" ".join(map(str, v)) if isinstance(v, list) else v for v in (row.get(k, "") for k in (*keys, *last))])
    return out.getvalue()


def csv_tables(results: Mapping[str, Any]) -> dict[str, str]:
    """File name -> CSV text, one per section there (``latency.csv``, ``success.csv``,
    ``throughput.csv``, ``routing.csv``, ``requests.csv``): one row per cell, skipped ones too, with their reason
    under ``skipped``; for routing, one row per tree size.  A run's profile is the last column,
    so that a table copied away from its report still says that quick numbers are not full ones."""
    profile = {"profile": results["profile"]} if results.get("profile") is not None else {}
    out: dict[str, str] = {}
    for name, file in CSV_FILES.items():
        section = _section(results, name)
        if section is not None:
            rows, last = (_routing_rows(section), ()) if name == "routing" else (_cells(section), ("skipped",))
            out[file] = _csv([{**row, **profile} for row in rows], (*last, *profile))
    return out


def write(results: Mapping[str, Any], out_dir: Path) -> list[Path]:
    """Write ``results.json`` (keys in their order), ``report.md``, the figures and the CSV tables
    into ``out_dir`` (made if missing); return the paths written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    path = out_dir / "results.json"
    path.write_text(json.dumps(results, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8")
    written.append(path)
    path = out_dir / "report.md"
    path.write_text(markdown(results), encoding="utf-8")
    written.append(path)
    for name, text in {**figures(results), **csv_tables(results)}.items():
        path = out_dir / name
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written
