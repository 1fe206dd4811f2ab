"""What scraping /metrics costs a broker: CPU per scrape and the share of a core at one
scrape a second, with N attachments and traffic flowing.

A real broker process (``python -m dcp broker --metrics-listen``) with ``-n`` clients
attached through the SDK (each a port, so each a candidate for the per-port series);
one publisher sends a frame to a different subscriber every ``--interval`` seconds
the whole time, so the counters move.  The broker's CPU time is read from
``/proc/PID/stat`` over a window without scrapes and over a window of one scrape a
second (``--scrapes`` of them); the difference, per scrape, is what scraping costs.
The broker's own ``dcp_metrics_render_seconds`` (the render alone) is read as well.

    .venv/bin/python bench/metrics_cost.py                  # 1,000 attachments, 30 s per window
    .venv/bin/python bench/metrics_cost.py -n 5000 --scrapes 60

Linux only (``/proc``).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import dcp

HERE = Path(__file__).resolve().parents[1]
LISTENING = re.compile(r"listening on (\S+):(\d+) ")
METRICS = re.compile(r"metrics on http://(\S+):(\d+)/metrics")


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat", "rb") as fh:
        fields = fh.read().rpartition(b")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def start_broker(ports: int) -> tuple[subprocess.Popen[str], str, tuple[str, int]]:
    process = subprocess.Popen(
        [sys.executable, "-m", "dcp", "broker", "--insecure", "--listen", "127.0.0.1:0", "--ports", str(ports),
         "--metrics-listen", "127.0.0.1:0", "--log-level", "info"],
        cwd=HERE, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    assert process.stderr is not None
    url = metrics = None
    for line in process.stderr:
        if match := LISTENING.search(line):
            url = f"dcp://{match[1]}:{match[2]}"
        if match := METRICS.search(line):
            metrics = (match[1], int(match[2]))
        if url and metrics:  # the rest is drained, so the broker never blocks on a full pipe
            threading.Thread(target=process.stderr.read, daemon=True).start()
            return process, url, metrics
    raise SystemExit(f"the broker exited with {process.wait()} before serving metrics")


async def scrape(address: tuple[str, int]) -> bytes:
    reader, writer = await asyncio.open_connection(*address)
    writer.write(b"GET /metrics HTTP/1.1\r\nHost: bench\r\n\r\n")
    answer = await reader.read()
    writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head[:100]
    return body


async def traffic(pub: dcp.Connection, subs: list[dcp.Connection], interval_s: float, stop: asyncio.Event) -> int:
    sent = 0
    while not stop.is_set():
        sub = subs[sent % len(subs)]
        assert sub.port is not None
        await pub.publish("bench", b"m" * 256, route=pub.route_to(sub.port))
        sent += 1
        await asyncio.sleep(interval_s)
    return sent


async def window(pid: int, seconds: float, scrape_at: tuple[str, int] | None) -> tuple[float, list[bytes]]:
    """Broker CPU seconds over ``seconds``, scraping once a second when ``scrape_at``."""
    bodies = []
    before = cpu_seconds(pid)
    started = time.monotonic()
    for tick in range(int(seconds)):
        if scrape_at is not None:
            bodies.append(await scrape(scrape_at))
        await asyncio.sleep(max(0.0, started + tick + 1 - time.monotonic()))
    return cpu_seconds(pid) - before, bodies


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=1000, help="attachments (subscribers) besides the publisher")
    parser.add_argument("--scrapes", type=int, default=30, help="scrapes, one a second; the quiet window is as long")
    parser.add_argument("--interval", type=float, default=0.001, help="seconds between published frames")
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    process, url, metrics = start_broker(max(args.n + 16, 64))
    subs: list[dcp.Connection] = []
    try:
        async with dcp.connect(url, name="pub") as pub:
            for i in range(args.n):
                subs.append(await dcp.connect(url, name=f"sub-{i}", overflow="drop-oldest", max_pending=16))
            stop = asyncio.Event()
            sender = asyncio.create_task(traffic(pub, subs, args.interval, stop))
            await asyncio.sleep(2)  # the traffic settles
            quiet, _ = await window(process.pid, args.scrapes, None)
            scraped, bodies = await window(process.pid, args.scrapes, metrics)
            stop.set()
            sent = await sender
            render = [float(line.split()[1]) for line in bodies[-1].decode().splitlines() if line.startswith("dcp_metrics_render_seconds ")]
            per_scrape = (scraped - quiet) / args.scrapes
            print(f"attachments: {args.n + 1}; frames sent: {sent} ({1 / args.interval:.0f}/s requested)")
            print(f"broker CPU over {args.scrapes} s: {quiet:.2f} s without scrapes, {scraped:.2f} s with one a second")
            print(f"per scrape: {per_scrape * 1000:.1f} ms of CPU = {per_scrape * 100:.2f} % of a core at one scrape a second")
            print(f"render alone (dcp_metrics_render_seconds, last scrape): {render[0] * 1000:.1f} ms; body {len(bodies[-1]):,} bytes")
    finally:
        for sub in subs:
            await sub.close()
        process.terminate()
        process.wait(20)


if __name__ == "__main__":
    asyncio.run(main())
