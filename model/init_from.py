"""Initial weights of a new run (``train --init-from``): a finished regionflow run, its ``model.pt``, or a
released vilbert-multi-task checkpoint (`model.released`).

Every tensor of the new model whose name and shape the source has is loaded; the others (a head the source lacks,
or a head of another shape, e.g. a VQA answer vocabulary of another size) keep their fresh initialisation and are
listed in the report (``run.json`` ``init_from``). Only heads may be fresh: a source whose two-stream encoder
differs from the new model's (another preset, another feature size) is refused, naming the first differences.
Loaded with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from model.checkpoint import MODEL_FILE, CheckpointError, load_model
from model.config import ModelConfig

HEAD_PREFIXES = ("mlm_head.", "region_head.", "match_head.", "vqa_head.", "caption_decoder.")
KEYS_SHOWN = 5


@dataclass(frozen=True)
class InitReport:
    """What ``--init-from`` loaded.

    Attributes:
        source: the file read.
        kind: "regionflow" (a run's model.pt), "released-pretraining" or "released-vl-tasks".
        loaded: number of tensors taken from the source.
        fresh: the new model's tensors freshly initialised (absent from the source, or of another shape).
        unused: the source's tensors the new model has no use for.
    """

    source: str
    kind: str
    loaded: int
    fresh: list[str]
    unused: list[str]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def source_file(source: str) -> Path:
    """The file ``source`` names: a run directory means its ``model.pt``.

    Raises:
        CheckpointError: nothing there, or a run directory whose training did not finish.
    """
    path = Path(source)
    if path.is_dir():
        if not (path / MODEL_FILE).is_file():
            raise CheckpointError(
                f"--init-from {source}: no {MODEL_FILE} in this directory (did its training finish?)"
            )
        return path / MODEL_FILE
    if not path.is_file():
        raise CheckpointError(f"--init-from {source}: no such file or run directory")
    return path


def _is_regionflow(path: Path) -> bool:
    try:
        load_model(path)
    except CheckpointError as exc:
        if "not a regionflow" in str(exc):
            return False
        raise
    return True


def _shapes(config: ModelConfig) -> dict[str, torch.Size]:
    """Tensor shapes of ``TaskModel(config)``, built on the meta device without reading text weights."""
    from model.tasks import TaskModel

    if config.text_init == "pretrained":  # same shapes from the checkpoint's config.json
        config = dataclasses.replace(
            config, text_init="random", text_hidden=0, text_heads=0, text_intermediate=0
        )
    with torch.device("meta"):
        return {k: v.shape for k, v in TaskModel(config).state_dict().items()}


def init_config(source: str, config: ModelConfig) -> ModelConfig:
    """The new run's model config: ``config``, with what a released checkpoint decides (task tokens, matching
    head; `model.released.released_config`) but this run's own answer-vocabulary size."""
    path = source_file(source)
    if _is_regionflow(path):
        return config
    from model.released import released_config

    return dataclasses.replace(released_config(path, config), num_answers=config.num_answers)


def initial_weights(source: str, config: ModelConfig) -> tuple[dict[str, torch.Tensor], InitReport]:
    """The state dict to load (non-strictly) into ``TaskModel(config)`` before training, and its report.

    Args:
        source: a run directory, a ``model.pt``, or a released checkpoint file.
        config: the new run's model config (`init_config` of it for a released file).

    Raises:
        CheckpointError: unreadable source, or an encoder that differs from ``config``'s.
        model.released.ReleasedCheckpointError: a released file that does not fit ``config`` (one line).
    """
    path = source_file(source)
    if not _is_regionflow(path):
        from model.released import load_released_checkpoint

        state, report = load_released_checkpoint(path, config, heads_may_differ=True)
        fresh = sorted([*report.not_in_checkpoint, *report.reshaped])
        kind = f"released-{report.kind}"
        return state, InitReport(str(path), kind, len(state), fresh, sorted(report.unused))
    saved = load_model(path).state_dict
    shapes = _shapes(config)
    state = {k: v for k, v in saved.items() if k in shapes and tuple(v.shape) == tuple(shapes[k])}
    fresh = sorted(k for k in shapes if k not in state)
    encoder = [k for k in fresh if not k.startswith(HEAD_PREFIXES)]
    if encoder:
        shown = ", ".join(
            f"{k} ({tuple(saved[k].shape) if k in saved else 'absent'} vs {tuple(shapes[k])})"
            for k in encoder[:KEYS_SHOWN]
        )
        raise CheckpointError(
            f"--init-from {path}: its encoder is not this run's model ({len(encoder)} tensors differ, e.g. "
            f"{shown}): pass the --model-config it was trained with"
        )
    unused = sorted(k for k in saved if k not in state)
    return state, InitReport(str(path), "regionflow", len(state), fresh, unused)
