"""``regionflow train``: co-attention training on a feature store with Ray Train (docs/design.md §6-7).

Thin: flags -> a validated `model.train_config.TrainConfig` and `model.config.ModelConfig` (no Ray yet) -> the
run's ``run.json`` (`pipelines.train_run`) -> Ray Train's ``TorchTrainer`` (DDP; ``gloo`` on CPU, ``nccl`` on
GPU) running `pipelines.train_worker.train_loop_per_worker` on every rank, with its storage under
``RUN/ray_train``. The training step itself is `model.trainer.Trainer` (no Ray).

Before Ray Train starts, the driver refuses what cannot run: bad flags, a store it cannot read or that is empty,
a run directory on object storage, a local store on a multi-node cluster (without ``--store-shared-fs``), and
more workers than the cluster has CPUs (or GPUs).
"""

from __future__ import annotations

import argparse
import logging
import signal
from pathlib import Path
from typing import Any

from model.config import PRESETS
from model.data import DEFAULT_HOLDOUT_FRACTION
from model.input_errors import RUN_INPUT_ERRORS
from model.train_config import DEFAULT_KEEP_CHECKPOINTS, TrainInputError, check_ranges
from model.vqa import DEFAULT_MIN_ANSWER_COUNT
from pipelines.cli import ExitCode, fail
from pipelines.train_run import (
    FAULT_MARKER,
    LOSSES_FILE,
    MODEL_FILE,
    RAY_TRAIN_DIR,
    RUN_FILE,
    PreparedRun,
    latest_checkpoint_step,
    prepare,
    write_run,
)

log = logging.getLogger(__name__)

__all__ = [
    "FAULT_MARKER",
    "LOSSES_FILE",
    "MODEL_FILE",
    "RAY_TRAIN_DIR",
    "RUN_FILE",
    "add_arguments",
    "run",
]


