"""``python -m pipelines.demo --out DIR`` (``make demo``): the embedded corpus end to end, through the real CLI.

Every stage runs as a subprocess of the ``regionflow`` console script, exactly as a user would type it:

1. ``synth``: the procedural corpus (docs/design.md §8): shards + VQA v2 files;
2. ``extract --config tiny --boxes given``: region features of the true boxes (random-init detector: no weights
   can be downloaded, so the corpus is built to be learnable through one, see ``workers/corpus/synth.py``);
3. ``train``: one Ray Train run, 2 workers on CPU, all tasks at once (pretrain, retrieval, VQA, caption), with
   the ``small`` model preset (~5.6M parameters): a randomly initialised 2-layer BERT text stream of width 128
   that keeps the WordPiece vocabulary of the packaged all-MiniLM-L6-v2 checkpoint, a 1-layer visual stream
   and two Co-TRM blocks of width 128 (``model.config.PRESETS``). The ``tiny`` preset (width 32)
   learned next to nothing here and ``base`` (80M parameters, pretrained MiniLM) is ~1 s a step on a CPU.
   Tasks are weighted (``--task-weights``);
4. ``evaluate`` on the held-out images: retrieval (``--rerank-top``), VQA, captioning; then the controls
   ``--shuffle-visual`` and ``--shuffle-features`` (retrieval and VQA);
5. ``visualize`` of a few held-out images.

It then prints a results table (recall@1/5/10 with the number of candidate images and chance, VQA accuracy
beside the majority-answer baseline, BLEU-4, CIDEr, the duplicate-caption share, the control lines, the wall
time of each stage) and writes it to ``DIR/demo-report.md`` and ``DIR/demo-summary.json``. Every stage's output
is kept in ``DIR/logs/``. The stages (config, folders, command lines, one run) are in
``pipelines/demo_stages.py``, the corpus readers and the results table in ``pipelines/demo_report.py``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from pipelines.cli import EXIT_CODES_HELP, ExitCode, HelpFormatter, Parser
from pipelines.demo_report import caption_duplicates, collect, heldout_keys, results_markdown, target_lines
from pipelines.demo_stages import (
    TEXT_STREAMS,
    DemoConfig,
    DemoError,
    DemoPaths,
    StageResult,
    prepare_out,
    regionflow_executable,
    run_stage,
    stage_plan,
)


# ------------------------------------------------------------------------------------------------- main
def draw_pictures(
    config: DemoConfig, paths: DemoPaths, executable: str
) -> tuple[list[StageResult], list[str]]:
    """``visualize`` the first held-out images (image shards found through the store's manifest)."""
    stages, pictures = [], []
    for shard, key in heldout_keys(paths.corpus, config.holdout_fraction, config.pictures):
        out = paths.pictures / f"{key.replace('/', '_')}.png"
        argv = ["visualize", str(paths.store), key, "--shard", shard, "--out", str(out),
                "--scale", str(config.picture_scale)]  # fmt: skip
        stages.append(run_stage(f"visualize-{key}", argv, paths, executable))
        pictures.append(str(out))
    return stages, pictures


def run_demo(config: DemoConfig, out: Path) -> dict[str, Any]:
    """Run every stage and write ``demo-report.md`` / ``demo-summary.json``; returns the summary.

    Raises:
        DemoError: a stage failed (message holds the tail of its log) or ``out`` is not usable.
    """
    start = time.monotonic()
    executable = regionflow_executable()
    paths = prepare_out(out)
    stages = [run_stage(name, argv, paths, executable) for name, argv in stage_plan(config, paths)]
    picture_stages, pictures = draw_pictures(config, paths, executable)
    stages += picture_stages
    duplicates = caption_duplicates(paths.corpus, config.holdout_fraction)
    results = collect(paths)
    wall = time.monotonic() - start
    summary = {
        "config": {**asdict(config), "tasks": list(config.tasks), "task_weights": list(config.task_weights)},
        "heldout_images": results["none"]["retrieval"]["text_to_image"]["num_candidates"],
        "results": results,
        "duplicate_captions": duplicates,
        "stages": [asdict(s) for s in stages],
        "wall_time_s": wall,
        "targets": target_lines(results, wall),
        "reports": [
            str(paths.eval_dir(c) / "report.md") for c in ("none", "shuffle_visual", "shuffle_features")
        ],
        "pictures": pictures,
    }
    (out / "demo-summary.json").write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n")
    (out / "demo-report.md").write_text(results_markdown(summary))
    return summary


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="python -m pipelines.demo",
        description=__doc__.splitlines()[0],
        epilog=EXIT_CODES_HELP,
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--out", required=True, help="output folder (created; a previous demo's is replaced)")
    defaults = DemoConfig()
    for name in ("images", "samples_per_shard", "max_steps", "batch_size", "workers", "pictures"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(defaults, name))
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--holdout-fraction", type=float, default=defaults.holdout_fraction)
    parser.add_argument("--model-config", choices=tuple(TEXT_STREAMS), default=defaults.model_config)
    parser.add_argument(
        "--boxes",
        choices=("given", "fixed"),
        default=defaults.boxes,
        help="extract --boxes: the scene's true boxes (the demo) or the detector's own (README's second line)",
    )
    parser.add_argument(
        "--num-boxes", type=int, default=defaults.num_boxes, help="boxes per image with --boxes fixed"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = DemoConfig(
        images=args.images,
        samples_per_shard=args.samples_per_shard,
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        workers=args.workers,
        pictures=args.pictures,
        lr=args.lr,
        holdout_fraction=args.holdout_fraction,
        model_config=args.model_config,
        boxes=args.boxes,
        num_boxes=args.num_boxes,
    )
    try:
        summary = run_demo(config, Path(args.out))
    except DemoError as exc:
        print(f"[demo] FAILED: {exc}", file=sys.stderr)
        return ExitCode.RUN_FAILED
    print()
    print(results_markdown(summary))
    print(f"[demo] report: {Path(args.out) / 'demo-report.md'}; pictures: {Path(args.out) / 'pictures'}")
    return ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())
