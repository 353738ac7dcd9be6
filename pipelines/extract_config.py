"""What ``regionflow extract`` is told and what it reports: ``ExtractConfig`` (validated in ``__post_init__``,
before Ray starts), ``ExtractSummary`` (the JSON summary and exit code), the refusals raised before any work,
and the checks of local inputs. No Ray here.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    from workers.detect.config import BoxMode

from pipelines.cli import ExitCode
from schemas.reasons import ErrorReason
from schemas.store import NUM_ATTRIBUTE_OUTPUTS, NUM_OBJECT_OUTPUTS
from workers.read.tokenizer import MIN_MAX_TOKENS
from workers.store import local_path

DEFAULT_BATCH_SIZE = 4
DEFAULT_SHARDS_IN_FLIGHT = 2
DEFAULT_NUM_BOXES = 36
DEFAULT_MAX_TOKENS = 36
DEFAULT_MAX_PIXELS = 50_000_000

MISSING_SHARDS_SHOWN = 10  # missing shard paths named in the error message
VOCAB_FILES = {"objects": "objects_vocab.txt", "attributes": "attributes_vocab.txt"}
# The flag that most likely fixes a run whose every sample is an error row of this reason.
REASON_HINTS: dict[str, str] = {
    ErrorReason.BOXES_MISSING: "did you mean --boxes fixed (or --boxes adaptive)?",
    ErrorReason.BOXES_INVALID: 'check the samples\' "boxes" / "box_format", or use --boxes fixed',
    ErrorReason.MISSING_CAPTION: "did you mean --captions optional?",
    ErrorReason.IMAGE_TOO_LARGE: "raise --max-pixels",
    ErrorReason.MISSING_IMAGE: "are these image shards (KEY.jpg / KEY.png members)?",
}


class ExtractRefused(RuntimeError):
    """The run cannot start (bad arguments, a store that is not ours or of another config, a held lock);
    nothing was written."""


class ShardsNotFound(ValueError):
    """Local shard files that do not exist (found before Ray starts; refused, exit code 1).

    Attributes:
        paths: the missing files, in the order given (after brace expansion).
    """

    def __init__(self, paths: list[str]) -> None:
        self.paths = paths
        shown = ", ".join(paths[:MISSING_SHARDS_SHOWN])
        more = f", ... ({len(paths)} in all)" if len(paths) > MISSING_SHARDS_SHOWN else ""
        super().__init__(
            f"{len(paths)} shard file(s) do not exist: {shown}{more} "
            "(check the path and any {a..b} brace range)"
        )


@dataclass(frozen=True)
class ExtractConfig:
    """Everything ``regionflow extract`` is told (one per run, passed whole).

    Output-defining fields (they feed the config digest, through the digests they resolve to):
        detector: detector config name (``butd-r101-c4`` | ``tiny``).
        boxes: box selection mode (``fixed`` | ``adaptive`` | ``given``).
        num_boxes: K of ``fixed`` mode.
        weights: checkpoint file, or None for seeded random init (recorded loudly).
        captions: ``required`` | ``optional``.
        max_tokens: caption token limit incl. ``[CLS]`` and ``[SEP]``.
        max_pixels: images above this many pixels are refused before decoding.
        with_cls_prob: store the ``[N, 1601]`` class distribution (float16).
        tokenizer: BERT checkpoint directory with ``tokenizer.json`` (None: the bundled uncased BERT).
    Provenance only: vocab (directory of ``objects_vocab.txt`` / ``attributes_vocab.txt``).
    Execution only (never change output bytes): detectors, batch_size, detector_threads (None: the node's
        cores shared among the detectors), shards_in_flight, overwrite, address, store_shared_fs (a local
        ``--out`` is a filesystem mounted at the same path on every node of the cluster).
    """

    detector: str = "butd-r101-c4"
    boxes: str = "fixed"
    num_boxes: int = DEFAULT_NUM_BOXES
    weights: str | None = None
    captions: str = "required"
    max_tokens: int = DEFAULT_MAX_TOKENS
    max_pixels: int = DEFAULT_MAX_PIXELS
    with_cls_prob: bool = False
    tokenizer: str | None = None
    vocab: str | None = None
    detectors: int = 1
    batch_size: int = DEFAULT_BATCH_SIZE
    detector_threads: int | None = None
    shards_in_flight: int = DEFAULT_SHARDS_IN_FLIGHT
    overwrite: bool = False
    address: str | None = None
    store_shared_fs: bool = False

    def __post_init__(self) -> None:
        for name in ("num_boxes", "max_tokens", "max_pixels", "detectors", "batch_size", "shards_in_flight"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.detector_threads is not None and self.detector_threads < 1:
            raise ValueError(f"detector_threads must be >= 1, got {self.detector_threads}")
        if self.max_tokens < MIN_MAX_TOKENS:
            raise ValueError(
                f"--max-tokens must be >= {MIN_MAX_TOKENS} ([CLS], one word piece and [SEP] count toward it), "
                f"got {self.max_tokens}"
            )
        for name in ("weights", "tokenizer", "vocab"):
            path = getattr(self, name)
            if path is not None and not Path(path).exists():
                raise ValueError(f"--{name} {path}: no such file or directory")
        self._check_choices()
        self.reader_config()  # its own checks (--max-pixels above OpenCV's limit) before Ray starts

    def _check_choices(self) -> None:
        """The named settings are ones regionflow knows (argparse checks them too; a config built in code
        is checked here)."""
        from workers.detect.config import BOX_MODES, detector_config_names
        from workers.read.reader import CAPTION_MODES

        choices = {"detector": detector_config_names(), "boxes": BOX_MODES, "captions": CAPTION_MODES}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")

    def reader_config(self) -> Any:
        from workers.read.reader import ReaderConfig

        return ReaderConfig(
            captions=self.captions, max_pixels=self.max_pixels, require_boxes=self.boxes == "given"
        )

    def selection(self) -> Any:
        from workers.detect.config import BoxSelectionConfig

        if self.boxes == "fixed":
            return BoxSelectionConfig(mode="fixed", num_boxes=self.num_boxes)
        return BoxSelectionConfig(mode=cast("BoxMode", self.boxes))

    def box_source(self) -> str:
        return "given" if self.boxes == "given" else "detector"


@dataclass
class ExtractSummary:
    """The JSON summary printed at the end of a run (and stored, without times, in the manifest's runs)."""

    store: str
    config_digest: str
    shards_total: int
    shards_done: int = 0
    shards_skipped: int = 0
    shards_reextracted: list[dict[str, str]] = field(
        default_factory=list
    )  # shard, what changed (--overwrite)
    failed_shards: list[dict[str, str]] = field(default_factory=list)
    rows: int = 0
    error_rows: int = 0
    error_rows_by_reason: dict[str, int] = field(default_factory=dict)
    startup_s: float = 0.0
    processing_s: float = 0.0
    random_init: bool = True
    weights_digest: str = ""
    device: str = ""
    detector_threads: int = 0
    detector_omp_wait_policy: str = ""
    stray_temporaries_removed: int = 0
    detector_busy_s: float = 0.0
    driver_received_bytes: int = 0  # pickled size of every result the driver fetched (no feature rows)
    driver_cpu_s: float = 0.0  # CPU seconds of the driver process (all its threads) while processing
    max_batches_in_flight: int = 0  # chunks taken from the read streams and not yet written (driver)
    max_images_in_flight: int = 0  # decoded images in those chunks
    max_batches_per_actor: int = 0  # unfinished calls at one detector actor

    @property
    def exit_code(self) -> int:
        return int(ExitCode.SHARDS_FAILED if self.failed_shards else ExitCode.OK)

    @property
    def images_per_s(self) -> float:
        return self.rows / self.processing_s if self.processing_s > 0 else 0.0

    def warnings(self) -> list[str]:
        """What the user most likely got wrong: every sample of this run is an error row of one reason
        (the exit code stays 0: error rows are allowed, §9)."""
        if self.rows or len(self.error_rows_by_reason) != 1:
            return []
        reason = next(iter(self.error_rows_by_reason))
        hint = REASON_HINTS.get(reason, "see the error tables (parts/<shard>.errors.arrow)")
        return [f"all {self.error_rows} samples are error rows ({reason}): {hint}"]

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["warnings"] = self.warnings()
        out["shards_failed"] = len(self.failed_shards)
        out["images_per_s"] = round(self.images_per_s, 3)
        out["startup_s"] = round(self.startup_s, 3)
        out["processing_s"] = round(self.processing_s, 3)
        out["detector_busy_s"] = round(self.detector_busy_s, 3)
        out["driver_cpu_s"] = round(self.driver_cpu_s, 3)
        out["exit_code"] = self.exit_code
        return out


def load_vocabularies(directory: str) -> dict[str, Any]:
    """Object and attribute names of bottom-up attention: line i of ``objects_vocab.txt`` names class
    index i + 1 (index 0 is background / "no attribute"); synonyms stay comma-separated.

    Raises:
        ValueError: a file is missing or has the wrong number of lines (1600 objects, 400 attributes).
    """
    expected = {"objects": NUM_OBJECT_OUTPUTS - 1, "attributes": NUM_ATTRIBUTE_OUTPUTS - 1}
    out: dict[str, Any] = {"first_index": 1}
    for kind, name in VOCAB_FILES.items():
        path = Path(directory) / name
        if not path.is_file():
            raise ValueError(f"--vocab {directory}: no {name}")
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if len(lines) != expected[kind]:
            raise ValueError(f"{path}: {len(lines)} names, expected {expected[kind]}")
        out[kind] = lines
    return out


def missing_local_shards(urls: list[str]) -> list[str]:
    """The local shard paths among ``urls`` (plain paths and ``file://`` URLs) that do not exist, in order; object-store URLs (``s3://``) are not checked here (an unreachable one becomes a failed shard)."""
    return [url for url in urls if (path := local_path(url)) is not None and not os.path.exists(path)]


def absolute(url: str) -> str:
    return url if "://" in url else os.path.abspath(url)
