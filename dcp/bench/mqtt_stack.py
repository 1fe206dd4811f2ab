"""``python -m dcp.bench.mqtt_stack``: what ``dcp bench`` measures as ``mqtt-gateway`` and
``mqtt-gateway-dcp``: an orchestrator, a broker registered with it and ``dcp mqtt``
attached to that broker, each a process of its own (as they would run), on loopback
ports the OS picks.

It prints one line to stderr once the three are up::

    dcp mqtt stack listening on HOST:PORT broker=dcp://HOST:PORT orchestrator=dcp://HOST:PORT

and stops them, the gateway first, on SIGTERM or SIGINT, or when one of them exits.
The daemons run ``--insecure``: a loopback benchmark, as the other in-tree targets; the
gateway takes packets of up to 4 MiB (``--max-packet``), for the 1 MiB messages.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
from types import FrameType

__all__ = ["main", "start_daemon", "stop_daemons"]

_LISTENING = re.compile(r"dcp \w+ listening on (\S+):(\d+)")
_DAEMONS: tuple[tuple[str, list[str]], ...] = (
    ("orchestrator", ["--db", ":memory:", "--insecure"]),
    ("broker", ["--insecure"]),
    # the largest MQTT packet the gateway takes: the benchmark sends 1 MiB payloads
    ("mqtt", ["--max-packet", str(4 * 1024 * 1024)]),
)


def start_daemon(command: str, args: list[str], started: list[subprocess.Popen[str]]) -> str:
    """Run ``dcp COMMAND --listen 127.0.0.1:0 ARGS`` (appended to ``started``) and return its
    ``HOST:PORT`` once it listens; its stderr is drained from then on, so its pipe never fills.

    Raises:
        RuntimeError: it exited before listening (its last lines in the message).
    """
    process = subprocess.Popen(
        [sys.executable, "-m", "dcp", command, "--listen", "127.0.0.1:0", "--log-level", "info", *args],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    started.append(process)
    assert process.stderr is not None
    seen = []
    for line in process.stderr:
        seen.append(line)
        match = _LISTENING.search(line)
        if match:
            threading.Thread(target=process.stderr.read, daemon=True).start()
            return f"{match[1]}:{match[2]}"
    raise RuntimeError(f"dcp {command} exited with {process.wait()} before listening:\n{''.join(seen[-20:])}")


def main() -> int:
    started: list[subprocess.Popen[str]] = []
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()
        if not listening.is_set():  # still starting: stop now, the daemons with us
            stop_daemons(started)
            sys.exit(0)

    listening = threading.Event()
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        addresses: dict[str, str] = {}
        for command, args in _DAEMONS:
            if command == "broker":
                args = [*args, "--orchestrator", addresses["orchestrator"]]
            elif command == "mqtt":
                args = [*args, "--broker", f"dcp://{addresses['broker']}", "--orchestrator", f"dcp://{addresses['orchestrator']}"]
            addresses[command] = start_daemon(command, args, started)
    except RuntimeError as exc:
        print(exc, file=sys.stderr, flush=True)
        stop_daemons(started)
        return 1
    listening.set()
    print(
        f"dcp mqtt stack listening on {addresses['mqtt']} broker=dcp://{addresses['broker']} "
        f"orchestrator=dcp://{addresses['orchestrator']}", file=sys.stderr, flush=True,
    )
    while not stop.wait(0.5):
        if any(process.poll() is not None for process in started):
            print("dcp mqtt stack: a daemon exited; stopping the others", file=sys.stderr, flush=True)
            break
    return stop_daemons(started)


def stop_daemons(started: list[subprocess.Popen[str]]) -> int:
    """SIGTERM each, the last started first; kill what is still up after 10 s.  0 if all exited 0."""
    codes = []
    for process in reversed(started):
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            codes.append(process.wait(10))
        except subprocess.TimeoutExpired:
            process.kill()
            codes.append(process.wait())
    return 0 if all(code == 0 for code in codes) else 1


if __name__ == "__main__":
    sys.exit(main())
