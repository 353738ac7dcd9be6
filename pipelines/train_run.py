"""The driver side of a training run before Ray starts: flags -> validated configs, the split and the answer
vocabulary, and ``RUN/run.json`` (written, or checked on ``--resume``).

Nothing here imports Ray. `prepare` reads the store's small index columns (keys, caption offsets, image ids;
`model.data.StoreImages`) and the VQA files, and writes nothing; `write_run` writes ``run.json`` once Ray has
accepted the request.

Run files: ``run.json`` (configs, split, vocabulary, store digest, extensions), ``losses.jsonl`` (one line per
step, mean over ranks), ``model.pt`` (at the end), ``throughput.json`` (last session), ``ray_train/`` (Ray
Train's storage and the checkpoints).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from model.config import ModelConfig, preset_config
from model.data import HASH_RULE, StoreImages
from model.items import vqa_split
from model.train_config import TASK_SCHEDULE, TrainConfig, TrainInputError, task_schedule
from schemas.manifest import canonical_json, manifest_digest

log = logging.getLogger(__name__)

RUN_FILE = "run.json"
LOSSES_FILE = "losses.jsonl"
MODEL_FILE = "model.pt"
THROUGHPUT_FILE = "throughput.json"
RAY_TRAIN_DIR = "ray_train"  # RunConfig(name=...) under RUN: Ray Train's own storage and checkpoints
CHECKPOINT_PREFIX = "checkpoint_"
FAULT_MARKER = ".fault_injected"
RUN_FORMAT = "regionflow.run/1"
UNCOMMITTED_SHOWN = 10  # uncommitted shard ids named in the warning
# TrainConfig fields a --resume may change (everything else must match run.json); max_steps only upwards
RESUME_MUTABLE = frozenset({"stop_after_steps", "max_failures", "inject_fault", "keep_checkpoints"})


@dataclass(frozen=True)
class PreparedRun:
    """A validated run, not yet written.

    Attributes:
        config, model_config: the run's configs.
        run_info: the ``run.json`` contents.
        resume_step: on ``--resume``, the step of the latest checkpoint (0 when there is none yet); else None.
    """

    config: TrainConfig
    model_config: ModelConfig
    run_info: dict[str, Any]
    resume_step: int | None


def _parse_tasks(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


def _parse_task_weights(text: str, tasks: tuple[str, ...]) -> tuple[int, ...]:
    if not text.strip():
        return ()
    parts = [p.strip() for p in text.split(",")]
    if not all(p.isdigit() for p in parts):
        raise TrainInputError(
            f"--task-weights must give one integer >= 1 per --task ({len(tasks)}: {','.join(tasks)}), got {text!r}"
        )
    return tuple(int(p) for p in parts)


def config_from_args(args: argparse.Namespace, store: str, max_steps: int) -> TrainConfig:
    """The `TrainConfig` of the flags (validated by its ``__post_init__``)."""
    tasks = _parse_tasks(args.task)
    return TrainConfig(
        store=store,
        out=str(Path(args.out).resolve()),
        tasks=tasks,
        task_weights=_parse_task_weights(args.task_weights, tasks),
        workers=args.workers,
        max_steps=max_steps,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        lr=args.lr,
        weight_decay=args.weight_decay,
        warmup_steps=args.warmup_steps,
        max_grad_norm=args.max_grad_norm,
        stop_after_steps=args.stop_after_steps,
        checkpoint_every=args.checkpoint_every,
        keep_checkpoints=args.keep_checkpoints,
        holdout_fraction=args.holdout_fraction,
        threads=args.threads,
        seed=args.seed,
        vqa_questions=str(Path(args.vqa_questions).resolve()) if args.vqa_questions else "",
        vqa_annotations=str(Path(args.vqa_annotations).resolve()) if args.vqa_annotations else "",
        vqa_min_answer_count=args.vqa_min_answer_count,
        max_failures=args.max_failures,
        inject_fault=args.inject_fault,
        use_gpu=torch.cuda.is_available(),
        init_from=str(Path(args.init_from).resolve()) if args.init_from else "",
    )


def _warn_uncommitted(reader: Any, store: str) -> None:
    """Log one WARNING naming the store's shards without a done marker (ignored, docs/design.md §9)."""
    ignored = reader.uncommitted_shards()
    if ignored:
        shown = ", ".join(ignored[:UNCOMMITTED_SHOWN]) + (", ..." if len(ignored) > UNCOMMITTED_SHOWN else "")
        log.warning(
            "train: ignoring %d uncommitted shard(s) of %s (a part file without a done marker; rerun "
            "`regionflow extract` on them to commit them): %s",
            len(ignored),
            store,
            shown,
        )


