"""The targets ``dcp bench`` measures, and how to start (or find) each.

* ``dcp-stateless``, ``dcp-stateful``: ``python -m dcp broker`` in either mode;
* ``dcp-verified``: a stateless broker with ``--verify-routes``: every topology number
  must carry the orchestrator's route tag (the publishers sign with the same secret,
  which ``Server.client_args`` hands them); the cost of route authentication;
* ``dcp-commitlog``: dcp with a commit log, dcp's stateful broker appending every
  frame to disk before forwarding it (:mod:`dcp.bench.commitlog`);
* ``relay``: the raw relay of length-prefixed frames (:mod:`dcp.bench.relay`);
* ``nats``, ``redis``, ``mqtt``, ``rabbitmq``, ``zenoh``: external pub/sub brokers
  already running on their default loopback ports (``bench/peers start``), measured
  through their usual Python clients (the ``bench`` extra); zenoh's is a router-mode
  session in a process of its own (:mod:`dcp.bench.zenoh_router`), the workers its
  clients;
* ``mqtt-gateway``, ``mqtt-gateway-dcp``: ``dcp mqtt`` on an orchestrator and a broker
  (:mod:`dcp.bench.mqtt_stack`, three processes), an MQTT publisher (aiomqtt, QoS 0)
  sending through the gateway to an MQTT subscriber of the same gateway, or to a
  :class:`dcp.DataAgent` consuming the topic on the broker; compare them with ``mqtt``
  (Mosquitto, the same clients) in the same run;
* ``nats-jetstream``, ``rabbitmq-quorum``, ``redis-streams``: the established
  persistent queues on the same servers: a JetStream stream in file storage with acked
  publishes (nats-server with JetStream on), a quorum queue with persistent messages
  and publisher confirms, a Redis stream read by a consumer group (redis-server with
  its append-only file, fsync every second).  Each run makes its own stream, queue or
  key and deletes it at the end.  Availability checks what each needs: JetStream on
  (the INFO line says so), RabbitMQ 3.8 or later (quorum queues); for redis-streams it
  says whether the AOF is on, since without it nothing persists.

The in-tree targets are started here, one process each, on a port the OS picks;
their listening line is read from stderr, which is then drained by a thread so the
pipe never fills.
"""

from __future__ import annotations

import collections
import importlib
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .. import __version__

__all__ = ["TARGETS", "IN_TREE", "EXTERNAL", "GATEWAYS", "PUBSUB", "QUEUES", "DEFAULT_ADDRESSES", "Server", "start_server", "availability"]

TARGETS = (
    "dcp-stateless", "dcp-stateful", "dcp-verified", "dcp-commitlog", "relay",
    "nats", "redis", "mqtt", "rabbitmq", "zenoh",
    "nats-jetstream", "rabbitmq-quorum", "redis-streams",
    "mqtt-gateway", "mqtt-gateway-dcp",
)
IN_TREE = TARGETS[:5]
EXTERNAL = TARGETS[5:13]
#: dcp's MQTT gateway, in tree but measured with an external client: run with --targets.
GATEWAYS = TARGETS[13:]
#: Brokers that deliver without storing: what dcp competes with on its own terms.
PUBSUB = ("nats", "redis", "mqtt", "rabbitmq", "zenoh")
#: Established persistent queues: the article's reference (RocketMQ with persistence).
QUEUES = ("nats-jetstream", "rabbitmq-quorum", "redis-streams")
DEFAULT_ADDRESSES = {
    "nats": "127.0.0.1:4222",
    "redis": "127.0.0.1:6379",
    "mqtt": "127.0.0.1:1883",
    "rabbitmq": "127.0.0.1:5672",
    "zenoh": "127.0.0.1:7447",
    "nats-jetstream": "127.0.0.1:4222",
    "rabbitmq-quorum": "127.0.0.1:5672",
    "redis-streams": "127.0.0.1:6379",
}
# The Python client each external target is measured with: (import names, distribution name).
_CLIENTS = {
    "nats": (("nats",), "nats-py"),
    "redis": (("redis.asyncio",), "redis"),
    "mqtt": (("aiomqtt", "paho.mqtt.client"), "aiomqtt"),
    "rabbitmq": (("aio_pika",), "aio-pika"),
    "zenoh": (("zenoh",), "eclipse-zenoh"),
    "nats-jetstream": (("nats.js",), "nats-py"),
    "rabbitmq-quorum": (("aio_pika",), "aio-pika"),
    "redis-streams": (("redis.asyncio",), "redis"),
}
# The server a persistent queue runs on: the same one as that pub/sub target.
_SERVER_OF = {"nats-jetstream": "nats", "rabbitmq-quorum": "rabbitmq", "redis-streams": "redis"}

