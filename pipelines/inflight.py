"""Driver-side measure of what ``regionflow extract`` holds in flight (docs/design.md §5: memory stays flat).

A *batch in flight* is a chunk the driver has taken from a shard's read stream and not yet written to the
store (queued at or running on a detector actor, or finished and waiting for its turn in source order).
Its image count (decoded images: rows plus detector-rejected images) is only known once its result
reaches the driver, so the meter records, for each batch, the interval between its take and its write (or
abandonment) on a logical clock, and folds the intervals into the running maximum once no open batch
can still cover them: memory holds only the intervals of the current window, not the run's history.

No Ray here: ``pipelines/extract.py`` calls it; the tests drive it directly.
"""

from __future__ import annotations

import heapq
from collections import defaultdict


class InFlightMeter:
    """Counts batches in flight exactly and measures the most images in flight at any moment.

    Attributes:
        max_batches: most batches in flight at once.
        max_images: most images in flight at once (final after ``close``; a lower bound before).
    """

    def __init__(self) -> None:
        self._clock = 0
        self._open: dict[int, int] = {}  # token -> tick taken
        self._delta: defaultdict[int, int] = defaultdict(int)  # tick -> change of images in flight
        self._ticks: list[int] = []  # heap of the ticks in _delta
        self._level = 0
        self.max_batches = 0
        self.max_images = 0

    def take(self) -> int:
        """A batch enters flight; returns its token."""
        self._clock += 1
        self._open[self._clock] = self._clock
        self.max_batches = max(self.max_batches, len(self._open))
        return self._clock

    def leave(self, token: int, images: int) -> None:
        """Batch ``token`` left flight (written, or abandoned with an aborted shard attempt) holding
        ``images`` decoded images (for an abandoned batch whose result was never fetched: an upper bound).

        Raises:
            ValueError: ``images`` is negative.
        """
        if images < 0:
            raise ValueError(f"images must be >= 0, got {images}")
        assert token in self._open, f"batch {token} is not in flight"
        self._clock += 1
        taken = self._open.pop(token)
        for tick, change in ((taken, images), (self._clock, -images)):
            if tick not in self._delta:
                heapq.heappush(self._ticks, tick)
            self._delta[tick] += change
        self._fold(min(self._open.values(), default=self._clock + 1))

    def close(self) -> None:
        """Fold everything left (call when the run ends)."""
        assert not self._open, f"{len(self._open)} batches still in flight"
        self._fold(self._clock + 1)

    @property
    def in_flight(self) -> int:
        """Batches in flight now."""
        return len(self._open)

    def _fold(self, before: int) -> None:
        """Apply the changes at ticks < ``before``: no open batch covers them, so their level is final."""
        while self._ticks and self._ticks[0] < before:
            tick = heapq.heappop(self._ticks)
            self._level += self._delta.pop(tick)
            self.max_images = max(self.max_images, self._level)
