"""The demo's stages: its configuration, output folders, the command line of each stage and how one runs.

Each stage is a subprocess of the ``regionflow`` console script (``run_stage``), its output kept in
``DIR/logs/NN-name.log``; ``stage_plan`` gives the argv of synth, extract, train and the evaluations. The
demo itself: ``pipelines/demo.py``; its results table: ``pipelines/demo_report.py``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

DEMO_MARKER = ".regionflow-demo"  # marks a directory this script created, so a rerun may replace its parts
SUBDIRS = ("corpus", "store", "run", "pictures", "logs")
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
