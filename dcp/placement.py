"""Placement by load (pure): an agent's load from what it reports, and when an element moves.

An agent's load is the share of its tightest resource in use, in [0, 1]: the largest of
the time its handlers ran in the last report interval (``busy``, summed over its
elements), its receive queue (``pending`` of :data:`PENDING_FULL`), its port's output
queue at its broker (``queue_bytes`` of :data:`QUEUE_FULL`), and 1 while its drop counter
rises.  New elements go to the least loaded candidate (loads within :data:`STEP` of one
another are equal, and the count of elements decides).

An agent saturates at :data:`HIGH` and is relieved only at :data:`LOW` or under
(hysteresis: a load hovering about HIGH does not flip it).  Once saturated for
:data:`SATURATED_S`, it is looked at, at most every :data:`MOVE_GAP_S`: one element moves
to a candidate that is at LOW or under and stays clearly under the saturated agent's load
with the element's share added (:func:`worth_moving`), so a move never just carries the
saturation over; the same element does not move again within MOVE_GAP_S.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

from . import control

__all__ = ["Load", "worth_moving", "pick_move", "HIGH", "LOW", "SATURATED_S", "MOVE_GAP_S", "MARGIN", "STEP", "PENDING_FULL", "QUEUE_FULL"]

#: At or over this load an agent saturates.
HIGH = 0.8
#: At or under this load a saturated agent is relieved, and an agent may take a moved element.
LOW = 0.5
#: A move must leave its target this far under the load its source has now.
MARGIN = 0.1
#: Saturated this long (its reports come every second) before an element moves off it.
SATURATED_S = 3.0
#: At least this long between two looks for a move off one agent, and two moves of one element.
MOVE_GAP_S = 10.0
#: Loads this close count as equal when placing; the count of elements decides between them.
STEP = 0.1
#: Messages waiting in an agent's receive queue that make it full (the agent's default buffer).
PENDING_FULL = 1000
#: Bytes queued at its broker towards an agent that make it full.
QUEUE_FULL = 1 << 20


@dataclass
class Load:
    """One agent's load, as its reports and its broker's ``load`` messages say."""

    busy: float = 0.0  # the share of the last report interval its handlers ran, all together
    shares: dict[str, float] = field(default_factory=dict)  # "pipeline/element" -> its part of busy
    pending: int = 0
    dropped: int = 0  # the agent's drop counter, as last reported
    dropping: bool = False  # it rose at the last report
    queue_bytes: int = 0  # its port's output queue at its broker
    saturated_since: float | None = None
    looked_at: float = float("-inf")  # the last look for a move off it

    @property
    def value(self) -> float:
        return max(
            min(self.busy, 1.0), min(self.pending / PENDING_FULL, 1.0), min(self.queue_bytes / QUEUE_FULL, 1.0),
            1.0 if self.dropping else 0.0,
        )

    @property
    def step(self) -> int:
        """The load as placement compares it: in steps of :data:`STEP`."""
        return int(self.value / STEP)

    def report(self, report: control.Report, now: float) -> None:
        """An agent's report: costs its elements."""
        self.shares = {key: counters.get("busy", 0.0) for key, counters in report.elements.items()}
        self.busy = sum(self.shares.values())
        self.pending = report.pending
        self.dropping = report.dropped > self.dropped
        self.dropped = report.dropped
        self._settle(now)

    def queued(self, queue_bytes: int, now: float) -> None:
        """Its broker's figure for its port's output queue."""
        self.queue_bytes = queue_bytes
        self._settle(now)

    def _settle(self, now: float) -> None:
        value = self.value
        if value >= HIGH:
            if self.saturated_since is None:
                self.saturated_since = now
        elif value <= LOW:
            self.saturated_since = None

    def due(self, now: float) -> bool:
        """Whether to look for a move off this agent now."""
        return (
            self.saturated_since is not None and now - self.saturated_since >= SATURATED_S and now - self.looked_at >= MOVE_GAP_S
        )



def worth_moving(load: float, share: float, target: float) -> bool:
    """Whether an element taking ``share`` of an agent at ``load`` goes to one at ``target``:
    the target has room (LOW or under) and, with the element, stays :data:`MARGIN` under
    the source's load now, so the element would not be moved back."""
    return target <= LOW and target + share + MARGIN <= load


K = TypeVar("K")


def pick_move(
    load: Load, held: Mapping[K, str], target: Callable[[K], tuple[str, float] | None], moved_at: Mapping[K, float], now: float,
) -> tuple[K, str] | None:
    """The element to move off a saturated agent, and where to: its elements (``held``,
    each with its name in reports) by share, largest first, skipping those moved within
    :data:`MOVE_GAP_S`, the first whose least loaded candidate (``target``: its name and
    load, or None) is worth it (:func:`worth_moving`).  An element whose share is not
    reported counts an even part of the load."""
    value = load.value
    even = value / max(len(held), 1)
    shares = {key: load.shares.get(name) or even for key, name in held.items()}
    for key in sorted(shares, key=shares.__getitem__, reverse=True):
        if now - moved_at.get(key, float("-inf")) < MOVE_GAP_S:
            continue
        found = target(key)
        if found is not None and worth_moving(value, shares[key], found[1]):
            return key, found[0]
    return None
