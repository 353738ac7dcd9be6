"""``regionflow export``: a regionflow store -> a Parquet directory or a bottom-up-attention TSV.

The work is ``workers.feature_export``; this module parses the command line and prints a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import asdict

from schemas.store import StoreSchemaError
from workers.feature_export import export_parquet, export_tsv

log = logging.getLogger(__name__)
EXIT_OK, EXIT_USER_ERROR = 0, 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("store", metavar="STORE", help="store directory or s3:// URL")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--parquet", metavar="DIR", help="one <shard>.parquet per shard (+ errors, manifest)")
    target.add_argument("--tsv", metavar="FILE", help="one bottom-up-attention TSV (float32 base64)")
    parser.add_argument(
        "--float32",
        action="store_true",
        help="Parquet: widen float16 features/cls_prob to float32 (for readers without FLOAT16)",
    )


def run(args: argparse.Namespace) -> int:
    if args.float32 and not args.parquet:
        log.error("--float32 applies to --parquet only (the TSV is always float32)")
        return EXIT_USER_ERROR
    try:
        if args.parquet:
            summary = export_parquet(args.store, args.parquet, features_float32=args.float32)
        else:
            summary = export_tsv(args.store, args.tsv)
    except (FileNotFoundError, StoreSchemaError) as exc:
        log.error("export failed: %s", exc)
        return EXIT_USER_ERROR
    print(json.dumps(asdict(summary), indent=1, sort_keys=True))
    return EXIT_OK
