"""A broker at scale: its connection capacity under the open-file limit, thousands of
attachments, and its reports to the orchestrator, coalesced and chunked.

Real brokers on loopback ports the OS chooses: in their own process where the
open-file limit is the subject (set low, both soft and hard), in this one otherwise,
with a fake orchestrator that records every frame a broker sends it.
"""

from __future__ import annotations

import asyncio
import os
import re
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import msgpack
import pytest

import dcp
from dcp import broker as broker_module
from dcp._serving import FD_RESERVE
from dcp.broker import Broker, BrokerConnection
from dcp.config import BrokerConfig
from dcp.errors import ConnectionClosed, DcpError, RemoteError
from dcp.routing import encode
from dcp.wire import HEADER, HEADER_SIZE, ControlFrame, Decoder, encode_control

from .conftest import LISTENING, BrokerProcess, tracked, url_of
from .loopback import LoopbackServer
from .waiting import until

#: The broker's start-up line about its open-file limit and its capacity.
CAPACITY = re.compile(r"open files: soft limit (\w+) -> (\w+) \(hard (\w+)\); (\w+) connections at most")


# -- a broker process under a low open-file limit ----------------------------------------


def start_limited_broker(soft: int, hard: int, *args: str) -> BrokerProcess:
    """``python -m dcp broker`` started with RLIMIT_NOFILE (soft, hard): set, then exec'd."""
    argv = [sys.executable, "-m", "dcp", "broker", "--listen", "127.0.0.1:0", "--ports", "64", "--insecure", *args]
    launcher = (
        "import os, resource, sys; "
        f"resource.setrlimit(resource.RLIMIT_NOFILE, ({soft}, {hard})); "
        f"os.execv(sys.executable, {argv!r})"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", launcher], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert process.stderr is not None
    seen = []
    for line in process.stderr:
        seen.append(line)
        match = LISTENING.search(line)
        if match:
            host, port, mode, key = match.groups()
            return BrokerProcess(process=process, host=host, port=int(port), mode=mode, key=int(key), log=seen)
    process.wait()
    raise AssertionError(f"the broker exited with {process.returncode} before listening:\n{''.join(seen)}")


@pytest.fixture
def limited_broker() -> Iterator[Callable[..., BrokerProcess]]:
    yield from tracked(start_limited_broker)


def capacity_line(proc: BrokerProcess) -> re.Match[str]:
    match = next((m for m in map(CAPACITY.search, proc.log) if m), None)
    assert match is not None, "".join(proc.log)
    return match


async def raw_attempt(proc: BrokerProcess) -> list[Any]:
    """Connect, say hello, read until the broker closes: the frames got (control bodies),
    then "eof", or "reset" if the connection was reset."""
    reader, writer = await asyncio.open_connection(proc.host, proc.port)
    got: list[Any] = []
    decoder = Decoder()
    try:
        writer.write(encode_control({"op": "hello", "id": 1, "name": "one-too-many"}))
        while data := await asyncio.wait_for(reader.read(65536), 10):
            got += [event.body for event in decoder.feed(data) if isinstance(event, ControlFrame)]
        got.append("eof")
    except ConnectionError:
        got.append("reset")
    finally:
        writer.transport.abort()
    return got


async def attach_again(proc: BrokerProcess, name: str) -> dcp.Connection | None:
    try:
        return await dcp.connect(proc.url, name=name, reconnect=False)
    except (ConnectionClosed, DcpError, OSError):
        return None


async def admitted_once_one_left(proc: BrokerProcess) -> dcp.Connection:
    """A connection the broker admits again, once it has seen one of its connections go
    (attempts until then are refused with too_many_connections)."""
    admitted: list[dcp.Connection] = []

    async def admitted_again() -> bool:
        conn = await attach_again(proc, "comeback")
        if conn is not None:
            admitted.append(conn)
        return conn is not None

    await until(admitted_again, "a connection admitted once one left")
    return admitted[0]


async def assert_flowing(pub: dcp.Connection, sub: dcp.Connection, key: int, tag: bytes) -> None:
    await pub.publish("check", tag, route=encode({key: 1 << sub.port}))
    msg = await sub.next_message(timeout=10)
    assert (msg.topic, msg.payload) == ("check", tag)


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def test_a_broker_raises_its_soft_file_limit_to_the_hard_one_and_says_so(limited_broker) -> None:  # type: ignore[no-untyped-def]
    proc = limited_broker(100, 200)
    before, soft, hard, capacity = capacity_line(proc).groups()
    assert (before, soft, hard) == ("100", "200", "200")
    assert 0 < int(capacity) <= 200 - FD_RESERVE
    code, log = proc.stop()
    assert code == 0, log


async def test_past_its_capacity_a_broker_refuses_with_too_many_connections_and_serves_on(limited_broker) -> None:  # type: ignore[no-untyped-def]
    """The connection past the capacity gets a fatal error frame and is closed; the
    clients already there go on; once one leaves, a new one is admitted again."""
    proc = limited_broker(64, 64)
    capacity = int(capacity_line(proc).group(4))
    assert 2 <= capacity <= 64 - FD_RESERVE
    clients = [await dcp.connect(proc.url, name=f"c{i}", reconnect=False) for i in range(capacity)]
    try:
        got = await raw_attempt(proc)
        assert len(got) == 2 and got[1] == "eof", got
        assert (got[0]["op"], got[0]["code"], got[0]["fatal"]) == ("error", "too_many_connections", True)
        with pytest.raises(RemoteError) as info:  # what an SDK user sees
            await dcp.connect(proc.url, name="one too many", reconnect=False)
        assert info.value.code == "too_many_connections"
        pub, sub = clients[0], clients[1]
        await assert_flowing(pub, sub, proc.key, b"after the refusal")

        await clients.pop().close()
        clients.append(await admitted_once_one_left(proc))
        await assert_flowing(pub, clients[-1], proc.key, b"to the newcomer")
    finally:
        for conn in clients:
            await conn.close()
    code, log = proc.stop()
    assert code == 0, log
    assert "refusing connections (too_many_connections)" in log


async def test_a_burst_past_the_file_limit_neither_kills_nor_spins_the_broker(limited_broker) -> None:  # type: ignore[no-untyped-def]
    """Far more connections at once than the reserve of file descriptors: those past it
    hit EMFILE on accept, which libuv (under uvloop) answers by accepting and closing
    them; the others get too_many_connections.  Every attempt ends, the broker stays
    idle once they have, and it serves and admits as before."""
    proc = limited_broker(64, 64)
    capacity = int(capacity_line(proc).group(4))
    clients = [await dcp.connect(proc.url, name=f"c{i}", reconnect=False) for i in range(capacity)]
    try:
        outcomes = await asyncio.gather(*(raw_attempt(proc) for _ in range(4 * FD_RESERVE)))
        refused = [got for got in outcomes if got and isinstance(got[0], dict)]
        assert refused and all(got[0]["code"] == "too_many_connections" for got in refused)
        assert all(got[-1] in ("eof", "reset") for got in outcomes)
        start = cpu_seconds(proc.process.pid)
        began = time.monotonic()
        await assert_flowing(clients[0], clients[1], proc.key, b"after the burst")
        await asyncio.sleep(0.5)  # a window to measure the broker's CPU in, not a synchronisation
        assert cpu_seconds(proc.process.pid) - start < 0.5 * (time.monotonic() - began), "the broker spins"
        await clients.pop().close()
        clients.append(await admitted_once_one_left(proc))
    finally:
        for conn in clients:
            await conn.close()
    code, log = proc.stop()
    assert code == 0, log


# -- ports at scale ------------------------------------------------------------------------


def test_ports_go_round_robin_the_freed_ones_last_longest_free_first() -> None:
    broker = Broker(BrokerConfig(ports=6, insecure=True))
    conns = [BrokerConnection(broker) for _ in range(7)]
    assert [broker.attach(conn) for conn in conns[:4]] == [0, 1, 2, 3]
    link_port = broker._reserve_port()  # a link's: never handed to an agent
    assert link_port == 4
    broker.detach(conns[2])
    broker.detach(conns[0])
    assert [broker.attach(conn) for conn in conns[4:7]] == [5, 2, 0]  # the never used first, then the longest free
    assert broker.attach(BrokerConnection(broker)) is None
    broker.detach(conns[5])
    broker.detach(conns[1])
    assert broker.attach(conns[1]) == 2 and broker.attach(conns[5]) == 1


def test_targets_are_the_connections_on_the_set_bits_of_the_mask() -> None:
    import random

    rng = random.Random(7)
    broker = Broker(BrokerConfig(ports=300, insecure=True))
    conns = [BrokerConnection(broker) for _ in range(300)]
    for conn in conns:
        broker.attach(conn)
    for conn in rng.sample(conns, 150):
        broker.detach(conn)
    for bits in (0, 1, 2, 16, 17, 100, 300):
        mask = sum(1 << port for port in rng.sample(range(300), bits)) & broker.attached
        expected = tuple(conn for port, conn in enumerate(broker._ports) if conn is not None and mask >> port & 1)
        assert broker.targets(mask) == expected
    everyone = broker.attached
    before = broker.targets(everyone)
    newcomer = BrokerConnection(broker)
    port = broker.attach(newcomer)
    assert port is not None and broker.targets(everyone) == before  # cached, and still right
    assert newcomer in broker.targets(broker.attached)
    replacement = BrokerConnection(broker)  # as a link's new connection takes its port
    broker.attach(replacement, port)
    assert replacement in broker.targets(broker.attached) and newcomer not in broker.targets(broker.attached)


def raise_own_file_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < needed:
        pytest.skip(f"needs {needed} open files; the hard limit is {hard}")
    if soft != resource.RLIM_INFINITY and soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed if hard == resource.RLIM_INFINITY else hard, hard))


