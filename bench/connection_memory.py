"""What connections that never say hello cost a broker process: its RSS with N idle
connections, and with N connections each holding a partial frame as large as the
broker takes before a hello.

A real broker process (``python -m dcp broker``) per scenario; this process raises its
own open-file limit and opens the connections with plain sockets.  A partial frame is
a fixed header declaring ``--partial-bytes`` bytes (default: the largest frame the
broker takes before a hello, less one) followed by all of it but the last byte; the
broker's RSS is read from ``/proc`` once it has read every byte sent (``rchar`` in
``/proc/PID/io``).  With a hello deadline, the RSS is read again once the broker has
cut every connection, and once more with a second wave of as many connections (the
allocator keeps what the first wave freed, and the second reuses it).

    .venv/bin/python bench/connection_memory.py                       # this tree
    .venv/bin/python bench/connection_memory.py --old /tmp/dcp-old    # and a worktree of an older commit
    .venv/bin/python bench/connection_memory.py -n 1000 --partial-bytes 2097152

``--old TREE`` runs the same scenarios against ``TREE`` with ``TREE/.venv/bin/python``
(where the largest frame before a hello is ``max_frame``, 8 MiB, unless
``--partial-bytes`` says otherwise).  Linux only (``/proc``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import select
import socket
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]
LISTENING = re.compile(r"listening on (\S+):(\d+) ")
HEADER = struct.Struct("!BBBBHHIQQ")  # dcp.wire.HEADER: version, type, flags, hops, x_len, topic_len, payload_len, id, ts
VERSION = 1  # dcp.wire.VERSION
DATA = 1  # dcp.wire.DATA


@dataclass
class BrokerProcess:
    process: subprocess.Popen[str]
    host: str
    port: int
    log: list[str] = field(default_factory=list)

    def status(self, key: str) -> int:
        """A ``/proc/PID/status`` field in bytes (VmRSS, VmHWM)."""
        with open(f"/proc/{self.process.pid}/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        raise KeyError(key)

    def rchar(self) -> int:
        with open(f"/proc/{self.process.pid}/io") as fh:
            for line in fh:
                if line.startswith("rchar:"):
                    return int(line.split()[1])
        raise KeyError("rchar")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def access_flags(tree: Path, python: str) -> list[str]:
    """``--insecure`` where ``tree``'s broker refuses to start without a secret or that flag (loopback only here)."""
    code = "import dataclasses\nfrom dcp.config import BrokerConfig\nprint('insecure' in {f.name for f in dataclasses.fields(BrokerConfig)})\n"
    out = subprocess.run([python, "-c", code], cwd=tree, env={**os.environ, "PYTHONPATH": str(tree)}, capture_output=True, text=True, check=True)
    return ["--insecure"] if out.stdout.strip() == "True" else []


def start_broker(tree: Path, python: str, args: list[str]) -> BrokerProcess:
    argv = [python, "-m", "dcp", "broker", "--listen", "127.0.0.1:0", "--ports", "64", "--log-level", "info",
            *access_flags(tree, python), *args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(tree)}
    process = subprocess.Popen(argv, cwd=tree, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    assert process.stderr is not None
    seen = []
    for line in process.stderr:
        seen.append(line)
        match = LISTENING.search(line)
        if match:
            broker = BrokerProcess(process, match.group(1), int(match.group(2)), seen)
            threading.Thread(target=lambda: [seen.append(x) for x in process.stderr or ()], daemon=True).start()
            return broker
    process.wait()
    raise RuntimeError(f"the broker exited with {process.returncode}:\n{''.join(seen)}")


def raise_nofile(need: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(need, hard), hard))


def wait_read(broker: BrokerProcess, target: int, timeout: float = 120) -> int:
    """Until the broker's ``rchar`` reaches ``target``, or stops growing for 2 s (it
    refused what it was sent); return it."""
    deadline = time.monotonic() + timeout
    last, since = broker.rchar(), time.monotonic()
    while last < target and time.monotonic() < deadline:
        time.sleep(0.05)
        now = broker.rchar()
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since > 2:
            break
    return last


def settle(broker: BrokerProcess) -> int:
    """The RSS once it stops moving (two reads 0.2 s apart within 1 %)."""
    last = broker.status("VmRSS")
    for _ in range(50):
        time.sleep(0.2)
        now = broker.status("VmRSS")
        if abs(now - last) <= last // 100:
            return now
        last = now
    return last


def all_closed(socks: list[socket.socket], timeout: float) -> bool:
    """Wait until the broker has closed every one of ``socks`` (EOF or reset)."""
    open_ = {s.fileno(): s for s in socks}
    deadline = time.monotonic() + timeout
    while open_ and time.monotonic() < deadline:
        poller = select.poll()
        for fd in open_:
            poller.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)
        for fd, _ in poller.poll(200):
            try:
                data = open_[fd].recv(65536)
            except OSError:
                data = b""
            if not data:
                del open_[fd]
    return not open_


