"""Reason codes: why a sample became an error row, or why a tar member was ignored.

The lists are fixed: a new code is a schema change (bump ``SCHEMA_VERSION`` in ``schemas.store``), except an
added ``ErrorReason``: stores without it read as before, and an older regionflow refuses a store that uses it
by name (``validate_errors``: "unknown reason codes"), so v1 stays readable (``member_name_not_utf8`` was
added this way).
Error rows carry an ``ErrorReason`` value in their ``reason`` column; ignored members are counted per
``IgnoredReason`` in each shard's done marker (docs/design.md §9 *Accounting*).
"""

from __future__ import annotations

from enum import StrEnum


class ErrorReason(StrEnum):
    """Why a sample (all members sharing one key) did not become a store row."""

    MISSING_IMAGE = "missing_image"  # no member with an image extension
    MISSING_CAPTION = "missing_caption"  # --captions required and no caption member / empty caption list
    MULTIPLE_IMAGES = "multiple_images"  # e.g. KEY.jpg and KEY.png: ambiguous
    NON_ADJACENT_MEMBERS = "non_adjacent_members"  # members of one key separated by another key
    DUPLICATE_MEMBER = "duplicate_member"  # the same member name twice in one sample
    TAR_TRUNCATED = "tar_truncated"  # the sample was cut by damage in the tar stream
    IMAGE_EMPTY = "image_empty"  # zero-byte image member
    IMAGE_TOO_LARGE = (
        "image_too_large"  # header declares more pixels than --max-pixels (refused before decode)
    )
    IMAGE_UNDECODABLE = "image_undecodable"  # not an image, corrupt or truncated data
    CAPTION_NOT_UTF8 = "caption_not_utf8"
    CAPTION_JSON_INVALID = "caption_json_invalid"  # .json member that is not valid JSON
    CAPTION_INVALID = "caption_invalid"  # JSON that is not an object, or caption(s) of the wrong type
    BOXES_INVALID = "boxes_invalid"  # given boxes malformed, empty area or outside the image
    BOXES_MISSING = "boxes_missing"  # --boxes given and the sample has no boxes
    DETECTOR_OUTPUT_INVALID = "detector_output_invalid"  # non-finite or degenerate detector output
    MEMBER_NAME_NOT_UTF8 = (
        "member_name_not_utf8"  # the key's bytes in the tar are not UTF-8 (shown \xNN-escaped)
    )
    IMAGE_TOO_SMALL = (  # a resized side below the trunk's minimum (3 px), or <= rpn_min_size_px x scale (no RPN
        "image_too_small"  # proposal can pass; butd-r101-c4: a side of 16 px or less); detector._too_small
    )


class IgnoredReason(StrEnum):
    """Why a tar member was counted but not used (the sample itself may still be fine)."""

    UNKNOWN_EXTENSION = "unknown_extension"  # an extension regionflow does not read
    UNSAFE_EXTENSION = (
        "unsafe_extension"  # pickle-like members (.pyd, .pickle, .pkl, .pth, .pt, ...): never decoded
    )
    NOT_A_FILE = "not_a_file"  # directories, links, devices
    CAPTION_UNUSED = "caption_unused"  # a second caption source (.txt beside .json) when one was used


ERROR_REASONS: tuple[str, ...] = tuple(r.value for r in ErrorReason)
IGNORED_REASONS: tuple[str, ...] = tuple(r.value for r in IgnoredReason)


class SampleRejected(Exception):
    """A per-sample check failed: the sample becomes an error row with ``reason`` (the reader turns it into a
    row of the shard's error table, docs/design.md §9 *Accounting*).

    Attributes:
        reason: the error-table reason code.
        detail: deterministic text (no object addresses, no timestamps) saying what was wrong.
    """

    def __init__(self, reason: ErrorReason, detail: str) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail
