"""The Ray Train worker: one call of `train_loop_per_worker` per rank (again after a failure restart).

A thin shell around `model.trainer.Trainer`: it takes the rank, world size and device from Ray Train, opens the
store (each rank opens what it reads: `model.data.StoreImages`), restores from ``ray.train.get_checkpoint()``
(a failure restart or ``--resume``), reports checkpoints to Ray Train (rank 0 writes them), appends
``RUN/losses.jsonl`` on rank 0, and writes ``RUN/model.pt`` and ``RUN/throughput.json`` at the end.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from model.checkpoint import load_checkpoint, save_checkpoint, save_model
from model.config import ModelConfig
from model.train_config import TrainConfig
from model.trainer import StepRecord, Trainer
from pipelines.train_run import FAULT_MARKER, LOSSES_FILE, MODEL_FILE, THROUGHPUT_FILE
from schemas.manifest import canonical_json


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Build this rank's `Trainer`, restore, train to the stop step, finish (rank 0 writes the run files)."""
    import ray.train
    from ray.train.torch import get_device

    from model.data import StoreImages
    from model.items import training_sources
    from pipelines.ray_runtime import quiet_ray_train_reports
    from workers.store import StoreReader

    quiet_ray_train_reports()  # after Ray Train configured this rank's loggers
    config = TrainConfig.from_dict(loop_config["train"])
    model_config = ModelConfig.from_dict(loop_config["model_config"])
    run_info = loop_config["run"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    if config.threads:
        torch.set_num_threads(config.threads)
    vocab = (run_info.get("vqa") or {}).get("answer_vocab", [])
    images = StoreImages(StoreReader(config.store))
    tokenize = question_tokenizer(config, model_config) if "vqa" in config.tasks else None
    sources = training_sources(images, config, model_config, vocab, tokenize)
    out = Path(config.out)
    checkpoint = ray.train.get_checkpoint()
    initial = None
    if (
        checkpoint is None and config.init_from
    ):  # a checkpoint (restart, --resume) replaces every weight anyway
        from model.init_from import initial_weights

        initial, _ = initial_weights(config.init_from, model_config)
    trainer = Trainer(config, model_config, sources, rank, world, get_device(), initial)
    _restore(trainer, out, checkpoint)
    stop = min(config.max_steps, config.stop_after_steps or config.max_steps)
    start_step, started = trainer.step, time.perf_counter()
    trainer.run(
        stop,
        on_step=lambda record: _log_step(trainer, out, record),
        on_checkpoint=lambda record: _report_checkpoint(trainer, record),
        before_step=lambda step: _maybe_inject_fault(config, out, rank, step),
    )
    if rank == 0:
        _finish(trainer, out, run_info, start_step, time.perf_counter() - started)


def question_tokenizer(config: TrainConfig, model_config: ModelConfig) -> Any:
    """Questions -> ``[CLS] ... [SEP]`` ids: the caption tokenizer of the model's text checkpoint, cut at
    ``config.max_question_tokens``."""
    from schemas.text_checkpoint import resolve_text_checkpoint
    from workers.read.tokenizer import CaptionTokenizer

    checkpoint = str(resolve_text_checkpoint(model_config.text_checkpoint))
    tokenizer = CaptionTokenizer(checkpoint, max_tokens=config.max_question_tokens)
    return lambda questions: tokenizer.encode(questions).input_ids


def _restore(trainer: Trainer, out: Path, checkpoint: Any) -> None:
    """Continue from Ray Train's latest checkpoint when there is one; else start ``losses.jsonl`` afresh."""
    if checkpoint is None:
        if trainer.rank == 0:
            (out / LOSSES_FILE).write_text("")
        return
    with checkpoint.as_directory() as directory:
        state = load_checkpoint(directory, expected_config=trainer.model_config)
    trainer.load_state(state)
    if trainer.rank == 0:
        rewind_losses(out / LOSSES_FILE, trainer.step)


def _log_step(trainer: Trainer, out: Path, record: StepRecord) -> None:
    if trainer.rank == 0:
        with open(out / LOSSES_FILE, "a") as f:
            f.write(json.dumps(record.to_dict(), sort_keys=True) + "\n")


def _report_checkpoint(trainer: Trainer, record: StepRecord) -> None:
    """Every rank reports to Ray Train; rank 0 attaches the checkpoint it writes."""
    import ray.train

    state = trainer.state()  # collective: every rank's RNG state
    metrics = {"step": record.step, "loss": record.loss}
    name = f"checkpoint_{trainer.step:08d}"
    if state is None:
        ray.train.report(metrics, checkpoint=None, checkpoint_dir_name=name)
        return
    with tempfile.TemporaryDirectory() as directory:
        save_checkpoint(directory, state)
        ray.train.report(
            metrics, checkpoint=ray.train.Checkpoint.from_directory(directory), checkpoint_dir_name=name
        )


def _maybe_inject_fault(config: TrainConfig, out: Path, rank: int, step: int) -> None:
    """Tests only: ``inject_fault="RANK:STEP"`` kills that rank once, before that step, guarded by a marker."""
    if not config.inject_fault:
        return
    fault_rank, fault_step = (int(x) for x in config.inject_fault.split(":"))
    marker = out / FAULT_MARKER
    if rank == fault_rank and step == fault_step and not marker.exists():
        marker.write_text(f"rank {rank} killed before step {step}\n")
        os._exit(1)


def _finish(trainer: Trainer, out: Path, run_info: dict[str, Any], start_step: int, seconds: float) -> None:
    config = trainer.config
    steps = trainer.step - start_step
    pairs = steps * config.batch_size * config.grad_accum * trainer.world
    throughput = {
        "steps": steps,
        "seconds": seconds,
        "steps_per_s": steps / seconds if seconds > 0 else None,
        "samples_per_s": pairs / seconds if seconds > 0 else None,
        "workers": trainer.world,
        "device": str(trainer.device),
        "threads_per_worker": torch.get_num_threads(),
    }
    (out / THROUGHPUT_FILE).write_bytes(canonical_json(throughput))
    if trainer.step == config.max_steps:
        extra = {
            "tasks": list(config.tasks),
            "answer_vocab": (run_info.get("vqa") or {}).get("answer_vocab", []),
        }
        save_model(out / MODEL_FILE, trainer.model, trainer.model_config, extra)


def rewind_losses(path: Path, step: int) -> None:
    """Keep the log lines of steps ``<= step`` (lines of an interrupted session past its checkpoint go)."""
    lines = path.read_text().splitlines() if path.exists() else []
    kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in kept))
