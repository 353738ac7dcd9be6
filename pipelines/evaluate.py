"""``regionflow evaluate RUN STORE``: held-out metrics of a trained run, written as a report (docs/design.md §7).

Evaluation runs in the driver process (no Ray workers): every held-out row is scored exactly once, whatever the
number of training workers. The held-out split is the run's (``run.json``: holdout fraction and hash rule).

Per ``--task``:
    * retrieval / pretrain: retrieval recall@1/5/10 and median rank in both directions from matching logits of
      every held-out caption against every held-out image (`model.metrics.retrieval_metrics`, pessimistic ties),
      or, with ``--rerank-top K``, from the logits of each query's top K under the pooled-vector dot product
      (the other candidates keep their first-stage order below the re-ranked ones; the report says so); and
      matching accuracy of each held-out caption with its image and with one other held-out image drawn at
      random (seeded), beside chance 0.5.
    * vqa: official VQA accuracy of the held-out questions (those whose image is held out) beside the
      majority-answer baseline per question type, fitted on the training-split questions of the same files.
    * caption: BLEU-4 and CIDEr of one generated caption per held-out image (greedy, or ``--beam-size``).
Efficiency (samples/s, per-batch latency p50/p95, peak memory) per phase.

Controls: ``--shuffle-visual`` shows every held-out image the whole visual row (features, boxes, size) of another
held-out image (a seeded derangement); ``--shuffle-features`` moves only the features. Their reports go to
``RUN/eval-shuffle-visual`` / ``RUN/eval-shuffle-features`` unless ``--out`` is given.

This module holds the flags, the model and split loading, the controls and the report; the three task
evaluators are in ``pipelines.evaluate_tasks``, a released checkpoint's loading in ``pipelines.evaluate_released``.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.data import StoreImages
from model.input_errors import RUN_INPUT_ERRORS
from model.scoring import Scorer, derangement
from pipelines.cli import ExitCode, fail
from pipelines.evaluate_released import RELEASED_EVAL_SUFFIX, add_released_arguments
from pipelines.evaluate_tasks import EvalInputError, evaluate_captions, evaluate_retrieval, evaluate_vqa

log = logging.getLogger(__name__)

EVAL_DIR = "eval"
CONTROLS = ("none", "shuffle_visual", "shuffle_features")
DEFAULT_EVAL_BATCH = 64


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``regionflow evaluate`` (docs/design.md §9)."""
    parser.add_argument(
        "run_dir",
        metavar="RUN",
        help="run directory written by regionflow train, or a released vilbert-multi-task checkpoint file",
    )
    parser.add_argument("store", metavar="STORE", help="feature store")
    parser.add_argument("--task", required=True, help="comma-separated: pretrain, retrieval, vqa, caption")
    parser.add_argument(
        "--rerank-top", type=int, default=0, help="re-rank only the top K of the pooled dot product"
    )
    parser.add_argument(
        "--vqa-questions", default="", metavar="FILE", help="VQA v2 questions JSON (task vqa)"
    )
    parser.add_argument(
        "--vqa-annotations", default="", metavar="FILE", help="VQA v2 annotations JSON (task vqa)"
    )
    parser.add_argument(
        "--shuffle-visual", action="store_true", help="control: permute visual rows across images"
    )
    parser.add_argument("--shuffle-features", action="store_true", help="control: permute only the features")
    parser.add_argument(
        "--checkpoint", default="", help="a training checkpoint to evaluate instead of RUN/model.pt"
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=DEFAULT_EVAL_BATCH,
        help="(caption, image) pairs per forward pass; default %(default)s",
    )
    parser.add_argument(
        "--beam-size", type=int, default=1, help="caption decoding beam (1: greedy); default %(default)s"
    )
    parser.add_argument("--seed", type=int, default=0, help="negatives and control permutations")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument(
        "--out",
        default="",
        help="report directory (default RUN/eval[-control]; CHECKPOINT-eval/... for a file)",
    )
    add_released_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """Run ``regionflow evaluate``; returns `ExitCode` OK or BAD_INPUT."""
    try:
        out = evaluate(args)
    except EvalInputError as exc:
        return fail("evaluate", exc)
    except RUN_INPUT_ERRORS as exc:
        return fail("evaluate", exc)
    from model.report import REPORT_JSON

    report = json.loads((out / REPORT_JSON).read_text())
    for line in headline(report["metrics"]):
        log.info("evaluate: %s", line)
    log.info("evaluate: report in %s", out)
    return ExitCode.OK


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def headline(metrics: dict[str, Any]) -> list[str]:
    """One terminal line per task family: recall@1/5/10 with chance, matching and VQA accuracy beside their
    baselines, BLEU-4 and CIDEr."""
    lines = []
    retrieval = metrics.get("retrieval")
    if retrieval:
        for direction, name in (("text_to_image", "text->image"), ("image_to_text", "image->text")):
            d = retrieval[direction]
            recalls = " ".join(f"R@{k} {_pct(d['recall'][k])}" for k in ("1", "5", "10") if k in d["recall"])
            lines.append(
                f"{name} {recalls} (chance R@1 {_pct(d['chance_recall'].get('1'))}, "
                f"{d['num_candidates']} candidates)"
            )
    if "matching" in metrics:
        m = metrics["matching"]
        lines.append(f"matching accuracy {_pct(m['accuracy'])} (chance {_pct(m['chance'])})")
    if "vqa" in metrics:
        v = metrics["vqa"]
        lines.append(
            f"VQA accuracy {_pct(v['model']['overall'])} (majority-answer baseline "
            f"{_pct(v['baseline'].get('overall'))}, {v['model']['num_questions']} questions)"
        )
    if "caption" in metrics:
        c = metrics["caption"]
        lines.append(f"captions BLEU-4 {c['bleu4']:.3f}, CIDEr {c['cider']:.3f} ({c['num_images']} images)")
    return lines


