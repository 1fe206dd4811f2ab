"""Three brokers on three "hosts" (Linux network namespaces joined by veth pairs).

::

    nsA 10.231.1.1 ==veth== 10.231.1.2 nsB 10.231.2.2 ==veth== 10.231.2.3 nsC
        bA  <-------- dials --------  bB  <-------- dials --------  bC
        pub, idleA                    subB                          subC, idleC

Every process runs in its namespace (``ip netns exec``).  bB dials bA and bC dials
bB; the link ports at both ends come from the brokers' ``link up`` log lines, the
subscribers' ports from the ``port P`` line each agent prints once attached
(``tests/netns_agent.py``).  One topology number X names the tree bA -> bB -> {subB,
bC -> subC}.  subB and subC must each receive every frame the publisher sent,
exactly once, byte-identical (sha256 and length), in order, with the hop count
lowered once per broker; idleA and idleC are attached but outside the tree and must
receive nothing.  The brokers' counters (``dcp stats --json``, run inside each
namespace) must agree, down to every link and attachment, with no drop anywhere,
and each broker must exit 0 on SIGTERM.

No fixed sleep anywhere: every wait is for a line or an exit, bounded by the time
left of one overall budget.  Skipped only where network namespaces cannot be made
(not root, no ``ip``, ``ip netns add`` refused).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dcp.routing import allocate_keys, encode
from dcp.wire import DEFAULT_HOPS
from tests.netns_agent import digest, payload

# Every wait of the test draws on this one budget, so a hang fails it in BUDGET_S
# seconds (a passing run takes about 4 s on 2 cores).
BUDGET_S = 30.0

REPO = Path(__file__).resolve().parent.parent
COUNT = 48  # frames published; payloads of 0 B .. 200 KiB, about 5 MB in all
SEED = 20240611
TOPIC = "netns/frames"
PORTS = 16

LISTENING = re.compile(r"dcp broker listening on (\S+):(\d+) mode=(\w+) key=(\d+) ports=(\d+)")
ATTACHED = re.compile(r"^port (\d+)$")


class Deadline:
    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self, cap: float = BUDGET_S) -> float:
        left = self.end - time.monotonic()
        if left <= 0:
            raise AssertionError(f"the test ran past its {BUDGET_S} s budget")
        return min(left, cap)


class Lines:
    """Drains a text stream in a thread; ``wait`` blocks until a line matches."""

    def __init__(self, stream: Any) -> None:
        self.lines: list[str] = []
        self.closed = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream: Any) -> None:
        try:
            for line in stream:
                with self._cond:
                    self.lines.append(line.rstrip("\n"))
                    self._cond.notify_all()
        finally:
            with self._cond:
                self.closed = True
                self._cond.notify_all()

    def wait(self, pattern: re.Pattern[str], timeout: float, what: str) -> re.Match[str]:
        """The first line that matches; AssertionError at timeout or end of stream."""
        end = time.monotonic() + timeout
        with self._cond:
            index = 0
            while True:
                while index < len(self.lines):
                    match = pattern.search(self.lines[index])
                    index += 1
                    if match:
                        return match
                left = end - time.monotonic()
                if self.closed or left <= 0:
                    why = "stream closed" if self.closed else f"{timeout:.1f} s passed"
                    raise AssertionError(f"no {what} ({why}); lines so far:\n" + "\n".join(self.lines))
                self._cond.wait(left)

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    def text(self) -> str:
        with self._cond:
            return "\n".join(self.lines)


class Proc:
    """A process in a namespace, its stdout and stderr drained as lines."""

    def __init__(self, name: str, netns: str, argv: list[str], stdin: bool = False) -> None:
        self.name = name
        self.popen = subprocess.Popen(
            ["ip", "netns", "exec", netns, *argv],  # ip execs argv: the pid is argv's
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
            env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)},
        )
        self.out = Lines(self.popen.stdout)
        self.err = Lines(self.popen.stderr)

    def wait(self, timeout: float) -> int:
        try:
            code = self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.name} still running after {timeout:.1f} s\n{self.describe()}") from None
        self.out.join(timeout)
        self.err.join(timeout)
        return code

    def close_stdin(self) -> None:
        if self.popen.stdin is not None and not self.popen.stdin.closed:
            self.popen.stdin.close()

    def kill(self) -> None:
        self.close_stdin()
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait()

    def describe(self) -> str:
        return f"--- {self.name} stdout:\n{self.out.text()}\n--- {self.name} stderr:\n{self.err.text()}"


def _ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20)


def _must(*args: str) -> None:
    done = _ip(*args)
    assert done.returncode == 0, f"ip {' '.join(args)} failed ({done.returncode}): {done.stderr.strip()}"


class Hosts:
    """Three namespaces in a line, and every process started in them (killed at teardown)."""

    def __init__(self) -> None:
        self.ns = {host: f"dcp{os.getpid()}{host}" for host in "ABC"}
        self.made: list[str] = []
        self.procs: list[Proc] = []

    def add_namespace(self, host: str) -> subprocess.CompletedProcess[str]:
        done = _ip("netns", "add", self.ns[host])
        if done.returncode == 0:
            self.made.append(self.ns[host])
        return done

    def wire(self) -> None:
        """veth A<->B (10.231.1.0/24) and B<->C (10.231.2.0/24), created in the namespaces."""
        pid, a, b, c = os.getpid(), self.ns["A"], self.ns["B"], self.ns["C"]
        _must("link", "add", f"vab{pid}", "netns", a, "type", "veth", "peer", "name", f"vba{pid}", "netns", b)
        _must("link", "add", f"vbc{pid}", "netns", b, "type", "veth", "peer", "name", f"vcb{pid}", "netns", c)
        for ns, dev, addr in (
            (a, f"vab{pid}", "10.231.1.1/24"),
            (b, f"vba{pid}", "10.231.1.2/24"),
            (b, f"vbc{pid}", "10.231.2.2/24"),
            (c, f"vcb{pid}", "10.231.2.3/24"),
        ):
            _must("-n", ns, "addr", "add", addr, "dev", dev)
            _must("-n", ns, "link", "set", dev, "up")
        for ns in self.ns.values():
            _must("-n", ns, "link", "set", "lo", "up")

    def start(self, name: str, host: str, argv: list[str], stdin: bool = False) -> Proc:
        proc = Proc(name, self.ns[host], argv, stdin)
        self.procs.append(proc)
        return proc

    def describe(self) -> str:
        return "\n".join(proc.describe() for proc in self.procs)

    def teardown(self) -> list[str]:
        problems = []
        for proc in self.procs:
            proc.kill()
        for ns in self.made:  # the veths go with their namespaces
            done = _ip("netns", "del", ns)
            if done.returncode != 0:
                problems.append(f"ip netns del {ns}: {done.stderr.strip()}")
        return problems


@pytest.fixture
def hosts() -> Iterator[Hosts]:
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root; this runs with euid %d" % os.geteuid())
    if shutil.which("ip") is None:
        pytest.skip("network namespaces need iproute2's `ip`; none on PATH")
    hosts = Hosts()
    try:
        probe = hosts.add_namespace("A")
        if probe.returncode != 0:
            pytest.skip(f"`ip netns add` failed with status {probe.returncode}: {probe.stderr.strip()}")
        for host in "BC":  # from here on, a failure is a failure, not a skip
            done = hosts.add_namespace(host)
            assert done.returncode == 0, f"ip netns add {hosts.ns[host]}: {done.stderr.strip()}"
        hosts.wire()
        yield hosts
    finally:
        problems = hosts.teardown()
        left = [ns for ns in _ip("netns", "list").stdout.split() if ns in hosts.ns.values()]
        assert not problems and not left, f"cleanup failed: {problems}; namespaces left: {left}"


def _link_up(broker: Proc, peer: str, incoming: bool, timeout: float) -> tuple[int, int, int]:
    """(local port, remote port, remote key) of ``broker``'s link to ``peer``, once it is up."""
    pattern = re.compile(
        rf"link up: port (\d+) <-> (?:\S+ \()?{re.escape(peer)}\)? port (\d+) key=(\d+)" + (r" \(incoming\)$" if incoming else "$")
    )
    match = broker.err.wait(pattern, timeout, f"link-up line for {peer} in {broker.name}'s log")
    return int(match[1]), int(match[2]), int(match[3])