async def connect_many(url: str, count: int, name: Callable[[int], str] = "agent-{}".format) -> list[dcp.Connection]:
    conns: list[dcp.Connection] = []
    for start in range(0, count, 100):
        batch = range(start, min(count, start + 100))
        conns += await asyncio.gather(*(dcp.connect(url, name=name(i), reconnect=False) for i in batch))
    return conns


async def test_a_frame_to_the_highest_of_1500_attachments_is_delivered_once(make_broker) -> None:  # type: ignore[no-untyped-def]
    count = 1500
    raise_own_file_limit(2 * count + 256)  # both ends of every connection are in this process
    broker = await make_broker(ports=2000)
    conns = await connect_many(url_of(broker), count)
    try:
        pub, sub = conns[0], max(conns, key=lambda conn: conn.port)
        assert sub.port == count - 1  # ports are handed out in order
        await pub.publish("far", b"once", route=encode(broker.layout.residues(1 << sub.port)))
        msg = await sub.next_message(timeout=10)
        assert (msg.topic, msg.payload) == ("far", b"once")
        assert broker.frames_out == 1 and not +broker.drops
        assert sum(conn.frames_out for conn in broker._connections) == 1  # no other port got it
    finally:
        await asyncio.gather(*(conn.close() for conn in conns))


