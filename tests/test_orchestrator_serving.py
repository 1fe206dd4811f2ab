"""The orchestrator serves requests in turn: what a connection sends is queued and served
a few milliseconds per loop iteration, one request per connection in turn, in order per
connection; a ping with nothing queued before it is answered as it is read; a connection
with too much waiting is not read until half of it is served; a hello read in time is
not refused for waiting.  An orchestrator started for real (its loop drives the turns),
its connections fed in this process."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from dcp import control
from dcp.config import OrchestratorConfig
from dcp.orchestrator import PENDING_LIMIT, Orchestrator, OrchestratorConnection
from dcp.wire import ControlFrame, Decoder, encode_control

from .waiting import until


class Transport:
    """Records what the orchestrator writes and whether it reads."""

    def __init__(self) -> None:
        self.written = bytearray()
        self.reading = True
        self.pauses = 0
        self.closed = False

    def write(self, data: bytes) -> None:
        self.written += data

    def writelines(self, chunks: list[bytes]) -> None:
        for chunk in chunks:
            self.write(chunk)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        pass

    def get_extra_info(self, name: str) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else None

    def get_write_buffer_size(self) -> int:
        return 0

    def pause_reading(self) -> None:
        assert self.reading, "paused twice"
        self.reading = False
        self.pauses += 1

    def resume_reading(self) -> None:
        assert not self.reading, "resumed while reading"
        self.reading = True

    def replies(self) -> list[dict[str, Any]]:
        return [event.body for event in Decoder().feed(bytes(self.written)) if isinstance(event, ControlFrame)]


@pytest.fixture
async def do() -> AsyncIterator[Orchestrator]:
    orchestrator = Orchestrator(OrchestratorConfig(listen="127.0.0.1:0", db=":memory:", insecure=True))
    await orchestrator.start()
    yield orchestrator
    await orchestrator.close()


def connect(do: Orchestrator) -> tuple[OrchestratorConnection, Transport]:
    conn, transport = OrchestratorConnection(do), Transport()
    conn.connection_made(transport)  # type: ignore[arg-type]
    return conn, transport


def frames(*messages: control.Message) -> bytes:
    return b"".join(encode_control(message.to_body()) for message in messages)


async def admin(do: Orchestrator, name: str) -> tuple[OrchestratorConnection, Transport]:
    conn, transport = connect(do)
    conn.data_received(frames(control.Hello(id=1, role="admin", name=name)))
    await until(lambda: conn.role == "admin", f"{name}'s hello served")
    transport.written.clear()
    return conn, transport


async def test_a_burst_is_served_in_order_over_turns_and_a_ping_is_answered_at_once(do: Orchestrator) -> None:
    busy, busy_out = await admin(do, "busy")
    idle, idle_out = await admin(do, "idle")
    count = 3 * PENDING_LIMIT
    busy.data_received(frames(*(control.Status(id=10 + i, summary=True) for i in range(count))))
    assert busy_out.replies() == [], "served as read, not in turn"
    assert not busy_out.reading and busy_out.pauses == 1, "not paused with more than PENDING_LIMIT waiting"

    idle.data_received(frames(control.Ping(id=7)))
    pong = idle_out.replies()
    assert [(reply["op"], reply["re"]) for reply in pong] == [("pong", 7)], pong
    assert len(busy_out.replies()) < count, "the ping waited for the burst"

    await until(lambda: len(busy_out.replies()) == count, "every status answered")
    assert [reply["re"] for reply in busy_out.replies()] == list(range(10, 10 + count))
    assert busy_out.reading, "reading not resumed once served"
    assert not busy.pending and not do._inbox


async def test_a_ping_after_queued_requests_keeps_its_place(do: Orchestrator) -> None:
    conn, out = await admin(do, "ordered")
    conn.data_received(frames(control.Status(id=1, summary=True), control.Ping(id=2), control.Status(id=3, summary=True)))
    assert out.replies() == []
    await until(lambda: len(out.replies()) == 3, "three replies")
    assert [reply["re"] for reply in out.replies()] == [1, 2, 3]


async def test_a_hello_read_in_time_is_not_refused_for_waiting(do: Orchestrator) -> None:
    conn, out = connect(do)
    conn.data_received(frames(control.Hello(id=1, role="admin", name="late")))
    assert conn.pending and not conn.role
    conn._hello_overdue()  # the deadline passes while the hello waits its turn
    assert not conn.closing and do.hello_timeouts == 0
    await until(lambda: conn.role == "admin", "the hello served")
    assert [reply["op"] for reply in out.replies()] == ["welcome"]


async def test_a_malformed_frame_closes_the_connection_after_what_came_before(do: Orchestrator) -> None:
    conn, out = await admin(do, "sloppy")
    conn.data_received(frames(control.Status(id=1, summary=True), control.Status(id=2, summary=True)))
    conn.data_received(b"\x07" + b"\x00" * 27)  # a header of wire version 7, read before those two are served
    assert out.replies() == [] and len(conn.pending) == 3
    await until(lambda: out.closed, "closed")
    replies = out.replies()
    assert [reply.get("re") for reply in replies[:2]] == [1, 2], replies
    assert (replies[-1]["op"], replies[-1]["code"], replies[-1]["fatal"]) == ("error", "malformed_frame", True)


async def test_an_agent_reports_counters_that_changed_and_unchanged_ones_only_as_a_keepalive(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Thousands of idle agents cost the orchestrator little: a report goes out when the
    counters changed, after a registration, and otherwise every REPORT_KEEPALIVE_S."""
    import asyncio
    import types

    import dcp.agent as agent_module

    clock = [1000.0]
    monkeypatch.setattr(agent_module, "time", types.SimpleNamespace(monotonic=lambda: clock[0]))
    agent = agent_module.DataAgent("idle", report_interval_s=0)
    sent: list[dict[str, Any]] = []
    agent.orchestrator = types.SimpleNamespace(send=sent.append)  # type: ignore[assignment]

    async def turns(n: int = 20) -> int:
        for _ in range(n):
            await asyncio.sleep(0)
        return len(sent)

    task = asyncio.ensure_future(agent._report_loop())
    try:
        assert await turns() == 1, "the first report"
        assert await turns() == 1, "unchanged counters reported again"
        agent.published += 1
        assert await turns() == 2 and sent[-1]["published"] == 1
        clock[0] += agent_module.REPORT_KEEPALIVE_S - 0.1
        assert await turns() == 2
        clock[0] += 0.1
        assert await turns() == 3, "no keepalive"
        agent._reported = None  # as a registration does
        assert await turns() == 4
    finally:
        task.cancel()
