"""Checkpoint round trip under ``torch.load(weights_only=True)``, RNG restoration, config mismatch errors."""

from __future__ import annotations

import pickle
import random
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from model.checkpoint import (
    CheckpointError,
    TrainingState,
    capture_rng,
    load_checkpoint,
    load_model,
    restore_rng,
    save_checkpoint,
    save_model,
)
from model.config import ModelConfig
from model.tasks import TaskModel


@pytest.fixture()
def rng_guard():
    """Restore the global RNG states this test changes."""
    torch_state, py_state = torch.get_rng_state(), random.getstate()
    yield
    torch.set_rng_state(torch_state)
    random.setstate(py_state)


def _state(model: torch.nn.Module, config: ModelConfig, rng: np.random.Generator) -> TrainingState:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + s))
    loss = sum(p.sum() for p in model.parameters())
    loss.backward()
    optimizer.step()
    scheduler.step()
    return TrainingState(
        model_config=config.to_dict(),
        model=model.state_dict(),
        optimizer=optimizer.state_dict(),
        scheduler=scheduler.state_dict(),
        step=1,
        data_position={"retrieval": {"epoch": 0, "batch": 1}},
        rng=[capture_rng(rng), capture_rng(rng)],
        run={"tasks": ["retrieval"], "seed": 3},
    )


def test_round_trip_with_weights_only(tmp_path, rng_guard):
    torch.manual_seed(0)
    config = ModelConfig.tiny(feature_dim=8)
    model = TaskModel(config)
    rng = np.random.default_rng(42)
    rng.random(5)
    state = _state(model, config, rng)
    path = save_checkpoint(tmp_path / "ck", state)
    raw = torch.load(path, weights_only=True)  # the contract: loadable with weights_only
    assert raw["model_config"] == config.to_dict()
    loaded = load_checkpoint(tmp_path / "ck", expected_config=config)
    assert loaded.step == 1 and loaded.data_position == state.data_position and loaded.run["seed"] == 3
    for k, v in state.model.items():
        assert torch.equal(loaded.model[k], v)
    fresh = TaskModel(config)
    fresh.load_state_dict(loaded.model)
    opt = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    opt.load_state_dict(loaded.optimizer)
    assert opt.state_dict()["state"][0]["step"] == state.optimizer["state"][0]["step"]


def test_rng_states_restore_exactly(rng_guard):
    rng = np.random.default_rng(7)
    rng.random(3)
    torch.manual_seed(11)
    random.seed(13)
    saved = capture_rng(rng)
    expected = (rng.random(4), torch.rand(4), [random.random() for _ in range(4)])
    torch.manual_seed(999)
    random.seed(999)
    restored = restore_rng(pickle.loads(pickle.dumps(saved)))  # noqa: S301 (our own bytes, made on the line)
    np.testing.assert_array_equal(restored.random(4), expected[0])
    assert torch.equal(torch.rand(4), expected[1])
    assert [random.random() for _ in range(4)] == expected[2]


def test_another_model_config_is_refused(tmp_path, rng_guard):
    config = ModelConfig.tiny(feature_dim=8)
    state = _state(TaskModel(config), config, np.random.default_rng(0))
    save_checkpoint(tmp_path, state)
    other = ModelConfig.tiny(feature_dim=16, num_answers=3)
    with pytest.raises(
        CheckpointError, match=r"another model config \(feature_dim: saved 8 vs expected 16, num_answers"
    ):
        load_checkpoint(tmp_path, expected_config=other)


def test_model_file_round_trip_and_refusals(tmp_path):
    config = ModelConfig.tiny(feature_dim=8, num_answers=2)
    model = TaskModel(config)
    save_model(tmp_path / "model.pt", model, config, extra={"answers": ["yes", "no"]})
    saved = load_model(tmp_path / "model.pt")
    assert saved.config == config and saved.extra == {"answers": ["yes", "no"]}
    with pytest.raises(CheckpointError, match="another model config"):
        load_model(tmp_path / "model.pt", expected_config=ModelConfig.tiny(feature_dim=8))
    with pytest.raises(CheckpointError, match="not a regionflow training_checkpoint"):
        load_checkpoint(tmp_path / "model.pt")


@dataclass
class _Pickled:
    value: int


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"kind": "regionflow.model", "format_version": 1, "x": _Pickled(1)}, path)
    with pytest.raises(CheckpointError, match="cannot load"):
        load_model(path)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError):
        load_model(tmp_path / "junk.pt")
