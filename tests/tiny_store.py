"""Tiny feature stores for data / train / evaluate tests, written with `write_test_store` (here: a test helper, not production code).

Two kinds:
    * `random_rows`: random features and boxes, captions of random real WordPiece ids.
    * `planted_rows`: a planted signal. Each image shows ``WORDS_PER_IMAGE`` of `PLANTED_WORD_IDS`; each of its
      regions carries the multi-hot code of those words (plus noise), and each of its captions names exactly
      those words (in a random order). A model that learns to match caption words to region codes
      scores matching and retrieval above chance; with the visual rows shuffled across images it cannot.
"""

from __future__ import annotations

from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np

CLS, SEP = 101, 102
# WordPiece ids of common words in the BERT uncased vocabulary ("red", "blue", ... do not matter: any ids work).
PLANTED_WORD_IDS = (2417, 2630, 2665, 3756, 2304, 2317, 4589, 6379, 2829, 5061)
WORDS_PER_IMAGE = 3


def _boxes(rng: np.random.Generator, n: int, width: int, height: int) -> list[list[float]]:
    x1 = rng.uniform(0, width / 2, n)
    y1 = rng.uniform(0, height / 2, n)
    x2 = np.minimum(x1 + rng.uniform(4, width / 2, n), width)
    y2 = np.minimum(y1 + rng.uniform(4, height / 2, n), height)
    return np.stack([x1, y1, x2, y2], axis=1).astype(np.float32).tolist()


def _row(
    key: str, features: np.ndarray, captions: list[list[int]], rng: np.random.Generator, image_id: int | None
) -> dict[str, Any]:
    n = features.shape[0]
    width, height = int(rng.integers(40, 80)), int(rng.integers(30, 60))
    return {
        "key": key,
        "image_id": image_id,
        "image_width_px": width,
        "image_height_px": height,
        "num_boxes": n,
        "boxes_xyxy_px": _boxes(rng, n, width, height),
        "features": features.astype(np.float16).tolist(),
        "object_ids": [1] * n,
        "object_conf": [0.5] * n,
        "captions": [" ".join(f"w{t}" for t in c[1:-1]) for c in captions],
        "input_ids": captions,
        "captions_truncated": [False] * len(captions),
    }


def random_rows(
    num_images: int,
    feature_dim: int,
    seed: int = 0,
    captions_per_image: int = 2,
    with_image_ids: bool = False,
) -> list[dict[str, Any]]:
    """Rows with random features, 2..5 boxes each, captions of 2..6 random word ids."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(num_images):
        n = int(rng.integers(2, 6))
        captions = [
            [CLS, *rng.integers(2000, 8000, int(rng.integers(2, 7))).tolist(), SEP]
            for _ in range(captions_per_image)
        ]
        features = rng.normal(size=(n, feature_dim))
        rows.append(_row(f"img{i:04d}", features, captions, rng, 1000 + i if with_image_ids else None))
    return rows


def planted_rows(
    num_images: int, feature_dim: int, seed: int = 0, captions_per_image: int = 2, noise: float = 0.1
) -> list[dict[str, Any]]:
    """Rows with the planted word signal (see the module docstring); ``feature_dim >= len(PLANTED_WORD_IDS)``."""
    assert feature_dim >= len(PLANTED_WORD_IDS)
    rng = np.random.default_rng(seed)
    combos = list(combinations(range(len(PLANTED_WORD_IDS)), WORDS_PER_IMAGE))
    rows = []
    for i in range(num_images):
        words = combos[int(rng.integers(len(combos)))]
        n = 2 * WORDS_PER_IMAGE
        features = rng.normal(scale=noise, size=(n, feature_dim))
        features[:, list(words)] += 1.0  # every region carries the multi-hot code of the image's words
        captions = [
            [CLS, *[PLANTED_WORD_IDS[w] for w in rng.permutation(words)], SEP]
            for _ in range(captions_per_image)
        ]
        rows.append(_row(f"img{i:04d}", features, captions, rng, 5000 + i))
    return rows


def write_store(root: Path, rows: list[dict[str, Any]], feature_dim: int, num_shards: int = 2) -> Path:
    """Write ``rows`` round-robin into ``num_shards`` shards (``shard-000`` ...); returns ``root``."""
    by_shard = {f"shard-{s:03d}": rows[s::num_shards] for s in range(num_shards)}
    write_test_store(str(root), by_shard, feature_dim)
    return root


def write_test_store(root: str, rows_by_shard: dict[str, list[dict[str, Any]]], feature_dim: int) -> None:
    """Write a small committed store from Python rows (tests and examples; columns as ``row_schema``).

    Missing optional columns default to null, ``shard`` to the dict key, ``box_source`` to "detector".
    Each row counts as a sample of two members (image + caption) in the markers' accounting.
    """
    import pyarrow as pa

    from schemas.manifest import ShardAccounting, new_manifest
    from schemas.store import row_schema
    from workers.store import PartWriter, StoreLocation, write_manifest

    location = StoreLocation.parse(root)
    extraction_config = {"test_store": True, "feature_dim": feature_dim}
    manifest = new_manifest(
        feature_dim=feature_dim,
        extraction_config=extraction_config,
        provenance={"weights": {"digest": "test", "random_init": True}},
    )
    write_manifest(location, manifest)
    defaults = {
        "image_id": None,
        "attribute_ids": None,
        "attribute_conf": None,
        "cls_prob": None,
        "box_source": "detector",
    }
    for shard, rows in rows_by_shard.items():
        full = [{**defaults, "shard": shard, **row} for row in rows]
        writer = PartWriter(location, shard, feature_dim, manifest["config_digest"])
        writer.add_rows(pa.Table.from_pylist(full, schema=row_schema(feature_dim)))
        n = len(full)
        writer.commit(ShardAccounting(2 * n, 2 * n, 0, {}, n, n, 0))


VQA_ANSWERS = ("yes", "no", "2", "red", "blue")


def write_vqa(
    directory: Path, image_ids: list[int], seed: int = 0, questions_per_image: int = 2
) -> tuple[Path, Path]:
    """Official-shaped VQA v2 questions + annotations files naming ``image_ids``; returns their paths."""
    import json

    rng = np.random.default_rng(seed)
    questions, annotations = [], []
    for image_id in image_ids:
        for k in range(questions_per_image):
            qid = image_id * 10 + k
            majority = VQA_ANSWERS[int(rng.integers(len(VQA_ANSWERS)))]
            answers = [majority] * 7 + [VQA_ANSWERS[int(rng.integers(len(VQA_ANSWERS)))] for _ in range(3)]
            qtype = "is the" if majority in ("yes", "no") else "what color is the"
            questions.append(
                {"image_id": image_id, "question": f"what color is thing {k}?", "question_id": qid}
            )
            annotations.append(
                {
                    "question_id": qid,
                    "image_id": image_id,
                    "question_type": qtype,
                    "answer_type": "yes/no" if qtype == "is the" else "other",
                    "multiple_choice_answer": majority,
                    "answers": [
                        {"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
                        for i, a in enumerate(answers)
                    ],
                }
            )
    directory.mkdir(parents=True, exist_ok=True)
    qpath, apath = directory / "questions.json", directory / "annotations.json"
    qpath.write_text(json.dumps({"questions": questions}))
    apath.write_text(json.dumps({"annotations": annotations}))
    return qpath, apath
