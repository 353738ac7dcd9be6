"""The ``regionflow`` command line (DESIGN §9 *CLI*).

Each subcommand lives in its own module under ``pipelines/`` exposing
``add_arguments(parser: argparse.ArgumentParser) -> None`` and ``run(args: argparse.Namespace) -> int``
(the process exit code). Modules are imported only when their command runs, so ``regionflow --help``
and light commands do not pay for importing Ray or torch.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "shards": ("pipelines.shards", "image folder (+ COCO captions) -> WebDataset tar shards"),
    "synth": ("pipelines.synth", "procedural scenes -> WebDataset shards + VQA v2 JSON"),
    "extract": ("pipelines.extract", "WebDataset shards -> region-feature store (Ray)"),
    "inspect": ("pipelines.inspect", "counts, provenance, per-shard status of a store"),
    "visualize": ("pipelines.visualize", "draw one image's region boxes to a PNG"),
    "train": ("pipelines.train", "train the co-attention model on a store (Ray Train)"),
    "evaluate": ("pipelines.evaluate", "evaluate a trained run on the held-out split"),
    "import": ("pipelines.import_features", "bottom-up-attention TSV / ViLBERT LMDB -> store"),
    "export": ("pipelines.export", "store -> Parquet directory or bottom-up-attention TSV"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The top-level parser; only ``command``'s module is imported to add its arguments."""
    parser = argparse.ArgumentParser(prog="regionflow", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            importlib.import_module(module_name).add_arguments(sub_parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``regionflow`` console script; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if a in COMMANDS), None)
    args = build_parser(command).parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    module = importlib.import_module(COMMANDS[args.command][0])
    return int(module.run(args))


if __name__ == "__main__":
    sys.exit(main())
