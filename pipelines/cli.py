"""The ``regionflow`` command line: subcommands, the exit-code table and the error printer (docs/design.md §9).

Each subcommand lives in its own module under ``pipelines/`` exposing
``add_arguments(parser: argparse.ArgumentParser) -> None`` and ``run(args: argparse.Namespace) -> int``
(the process exit code, one of `ExitCode`). Modules are imported only when their command runs, so
``regionflow --help`` and light commands do not pay for importing Ray or torch.

Every subcommand reports an error it expects (bad input, a refused store) with `fail`, in argparse's own
form, ``regionflow COMMAND: error: MESSAGE`` on stderr, and returns `ExitCode.BAD_INPUT`; argparse's usage
errors exit with the same code (`Parser.error`).
"""

from __future__ import annotations

import argparse
import enum
import importlib
import importlib.metadata
import logging
import sys
from typing import NoReturn


class ExitCode(enum.IntEnum):
    """The exit codes of every subcommand (README *Exit codes*; extract's 0 and 2: docs/design.md §9)."""

    OK = 0  # everything asked for was done (extract: every shard completed; error rows allowed)
    BAD_INPUT = 1  # refused before the work: a bad flag or input, a store refused, an output that exists
    SHARDS_FAILED = 2  # the command ran, but some shards failed (extract) or are damaged (inspect --verify)
    RUN_FAILED = 3  # the run started and failed (train: workers failed past their restarts)
    INTERRUPTED = 130  # Ctrl-C (128 + SIGINT, as a shell reports it)


EXIT_CODES_HELP = """\
exit codes (the same for every subcommand):
  0    done (extract: every shard completed; samples in error tables are allowed)
  1    refused before the work: a bad flag or input, a store of another config or held by
       another run, an output that exists without --overwrite (one line on stderr)
  2    some shards failed (extract; listed in the summary) or are damaged (inspect --verify)
  3    the run started and failed (train: workers failed past their restarts)
  130  interrupted (Ctrl-C)"""

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
DESCRIPTION = """\
Image-caption corpora -> region-feature stores -> ViLBERT-style co-attention models,
on one machine or a Ray cluster. `regionflow COMMAND --help` lists a command's flags."""


def fail(command: str, message: object, code: ExitCode = ExitCode.BAD_INPUT) -> int:
    """Print ``regionflow COMMAND: error: MESSAGE`` on stderr (argparse's form) and return ``code``.

    The one error printer of the CLI: ``return fail("extract", exc)`` in a subcommand's ``run``.
    """
    print(f"regionflow {command}: error: {message}", file=sys.stderr)
    return int(code)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Help with each flag's default (unless the help text already states one, or there is none to show)
    and the epilog (the exit-code table) kept as written."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default  # identity, not ==: 0 and 0.0 == False, and they are defaults to show
        nothing = default is None or default is False or default == "" or default is argparse.SUPPRESS
        if nothing or "default" in text.lower():
            return text
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """argparse with `ExitCode.BAD_INPUT` for usage errors (argparse's own code, 2, means failed shards here)."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(int(ExitCode.BAD_INPUT), f"{self.prog}: error: {message}\n")


def version() -> str:
    """The installed distribution's version (``pyproject.toml``); raises nothing."""
    try:
        return importlib.metadata.version("regionflow")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (run from a source tree that is not installed; `make setup` installs it)"


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The top-level parser; only ``command``'s module is imported to add its arguments."""
    parser = Parser(
        prog="regionflow", description=DESCRIPTION, epilog=EXIT_CODES_HELP, formatter_class=HelpFormatter
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"regionflow {version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        sub_parser = sub.add_parser(
            name, help=help_text, description=help_text, epilog=EXIT_CODES_HELP, formatter_class=HelpFormatter
        )
        if name == command:
            importlib.import_module(module_name).add_arguments(sub_parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``regionflow`` console script; returns the exit code (`ExitCode`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if a in COMMANDS), None)
    args = build_parser(command).parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    module = importlib.import_module(COMMANDS[args.command][0])
    try:
        return int(module.run(args))
    except KeyboardInterrupt:
        return fail(args.command, "interrupted (Ctrl-C)", ExitCode.INTERRUPTED)


if __name__ == "__main__":
    sys.exit(main())
