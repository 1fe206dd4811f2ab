"""What route verification (--verify-routes) costs the broker, per frame, in process.

One broker, a publisher port and a subscriber port with in-memory transports; reads of
64 KiB of frames are fed to the broker's data path as the event loop would, with
verification off and on.  Three streams of frames:

* ``one stream``: every frame has the same X, topic and tag (a publisher's stream):
  the broker decides once per read;
* ``routes cycling``: consecutive frames cycle through 64 topics (64 genuine routes):
  every frame is decided, and its tag is found among those already verified;
* ``new tag each frame``: the same, but every frame carries a tag never seen (the
  worst case, a publisher cycling epochs): one HMAC-SHA256 per frame.

    .venv/bin/python bench/verify_cost.py                 # 1 KiB frames
    .venv/bin/python bench/verify_cost.py --size 64 --repeat 15

Times are the best of ``--repeat`` passes (ns per frame), the broker's whole data path
included (header parsing, decision, hop patching, writes).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from pathlib import Path

from dcp.auth import RouteSigner
from dcp.broker import Broker, BrokerConnection
from dcp.config import BrokerConfig
from dcp.routing import encode
from dcp.wire import encode_data, encode_control

READ = 64 * 1024


class _Sink:
    """A transport that takes everything."""

    def write(self, data: bytes) -> None:
        pass

    def get_extra_info(self, name: str, default: object = None) -> object:
        return default

    def set_write_buffer_limits(self, high: int) -> None:
        pass

    def is_closing(self) -> bool:
        return False


def _broker(verify: bool, secret_file: str, key: int | None = None) -> tuple[Broker, BrokerConnection, BrokerConnection]:
    broker = Broker(BrokerConfig(verify_routes=verify, secret_file=secret_file, key=key))  # a secret: agents need no token
    broker._no_connections = asyncio.Event()
    conns = []
    for _ in range(2):
        conn = BrokerConnection(broker)
        conn.connection_made(_Sink())  # type: ignore[arg-type]
        conn.data_received(encode_control({"op": "hello", "id": 1}))
        conns.append(conn)
    return broker, conns[0], conns[1]


def _reads(frames: list[bytes]) -> list[bytes]:
    reads, current = [], bytearray()
    for frame in frames:
        if current and len(current) + len(frame) > READ:
            reads.append(bytes(current))
            current = bytearray()
        current += frame
    reads.append(bytes(current))
    return reads


def _per_frame_ns(broker: Broker, pub: BrokerConnection, reads: list[bytes], frames: int, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        for data in reads:
            pub.data_received(data)
        best = min(best, time.perf_counter() - start)
    dropped = sum(broker.drops.values())
    if dropped:
        raise SystemExit(f"the broker dropped {dropped} frame(s): {dict(broker.drops)}")
    return best / frames * 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=1024, help="payload bytes (default 1024)")
    parser.add_argument("--frames", type=int, default=20_000, help="frames per pass (default 20000)")
    parser.add_argument("--repeat", type=int, default=9, help="passes; the best counts (default 9)")
    args = parser.parse_args()
    secret = os.urandom(32).hex().encode()
    with tempfile.TemporaryDirectory() as tmp:
        secret_file = Path(tmp) / "secret"
        secret_file.write_bytes(secret)
        secret_file.chmod(0o600)  # load_secret refuses a secret others may read
        signer = RouteSigner(secret)
        expires = int(time.time()) + 3600
        payload = bytes(args.size)
        rows = []
        for name in ("one stream", "routes cycling", "new tag each frame"):
            times = {}
            for verify in (False, True):
                broker, pub, sub = _broker(verify, str(secret_file))
                x = encode({broker.key: 1 << sub.port})
                topics = ["t"] if name == "one stream" else [f"t{i:02d}" for i in range(64)]
                frames = []
                for i in range(args.frames):
                    topic = topics[i % len(topics)]
                    epoch = i if name == "new tag each frame" else 1
                    tag = signer.sign(topic, x, epoch, expires, producer=pub.name, broker_key=broker.key) if verify else None
                    frames.append(encode_data(topic, payload, x, tag=tag))
                reads = _reads(frames)
                if name == "new tag each frame" and verify:  # every pass must meet tags it has not verified yet
                    times[verify] = min(
                        _per_frame_ns(*_broker(verify, str(secret_file), broker.key)[:2], reads, args.frames, 1)  # tags name the key
                        for _ in range(args.repeat)
                    )
                else:
                    times[verify] = _per_frame_ns(broker, pub, reads, args.frames, args.repeat)
            rows.append((name, times[False], times[True]))
    print(f"payload {args.size} B, {args.frames} frames per pass, best of {args.repeat}; ns per frame")
    print(f"{'frames':<22} {'off':>8} {'on':>8} {'on - off':>9}")
    for name, off, on in rows:
        print(f"{name:<22} {off:>8.0f} {on:>8.0f} {on - off:>9.0f}")


if __name__ == "__main__":
    main()