def prepare(args: argparse.Namespace) -> PreparedRun:
    """Validate the flags, open the store, fix split and vocabulary; on ``--resume`` check ``run.json``.

    Raises:
        TrainInputError, StoreSchemaError, EmptyStoreError, VqaDataError, FileNotFoundError: naming the problem.
    """
    from workers.store import StoreReader

    store_path = str(Path(args.store).resolve()) if "://" not in args.store else args.store
    config = config_from_args(args, store_path, args.max_steps)  # validates every flag before the store
    tasks = config.tasks
    if ("vqa" in tasks) != bool(args.vqa_questions and args.vqa_annotations):
        raise TrainInputError(
            "--task vqa needs --vqa-questions and --vqa-annotations (and they need --task vqa)"
        )
    reader = StoreReader(store_path)
    reader.check_part_sizes()  # sizes against the done markers, no re-hash (inspect --verify re-hashes)
    _warn_uncommitted(reader, store_path)
    images = StoreImages(reader)
    if images.empty_shard_ids:
        log.info("train: %d committed shard(s) hold no rows, skipped", len(images.empty_shard_ids))
    sizes, vocab = _split_sizes(images, config)
    model_config = preset_config(
        args.model_config,
        images.feature_dim,
        len(vocab),
        args.text_layers,
        args.contrastive_weight,
        args.hard_negatives,
        text_checkpoint=str(Path(args.text_dir).resolve()) if args.text_dir else "",
    )
    init_report = None
    if config.init_from:
        from model.init_from import init_config, initial_weights

        model_config = init_config(config.init_from, model_config)
        _, report = initial_weights(config.init_from, model_config)  # refuses what does not fit, before Ray
        init_report = report.to_dict()
        heads = sorted({name.split(".")[0] for name in report.fresh})
        log.info(
            "train: --init-from %s: %d tensors loaded, %d fresh%s",
            config.init_from,
            report.loaded,
            len(report.fresh),
            f" ({', '.join(heads)})" if heads else "",
        )
    max_steps = config.max_steps or _steps_from_epochs(sizes["items"], config, args.epochs)
    config = dataclasses.replace(config, max_steps=max_steps)
    run_info = {
        "format": RUN_FORMAT,
        "model_config": model_config.to_dict(),
        "tasks": list(tasks),
        "task_schedule": TASK_SCHEDULE,
        "task_weights": list(config.task_weights),
        "store": {
            "path": store_path,
            "manifest_digest": manifest_digest(reader.manifest),
            "feature_dim": images.feature_dim,
            "shards": images.shard_ids,
        },
        "split": {"holdout_fraction": config.holdout_fraction, "hash_rule": HASH_RULE, **sizes["split"]},
        "vqa": {"answer_vocab": vocab, "min_answer_count": config.vqa_min_answer_count}
        if "vqa" in tasks
        else None,
        "train": config.to_dict(),
    }
    if init_report is not None:
        run_info["init_from"] = init_report
    resume_step = None
    if args.resume:
        run_info, resume_step = check_resume(Path(config.out), run_info)
    elif (Path(config.out) / RUN_FILE).exists() or (Path(config.out) / RAY_TRAIN_DIR).exists():
        raise TrainInputError(f"{config.out} already holds a run: pass --resume or choose another --out")
    return PreparedRun(config, model_config, run_info, resume_step)