_DCP_LISTENING = re.compile(r"dcp broker listening on (\S+):(\d+) ")
_RELAY_LISTENING = re.compile(r"relay listening on (\S+):(\d+)")
_STACK_LISTENING = re.compile(r"dcp mqtt stack listening on (\S+):(\d+) broker=(\S+) orchestrator=(\S+)")
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0


@dataclass
class Server:
    """A running target: ``address`` is ``HOST:PORT``; ``process`` is None for an external one."""

    target: str
    address: str
    process: subprocess.Popen[str] | None = None
    log: collections.deque[str] = field(default_factory=lambda: collections.deque(maxlen=200), repr=False)
    workdir: Path | None = None  # removed by stop() (dcp-commitlog's log, dcp-verified's secret)
    client_args: tuple[str, ...] = ()  # what every publisher and subscriber of this server is also given
    _drain: threading.Thread | None = field(default=None, repr=False)

    def stop(self) -> int:
        """SIGTERM, wait (kill after 10 s); the exit code.  A no-op (0) for an external server."""
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._drain is not None:
            self._drain.join(5)
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
        return self.process.returncode

    @property
    def output(self) -> str:
        """The last lines the server wrote to stderr."""
        return "".join(self.log)


def _command(target: str, workdir: Path, extra_args: Sequence[str]) -> tuple[list[str], re.Pattern[str], Path | None]:
    python = [sys.executable, "-m"]
    if target in ("dcp-stateless", "dcp-stateful", "dcp-verified"):
        mode = ["--mode", "stateful"] if target == "dcp-stateful" else []
        own_dir = None
        if target == "dcp-verified":
            workdir.mkdir(parents=True, exist_ok=True)
            own_dir = Path(tempfile.mkdtemp(prefix="verified-", dir=workdir))
            (own_dir / "secret").write_bytes(os.urandom(32).hex().encode())
            (own_dir / "secret").chmod(0o600)  # load_secret refuses a secret others may read
            mode = ["--verify-routes", "--secret-file", str(own_dir / "secret")]
        # --log-level info: the listening line is an info line (one more line per attach, none per frame);
        # --insecure: a loopback benchmark, whose admin clients (soak's stats) have no token
        argv = [*python, "dcp", "broker", "--listen", "127.0.0.1:0", "--log-level", "info", "--insecure", *mode, *extra_args]
        return argv, _DCP_LISTENING, own_dir
    if target == "dcp-commitlog":
        workdir.mkdir(parents=True, exist_ok=True)
        log_dir = Path(tempfile.mkdtemp(prefix="commitlog-", dir=workdir))
        argv = [
            *python, "dcp.bench.commitlog", "--listen", "127.0.0.1:0", "--log-dir", str(log_dir), "--log-level", "info", "--insecure",
            *extra_args,
        ]
        return argv, _DCP_LISTENING, log_dir
    if target == "relay":
        return [*python, "dcp.bench.relay", "--listen", "127.0.0.1:0", *extra_args], _RELAY_LISTENING, None
    if target in GATEWAYS:
        return [*python, "dcp.bench.mqtt_stack", *extra_args], _STACK_LISTENING, None
    raise ValueError(f"unknown target {target!r}; one of {', '.join(TARGETS)}")


