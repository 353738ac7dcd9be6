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


def _text_dir_with_tokenizer(root):
    """A 120-word BERT directory whose WordPiece tokenizer (tokenizer.json) covers the VQA test questions."""
    from tokenizers import BertWordPieceTokenizer

    words = ["what", "color", "is", "the", "thing", "?", "0", "1"]
    vocab = ["[PAD]", *(f"tok{i}" for i in range(1, 100)), "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    vocab += [f"w{i}" for i in range(VOCAB - len(vocab))]
    tdir = text_dir(root)
    (tdir / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertWordPieceTokenizer(str(tdir / "vocab.txt"), lowercase=True).save(str(tdir / "tokenizer.json"))
    return tdir


def test_released_vqa_uses_the_checkpoints_answer_list(tmp_path):
    from tiny_store import VQA_ANSWERS, write_vqa

    tdir = _text_dir_with_tokenizer(tmp_path / "text")
    checkpoint = tmp_path / "multi_task_model.bin"
    write_checkpoint(checkpoint, "vl-tasks", task_tokens=True)
    config = tmp_path / "config.json"
    config.write_text(json.dumps(tiny_config(tdir).to_dict()))
    rows = random_rows(num_images=6, feature_dim=FEAT, seed=3, captions_per_image=1, with_image_ids=True)
    for row in rows:
        row["input_ids"] = [[101, 104, 102]]
    store = write_store(tmp_path / "store", rows, FEAT, num_shards=1)
    questions, annotations = write_vqa(tmp_path / "vqa", [r["image_id"] for r in rows])
    answers = tmp_path / "answers.json"  # the checkpoint's 3129-answer vocabulary, index = logit column
    answers.write_text(json.dumps([*VQA_ANSWERS, *(f"answer {i}" for i in range(3129 - len(VQA_ANSWERS)))]))
    args = ["evaluate", str(checkpoint), str(store), "--model-config-json", str(config), "--threads", "1"]
    vqa = [
        "--vqa-questions",
        str(questions),
        "--vqa-annotations",
        str(annotations),
        "--answers",
        str(answers),
    ]
    out = tmp_path / "report"
    assert main([*args, "--task", "vqa", *vqa, "--out", str(out)]) == ExitCode.OK
    report = json.loads((out / "report.json").read_text())
    assert report["metrics"]["vqa"]["answer_vocab_size"] == 3129
    assert report["metrics"]["vqa"]["model"]["num_questions"] == 12  # every image's 2 questions
    short = tmp_path / "short.json"
    short.write_text(json.dumps(list(VQA_ANSWERS)))
    assert main([*args, "--task", "vqa", *vqa[:4], "--answers", str(short)]) == ExitCode.BAD_INPUT
