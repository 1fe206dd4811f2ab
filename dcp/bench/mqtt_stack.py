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

__all__ = ["main"]

_DAEMONS: tuple[tuple[str, list[str], re.Pattern[str]], ...] = (
    ("orchestrator", ["--db", ":memory:", "--insecure"], re.compile(r"dcp orchestrator listening on (\S+):(\d+) ")),
    ("broker", ["--insecure"], re.compile(r"dcp broker listening on (\S+):(\d+) ")),
    # the largest MQTT packet the gateway takes: the benchmark sends 1 MiB payloads
    ("mqtt", ["--max-packet", str(4 * 1024 * 1024)], re.compile(r"dcp mqtt listening on (\S+):(\d+)")),
)


def _start(command: str, args: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "dcp", command, "--listen", "127.0.0.1:0", "--log-level", "info", *args],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )


def _listening(command: str, process: subprocess.Popen[str], pattern: re.Pattern[str]) -> str:
    """``HOST:PORT`` from the daemon's listening line; then its stderr is drained, so its pipe never fills."""
    assert process.stderr is not None
    seen = []
    for line in process.stderr:
        seen.append(line)
        match = pattern.search(line)
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
            _stop(started)
            sys.exit(0)

    listening = threading.Event()
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        addresses: dict[str, str] = {}
        for command, args, pattern in _DAEMONS:
            if command == "broker":
                args = [*args, "--orchestrator", addresses["orchestrator"]]
            elif command == "mqtt":
                args = [*args, "--broker", f"dcp://{addresses['broker']}", "--orchestrator", f"dcp://{addresses['orchestrator']}"]
            started.append(_start(command, args))
            addresses[command] = _listening(command, started[-1], pattern)
    except RuntimeError as exc:
        print(exc, file=sys.stderr, flush=True)
        _stop(started)
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
    return _stop(started)


def _stop(started: list[subprocess.Popen[str]]) -> int:
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
