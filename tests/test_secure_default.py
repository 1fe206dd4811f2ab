"""Secure by default, and a bounded orchestrator: what an attacker-style review probed,
each a test against real daemons on loopback (ports chosen by the OS, waits on
conditions, never sleeps).

* a daemon with neither ``--secret-file`` nor ``--insecure`` refuses to start; with a
  secret, admins and peers (and at the orchestrator every role) need a token: no
  unauthenticated link, unlink, stats, deploy or broker registration;
* ``--insecure``, and no TLS beyond loopback, are said at start (a warning);
* a second registration under a live agent's name is refused (``name_taken``) unless it
  has a token for that name;
* ``stats`` (broker), ``status`` and ``pipelines`` (orchestrator) are for admins only;
* the orchestrator: a hello deadline, control frames only (``max_control``), bounded
  registrations, agent records that expire after the grace period (memory and sqlite),
  planning that survives a corrupt record;
* a spec's policy rules decide only about its own pipeline's topics.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

import dcp
from dcp.broker import Broker
from dcp.config import BrokerConfig, OrchestratorConfig
from dcp.errors import ConfigError, RemoteError
from dcp.orchestrator import Orchestrator
from dcp.orchestrator_store import Store
from dcp.planner import AgentView, Planner
from dcp.routing import allocate_keys, int_to_bytes
from dcp.topology import Overlay
from dcp.wire import DATA, HEADER, VERSION

from .conftest import url_of
from .test_hardening import Raw, non_loopback_address, secret_file, token  # noqa: F401 (secret_file: a fixture)
from .test_orchestrator import Plane
from .waiting import until

@pytest.fixture
async def daemons() -> AsyncIterator[list[Any]]:
    """Brokers and orchestrators to close at teardown, in reverse order."""
    started: list[Any] = []
    yield started
    for daemon in reversed(started):
        await daemon.close()


async def started(daemons: list[Any], daemon: Any) -> Any:
    await daemon.start()
    daemons.append(daemon)
    return daemon


def addr(daemon: Broker | Orchestrator) -> str:
    return "%s:%d" % daemon.address


def header_of(payload_len: int, ftype: int) -> bytes:
    """A fixed header declaring a frame of ``payload_len`` payload bytes (no X, topic "")."""
    return HEADER.pack(VERSION, ftype, 0, 8, 0, 0, payload_len, 0, 0)


# -- secure by default ---------------------------------------------------------------------


def test_a_daemon_without_a_secret_or_insecure_refuses_to_start(tmp_path: Path) -> None:
    for build in (lambda: Broker(BrokerConfig(listen="127.0.0.1:0")),
                  lambda: Orchestrator(OrchestratorConfig(listen="127.0.0.1:0", db=":memory:"))):
        with pytest.raises(ConfigError) as info:
            build()
        assert "--secret-file" in str(info.value) and "--insecure" in str(info.value)
    for daemon in (["broker"], ["orchestrator", "--db", str(tmp_path / "do.db")]):
        run = subprocess.run([sys.executable, "-m", "dcp", *daemon, "--listen", "127.0.0.1:0"],
                             capture_output=True, text=True, timeout=20)
        assert run.returncode == 1, run.stderr
        assert f"dcp {daemon[0]}: refusing to start without authentication" in run.stderr
        assert "pass --secret-file FILE" in run.stderr and "--insecure" in run.stderr


def test_insecure_and_require_token_contradict_each_other(secret_file: str) -> None:
    for config_class in (BrokerConfig, OrchestratorConfig):
        with pytest.raises(ConfigError, match="contradict"):
            config_class(insecure=True, require_token=True, secret_file=secret_file)


async def test_without_a_token_nobody_links_unlinks_or_reads_a_brokers_stats(daemons: list[Any], secret_file: str) -> None:
    """A broker with a secret, nothing else: admins and peers need a token; agents attach without."""
    broker = await started(daemons, Broker(BrokerConfig(listen="127.0.0.1:0", ports=16, secret_file=secret_file)))
    other = await started(daemons, Broker(BrokerConfig(listen="127.0.0.1:0", ports=16, insecure=True)))
    with pytest.raises(RemoteError) as info:
        await dcp.connect(url_of(broker), role="admin", name="ops", reconnect=False)
    assert info.value.code == "token_missing" and "admin connections only with a token" in str(info.value)
    with pytest.raises(RemoteError) as info:  # a peer (a broker linking in) needs a broker token too
        await dcp.connect(url_of(broker), role="peer", name="fake-peer", reconnect=False)
    assert info.value.code == "token_missing"
    async with dcp.connect(url_of(broker), name="camera", reconnect=False) as agent:  # the data path: no token
        assert agent.port is not None
        with pytest.raises(RemoteError) as info:
            await agent.stats()
        assert info.value.code == "not_admin"
    assert not broker.links
    async with dcp.connect(url_of(broker), role="admin", name="ops", token=token("ops", "admin"), reconnect=False) as admin:
        link = await admin.link(addr(other), wait=10)  # with a token it works
        await admin.unlink(link["port"])
        assert "connections" in await admin.stats()


async def test_without_a_token_nobody_deploys_registers_a_broker_or_an_agent_at_the_orchestrator(
    daemons: list[Any], secret_file: str, tmp_path: Path
) -> None:
    do = await started(daemons, Orchestrator(OrchestratorConfig(listen="127.0.0.1:0", db=str(tmp_path / "do.db"), secret_file=secret_file)))
    for role in ("admin", "broker", "agent"):
        with pytest.raises(RemoteError) as info:
            await dcp.connect(f"dcp://{addr(do)}", role=role, name="intruder", reconnect=False)
        assert info.value.code == "token_missing", role
    assert not do.brokers and not do.agents and not do.pipelines
    async with dcp.connect(f"dcp://{addr(do)}", role="admin", name="ops", token=token("ops", "admin"), reconnect=False) as admin:
        assert (await admin.request({"op": "status", "summary": True}))["status"]["agents"] == 0


async def test_insecure_and_no_tls_beyond_loopback_are_said_at_start(daemons: list[Any], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="dcp")
    await started(daemons, Broker(BrokerConfig(listen="127.0.0.1:0", ports=16, insecure=True)))
    await started(daemons, Orchestrator(OrchestratorConfig(listen="127.0.0.1:0", db=":memory:", insecure=True)))
    insecure = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "INSECURE" in r.getMessage()]
    assert len(insecure) == 2
    assert any("may link and unlink this broker, read its stats" in line for line in insecure)
    assert any("deploy and undeploy pipelines" in line for line in insecure)
    assert not [r for r in caplog.records if "beyond loopback" in r.getMessage()]
    address = non_loopback_address()
    if address is None:
        pytest.skip("this host has no address but loopback")
    await started(daemons, Broker(BrokerConfig(listen=f"{address}:0", ports=16, insecure=True)))
    [line] = [r.getMessage() for r in caplog.records if "beyond loopback" in r.getMessage()]
    assert f"listens on {address}:" in line and "without TLS" in line


# -- names, and who may read what ------------------------------------------------------------


@pytest.fixture
async def plane(tmp_path: Path) -> AsyncIterator[Plane]:
    """An --insecure orchestrator and one broker."""
    plane = Plane(tmp_path / "do.db")
    await plane.start_do(insecure=True, grace_s=0.3, hello_timeout_s=0.3)
    await plane.start_brokers(1)
    yield plane
    await plane.close()


def register_body(plane: Plane, port: int, **lists: list[str]) -> dict[str, Any]:
    return {"op": "register", "capabilities": [], "consumes": [], "produces": [], **lists,
            "broker_key": int_to_bytes(plane.brokers[0].key), "port": port}


async def test_a_live_agents_name_is_not_taken_over_without_a_token(plane: Plane) -> None:
    cam = plane.agent("cam")
    await cam.start()
    assert plane.do is not None
    record = plane.do.agents["cam"]
    first = record.conn
    async with dcp.connect(plane.url(0), name="impostor", reconnect=False) as attached:
        async with dcp.connect(plane.do_url, name="cam", reconnect=False) as impostor:
            with pytest.raises(RemoteError) as info:
                await impostor.request(register_body(plane, attached.port or 0))
            assert info.value.code == "name_taken" and "needs a token" in str(info.value)
            await until(lambda: impostor.status.value == "closed", "the refused connection to close")
    assert plane.do.agents["cam"] is record and record.conn is first and not first.closing  # the agent keeps its name
    assert cam.orchestrator is not None and cam.orchestrator.status.value == "open"


async def test_an_agent_with_a_token_for_its_name_replaces_its_old_connection(
    daemons: list[Any], secret_file: str, tmp_path: Path
) -> None:
    do = await started(daemons, Orchestrator(OrchestratorConfig(listen="127.0.0.1:0", db=str(tmp_path / "do.db"), secret_file=secret_file)))
    broker = await started(daemons, Broker(BrokerConfig(listen="127.0.0.1:0", ports=16, secret_file=secret_file, orchestrator=addr(do))))
    await until(lambda: broker.name in do.brokers, "the broker to register")
    body = {"op": "register", "capabilities": [], "consumes": [], "produces": [], "broker_key": int_to_bytes(broker.key), "port": 3}
    async with dcp.connect(f"dcp://{addr(do)}", name="cam", token=token("cam"), reconnect=False) as old:
        await old.request(body)
        async with dcp.connect(f"dcp://{addr(do)}", name="cam", token=token("cam"), reconnect=False) as new:
            await new.request(body)  # the agent back on a new connection (the old one half open, say)
            await until(lambda: old.status.value == "closed", "the old connection to be replaced")
            assert do.agents["cam"].conn is not None and not do.agents["cam"].conn.closing


async def test_status_pipelines_and_stats_are_for_admins_only(plane: Plane) -> None:
    async with dcp.connect(plane.url(0), name="camera", reconnect=False) as agent:
        with pytest.raises(RemoteError) as info:
            await agent.stats()
        assert info.value.code == "not_admin"
    for role in ("agent", "broker"):
        async with dcp.connect(plane.do_url, role=role, name=f"curious-{role}", reconnect=False) as conn:
            for op in ("status", "pipelines"):
                with pytest.raises(RemoteError) as info:
                    await conn.request({"op": op})
                assert info.value.code == "not_admin", (role, op)
    assert "brokers" in (await plane.admin({"op": "status"}))["status"]


# -- a bounded orchestrator ------------------------------------------------------------------


async def test_an_orchestrator_cuts_a_connection_without_hello_at_its_deadline(plane: Plane) -> None:
    assert plane.do is not None
    raw = await Raw.open(plane.do)  # type: ignore[arg-type]
    try:
        [error] = await raw.until_closed(timeout=15)
    finally:
        raw.close()
    assert (error["op"], error["code"], error["fatal"]) == ("error", "hello_timeout", True)
    assert plane.do.status(True)["connections"]["hello_timeouts"] == 1


@pytest.mark.parametrize("when", ["before hello", "after hello"])
async def test_an_orchestrator_takes_no_frame_over_a_control_frame(plane: Plane, when: str) -> None:
    assert plane.do is not None
    raw = await Raw.open(plane.do)  # type: ignore[arg-type]
    try:
        if when == "after hello":
            assert (await raw.hello(role="admin", name="ops"))["op"] == "welcome"
        raw.writer.write(header_of(1024 * 1024, ftype=DATA) + b"x" * 1000)  # 1 MiB declared, within max_frame
        [error] = await raw.until_closed(timeout=3)
    finally:
        raw.close()
    assert (error["code"], error["fatal"]) == ("frame_too_large", True)


async def test_a_registration_over_its_limits_is_refused_naming_the_field(plane: Plane) -> None:
    async with dcp.connect(plane.url(0), name="greedy", reconnect=False) as attached, \
            dcp.connect(plane.do_url, name="greedy", reconnect=False) as conn:
        for field, values, limit in (
            ("consumes", [f"t.{i}.*" for i in range(1025)], 1024),
            ("produces", [f"t.{i}" for i in range(1025)], 1024),
            ("capabilities", [f"c{i}" for i in range(65)], 64),
        ):
            with pytest.raises(RemoteError) as info:
                await conn.request(register_body(plane, attached.port or 0, **{field: values}))
            assert info.value.code == "too_large"
            assert f"{field}: {len(values)} entries, over the limit of {limit} (max_{field})" in str(info.value)
        await conn.request(register_body(plane, attached.port or 0, consumes=[f"t.{i}.*" for i in range(1024)]))  # at the limit
    assert plane.do is not None and "greedy" in plane.do.agents


async def test_an_agent_gone_past_its_grace_is_deleted_and_its_stream_epochs_kept(plane: Plane) -> None:
    assert plane.do is not None
    do = plane.do
    producer, consumer, got = await plane.pair("t")
    await consumer.start()
    await producer.start()
    await until(lambda: ("producer", "t") in do.streams and do.streams[("producer", "t")].consumers == ["consumer"], "the route")
    epoch = do.streams[("producer", "t")].epoch
    await producer.stop()
    await until(lambda: "producer" not in do.agents, "the producer's record to expire", timeout=10)
    db = sqlite3.connect(str(plane.db))
    try:
        await until(lambda: not db.execute("SELECT name FROM agents WHERE name = 'producer'").fetchall(), "the row to go")
        assert db.execute("SELECT epoch FROM streams WHERE producer = 'producer' AND topic = 't'").fetchall() == [(epoch,)]
    finally:
        db.close()
    assert "producer" not in do.planner.agents and "consumer" in do.agents
    again = plane.agent("producer")
    await again.declare_produces("t")
    await again.start()
    await again.wait_route("t")
    assert do.streams[("producer", "t")].epoch >= epoch and do.streams[("producer", "t")].consumers == ["consumer"]
    assert await again.publish("t", b"back")
    await until(lambda: got == [b"back"], "the returning producer's frame at the consumer")


def corrupt_db(path: Path) -> None:
    """Records an old or damaged file may hold: text that is not JSON, fields of the wrong
    types, a spec that does not parse, an assignment of nothing, a broken stream."""
    Store(path).close()
    db = sqlite3.connect(str(path))
    with db:
        db.execute("INSERT INTO agents VALUES ('not-json', '{', '[]', '[]', '7', 1)")
        db.execute("INSERT INTO agents VALUES ('wrong-types', '[]', '[5]', '[\"a..b\"]', '7', 99999)")
        db.execute("INSERT INTO agents VALUES ('bad-key', '[]', '[]', '[]', 'seven', 1)")
        db.execute("INSERT INTO pipelines VALUES ('broken', '{\"name\": 3}', 1.0)")
        db.execute("INSERT INTO pipelines VALUES ('half', '{', 2.0)")
        db.execute("INSERT INTO assignments VALUES ('nowhere', 'nothing', 'nobody')")
        db.execute("INSERT INTO streams VALUES ('x', 'y', 1, x'01', 'not json')")
        db.execute("INSERT INTO streams VALUES ('x', 'z', 'one', x'01', '[]')")
        db.execute("INSERT INTO brokers VALUES ('bad-broker', 'k', 'a', 16, '[]', NULL)")
        db.execute("INSERT INTO brokers VALUES ('odd-links', '1031', 'a', 16, '[{\"port\": \"x\"}]', NULL)")
    db.close()


async def test_corrupt_records_are_ignored_and_the_rest_is_planned(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="dcp")
    plane = Plane(tmp_path / "do.db")
    corrupt_db(plane.db)
    try:
        await plane.start_do(insecure=True)
        await plane.start_brokers(1)
        producer, consumer, got = await plane.pair("t")
        await consumer.start()
        await producer.start()
        await producer.wait_route("t")
        await until(lambda: plane.do is not None and plane.do.streams[("producer", "t")].consumers == ["consumer"], "the route")
        assert await producer.publish("t", b"planned")
        await until(lambda: got == [b"planned"], "the frame")
    finally:
        await plane.close()
    ignored = [r.getMessage() for r in caplog.records if "ignoring a stored" in r.getMessage()]
    assert len(ignored) == 10, ignored


def test_a_stream_that_cannot_be_planned_is_logged_once_and_the_others_are_planned(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import dcp.planner as planner_module

    real = planner_module.build_tree

    def build_tree(overlay: Overlay, source: Any, consumers: Any) -> Any:
        if source == ("b0", 1):  # the bad producer's: a bug, a record nothing checked
            raise RuntimeError("a record that breaks planning")
        return real(overlay, source, consumers)

    monkeypatch.setattr(planner_module, "build_tree", build_tree)
    caplog.set_level(logging.ERROR, logger="dcp.planner")
    planner = Planner()
    planner.set_overlay(Overlay({"b0": allocate_keys(1, 8)[0]}))
    planner.set_agent("bad", AgentView(("b0", 1), True, (), ("t.bad",)))
    planner.set_agent("good", AgentView(("b0", 2), True, (), ("t.good",)))
    planner.set_agent("sink", AgentView(("b0", 3), True, ("t.>",), ()))
    changed = planner.step()
    assert [(s.producer, s.topic, s.consumers) for s in changed] == [("good", "t.good", ["sink"])]
    assert planner.pending == 0 and planner.failing == 1
    planner.set_overlay(Overlay({"b0": planner.overlay.layouts["b0"]}, []))  # replanned on an overlay change: still failing
    planner.set_agent("sink", AgentView(("b0", 3), True, ("t.>", "u"), ()))
    planner.step()
    assert len([r for r in caplog.records if "cannot plan stream bad/t.bad" in r.getMessage()]) == 1  # logged once
    monkeypatch.setattr(planner_module, "build_tree", real)
    planner.set_overlay(Overlay({"b0": planner.overlay.layouts["b0"]}, []))
    assert [(s.producer, s.consumers) for s in planner.step()] == [("bad", ["sink"])] and planner.failing == 0


# -- policy rules stay in their pipeline ------------------------------------------------------


def source(agent: dcp.DataAgent, capability: str) -> None:
    @agent.capability(capability)
    async def idle(params: dict[str, Any]) -> Any:
        await asyncio.Event().wait()  # emits nothing: only its route matters here
        yield b""


def sink(agent: dcp.DataAgent, capability: str) -> None:
    @agent.capability(capability)
    async def take(msg: dcp.Message, params: dict[str, Any]) -> None:
        pass


async def test_a_specs_rules_decide_about_its_own_topics_only(plane: Plane) -> None:
    """Pipeline a keeps ``spy`` from its video; pipeline b gives spy its data.  Before,
    a's rule (deny spy everything) applied to every pipeline: b could not be deployed."""
    assert plane.do is not None
    camera, watcher, feeder, spy = (plane.agent(name) for name in ("camera", "watcher", "feeder", "spy"))
    source(camera, "camera")
    sink(watcher, "watch")
    source(feeder, "feed")
    sink(spy, "collect")

    @spy.consume("a.video")  # declared by spy itself: a's rules decide about a's topic
    async def peek(msg: dcp.Message) -> None:
        pass

    for agent in (camera, watcher, feeder, spy):
        await agent.start()
    await plane.admin({"op": "deploy", "spec": {
        "name": "a",
        "source": [{"name": "cam", "capability": "camera", "emits": "a.video"}],
        "sink": [{"name": "watch", "capability": "watch", "consumes": ["a.video"]}],
        "policy": [{"agent": "spy", "action": "deny", "consume": [">"]}],
    }})
    reply = await plane.admin({"op": "deploy", "spec": {
        "name": "b",
        "source": [{"name": "feed", "capability": "feed", "emits": "b.data"}],
        "sink": [{"name": "collect", "capability": "collect", "consumes": ["b.data"]}],
    }})
    assert reply["assignments"]["collect"] == ["spy"]
    do = plane.do
    await until(lambda: do.streams.get(("feeder", "b.data")) is not None and do.streams[("feeder", "b.data")].consumers == ["spy"],
                "spy to get b's data")
    await until(lambda: do.streams.get(("camera", "a.video")) is not None and do.streams[("camera", "a.video")].consumers == ["watcher"],
                "a's video to reach the watcher only")
    assert not do.access_policy().allows("spy", "consume", "a.video") and do.access_policy().allows("spy", "consume", "b.data")
    assert "of pipeline 'a'" in do.access_policy().why("spy", "consume", "a.video")


# -- dcp cluster ------------------------------------------------------------------------------


def test_dcp_cluster_shares_a_fresh_secret_by_default() -> None:
    """No flag: the brokers get a fresh secret, link with their tokens, and admit no admin without one."""
    import json
    import signal

    process = subprocess.Popen([sys.executable, "-m", "dcp", "cluster", "-n", "2", "--json"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line, process.stderr.read() if process.stderr else ""
        overlay = json.loads(line)
        assert len(overlay["links"]) == 1

        async def refused() -> str:
            with pytest.raises(RemoteError) as info:
                await dcp.connect("dcp://" + overlay["brokers"]["b0"]["address"], role="admin", reconnect=False)
            return info.value.code

        assert asyncio.run(refused()) == "token_missing"
    finally:
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=20)
    assert process.returncode == 0, err
    assert "the brokers share a fresh secret in" in err
