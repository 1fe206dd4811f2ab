"""Ready-made data processing functions (DPF) any agent can offer as capabilities.

The article's processing functions filter, aggregate, compress and infer.  Inference
and aggregation are application code (see ``dcp demo`` and ``examples/sensing.py``);
these are the generic ones, parameterised from the pipeline spec:

.. code-block:: toml

    [[stage]]
    name = "shrink"
    capability = "compress"
    consumes = ["video"]
    emits = "video.z"
    params = { level = 6 }

``offer_standard_functions(agent)`` makes an agent offer all of them.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from typing import Any

from .agent import DataAgent
from .client import Message
from .errors import ConfigError

__all__ = ["compress", "decompress", "sample", "drop_small", "STANDARD_FUNCTIONS", "offer_standard_functions"]


async def compress(msg: Message, params: dict[str, Any]) -> bytes:
    """zlib-compress the payload (``level`` 0-9, default 6)."""
    level = params.get("level", 6)
    if not isinstance(level, int) or not 0 <= level <= 9:
        raise ConfigError(f"compress: level must be an integer 0-9, got {level!r}")
    return zlib.compress(bytes(msg.payload), level)


async def decompress(msg: Message, params: dict[str, Any]) -> bytes:
    """The inverse of :func:`compress`."""
    return zlib.decompress(bytes(msg.payload))


def _every(params: dict[str, Any]) -> int:
    every = params.get("every", 1)
    if not isinstance(every, int) or every < 1:
        raise ConfigError(f"sample: every must be a positive integer, got {every!r}")
    return every


async def sample(msg: Message, params: dict[str, Any]) -> bytes | None:
    """A filter: pass one frame in ``every`` (by message id, so replicas agree), drop the rest."""
    return bytes(msg.payload) if msg.msg_id % _every(params) == 0 else None


async def drop_small(msg: Message, params: dict[str, Any]) -> bytes | None:
    """A filter: pass frames of at least ``min_bytes`` bytes."""
    return bytes(msg.payload) if len(msg.payload) >= int(params.get("min_bytes", 1)) else None


STANDARD_FUNCTIONS: dict[str, Callable[..., Any]] = {
    "compress": compress,
    "decompress": decompress,
    "sample": sample,
    "drop_small": drop_small,
}


def offer_standard_functions(agent: DataAgent) -> None:
    """Make ``agent`` offer every function of :data:`STANDARD_FUNCTIONS` under its name."""
    for name, function in STANDARD_FUNCTIONS.items():
        agent.capability(name)(function)