def start_server(target: str, workdir: Path, extra_args: Sequence[str] = ()) -> Server:
    """Start an in-tree target (return once it listens), or name a running external one.

    Raises:
        ValueError: an unknown target.
        RuntimeError: the server exited or did not listen within 30 s; an external
            target that is not available (the reason is in the message).
    """
    if target in EXTERNAL:
        ok, detail = availability(target)
        if not ok:
            raise RuntimeError(f"{target} is not available: {detail}")
        return Server(target, DEFAULT_ADDRESSES[target], None)
    argv, listening, own_dir = _command(target, Path(workdir), extra_args)
    process = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    server = Server(target, "", process, workdir=own_dir)
    if target == "dcp-verified":
        assert own_dir is not None
        server.client_args = ("--secret-file", str(own_dir / "secret"))
    lines: queue.Queue[str | None] = queue.Queue()
    listening_seen = threading.Event()

    def drain() -> None:  # all along, so the pipe never fills; lines go to the queue until it listens
        assert process.stderr is not None
        for line in process.stderr:
            server.log.append(line)
            if not listening_seen.is_set():
                lines.put(line)
        lines.put(None)

    server._drain = threading.Thread(target=drain, name=f"{target}-stderr", daemon=True)
    server._drain.start()
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        try:
            line = lines.get(timeout=max(deadline - time.monotonic(), 0.001))
        except queue.Empty:
            server.stop()
            raise RuntimeError(f"{target} did not report listening within {START_TIMEOUT_S:.0f} s:\n{server.output}") from None
        if line is None:
            process.wait()
            server.stop()
            raise RuntimeError(f"{target} exited with {process.returncode} before listening:\n{server.output}")
        match = listening.search(line)
        if match:
            listening_seen.set()
            server.address = f"{match.group(1)}:{match.group(2)}"
            if target in GATEWAYS:  # the dcp subscriber attaches to the broker and registers with the orchestrator
                server.client_args = ("--dcp-broker", match.group(3), "--dcp-orchestrator", match.group(4))
            return server


# -- availability ----------------------------------------------------------------------


def _client_version(target: str) -> tuple[bool, str]:
    modules, dist = _CLIENTS[target]
    errors = []
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as exc:  # ImportError, or a broken install
            errors.append(f"{name}: {exc}")
            continue
        try:
            from importlib.metadata import version

            dist_name = {"paho.mqtt.client": "paho-mqtt"}.get(name, dist)
            return True, f"{dist_name} {version(dist_name)}"
        except Exception:
            return True, name
    return False, f"the Python client is not installed ({'; '.join(errors)}); pip install 'dcp-dataplane[bench]'"


def _server_version(target: str, sock: socket.socket) -> tuple[str, str]:
    """(the server's version, where the protocol says it at once, else ''; why the server
    cannot serve ``target``, else '')."""
    sock.settimeout(1.0)
    server = _SERVER_OF.get(target, target)
    try:
        if server == "nats":  # the server speaks first: INFO {...}
            data = b""
            while b"\r\n" not in data and len(data) < 65536:
                chunk = sock.recv(8192)
                if not chunk:
                    break
                data += chunk
            match = re.search(rb'"version":"([^"]+)"', data)
            version = f"nats-server {match.group(1).decode()}" if match else ""
            if target == "nats-jetstream":
                if not re.search(rb'"jetstream":true', data):
                    return version, f"{version or 'the nats server'} has JetStream off (bench/peers starts it with JetStream on)"
                version += ", JetStream on"
            return version, ""
        if server == "redis":
            sock.sendall(b"INFO server\r\nINFO persistence\r\n")
            data = b""
            while b"aof_enabled:" not in data or not data.endswith(b"\r\n"):
                chunk = sock.recv(8192)
                if not chunk:
                    break
                data += chunk
                if len(data) > 65536:
                    break
            match = re.search(rb"redis_version:(\S+)", data)
            version = f"redis {match.group(1).decode()}" if match else ""
            if target == "redis-streams" and version:
                aof = re.search(rb"aof_enabled:(\d)", data)
                # It still runs without the AOF, but measures a queue that persists nothing: said, not refused.
                version += ", AOF on" if aof and aof.group(1) == b"1" else ", AOF off: the stream is not persisted"
            return version, ""
        if server == "rabbitmq":  # AMQP 0-9-1: the server answers the protocol header with Connection.Start
            sock.sendall(b"AMQP\x00\x00\x09\x01")
            data = sock.recv(8192)
            at = data.find(b"\x07versionS")
            if at < 0:
                return "", ""
            start = at + 9
            length = int.from_bytes(data[start : start + 4], "big")
            number = data[start + 4 : start + 4 + length].decode(errors="replace")
            release = tuple(int(part) for part in re.findall(r"\d+", number)[:2])
            if target == "rabbitmq-quorum" and len(release) == 2 and release < (3, 8):
                return f"rabbitmq {number}", f"rabbitmq {number} has no quorum queues (3.8 or later)"
            return f"rabbitmq {number}", ""
        if server == "zenoh":
            return _zenoh_router_version(sock.getpeername())
    except OSError:
        return "", ""
    return "", ""


