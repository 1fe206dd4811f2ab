"""systemd's notify protocol: a fake ``NOTIFY_SOCKET`` hears READY=1 once a daemon
listens, WATCHDOG=1 at half the ``WATCHDOG_USEC`` interval, and STOPPING=1 on SIGTERM."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from dcp.systemd import Notifier


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = str(tmp_path / "notify")
    sock.bind(path)
    sock.settimeout(20)
    yield sock, path
    sock.close()


def _datagrams(sock: socket.socket) -> Iterator[str]:
    while True:
        yield sock.recv(4096).decode()


def test_the_environment_says_where_to_notify_and_how_often_to_ping() -> None:
    assert Notifier.from_environ({}).address is None and not Notifier.from_environ({}).notify("READY=1")
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": "@dcp", "WATCHDOG_USEC": "3000000"}, pid=7)
    assert (notifier.address, notifier.watchdog_s) == ("@dcp", 1.5)
    assert Notifier.from_environ({"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "8"}, pid=7).watchdog_s is None
    assert Notifier.from_environ({"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "soon"}).watchdog_s is None
    assert not Notifier("/nonexistent/notify").notify("READY=1")  # logged at debug, never raised


def test_an_abstract_socket_address_is_reached(tmp_path: Path) -> None:
    name = f"dcp-test-{tmp_path.name}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(10)
        assert Notifier("@" + name).notify("READY=1", "STATUS=up")
        assert sock.recv(4096) == b"READY=1\nSTATUS=up"


@pytest.mark.parametrize("daemon", ["broker", "orchestrator"])
def test_a_daemon_notifies_ready_pings_the_watchdog_and_says_stopping(
    notify_socket: tuple[socket.socket, str], tmp_path: Path, daemon: str
) -> None:
    sock, path = notify_socket
    extra = ["--db", str(tmp_path / "do.db")] if daemon == "orchestrator" else []
    proc = subprocess.Popen(
        [sys.executable, "-m", "dcp", daemon, "--insecure", "--listen", "127.0.0.1:0", *extra],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "NOTIFY_SOCKET": path, "WATCHDOG_USEC": "200000"},
    )
    try:
        heard = _datagrams(sock)
        ready = next(heard)
        assert ready.startswith(f"READY=1\nSTATUS=dcp {daemon} listening on 127.0.0.1:"), ready
        assert next(heard) == "WATCHDOG=1" and next(heard) == "WATCHDOG=1"  # every 0.1 s
        proc.send_signal(signal.SIGTERM)
        assert "STOPPING=1" in heard  # after the pings still in flight
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


UNITS = sorted((Path(__file__).parent.parent / "deploy" / "systemd").glob("*.service"))


@pytest.mark.parametrize("unit", UNITS, ids=lambda path: path.name)
def test_a_unit_file_runs_a_notify_daemon_with_flags_dcp_takes(unit: Path) -> None:
    import configparser
    import shlex

    from dcp.cli import build_parser

    parsed = configparser.ConfigParser(strict=False, interpolation=None)
    parsed.optionxform = str  # type: ignore[assignment,method-assign]  # keys keep their case
    parsed.read_string(unit.read_text())
    service = parsed["Service"]
    assert (service["Type"], service["KillSignal"]) == ("notify", "SIGTERM") and service["WatchdogSec"]
    for hardening in ("NoNewPrivileges", "ProtectSystem", "PrivateTmp", "RestrictAddressFamilies", "SystemCallFilter"):
        assert hardening in service
    argv = shlex.split(service["ExecStart"])
    assert argv[0].endswith("/dcp")
    args = build_parser().parse_args(argv[1:])  # exits 2 on a flag dcp does not take
    assert args.command == unit.stem.removeprefix("dcp-") and args.log_format == "json"


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze is not installed")
def test_systemd_analyze_verifies_the_units(tmp_path: Path) -> None:
    dcp_command = Path(sys.executable).parent / "dcp"
    assert dcp_command.exists()
    for unit in UNITS:  # the same unit, with the dcp command of this environment
        (tmp_path / unit.name).write_text(unit.read_text().replace("/usr/local/bin/dcp", str(dcp_command)))
    result = subprocess.run(
        ["systemd-analyze", "verify", *(str(tmp_path / unit.name) for unit in UNITS)], capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr
