"""Waiting on a condition that other tasks or processes move (counters, link states)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any


async def until(predicate: Callable[[], Any], what: str | Callable[[], str], timeout: float = 10.0, interval: float = 0.01) -> None:
    """Poll ``predicate`` (a function or a coroutine function) until it is true; ``what`` (or
    what it returns, evaluated on a timeout) says what was awaited."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what() if callable(what) else what}")
        await asyncio.sleep(interval)
