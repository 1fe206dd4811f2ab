"""``dcp cluster``: N broker processes on one host, linked into a named overlay.

Each broker is a real ``dcp broker`` process on an OS-chosen port with a key of its
own.  Links are announced at run time over an admin connection (the same ``link``
request an operator can send), so the launcher learns the port each link took at
both ends and can print the whole overlay, keys and ports, as one JSON line that
``dcp.topology.Overlay.from_dict`` reads.  Ctrl-C/SIGTERM stops every broker
gracefully; a broker that dies on its own stops the cluster with exit status 1.

Brokers are secure by default (admins and peers need tokens), so the launcher gives
them one secret: ``secret_file``, or else a fresh one in a temporary file (mode 0600,
its path said on stderr, deleted when the cluster stops); it issues itself the admin
token its ``link`` requests need, and the brokers their peer tokens.  ``insecure``
starts them ``--insecure`` instead, with no secret.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import sys
import tempfile
import time
import tomllib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .auth import issue_token, load_secret, new_secret, write_secret
from .client import connect
from .errors import ConfigError
from .routing import FAN, KeyLayout, allocate_keys
from .topology import Overlay, shape_edges

__all__ = ["ClusterSpec", "BrokerSpec", "run_cluster", "SHAPES"]

log = logging.getLogger(__name__)

SHAPES = ("line", "ring", "star", "mesh")
_LISTENING = re.compile(r"dcp broker listening on (\S+):(\d+) mode=\w+ key=(\d+) ")
_START_TIMEOUT_S = 30.0
#: Flags the launcher sets itself, refused after ``--``.
_ACCESS_FLAGS = ("--secret-file", "--insecure", "--require-token")


@dataclass(frozen=True)
class BrokerSpec:
    name: str
    key: int | None = None


@dataclass(frozen=True)
class ClusterSpec:
    """Brokers and links; a link ``(a, b)`` means broker ``a`` dials broker ``b``."""

    brokers: tuple[BrokerSpec, ...]
    links: tuple[tuple[str, str], ...]

    @classmethod
    def shape(cls, shape: str, n: int) -> ClusterSpec:
        if shape not in SHAPES:
            raise ConfigError(f"unknown overlay shape {shape!r}; choose one of {', '.join(SHAPES)}")
        if n < 1:
            raise ConfigError(f"a cluster needs at least one broker, got {n}")
        brokers = tuple(BrokerSpec(f"b{i}") for i in range(n))
        return cls(brokers, tuple((f"b{i}", f"b{j}") for i, j in shape_edges(shape, n)))

    @classmethod
    def from_file(cls, path: str | Path) -> ClusterSpec:
        """TOML or JSON: ``brokers = ["a", {name = "b", key = 1031}]``, ``links = [["b", "a"]]``."""
        path = Path(path)
        try:
            text = path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
        try:
            data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text.decode())
        except (ValueError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path} is not valid {'JSON' if path.suffix == '.json' else 'TOML'}: {exc}") from None
        return cls.from_dict(data, str(path))

    @classmethod
    def from_dict(cls, data: Any, where: str = "overlay") -> ClusterSpec:
        if not isinstance(data, dict) or not isinstance(data.get("brokers"), list) or not data["brokers"]:
            raise ConfigError(f"{where}: 'brokers' must be a non-empty list")
        brokers = []
        for i, item in enumerate(data["brokers"]):
            if isinstance(item, str):
                item = {"name": item}
            if not isinstance(item, dict) or not isinstance(item.get("name"), str) or not item["name"]:
                raise ConfigError(f"{where}: brokers[{i}] must be a name or a table with a 'name'")
            key = item.get("key")
            if key is not None and (isinstance(key, bool) or not isinstance(key, int)):
                raise ConfigError(f"{where}: brokers[{i}].key must be an integer")
            brokers.append(BrokerSpec(item["name"], key))
        names = [b.name for b in brokers]
        if len(set(names)) != len(names):
            raise ConfigError(f"{where}: broker names must be unique")
        links = []
        for i, pair in enumerate(data.get("links", [])):
            if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(n, str) for n in pair)):
                raise ConfigError(f"{where}: links[{i}] must be a pair of broker names [dialer, acceptor]")
            for name in pair:
                if name not in names:
                    raise ConfigError(f"{where}: links[{i}] names unknown broker {name!r}")
            if pair[0] == pair[1]:
                raise ConfigError(f"{where}: links[{i}] links {pair[0]!r} to itself")
            links.append((pair[0], pair[1]))
        return cls(tuple(brokers), tuple(links))


class _BrokerProcess:
    def __init__(self, name: str, key: int | None, process: asyncio.subprocess.Process) -> None:
        self.name = name
        self.key = key or 0  # the root key, from the listening line when the broker drew it
        self.layout: KeyLayout | None = None  # all its keys, past 64 ports
        self.process = process
        self.address = ""
        self.relay: asyncio.Task[None] | None = None

    async def wait_listening(self) -> None:
        assert self.process.stderr is not None
        seen = []
        async with asyncio.timeout(_START_TIMEOUT_S):
            while line := (await self.process.stderr.readline()).decode(errors="replace"):
                seen.append(line)
                match = _LISTENING.search(line)
                if match:
                    self.address = f"{match[1]}:{match[2]}"
                    self.key = int(match[3])
                    self.relay = asyncio.get_running_loop().create_task(self._relay())
                    return
        raise ConfigError(f"broker {self.name} exited before listening:\n{''.join(seen)}")

    async def _relay(self) -> None:
        """Pass the broker's log on, each line tagged with its name; never let the pipe fill."""
        assert self.process.stderr is not None
        while line := await self.process.stderr.readline():
            sys.stderr.write(f"[{self.name}] {line.decode(errors='replace')}")