# ------------------------------------------------------------------------------------------- set-up
def _parse_tasks(text: str) -> list[str]:
    from model.tasks import TASKS

    tasks = [t.strip() for t in text.split(",") if t.strip()]
    if not tasks or any(t not in TASKS for t in tasks):
        raise EvalInputError(f"--task must list tasks from {TASKS}, got {text!r}")
    return tasks


# smallest value of each integer flag of `evaluate`; `_check_numbers` runs before anything is read
INT_FLAG_MINIMUMS = {"rerank_top": 0, "batch_size": 1, "beam_size": 1, "threads": 0}


def _check_numbers(args: argparse.Namespace) -> None:
    """Raise `EvalInputError` naming the first integer flag below its minimum."""
    for name, minimum in INT_FLAG_MINIMUMS.items():
        if getattr(args, name) < minimum:
            flag = "--" + name.replace("_", "-")
            raise EvalInputError(f"{flag} must be >= {minimum}, got {getattr(args, name)}")


def _control(args: argparse.Namespace) -> str:
    if args.shuffle_visual and args.shuffle_features:
        raise EvalInputError("--shuffle-visual and --shuffle-features are exclusive")
    return (
        "shuffle_visual" if args.shuffle_visual else "shuffle_features" if args.shuffle_features else "none"
    )


def load_trained_model(run_dir: Path, checkpoint: str, device: torch.device) -> tuple[Any, dict[str, Any]]:
    """The run's model (``model.pt``, or ``checkpoint``) in eval mode, and ``run.json``.

    Raises:
        EvalInputError: no run.json or no model.pt.
        CheckpointError: a model file or checkpoint of another model config than the run's.
    """
    from model.checkpoint import load_checkpoint, load_model
    from model.config import ModelConfig
    from model.tasks import TaskModel

    run_file = run_dir / "run.json"
    if not run_file.is_file():
        raise EvalInputError(f"{run_file} does not exist: not a regionflow run directory")
    run_info = json.loads(run_file.read_text())
    config = ModelConfig.from_dict(run_info["model_config"])
    if checkpoint:
        state_dict = load_checkpoint(checkpoint, expected_config=config).model
    else:
        model_file = run_dir / "model.pt"
        if not model_file.is_file():
            raise EvalInputError(f"{model_file} does not exist: training did not finish (pass --checkpoint)")
        state_dict = load_model(model_file, expected_config=config).state_dict
    model = TaskModel(config)
    model.load_state_dict(state_dict)
    return model.to(device).eval(), run_info


def controlled_images(images: StoreImages, heldout: np.ndarray, control: str, seed: int) -> StoreImages:
    """The store as the model sees it under ``control``: held-out images' visual rows permuted among themselves."""
    if control == "none":
        return images
    if len(heldout) < 2:
        raise EvalInputError(f"--{control.replace('_', '-')} needs at least 2 held-out images")
    perm = np.arange(images.num_images)
    perm[heldout] = heldout[derangement(len(heldout), np.random.default_rng(seed))]
    return images.with_visual_permutation(perm, features_only=control == "shuffle_features")