def _zenoh_router_version(peer: tuple[str, int]) -> tuple[str, str]:
    """A zenoh client session of the router at ``peer``: the version its admin space reports.

    zenoh's handshake starts with the client, so the listening socket alone says nothing;
    a session that opens says the router answers.
    """
    import json

    import zenoh

    config = zenoh.Config()
    config.insert_json5("mode", json.dumps("client"))
    config.insert_json5("connect/endpoints", json.dumps([f"tcp/{peer[0]}:{peer[1]}"]))
    config.insert_json5("connect/timeout_ms", "2000")
    config.insert_json5("scouting/multicast/enabled", "false")
    try:
        session = zenoh.open(config)
    except zenoh.ZError as exc:
        return "", f"something answers on {peer[0]}:{peer[1]} but no zenoh session opens ({str(exc).split(' at ', 1)[0]})"
    try:
        routers = session.info.routers_zid()
        if not routers:
            return "", f"the zenoh node on {peer[0]}:{peer[1]} is not a router"
        for reply in session.get(f"@/{routers[0]}/router", timeout=2.0):
            if reply.ok is not None:
                version = str(json.loads(reply.ok.payload.to_bytes()).get("version", "")).split(" ", 1)[0].split("-", 1)[0]
                return f"zenoh router {version}", ""
        # The publishers' finish queries the admin space behind their data: without it they cannot end.
        return "zenoh router", "the zenoh router's admin space does not answer (start it with bench/peers start)"
    finally:
        session.close()


def availability(target: str) -> tuple[bool, str]:
    """(True, version) if ``target`` can be measured here; (False, why) otherwise.  Never raises."""
    try:
        if target in IN_TREE:
            return True, f"dcp {__version__}"
        if target in GATEWAYS:
            ok, client = _client_version("mqtt")
            return (True, f"dcp {__version__} (dcp mqtt), client {client}") if ok else (False, client)
        if target not in EXTERNAL:
            return False, f"unknown target {target!r}"
        ok, client = _client_version(target)
        if not ok:
            return False, client
        host, port = DEFAULT_ADDRESSES[target].rsplit(":", 1)
        try:
            sock = socket.create_connection((host, int(port)), timeout=0.5)
        except OSError as exc:
            server_name = _SERVER_OF.get(target, target)
            return False, f"no {server_name} server answers on {host}:{port} ({exc.strerror or exc}); start one with bench/peers start"
        with sock:
            server, lacks = _server_version(target, sock)
        if lacks:
            return False, lacks
        return True, f"{server}, client {client}" if server else f"client {client}"
    except Exception as exc:  # availability is a probe: it reports, it does not fail
        return False, f"probe failed: {type(exc).__name__}: {exc}"