@contextmanager
def cluster_secret(secret_file: str = "", insecure: bool = False) -> Iterator[str]:
    """The secret file the brokers share: ``secret_file``; "" with ``insecure``; else a
    fresh secret in a temporary file (mode 0600), deleted on leaving."""
    if insecure or secret_file:
        yield "" if insecure else secret_file
        return
    with tempfile.TemporaryDirectory(prefix="dcp-cluster-") as folder:
        path = os.path.join(folder, "secret")
        write_secret(path, new_secret())
        yield path


async def start_cluster(
    spec: ClusterSpec, *, host: str = "127.0.0.1", ports: int = 64, broker_args: Sequence[str] = (), secret_file: str = "",
) -> tuple[list[_BrokerProcess], dict[str, Any]]:
    """Start the brokers, link them; return the processes and the overlay as a dict.

    Up to 64 ports, the brokers get the least free primes above ``2**ports`` as keys;
    with more, each draws its key layout and the overlay gives its ``ports`` and ``keys``.
    With ``secret_file`` the brokers share it (admins and peers need tokens: the
    launcher issues its own); without, they run ``--insecure``.

    Raises:
        ConfigError: ``broker_args`` set what the launcher sets (``--secret-file``, ``--insecure``).
    """
    clash = [arg for arg in broker_args if arg.split("=", 1)[0] in _ACCESS_FLAGS]
    if clash:
        raise ConfigError(f"give {', '.join(clash)} to dcp cluster itself (--secret-file, --insecure), not to the brokers after --")
    access = ("--secret-file", secret_file) if secret_file else ("--insecure",)
    secret = load_secret(secret_file) if secret_file else None

    def admin_token() -> str | None:
        return None if secret is None else issue_token(secret, "dcp-cluster", "admin", int(time.time()) + 300)

    one_key = ports <= FAN
    fresh = iter(allocate_keys(len(spec.brokers) if one_key else 0, ports, exclude=[b.key for b in spec.brokers if b.key]))
    procs: list[_BrokerProcess] = []
    try:
        for broker in spec.brokers:
            key = broker.key or (next(fresh) if one_key else None)
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "dcp", "broker", "--listen", f"{host}:0", "--name", broker.name,
                *(("--key", str(key)) if key else ()), "--ports", str(ports), *access, *broker_args,
                stdin=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
                start_new_session=True,  # Ctrl-C reaches the launcher only; it stops the brokers in order
            )
            procs.append(_BrokerProcess(broker.name, key, process))
        await asyncio.gather(*(proc.wait_listening() for proc in procs))
        if not one_key:
            for proc in procs:
                async with connect(f"dcp://{proc.address}", role="admin", reconnect=False, token=admin_token()) as admin:
                    proc.layout = admin.broker_layout
        by_name = {proc.name: proc for proc in procs}
        links = []
        for dialer, acceptor in spec.links:
            async with connect(f"dcp://{by_name[dialer].address}", role="admin", reconnect=False, token=admin_token()) as admin:
                link = await admin.link(by_name[acceptor].address, wait=_START_TIMEOUT_S)
            links.append({"a": dialer, "a_port": link["port"], "b": acceptor, "b_port": link["remote_port"]})
    except BaseException:
        await stop_cluster(procs)
        raise
    overlay = {
        "brokers": {
            proc.name: {"key": proc.key, "address": proc.address}
            if proc.layout is None else {"key": proc.key, "ports": ports, "keys": list(proc.layout.keys), "address": proc.address}
            for proc in procs
        },
        "links": links,
    }
    Overlay.from_dict(overlay)  # the overlay the brokers report must be a valid one
    return procs, overlay


