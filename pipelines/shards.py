"""``regionflow shards``: an image folder (+ COCO captions JSON) -> WebDataset tar shards (docs/design.md §9 CLI).

Prints a JSON summary on stdout. Exit codes (`pipelines.cli.ExitCode`): 0 written; 1 bad input (message on stderr, nothing written).
"""

from __future__ import annotations

import argparse
import json

from pipelines.cli import ExitCode, fail
from workers.corpus.shards import ShardsConfig, ShardsInputError, write_shards


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``regionflow shards``."""
    parser.add_argument(
        "--images", required=True, metavar="DIR", help="folder of jpg/jpeg/png/webp/bmp images"
    )
    parser.add_argument(
        "--captions",
        metavar="COCO_JSON",
        help="COCO captions file (captions_*.json); it may name more images than DIR holds (a subset is fine: "
        "the absent ones are counted), images without an entry get no captions",
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder for the tar shards")
    parser.add_argument("--samples-per-shard", required=True, type=int, metavar="N", help="samples per tar")
    parser.add_argument("--prefix", default="shard", metavar="NAME", help="shard names NAME-000000.tar")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace existing NAME-*.tar shards in --out"
    )


def run(args: argparse.Namespace) -> int:
    """Write the shards; return the exit code."""
    config = ShardsConfig(
        images_dir=args.images,
        out_dir=args.out,
        samples_per_shard=args.samples_per_shard,
        captions_json=args.captions,
        prefix=args.prefix,
        overwrite=args.overwrite,
    )
    try:
        summary = write_shards(config)
    except ShardsInputError as exc:
        return fail("shards", exc)
    print(json.dumps({"out": args.out, **summary.to_dict()}, indent=1, sort_keys=True))
    return ExitCode.OK
