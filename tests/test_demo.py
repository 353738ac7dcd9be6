"""The demo runner without running the pipeline: its command lines parse with the real CLI, the corpus
helpers read real shards, and the results table states the targets from a report-shaped summary."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.cli import build_parser
from pipelines.demo_report import caption_duplicates, heldout_keys, results_markdown, target_lines
from pipelines.demo_stages import DEMO_MARKER, DemoConfig, DemoError, DemoPaths, prepare_out, stage_plan
from workers.corpus.synth import write_corpus


def test_every_planned_command_parses_with_the_real_cli(tmp_path: Path) -> None:
    config = DemoConfig(images=10, samples_per_shard=4)
    plan = stage_plan(config, DemoPaths(tmp_path))
    assert [name for name, _ in plan][:3] == ["synth", "extract", "train"]
    for _, argv in plan:
        args = build_parser(argv[0]).parse_args(argv)  # exits (SystemExit) on an unknown flag
        assert args.command == argv[0]
    extract = dict(plan)["extract"]
    assert sum(a.endswith(".tar") for a in extract) == 3  # ceil(10 / 4) shards
    train = build_parser("train").parse_args(dict(plan)["train"])
    assert train.workers == 2 and train.task == "pretrain,retrieval,vqa,caption"
    assert train.task_weights == "1,4,6,1" and train.hard_negatives
    extract_args = build_parser("extract").parse_args(extract)
    assert extract_args.boxes == "given"
    fixed = dict(
        stage_plan(
            DemoConfig(images=10, samples_per_shard=4, boxes="fixed", num_boxes=7), DemoPaths(tmp_path)
        )
    )
    fixed_args = build_parser("extract").parse_args(fixed["extract"])
    assert (fixed_args.boxes, fixed_args.num_boxes) == ("fixed", 7)
    controls = [argv for name, argv in plan if name.startswith("evaluate-shuffle")]
    assert {"--shuffle-visual", "--shuffle-features"} == {
        a for argv in controls for a in argv if "shuffle" in a
    }


def test_out_folder_is_refused_unless_empty_or_a_previous_demo(tmp_path: Path) -> None:
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("x")
    with pytest.raises(DemoError):
        prepare_out(foreign)
    assert (foreign / "keep.txt").exists()
    previous = tmp_path / "previous"
    paths = prepare_out(previous)
    (paths.corpus).mkdir()
    (paths.corpus / "old.tar").write_text("old")
    prepare_out(previous)
    assert (previous / DEMO_MARKER).exists() and not (paths.corpus / "old.tar").exists()


def test_heldout_keys_and_duplicate_shares_come_from_the_shards(tmp_path: Path) -> None:
    write_corpus(tmp_path, 30, 10, seed=2)
    keys = heldout_keys(tmp_path, 0.5, 100)
    assert 0 < len(keys) < 30 and all(shard.startswith("synth-") for shard, _ in keys)
    shares = caption_duplicates(tmp_path, 0.5)
    assert shares["heldout_count"] == len(keys)
    assert 0.0 <= shares["heldout_images"] <= 1.0 and 0.0 <= shares["all_images"] <= 1.0


def _summary(r1: float, vqa: float, wall: float) -> dict:
    direction = {
        "recall": {"1": r1, "5": 0.9, "10": 0.95},
        "chance_recall": {"1": 0.01, "5": 0.05, "10": 0.1},
        "num_candidates": 120,
        "num_queries": 600,
        "median_rank": 1.0,
    }
    entry = {
        "retrieval": {"text_to_image": direction, "image_to_text": direction, "scoring": "re-ranked"},
        "vqa": {
            "accuracy": vqa,
            "num_questions": 500,
            "per_question_type": {"how many": vqa},
            "majority_baseline": 0.4,
            "baseline_kind": "most frequent training answer of the question type",
            "baseline_per_question_type": {"how many": 0.4},
        },
    }
    results = {
        "none": {**entry, "caption": {"bleu4": 0.3, "cider": 1.2, "num_images": 120, "decoding": "greedy"}}
    }
    results |= {"shuffle_visual": entry, "shuffle_features": entry}
    return {
        "config": {**DemoConfig().__dict__, "tasks": list(DemoConfig().tasks)},
        "heldout_images": 120,
        "results": results,
        "duplicate_captions": {"all_images": 0.06, "heldout_images": 0.01, "heldout_count": 120.0},
        "stages": [{"name": "synth", "seconds": 1.0}],
        "wall_time_s": wall,
        "targets": target_lines(results, wall),
        "reports": ["r.md"],
        "pictures": ["p.png"],
    }


def test_targets_say_met_or_missed() -> None:
    met = _summary(0.85, 0.93, 600.0)["targets"]
    assert all(line.endswith("met") for line in met) and len(met) == 3
    missed = _summary(0.5, 0.6, 1000.0)["targets"]
    assert all(line.endswith("MISSED") for line in missed)
    assert "120 candidate images" in missed[0]


def test_results_table_has_the_metrics_and_the_controls() -> None:
    text = results_markdown(_summary(0.85, 0.93, 600.0))
    for needle in ("R@1", "85.0%", "120", "chance", "93.0%", "40.0%", "BLEU-4 0.300", "CIDEr 1.200",
                   "shuffled visual rows", "shuffled features", "6.0%", "Targets"):  # fmt: skip
        assert needle in text, needle
