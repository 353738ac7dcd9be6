"""``regionflow synth``: write the embedded default corpus (docs/design.md §8) as WebDataset shards + VQA v2 JSON.

Example::

    regionflow synth --out corpus --images 600 --samples-per-shard 100 --seed 0

writes ``corpus/synth-000000.tar`` ... (``KEY.jpg`` + ``KEY.json`` with ``image_id``, ``captions``, ``boxes``
(xyxy px), ``labels``), ``corpus/questions.json``, ``corpus/annotations.json`` and ``corpus/synth-summary.json``,
and prints the summary as JSON. Same arguments, same bytes.

Exit codes: 0 written; 2 bad input (message on stderr, nothing written), including an ``--out`` that already
holds a corpus (``synth-*.tar`` shards or the VQA/summary files) without ``--overwrite``, which first deletes
exactly those files (never anything else in ``--out``), so a corpus is never a mix of two runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
from pathlib import Path

from pipelines.cli import ExitCode, fail
from workers.corpus.synth import (
    ANNOTATIONS_FILE,
    QUESTIONS_FILE,
    SHARD_PREFIX,
    SUMMARY_FILE,
    SynthConfig,
    write_corpus,
)

log = logging.getLogger(__name__)

SHARD_PATTERN = re.compile(rf"^{re.escape(SHARD_PREFIX)}\d+\.tar$")
CORPUS_FILES = (QUESTIONS_FILE, ANNOTATIONS_FILE, SUMMARY_FILE)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output directory (created if missing)")
    parser.add_argument("--images", type=int, required=True, help="number of images to generate")
    parser.add_argument("--samples-per-shard", type=int, required=True, help="samples per tar shard")
    parser.add_argument("--seed", type=int, default=0, help="corpus seed (default 0)")
    parser.add_argument(
        "--min-side", type=int, default=SynthConfig.min_side_px, help="smallest image side, px"
    )
    parser.add_argument(
        "--max-side", type=int, default=SynthConfig.max_side_px, help="largest image side, px"
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help=f"replace an existing corpus in --out ({SHARD_PREFIX}*.tar, {', '.join(CORPUS_FILES)})",
    )


def existing_corpus(out_dir: Path) -> tuple[list[Path], list[Path]]:
    """``(shards, other files)`` of an earlier corpus in ``out_dir``: ``synth-N.tar`` and the JSON files."""
    if not out_dir.is_dir():
        return [], []
    shards = sorted(p for p in out_dir.iterdir() if SHARD_PATTERN.match(p.name) and p.is_file())
    others = [out_dir / name for name in CORPUS_FILES if (out_dir / name).is_file()]
    return shards, others


def run(args: argparse.Namespace) -> int:
    """Write the corpus; return the exit code."""
    if args.images < 1 or args.samples_per_shard < 1:
        return fail("synth", "--images and --samples-per-shard must be >= 1")
    out_dir = Path(args.out)
    if out_dir.exists() and not out_dir.is_dir():
        return fail("synth", f"--out {out_dir} exists and is not a directory")
    shards, others = existing_corpus(out_dir)
    if (shards or others) and not args.overwrite:
        found = [f"{len(shards)} {SHARD_PREFIX}*.tar shards"] if shards else []
        names = " / ".join(found + [p.name for p in others])
        return fail("synth", f"{out_dir} already holds {names}: pass --overwrite to replace them")
    try:
        config = SynthConfig(min_side_px=args.min_side, max_side_px=args.max_side)
    except ValueError as exc:
        return fail("synth", exc)
    for path in shards + others:
        path.unlink()
    summary = write_corpus(args.out, args.images, args.samples_per_shard, args.seed, config)
    log.info("wrote %d images in %d shards to %s", summary.images, len(summary.shards), args.out)
    print(json.dumps({"out": str(args.out), "seed": args.seed, **summary.to_dict()}, indent=1))
    return ExitCode.OK
