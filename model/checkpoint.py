"""Training checkpoints and final model files, loadable with ``torch.load(weights_only=True)`` (docs/design.md §9).

A checkpoint holds only tensors and builtins: the model config as a plain dict (``ModelConfig.to_dict``),
model / optimizer / scheduler state dicts, the optimizer step, the data position of every task, and the RNG
states of every rank (numpy ``Generator.bit_generator.state``, ``torch.get_rng_state()``, CUDA RNG states when
present, ``random.getstate()``). No pickled dataclass, no legacy ``np.random.get_state()``.

Loading a checkpoint against another model config raises `CheckpointError` naming the fields that differ.
"""

from __future__ import annotations

import os
import pickle
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.config import ModelConfig

CHECKPOINT_FILE = "checkpoint.pt"
MODEL_FILE = "model.pt"
FORMAT_VERSION = 1
_KIND_TRAINING = "regionflow.training_checkpoint"
_KIND_MODEL = "regionflow.model"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: unreadable, of another format, or of another model config."""


# --------------------------------------------------------------------------------------------------- RNG
def capture_rng(numpy_rng: np.random.Generator) -> dict[str, Any]:
    """This process's RNG states as builtins and tensors: numpy Generator, torch CPU (+ CUDA), Python."""
    state: dict[str, Any] = {
        "numpy": numpy_rng.bit_generator.state,
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["torch_cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> np.random.Generator:
    """Restore torch (+ CUDA) and Python global RNG states; return a numpy Generator in the saved state.

    Raises:
        CheckpointError: the saved numpy bit generator is not one numpy knows.
    """
    torch.set_rng_state(state["torch"])
    if "torch_cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["torch_cuda"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name = state["numpy"]["bit_generator"]
    bit_generator_cls = getattr(np.random, name, None)
    if bit_generator_cls is None:
        raise CheckpointError(f"unknown numpy bit generator {name!r} in checkpoint")
    bit_generator = bit_generator_cls()
    bit_generator.state = state["numpy"]
    return np.random.Generator(bit_generator)


# ------------------------------------------------------------------------------------------- checkpoint
@dataclass
class TrainingState:
    """Everything a resumed run needs to continue exactly like an uninterrupted one.

    Attributes:
        model_config: ``ModelConfig.to_dict()``.
        model: model ``state_dict`` (unwrapped, no DDP ``module.`` prefix).
        optimizer, scheduler: their ``state_dict``s.
        step: optimizer steps done.
        data_position: ``{task: {"epoch": e, "batch": b}}``, the next batch of each task (same on every rank).
        rng: one `capture_rng` dict per rank, indexed by rank.
        run: builtins describing the run (tasks, seed, world size, batch size, ...), checked on resume.
    """

    model_config: dict[str, Any]
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    step: int
    data_position: dict[str, dict[str, int]]
    rng: list[dict[str, Any]]
    run: dict[str, Any] = field(default_factory=dict)


def _atomic_save(obj: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def save_checkpoint(directory: str | Path, state: TrainingState) -> Path:
    """Write ``directory/checkpoint.pt`` (temporary name, then rename); returns its path."""
    path = Path(directory) / CHECKPOINT_FILE
    _atomic_save({"kind": _KIND_TRAINING, "format_version": FORMAT_VERSION, **state.__dict__}, path)
    return path


def _load(path: Path, kind: str) -> dict[str, Any]:
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as exc:  # weights_only refusals included
        raise CheckpointError(f"{path}: cannot load ({exc})") from exc
    if not isinstance(raw, dict) or raw.get("kind") != kind:
        raise CheckpointError(f"{path}: not a regionflow {kind.rsplit('.', 1)[-1]} file")
    if raw.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format version {raw.get('format_version')}, expected {FORMAT_VERSION}"
        )
    return raw


def load_checkpoint(path: str | Path, expected_config: ModelConfig | None = None) -> TrainingState:
    """Read a training checkpoint (``weights_only=True``; a directory means its ``checkpoint.pt``).

    Raises:
        CheckpointError: unreadable, not a regionflow training checkpoint, or saved with a model config other
            than ``expected_config`` (the message lists the differing fields).
    """
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_FILE
    raw = _load(path, _KIND_TRAINING)
    if expected_config is not None:
        check_same_config(raw["model_config"], expected_config, where=str(path))
    names = TrainingState.__dataclass_fields__
    return TrainingState(**{k: raw[k] for k in names})


def check_same_config(saved: dict[str, Any], expected: ModelConfig, where: str) -> None:
    """Raise `CheckpointError` unless ``saved`` describes the same model as ``expected``."""
    try:
        saved_config = ModelConfig.from_dict(saved)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{where}: saved model config is invalid ({exc})") from exc
    a, b = saved_config.to_dict(), expected.to_dict()
    diff = {k: (a[k], b[k]) for k in sorted(a) if a[k] != b[k]}
    if diff:
        shown = ", ".join(f"{k}: saved {s!r} vs expected {e!r}" for k, (s, e) in diff.items())
        raise CheckpointError(f"{where}: checkpoint of another model config ({shown})")


# -------------------------------------------------------------------------------------------- model file
def save_model(
    path: str | Path, model: torch.nn.Module, config: ModelConfig, extra: dict[str, Any] | None = None
) -> Path:
    """Write the final weights and config (``model.pt``); ``extra`` holds builtins (e.g. the answer vocabulary)."""
    path = Path(path)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    payload = {"kind": _KIND_MODEL, "format_version": FORMAT_VERSION, "model_config": config.to_dict()}
    _atomic_save({**payload, "model": state, "extra": extra or {}}, path)
    return path


@dataclass(frozen=True)
class SavedModel:
    """A loaded ``model.pt``: config, state dict and extra builtins."""

    config: ModelConfig
    state_dict: dict[str, torch.Tensor]
    extra: dict[str, Any]


def load_model(path: str | Path, expected_config: ModelConfig | None = None) -> SavedModel:
    """Read ``model.pt`` with ``weights_only=True``.

    Raises:
        CheckpointError: unreadable, not a regionflow model file, or another model config than expected.
    """
    path = Path(path)
    raw = _load(path, _KIND_MODEL)
    if expected_config is not None:
        check_same_config(raw["model_config"], expected_config, where=str(path))
    try:
        config = ModelConfig.from_dict(raw["model_config"])
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: saved model config is invalid ({exc})") from exc
    return SavedModel(config=config, state_dict=raw["model"], extra=raw.get("extra", {}))