# -- reports to the orchestrator -------------------------------------------------------------


class FakeOrchestrator(LoopbackServer):
    """Answers a broker's hello and broker_state; keeps every frame it sends, with its
    size, and the attachments they add up to (``view``), checking every delta."""

    def __init__(self) -> None:
        super().__init__()
        self.frames: list[tuple[int, dict[str, Any]]] = []  # (bytes on the wire, body)
        self.view: dict[int, str] = {}
        self.registrations = 0

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                head = await reader.readexactly(HEADER_SIZE)
                header = HEADER.unpack(head)
                payload = await reader.readexactly(header[4] + header[5] + header[6])
            except asyncio.IncompleteReadError:
                return
            body = msgpack.unpackb(payload, raw=False)
            self.frames.append((HEADER_SIZE + len(payload), body))
            self.apply(body)
            if body["op"] == "hello":
                writer.write(encode_control({"op": "welcome", "re": body["id"], "name": "orchestrator", "mode": "orchestrator"}))
            elif "id" in body:
                writer.write(encode_control({"op": "ok", "re": body["id"]}))

    def apply(self, body: dict[str, Any]) -> None:
        op = body["op"]
        if op == "broker_state":
            if body.get("attached") is not None:
                self.view = {item["port"]: item["name"] for item in body["attached"]}
                self.registrations += 1
        elif op == "ports_changed":
            detached, attached = body["detached"], [item["port"] for item in body["attached"]]
            assert not set(detached) & set(attached), body  # a port is in one list of a frame at most
            for port in detached:
                assert port in self.view, f"port {port} detached but not attached: {body}"
                del self.view[port]
            for item in body["attached"]:
                assert item["port"] not in self.view, f"port {item['port']} attached twice: {body}"
                self.view[item["port"]] = item["name"]

    def ops(self, since: int = 0) -> list[str]:
        return [body["op"] for _, body in self.frames[since:]]