# ------------------------------------------------------------------------------------------- driver
def evaluate(args: argparse.Namespace) -> Path:
    """Evaluate and write the report; returns the report directory.

    Raises:
        EvalInputError, StoreSchemaError, VqaDataError, CheckpointError, FileNotFoundError: bad input.
    """
    from model.data import HASH_RULE
    from model.report import read_losses, write_report
    from schemas.manifest import manifest_digest
    from workers.store import StoreReader

    _check_numbers(args)
    tasks, control = _parse_tasks(args.task), _control(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    run_dir = Path(args.run_dir).resolve()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    reader = StoreReader(args.store)
    reader.check_part_sizes()  # sizes against the done markers, no re-hash (inspect --verify re-hashes)
    released = run_dir.is_file()
    if released:  # a released vilbert-multi-task checkpoint, evaluated on every image of the store
        from pipelines.evaluate_released import load_released_model

        model, run_info = load_released_model(run_dir, args, reader, tasks, device)
    else:
        model, run_info = load_trained_model(run_dir, args.checkpoint, device)
    config = model.config
    if reader.feature_dim != config.feature_dim:
        raise EvalInputError(
            f"store features have D={reader.feature_dim}, the model was trained on D={config.feature_dim}"
        )
    images = StoreImages(reader)
    fraction = run_info["split"]["holdout_fraction"]
    held_mask = images.split_mask(fraction) if fraction is not None else np.ones(images.num_images, bool)
    heldout = np.flatnonzero(held_mask)
    if len(heldout) == 0:
        raise EvalInputError(
            f"the held-out split is empty ({images.num_images} images, holdout fraction {fraction})"
        )
    seen = controlled_images(images, heldout, control, args.seed)
    scorer = Scorer(model, seen, device, max(1, args.batch_size))
    metrics: dict[str, Any] = {}
    if {"retrieval", "pretrain"} & set(tasks):
        metrics.update(evaluate_retrieval(scorer, seen, heldout, args.rerank_top, args.seed))
    if "vqa" in tasks:
        metrics["vqa"] = evaluate_vqa(scorer, run_info, seen, held_mask, args, config)
    if "caption" in tasks:
        metrics["caption"] = evaluate_captions(scorer, seen, heldout, config, args.beam_size)
    notes = _notes(run_info, reader, control, args, manifest_digest(reader.manifest))
    report = {
        "run": str(run_dir),
        "store": str(args.store),
        "tasks": tasks,
        "control": control,
        "model": _model_name(args, released),
        "split": {
            "holdout_fraction": fraction,
            "hash_rule": run_info["split"].get("hash_rule", HASH_RULE),
            "images": int(len(heldout)),
            "captions": int(images.num_captions()[heldout].sum()),
        },
        "metrics": metrics,
        "efficiency": scorer.efficiency(),
        "notes": notes,
    }
    default_dir = EVAL_DIR if control == "none" else f"{EVAL_DIR}-{control.replace('_', '-')}"
    if args.out:
        out = Path(args.out)
    elif released:
        out = run_dir.with_name(run_dir.name + RELEASED_EVAL_SUFFIX) / default_dir
    else:
        out = run_dir / default_dir
    write_report(out, report, [] if released else read_losses(run_dir / "losses.jsonl"))
    return out


def _model_name(args: argparse.Namespace, released: bool) -> str:
    if released:
        return f"released checkpoint {args.run_dir}"
    return "checkpoint " + args.checkpoint if args.checkpoint else "model.pt"


def _notes(
    run_info: dict[str, Any], reader: Any, control: str, args: argparse.Namespace, digest: str
) -> list[str]:
    notes = [
        "Evaluation ran in the driver process (no Ray workers): every held-out row is scored exactly once."
    ]
    if digest != run_info["store"]["manifest_digest"]:
        mismatch = (
            f"the store's manifest digest {digest[:12]} differs from the training store's "
            f"{run_info['store']['manifest_digest'][:12]}: held-out figures assume the training store's split"
        )
        log.warning("evaluate: %s", mismatch)  # on the terminal too, not only in report.md
        notes.append(f"WARNING: {mismatch}.")
    if control != "none":
        what = (
            "whole visual rows (features, boxes, sizes)"
            if control == "shuffle_visual"
            else "region features only"
        )
        notes.append(
            f"CONTROL {control}: {what} permuted across held-out images (seeded derangement, seed {args.seed}); expect chance."
        )
    if args.rerank_top > 0:
        notes.append(
            f"Retrieval re-ranks only the top {args.rerank_top} candidates of the pooled-vector dot product."
        )
    return notes
