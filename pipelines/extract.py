"""``regionflow extract``: WebDataset shards → region-feature store, orchestrated with Ray (DESIGN §4, §5).

Data flow and the bounds that keep memory flat::

    driver ──(≤ --shards-in-flight shard streams)──► read task per shard (Ray streaming generator,
       ▲                                               0.25 CPU): read + decode + tokenize, yields
       │                                               ShardChunk objects of ≤ --batch-size images;
       │                                               at most GENERATOR_BACKPRESSURE unconsumed chunks
       │                                               per shard (Ray generator backpressure)
       │         chunk ObjectRef (the image bytes never pass through the driver)
       │                              ▼
       │        pool of --detectors detector actors (num_gpus=1 each on a GPU cluster, num_cpus = their
       │        torch threads): group a chunk's images by size bucket, run the detector, build Arrow rows;
       │        at most ACTOR_QUEUE_DEPTH chunks queued per actor
       │                              │ ChunkRows (Arrow rows + error rows + member counts)
       └──────────────────────────────┘
    driver writes each shard's ChunkRows strictly in chunk order through ``PartWriter`` (fixed
    ROWS_PER_RECORD_BATCH rows per Arrow record batch, so the part bytes do not depend on --batch-size),
    then commits the shard (error table, done marker).

So at any time the run holds at most ``shards_in_flight × GENERATOR_BACKPRESSURE`` chunks waiting in the
read tasks and ``detectors × ACTOR_QUEUE_DEPTH`` chunks taken from the streams and not yet written (at the
detectors, or finished out of order and waiting for their turn: they count until written, so results cannot
pile up behind a slow or restarting actor), each of at most ``batch_size`` images, however large a shard or
the corpus. The summary reports the driver-measured maxima (``max_batches_in_flight``,
``max_images_in_flight``, ``max_batches_per_actor``).

Determinism: an image's features depend only on the image (the detector pads it to a canvas chosen from its
own size, and a chunk's images are batched per bucket), and rows are written in source order by the driver,
so the store does not depend on batch size, actor count, shards in flight or scheduling.

Faults:
- detector actors are created with ``max_restarts`` and ``max_task_retries``: a killed actor is restarted
  and its pending batches re-run on it; the driver writes each chunk's rows exactly once, in order, so a
  retried batch neither duplicates nor drops rows.
- a shard whose stream fails (``ShardReadError``, a crashed read worker, a detector call that fails after
  Ray's retries) is aborted (its temporary part is deleted) and restarted from its first sample, up to
  ``SHARD_ATTEMPTS`` times; Ray's own generator retry is off so that a retried shard is never half-replayed.
  A shard that fails every attempt is a *failed shard*: no part, no marker, listed in the JSON summary and
  in ``manifest.json``; the other shards go on and the exit code is 2.
- resume: a shard with a done marker of this run's config digest is skipped (the marker is trusted,
  ``regionflow inspect --verify`` re-hashes); stray temporaries are deleted; a store of another digest is
  refused unless ``--overwrite``. The marker also records the input the rows came from (normalised URL and
  byte size, a stat): a run whose input for a committed shard has another path or size (a rebuilt tar of
  the same name, a same-named shard from another directory) is refused before any work, naming the shards
  and what differs, unless ``--overwrite``, which re-extracts exactly those shards (listed in the summary's
  ``shards_reextracted``) even under the same config digest. Markers written before the source was
  recorded are trusted as before (logged once). A ``StoreLock`` keeps two runs off one local store (object stores have
  no lock, which is logged).

Exit codes (`pipelines.cli.ExitCode`): 0 every shard completed (error rows allowed); 1 refused before any
work (bad flags, local shard files that do not exist — checked after brace expansion, before Ray starts;
``s3://`` shards are not checked, an unreachable one becomes a failed shard —, a store that is not ours or of
another config, a held lock); 2 some shards failed.
When every sample of the run became an error row of one reason, the summary carries a warning (``warnings``
in the JSON, and logged) with the flag that most likely fixes it; the exit code stays 0.

Ray is started or joined by ``pipelines.ray_runtime.start_ray`` (shared with ``train``): from the folder
holding regionflow's packages, so a user's ``model.py`` cannot shadow ours, and with Ray's noise silenced.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import os
import platform
import socket
import sys
import time
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import pyarrow as pa
import ray

from pipelines.cli import ExitCode, fail
from pipelines.inflight import InFlightMeter
from pipelines.ray_runtime import start_ray
from schemas.manifest import DoneMarker, ShardAccounting, ShardSource, config_digest, new_manifest
from schemas.reasons import ErrorReason
from schemas.store import NUM_ATTRIBUTE_OUTPUTS, NUM_OBJECT_OUTPUTS, PARTS_DIR, SCHEMA_VERSION
from workers.read.tokenizer import MIN_MAX_TOKENS
from workers.rows import ChunkRows, RegionRowBuilder, ShardChunk, shard_chunks
from workers.store import (
    PartWriter,
    StoreLocation,
    StoreLock,
    StoreLockedError,
    discard_shard,
    read_manifest,
    read_marker,
    remove_stray_temporaries,
    write_manifest,
)

logger = logging.getLogger(__name__)

DECODE_TASK_CPUS = 0.25  # a read/decode task's CPU share: it never waits behind the detector
DEFAULT_BATCH_SIZE = 4
DEFAULT_SHARDS_IN_FLIGHT = 2
DEFAULT_NUM_BOXES = 36
DEFAULT_MAX_TOKENS = 36
DEFAULT_MAX_PIXELS = 50_000_000
ACTOR_QUEUE_DEPTH = 2  # chunks submitted to one detector actor and not yet finished
GENERATOR_BACKPRESSURE = 2  # chunks a read task may yield ahead of the driver
ROWS_PER_RECORD_BATCH = 64  # rows per Arrow record batch in a part file (independent of --batch-size)
SHARD_ATTEMPTS = 3
ACTOR_MAX_RESTARTS = 4
ACTOR_MAX_TASK_RETRIES = 4
WAIT_TIMEOUT_S = 1.0
DETECTOR_SEED = 0
OMP_WAIT_POLICY = "OMP_WAIT_POLICY"
OBJECT_STORE_ENV_PREFIX = "AWS_"  # forwarded to read tasks of s3:// shards (read_task_runtime_env)

MISSING_SHARDS_SHOWN = 10  # missing shard paths named in the error message
CHANGED_SHARDS_SHOWN = 5  # shards with another source named in the refusal message
LOCAL_FILE_SCHEME = "file://"
# The flag that most likely fixes a run whose every sample is an error row of this reason.
REASON_HINTS: dict[str, str] = {
    ErrorReason.BOXES_MISSING: "did you mean --boxes fixed (or --boxes adaptive)?",
    ErrorReason.BOXES_INVALID: 'check the samples\' "boxes" / "box_format", or use --boxes fixed',
    ErrorReason.MISSING_CAPTION: "did you mean --captions optional?",
    ErrorReason.IMAGE_TOO_LARGE: "raise --max-pixels",
    ErrorReason.MISSING_IMAGE: "are these image shards (KEY.jpg / KEY.png members)?",
}
VOCAB_FILES = {"objects": "objects_vocab.txt", "attributes": "attributes_vocab.txt"}
VERSIONED_LIBRARIES = (
    "torch",
    "torchvision",
    "ray",
    "pyarrow",
    "opencv-python-headless",
    "webdataset",
    "tokenizers",
    "numpy",
)


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
        cores shared among the detectors), shards_in_flight, overwrite, address.
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
        self.reader_config()  # its own checks (--max-pixels above OpenCV's limit) before Ray starts

    def reader_config(self) -> Any:
        from workers.read.reader import ReaderConfig

        return ReaderConfig(
            captions=self.captions, max_pixels=self.max_pixels, require_boxes=self.boxes == "given"
        )

    def selection(self) -> Any:
        from workers.detect.config import BoxSelectionConfig

        if self.boxes == "fixed":
            return BoxSelectionConfig(mode="fixed", num_boxes=self.num_boxes)
        return BoxSelectionConfig(mode=self.boxes)

    def box_source(self) -> str:
        return "given" if self.boxes == "given" else "detector"


# ---------------------------------------------------------------------------------------------------- CLI


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _max_tokens(text: str) -> int:
    """``--max-tokens``: an int of at least ``MIN_MAX_TOKENS`` (a caption needs ``[CLS]``, a word piece and
    ``[SEP]``)."""
    value = _positive_int(text)
    if value < MIN_MAX_TOKENS:
        raise argparse.ArgumentTypeError(
            f"must be at least {MIN_MAX_TOKENS}: [CLS] and [SEP] count toward the limit and a caption needs "
            f"at least one word piece between them (got {value})"
        )
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``regionflow extract`` (DESIGN §9 *CLI*)."""
    from workers.detect.config import BOX_MODES, detector_config_names
    from workers.read.reader import CAPTION_MODES

    parser.add_argument("shards", nargs="+", metavar="SHARD_URL", help="tar shards; brace ranges allowed")
    parser.add_argument("--out", required=True, metavar="STORE", help="store directory or s3:// prefix")
    parser.add_argument(
        "--config",
        default="butd-r101-c4",
        choices=detector_config_names(),
        help="detector: butd-r101-c4 (bottom-up attention, 2048-d) or tiny (64-d, for tests and quick tries); "
        "default %(default)s",
    )
    parser.add_argument(
        "--boxes",
        default="fixed",
        choices=BOX_MODES,
        help="regions: fixed (the K most confident, see --num-boxes), adaptive (10..100 above confidence "
        '0.2) or given (the sample JSON\'s "boxes"; samples without them become error rows); '
        "default %(default)s",
    )
    parser.add_argument(
        "--num-boxes",
        type=_positive_int,
        default=None,
        metavar="K",
        help=f"K of --boxes fixed ({DEFAULT_NUM_BOXES})",
    )
    parser.add_argument("--weights", metavar="FILE", help="detector checkpoint (default: random init)")
    parser.add_argument("--vocab", metavar="DIR", help="objects_vocab.txt / attributes_vocab.txt folder")
    parser.add_argument(
        "--captions",
        default="required",
        choices=CAPTION_MODES,
        help="required: a sample without a caption becomes an error row; optional: it is kept with no "
        "captions; default %(default)s",
    )
    parser.add_argument(
        "--max-tokens",
        type=_max_tokens,
        default=DEFAULT_MAX_TOKENS,
        metavar="N",
        help=f"caption length limit in word pieces, [CLS] and [SEP] included (at least {MIN_MAX_TOKENS}); "
        "longer captions are cut and flagged; default %(default)s",
    )
    parser.add_argument(
        "--max-pixels",
        type=_positive_int,
        default=DEFAULT_MAX_PIXELS,
        metavar="N",
        help="images with more pixels (width x height, read from the header) become error rows without "
        "being decoded; default %(default)s",
    )
    parser.add_argument(
        "--detectors",
        type=_positive_int,
        default=1,
        metavar="N",
        help="detector actors (at most one per GPU on a GPU cluster); default %(default)s",
    )
    parser.add_argument(
        "--batch-size",
        type=_positive_int,
        default=DEFAULT_BATCH_SIZE,
        metavar="N",
        help="images per detector call (memory, not output); default %(default)s",
    )
    parser.add_argument(
        "--detector-threads",
        type=_positive_int,
        default=None,
        metavar="N",
        help="torch threads per detector actor (default: the node's cores shared among the detectors)",
    )
    parser.add_argument(
        "--shards-in-flight",
        type=_positive_int,
        default=DEFAULT_SHARDS_IN_FLIGHT,
        metavar="N",
        help="shards read at the same time (memory, not output); default %(default)s",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a store of another config")
    parser.add_argument("--address", help="join this Ray cluster (default: start Ray locally)")
    parser.add_argument("--with-cls-prob", action="store_true", help="store [N, 1601] class probabilities")
    parser.add_argument("--tokenizer", metavar="DIR", help="BERT checkpoint folder with tokenizer.json")


def config_from_args(args: argparse.Namespace) -> ExtractConfig:
    """The ``ExtractConfig`` of parsed CLI arguments.

    Raises:
        ValueError: inconsistent or invalid flags (message names the flag).
    """
    if args.num_boxes is not None and args.boxes != "fixed":
        raise ValueError(f"--num-boxes applies to --boxes fixed only (got --boxes {args.boxes})")
    return ExtractConfig(
        detector=args.config,
        boxes=args.boxes,
        num_boxes=args.num_boxes or DEFAULT_NUM_BOXES,
        weights=args.weights,
        captions=args.captions,
        max_tokens=args.max_tokens,
        max_pixels=args.max_pixels,
        with_cls_prob=args.with_cls_prob,
        tokenizer=args.tokenizer,
        vocab=args.vocab,
        detectors=args.detectors,
        batch_size=args.batch_size,
        detector_threads=args.detector_threads,
        shards_in_flight=args.shards_in_flight,
        overwrite=args.overwrite,
        address=args.address,
    )


def run(args: argparse.Namespace) -> int:
    """Run ``regionflow extract``; prints the JSON summary; returns an `ExitCode`: OK, BAD_INPUT (refused,
    or missing local shard files, before Ray starts) or SHARDS_FAILED."""
    try:
        config = config_from_args(args)
        summary = extract(args.shards, args.out, config)
    except (ShardsNotFound, ExtractRefused, ValueError, StoreLockedError) as exc:
        return fail("extract", exc)
    print(json.dumps(summary.to_dict(), indent=1, sort_keys=True))
    return summary.exit_code


# ------------------------------------------------------------------------------------------------ Ray parts


@dataclass(frozen=True)
class DetectorSpec:
    """What a detector actor builds (sent to every actor)."""

    config_name: str
    selection: Any  # BoxSelectionConfig
    weights: str | None
    threads: int
    with_cls_prob: bool
    box_source: str


@dataclass(frozen=True)
class DetectorInfo:
    """What the built detector reports back: the provenance the config digest and manifest need."""

    config: dict[str, Any]
    feature_dim: int
    weights_digest: str
    random_init: bool
    device: str
    threads: int
    omp_wait_policy: str = ""


@dataclass(frozen=True)
class FaultInjection:
    """Test hook: the detector actor that receives chunk ``chunk_index`` of ``shard`` kills its own process
    (``os._exit``) unless ``once_file`` exists, which it creates first, so the retry on the restarted actor
    succeeds."""

    shard: str
    chunk_index: int
    once_file: str


class DetectorActor:
    """Thin Ray actor shell around ``RegionDetector`` + ``RegionRowBuilder`` (wrapped with ``ray.remote``)."""

    def __init__(self, spec: DetectorSpec, fault: FaultInjection | None = None) -> None:
        import torch

        from workers.detect.config import detector_config
        from workers.detect.detector import RegionDetector

        torch.set_num_threads(spec.threads)
        self.spec, self.fault = spec, fault
        self.detector = RegionDetector(
            detector_config(spec.config_name),
            spec.selection,
            weights=spec.weights,
            threads=spec.threads,
            seed=DETECTOR_SEED,
            with_cls_prob=spec.with_cls_prob,
        )
        self.builder = RegionRowBuilder(
            self.detector, box_source=spec.box_source, with_cls_prob=spec.with_cls_prob
        )

    def describe(self) -> DetectorInfo:
        import torch

        from workers.detect.config import detector_config

        return DetectorInfo(
            config=detector_config(self.spec.config_name).to_dict(),
            feature_dim=int(self.detector.feature_dim),
            weights_digest=str(self.detector.weights_digest),
            random_init=bool(self.detector.random_init),
            device=str(self.detector.device),
            threads=torch.get_num_threads(),
            omp_wait_policy=os.environ.get(OMP_WAIT_POLICY, ""),
        )

    def process(self, chunk: ShardChunk) -> ChunkRows:
        fault = self.fault
        if fault and chunk.shard == fault.shard and chunk.index == fault.chunk_index:
            if not os.path.exists(fault.once_file):
                Path(fault.once_file).touch()
                os._exit(1)
        return self.builder.process(chunk)


def _read_shard(
    url: str, reader_config: Any, tokenizer_dir: str | None, max_tokens: int, batch_size: int
) -> Iterator[ShardChunk]:
    """Body of the per-shard read task: ``workers.rows.shard_chunks`` with this worker's tokenizer."""
    yield from shard_chunks(url, reader_config, _tokenizer(tokenizer_dir, max_tokens), batch_size)


@functools.lru_cache(maxsize=4)
def _tokenizer(checkpoint_dir: str | None, max_tokens: int) -> Any:
    """One ``CaptionTokenizer`` per worker process and setting (built on first use)."""
    from workers.read.tokenizer import CaptionTokenizer

    return CaptionTokenizer(checkpoint_dir=checkpoint_dir, max_tokens=max_tokens)


def _warm_read_worker(tokenizer_dir: str | None, max_tokens: int) -> int:
    """Import the reader and build the tokenizer in a read worker during start-up (not timed as
    processing); Ray reuses the warmed worker processes for the read tasks."""
    import workers.read.reader  # noqa: F401

    _tokenizer(tokenizer_dir, max_tokens)
    return os.getpid()


warm_read_worker_task = ray.remote(num_cpus=DECODE_TASK_CPUS)(_warm_read_worker)

read_shard_task = ray.remote(
    num_returns="streaming",
    num_cpus=DECODE_TASK_CPUS,
    max_retries=0,
    _generator_backpressure_num_objects=GENERATOR_BACKPRESSURE,
)(_read_shard)


@dataclass(frozen=True)
class RayResources:
    """How the run uses Ray: whether it started Ray, and each detector actor's reservation."""

    started_ray: bool
    actor_cpus: float
    actor_gpus: int
    threads: int


def _start_ray(config: ExtractConfig) -> RayResources:
    """``ray.init`` (local, or ``--address``) unless Ray is already up; choose the actors' reservations.

    Each detector actor reserves ``num_cpus`` = its torch threads, capped so that ``shards_in_flight`` read
    tasks (``DECODE_TASK_CPUS`` each) always fit beside the actors; ``num_gpus=1`` when the cluster has GPUs.

    Raises:
        ExtractRefused: more detectors than GPUs on a GPU cluster.
    """
    started = start_ray(config.address, num_cpus=os.cpu_count() or 1)
    total = ray.cluster_resources()
    gpus = int(total.get("GPU", 0))
    if gpus and config.detectors > gpus:
        raise ExtractRefused(f"--detectors {config.detectors} but the cluster has {gpus} GPUs")
    threads = config.detector_threads or _default_threads(config.detectors, gpus)
    room = (total.get("CPU", 1) - config.shards_in_flight * DECODE_TASK_CPUS) / config.detectors
    actor_cpus = round(max(min(threads, room), 0.01), 2)
    if actor_cpus < threads:
        logger.info("detector actors reserve %.2f CPUs each (they run %d threads)", actor_cpus, threads)
    return RayResources(started, actor_cpus, 1 if gpus else 0, threads)


def _default_threads(detectors: int, gpus: int) -> int:
    """Torch threads per detector actor when ``--detector-threads`` is not given: a node's cores shared by
    the actors on it (on a GPU cluster one actor per GPU of a GPU node; otherwise all actors on the
    largest node, as in a local run)."""
    nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
    if gpus:
        node = max((r for r in nodes if r.get("GPU", 0) >= 1), key=lambda r: r["GPU"])
        return max(1, int(node.get("CPU", 1) // node["GPU"]))
    node_cpus = max((r.get("CPU", 1) for r in nodes), default=1)
    return max(1, int(node_cpus // detectors))


class DetectorPool:
    """``--detectors`` detector actors; each takes at most ``ACTOR_QUEUE_DEPTH`` chunks at a time."""

    def __init__(self, spec: DetectorSpec, resources: RayResources, count: int, fault: FaultInjection | None):
        self.spec, self.resources, self.fault = spec, resources, fault
        self.actors = [self._new_actor() for _ in range(count)]
        self.load = [0] * count
        self.max_load = 0  # most unfinished calls one actor had (reported in the summary)
        self.calls: dict[ray.ObjectRef, int] = {}  # unfinished call -> actor index

    def _new_actor(self) -> Any:
        actor_class = ray.remote(DetectorActor).options(
            num_cpus=self.resources.actor_cpus,
            num_gpus=self.resources.actor_gpus,
            max_restarts=ACTOR_MAX_RESTARTS,
            max_task_retries=ACTOR_MAX_TASK_RETRIES,
            runtime_env={"env_vars": detector_env_vars()},
        )
        return actor_class.remote(self.spec, self.fault)

    def describe(self) -> DetectorInfo:
        """Wait until every actor has built its model; the first one's provenance (all must agree)."""
        infos = ray.get([actor.describe.remote() for actor in self.actors])
        digests = {info.weights_digest for info in infos}
        assert len(digests) == 1, f"detector actors disagree on their weights: {digests}"
        return infos[0]

    def has_room(self) -> bool:
        return min(self.load) < ACTOR_QUEUE_DEPTH

    @property
    def capacity(self) -> int:
        """Chunks the run may hold between its read streams and the store: ``ACTOR_QUEUE_DEPTH`` per actor."""
        return len(self.actors) * ACTOR_QUEUE_DEPTH

    def submit(self, chunk_ref: ray.ObjectRef) -> tuple[ray.ObjectRef, int]:
        index = min(range(len(self.actors)), key=lambda i: self.load[i])
        result = self.actors[index].process.remote(chunk_ref)
        self.load[index] += 1
        self.max_load = max(self.max_load, self.load[index])
        self.calls[result] = index
        return result, index

    def reap(self) -> bool:
        """Free the slots of finished calls; True if any finished."""
        if not self.calls:
            return False
        done, _ = ray.wait(list(self.calls), num_returns=len(self.calls), timeout=0)
        for ref in done:
            self.load[self.calls.pop(ref)] -= 1
        return bool(done)

    def replace(self, index: int) -> None:
        """Replace a dead actor (its restarts used up) with a fresh one."""
        logger.warning(
            "detector actor %d is dead after %d restarts; starting a new one", index, ACTOR_MAX_RESTARTS
        )
        self.actors[index] = self._new_actor()

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor)


# --------------------------------------------------------------------------------------------- scheduling


@dataclass
class ShardRun:
    """One attempt at one shard: its stream of chunks, the detector calls in flight (in chunk order), and
    the part being written."""

    url: str
    shard: str
    attempt: int
    stream: Any  # ray.ObjectRefGenerator
    writer: PartWriter
    pending: deque[tuple[ray.ObjectRef, int, int]] = field(default_factory=deque)  # call, actor, meter token
    exhausted: bool = False
    buffered: list[pa.Table] = field(default_factory=list)
    buffered_rows: int = 0
    errors: int = 0
    error_reasons: Counter[str] = field(default_factory=Counter)
    members_used: int = 0
    members_in_errors: int = 0
    counts: Any = None  # MemberCounts from the last chunk


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
        out["exit_code"] = self.exit_code
        return out


class ShardScheduler:
    """Runs shards through the read tasks and the detector pool, writing rows in source order.

    Args:
        location: the store.
        digest: this run's config digest (written in every marker).
        feature_dim: D of the part schema.
        config: the run's ``ExtractConfig``.
        pool: the detector actors.
        summary: updated as shards commit or fail.
        read_env: Ray ``runtime_env`` of the read tasks (``read_task_runtime_env``), or None.
    """

    def __init__(
        self,
        location: StoreLocation,
        digest: str,
        feature_dim: int,
        config: ExtractConfig,
        pool: DetectorPool,
        summary: ExtractSummary,
        read_env: dict[str, Any] | None = None,
    ) -> None:
        self.location, self.digest, self.feature_dim = location, digest, feature_dim
        self.config, self.pool, self.summary = config, pool, summary
        self.read_task = read_shard_task.options(runtime_env=read_env)
        self.reader_config = config.reader_config()
        self.active: list[ShardRun] = []
        self.meter = InFlightMeter()
        self.progress = _progress_bar()

    def run(self, urls: list[str]) -> None:
        queue = deque(urls)
        while queue or self.active:
            while queue and len(self.active) < self.config.shards_in_flight:
                self.active.append(self._start(queue.popleft(), attempt=1))
            progressed = self.pool.reap()
            progressed |= self._dispatch()
            progressed |= self._drain()
            if not progressed:
                self._wait()
        self.progress.close()
        self.meter.close()
        self.summary.max_batches_in_flight = self.meter.max_batches
        self.summary.max_images_in_flight = self.meter.max_images
        self.summary.max_batches_per_actor = self.pool.max_load

    def _start(self, url: str, attempt: int) -> ShardRun:
        from workers.read.reader import shard_id_of

        shard = shard_id_of(url)
        stream = self.read_task.remote(
            url, self.reader_config, self.config.tokenizer, self.config.max_tokens, self.config.batch_size
        )
        writer = PartWriter(self.location, shard, self.feature_dim, self.digest, shard_source(url))
        return ShardRun(url, shard, attempt, stream, writer)

    def _dispatch(self) -> bool:
        """Hand ready chunks to free detector slots, oldest shard first."""
        progressed = False
        for run in self.active:
            while not run.exhausted and self._has_room():
                ready, _ = ray.wait([run.stream], timeout=0)
                if not ready:
                    break
                try:
                    chunk_ref = next(run.stream)
                except StopIteration:
                    run.exhausted = True
                    break
                run.pending.append((*self.pool.submit(chunk_ref), self.meter.take()))
                progressed = True
        return progressed

    def _has_room(self) -> bool:
        """A detector slot is free and fewer than ``pool.capacity`` chunks are taken and not yet written."""
        return self.pool.has_room() and self.meter.in_flight < self.pool.capacity

    def _drain(self) -> bool:
        """Write finished chunk results in chunk order; commit finished shards; retry or fail broken ones."""
        progressed = False
        for run in list(self.active):
            try:
                while run.pending and ray.wait([run.pending[0][0]], timeout=0)[0]:
                    ref, actor_index, token = run.pending[0]
                    result = self._get(ref, actor_index)
                    run.pending.popleft()
                    self.meter.leave(token, _images_in(result))
                    self._apply(run, result)
                    progressed = True
                if run.exhausted and not run.pending:
                    self._commit(run)
                    progressed = True
            except (ray.exceptions.RayError, OSError, ValueError) as exc:
                self._attempt_failed(run, exc)
                progressed = True
        return progressed

    def _get(self, ref: ray.ObjectRef, actor_index: int) -> ChunkRows:
        try:
            return ray.get(ref)
        except ray.exceptions.ActorDiedError:
            self.pool.replace(actor_index)
            raise

    def _apply(self, run: ShardRun, result: ChunkRows) -> None:
        assert result.shard == run.shard, (result.shard, run.shard)
        for error in result.errors:
            run.writer.add_error(error.key, error.member_names, error.reason, error.detail)
            run.error_reasons[error.reason] += 1
        run.errors += len(result.errors)
        run.members_used += result.members_used
        run.members_in_errors += result.members_in_errors
        self.summary.detector_busy_s += result.busy_s
        if result.rows.num_rows:
            run.buffered.append(result.rows)
            run.buffered_rows += result.rows.num_rows
            self._flush(run, final=False)
        if result.counts is not None:
            run.counts = result.counts
        self.progress.update(result.rows.num_rows + len(result.errors))

    def _flush(self, run: ShardRun, *, final: bool) -> None:
        """Write the buffered rows as record batches of exactly ``ROWS_PER_RECORD_BATCH`` (the last one of a
        shard may be shorter), so part bytes do not depend on how samples were chunked."""
        if run.buffered_rows < ROWS_PER_RECORD_BATCH and not (final and run.buffered_rows):
            return
        table = pa.concat_tables(run.buffered)
        start = 0
        while table.num_rows - start >= ROWS_PER_RECORD_BATCH or (final and start < table.num_rows):
            run.writer.add_rows(table.slice(start, ROWS_PER_RECORD_BATCH).combine_chunks())
            start += ROWS_PER_RECORD_BATCH
        rest = table.slice(min(start, table.num_rows))
        run.buffered = [rest] if rest.num_rows else []
        run.buffered_rows = rest.num_rows

    def _commit(self, run: ShardRun) -> None:
        if run.counts is None:
            raise ValueError(f"shard {run.shard}: its stream ended without member counts")
        self._flush(run, final=True)
        rows = run.writer.rows
        accounting = ShardAccounting(
            members=run.counts.members,
            members_used=run.members_used,
            members_in_errors=run.members_in_errors,
            members_ignored=dict(sorted(run.counts.members_ignored.items())),
            samples=rows + run.errors,
            rows=rows,
            error_rows=run.errors,
        )
        run.writer.commit(accounting)
        self.active.remove(run)
        self.summary.shards_done += 1
        self.summary.rows += rows
        self.summary.error_rows += run.errors
        reasons = Counter(self.summary.error_rows_by_reason) + run.error_reasons
        self.summary.error_rows_by_reason = dict(sorted(reasons.items()))
        self._show_progress()

    def _attempt_failed(self, run: ShardRun, exc: BaseException) -> None:
        message = _error_text(exc)
        for _, _, token in run.pending:  # results never fetched: count them as full batches
            self.meter.leave(token, self.config.batch_size)
        run.writer.abort()
        ray.cancel(run.stream, force=False)
        index = self.active.index(run)
        if run.attempt < SHARD_ATTEMPTS:
            logger.warning("shard %s attempt %d failed (%s); retrying", run.shard, run.attempt, message)
            self.active[index] = self._start(run.url, attempt=run.attempt + 1)
            return
        logger.error("shard %s failed %d times, skipped: %s", run.shard, run.attempt, message)
        self.active.pop(index)
        self.summary.failed_shards.append({"shard": run.shard, "url": run.url, "error": message})
        self._show_progress()

    def _wait(self) -> None:
        """Block until a detector call finishes or, when a detector slot is free, a stream has a chunk (or
        ``WAIT_TIMEOUT_S``). A stream with a chunk ready while every slot is busy must not wake the loop:
        that would spin the driver."""
        waitables: list[Any] = list(self.pool.calls)
        if self._has_room():
            waitables += [run.stream for run in self.active if not run.exhausted]
        if waitables:
            ray.wait(waitables, num_returns=1, timeout=WAIT_TIMEOUT_S)

    def _show_progress(self) -> None:
        s = self.summary
        self.progress.set_postfix(
            shards=f"{s.shards_done + s.shards_skipped}/{s.shards_total}",
            failed=len(s.failed_shards),
            errors=s.error_rows,
        )


def _images_in(result: ChunkRows) -> int:
    """Decoded images a chunk held: its rows and the images the detector's output check rejected."""
    rejected = sum(error.reason == ErrorReason.DETECTOR_OUTPUT_INVALID for error in result.errors)
    return result.rows.num_rows + rejected


def _progress_bar() -> Any:
    """A tqdm bar (images/s) on a terminal; a silent stand-in otherwise."""
    from tqdm import tqdm

    return tqdm(unit="img", desc="extract", disable=not sys.stderr.isatty(), dynamic_ncols=True)


def _error_text(exc: BaseException) -> str:
    """``Type: message`` of the root cause of a (possibly Ray-wrapped) exception, first line only."""
    cause = exc
    while isinstance(cause, ray.exceptions.RayTaskError) and cause.cause is not None:
        cause = cause.cause
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[0] if text else ''}"


# -------------------------------------------------------------------------------------------- the run


def extract(
    shard_urls: list[str], out: str, config: ExtractConfig, *, fault: FaultInjection | None = None
) -> ExtractSummary:
    """Extract region features of ``shard_urls`` into the store ``out``.

    Returns the run summary (``exit_code`` 0 when every shard completed, 2 when any failed).

    Raises:
        ExtractRefused: the store is not a regionflow store, or holds another config (without
            ``overwrite``); more detectors than GPUs.
        StoreLockedError: another live run holds the store's lock.
        ShardsNotFound: local shard files that do not exist (checked before anything else starts).
        ValueError: bad shard URLs (``workers.read.urls.check_shard_urls``: pipe:, unsupported schemes,
            directories, patterns matching nothing, duplicate shard ids) or a bad vocabulary folder.
    """
    from workers.read.tokenizer import CaptionTokenizer
    from workers.read.urls import check_shard_urls

    started_utc = _utc_now()
    urls = check_shard_urls(list(shard_urls))
    missing = missing_local_shards(urls)
    if missing:
        raise ShardsNotFound(missing)
    read_env = read_task_runtime_env(urls)
    vocabularies = load_vocabularies(config.vocab) if config.vocab else None
    location = StoreLocation.parse(out)
    _refuse_foreign_directory(location)
    tokenizer = CaptionTokenizer(checkpoint_dir=config.tokenizer, max_tokens=config.max_tokens)
    lock = StoreLock(location)
    if not location.is_local:
        logger.warning("%s is on object storage: no store lock; do not run two extracts on it at once", out)
    t0 = time.perf_counter()
    resources = pool = None
    with lock:
        committed = _committed_sources(location, urls, overwrite=config.overwrite)
        try:
            resources = _start_ray(config)
            spec = DetectorSpec(
                config.detector,
                config.selection(),
                _absolute(config.weights) if config.weights else None,
                resources.threads,
                config.with_cls_prob,
                config.box_source(),
            )
            pool = DetectorPool(spec, resources, config.detectors, fault)
            warm = [
                warm_read_worker_task.options(runtime_env=read_env).remote(
                    config.tokenizer, config.max_tokens
                )
                for _ in range(config.shards_in_flight)
            ]
            info = pool.describe()
            ray.get(warm)
            startup_s = time.perf_counter() - t0
            extraction = extraction_config(config, info, tokenizer)
            digest = config_digest(extraction)
            _announce_weights(info, config)
            summary = ExtractSummary(store=out, config_digest=digest, shards_total=len(urls))
            summary.startup_s, summary.random_init = startup_s, info.random_init
            summary.weights_digest, summary.device, summary.detector_threads = (
                info.weights_digest,
                info.device,
                info.threads,
            )
            summary.detector_omp_wait_policy = info.omp_wait_policy
            manifest = _prepare_store(location, config, extraction, info, tokenizer, vocabularies, summary)
            todo = [url for url in urls if not committed.is_done(url, digest)]
            summary.shards_skipped = len(urls) - len(todo)
            summary.shards_reextracted = committed.discard_changed(location)
            t1 = time.perf_counter()
            ShardScheduler(location, digest, info.feature_dim, config, pool, summary, read_env).run(todo)
            summary.processing_s = time.perf_counter() - t1 if todo else 0.0
            _finish_manifest(location, manifest, summary, config, urls, started_utc)
        finally:
            if pool is not None:
                pool.shutdown()
            if resources is not None and resources.started_ray:
                ray.shutdown()
    _log_summary(summary)
    return summary


def extraction_config(config: ExtractConfig, info: DetectorInfo, tokenizer: Any) -> dict[str, Any]:
    """The dict the config digest is computed from: everything that changes output bytes (§9), nothing
    that does not (batch size, actor count, shards in flight, threads)."""
    return {
        "schema_version": SCHEMA_VERSION,
        "detector": info.config,
        "feature_dim": info.feature_dim,
        "weights_digest": info.weights_digest,
        "box_selection": config.selection().to_dict(),
        "tokenizer_digest": tokenizer.digest,
        "max_tokens": config.max_tokens,
        "captions": config.captions,
        "max_pixels": config.max_pixels,
        "with_cls_prob": config.with_cls_prob,
    }


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


def detector_env_vars() -> dict[str, str]:
    """Environment of the detector actors: OpenMP worker threads sleep, not spin, between parallel regions
    (``OMP_WAIT_POLICY=PASSIVE`` unless the driver's environment sets it). On a CPU shared with decode tasks
    spinning threads steal the cores they wait for (measured with the tiny detector on 2 busy cores: 6.5 s vs
    0.23 s for 5 images, ``bench/common.py``).
    """
    return {OMP_WAIT_POLICY: os.environ.get(OMP_WAIT_POLICY, "PASSIVE")}


def read_task_runtime_env(urls: list[str]) -> dict[str, Any] | None:
    """Ray ``runtime_env`` for the read tasks: the driver's ``AWS_*`` variables (endpoint, region, credentials)
    when a shard is on object storage, so that workers started before they were set (a Ray that was already
    running, the nodes of a joined cluster) reach the same endpoint; None when no shard needs them."""
    if not any("://" in url and not url.startswith("file://") for url in urls):
        return None
    env = {k: v for k, v in sorted(os.environ.items()) if k.startswith(OBJECT_STORE_ENV_PREFIX)}
    return {"env_vars": env} if env else None


def missing_local_shards(urls: list[str]) -> list[str]:
    """The local shard paths among ``urls`` (plain paths and ``file://`` URLs) that do not exist, in order; object-store URLs (``s3://``) are not checked here (an unreachable one becomes a failed shard)."""
    return [url for url in urls if (path := _local_path(url)) is not None and not os.path.exists(path)]


def _local_path(url: str) -> str | None:
    """The absolute file path of a local shard (a plain path or a ``file://`` URL); None for object storage."""
    if url.startswith(LOCAL_FILE_SCHEME) or "://" not in url:
        return os.path.abspath(url.removeprefix(LOCAL_FILE_SCHEME))
    return None


def _absolute(url: str) -> str:
    return url if "://" in url else os.path.abspath(url)


def _utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _refuse_foreign_directory(location: StoreLocation) -> None:
    """Refuse an existing, non-empty directory that is not a regionflow store (no ``manifest.json``). The
    lock and a ``manifest.json.tmp`` (a run killed while writing its first manifest) are our own."""
    from pyarrow import fs as pafs

    from schemas.store import LOCK_FILE, MANIFEST_FILE, TMP_SUFFIX

    info = location.fs.get_file_info(location.root)
    if info.type == pafs.FileType.NotFound:
        return
    if info.type != pafs.FileType.Directory:
        raise ExtractRefused(f"{location.root} exists and is not a directory")
    selector = pafs.FileSelector(location.root, allow_not_found=True)
    ours = {LOCK_FILE, MANIFEST_FILE + TMP_SUFFIX}
    entries = [e.base_name for e in location.fs.get_file_info(selector) if e.base_name not in ours]
    if entries and read_manifest(location) is None:
        raise ExtractRefused(
            f"{location.root} is not empty and is not a regionflow store (no manifest.json); "
            "choose another --out"
        )


def _prepare_store(
    location: StoreLocation,
    config: ExtractConfig,
    extraction: dict[str, Any],
    info: DetectorInfo,
    tokenizer: Any,
    vocabularies: dict[str, Any] | None,
    summary: ExtractSummary,
) -> dict[str, Any]:
    """Check the store against this run's digest, clean it, and write the manifest before any part."""
    digest = config_digest(extraction)
    existing = read_manifest(location)
    foreign = _foreign_shards(location, digest)
    if existing is not None and existing["config_digest"] != digest or foreign:
        if not config.overwrite:
            raise ExtractRefused(
                f"{location.root} holds shards of another extraction config "
                f"(digest {existing['config_digest'] if existing else '?'} ≠ {digest}"
                f"{', shards ' + ', '.join(foreign[:5]) if foreign else ''}); "
                "use --overwrite to replace them or choose another --out"
            )
        _delete_foreign_parts(location, digest)
        existing = None
    summary.stray_temporaries_removed = len(remove_stray_temporaries(location))
    provenance = _provenance(info, tokenizer, vocabularies or (existing or {}).get("vocabularies"))
    manifest = new_manifest(feature_dim=info.feature_dim, extraction_config=extraction, provenance=provenance)
    if existing is not None:
        manifest["failed_shards"] = existing.get("failed_shards", [])
        manifest["runs"] = existing.get("runs", [])
    write_manifest(location, manifest)
    return manifest


def _foreign_shards(location: StoreLocation, digest: str) -> list[str]:
    from schemas.store import MARKER_SUFFIX

    names = location.list_names(location.path(PARTS_DIR))
    shards = [n[: -len(MARKER_SUFFIX)] for n in names if n.endswith(MARKER_SUFFIX)]
    return [s for s in shards if read_marker(location, s).config_digest != digest]  # type: ignore[union-attr]


def _delete_foreign_parts(location: StoreLocation, digest: str) -> None:
    """``--overwrite``: delete every part, error table and marker not committed under ``digest``."""
    from schemas.store import ERRORS_SUFFIX, MARKER_SUFFIX, PART_SUFFIX, TMP_SUFFIX

    names = location.list_names(location.path(PARTS_DIR))
    keep: set[str] = set()
    for name in names:
        if name.endswith(MARKER_SUFFIX):
            shard = name[: -len(MARKER_SUFFIX)]
            marker = read_marker(location, shard)
            if marker is not None and marker.config_digest == digest:
                keep |= {shard + PART_SUFFIX, shard + ERRORS_SUFFIX, name}
    removed = 0
    for name in names:
        ours = name.endswith((PART_SUFFIX, ERRORS_SUFFIX, MARKER_SUFFIX, TMP_SUFFIX))
        if ours and name not in keep:
            location.fs.delete_file(location.path(PARTS_DIR, name))
            removed += 1
    logger.warning("--overwrite: deleted %d files of another extraction config", removed)


@dataclass(frozen=True)
class CommittedShards:
    """The done markers the store holds for this run's shards, read before any work.

    Attributes:
        markers: shard id -> its marker (of any config digest).
        changed: shard id -> how this run's input differs from the marker's source (``--overwrite`` only:
            without it such a run is refused).
    """

    markers: dict[str, DoneMarker]
    changed: dict[str, list[str]]

    def is_done(self, url: str, digest: str) -> bool:
        """A marker of ``digest`` from this same input exists (trusted: no re-hash, §9)."""
        from workers.read.reader import shard_id_of

        shard = shard_id_of(url)
        marker = self.markers.get(shard)
        return marker is not None and marker.config_digest == digest and shard not in self.changed

    def discard_changed(self, location: StoreLocation) -> list[dict[str, str]]:
        """Delete the shards whose input changed (they are re-extracted, or failed: never left stale);
        returns them for the summary."""
        for shard in sorted(self.changed):
            discard_shard(location, shard)
            logger.warning("--overwrite: re-extracting %s (%s)", shard, "; ".join(self.changed[shard]))
        return [{"shard": s, "changed": "; ".join(d)} for s, d in sorted(self.changed.items())]


def _committed_sources(location: StoreLocation, urls: list[str], *, overwrite: bool) -> CommittedShards:
    """Read the markers of ``urls``' shards and compare each recorded source with the input now.

    Raises:
        ExtractRefused: some committed shard came from another path or another byte size than this run's
            input (a rebuilt tar of the same name, a same-named shard elsewhere), and not ``overwrite``.
    """
    from workers.read.reader import shard_id_of

    markers: dict[str, DoneMarker] = {}
    changed: dict[str, list[str]] = {}
    unrecorded = []
    for url in urls:
        shard = shard_id_of(url)
        marker = read_marker(location, shard)
        if marker is None:
            continue
        markers[shard] = marker
        if marker.source is None:
            unrecorded.append(shard)
        elif differences := marker.source_differences(shard_source(url)):
            changed[shard] = differences
    if unrecorded:
        logger.warning(
            "%d committed shards (%s...) have markers without their source (an older regionflow): "
            "trusted without checking that they come from this run's input",
            len(unrecorded),
            unrecorded[0],
        )
    if changed and not overwrite:
        shown = [f"{s} ({'; '.join(d)})" for s, d in sorted(changed.items())[:CHANGED_SHARDS_SHOWN]]
        more = len(changed) - len(shown)
        raise ExtractRefused(
            f"{location.root}: {len(changed)} committed shards came from another input than this run's: "
            f"{', '.join(shown)}{f' and {more} more' if more > 0 else ''}; their rows would be stale. "
            "Use --overwrite to re-extract them, or choose another --out"
        )
    return CommittedShards(markers, changed)


def shard_source(url: str) -> ShardSource:
    """The input of a shard now: its normalised URL (an absolute path for local files and ``file://`` URLs,
    object-store URLs as given) and its byte size from a stat (``os.stat``; on object storage or http(s) a
    HEAD, ``workers.read.urls.shard_size``, as the reader opens it). The size is None, with a warning, when
    the stat fails: the read then reports the problem."""
    path = _local_path(url)
    if path is not None:
        try:
            return ShardSource(path, os.stat(path).st_size)
        except OSError as exc:
            logger.warning("cannot stat shard %s: %s", path, exc)
            return ShardSource(path, None)
    from workers.read.urls import ShardReadError, shard_size

    try:
        return ShardSource(url, shard_size(url))
    except ShardReadError as exc:
        logger.warning("%s", exc)
        return ShardSource(url, None)


def _provenance(info: DetectorInfo, tokenizer: Any, vocabularies: dict[str, Any] | None) -> dict[str, Any]:
    return {
        "detector_config": info.config,
        "weights": {"digest": info.weights_digest, "random_init": info.random_init},
        "tokenizer": tokenizer.to_dict(),
        "library_versions": library_versions(),
        "vocabularies": vocabularies,
    }


def library_versions() -> dict[str, str | None]:
    """Versions of Python and of the libraries that shape the store's bytes (None: not installed)."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in VERSIONED_LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _finish_manifest(
    location: StoreLocation,
    manifest: dict[str, Any],
    summary: ExtractSummary,
    config: ExtractConfig,
    urls: list[str],
    started_utc: str,
) -> None:
    """Record failed shards and append this run to ``runs`` (excluded from comparisons)."""
    from workers.read.reader import shard_id_of

    run_shards = {shard_id_of(url) for url in urls}
    earlier = [f for f in manifest["failed_shards"] if f["shard"] not in run_shards]
    manifest["failed_shards"] = sorted(earlier + summary.failed_shards, key=lambda f: f["shard"])
    counts = {k: v for k, v in summary.to_dict().items() if k not in ("store", "config_digest")}
    manifest["runs"].append(
        {
            "started_utc": started_utc,
            "ended_utc": _utc_now(),
            "host": socket.gethostname(),
            "args": {**dataclasses.asdict(config), "shard_urls": urls},
            "counts": counts,
        }
    )
    write_manifest(location, manifest)


def _announce_weights(info: DetectorInfo, config: ExtractConfig) -> None:
    if info.random_init:
        logger.warning(
            "RANDOM INIT: no --weights given; the %s detector is seeded random init (weights digest %s). "
            "Its features and classes carry no visual meaning; this is recorded in manifest.json.",
            config.detector,
            info.weights_digest,
        )
    else:
        logger.info("detector weights %s (digest %s)", config.weights, info.weights_digest[:16])


def _log_summary(summary: ExtractSummary) -> None:
    logger.info(
        "%d shards done, %d skipped, %d failed; %d rows, %d error rows; %.2f images/s",
        summary.shards_done,
        summary.shards_skipped,
        len(summary.failed_shards),
        summary.rows,
        summary.error_rows,
        summary.images_per_s,
    )
    for warning in summary.warnings():
        logger.warning("%s", warning)
    if summary.random_init:
        logger.warning("RANDOM INIT: this store's features come from an untrained detector")