def _messages(sub: Proc) -> tuple[list[tuple[int, str, int, int, str]], list[str]]:
    """A subscriber's (msg_id, sha256, len, hops, topic) lines before ``done``, and the lines after."""
    lines = sub.out.lines
    assert ATTACHED.match(lines[0]), lines[:1]
    done = next(i for i, line in enumerate(lines) if line.startswith("done "))
    received = []
    for line in lines[1:done]:
        msg_id, sha, size, hops, topic = line.split(" ", 4)
        received.append((int(msg_id), sha, int(size), int(hops), topic))
    return received, lines[done + 1 :]


def _run_stats(hosts: Hosts, deadline: Deadline, addresses: dict[str, str]) -> dict[str, dict[str, Any]]:
    """``dcp stats --json`` of each broker, run inside its namespace (all at once)."""
    procs = {
        host: hosts.start(f"stats{host}", host, [sys.executable, "-m", "dcp", "stats", address, "--json"])
        for host, address in addresses.items()
    }
    stats = {}
    for host, proc in procs.items():
        assert proc.wait(deadline.left(20)) == 0, proc.describe()
        stats[host] = json.loads(proc.out.text())
    return stats


def test_frames_cross_three_hosts_exactly_once_in_order(hosts: Hosts) -> None:
    try:
        _scenario(hosts, Deadline(BUDGET_S))
    except BaseException:
        print(hosts.describe())  # shown with the failure: every process's output
        raise


