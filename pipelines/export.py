"""``regionflow export``: a regionflow store -> a Parquet directory or a bottom-up-attention TSV.

The work is ``workers.interop.feature_export``; this module parses the command line, refuses to replace existing
output files unless ``--overwrite`` (for ``--parquet DIR``: the files this export would write, i.e. each
shard's ``rows/<shard>.parquet`` / ``errors/<shard>.parquet`` and ``manifest.json``; other files in DIR are
left alone), and prints a JSON summary. Exit codes (`pipelines.cli.ExitCode`): 0 written; 1 refused (bad flags, no store, existing output).
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import asdict

from pyarrow import fs as pafs

from pipelines.cli import ExitCode, fail
from schemas.store import StoreSchemaError
from workers.interop.feature_export import MANIFEST_COPY, export_parquet, export_tsv, parquet_names
from workers.store import StoreLocation, StoreReader

log = logging.getLogger(__name__)
EXISTING_SHOWN = 5  # existing output files named in the refusal


class OutputExists(RuntimeError):
    """The export would replace existing files and ``--overwrite`` was not given."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("store", metavar="STORE", help="store directory or s3:// URL")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument(
        "--parquet",
        metavar="DIR",
        help="DIR/rows/<shard>.parquet per shard, DIR/errors/<shard>.parquet, manifest.json",
    )
    target.add_argument("--tsv", metavar="FILE", help="one bottom-up-attention TSV (float32 base64)")
    parser.add_argument(
        "--float32",
        action="store_true",
        help="Parquet: widen float16 features/cls_prob to float32 (for readers without FLOAT16)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace existing output files (--tsv FILE, or the files --parquet DIR would write)",
    )


def output_paths(args: argparse.Namespace) -> tuple[StoreLocation, list[str]]:
    """The output's location and the paths in it that this export writes.

    Raises:
        schemas.store.StoreSchemaError: ``args.store`` is not a regionflow store (``--parquet``).
    """
    if not args.parquet:
        target = StoreLocation.parse(args.tsv)
        return target, [target.root]
    target = StoreLocation.parse(args.parquet)
    shards = StoreReader(args.store).shards()
    names = [name for shard in shards for name in parquet_names(shard)]
    return target, [target.path(name) for name in [*names, MANIFEST_COPY]]


def refuse_existing(args: argparse.Namespace) -> None:
    """Raise ``OutputExists`` naming the output files that already exist, unless ``--overwrite``."""
    target, paths = output_paths(args)
    infos = target.fs.get_file_info(paths)
    if args.tsv and infos[0].type == pafs.FileType.Directory:
        raise OutputExists(f"--tsv {args.tsv} is a directory: give a file name")
    existing = [info.path for info in infos if info.type != pafs.FileType.NotFound]
    if existing and not args.overwrite:
        shown = ", ".join(existing[:EXISTING_SHOWN])
        more = f", ... ({len(existing)} in all)" if len(existing) > EXISTING_SHOWN else ""
        raise OutputExists(f"output file(s) already exist: {shown}{more}; pass --overwrite to replace them")


def run(args: argparse.Namespace) -> int:
    if args.float32 and not args.parquet:
        return fail("export", "--float32 applies to --parquet only (the TSV is always float32)")
    try:
        refuse_existing(args)
        if args.parquet:
            summary = export_parquet(args.store, args.parquet, features_float32=args.float32)
        else:
            summary = export_tsv(args.store, args.tsv)
    except (FileNotFoundError, StoreSchemaError, OutputExists) as exc:
        return fail("export", exc)
    print(json.dumps(asdict(summary), indent=1, sort_keys=True))
    return ExitCode.OK