async def stop_cluster(procs: Sequence[_BrokerProcess], timeout: float = 10.0) -> list[int]:
    """SIGTERM every broker, wait, kill stragglers; their exit codes."""
    for proc in procs:
        if proc.process.returncode is None:
            proc.process.terminate()
    codes = []
    for proc in procs:
        try:
            codes.append(await asyncio.wait_for(proc.process.wait(), timeout))
        except asyncio.TimeoutError:
            proc.process.kill()
            codes.append(await proc.process.wait())
        if proc.relay is not None:
            await proc.relay
    return codes


def describe(overlay: dict[str, Any]) -> str:
    lines = [f"{'broker':<8} {'address':<22} key"]
    for name, info in overlay["brokers"].items():
        lines.append(f"{name:<8} {info['address']:<22} {info['key']}")
    for link in overlay["links"]:
        lines.append(f"link {link['a']}:{link['a_port']} -> {link['b']}:{link['b_port']}")
    return "\n".join(lines)


async def run_cluster(
    spec: ClusterSpec,
    stop: asyncio.Event,
    *,
    host: str = "127.0.0.1",
    ports: int = 64,
    broker_args: Sequence[str] = (),
    as_json: bool = False,
    write: str | None = None,
    secret_file: str = "",
    insecure: bool = False,
) -> int:
    """Run the cluster until ``stop`` is set or a broker dies; the exit status.

    The brokers share ``secret_file``; with ``insecure`` none (``--insecure``); with
    neither, a fresh secret in a temporary file, whose path goes to stderr."""
    with cluster_secret(secret_file, insecure) as shared:
        if shared and not secret_file:
            print(
                f"dcp cluster: the brokers share a fresh secret in {shared} until they stop; an admin token: "
                f"dcp token NAME --role admin --secret-file {shared}", file=sys.stderr, flush=True,
            )
        return await _run_cluster(spec, stop, host=host, ports=ports, broker_args=broker_args, as_json=as_json, write=write,
                                  secret_file=shared)


async def _run_cluster(
    spec: ClusterSpec,
    stop: asyncio.Event,
    *,
    host: str,
    ports: int,
    broker_args: Sequence[str],
    as_json: bool,
    write: str | None,
    secret_file: str,
) -> int:
    procs, overlay = await start_cluster(spec, host=host, ports=ports, broker_args=broker_args, secret_file=secret_file)
    if write:
        Path(write).write_text(json.dumps(overlay, indent=2) + "\n")
    print(json.dumps(overlay) if as_json else describe(overlay), flush=True)
    stopped = asyncio.ensure_future(stop.wait())
    died = [asyncio.ensure_future(proc.process.wait()) for proc in procs]
    await asyncio.wait([stopped, *died], return_when=asyncio.FIRST_COMPLETED)
    status = 0
    for proc, fut in zip(procs, died):
        if fut.done():
            log.error("broker %s exited with status %s; stopping the cluster", proc.name, fut.result())
            status = 1
        fut.cancel()
    stopped.cancel()
    codes = await stop_cluster(procs)
    if any(code != 0 for code in codes):
        status = 1
    log.info("cluster stopped: %s", ", ".join(f"{p.name}={c}" for p, c in zip(procs, codes)))
    return status
