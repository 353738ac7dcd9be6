"""The embedded default corpus: determinism, scene/caption/box/VQA consistency, checked against the pixels."""

from __future__ import annotations

import json
import re
import tarfile
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest

from pipelines.cli import main as cli_main
from workers.corpus.synth import SynthConfig, duplicate_caption_share, write_corpus
from workers.corpus.synth_scene import COLOURS, SHAPE_ASPECTS, SHAPES

NUM_IMAGES = 24
PER_SHARD = 10
COLOUR_TOLERANCE = (
    30  # L-inf, 0-255: colour jitter (14) + JPEG error, far below the gap to mid-grey backgrounds
)
EDGE_BAND_PX = 3
NUMBERS = {"two": 2, "three": 3, "four": 4}
PLURALS = {shape + ("es" if shape.endswith("s") else "s"): shape for shape in SHAPES}
PLURAL_RE = "|".join(PLURALS)


def _read_samples(out: Path) -> list[dict]:
    """(json, rgb image) of every sample, in shard order, read back with tarfile and OpenCV."""
    samples = []
    for shard in sorted(out.glob("synth-*.tar")):
        with tarfile.open(shard) as tar:
            members = tar.getmembers()
            names = [m.name for m in members]
            assert len(names) % 2 == 0
            for jpg, meta in zip(members[::2], members[1::2], strict=True):
                assert jpg.name.endswith(".jpg") and meta.name == jpg.name[:-4] + ".json", names
                data = np.frombuffer(tar.extractfile(jpg).read(), np.uint8)
                image = cv2.cvtColor(cv2.imdecode(data, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
                record = json.loads(tar.extractfile(meta).read())
                samples.append({**record, "key": jpg.name[:-4], "image": image})
    return samples


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("synth")
    write_corpus(out, NUM_IMAGES, PER_SHARD, seed=7)
    return out, _read_samples(out)


def _colour_match(image: np.ndarray, colour: str) -> np.ndarray:
    """bool [H, W]: pixels within COLOUR_TOLERANCE of the named colour."""
    diff = np.abs(image.astype(np.int32) - np.array(COLOURS[colour])).max(axis=-1)
    return diff <= COLOUR_TOLERANCE


def test_same_seed_gives_identical_bytes_and_another_seed_differs(tmp_path: Path) -> None:
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    write_corpus(a, 7, 3, seed=3)
    write_corpus(b, 7, 3, seed=3)
    write_corpus(c, 7, 3, seed=4)
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    assert [n for n in names if n.endswith(".tar")] == [
        "synth-000000.tar",
        "synth-000001.tar",
        "synth-000002.tar",
    ]
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert (a / "synth-000000.tar").read_bytes() != (c / "synth-000000.tar").read_bytes()


def test_samples_have_the_contract_fields(corpus: tuple[Path, list[dict]]) -> None:
    _, samples = corpus
    assert len(samples) == NUM_IMAGES
    assert len({s["image_id"] for s in samples}) == NUM_IMAGES
    for s in samples:
        assert isinstance(s["image_id"], int)
        assert s["image"].shape == (s["height"], s["width"], 3)
        assert 128 <= s["width"] == s["height"] <= 192
        assert 1 <= len(s["boxes"]) <= 4
        assert len(s["labels"]) == len(s["objects"]) == len(s["boxes"])
        assert len(s["captions"]) >= 3 and all(isinstance(c, str) and c for c in s["captions"])


def test_boxes_are_inside_the_image_and_hold_their_objects_pixels(corpus: tuple[Path, list[dict]]) -> None:
    _, samples = corpus
    b = EDGE_BAND_PX  # JPEG blurs a one-pixel edge or tip
    for s in samples:
        h, w = s["height"], s["width"]
        for i, ((x1, y1, x2, y2), obj) in enumerate(zip(s["boxes"], s["objects"], strict=True)):
            assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h, (s["key"], obj)
            match = _colour_match(s["image"], obj["color"])
            inside = match[y1:y2, x1:x2]
            # Every shape fills >= ~35% of its box (a star) and keeps >= 60% of its pixels visible.
            assert inside.mean() > 0.15, (s["key"], obj, inside.mean())
            if i == len(s["objects"]) - 1:  # the top-most object: the box is tight on all four sides
                diff = np.abs(s["image"][y1:y2, x1:x2].astype(np.int32) - np.array(obj["rgb"])).max(axis=-1)
                inside = diff <= COLOUR_TOLERANCE  # its own jittered colour, for thin tips
                assert inside[:b].any() and inside[-b:].any() and inside[:, :b].any() and inside[:, -b:].any()
        # No object colour outside every box (blends at other shapes' edges may resemble another colour).
        outside = np.ones(s["image"].shape[:2], dtype=bool)
        for x1, y1, x2, y2 in s["boxes"]:
            outside[max(0, y1 - b) : y2 + b, max(0, x1 - b) : x2 + b] = False
        for obj in s["objects"]:
            assert not (_colour_match(s["image"], obj["color"]) & outside).any(), (s["key"], obj)


def test_each_shape_has_its_own_box_aspect_ratio(corpus: tuple[Path, list[dict]]) -> None:
    """The model reads shape from the box (a random-init detector's pooled features do not carry outlines)."""
    _, samples = corpus
    ranges: dict[str, list[float]] = {}
    for s in samples:
        for (x1, y1, x2, y2), obj in zip(s["boxes"], s["objects"], strict=True):
            ranges.setdefault(obj["shape"], []).append((x2 - x1) / (y2 - y1))
    assert len(ranges) >= 4
    spans = sorted((min(v), max(v), shape) for shape, v in ranges.items())
    for (_, hi, a), (lo, _, b) in zip(spans, spans[1:], strict=False):
        assert hi < lo, f"{a} and {b} box aspect ratios overlap"
    for shape, values in ranges.items():
        assert abs(np.log(np.median(values) / SHAPE_ASPECTS[shape])) < 0.1, shape


def test_some_scenes_overlap_and_some_have_several_objects(corpus: tuple[Path, list[dict]]) -> None:
    _, samples = corpus
    counts = Counter(len(s["boxes"]) for s in samples)
    assert len(counts) >= 3, counts

    def overlaps(a: list[int], b: list[int]) -> bool:
        return min(a[2], b[2]) > max(a[0], b[0]) and min(a[3], b[3]) > max(a[1], b[1])

    n_overlapping = sum(
        any(overlaps(a, b) for i, a in enumerate(s["boxes"]) for b in s["boxes"][i + 1 :]) for s in samples
    )
    assert 0 < n_overlapping < len(samples)


def _centre(box: list[int]) -> tuple[float, float]:
    return (box[0] + box[2]) / 2, (box[1] + box[3]) / 2


def test_captions_name_exactly_the_scene_objects(corpus: tuple[Path, list[dict]]) -> None:
    _, samples = corpus
    for s in samples:
        colours = {o["color"] for o in s["objects"]}
        shapes = {o["shape"] for o in s["objects"]}
        for caption in s["captions"]:
            words = set(re.findall(r"[a-z]+", caption))
            singular = {PLURALS.get(w, w) for w in words}
            assert words & set(COLOURS) == colours, (caption, colours)
            assert singular & set(SHAPES) == shapes, (caption, shapes)


def test_caption_counts_and_relations_match_the_boxes(corpus: tuple[Path, list[dict]]) -> None:
    _, samples = corpus
    relations_seen = 0
    for s in samples:
        by_label = Counter(s["labels"])
        centres = {label: _centre(box) for label, box in zip(s["labels"], s["boxes"], strict=True)}
        for caption in s["captions"]:
            m = re.match(r"(two|three|four) shapes", caption)
            if m:
                assert NUMBERS[m.group(1)] == len(s["boxes"]), caption
            for number, colour, plural in re.findall(
                rf"\b(two|three|four) (?:\w+ )?(\w+) ({PLURAL_RE})\b", caption
            ):
                assert by_label[f"{colour} {PLURALS[plural]}"] >= NUMBERS[number], caption
            rel = re.match(r"an? (\w+ \w+) (left of|right of|above|below) an? (\w+ \w+)", caption)
            if rel:
                relations_seen += 1
                (ax, ay), (bx, by) = centres[rel.group(1)], centres[rel.group(3)]
                expected = {"left of": ax < bx, "right of": ax > bx, "above": ay < by, "below": ay > by}
                assert expected[rel.group(2)], (caption, centres)
    assert relations_seen > 0


def test_vqa_files_have_the_official_shapes(corpus: tuple[Path, list[dict]]) -> None:
    out, samples = corpus
    questions = json.loads((out / "questions.json").read_text())["questions"]
    annotations = json.loads((out / "annotations.json").read_text())["annotations"]
    image_ids = {s["image_id"] for s in samples}
    assert len(questions) == len(annotations) >= 3 * NUM_IMAGES
    assert len({q["question_id"] for q in questions}) == len(questions)
    by_id = {a["question_id"]: a for a in annotations}
    for q in questions:
        assert set(q) == {"image_id", "question", "question_id"} and q["image_id"] in image_ids
        a = by_id[q["question_id"]]
        assert set(a) == {
            "image_id",
            "question_id",
            "question_type",
            "answer_type",
            "multiple_choice_answer",
            "answers",
        }
        assert a["image_id"] == q["image_id"] and a["answer_type"] in {"yes/no", "number", "other"}
        assert [x["answer_id"] for x in a["answers"]] == list(range(1, 11))
        assert all(set(x) == {"answer", "answer_confidence", "answer_id"} for x in a["answers"])
        assert {x["answer_confidence"] for x in a["answers"]} <= {"yes", "maybe", "no"}
    types = Counter(a["question_type"] for a in annotations)
    assert {"how many", "is there a", "is the", "what shape is the"} <= set(types), types


def _expected_answer(question: str, s: dict) -> str:
    """The answer read off the sample's objects and boxes, written independently of the generator."""
    objs = [(o["color"], o["shape"]) for o in s["objects"]]
    if m := re.fullmatch(r"what (?:color is|is the color of) the (\w+)\?", question):
        return next(c for c, sh in objs if sh == m.group(1))
    if m := re.fullmatch(r"what shape is the (\w+) object\?", question):
        return next(sh for c, sh in objs if c == m.group(1))
    if question == "how many shapes are there?":
        return str(len(objs))
    if m := re.fullmatch(r"how many (\w+) shapes are there\?", question):
        return str(sum(c == m.group(1) for c, _ in objs))
    if m := re.fullmatch(rf"how many ({PLURAL_RE}) are there\?", question):
        return str(sum(sh == PLURALS[m.group(1)] for _, sh in objs))
    if m := re.fullmatch(r"is there an? (\w+) (\w+)\?", question):
        return "yes" if (m.group(1), m.group(2)) in objs else "no"
    if m := re.fullmatch(r"is the (\w+ \w+) (left of|right of|above|below) the (\w+ \w+)\?", question):
        centres = {label: _centre(box) for label, box in zip(s["labels"], s["boxes"], strict=True)}
        (ax, ay), (bx, by) = centres[m.group(1)], centres[m.group(3)]
        truth = {"left of": ax < bx, "right of": ax > bx, "above": ay < by, "below": ay > by}[m.group(2)]
        return "yes" if truth else "no"
    raise AssertionError(f"unparsed question {question!r}")


def test_vqa_answers_are_right_for_the_scene_in_the_majority(corpus: tuple[Path, list[dict]]) -> None:
    out, samples = corpus
    by_image = {s["image_id"]: s for s in samples}
    questions = json.loads((out / "questions.json").read_text())["questions"]
    annotations = {
        a["question_id"]: a for a in json.loads((out / "annotations.json").read_text())["annotations"]
    }
    disagreeing = 0
    answers_seen: Counter[str] = Counter()
    for q in questions:
        expected = _expected_answer(q["question"], by_image[q["image_id"]])
        a = annotations[q["question_id"]]
        votes = Counter(x["answer"] for x in a["answers"])
        assert a["multiple_choice_answer"] == expected, (q, votes)
        assert votes[expected] > 5, (q, votes)
        disagreeing += votes[expected] < 10
        answers_seen[expected] += 1
    assert 0.1 < disagreeing / len(questions) < 0.9, disagreeing
    assert answers_seen["yes"] > 0 and answers_seen["no"] > 0


def test_duplicate_caption_share_counts_captions_shared_across_images() -> None:
    assert duplicate_caption_share([["a", "b"], ["a", "c"], ["d"]]) == pytest.approx(2 / 5)
    assert duplicate_caption_share([["x", "x"], ["y"]]) == 0.0
    assert duplicate_caption_share([]) == 0.0


def test_corpus_captions_are_mostly_unique(corpus: tuple[Path, list[dict]]) -> None:
    _, samples = corpus
    assert duplicate_caption_share([s["captions"] for s in samples]) < 0.2


def test_cli_writes_shards_and_vqa_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["synth", "--out", str(tmp_path), "--images", "3", "--samples-per-shard", "2", "--seed", "1"]
    assert cli_main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["shards"] == ["synth-000000.tar", "synth-000001.tar"] and summary["images"] == 3
    assert (tmp_path / "questions.json").exists() and (tmp_path / "annotations.json").exists()
    assert [s["key"] for s in _read_samples(tmp_path)] == ["000001", "000002", "000003"]


def test_bad_config_is_refused() -> None:
    with pytest.raises(ValueError):
        SynthConfig(min_side_px=200, max_side_px=100)
    with pytest.raises(ValueError):
        SynthConfig(object_count_weights=(0.5, 0.2))


def test_cli_refuses_an_existing_corpus_unless_overwrite(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "corpus"
    argv = ["synth", "--out", str(out), "--images", "3", "--samples-per-shard", "1", "--seed", "1"]
    assert cli_main(argv) == 0
    (out / "notes.txt").write_text("kept")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    smaller = ["synth", "--out", str(out), "--images", "2", "--samples-per-shard", "2", "--seed", "2"]
    assert cli_main(smaller) == 1
    err = capsys.readouterr().err
    assert "3 synth-*.tar shards" in err and "questions.json" in err and "--overwrite" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert cli_main([*smaller, "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "annotations.json",
        "notes.txt",
        "questions.json",
        "synth-000000.tar",
        "synth-summary.json",
    ]
    assert [s["key"] for s in _read_samples(out)] == ["000001", "000002"]
    questions = json.loads((out / "questions.json").read_text())["questions"]
    assert {q["image_id"] for q in questions} == {1, 2}
