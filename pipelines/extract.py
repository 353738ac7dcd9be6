"""``regionflow extract``: WebDataset shards → region-feature store, orchestrated with Ray (docs/design.md §4, §5).

This module turns the flags into a validated ``ExtractConfig`` and calls the run. The rest, by what it owns:
``pipelines.extract_config`` (config, summary, refusals; no Ray), ``pipelines.extract_run`` (the run: checks
before Ray, manifest), ``pipelines.extract_actors`` (Ray shells: detector actor and pool, read task,
resources), ``pipelines.extract_scheduler`` (shards in flight, in-order writes, retries),
``workers.store.lifecycle`` (foreign directory, config digest, ``--overwrite``, stray temporaries, committed
sources, manifest), ``workers.rows`` (chunks and Arrow rows, without Ray).

Data flow (the driver schedules and commits; it never receives feature rows). Each shard attempt is bound to
one detector node N::

    driver ──(≤ --shards-in-flight shards, at least one per detector node)──► read task of the shard on N
       │                                         (Ray streaming generator, 0.25 CPU, soft node affinity):
       │                                         reads the tar (encoded bytes travel from the inputs to N),
       │                                         decodes + tokenizes, yields ShardChunk objects of
       │                                         ≤ --batch-size images (≤ GENERATOR_BACKPRESSURE ahead)
       │ chunk reference                                   ▼ (N's object store: pixels never leave N)
       ├──────────────────────────► detector actor on N (num_gpus=1 on a GPU cluster): rows + ChunkStats
       │ ChunkStats (≈ 160 B/image)   ◄────────────────────┘ rows stay in N's object store
       │ rows reference, in chunk order ──► part writer of N (one actor per detector node): re-batches to
       │                                    ROWS_PER_RECORD_BATCH rows, validates, hashes, writes the part
       │ accounting ──────────────────────► then the error table, then the done marker (the commit point)
       ▼
    manifest.json (driver: the digest check before, the run record after)

So at any time the run holds at most ``shards_in_flight × GENERATOR_BACKPRESSURE`` chunks waiting in the
read tasks and ``detectors × ACTOR_QUEUE_DEPTH`` chunks taken from the streams and not yet written (at the
detectors, or at the writer), each of at most ``batch_size`` images, however large a shard or the corpus.
The summary reports the driver-measured maxima (``max_batches_in_flight``, ``max_images_in_flight``,
``max_batches_per_actor``) and what reached the driver (``driver_received_bytes``, ``driver_cpu_s``).

Determinism: an image's features depend only on the image (the detector runs its trunk on each image alone,
unpadded, and batches only the RoI head in fixed-shape chunks), and each part is written in source order in fixed
record batches, so the store does not depend on batch size, actor count, shards in flight or scheduling.

Stores: a local path on one machine, a local path mounted at the same place on every node
(``--store-shared-fs``; a local store on a multi-node cluster without it is refused), or object storage.

Faults:
- detector actors are created with ``max_restarts`` and ``max_task_retries``: a killed actor is restarted
  and its pending batches re-run on it; the driver hands each chunk's rows to the writer exactly once, in
  order, so a retried batch neither duplicates nor drops rows.
- a part writer that dies (its node lost, a crash, even after its part is written but before the marker)
  fails the attempts it held; they restart on a new writer. A part without a marker is never committed:
  readers ignore it and the next attempt, or the next run, rewrites it.
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
import json
import logging
import sys

from pipelines.cli import ExitCode, fail
from pipelines.extract_actors import ACTOR_QUEUE_DEPTH, DETECTOR_SEED, FaultInjection
from pipelines.extract_config import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_MAX_PIXELS,
    DEFAULT_MAX_TOKENS,
    DEFAULT_NUM_BOXES,
    DEFAULT_SHARDS_IN_FLIGHT,
    ExtractConfig,
    ExtractRefused,
    ExtractSummary,
    ShardsNotFound,
    missing_local_shards,
)
from pipelines.extract_run import committed_shards, extract, extraction_config, library_versions
from pipelines.extract_scheduler import SHARD_ATTEMPTS
from workers.read.tokenizer import MIN_MAX_TOKENS
from workers.store import StoreLockedError, StoreRefused

__all__ = [  # what tests, benchmarks and the CLI take from here
    "ACTOR_QUEUE_DEPTH",
    "DETECTOR_SEED",
    "SHARD_ATTEMPTS",
    "ExtractConfig",
    "ExtractRefused",
    "ExtractSummary",
    "FaultInjection",
    "ShardsNotFound",
    "add_arguments",
    "extract",
    "extraction_config",
    "library_versions",
    "missing_local_shards",
    "run",
]

logger = logging.getLogger(__name__)


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
    """Flags of ``regionflow extract`` (docs/design.md §9 *CLI*)."""
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
    parser.add_argument("--with-cls-prob", action="store_true", help="store [N, 1601] class probabilities")
    parser.add_argument("--tokenizer", metavar="DIR", help="BERT checkpoint folder with tokenizer.json")
    _add_execution_flags(parser)


def _add_execution_flags(parser: argparse.ArgumentParser) -> None:
    """Flags that never change the store's bytes (excluded from the config digest)."""
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
    parser.add_argument(
        "--store-shared-fs",
        action="store_true",
        help="the local --out is a filesystem mounted at the same path on every node (required for a local "
        "store on a multi-node cluster: parts are written on the detectors' nodes)",
    )


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
        store_shared_fs=args.store_shared_fs,
    )


def run(args: argparse.Namespace) -> int:
    """Run ``regionflow extract``; prints the JSON summary; returns an `ExitCode`: OK, BAD_INPUT (refused,
    or missing local shard files, before Ray starts) or SHARDS_FAILED."""
    try:
        config = config_from_args(args)
        summary = extract(args.shards, args.out, config)
    except (ShardsNotFound, ExtractRefused, StoreRefused, ValueError, StoreLockedError) as exc:
        return fail("extract", exc)
    except KeyboardInterrupt:
        committed = committed_shards(args.shards, args.out)
        print(f"regionflow extract: stopped; {committed} shards committed; rerun the same command to resume",
              file=sys.stderr)  # fmt: skip
        return int(ExitCode.INTERRUPTED)
    print(json.dumps(summary.to_dict(), indent=1, sort_keys=True))
    return summary.exit_code
