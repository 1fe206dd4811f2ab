"""Link faults between broker processes: a link cut mid-stream, then restored.

Brokers b1 and b2 link to b0; b1's link runs through a TCP proxy in this test that
can cut every connection it carries and refuse new ones, like a failed network
path.  Frames the cut link could not carry are counted (``link_down``), every other
path keeps flowing, and the link's redial restores delivery with the same topology
number: no process restarts, no route is recomputed.
"""

from __future__ import annotations

import asyncio
from functools import partial
from typing import Any

import pytest

import dcp
from dcp.routing import allocate_keys
from dcp.topology import Overlay, OverlayLink, build_tree
from tests.loopback import LoopbackServer
from tests.waiting import until as wait_until

FAST_LINKS = ("--ports", "16", "--slow-consumer", "pause", "--link-ping-interval-s", "0.1", "--link-timeout-s", "1", "--link-retry-max-s", "0.1")


until = partial(wait_until, timeout=15)


class CuttableProxy(LoopbackServer):
    """Forwards TCP connections to ``target``; ``cut()`` breaks them all until ``restore()``."""

    def __init__(self, target: tuple[str, int]) -> None:
        super().__init__()
        self.target = target
        self.refusing = False
        self.accepted = 0

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.refusing:
            return
        self.accepted += 1
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        self.writers.add(up_writer)
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.transport.abort()
            self.writers.discard(writer)

    def cut(self) -> None:
        self.refusing = True
        self.abort_all()

    def restore(self) -> None:
        self.refusing = False


async def admin_stats(url: str) -> dict[str, Any]:
    async with dcp.connect(url, role="admin", reconnect=False) as admin:
        return await admin.stats()




def link_on(stats: dict[str, Any], port: int) -> dict[str, Any]:
    return next(link for link in stats["links"] if link["port"] == port)


@pytest.fixture
async def star(broker_process) -> Any:  # type: ignore[no-untyped-def]
    """b0 in the middle; b1 -> proxy -> b0, b2 -> b0; subscribers s0, s1, s2, publisher on b0."""
    keys = allocate_keys(3, 16)
    brokers = [broker_process("--ports", "16", "--key", str(key), "--name", f"b{i}", *FAST_LINKS) for i, key in enumerate(keys)]
    proxy = CuttableProxy((brokers[0].host, brokers[0].port))
    via_proxy = await proxy.start()
    async with dcp.connect(brokers[1].url, role="admin") as admin:
        l1 = await admin.link(via_proxy, wait=10)
    async with dcp.connect(brokers[2].url, role="admin") as admin:
        l2 = await admin.link(f"{brokers[0].host}:{brokers[0].port}", wait=10)
    overlay = Overlay(
        {f"b{i}": key for i, key in enumerate(keys)},
        [OverlayLink("b1", l1["port"], "b0", l1["remote_port"]), OverlayLink("b2", l2["port"], "b0", l2["remote_port"])],
    )
    subs = [await dcp.connect(b.url, name=f"s{i}", reconnect=False) for i, b in enumerate(brokers)]
    pub = await dcp.connect(brokers[0].url, name="pub", reconnect=False)
    tree = build_tree(overlay, ("b0", pub.port), [(f"b{i}", s.port) for i, s in enumerate(subs)])
    yield brokers, proxy, subs, pub, tree, l1
    for conn in (*subs, pub):
        await conn.close()
    await proxy.close()
    for broker in brokers:
        code, log = broker.stop()
        assert code == 0, log


async def receive(sub: dcp.Connection, count: int) -> list[int]:
    return [int.from_bytes((await sub.next_message(timeout=10)).payload[:4], "big") for _ in range(count)]


async def publish(pub: dcp.Connection, x: int, seqs: range) -> None:
    for seq in seqs:
        await pub.publish("seq", seq.to_bytes(4, "big") + bytes(seq % 3000), route=x)


async def test_cut_link_counts_what_it_could_not_carry_and_redial_restores_delivery(star) -> None:  # type: ignore[no-untyped-def]
    brokers, proxy, (s0, s1, s2), pub, tree, l1 = star
    b0_url, b1_url = brokers[0].url, brokers[1].url
    b0_port = l1["remote_port"]  # b0's end of the link through the proxy

    await publish(pub, tree.x, range(0, 100))
    for sub in (s0, s1, s2):
        assert await receive(sub, 100) == list(range(100))

    proxy.cut()
    await until(lambda: _state(b0_url, b0_port, "down"), "b0 to see the link down")
    await publish(pub, tree.x, range(100, 150))
    assert await receive(s0, 50) == list(range(100, 150))
    assert await receive(s2, 50) == list(range(100, 150))  # the other link carried on
    stats = await admin_stats(b0_url)
    assert link_on(stats, b0_port)["undelivered"] == 50
    assert stats["drops"]["link_down"] == 50
    assert sum(stats["drops"].values()) == 50
    assert s1.pending == 0

    proxy.restore()
    await until(lambda: _state(b0_url, b0_port, "up"), "b0 to see the link up again")
    await until(lambda: _state(b1_url, l1["port"], "up"), "b1 to see the link up again")
    await publish(pub, tree.x, range(150, 250))
    for sub in (s0, s2):
        assert await receive(sub, 100) == list(range(150, 250))
    assert await receive(s1, 100) == list(range(150, 250))  # the same X: the ports were kept
    b1_link = link_on(await admin_stats(b1_url), l1["port"])
    assert b1_link["connects"] >= 2 and b1_link["remote_port"] == b0_port
    assert proxy.accepted >= 2


async def _state(url: str, port: int, state: str) -> bool:
    return link_on(await admin_stats(url), port)["state"] == state


async def test_cut_during_a_stream_loses_nothing_on_other_paths(star) -> None:  # type: ignore[no-untyped-def]
    brokers, proxy, (s0, s1, s2), pub, tree, l1 = star
    total, cut_at, restore_at = 3000, 1000, 1500

    async def publisher() -> None:
        for seq in range(total):
            if seq == cut_at:
                proxy.cut()
            elif seq == restore_at:
                proxy.restore()
            await publish(pub, tree.x, range(seq, seq + 1))
            if seq % 100 == 0:
                await asyncio.sleep(0)  # let the proxy and the readers run between bursts

    sending = asyncio.ensure_future(publisher())
    got0, got2 = await asyncio.gather(receive(s0, total), receive(s2, total))
    await sending
    assert got0 == got2 == list(range(total))

    # s1 lost what the cut link held or could not carry: it gets an increasing
    # subsequence, nothing twice.  Publish on until the restored link carries frames.
    seen = []
    while not seen or seen[-1] < restore_at:
        try:
            seen.append(int.from_bytes((await s1.next_message(timeout=0.5)).payload[:4], "big"))
        except dcp.errors.DcpTimeout:
            await publish(pub, tree.x, range(total, total + 1))
            total += 1
    while s1.pending:
        seen.append(int.from_bytes((await s1.next_message(timeout=1)).payload[:4], "big"))
    assert seen == sorted(set(seen))  # in order, nothing twice
    missing = set(range(seen[-1])) - set(seen)
    assert missing
    b0 = await admin_stats(brokers[0].url)
    undelivered = link_on(b0, l1["remote_port"])["undelivered"]
    assert 0 < undelivered <= len(missing)  # counted ones are among the missing; the rest died in flight