def scenario(tree: Path, python: str, n: int, partial: int | None, args: list[str], deadline_s: float | None) -> dict[str, object]:
    broker = start_broker(tree, python, args)
    socks: list[socket.socket] = []
    try:
        baseline = settle(broker)
        before = broker.rchar()
        started = time.monotonic()
        for _ in range(n):
            sock = socket.create_connection((broker.host, broker.port))
            socks.append(sock)
        sent = read = 0
        if partial is not None:
            body = b"\0" * (partial - HEADER.size - 1)
            head = HEADER.pack(VERSION, DATA, 0, 8, 0, 0, partial - HEADER.size, 0, 0)
            for sock in socks:
                try:
                    sock.sendall(head + body)
                except OSError:  # refused: the broker closed it
                    continue
                sent += len(head) + len(body)
            read = wait_read(broker, before + sent) - before
        held = settle(broker)
        elapsed = time.monotonic() - started
        result: dict[str, object] = {
            "connections": n,
            "partial_bytes": partial,
            "rss_baseline_mb": round(baseline / 1e6, 1),
            "rss_held_mb": round(held / 1e6, 1),
            "per_connection_kb": round((held - baseline) / n / 1e3, 1),
            "read_mb": round(read / 1e6, 1),
            "setup_s": round(elapsed, 2),
        }
        if deadline_s is not None:
            cut = all_closed(socks, deadline_s + 30)
            result["all_cut_by_deadline"] = cut
            result["rss_after_cut_mb"] = round(settle(broker) / 1e6, 1)
            # A second wave, once the first is cut: the memory the first held is reused, not added to
            for sock in socks:
                sock.close()
            socks.clear()
            start, sent = broker.rchar(), 0
            socks += [socket.create_connection((broker.host, broker.port)) for _ in range(n)]
            if partial is not None:
                for sock in socks:
                    try:
                        sock.sendall(head + body)
                    except OSError:
                        continue
                    sent += len(head) + len(body)
                wait_read(broker, start + sent)
            result["rss_second_wave_mb"] = round(settle(broker) / 1e6, 1)
            result["second_wave_cut"] = all_closed(socks, deadline_s + 30)
        result["rss_peak_mb"] = round(broker.status("VmHWM") / 1e6, 1)
        return result
    finally:
        for sock in socks:
            sock.close()
        broker.stop()


def largest_before_hello(tree: Path, python: str) -> int:
    """The largest frame ``tree``'s broker takes before a hello (from its own code)."""
    code = (
        "from dcp.config import BrokerConfig\n"
        "try:\n from dcp._serving import pre_hello_limits\n"
        " print(pre_hello_limits(BrokerConfig().limits).max_frame)\n"
        "except ImportError:\n print(BrokerConfig().limits.max_frame)\n"
    )
    out = subprocess.run([python, "-c", code], cwd=tree, env={**os.environ, "PYTHONPATH": str(tree)}, capture_output=True, text=True, check=True)
    return int(out.stdout.strip())


def has_deadline(tree: Path, python: str) -> float | None:
    code = "from dcp.config import BrokerConfig\nprint(getattr(BrokerConfig(), 'hello_timeout_s', 0))\n"
    out = subprocess.run([python, "-c", code], cwd=tree, env={**os.environ, "PYTHONPATH": str(tree)}, capture_output=True, text=True, check=True)
    value = float(out.stdout.strip())
    return value or None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", type=int, default=1000, help="connections per scenario (default 1000)")
    parser.add_argument("--partial-bytes", type=int, default=None, help="size of the partial frame each holds (default: the largest the broker takes before hello)")
    parser.add_argument("--old", type=Path, default=None, help="also measure this worktree (with its .venv)")
    parser.add_argument("--json", action="store_true", help="print JSON, not a table")
    args = parser.parse_args()
    raise_nofile(args.n + 256)
    trees = [("this tree", HERE, sys.executable)]
    if args.old is not None:
        trees.insert(0, ("old", args.old.resolve(), str(args.old.resolve() / ".venv" / "bin" / "python")))
    rows = []
    for label, tree, python in trees:
        partial = args.partial_bytes or largest_before_hello(tree, python) - 1
        deadline = has_deadline(tree, python)
        for kind, size in (("idle", None), ("partial frame", partial)):
            result = scenario(tree, python, args.n, size, [], deadline)
            rows.append({"tree": label, "scenario": kind, **result})
            print(f"# {label}: {kind}: {result}", file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print("| tree | scenario | connections | partial frame | RSS before | RSS held | per connection | peak | after the hello deadline |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---|")
    for row in rows:
        after = (
            f"{row['rss_after_cut_mb']} MB, all cut: {row['all_cut_by_deadline']}; a second wave: {row['rss_second_wave_mb']} MB, "
            f"cut: {row['second_wave_cut']}" if "rss_after_cut_mb" in row else "no deadline: all still open"
        )
        print(
            f"| {row['tree']} | {row['scenario']} | {row['connections']} | {row['partial_bytes'] or '-'} | {row['rss_baseline_mb']} MB "
            f"| {row['rss_held_mb']} MB | {row['per_connection_kb']} kB | {row['rss_peak_mb']} MB | {after} |"
        )


if __name__ == "__main__":
    main()