def _scenario(hosts: Hosts, deadline: Deadline) -> None:
    py = sys.executable
    key_a, key_b, key_c = keys = allocate_keys(3, PORTS)
    assert len(set(keys)) == 3

    def broker(name: str, host: str, listen: str, key: int, *peers: str) -> Proc:
        # pause: the lossless slow-consumer policy, so "no drops" is a guarantee to check
        argv = [py, "-m", "dcp", "broker", "--listen", listen, "--key", str(key), "--ports", str(PORTS), "--insecure"]
        argv += ["--name", name, "--slow-consumer", "pause", "--log-level", "info"]
        for peer in peers:
            argv += ["--peer", peer]
        return hosts.start(name, host, argv)

    b_a = broker("bA", "A", "10.231.1.1:7400", key_a)
    b_b = broker("bB", "B", "0.0.0.0:7400", key_b, "10.231.1.1:7400")
    b_c = broker("bC", "C", "10.231.2.3:7400", key_c, "10.231.2.2:7400")
    for proc, key, address in ((b_a, key_a, "10.231.1.1:7400"), (b_b, key_b, "0.0.0.0:7400"), (b_c, key_c, "10.231.2.3:7400")):
        match = proc.err.wait(LISTENING, deadline.left(20), f"listening line from {proc.name}")
        assert f"{match[1]}:{match[2]}" == address and match[3] == "stateless"
        assert (int(match[4]), int(match[5])) == (key, PORTS)

    # The agents attach while the links come up: the ports they get are whatever is free.
    def sub(name: str, host: str, url: str, count: int) -> Proc:
        argv = [py, "-m", "tests.netns_agent", "sub", url, "--count", str(count), "--linger"]
        return hosts.start(name, host, argv + ["--timeout", f"{deadline.left():.1f}"], stdin=True)

    sub_b = sub("subB", "B", "dcp://127.0.0.1:7400", COUNT)
    sub_c = sub("subC", "C", "dcp://10.231.2.3:7400", COUNT)
    idle_c = sub("idleC", "C", "dcp://10.231.2.3:7400", 0)  # on bC, outside the tree
    idle_a = sub("idleA", "A", "dcp://10.231.1.1:7400", 0)  # on the publisher's broker, outside the tree

    # Link ports from both ends' log lines; each end must agree with the other.
    b_to_a, a_port_of_b, key = _link_up(b_b, "10.231.1.1:7400", incoming=False, timeout=deadline.left(20))
    assert key == key_a
    a_to_b, b_port_of_a, key = _link_up(b_a, "bB", incoming=True, timeout=deadline.left(20))
    assert (key, a_to_b, b_port_of_a) == (key_b, a_port_of_b, b_to_a)
    c_to_b, b_port_of_c, key = _link_up(b_c, "10.231.2.2:7400", incoming=False, timeout=deadline.left(20))
    assert key == key_b
    b_to_c, c_port_of_b, key = _link_up(b_b, "bC", incoming=True, timeout=deadline.left(20))
    assert (key, b_to_c, c_port_of_b) == (key_c, b_port_of_c, c_to_b)

    port = {}
    for proc in (sub_b, sub_c, idle_c, idle_a):
        port[proc.name] = int(proc.out.wait(ATTACHED, deadline.left(20), f"port line from {proc.name}")[1])
    assert len({b_to_a, b_to_c, port["subB"]}) == 3
    assert len({c_to_b, port["subC"], port["idleC"]}) == 3
    assert len({a_to_b, port["idleA"]}) == 2

    # The tree: bA -> link to bB; bB -> subB and link to bC; bC -> subC.
    route = encode({key_a: 1 << a_to_b, key_b: 1 << b_to_c | 1 << port["subB"], key_c: 1 << port["subC"]})
    pub = hosts.start(
        "pub",
        "A",
        [py, "-m", "tests.netns_agent", "pub", "dcp://10.231.1.1:7400", "--route", str(route)]
        + ["--count", str(COUNT), "--topic", TOPIC, "--seed", str(SEED)],
    )
    assert pub.wait(deadline.left()) == 0, pub.describe()
    assert pub.out.lines[-1] == f"published {COUNT}"
    sent = []
    for index, line in enumerate(pub.out.lines[:-1]):
        word, msg_id, sha, size = line.split()
        data = payload(SEED, index)
        assert (word, sha, int(size)) == ("sent", digest(data), len(data)), f"frame {index}: {line}"
        sent.append((int(msg_id), sha, int(size)))
    assert len(sent) == COUNT and len({msg_id for msg_id, _, _ in sent}) == COUNT
    sizes = [size for _, _, size in sent]
    assert min(sizes) == 0 and max(sizes) == 200 * 1024 and sum(sizes) > 2_000_000

    done = re.compile(rf"^done {COUNT}$")
    for proc in (sub_b, sub_c):
        proc.out.wait(done, deadline.left(), f"all {COUNT} frames at {proc.name}")

    # Counters while every agent is still attached.
    stats = _run_stats(hosts, deadline, {"A": "10.231.1.1:7400", "B": "127.0.0.1:7400", "C": "10.231.2.3:7400"})

    # The agents: subB and subC got every frame once, in order, intact; the idle ones nothing.
    for proc in (sub_b, sub_c, idle_c, idle_a):
        proc.close_stdin()
    for proc in (sub_b, sub_c, idle_c, idle_a):
        assert proc.wait(deadline.left(20)) == 0, proc.describe()
    for proc, hops in ((sub_b, DEFAULT_HOPS - 2), (sub_c, DEFAULT_HOPS - 3)):
        received, after = _messages(proc)
        assert [(m, s, n) for m, s, n, _, _ in received] == sent, f"{proc.name} did not get exactly what was sent"
        assert {(h, t) for _, _, _, h, t in received} == {(hops, TOPIC)}
        assert after == [f"eof {COUNT}"], f"{proc.name} got frames after the expected ones: {after}"
    for proc in (idle_c, idle_a):
        assert proc.out.lines[1:] == ["done 0", "eof 0"], f"{proc.name}, outside the tree, got frames"

    # The brokers' counters say the same, with no drop anywhere.
    for host, name in (("A", "bA"), ("B", "bB"), ("C", "bC")):
        assert stats[host]["name"] == name
        assert set(stats[host]["drops"].values()) == {0}, f"{name} dropped frames: {stats[host]['drops']}"
    links = {host: {link["port"]: link for link in stats[host]["links"]} for host in "ABC"}
    conns = {host: {conn["port"]: conn for conn in stats[host]["connections"] if conn["port"] >= 0} for host in "ABC"}
    for host, link_port, remote_key, remote_port, direction, frames_in, frames_out in (
        ("A", a_to_b, key_b, b_to_a, "in", 0, COUNT),
        ("B", b_to_a, key_a, a_to_b, "out", COUNT, 0),
        ("B", b_to_c, key_c, c_to_b, "in", 0, COUNT),
        ("C", c_to_b, key_b, b_to_c, "out", COUNT, 0),
    ):
        link = links[host][link_port]
        assert (link["state"], link["direction"], link["remote_key"], link["remote_port"]) == (
            "up", direction, str(remote_key), remote_port
        ), link
        assert (link["frames_in"], link["frames_out"], link["undelivered"]) == (frames_in, frames_out, 0), link
    assert conns["A"][port["idleA"]]["frames_out"] == 0
    assert conns["B"][port["subB"]]["frames_out"] == COUNT
    assert conns["C"][port["subC"]]["frames_out"] == COUNT
    assert conns["C"][port["idleC"]]["frames_out"] == 0
    publishers = [conn for conn in conns["A"].values() if conn["name"] == "netns-pub"]
    assert publishers == [] or publishers[0]["frames_in"] == COUNT  # the publisher may have left already
    assert [(stats[h]["frames_in"], stats[h]["frames_out"]) for h in "ABC"] == [
        (COUNT, COUNT), (COUNT, 2 * COUNT), (COUNT, COUNT)
    ]

    # SIGTERM: each broker stops gracefully and exits 0.
    brokers = (b_a, b_b, b_c)
    for proc in brokers:
        proc.popen.send_signal(signal.SIGTERM)
    for proc in brokers:
        assert proc.wait(deadline.left(20)) == 0, proc.describe()
        log = proc.err.text()
        assert "dcp broker stopped" in log and "Traceback" not in log, proc.describe()
