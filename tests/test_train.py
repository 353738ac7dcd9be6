"""regionflow train on a real Ray runtime: 2 workers on a tiny store, all four tasks round-robin, exact resume,
a killed worker restarted by FailureConfig, and bad input refused before Ray starts."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tiny_store import random_rows, write_store, write_vqa

from model.train_config import task_schedule
from pipelines.cli import ExitCode, main
from pipelines.train import (
    FAULT_MARKER,
    LOSSES_FILE,
    MODEL_FILE,
    RAY_TRAIN_DIR,
    RUN_FILE,
)
from pipelines.train_run import latest_checkpoint_step

D = 8
EXIT_BAD_INPUT = ExitCode.BAD_INPUT
TASKS = "retrieval,pretrain,vqa,caption"
MAX_STEPS = 8


@pytest.fixture(scope="module")
def tiny_inputs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("train_inputs")
    rows = random_rows(num_images=40, feature_dim=D, seed=11, captions_per_image=2, with_image_ids=True)
    store = write_store(root / "store", rows, D, num_shards=2)
    questions, annotations = write_vqa(root / "vqa", [r["image_id"] for r in rows])
    return {"store": store, "questions": questions, "annotations": annotations}


def _train_args(inputs: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return [
        "train", str(inputs["store"]), "--task", TASKS, "--workers", "2", "--out", str(out),
        "--max-steps", str(MAX_STEPS), "--model-config", "tiny", "--batch-size", "4", "--checkpoint-every", "2",
        "--threads", "1", "--warmup-steps", "2", "--lr", "1e-3", "--seed", "5",
        "--vqa-questions", str(inputs["questions"]), "--vqa-annotations", str(inputs["annotations"]),
        "--vqa-min-answer-count", "1", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def uninterrupted(tiny_inputs, tmp_path_factory, ray_session) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    assert main(_train_args(tiny_inputs, out)) == 0
    return out


def _losses(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / LOSSES_FILE).read_text().splitlines()]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / MODEL_FILE, weights_only=True)["model"]


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def test_two_workers_all_tasks_round_robin(uninterrupted, tiny_inputs):
    run = json.loads((uninterrupted / RUN_FILE).read_text())
    assert run["tasks"] == TASKS.split(",")
    assert run["model_config"]["feature_dim"] == D and run["model_config"]["num_answers"] == 5
    assert sorted(run["vqa"]["answer_vocab"]) == ["2", "blue", "no", "red", "yes"]
    split = run["split"]
    assert split["holdout_fraction"] == 0.2 and "sha256" in split["hash_rule"]
    assert split["images"]["train"] + split["images"]["heldout"] == 40
    assert split["pairs"]["train"] == 2 * split["images"]["train"]
    assert split["questions"]["train"] == 2 * split["images"]["train"]
    assert len(run["store"]["manifest_digest"]) == 64
    losses = _losses(uninterrupted)
    assert [r["step"] for r in losses] == list(range(1, MAX_STEPS + 1))
    assert [r["task"] for r in losses] == TASKS.split(",") * (MAX_STEPS // 4)
    assert all(r["loss"] > 0 for r in losses)
    assert set(losses[2]["parts"]) == {"vqa"} and set(losses[1]["parts"]) == {"mlm", "mrm", "itm"}
    saved = torch.load(uninterrupted / MODEL_FILE, weights_only=True)
    assert saved["model_config"] == run["model_config"]
    checkpoints = sorted(p.name for p in (uninterrupted / RAY_TRAIN_DIR).glob("checkpoint_*") if p.is_dir())
    assert checkpoints[-1] == f"checkpoint_{MAX_STEPS:08d}"
    throughput = json.loads((uninterrupted / "throughput.json").read_text())
    assert throughput["workers"] == 2 and throughput["steps"] == MAX_STEPS


def _with_max_steps(args: list[str], steps: int) -> list[str]:
    args = list(args)
    args[args.index("--max-steps") + 1] = str(steps)
    return args


def test_resume_equals_an_uninterrupted_run(
    uninterrupted, tiny_inputs, tmp_path, ray_session, caplog, capsys
):
    caplog.set_level(logging.INFO)
    out = tmp_path / "run"
    assert main(_train_args(tiny_inputs, out, "--stop-after-steps", str(MAX_STEPS // 2))) == 0
    assert len(_losses(out)) == MAX_STEPS // 2 and not (out / MODEL_FILE).exists()
    assert main(_train_args(tiny_inputs, out, "--resume", "--keep-checkpoints", "1")) == 0
    assert f"train: resuming {out} from step {MAX_STEPS // 2}" in caplog.text
    assert _losses(out) == _losses(uninterrupted)
    _assert_same_weights(out, uninterrupted)
    kept = sorted(p.name for p in (out / RAY_TRAIN_DIR).glob("checkpoint_*") if p.is_dir())
    assert kept == [f"checkpoint_{MAX_STEPS:08d}"]  # --keep-checkpoints 1
    # extending the finished run: the schedule is recomputed (the learning rate was 0 at step 8) and recorded
    assert main(_with_max_steps(_train_args(tiny_inputs, out, "--resume"), MAX_STEPS + 2)) == 0
    losses = _losses(out)
    assert [r["step"] for r in losses] == list(range(1, MAX_STEPS + 3)) and losses[MAX_STEPS]["lr"] > 0
    run = json.loads((out / RUN_FILE).read_text())
    assert run["extensions"] == [
        {"at_step": MAX_STEPS, "max_steps": {"from": MAX_STEPS, "to": MAX_STEPS + 2}}
    ]
    assert run["train"]["max_steps"] == MAX_STEPS + 2
    # resuming the finished run with the same --max-steps: decided before Ray (trial 2 item 10)
    assert main(_with_max_steps(_train_args(tiny_inputs, out, "--resume"), MAX_STEPS + 2)) == 0
    assert f"train: {out} is finished (step {MAX_STEPS + 2} of --max-steps {MAX_STEPS + 2})" in caplog.text
    assert "Ray not started" in caplog.text and _losses(out) == losses
    # a run cannot be shortened: the refusal says what to run instead
    capsys.readouterr()
    assert main(_with_max_steps(_train_args(tiny_inputs, out, "--resume"), 4)) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "a run cannot be shortened" in err and f"--init-from {out} --out NEW_RUN" in err


def test_more_workers_than_cpus_is_refused_before_training(tiny_inputs, tmp_path, ray_session, capsys):
    from conftest import RAY_TEST_CPUS

    out = tmp_path / "run"
    args = _train_args(tiny_inputs, out)
    args[args.index("--workers") + 1] = str(RAY_TEST_CPUS + 1)
    assert main(args) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert f"--workers {RAY_TEST_CPUS + 1} needs {RAY_TEST_CPUS + 1} CPU(s)" in err
    assert f"the Ray cluster has {RAY_TEST_CPUS}" in err and not out.exists()


def test_run_directory_on_object_storage_is_refused_before_anything(
    tiny_inputs, tmp_path, capsys, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    args = _train_args(tiny_inputs, tmp_path / "unused")
    args[args.index("--out") + 1] = "s3://bucket/runs/r1"
    assert main(args) == EXIT_BAD_INPUT
    assert "--out s3://bucket/runs/r1: a run directory must be a local path" in capsys.readouterr().err
    assert not (tmp_path / "s3:").exists()


def test_killed_worker_is_restarted_from_the_last_checkpoint(
    uninterrupted, tiny_inputs, tmp_path, ray_session
):
    out = tmp_path / "run"
    # rank 1 calls os._exit(1) before step 3 (the checkpoint of step 2 exists); FailureConfig restarts the group
    assert main(_train_args(tiny_inputs, out, "--inject-fault", "1:3", "--max-failures", "1")) == 0
    assert (out / FAULT_MARKER).exists()
    assert _losses(out) == _losses(uninterrupted)
    _assert_same_weights(out, uninterrupted)


def test_task_schedule_lists_each_task_as_often_as_its_weight():
    assert task_schedule(("a", "b", "c"), (1, 3, 2)) == ("a", "b", "c", "b", "c", "b")
    assert task_schedule(("a", "b"), ()) == ("a", "b")


def test_weighted_schedule_with_hard_negatives(tiny_inputs, tmp_path, ray_session):
    out = tmp_path / "run"
    args = _train_args(
        tiny_inputs, out, "--task-weights", "1,1,3,1", "--contrastive-weight", "1", "--hard-negatives"
    )
    args[args.index("--max-steps") + 1] = "6"
    assert main(args) == 0
    losses = _losses(out)
    assert [r["task"] for r in losses] == ["retrieval", "pretrain", "vqa", "caption", "vqa", "vqa"]
    assert set(losses[0]["parts"]) == {"itc", "itm"}
    run = json.loads((out / RUN_FILE).read_text())
    assert run["task_weights"] == [1, 1, 3, 1] and run["model_config"]["itm_hard_negatives"] is True


def test_bad_input_is_refused(tiny_inputs, tmp_path, uninterrupted, capsys):
    other = tmp_path / "other_version"
    write_store(other, random_rows(4, D), D, num_shards=1)
    manifest = json.loads((other / "manifest.json").read_text())
    (other / "manifest.json").write_text(json.dumps({**manifest, "schema_version": 99}))
    args = _train_args(tiny_inputs, tmp_path / "r1")
    args[1] = str(other)
    assert main(args) == EXIT_BAD_INPUT
    assert "schema version 99" in capsys.readouterr().err
    # an existing run without --resume, and --resume without a run
    assert main(_train_args(tiny_inputs, uninterrupted)) == EXIT_BAD_INPUT
    assert main(_train_args(tiny_inputs, tmp_path / "nothing", "--resume")) == EXIT_BAD_INPUT
    # a resume with other arguments
    assert main([*_train_args(tiny_inputs, uninterrupted, "--resume"), "--batch-size", "2"]) == EXIT_BAD_INPUT
    assert "train.batch_size" in capsys.readouterr().err
    # VQA questions naming images the store lacks
    qpath, apath = write_vqa(tmp_path / "vqa", [1000, 1001, 777, 778])
    args = _train_args(tiny_inputs, tmp_path / "r2")
    args[args.index("--vqa-questions") + 1], args[args.index("--vqa-annotations") + 1] = (
        str(qpath),
        str(apath),
    )
    assert main(args) == EXIT_BAD_INPUT
    assert (
        "2 image id(s) named by the VQA questions are absent from the store: 777, 778"
        in capsys.readouterr().err
    )
    # task weights not one per task, or below 1
    for weights in ("1,2", "1,0,1,1", "1,a,1,1"):
        assert main([*_train_args(tiny_inputs, tmp_path / "r4"), "--task-weights", weights]) == EXIT_BAD_INPUT
        assert "--task-weights must give one integer >= 1 per --task" in capsys.readouterr().err
    # an empty training split
    args = _train_args(tiny_inputs, tmp_path / "r3")
    assert main([*args, "--holdout-fraction", "0.999999"]) == EXIT_BAD_INPUT
    assert "training split is empty" in capsys.readouterr().err


@pytest.mark.cluster
def test_local_store_refused_on_a_multi_node_cluster(tiny_inputs, tmp_path, capsys, ray_cluster):
    """A 2-node ``Cluster``: a local store path is refused (exit 1, before any run file is written) unless
    ``--store-shared-fs``; an ``s3://`` store passes. No training starts. The session runtime is restored."""
    from pipelines.train import check_store_reachable

    cluster = ray_cluster(1)
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    out = tmp_path / "run"
    assert main([*_train_args(tiny_inputs, out), "--address", cluster.address]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert f"store {tiny_inputs['store']} is a local path" in err
    assert "has 2 alive nodes" in err
    assert "s3://" in err and "mounted at the same path on every node" in err
    assert not out.exists()
    check_store_reachable(str(tiny_inputs["store"]), shared_fs=True)
    check_store_reachable("s3://bucket/store", shared_fs=False)


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--max-steps", "-1", "--max-steps must be >= 0, got -1"),
        ("--stop-after-steps", "-3", "--stop-after-steps must be >= 0"),
        ("--checkpoint-every", "0", "--checkpoint-every must be >= 1"),
        ("--warmup-steps", "-1", "--warmup-steps must be >= 0"),
        ("--epochs", "0", "--epochs must be a finite number > 0"),
        ("--lr", "-1e-3", "--lr must be a finite number > 0"),
        ("--lr", "nan", "--lr must be a finite number > 0"),
        ("--weight-decay", "-0.1", "--weight-decay must be a finite number >= 0"),
        ("--holdout-fraction", "1.5", "--holdout-fraction: holdout_fraction must be in [0, 1), got 1.5"),
        ("--contrastive-weight", "0", "--hard-negatives draws from the contrastive similarity"),
    ],
)
def test_numbers_out_of_range_are_refused_before_a_run_is_written(
    tiny_inputs, tmp_path, ray_session, capsys, flag, value, message
):
    out = tmp_path / "run"
    extra = ["--hard-negatives"] if flag == "--contrastive-weight" else []
    assert main([*_train_args(tiny_inputs, out), f"{flag}={value}", *extra]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("regionflow train: error: ") and message in errors[0]
    assert "Traceback" not in err
    assert not out.exists()


def test_uncommitted_shards_are_ignored_with_one_warning(tmp_path, ray_session, caplog, capsys):
    store = write_store(tmp_path / "store", random_rows(12, D, seed=3), D, num_shards=3)
    (store / "parts" / "shard-001.done.json").unlink()  # a part written, never committed
    out = tmp_path / "run"
    args = ["train", str(store), "--task", "retrieval", "--out", str(out), "--model-config", "tiny"]
    # the split left for training is empty: refused after the store is opened, before Ray Train starts
    assert main([*args, "--holdout-fraction", "0.999999"]) == EXIT_BAD_INPUT
    warnings = [
        r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "uncommitted" in r.message
    ]
    assert len(warnings) == 1
    assert "ignoring 1 uncommitted shard(s)" in warnings[0] and warnings[0].endswith(": shard-001")
    assert "8 images" in capsys.readouterr().err  # the 4 images of shard-001 are not read


def test_init_from_a_finished_run_with_another_answer_vocabulary(
    uninterrupted, tiny_inputs, tmp_path, ray_session, caplog
):
    caplog.set_level(logging.INFO)
    annotations = json.loads(tiny_inputs["annotations"].read_text())
    for item in annotations["annotations"]:  # "red" merged into "blue": a 4-answer vocabulary
        item["multiple_choice_answer"] = item["multiple_choice_answer"].replace("red", "blue")
        for answer in item["answers"]:
            answer["answer"] = answer["answer"].replace("red", "blue")
    other = tmp_path / "annotations.json"
    other.write_text(json.dumps(annotations))
    out = tmp_path / "run"
    args = _with_max_steps(_train_args(tiny_inputs, out, "--init-from", str(uninterrupted)), 2)
    args[args.index("--vqa-annotations") + 1] = str(other)
    assert main(args) == 0
    run = json.loads((out / RUN_FILE).read_text())
    init = run["init_from"]
    assert init["kind"] == "regionflow" and init["source"] == str(uninterrupted / MODEL_FILE)
    assert run["model_config"]["num_answers"] == 4 and init["loaded"] > 0
    assert init["fresh"] and all(k.startswith("vqa_head.") for k in init["fresh"])
    assert len(_losses(out)) == 2
    # the terminal says what was loaded (trial 2 item 10: only run.json did)
    line = f"train: --init-from {uninterrupted}: {init['loaded']} tensors loaded, {len(init['fresh'])} fresh (vqa_head)"
    assert line in caplog.text


@pytest.mark.slow
def test_ctrl_c_exits_130_and_says_where_it_stopped(tiny_inputs, tmp_path):
    """Ctrl-C (SIGINT) after the first checkpoint: Ray Train aborts the run; the exit code is 130
    (ExitCode.INTERRUPTED), and one line names the last complete checkpoint and ``--resume`` (trial 2 item 2:
    was rc 1 with only Ray's "Gracefully aborting" line)."""
    out = tmp_path / "run"
    args = _train_args(tiny_inputs, out)
    args[args.index("--max-steps") + 1] = "100000"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own local Ray
    with open(tmp_path / "err", "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", *args], stderr=err, env=env)
    try:
        deadline = time.monotonic() + 300
        while latest_checkpoint_step(out) == 0 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        assert proc.poll() is None, (tmp_path / "err").read_text()[-3000:]
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = (tmp_path / "err").read_text(errors="replace")
    assert code == ExitCode.INTERRUPTED, text[-3000:]
    step = latest_checkpoint_step(out)
    assert step > 0
    line = (
        f"regionflow train: error: interrupted (Ctrl-C); last complete checkpoint at step {step}; "
        "rerun the same command with --resume to continue"
    )
    assert line in text, text[-3000:]
    assert "Traceback" not in text, text[-3000:]


@pytest.mark.parametrize("damage", ["truncated", "missing"])
def test_store_whose_part_size_differs_from_its_marker_is_refused(tmp_path, damage, capsys):
    """train checks each committed part's size against its done marker before Ray starts (no re-hash): a
    truncated or missing part is refused in one line naming the shard (trial 2 item 6: trained silently)."""
    rows = random_rows(num_images=8, feature_dim=D, seed=3, captions_per_image=1, with_image_ids=True)
    store = write_store(tmp_path / "store", rows, D, num_shards=2)
    part = sorted((store / "parts").glob("*.arrow"))[0]
    shard = part.name.split(".")[0]
    part = store / "parts" / f"{shard}.arrow"
    if damage == "missing":
        part.unlink()
    else:
        part.write_bytes(part.read_bytes()[:-1])
    args = [
        "train",
        str(store),
        "--task",
        "pretrain",
        "--out",
        str(tmp_path / "run"),
        "--model-config",
        "tiny",
    ]
    assert main(args) == EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"regionflow train: error: shard {shard} is damaged: {shard}.arrow is "), err
    assert f"regionflow inspect {store} --verify" in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "run").exists()