def _split_sizes(images: StoreImages, config: TrainConfig) -> tuple[dict, list[str]]:
    held = images.split_mask(config.holdout_fraction)
    captions = images.num_captions()
    split: dict[str, Any] = {
        "images": {"train": int((~held).sum()), "heldout": int(held.sum())},
        "pairs": {"train": int(captions[~held].sum()), "heldout": int(captions[held].sum())},
    }
    if split["images"]["train"] == 0:
        raise TrainInputError(
            f"the training split is empty ({images.num_images} images, holdout {config.holdout_fraction})"
        )
    vocab: list[str] = []
    items = {t: split["pairs"]["train"] for t in config.tasks if t != "vqa"}
    if "vqa" in config.tasks:
        vqa = vqa_split(images, held, config.vqa_questions, config.vqa_annotations)
        from model.vqa import build_answer_vocab

        vocab = build_answer_vocab(vqa["train"].questions, config.vqa_min_answer_count)
        split["questions"] = {k: len(v.questions) for k, v in vqa.items()}
        items["vqa"] = split["questions"]["train"]
    for task, n in items.items():
        if n < config.workers:
            raise TrainInputError(f"task {task}: {n} training item(s) cannot feed {config.workers} worker(s)")
    return {"split": split, "items": items}, vocab


def _steps_from_epochs(items: dict[str, int], config: TrainConfig, epochs: float) -> int:
    """Steps for ``epochs`` passes over the task that needs the most schedule cycles for one pass."""
    from model.items import steps_per_epoch

    schedule = task_schedule(config.tasks, config.task_weights)
    cycles = max(
        math.ceil(
            steps_per_epoch(n, config.workers, config.batch_size) / config.grad_accum / schedule.count(task)
        )
        for task, n in items.items()
    )
    return max(1, math.ceil(epochs * cycles * len(schedule)))


def latest_checkpoint_step(out: Path) -> int:
    """Step of the newest complete checkpoint under ``RUN/ray_train`` (0 when there is none)."""
    steps = [
        int(p.name[len(CHECKPOINT_PREFIX) :])
        for p in (out / RAY_TRAIN_DIR).glob(CHECKPOINT_PREFIX + "*")
        if p.name[len(CHECKPOINT_PREFIX) :].isdigit() and (p / "checkpoint.pt").is_file()
    ]
    return max(steps, default=0)


def check_resume(out: Path, run_info: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """Compare a ``--resume``'s run with the saved ``run.json``; returns the run info to write and the step.

    A larger ``--max-steps`` than the saved one extends the run (its schedule is recomputed: the learning rate
    decays to 0 at the new last step); the extension is appended to ``run_info["extensions"]``.

    Raises:
        TrainInputError: no run.json, or other arguments or store than the saved run (the message names the
            fields and what to run instead).
    """
    path = out / RUN_FILE
    if not path.exists():
        raise TrainInputError(f"--resume: {path} does not exist")
    saved = json.loads(path.read_text())
    new = json.loads(canonical_json(run_info))
    step = latest_checkpoint_step(out)
    old_max, new_max = saved["train"]["max_steps"], new["train"]["max_steps"]
    mutable = {f"train.{k}" for k in RESUME_MUTABLE}
    if new_max > old_max and step > 0:
        mutable.add("train.max_steps")
    diff = [
        k for k in _flat_diff({**saved, "extensions": None}, {**new, "extensions": None}) if k not in mutable
    ]
    if diff:
        hint = (
            f" (--max-steps {new_max} is below the run's {old_max}; a run cannot be shortened)"
            if "train.max_steps" in diff
            else ""
        )
        raise TrainInputError(
            f"--resume: arguments or store differ from {path}: {', '.join(diff)}{hint}; to train with other "
            f"settings start a new run from this one: `regionflow train ... --init-from {out} --out NEW_RUN`"
        )
    extensions = list(saved.get("extensions") or [])
    if new_max != old_max:
        extensions.append({"at_step": step, "max_steps": {"from": old_max, "to": new_max}})
        log.info(
            "train: extending %s from %d to %d steps (learning-rate schedule recomputed)",
            out,
            old_max,
            new_max,
        )
    return ({**run_info, "extensions": extensions} if extensions else run_info), step


def _flat_diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) for d in _flat_diff(a.get(k), b.get(k), f"{prefix}{k}.")]
    return [] if a == b else [prefix.rstrip(".")]


def write_run(prepared: PreparedRun, resume: bool) -> None:
    """Write ``RUN/run.json`` (the run directory is created on a new run)."""
    out = Path(prepared.config.out)
    if not resume:
        out.mkdir(parents=True, exist_ok=True)
    (out / RUN_FILE).write_bytes(canonical_json(prepared.run_info))