def attachments(broker: Broker) -> dict[int, str]:
    return {port: conn.name for port, conn in enumerate(broker._ports) if conn is not None and conn.link is None}


@pytest.fixture
async def orchestrator() -> Any:
    fake = FakeOrchestrator()
    address = await fake.start()
    yield fake, address
    await fake.close()


async def test_reports_are_a_snapshot_then_coalesced_deltas_that_add_up(make_broker, orchestrator) -> None:  # type: ignore[no-untyped-def]
    fake, address = orchestrator
    broker = await make_broker(orchestrator=address, ports=400)
    await until(lambda: fake.registrations == 1, "the registration")
    conns = await connect_many(url_of(broker), 300)
    try:
        await until(lambda: fake.view == attachments(broker), lambda: f"{len(fake.view)} reported, {len(attachments(broker))} attached")
        deltas = fake.ops().count("ports_changed")
        assert 0 < deltas < 300  # coalesced: far fewer frames than attachments
        leaving = conns[::3]
        await asyncio.gather(*(conn.close() for conn in leaving))
        conns = [conn for conn in conns if conn not in leaving] + await connect_many(url_of(broker), 50, "late-{}".format)
        await until(lambda: fake.view == attachments(broker) and len(fake.view) == 250, lambda: f"{len(fake.view)} reported")
        assert fake.registrations == 1 and set(fake.ops()) == {"hello", "broker_state", "ports_changed"}
    finally:
        await asyncio.gather(*(conn.close() for conn in conns))


async def test_changes_within_one_flush_net_out_and_a_link_change_leaves_attachments_alone(make_broker, orchestrator) -> None:  # type: ignore[no-untyped-def]
    fake, address = orchestrator
    broker = await make_broker(orchestrator=address, ports=16)
    await until(lambda: fake.registrations == 1, "the registration")

    def agent(name: str) -> BrokerConnection:
        conn = BrokerConnection(broker)
        conn.name = conn.role = name  # role: any; only agents attach
        return conn

    x, z = agent("x"), agent("z")
    px, pz = broker.attach(x), broker.attach(z)
    await until(lambda: fake.view == {px: "x", pz: "z"}, lambda: f"the first agents: {fake.view}")
    seen = len(fake.frames)
    # all within one loop iteration: one flush
    a = agent("a")
    assert broker.attach(a) is not None
    broker.detach(a)  # came and went
    broker.detach(x)
    assert broker.attach(agent("y"), px) == px  # another agent on x's port
    broker.detach(z)
    assert broker.attach(agent("z"), pz) == pz  # the same name back on the same port
    await until(lambda: fake.view == attachments(broker), lambda: f"{fake.view} != {attachments(broker)}")
    assert fake.view == {px: "y", pz: "z"}
    assert [body for _, body in fake.frames[seen:]] == [
        {"op": "ports_changed", "attached": [], "detached": [px]},
        {"op": "ports_changed", "attached": [{"port": px, "name": "y"}], "detached": []},
    ]
    broker.state_changed()  # as a link does when it changes
    await until(lambda: len(fake.frames) > seen + 2, "the broker state after a link change")
    body = fake.frames[seen + 2][1]
    assert body["op"] == "broker_state" and "attached" not in body and body["key"]
    assert fake.view == {px: "y", pz: "z"} and fake.registrations == 1


