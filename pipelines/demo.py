"""``python -m pipelines.demo --out DIR`` (``make demo``): the embedded corpus end to end, through the real CLI.

Every stage runs as a subprocess of the ``regionflow`` console script, exactly as a user would type it:

1. ``synth``: the procedural corpus (DESIGN §8): shards + VQA v2 files;
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
is kept in ``DIR/logs/``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipelines.cli import EXIT_CODES_HELP, ExitCode, HelpFormatter, Parser

DEMO_MARKER = ".regionflow-demo"  # marks a directory this script created, so a rerun may replace its parts
SUBDIRS = ("corpus", "store", "run", "pictures", "logs")
TARGETS = {"text_to_image_recall_at_1": 0.8, "vqa_accuracy": 0.9, "wall_time_s": 15 * 60}
TARGET_CANDIDATES = 100
TEXT_STREAMS = {
    "tiny": "random-init 2-layer BERT of width 32 with the WordPiece vocabulary of all-MiniLM-L6-v2",
    "small": "random-init 2-layer BERT of width 128 with the WordPiece vocabulary of all-MiniLM-L6-v2",
    "base": "pretrained all-MiniLM-L6-v2 (6 layers, width 384)",
}
LOG_TAIL_LINES = 40


@dataclass(frozen=True)
class DemoConfig:
    """Sizes and settings of the demo run (defaults: tuned to finish within 15 minutes on 2 CPU cores).

    Attributes:
        images (int, 2000): corpus images; ``holdout_fraction`` of them (by key hash) are held out.
        samples_per_shard (int, 250): samples per tar shard.
        seed (int, 0): corpus seed (the training seed is fixed at 0).
        holdout_fraction (float, 0.06): share of images held out for evaluation (140 of the 2000 images of
            seed 0: the retrieval candidates; the rest trains).
        workers (int, 2): Ray Train workers (DDP ranks on CPU, ``gloo``).
        threads_per_worker (int, 1): torch threads per training worker.
        model_config (str, "small"): ``regionflow train --model-config`` preset.
        max_steps (int, 4800): optimizer steps, ``task_weights`` of each task per cycle of 12.
        task_weights (tuple[int, ...], (1, 4, 6, 1)): ``train --task-weights`` for ``tasks``: VQA learns slowest
            (measured, VQA alone: 1000 steps 50%, 3000 steps 85% held-out accuracy) and a caption step costs
            ~4 others (its output layer spans the 30522-token vocabulary).
        batch_size (int, 32): pairs per worker per step.
        lr (float, 5e-4): peak learning rate (linear warm-up and decay).
        warmup_steps (int, 100): warm-up steps.
        contrastive_weight (float, 1.0): weight of the in-batch contrastive loss that trains the first stage.
        hard_negatives (bool, True): ``train --hard-negatives`` (matching-head negatives drawn by contrastive
            similarity, so the re-ranking of the top 10 learns near misses).
        rerank_top (int, 10): retrieval re-ranks the top K of the pooled dot product with matching logits.
        eval_threads (int, 1): torch threads of ``evaluate`` (more threads on a busy 2-core machine are slower).
        boxes (str, "given"): ``extract --boxes``: ``given`` pools the scene's true boxes; ``fixed`` the
            detector's own ``num_boxes`` boxes (random-init proposals: the README's second line of figures).
        num_boxes (int, 10): boxes per image with ``boxes="fixed"``.
        pictures (int, 3): held-out images drawn with ``visualize``.
        picture_scale (float, 3.0): ``visualize --scale``.
    """

    images: int = 2000
    samples_per_shard: int = 250
    seed: int = 0
    holdout_fraction: float = 0.06
    workers: int = 2
    threads_per_worker: int = 1
    model_config: str = "small"
    max_steps: int = 4800
    batch_size: int = 32
    lr: float = 5e-4
    warmup_steps: int = 100
    contrastive_weight: float = 1.0
    hard_negatives: bool = True
    rerank_top: int = 10
    eval_threads: int = 1
    boxes: str = "given"
    num_boxes: int = 10
    pictures: int = 3
    picture_scale: float = 3.0
    tasks: tuple[str, ...] = ("pretrain", "retrieval", "vqa", "caption")
    task_weights: tuple[int, ...] = (1, 4, 6, 1)


@dataclass
class StageResult:
    """One CLI invocation: its argv (after ``regionflow``), exit code, wall time and log file."""

    name: str
    argv: list[str]
    returncode: int
    seconds: float
    log: str


@dataclass
class DemoPaths:
    """Where everything lives under ``--out``."""

    root: Path
    corpus: Path = field(init=False)
    store: Path = field(init=False)
    run: Path = field(init=False)
    pictures: Path = field(init=False)
    logs: Path = field(init=False)

    def __post_init__(self) -> None:
        for name in SUBDIRS:
            setattr(self, name, self.root / name)

    @property
    def questions(self) -> Path:
        return self.corpus / "questions.json"

    @property
    def annotations(self) -> Path:
        return self.corpus / "annotations.json"

    def eval_dir(self, control: str) -> Path:
        return self.run / ("eval" if control == "none" else f"eval-{control.replace('_', '-')}")


class DemoError(RuntimeError):
    """A stage failed or the output directory cannot be used (the message says which and where its log is)."""


# ------------------------------------------------------------------------------------------------ running
def regionflow_executable() -> str:
    """The ``regionflow`` console script of this interpreter's environment (else the one on PATH).

    Raises:
        DemoError: no ``regionflow`` script is installed.
    """
    beside = Path(sys.executable).with_name("regionflow")
    if beside.exists():
        return str(beside)
    found = shutil.which("regionflow")
    if found is None:
        raise DemoError("no `regionflow` console script: install the project first (make setup)")
    return found


def prepare_out(root: Path) -> DemoPaths:
    """Create ``root`` (or reuse a previous demo's, replacing its parts); refuse any other non-empty folder."""
    if root.exists() and any(root.iterdir()) and not (root / DEMO_MARKER).exists():
        raise DemoError(f"{root} is not empty and was not made by the demo: choose another --out")
    root.mkdir(parents=True, exist_ok=True)
    (root / DEMO_MARKER).write_text("made by python -m pipelines.demo\n")
    paths = DemoPaths(root)
    for name in SUBDIRS:
        shutil.rmtree(getattr(paths, name), ignore_errors=True)
    paths.logs.mkdir()
    paths.pictures.mkdir()
    return paths


def run_stage(name: str, argv: list[str], paths: DemoPaths, executable: str) -> StageResult:
    """Run ``regionflow ARGV``, output to ``logs/NN-name.log``; raises ``DemoError`` on a non-zero exit."""
    index = len(list(paths.logs.glob("*.log")))
    log = paths.logs / f"{index:02d}-{name}.log"
    print(f"[demo] {name}: regionflow {' '.join(argv)}", flush=True)
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"}
    start = time.monotonic()
    with log.open("w") as out:
        code = subprocess.run([executable, *argv], stdout=out, stderr=subprocess.STDOUT, env=env).returncode
    seconds = time.monotonic() - start
    print(f"[demo] {name}: exit {code} in {seconds:.1f} s (log {log})", flush=True)
    if code != 0:
        tail = log.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
        raise DemoError(
            f"stage {name} failed with exit code {code}; last lines of {log}:\n" + "\n".join(tail)
        )
    return StageResult(name, argv, code, seconds, str(log))


def box_flags(boxes: str, num_boxes: int) -> list[str]:
    """``extract`` flags of the demo's box mode (``num_boxes`` counts with ``fixed`` only)."""
    if boxes == "fixed":
        return ["--boxes", "fixed", "--num-boxes", str(num_boxes)]
    return ["--boxes", boxes]


def stage_plan(config: DemoConfig, paths: DemoPaths) -> list[tuple[str, list[str]]]:
    """(name, argv) of synth, extract, train and the three evaluations, in order."""
    num_shards = -(-config.images // config.samples_per_shard)
    shards = [str(paths.corpus / f"synth-{i:06d}.tar") for i in range(num_shards)]
    vqa = ["--vqa-questions", str(paths.questions), "--vqa-annotations", str(paths.annotations)]
    tasks = ",".join(config.tasks)
    evaluate = ["evaluate", str(paths.run), str(paths.store), "--threads", str(config.eval_threads), *vqa]
    eval_tasks = [t for t in ("retrieval", "vqa", "caption") if t in config.tasks or t == "retrieval"]
    return [
        ("synth", ["synth", "--out", str(paths.corpus), "--images", str(config.images),
                   "--samples-per-shard", str(config.samples_per_shard), "--seed", str(config.seed)]),
        ("extract", ["extract", *shards, "--out", str(paths.store), "--config", "tiny", *box_flags(config.boxes, config.num_boxes)]),
        ("train", ["train", str(paths.store), "--task", tasks,
                   "--task-weights", ",".join(str(w) for w in config.task_weights), "--workers", str(config.workers),
                   "--out", str(paths.run), "--max-steps", str(config.max_steps), *vqa,
                   "--holdout-fraction", str(config.holdout_fraction), "--model-config", config.model_config,
                   "--batch-size", str(config.batch_size), "--lr", str(config.lr),
                   "--warmup-steps", str(config.warmup_steps), "--threads", str(config.threads_per_worker),
                   "--contrastive-weight", str(config.contrastive_weight),
                   *(["--hard-negatives"] if config.hard_negatives else []), "--checkpoint-every",
                   str(config.max_steps)]),
        ("evaluate", [*evaluate, "--task", ",".join(eval_tasks), "--rerank-top", str(config.rerank_top)]),
        ("evaluate-shuffle-visual", [*evaluate, "--task", "retrieval,vqa", "--rerank-top",
                                     str(config.rerank_top), "--shuffle-visual"]),
        ("evaluate-shuffle-features", [*evaluate, "--task", "retrieval,vqa", "--rerank-top",
                                       str(config.rerank_top), "--shuffle-features"]),
    ]  # fmt: skip


# ------------------------------------------------------------------------------------------- the corpus
def corpus_captions(corpus: Path) -> list[tuple[str, str, list[str]]]:
    """(shard id, key, captions) of every sample in the corpus shards, read from their ``KEY.json`` members."""
    out = []
    for shard in sorted(corpus.glob("synth-*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar:
                data = tar.extractfile(member) if member.isfile() else None
                if data is not None and member.name.endswith(".json"):
                    record = json.loads(data.read())
                    out.append(
                        (shard.name.split(".", 1)[0], member.name[: -len(".json")], record["captions"])
                    )
    return out


def caption_duplicates(corpus: Path, holdout_fraction: float) -> dict[str, float]:
    """Duplicate-caption share over the whole corpus and over the held-out images (the retrieval candidates)."""
    from model.data import is_heldout
    from workers.corpus.synth import duplicate_caption_share

    samples = corpus_captions(corpus)
    held = [c for shard, key, c in samples if is_heldout(shard, key, holdout_fraction)]
    return {
        "all_images": duplicate_caption_share(c for _, _, c in samples),
        "heldout_images": duplicate_caption_share(held),
        "heldout_count": float(len(held)),
    }


def heldout_keys(corpus: Path, holdout_fraction: float, count: int) -> list[tuple[str, str]]:
    """The first ``count`` held-out (shard id, key) pairs in corpus order."""
    from model.data import is_heldout

    held = [(s, k) for s, k, _ in corpus_captions(corpus) if is_heldout(s, k, holdout_fraction)]
    return held[:count]


# ------------------------------------------------------------------------------------------- the results
def _report(paths: DemoPaths, control: str) -> dict[str, Any]:
    path = paths.eval_dir(control) / "report.json"
    if not path.exists():
        raise DemoError(f"evaluate wrote no {path}")
    return json.loads(path.read_text())


def collect(paths: DemoPaths) -> dict[str, Any]:
    """The metrics the table shows, from the three evaluation reports."""
    out: dict[str, Any] = {}
    for control in ("none", "shuffle_visual", "shuffle_features"):
        metrics = _report(paths, control)["metrics"]
        entry: dict[str, Any] = {}
        if "retrieval" in metrics:
            entry["retrieval"] = {
                d: {
                    "recall": metrics["retrieval"][d]["recall"],
                    "chance_recall": metrics["retrieval"][d]["chance_recall"],
                    "num_candidates": metrics["retrieval"][d]["num_candidates"],
                    "num_queries": metrics["retrieval"][d]["num_queries"],
                    "median_rank": metrics["retrieval"][d]["median_rank"],
                }
                for d in ("text_to_image", "image_to_text")
            }
            entry["retrieval"]["scoring"] = metrics["retrieval"]["scoring"]
        if "matching" in metrics:
            entry["matching_accuracy"] = metrics["matching"]["accuracy"]
        if "vqa" in metrics:
            vqa = metrics["vqa"]
            entry["vqa"] = {
                "accuracy": vqa["model"]["overall"],
                "num_questions": vqa["model"]["num_questions"],
                "per_question_type": vqa["model"]["per_question_type"],
                "majority_baseline": vqa["baseline"]["overall"],
                "baseline_kind": vqa["baseline"].get("kind", ""),
                "baseline_per_question_type": vqa["baseline"].get("per_question_type", {}),
            }
        if "caption" in metrics:
            entry["caption"] = {
                k: metrics["caption"][k] for k in ("bleu4", "cider", "num_images", "decoding")
            }
            entry["caption"]["examples"] = metrics["caption"].get("examples", [])[:3]
        out[control] = entry
    return out


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _retrieval_rows(label: str, entry: dict[str, Any]) -> list[str]:
    rows = []
    for direction in ("text_to_image", "image_to_text"):
        d = entry["retrieval"][direction]
        r, c = d["recall"], d["chance_recall"]
        rows.append(
            f"| {label} | {direction.replace('_', ' ')} | {_pct(r['1'])} | {_pct(r['5'])} | {_pct(r['10'])} "
            f"| {d['num_candidates']} | {_pct(c['1'])} / {_pct(c['5'])} / {_pct(c['10'])} |"
        )
    return rows


def _weighted_tasks(config: dict[str, Any]) -> str:
    weights = config.get("task_weights") or [1] * len(config["tasks"])
    return ", ".join(f"{t} ({w})" for t, w in zip(config["tasks"], weights, strict=True)) + " steps per cycle"


def results_markdown(summary: dict[str, Any]) -> str:
    """The results table and context lines as Markdown."""
    results, config = summary["results"], summary["config"]
    main = results["none"]
    lines = ["# regionflow demo results", ""]
    lines += [
        f"Corpus: {config['images']} synthetic images (seed {config['seed']}), "
        f"{summary['heldout_images']} held out by key hash (fraction {config['holdout_fraction']}). "
        f"Features: `extract --config tiny {' '.join(box_flags(config.get('boxes', 'given'), config.get('num_boxes', 0)))}` "
        f"(random-init detector, {'true boxes' if config.get('boxes', 'given') == 'given' else 'its own boxes'}). "
        f"Model: `--model-config {config['model_config']}` (text stream: {TEXT_STREAMS[config['model_config']]}), "
        f"{config['max_steps']} steps of batch {config['batch_size']} per worker, {config['workers']} Ray Train "
        f"workers on CPU, tasks {_weighted_tasks(config)}.",
        "",
        "## Retrieval (held-out images; recall@1 / @5 / @10)",
        "",
        "| run | direction | R@1 | R@5 | R@10 | candidates | chance @1 / @5 / @10 |",
        "|---|---|---|---|---|---|---|",
    ]
    for control, label in (("none", "model"), ("shuffle_visual", "control: shuffled visual rows"),
                           ("shuffle_features", "control: shuffled features")):  # fmt: skip
        if "retrieval" in results[control]:
            lines += _retrieval_rows(label, results[control])
    lines += ["", f"Scoring: {main['retrieval']['scoring']}", ""]
    if "vqa" in main:
        lines += ["## VQA (official accuracy, held-out questions)", "", "| run | accuracy | questions |",
                  "|---|---|---|"]  # fmt: skip
        lines.append(f"| model | {_pct(main['vqa']['accuracy'])} | {main['vqa']['num_questions']} |")
        lines.append(
            f"| baseline: {main['vqa']['baseline_kind'] or 'majority answer'} "
            f"| {_pct(main['vqa']['majority_baseline'])} | {main['vqa']['num_questions']} |"
        )
        for control, label in (("shuffle_visual", "control: shuffled visual rows"),
                               ("shuffle_features", "control: shuffled features")):  # fmt: skip
            if "vqa" in results[control]:
                lines.append(f"| {label} | {_pct(results[control]['vqa']['accuracy'])} | |")
        lines += ["", "| question type | model | majority baseline |", "|---|---|---|"]
        for qtype, acc in main["vqa"]["per_question_type"].items():
            base = main["vqa"]["baseline_per_question_type"].get(qtype)
            lines.append(f"| {qtype} | {_pct(acc)} | {_pct(base)} |")
        lines.append("")
    if "caption" in main:
        cap = main["caption"]
        lines += ["## Captioning (held-out images)", "",
                  f"BLEU-4 {cap['bleu4']:.3f}, CIDEr {cap['cider']:.3f} on {cap['num_images']} images "
                  f"({cap['decoding']} decoding).", ""]  # fmt: skip
        for example in cap.get("examples", []):
            lines.append(f"- generated: “{example['generated']}” — reference: “{example['reference']}”")
        lines.append("")
    dup = summary["duplicate_captions"]
    lines += [
        "## Corpus",
        "",
        f"Duplicate-caption share (captions whose exact text also captions another image): "
        f"{_pct(dup['all_images'])} of all captions, {_pct(dup['heldout_images'])} among the held-out images.",
        "",
        "## Targets",
        "",
    ]
    lines += [f"- {line}" for line in summary["targets"]]
    lines += ["", "## Stages (wall time)", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {s['name']} | {s['seconds']:.1f} |" for s in summary["stages"]]
    lines += [f"| **total** | **{summary['wall_time_s']:.1f}** |", ""]
    lines += [
        "Reports: " + ", ".join(summary["reports"]),
        "",
        "Pictures: "
        + ", ".join(summary["pictures"])
        + " (boxes labelled with the random-init detector's class id "
        "and confidence: without weights they carry no meaning; training progress is in run/losses.jsonl)",
        "",
    ]
    return "\n".join(lines)


def target_lines(results: dict[str, Any], wall_time_s: float) -> list[str]:
    """One line per issue target: measured value, target, met or missed."""
    main = results["none"]
    t2i = main["retrieval"]["text_to_image"]
    r1, candidates = t2i["recall"]["1"], t2i["num_candidates"]
    lines = [
        f"text-to-image recall@1 {_pct(r1)} with {candidates} candidate images (target >= "
        f"{_pct(TARGETS['text_to_image_recall_at_1'])} with >= {TARGET_CANDIDATES}): "
        + (
            "met"
            if r1 >= TARGETS["text_to_image_recall_at_1"] and candidates >= TARGET_CANDIDATES
            else "MISSED"
        ),
    ]
    if "vqa" in main:
        acc = main["vqa"]["accuracy"]
        lines.append(
            f"VQA accuracy {_pct(acc)} (target >= {_pct(TARGETS['vqa_accuracy'])}): "
            + ("met" if acc >= TARGETS["vqa_accuracy"] else "MISSED")
        )
    lines.append(
        f"wall time {wall_time_s / 60:.1f} min from synth to the last picture (target <= "
        f"{TARGETS['wall_time_s'] / 60:.0f} min on 2 CPU cores; `make setup` not included): "
        + ("met" if wall_time_s <= TARGETS["wall_time_s"] else "MISSED")
    )
    return lines


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
