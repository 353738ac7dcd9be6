"""regionflow evaluate: the report, re-ranking, bad input, and (slow) a planted signal learned above chance that
the shuffled-visual control takes back to chance."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from tiny_store import planted_rows, random_rows, write_store, write_vqa

from model.scoring import derangement
from pipelines.cli import ExitCode, main

D = 8
EXIT_BAD_INPUT = ExitCode.BAD_INPUT


def _train(store: Path, out: Path, tasks: str, steps: int, *extra: str) -> None:
    args = [
        "train", str(store), "--task", tasks, "--workers", "2", "--out", str(out), "--max-steps", str(steps),
        "--model-config", "tiny", "--batch-size", "4", "--threads", "1", "--checkpoint-every", "1000", *extra,
    ]  # fmt: skip
    assert main(args) == 0


@pytest.fixture(scope="module")
def trained(tmp_path_factory, ray_session) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("evaluate")
    rows = random_rows(num_images=30, feature_dim=D, seed=4, captions_per_image=2, with_image_ids=True)
    store = write_store(root / "store", rows, D, num_shards=2)
    questions, annotations = write_vqa(root / "vqa", [r["image_id"] for r in rows])
    vqa = [
        "--vqa-questions",
        str(questions),
        "--vqa-annotations",
        str(annotations),
        "--vqa-min-answer-count",
        "1",
    ]
    _train(store, root / "run", "retrieval,vqa,caption", 3, *vqa)
    return {
        "store": store,
        "run": root / "run",
        "questions": questions,
        "annotations": annotations,
        "root": root,
    }


def _evaluate(trained: dict[str, Path], *extra: str, run: Path | None = None) -> int:
    vqa = ["--vqa-questions", str(trained["questions"]), "--vqa-annotations", str(trained["annotations"])]
    args = ["evaluate", str(run or trained["run"]), str(trained["store"]), "--task", "retrieval,vqa,caption"]
    return main([*args, *vqa, "--threads", "1", *extra])


def test_report_covers_every_heldout_row(trained, caplog):
    caplog.set_level(logging.INFO)
    assert _evaluate(trained) == 0
    # the headline figures reach the terminal, not only the report's path
    said = [r.getMessage() for r in caplog.records if r.name == "pipelines.evaluate"]
    assert any(m.startswith("evaluate: text->image R@1 ") and "chance R@1" in m for m in said)
    assert any(m.startswith("evaluate: VQA accuracy ") and "majority-answer baseline" in m for m in said)
    assert any(m.startswith("evaluate: captions BLEU-4 ") for m in said)
    out = trained["run"] / "eval"
    report = json.loads((out / "report.json").read_text())
    run = json.loads((trained["run"] / "run.json").read_text())
    held_images = run["split"]["images"]["heldout"]
    assert report["split"]["images"] == held_images and report["control"] == "none"
    m = report["metrics"]
    # every held-out caption is a query against every held-out image; every image a query
    assert m["retrieval"]["text_to_image"]["num_queries"] == run["split"]["pairs"]["heldout"]
    assert m["retrieval"]["text_to_image"]["num_candidates"] == held_images
    assert m["retrieval"]["image_to_text"]["num_queries"] == held_images
    assert "all" in m["retrieval"]["scoring"]
    assert (
        m["matching"]["chance"] == 0.5 and m["matching"]["num_pairs"] == 2 * run["split"]["pairs"]["heldout"]
    )
    assert m["vqa"]["model"]["num_questions"] == run["split"]["questions"]["heldout"]
    assert set(m["vqa"]["baseline"]["per_question_type"]) <= {"is the", "what color is the"}
    assert m["caption"]["num_images"] == held_images and m["caption"]["tokenizer"] in ("ptb", "simple")
    assert {"retrieval_itm", "matching", "vqa", "caption_generation"} <= set(report["efficiency"])
    assert report["efficiency"]["matching"]["samples_per_s"] > 0
    assert any("driver process" in n for n in report["notes"])
    for name in ("report.md", "training_loss.png", "recall_at_k.png"):
        assert (out / name).stat().st_size > 0
    assert "## Retrieval" in (out / "report.md").read_text()


def test_rerank_covering_every_candidate_equals_full_scoring(trained, tmp_path):
    assert _evaluate(trained, "--out", str(tmp_path / "full")) == 0
    assert _evaluate(trained, "--out", str(tmp_path / "rerank"), "--rerank-top", "1000") == 0
    full = json.loads((tmp_path / "full" / "report.json").read_text())["metrics"]["retrieval"]
    rerank = json.loads((tmp_path / "rerank" / "report.json").read_text())["metrics"]["retrieval"]
    assert rerank["scoring"].startswith("re-ranked")
    for direction in ("text_to_image", "image_to_text"):
        assert rerank[direction]["recall"] == full[direction]["recall"]
        assert rerank[direction]["median_rank"] == full[direction]["median_rank"]
    assert _evaluate(trained, "--out", str(tmp_path / "top2"), "--rerank-top", "2") == 0
    top2 = json.loads((tmp_path / "top2" / "report.json").read_text())
    assert "top 2 images per caption" in top2["metrics"]["retrieval"]["scoring"]
    assert any("top 2 candidates" in n for n in top2["notes"])


def test_bad_input_is_refused(trained, tmp_path, capsys):
    from model.checkpoint import save_model
    from model.config import ModelConfig
    from model.tasks import TaskModel

    # a store of another schema version
    other = tmp_path / "other"
    shutil.copytree(trained["store"], other)
    manifest = json.loads((other / "manifest.json").read_text())
    (other / "manifest.json").write_text(json.dumps({**manifest, "schema_version": 2}))
    assert main(["evaluate", str(trained["run"]), str(other), "--task", "retrieval"]) == EXIT_BAD_INPUT
    assert "schema version 2" in capsys.readouterr().err
    # a model file of another config than the run's
    run = tmp_path / "run"
    shutil.copytree(trained["run"], run, ignore=shutil.ignore_patterns("ray_train"))
    config = ModelConfig.tiny(feature_dim=D, num_answers=5, visual_hidden=12)
    save_model(run / "model.pt", TaskModel(config), config)
    assert _evaluate(trained, run=run) == EXIT_BAD_INPUT
    assert "another model config (visual_hidden: saved 12 vs expected 24)" in capsys.readouterr().err
    # VQA questions naming images absent from the store
    questions, annotations = write_vqa(tmp_path / "vqa", [1000, 424242])
    args = ["evaluate", str(trained["run"]), str(trained["store"]), "--task", "vqa"]
    assert (
        main([*args, "--vqa-questions", str(questions), "--vqa-annotations", str(annotations)])
        == EXIT_BAD_INPUT
    )
    assert (
        "1 image id(s) named by the VQA questions are absent from the store: 424242"
        in capsys.readouterr().err
    )
    # an empty held-out split
    info = json.loads((trained["run"] / "run.json").read_text())
    info["split"]["holdout_fraction"] = 0.0
    (run / "run.json").write_text(json.dumps(info))
    shutil.copy(trained["run"] / "model.pt", run / "model.pt")
    assert main(["evaluate", str(run), str(trained["store"]), "--task", "retrieval"]) == EXIT_BAD_INPUT
    assert "held-out split is empty" in capsys.readouterr().err


def test_derangement_has_no_fixed_point():
    rng = np.random.default_rng(0)
    for n in (2, 3, 10, 57):
        perm = derangement(n, rng)
        assert sorted(perm.tolist()) == list(range(n)) and not (perm == np.arange(n)).any()


@pytest.mark.slow
def test_planted_signal_is_learned_and_the_control_is_at_chance(tmp_path, ray_session):
    d = 16
    store = write_store(
        tmp_path / "store", planted_rows(num_images=120, feature_dim=d, seed=0), d, num_shards=2
    )
    run = tmp_path / "run"
    _train(
        store, run, "retrieval", 300, "--lr", "3e-3", "--warmup-steps", "20", "--contrastive-weight", "1.0"
    )
    base = ["evaluate", str(run), str(store), "--task", "retrieval", "--threads", "1"]
    assert main(base) == 0
    assert main([*base, "--shuffle-visual"]) == 0
    assert main([*base, "--shuffle-features"]) == 0
    real = json.loads((run / "eval" / "report.json").read_text())["metrics"]
    control = json.loads((run / "eval-shuffle-visual" / "report.json").read_text())["metrics"]
    features_only = json.loads((run / "eval-shuffle-features" / "report.json").read_text())["metrics"]
    t2i, chance_r1 = (
        real["retrieval"]["text_to_image"],
        real["retrieval"]["text_to_image"]["chance_recall"]["1"],
    )
    assert real["matching"]["accuracy"] > 0.7, real["matching"]
    assert t2i["recall"]["1"] > 3 * chance_r1, t2i
    assert 0.3 < control["matching"]["accuracy"] < 0.65, control["matching"]
    assert control["retrieval"]["text_to_image"]["recall"]["1"] < 2 * chance_r1 + 0.05, control["retrieval"]
    assert 0.3 < features_only["matching"]["accuracy"] < 0.65, features_only[
        "matching"
    ]  # the signal is in features


@pytest.mark.parametrize(
    ("flag", "value"),
    [("--batch-size", "0"), ("--beam-size", "0"), ("--rerank-top", "-1"), ("--threads", "-2")],
)
def test_numbers_out_of_range_are_refused(tmp_path, capsys, flag, value):
    store = write_store(tmp_path / "store", random_rows(4, 8), 8, num_shards=1)
    argv = ["evaluate", str(tmp_path / "run"), str(store), "--task", "retrieval", flag, value]
    assert main(argv) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert f"regionflow evaluate: error: {flag} must be >= " in err and "Traceback" not in err


def test_another_store_than_the_training_one_is_said_on_the_terminal(trained, tmp_path, caplog):
    run = tmp_path / "run"
    shutil.copytree(trained["run"], run, ignore=shutil.ignore_patterns("ray_train"))
    info = json.loads((run / "run.json").read_text())
    info["store"]["manifest_digest"] = "0" * 64  # as if trained on another store
    (run / "run.json").write_text(json.dumps(info))
    with caplog.at_level(logging.WARNING):
        assert (
            main(["evaluate", str(run), str(trained["store"]), "--task", "retrieval", "--threads", "1"]) == 0
        )
    assert "differs from the training store's 000000000000" in caplog.text
    assert "WARNING: the store's manifest digest" in (run / "eval" / "report.md").read_text()
