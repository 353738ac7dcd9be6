"""``regionflow import``: a bottom-up-attention TSV or a ViLBERT feature LMDB -> a regionflow store.

The work is ``workers.interop.feature_import.import_features`` (no Ray needed); this module parses the command
line, prints a JSON summary on stdout, and maps user errors to `ExitCode.BAD_INPUT` (1).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
from dataclasses import asdict

from pipelines.cli import ExitCode, fail
from schemas.store import StoreSchemaError
from workers.interop.feature_import import (
    SOURCE_FORMATS,
    CaptionJoin,
    ImportConfig,
    StoreExistsError,
    import_features,
)
from workers.interop.safe_unpickle import UnsafePickleError
from workers.read.tokenizer import DEFAULT_MAX_TOKENS, CaptionTokenizer
from workers.store import StoreLockedError

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--from", dest="source_format", required=True, choices=SOURCE_FORMATS, help="source format"
    )
    parser.add_argument("source", metavar="SRC", help="the .tsv file, or the LMDB directory / file")
    parser.add_argument("--out", required=True, metavar="STORE", help="store directory or s3:// URL")
    parser.add_argument(
        "--shard", metavar="NAME", help="shard id (default: SRC's file name without extensions)"
    )
    parser.add_argument("--feature-dim", type=int, metavar="D", help="feature size (default: inferred)")
    parser.add_argument(
        "--records-per-shard",
        type=int,
        default=0,
        metavar="N",
        help="split into shards NAME-00000, ... of N records (default 0: one shard)",
    )
    parser.add_argument(
        "--keep-cls-prob", action="store_true", help="store the source's 1601-way cls_prob (float16)"
    )
    parser.add_argument("--captions", metavar="COCO_JSON", help="join COCO captions by image_id (tokenized)")
    parser.add_argument(
        "--tokenizer", metavar="DIR", help="BERT checkpoint folder with tokenizer.json (default: packaged)"
    )
    parser.add_argument(
        "--max-tokens", type=int, default=DEFAULT_MAX_TOKENS, help="tokens per caption, [CLS]/[SEP] included"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a store of another source")


def default_shard_id(source: str) -> str:
    """``/data/trainval_36.tsv`` -> ``trainval_36`` (file name up to its first dot, §9 shard ids);
    characters outside ``[A-Za-z0-9_.-]`` become ``_``."""
    name = os.path.basename(os.path.normpath(source)).split(".", 1)[0]
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name) or "imported"


def run(args: argparse.Namespace) -> int:
    try:
        config = ImportConfig(
            source_format=args.source_format,
            shard=args.shard or default_shard_id(args.source),
            feature_dim=args.feature_dim,
            records_per_shard=args.records_per_shard,
            keep_cls_prob=args.keep_cls_prob,
        )
        captions = None
        if args.captions:
            tokenizer = CaptionTokenizer(args.tokenizer, max_tokens=args.max_tokens)
            captions = CaptionJoin(args.captions, tokenizer)
        summary = import_features(args.source, args.out, config, captions=captions, overwrite=args.overwrite)
    except (
        FileNotFoundError,
        ValueError,
        StoreExistsError,
        StoreLockedError,
        UnsafePickleError,
        StoreSchemaError,
    ) as exc:
        return fail("import", exc)
    print(json.dumps(asdict(summary), indent=1, sort_keys=True))
    return ExitCode.OK
