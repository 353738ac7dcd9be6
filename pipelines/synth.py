"""``regionflow synth``: write the embedded default corpus (DESIGN §8) as WebDataset shards + VQA v2 JSON.

Example::

    regionflow synth --out corpus --images 600 --samples-per-shard 100 --seed 0

writes ``corpus/synth-000000.tar`` ... (``KEY.jpg`` + ``KEY.json`` with ``image_id``, ``captions``, ``boxes``
(xyxy px), ``labels``), ``corpus/questions.json``, ``corpus/annotations.json`` and ``corpus/synth-summary.json``,
and prints the summary as JSON. Same arguments, same bytes.
"""

from __future__ import annotations

import argparse
import json
import logging

from workers.synth import SynthConfig, write_corpus

log = logging.getLogger(__name__)


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


def run(args: argparse.Namespace) -> int:
    if args.images < 1 or args.samples_per_shard < 1:
        log.error("--images and --samples-per-shard must be >= 1")
        return 2
    config = SynthConfig(min_side_px=args.min_side, max_side_px=args.max_side)
    summary = write_corpus(args.out, args.images, args.samples_per_shard, args.seed, config)
    log.info("wrote %d images in %d shards to %s", summary.images, len(summary.shards), args.out)
    print(json.dumps({"out": str(args.out), "seed": args.seed, **summary.to_dict()}, indent=1))
    return 0