# ------------------------------------------------------------------------------------------------ CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``regionflow train`` (docs/design.md §9)."""
    from model.tasks import TASKS

    parser.add_argument("store", help="feature store directory")
    parser.add_argument("--task", required=True, help=f"comma-separated, from {','.join(TASKS)}")
    parser.add_argument(
        "--task-weights",
        default="",
        metavar="W,W,...",
        help="steps of each --task per schedule cycle, in --task order (default: 1 each)",
    )
    parser.add_argument("--workers", type=int, default=1, help="Ray Train workers (DDP ranks)")
    parser.add_argument(
        "--out", required=True, help="run directory: a local path (or a filesystem shared by every node)"
    )
    parser.add_argument("--max-steps", type=int, default=0, help="optimizer steps (0: from --epochs)")
    parser.add_argument(
        "--epochs", type=float, default=1.0, help="when --max-steps is 0: passes over the largest task"
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue RUN from its latest checkpoint (with a larger --max-steps: extend a finished run)",
    )
    parser.add_argument("--vqa-questions", default="", help="VQA v2 questions JSON")
    parser.add_argument("--vqa-annotations", default="", help="VQA v2 annotations JSON")
    parser.add_argument(
        "--vqa-min-answer-count",
        type=int,
        default=DEFAULT_MIN_ANSWER_COUNT,
        help="answers given at least this often in training enter the VQA answer vocabulary",
    )
    parser.add_argument(
        "--holdout-fraction",
        type=float,
        default=DEFAULT_HOLDOUT_FRACTION,
        help="share of images held out for evaluate (by sha256 of shard and key)",
    )
    parser.add_argument("--batch-size", type=int, default=16, help="per worker and micro-batch")
    parser.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    parser.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (AdamW)")
    parser.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay")
    parser.add_argument(
        "--warmup-steps", type=int, default=0, help="linear warm-up steps, then linear decay to 0"
    )
    parser.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient-norm clipping")
    parser.add_argument("--seed", type=int, default=0, help="seed of the init, data order and masking")
    parser.add_argument(
        "--model-config",
        choices=tuple(PRESETS),
        default="base",
        help="model preset (model/config.py PRESETS): "
        + "; ".join(f"{name}: {about}" for name, (_, about) in PRESETS.items()),
    )
    parser.add_argument("--text-layers", type=int, default=0, help="BERT layers used (0: the preset's)")
    parser.add_argument(
        "--text-dir",
        default="",
        metavar="DIR",
        help="HF BERT directory of the text stream (vilbert-base: a bert-base-uncased directory); "
        "default: the packaged MiniLM",
    )
    parser.add_argument(
        "--init-from",
        default="",
        metavar="RUN_OR_CHECKPOINT",
        help="start from a finished run (its model.pt), a model.pt, or a released vilbert-multi-task checkpoint; "
        "heads it lacks or of another shape start fresh (listed in run.json init_from)",
    )
    parser.add_argument(
        "--contrastive-weight", type=float, default=0.0, help="trains the --rerank-top first stage"
    )
    parser.add_argument(
        "--hard-negatives",
        action="store_true",
        help="retrieval: draw ITM negatives by contrastive similarity (ALBEF); needs --contrastive-weight",
    )
    parser.add_argument(
        "--checkpoint-every", type=int, default=100, help="steps between checkpoints (and one at the end)"
    )
    parser.add_argument(
        "--keep-checkpoints",
        type=int,
        default=DEFAULT_KEEP_CHECKPOINTS,
        help="checkpoints kept in RUN/ray_train (oldest deleted first); one holds the weights and both AdamW "
        "moments, 12 bytes a parameter: about 83 MB for small, 1.1 GB for base (D=2048, 3129 answers)",
    )
    parser.add_argument(
        "--stop-after-steps", type=int, default=0, help="stop early with a checkpoint (0: no)"
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads per worker (0: default)")
    parser.add_argument(
        "--max-failures", type=int, default=2, help="worker failures recovered from a checkpoint"
    )
    parser.add_argument("--address", default=None, help="Ray cluster address (default: local Ray)")
    parser.add_argument(
        "--store-shared-fs",
        action="store_true",
        help="the local STORE path is a shared filesystem mounted on every node",
    )
    parser.add_argument("--inject-fault", default="", help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    """Run ``regionflow train``; returns `ExitCode` OK, BAD_INPUT or RUN_FAILED."""
    try:
        check_cli_numbers(args)
        prepared = prepare(args)  # validated configs and run.json contents; nothing written, no Ray
        if _finished(prepared):
            return ExitCode.OK
        _connect_ray(args.address)
        check_store_reachable(prepared.config.store, args.store_shared_fs)
        check_resources(prepared.config.workers, prepared.config.use_gpu)
        write_run(prepared, args.resume)
    except TrainInputError as exc:
        return fail("train", exc)
    except RUN_INPUT_ERRORS as exc:
        return fail("train", exc)
    if prepared.resume_step is not None:
        log.info("train: resuming %s from step %d", prepared.config.out, prepared.resume_step)
    return fit(prepared, address=args.address)


def _finished(prepared: PreparedRun) -> bool:
    """True (and says so) for a ``--resume`` of a run whose newest checkpoint is already at ``--max-steps``:
    nothing to train, so Ray is not started (it took ~20 s only to report "done")."""
    step, max_steps = prepared.resume_step, prepared.config.max_steps
    if step is None or step < max_steps or not (Path(prepared.config.out) / MODEL_FILE).is_file():
        return False
    log.info(
        "train: %s is finished (step %d of --max-steps %d): nothing to do, Ray not started",
        prepared.config.out,
        step,
        max_steps,
    )
    return True


# flags that are not `TrainConfig` fields (those are checked by `TrainConfig.__post_init__`)
CLI_INT_MINIMUMS = {"max_steps": 0, "text_layers": 0}
CLI_POSITIVE_FLOATS = ("epochs",)
CLI_NON_NEGATIVE_FLOATS = ("contrastive_weight",)


def check_cli_numbers(args: argparse.Namespace) -> None:
    """Raise `TrainInputError` naming the first CLI-only flag out of range (NaN and infinity included), or a
    run directory on object storage."""
    check_ranges(args, CLI_INT_MINIMUMS, CLI_POSITIVE_FLOATS, CLI_NON_NEGATIVE_FLOATS)
    if args.hard_negatives and args.contrastive_weight <= 0:
        raise TrainInputError(
            "--hard-negatives draws from the contrastive similarity: it needs --contrastive-weight > 0"
        )
    if "://" in args.out:
        raise TrainInputError(
            f"--out {args.out}: a run directory must be a local path or a filesystem mounted on every node "
            "(rank 0 appends RUN/losses.jsonl every step, and evaluate reads RUN as a directory); train to a "
            "local RUN and copy it to object storage afterwards"
        )


# ------------------------------------------------------------------------------------------- driver
def _connect_ray(address: str | None) -> None:
    from pipelines.ray_runtime import start_ray  # imports Ray: only when training starts

    start_ray(address)  # without --address / RAY_ADDRESS: a new local instance, never a stranger's


def check_store_reachable(store: str, shared_fs: bool) -> None:
    """Refuse a local store path on a multi-node Ray cluster (``pipelines.store_access``): every Ray Train rank
    opens the store on its own node, where a path written on the driver's node may not exist.

    Raises:
        TrainInputError: a local path, no ``shared_fs``, and more than one alive node in the cluster.
    """
    from pipelines.store_access import StoreNotReachable
    from pipelines.store_access import check_store_reachable as check

    try:
        check(store, shared_fs, "every training worker opens the store on its own node")
    except StoreNotReachable as exc:
        raise TrainInputError(str(exc)) from None


def check_resources(workers: int, use_gpu: bool) -> None:
    """Refuse more Ray Train workers than the connected cluster can ever place (each takes 1 CPU, and 1 GPU with
    ``use_gpu``): Ray Train would otherwise wait for them forever. Needs Ray connected.

    Raises:
        TrainInputError: naming what is missing (the cluster's totals, not what other jobs use right now).
    """
    import ray

    total = ray.cluster_resources()
    for resource, needed in (("CPU", workers), ("GPU", workers if use_gpu else 0)):
        have = int(total.get(resource, 0))
        if needed > have:
            raise TrainInputError(
                f"--workers {workers} needs {needed} {resource}(s) (one per worker) but the Ray cluster has "
                f"{have}: pass --workers {max(1, have)} or fewer, or add nodes"
            )


def fit(prepared: PreparedRun, address: str | None = None) -> int:
    """Run the Ray Train ``TorchTrainer``; returns `ExitCode` OK or RUN_FAILED."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig, TrainingFailedError
    from ray.train.torch import TorchConfig

    from pipelines.train_worker import train_loop_per_worker

    config = prepared.config
    _connect_ray(address)
    trainer = _interruptible_trainer_class()(
        train_loop_per_worker,
        train_loop_config={
            "train": config.to_dict(),
            "model_config": prepared.model_config.to_dict(),
            "run": prepared.run_info,
        },
        torch_config=TorchConfig(backend="nccl" if config.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=config.workers, use_gpu=config.use_gpu),
        run_config=RunConfig(
            name=RAY_TRAIN_DIR,
            storage_path=config.out,
            failure_config=FailureConfig(max_failures=config.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=config.keep_checkpoints),
        ),
    )
    try:
        result = trainer.fit()
    except TrainingFailedError as exc:  # worker errors (after max_failures restarts) and controller errors
        if trainer.interrupted:
            return interrupted(config.out)
        return fail("train", f"training failed: {exc}", ExitCode.RUN_FAILED)
    except (SystemExit, KeyboardInterrupt, ray.exceptions.RayActorError):
        # Ray's SIGINT handler aborts the controller and calls sys.exit(0) when the abort call sees the
        # controller die; else the run's ray.get sees the dead controller (RayActorError)
        if not trainer.interrupted:
            raise
        return interrupted(config.out)
    if trainer.interrupted:  # the abort came after the last step: fit() returns the aborted run's result
        return interrupted(config.out)
    log.info("train: done; last checkpoint %s", result.checkpoint.path if result.checkpoint else None)
    return ExitCode.OK


def interrupted(out: str) -> int:
    """One line for a Ctrl-C'd run: where it stopped (its newest complete checkpoint) and how to go on;
    returns `ExitCode.INTERRUPTED`."""
    step = latest_checkpoint_step(Path(out))
    where = f"last complete checkpoint at step {step}" if step else "no checkpoint written yet"
    return fail(
        "train",
        f"interrupted (Ctrl-C); {where}; rerun the same command with --resume to continue",
        ExitCode.INTERRUPTED,
    )


def _interruptible_trainer_class() -> type:
    """``TorchTrainer`` that records a Ctrl-C. Ray Train (2.x) installs its own SIGINT handler inside ``fit()``
    (it aborts the controller, then ``fit()`` raises or returns: ray/train/v2/api/data_parallel_trainer.py
    ``_register_sigint_handler``); this wraps that handler so `fit` can tell an abort from a failure."""
    from ray.train.torch import TorchTrainer

    class InterruptibleTrainer(TorchTrainer):
        interrupted = False

        def _register_sigint_handler(self, controller: Any) -> None:
            super()._register_sigint_handler(controller)  # type: ignore[misc]
            ray_handler = signal.getsignal(signal.SIGINT)

            def handler(signum: int, frame: Any) -> None:
                self.interrupted = True
                if callable(ray_handler):
                    ray_handler(signum, frame)

            signal.signal(signal.SIGINT, handler)

    return InterruptibleTrainer
