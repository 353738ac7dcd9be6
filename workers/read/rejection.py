"""The exception a per-sample check raises; the reader turns it into an error row (DESIGN §9 *Accounting*)."""

from __future__ import annotations

from schemas.reasons import ErrorReason


class SampleRejected(Exception):
    """One sample cannot become a store row.

    Attributes:
        reason: the error-table reason code.
        detail: deterministic text (no object addresses, no timestamps) saying what was wrong.
    """

    def __init__(self, reason: ErrorReason, detail: str) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail
