"""model.trainer without Ray: 2 ``gloo`` ranks spawned by torch.multiprocessing train a tiny model; a run stopped
after 2 steps, saved, and restored into fresh Trainers continues exactly like the uninterrupted run."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from tiny_store import random_rows, write_store

from model.checkpoint import load_checkpoint, save_checkpoint
from model.config import ModelConfig
from model.data import StoreImages
from model.items import training_sources
from model.train_config import TrainConfig, TrainInputError, lr_factor
from model.trainer import Trainer
from workers.store import StoreReader

D = 8
STEPS = 4
WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _trainer(store: str, rank: int, world: int) -> Trainer:
    config = TrainConfig(
        store=store, out="/unused", tasks=("retrieval", "pretrain"), workers=world, max_steps=STEPS,
        batch_size=3, warmup_steps=1, lr=1e-3, seed=7, threads=1,
    )  # fmt: skip
    model_config = ModelConfig.tiny(feature_dim=D)
    images = StoreImages(StoreReader(store))
    sources = training_sources(images, config, model_config, [])
    return Trainer(config, model_config, sources, rank, world, torch.device("cpu"))


def _rank_main(rank: int, world: int, port: int, store: str, out: str, stop_at: int) -> None:
    """Train; with ``stop_at``, save after that step and continue in a fresh Trainer from the checkpoint."""
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        trainer = _trainer(store, rank, world)
        records = []
        trainer.run(
            stop_at or STEPS, on_step=lambda r: records.append(r.to_dict()), on_checkpoint=lambda r: None
        )
        if stop_at:
            state = trainer.state()
            if rank == 0:
                assert state is not None
                save_checkpoint(out, state)
            dist.barrier()
            trainer = _trainer(store, rank, world)  # a fresh process state: new model, new streams
            trainer.load_state(load_checkpoint(out))
            trainer.run(STEPS, on_step=lambda r: records.append(r.to_dict()), on_checkpoint=lambda r: None)
        if rank == 0:
            Path(out, "records.json").write_text(json.dumps(records))
            torch.save(trainer.model.state_dict(), Path(out, "weights.pt"))
    finally:
        dist.destroy_process_group()


def _spawn(store: Path, out: Path, stop_at: int) -> tuple[list[dict], dict[str, torch.Tensor]]:
    out.mkdir()
    mp.start_processes(
        _rank_main,
        args=(WORLD, _free_port(), str(store), str(out), stop_at),
        nprocs=WORLD,
        join=True,
        start_method="spawn",
    )
    records = json.loads((out / "records.json").read_text())
    return records, torch.load(out / "weights.pt", weights_only=True)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("trainer")
    return write_store(root / "store", random_rows(24, D, seed=2, captions_per_image=2), D, num_shards=2)


def test_two_gloo_ranks_resume_exactly(store, tmp_path):
    straight, weights = _spawn(store, tmp_path / "straight", stop_at=0)
    resumed, weights_resumed = _spawn(store, tmp_path / "resumed", stop_at=2)
    assert [r["step"] for r in straight] == [1, 2, 3, 4]
    assert [r["task"] for r in straight] == ["retrieval", "pretrain", "retrieval", "pretrain"]
    assert resumed == straight
    assert all(torch.equal(weights[k], weights_resumed[k]) for k in weights)


def test_schedule_warms_up_then_decays_to_zero():
    assert [lr_factor(s, 2, 6) for s in range(6)] == [1 / 3, 2 / 3, 1.0, 0.75, 0.5, 0.25]
    assert lr_factor(6, 2, 6) == 0.0


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"batch_size": 0}, "--batch-size must be >= 1, got 0"),
        ({"lr": float("nan")}, "--lr must be a finite number > 0"),
        ({"tasks": ("retrieval", "retrieval")}, "--task must list distinct tasks"),
        ({"task_weights": (1, 2, 3)}, "--task-weights must give one integer >= 1 per --task"),
        ({"keep_checkpoints": 0}, "--keep-checkpoints must be >= 1"),
        ({"inject_fault": "x"}, "--inject-fault must be RANK:STEP"),
    ],
)
def test_train_config_validates_on_construction(change, message):
    base = {"store": "s", "out": "o", "tasks": ("retrieval",), "workers": 1, "max_steps": 1}
    with pytest.raises(TrainInputError, match=message.replace("(", r"\(")):
        TrainConfig(**{**base, **change})
    assert np.isfinite(TrainConfig(**base).lr)
