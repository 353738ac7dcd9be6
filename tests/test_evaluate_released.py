"""regionflow evaluate on a released vilbert-multi-task checkpoint file (a tiny random 12-in-1 file written under
their key names): every image of the store scored by the checkpoint's matching logit; captions and VQA without
an answer list refused in one line."""

from __future__ import annotations

import json

from test_released import FEAT, VOCAB, text_dir, tiny_config, write_checkpoint
from tiny_store import random_rows, write_store

from pipelines.cli import ExitCode, main


def _store(tmp_path):
    rows = random_rows(num_images=10, feature_dim=FEAT, seed=9, captions_per_image=2)
    for row in rows:  # token ids of the tiny text directory's 120-word vocabulary
        row["input_ids"] = [[101, *[t % (VOCAB - 3) + 3 for t in ids[1:-1]], 102] for ids in row["input_ids"]]
    return write_store(tmp_path / "store", rows, FEAT, num_shards=2)


def test_released_checkpoint_is_evaluated_on_every_image(tmp_path, capsys):
    tdir = text_dir(tmp_path / "text")
    checkpoint = tmp_path / "multi_task_model.bin"
    write_checkpoint(checkpoint, "vl-tasks", task_tokens=True)
    config = tmp_path / "config.json"
    config.write_text(json.dumps(tiny_config(tdir).to_dict()))
    store = _store(tmp_path)
    args = ["evaluate", str(checkpoint), str(store), "--model-config-json", str(config), "--threads", "1"]
    assert main([*args, "--task", "retrieval"]) == ExitCode.OK
    report = json.loads((tmp_path / "multi_task_model.bin-eval" / "eval" / "report.json").read_text())
    assert report["split"]["images"] == 10 and report["split"]["holdout_fraction"] is None
    assert "every image" in report["split"]["hash_rule"]
    assert report["model"] == f"released checkpoint {checkpoint}"
    t2i = report["metrics"]["retrieval"]["text_to_image"]
    assert t2i["num_queries"] == 20 and t2i["num_candidates"] == 10
    capsys.readouterr()
    assert main([*args, "--task", "caption"]) == ExitCode.BAD_INPUT
    assert "the released model has no caption_decoder: drop caption from --task" in capsys.readouterr().err
    assert (
        main([*args, "--task", "vqa", "--vqa-questions", "q", "--vqa-annotations", "a"]) == ExitCode.BAD_INPUT
    )
    assert "needs --answers (its answer list)" in capsys.readouterr().err