async def test_a_registration_is_chunked_within_the_frame_limit(make_broker, orchestrator, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """With a frame limit of 1 KiB: BrokerState with what fits, PortsChanged with the
    rest, right after; deltas are chunked too."""
    monkeypatch.setattr(broker_module, "REPORT_FRAME_BYTES", 1024)
    fake, address = orchestrator
    broker = await make_broker(orchestrator=address, ports=300)
    await until(lambda: fake.registrations == 1, "the registration")
    conns = await connect_many(url_of(broker), 200, "agent-with-a-longer-name-{:04d}".format)
    try:
        await until(lambda: fake.view == attachments(broker), lambda: f"{len(fake.view)} reported")
        seen = len(fake.frames)
        fake.abort_all()  # the broker registers again, with everything
        await until(lambda: fake.registrations == 2 and fake.view == attachments(broker), lambda: f"{len(fake.view)} reported again")
        ops = fake.ops(seen)
        start = ops.index("broker_state")
        assert ops[start + 1 : start + 3] == ["ports_changed", "ports_changed"]  # the rest of the snapshot, in chunks
        assert max(size for size, _ in fake.frames) <= 1024
    finally:
        await asyncio.gather(*(conn.close() for conn in conns))


async def test_no_report_frame_exceeds_64_kib_with_3000_attachments(make_broker, orchestrator) -> None:  # type: ignore[no-untyped-def]
    count = 3000
    raise_own_file_limit(2 * count + 256)
    fake, address = orchestrator
    broker = await make_broker(orchestrator=address, ports=4000)
    await until(lambda: fake.registrations == 1, "the registration")
    conns = await connect_many(url_of(broker), count, "agent-{:05d}-of-a-pipeline-with-a-long-name".format)
    try:
        await until(lambda: fake.view == attachments(broker), lambda: f"{len(fake.view)} reported", timeout=30)
        seen = len(fake.frames)
        fake.abort_all()
        await until(lambda: fake.registrations == 2 and fake.view == attachments(broker), "the registration again", timeout=30)
        assert fake.ops(seen).count("ports_changed") >= 2  # over 64 KiB of attachments: chunked
        assert max(size for size, _ in fake.frames) <= 64 * 1024
    finally:
        await asyncio.gather(*(conn.close() for conn in conns))


@pytest.mark.parametrize("daemon", ["broker", "orchestrator"])
async def test_max_connections_caps_either_daemon_below_its_file_limit(make_broker, tmp_path, daemon: str) -> None:  # type: ignore[no-untyped-def]
    """``max_connections``: the connection past it is refused at accept with
    too_many_connections, counted; the others are served, and one more is admitted once
    one has gone."""
    from dcp.config import OrchestratorConfig
    from dcp.orchestrator import Orchestrator

    if daemon == "broker":
        server: Any = await make_broker(max_connections=2)
    else:
        server = Orchestrator(OrchestratorConfig(listen="127.0.0.1:0", db=str(tmp_path / "do.db"), insecure=True, max_connections=2))
        await server.start()
    url = "dcp://%s:%d" % server.address
    try:
        assert server.capacity == 2
        first = await dcp.connect(url, role="admin", name="one", reconnect=False)
        second = await dcp.connect(url, role="admin", name="two", reconnect=False)
        with pytest.raises(RemoteError) as info:
            await dcp.connect(url, role="admin", name="three", reconnect=False)
        assert info.value.code == "too_many_connections" and "max_connections" in str(info.value)
        assert server.refused == 1
        await first.ping()
        await second.ping()
        await first.close()

        async def admitted() -> bool:
            try:
                conn = await dcp.connect(url, role="admin", name="again", reconnect=False)
            except RemoteError:
                return False
            await conn.close()
            return True

        await until(admitted, "one more admitted once one has gone")
        await second.close()
    finally:
        if daemon == "orchestrator":
            await server.close()
