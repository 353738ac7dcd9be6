"""CLI usability found by a new-user trial: output paths of ``visualize`` / ``export`` (missing folder, wrong
extension, no silent overwrite), local shard files checked before Ray starts, ``--max-tokens`` checked at
parsing, help text on every flag, and the run-summary warning when every sample is an error row."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import cv2
import numpy as np
import pytest
from tarfactory import make_jpeg, simple_sample
from tiny_store import write_test_store

from pipelines import cli
from pipelines.extract import ExtractSummary, missing_local_shards
from workers.corpus.tar_writer import write_tar

FEATURE_DIM = 4
WIDTH, HEIGHT = 40, 30
BOX = [2.0, 3.0, 20.0, 25.0]


def _row(key: str) -> dict:
    return {
        "key": key,
        "image_width_px": WIDTH,
        "image_height_px": HEIGHT,
        "num_boxes": 1,
        "boxes_xyxy_px": [BOX],
        "features": [[0.5] * FEATURE_DIM],
        "object_ids": [3],
        "object_conf": [0.9],
        "captions": ["a caption"],
        "input_ids": [[101, 1037, 102]],
        "captions_truncated": [False],
    }


@pytest.fixture()
def store(tmp_path: Path) -> Path:
    """A committed two-shard store (one row each) and, beside it, the image shard ``s0``."""
    root = tmp_path / "store"
    write_test_store(str(root), {"s0": [_row("k1")], "s1": [_row("k2")]}, FEATURE_DIM)
    image = np.full((HEIGHT, WIDTH, 3), 90, np.uint8)
    ok, png = cv2.imencode(".png", image)
    assert ok
    write_tar(tmp_path / "s0.tar", [("k1.png", png.tobytes()), ("k1.txt", b"a caption")])
    return root


def _visualize(store: Path, out: Path, *extra: str) -> int:
    images = str(store.parent / "s0.tar")
    return cli.main(["visualize", str(store), "k1", "--out", str(out), "--images", images, *extra])


# ---------------------------------------------------------------------------------------- visualize


def _assert_picture(out: Path) -> None:
    """The image, then the random-init band under it (test stores are random init)."""
    picture = cv2.imread(str(out))
    assert picture.shape[1:] == (WIDTH, 3) and picture.shape[0] > HEIGHT


def test_visualize_creates_a_missing_folder_like_export(store: Path, tmp_path: Path) -> None:
    out = tmp_path / "new" / "deeper" / "k1.png"
    assert _visualize(store, out) == 0
    _assert_picture(out)


def test_visualize_refuses_a_wrong_extension(store: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "k1.jpg"
    assert _visualize(store, out) == 1
    assert "extension must be .png" in capsys.readouterr().err and not out.exists()


def test_visualize_does_not_overwrite_without_the_flag(store: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "k1.png"
    out.write_bytes(b"mine")
    assert _visualize(store, out) == 1
    err = capsys.readouterr().err
    assert "already exists" in err and "--overwrite" in err
    assert out.read_bytes() == b"mine"
    assert _visualize(store, out, "--overwrite") == 0
    _assert_picture(out)


# ------------------------------------------------------------------------------------------- export


def test_export_tsv_does_not_overwrite_without_the_flag(store: Path, tmp_path: Path, capsys) -> None:
    tsv = tmp_path / "out.tsv"
    tsv.write_text("mine")
    args = ["export", str(store), "--tsv", str(tsv)]
    assert cli.main(args) == 1
    err = capsys.readouterr().err
    assert str(tsv) in err and "--overwrite" in err
    assert tsv.read_text() == "mine"
    assert cli.main([*args, "--overwrite"]) == 0
    assert len(tsv.read_text().splitlines()) == 2  # one line per row


def test_export_parquet_does_not_overwrite_without_the_flag(store: Path, tmp_path: Path, capsys) -> None:
    folder = tmp_path / "pq"
    args = ["export", str(store), "--parquet", str(folder)]
    assert cli.main(args) == 0
    (folder / "rows" / "s1.parquet").write_bytes(b"mine")
    (folder / "notes.txt").write_text("not ours")
    assert cli.main(args) == 1
    err = capsys.readouterr().err
    assert "rows/s0.parquet" in err and "--overwrite" in err
    assert (folder / "rows" / "s1.parquet").read_bytes() == b"mine"
    assert cli.main([*args, "--overwrite"]) == 0
    assert (folder / "rows" / "s1.parquet").read_bytes()[:4] == b"PAR1"
    assert (folder / "notes.txt").read_text() == "not ours"


# ------------------------------------------------------------------------------------------ extract


def test_missing_local_shards_exit_1_before_ray_starts(tmp_path: Path, monkeypatch, capsys) -> None:
    def no_ray(config: object) -> None:
        raise AssertionError("Ray must not start when shard files are missing")

    monkeypatch.setattr("pipelines.extract_run.connect_ray", no_ray)
    write_tar(tmp_path / "sh-000.tar", simple_sample("a"))
    out = tmp_path / "store"
    pattern = str(tmp_path / "sh-{000..002}.tar")
    code = cli.main(["extract", pattern, "--out", str(out), "--config", "tiny"])
    captured = capsys.readouterr()
    assert code == 1 and captured.out == ""
    assert "regionflow extract: error: 2 shard file(s) do not exist" in captured.err
    assert str(tmp_path / "sh-001.tar") in captured.err and str(tmp_path / "sh-002.tar") in captured.err
    assert str(tmp_path / "sh-000.tar") not in captured.err
    assert not out.exists()


def test_only_local_shards_are_checked(tmp_path: Path) -> None:
    present = tmp_path / "p-000.tar"
    write_tar(present, simple_sample("a"))
    urls = [str(present), f"file://{present}", "s3://bucket/x-000.tar", f"file://{tmp_path}/gone-000.tar"]
    assert missing_local_shards(urls) == [f"file://{tmp_path}/gone-000.tar"]


def test_max_tokens_is_checked_at_parsing_in_cli_terms(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["extract", "x.tar", "--out", str(tmp_path / "s"), "--max-tokens", "2"])
    err = capsys.readouterr().err
    assert exc.value.code == 1  # argparse's usage errors exit BAD_INPUT (1), as every refusal
    assert "--max-tokens" in err and "at least 3" in err and "[CLS]" in err and "max_tokens" not in err
    args = cli.build_parser("extract").parse_args(["extract", "x.tar", "--out", "s", "--max-tokens", "3"])
    assert args.max_tokens == 3


def _subparser(name: str) -> argparse.ArgumentParser:
    parser = cli.build_parser(name)
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices[name]


@pytest.mark.parametrize("name", cli.COMMANDS)
def test_every_flag_has_help(name: str, capsys) -> None:
    """``argparse.SUPPRESS`` counts as help: it hides a deliberate test hook."""
    sub = _subparser(name)
    bare = [a.option_strings or [a.dest] for a in sub._actions if not (a.help or "").strip()]
    with pytest.raises(SystemExit) as exc:
        cli.main([name, "--help"])
    assert exc.value.code == 0 and capsys.readouterr().out.startswith(f"usage: regionflow {name}")
    assert bare == [], f"regionflow {name}: flags without help text: {bare}"


def test_summary_warns_only_when_every_sample_fails_for_one_reason() -> None:
    summary = ExtractSummary(store="s", config_digest="d", shards_total=1)
    summary.error_rows, summary.error_rows_by_reason = 80, {"boxes_missing": 80}
    assert summary.warnings() == [
        "all 80 samples are error rows (boxes_missing): did you mean --boxes fixed (or --boxes adaptive)?"
    ]
    assert summary.to_dict()["warnings"] == summary.warnings()
    summary.error_rows_by_reason = {"boxes_missing": 79, "image_undecodable": 1}
    assert summary.warnings() == []
    summary.rows, summary.error_rows_by_reason = 1, {"boxes_missing": 80}
    assert summary.warnings() == []
    assert ExtractSummary(store="s", config_digest="d", shards_total=0).warnings() == []


def test_given_boxes_without_boxes_warns_in_the_summary(
    tmp_path: Path, capsys, caplog, ray_session: object
) -> None:
    members = [m for k in range(3) for m in simple_sample(f"k{k}", seed=k, size=24)]
    members += [("k3.jpg", make_jpeg(20, 20, seed=3)), ("k3.json", b'{"caption": "no boxes either"}')]
    write_tar(tmp_path / "nb-000.tar", members)
    argv = ["extract", str(tmp_path / "nb-000.tar"), "--out", str(tmp_path / "store"), "--config", "tiny",
            "--boxes", "given", "--detector-threads", "1", "--batch-size", "2"]  # fmt: skip
    with caplog.at_level(logging.WARNING):
        code = cli.main(argv)
    summary = json.loads(capsys.readouterr().out)
    assert code == 0 and summary["exit_code"] == 0
    assert summary["rows"] == 0 and summary["error_rows_by_reason"] == {"boxes_missing": 4}
    expected = "all 4 samples are error rows (boxes_missing): did you mean --boxes fixed"
    assert any(w.startswith(expected) for w in summary["warnings"])
    assert expected in caplog.text
