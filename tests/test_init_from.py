"""train --init-from without Ray: weights of a finished run's model.pt or of a released checkpoint, heads that are
missing or of another shape left fresh and listed, another encoder refused in one line."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from test_released import text_dir, tiny_config, write_checkpoint

from model.checkpoint import CheckpointError, save_model
from model.config import ModelConfig, preset_config
from model.init_from import init_config, initial_weights
from model.tasks import TaskModel

D = 8


def test_a_run_without_vqa_starts_a_vqa_run(tmp_path):
    source_config = ModelConfig.tiny(feature_dim=D)
    source = TaskModel(source_config)
    run = tmp_path / "run"
    run.mkdir()
    save_model(run / "model.pt", source, source_config)
    new_config = dataclasses.replace(source_config, num_answers=4)
    state, report = initial_weights(str(run), init_config(str(run), new_config))
    assert report.kind == "regionflow" and report.source == str(run / "model.pt")
    assert report.fresh and all(k.startswith("vqa_head.") for k in report.fresh)
    assert report.unused == []
    saved = source.state_dict()
    assert all(torch.equal(state[k], saved[k]) for k in state) and report.loaded == len(state)
    model = TaskModel(new_config)
    result = model.load_state_dict(state, strict=False)
    assert sorted(result.missing_keys) == report.fresh and not result.unexpected_keys


def test_another_answer_vocabulary_reinitialises_only_the_last_vqa_layer(tmp_path):
    config = ModelConfig.tiny(feature_dim=D, num_answers=5)
    save_model(tmp_path / "model.pt", TaskModel(config), config)
    _, report = initial_weights(str(tmp_path / "model.pt"), dataclasses.replace(config, num_answers=3))
    shapes = {k: v.shape for k, v in TaskModel(config).state_dict().items()}
    assert report.fresh == sorted(k for k in shapes if k.startswith("vqa_head.") and 5 in shapes[k])
    assert report.unused == report.fresh  # the old 5-answer tensors


def test_another_encoder_is_refused(tmp_path):
    config = ModelConfig.tiny(feature_dim=D)
    save_model(tmp_path / "model.pt", TaskModel(config), config)
    with pytest.raises(
        CheckpointError, match="its encoder is not this run's model .* pass the --model-config"
    ):
        initial_weights(str(tmp_path / "model.pt"), preset_config("small", D))
    with pytest.raises(CheckpointError, match="no such file or run directory"):
        initial_weights(str(tmp_path / "nothing"), config)


def test_unfinished_run_directory_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match=r"no model.pt in this directory \(did its training finish\?\)"):
        initial_weights(str(tmp_path), ModelConfig.tiny(feature_dim=D))


def test_released_pretraining_checkpoint_with_a_new_vqa_head(tmp_path):
    tdir = text_dir(tmp_path / "text")
    path = tmp_path / "pretrained.bin"
    write_checkpoint(path, "pretraining")
    config = init_config(str(path), tiny_config(tdir, num_answers=6))
    assert config.num_answers == 6 and config.match_outputs == 2
    state, report = initial_weights(str(path), config)
    assert report.kind == "released-pretraining"
    assert any(k.startswith("vqa_head.") for k in report.fresh) and report.loaded == len(state)
    model = TaskModel(config)
    result = model.load_state_dict(state, strict=False)
    assert sorted(result.missing_keys) == report.fresh and not result.unexpected_keys
