"""Reconnect delays, shared by the client SDK and the broker's peer links."""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator
from dataclasses import dataclass

__all__ = ["Backoff"]


@dataclass(frozen=True)
class Backoff:
    """Delays between reconnect attempts: exponential, capped, with jitter."""

    initial_s: float = 0.05
    max_s: float = 5.0
    factor: float = 2.0
    jitter: float = 0.1  # each delay is scaled by a random factor in [1 - jitter, 1 + jitter]
    max_attempts: int | None = None  # None: until close()

    def delays(self) -> Iterator[float]:
        delay = self.initial_s
        attempts = itertools.count() if self.max_attempts is None else range(self.max_attempts)
        for _ in attempts:
            yield delay * random.uniform(1 - self.jitter, 1 + self.jitter)
            delay = min(delay * self.factor, self.max_s)
