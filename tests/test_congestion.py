"""Congestion over real links (issue 14, item 5): ``bench/congestion.py``, short.

Three ``dcp broker`` processes in network namespaces form a triangle; a source on b0
streams to a sink on b1 over the direct link.  The direct link is throttled with
``tc ... tbf`` mid-stream: the orchestrator (trees by measured link cost) must move the
stream to the detour b0-b2-b1 within a bounded time, and no frame may arrive twice.
The throttle is released as soon as a frame came over the detour (polled on the
sink's output, with a deadline).  Skipped where namespaces or tbf are unavailable.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
#: Load reports go once a second and pings once a second: the move takes about 1 s.
SWITCH_BOUND_MS = 4000.0


def test_a_throttled_direct_link_moves_the_stream_to_the_detour(tmp_path: Path) -> None:
    import pytest

    out = tmp_path / "congestion.json"
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "congestion.py"), "--modes", "replan", "--before-s", "1.5",
         "--during-s", "8", "--after-s", "1", "--until-detour", "--json", str(out)],
        capture_output=True, text=True, timeout=60, cwd=REPO,
    )
    if done.returncode == 77:
        pytest.skip(done.stderr.strip())
    assert done.returncode == 0, done.stdout + done.stderr
    [result] = json.loads(out.read_text())
    assert result["before_all_direct"], "before the throttle the stream takes the direct link (fewest hops)"
    assert result["to_detour_ms"] is not None, f"no frame over the detour within 8 s of the throttle\n{done.stdout}"
    assert result["to_detour_ms"] <= SWITCH_BOUND_MS, result
    assert result["duplicates"] == 0, result
    assert result["epochs"] >= 2, result  # the move was a new route, so a new epoch
    for phase in ("before", "during"):
        assert result["phases"][phase]["lost"] == 0, result["phases"]
