"""Several ``dcp broker`` processes linked by ``dcp cluster``: one data plane, no topic state.

The routes are delivery trees from ``dcp.topology.build_tree`` over the overlay the
cluster reports.  Every member subscriber must get exactly its frames, byte-identical
and in order, with the hop limit decremented once per broker on its path; every
other subscriber nothing.  A fence frame to everybody marks the end (TCP and the
brokers keep order along each path), so no test waits on time.
"""

from __future__ import annotations

import random

import pytest

import dcp
from dcp.topology import Overlay, Tree, build_tree
from dcp.wire import DEFAULT_HOPS

SIZES = [0, 3, 100, 1024, 9000, 70 * 1024, 200 * 1024]


def path_lengths(tree: Tree) -> dict[str, int]:
    """Brokers on the path from the source to each tree broker, both ends included."""
    depth = {tree.source[0]: 1}
    for link in tree.links:  # oriented parent -> child, parents first
        depth[link.b] = depth[link.a] + 1
    return depth


async def collect_until_fence(sub: dcp.Connection) -> list[tuple[str, bytes, int]]:
    got = []
    while True:
        msg = await sub.next_message(timeout=20)
        if msg.topic == "fence":
            return got
        got.append((msg.topic, bytes(msg.payload), msg.hops))


@pytest.mark.parametrize(("shape", "n", "source"), [("line", 3, "b0"), ("line", 4, "b1"), ("ring", 4, "b0"), ("ring", 5, "b2")])
async def test_every_subscriber_on_every_broker_gets_exactly_its_frames(cluster_process, shape: str, n: int, source: str) -> None:
    cluster = cluster_process("-n", str(n), "--topology", shape, "--ports", "16", "--", "--slow-consumer", "pause")
    overlay = Overlay.from_dict(cluster.overlay)
    names = sorted(overlay.keys)
    assert len(overlay.links) == (n - 1 if shape == "line" else n)
    members = {name: await dcp.connect(cluster.url(name), name=f"sub-{name}", reconnect=False) for name in names}
    outsiders = {name: await dcp.connect(cluster.url(name), name=f"out-{name}", reconnect=False) for name in names}
    pub = await dcp.connect(cluster.url(source), name="pub", reconnect=False)
    try:
        for name in names:
            assert members[name].broker_key == outsiders[name].broker_key == overlay.keys[name]
        assert pub.broker_key == overlay.keys[source]
        rng = random.Random(n)
        # Streams: every member, each member alone, and random subsets.
        streams = {"all": names, **{f"only-{name}": [name] for name in names}}
        for i in range(4):
            streams[f"some-{i}"] = sorted(rng.sample(names, rng.randint(1, n)))
        trees = {
            topic: build_tree(overlay, (source, pub.port), [(name, members[name].port) for name in subs])
            for topic, subs in streams.items()
        }
        everyone = [(name, conns[name].port) for conns in (members, outsiders) for name in names]
        fence = build_tree(overlay, (source, pub.port), everyone)
        plan = []
        for i in range(300):
            topic = rng.choice(sorted(streams))
            size = rng.choice(SIZES)
            plan.append((topic, (i.to_bytes(4, "big") + rng.randbytes(size))[: max(size, 4)]))
        for topic, payload in plan:
            await pub.publish(topic, payload, route=trees[topic].x)
        await pub.publish("fence", b"", route=fence.x)

        for name in names:
            depth = {topic: path_lengths(tree).get(name) for topic, tree in trees.items()}
            expected = [(topic, payload, DEFAULT_HOPS - depth[topic]) for topic, payload in plan if name in streams[topic]]
            got = await collect_until_fence(members[name])
            assert len(got) == len(expected), name
            assert got == expected, name
            assert await collect_until_fence(outsiders[name]) == [], name
        for conn in (*members.values(), *outsiders.values(), pub):
            assert conn.pending == 0
        for name in names:
            async with dcp.connect(cluster.url(name), role="admin", reconnect=False) as admin:
                stats = await admin.stats()
            assert not any(stats["drops"].values()), (name, stats["drops"])
            assert all(link["state"] == "up" for link in stats["links"])
            visited = sum(1 for tree in trees.values() if name in tree.brokers)
            assert stats["frames_in"] >= visited  # each tree broker forwarded its frames
    finally:
        for conn in (*members.values(), *outsiders.values(), pub):
            await conn.close()
    code, log = cluster.stop()
    assert code == 0, log
    assert "cluster stopped" in log


async def test_cluster_from_overlay_file(cluster_process, tmp_path) -> None:
    spec = tmp_path / "overlay.toml"
    spec.write_text('brokers = ["hub", "left", {name = "right", key = 18446744073709551629}]\nlinks = [["left", "hub"], ["right", "hub"]]\n')
    written = tmp_path / "out.json"
    cluster = cluster_process("--overlay", str(spec), "--ports", "8", "--write", str(written))
    overlay = Overlay.from_dict(cluster.overlay)
    assert overlay.keys["right"] == 18446744073709551629
    assert {(link.a, link.b) for link in overlay.links} == {("left", "hub"), ("right", "hub")}
    assert Overlay.from_dict(__import__("json").loads(written.read_text())).links == overlay.links
    async with dcp.connect(cluster.url("left")) as pub, dcp.connect(cluster.url("right")) as sub:
        tree = build_tree(overlay, ("left", pub.port), [("right", sub.port)])
        assert tree.brokers == {"left", "hub", "right"}
        await pub.publish("t", b"across the hub", route=tree.x)
        msg = await sub.next_message(timeout=10)
        assert (msg.payload, msg.hops) == (b"across the hub", DEFAULT_HOPS - 3)
    code, log = cluster.stop()
    assert code == 0, log
