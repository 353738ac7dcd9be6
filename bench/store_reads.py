"""Benchmark: random reads from a regionflow store vs the LMDB layouts of ViLBERT and UNITER.

    ratio = reads/s of our store ÷ reads/s of the faster LMDB reference        (goal >= 3)

A *read* is what a training loader needs of one image: its region features as float32 ``[36, D]`` and its
boxes, as numpy arrays, looked up by key. All three sides read the same keys in the same random order; each
side reads every key once before timing (page cache warm), then the sides alternate, ``--repeats`` rounds of
all keys each (A B C A B C ...), and reads/s is ``keys ÷ median round time``.

* ours: the Arrow IPC parts of a store written by ``workers.store.PartWriter`` (rows built by
  ``workers.rows.build_rows``, in record batches of 64 rows, as ``regionflow extract`` writes them), opened with
  ``StoreReader`` and read with ``model.data.StoreImages.visual`` (memory-mapped, a zero-copy float16 view of
  one record batch → float32).
* ViLBERT (vilbert-multi-task ``ImageFeaturesH5Reader`` on an LMDB): one pickled dict per image with
  ``image_id``, ``image_h``, ``image_w``, ``num_boxes`` and base64 float32 ``features`` and ``boxes``; a read opens
  a read transaction, unpickles and base64-decodes.
* UNITER (``DetectFeatLmdb`` with ``compress=True``): one ``np.savez_compressed`` archive per image holding
  float16 ``features``, float32 ``boxes`` and float16 ``conf``; a long-lived read transaction, ``np.load``.

Features: the outputs of the real detector code (``RegionDetector``, fixed 36 boxes, seeded random init: no
weights are available offline) on ``--source-images`` real COCO-mini images; the store holds ``--rows`` rows
that cycle through those outputs under distinct keys (the JSON says exactly this). ``--detector tiny`` (the
``--quick`` default) gives D = 64 instead of 2048.

    python bench/store_reads.py [--rows 1000] [--source-images 2] [--detector butd-r101-c4] [--repeats 5]
    python bench/store_reads.py --quick
"""

from __future__ import annotations

import argparse
import base64
import io
import pickle
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common import add_repo_to_path, set_passive_omp

set_passive_omp()
add_repo_to_path()

import common  # noqa: E402
import numpy as np  # noqa: E402

GOAL = 3.0
NUM_BOXES = 36
SIDES = ("ours", "ours_numpy_astype", "vilbert_lmdb", "uniter_lmdb")


# ------------------------------------------------------------------------------------------ source rows
def detector_outputs(detector_name: str, count: int, threads: int) -> tuple[list[Any], dict[str, Any]]:
    """``(name, image, RegionOutput)`` of ``count`` COCO-mini images, and how they were made."""
    import torch

    from workers.detect.config import BoxSelectionConfig, detector_config
    from workers.detect.detector import RegionDetector

    torch.set_num_threads(threads)
    started = time.perf_counter()
    detector = RegionDetector(
        detector_config(detector_name), BoxSelectionConfig(mode="fixed", num_boxes=NUM_BOXES), device="cpu"
    )
    images = common.coco_images(count)
    outputs = detector.extract([image for _, image in images])
    info = {
        "detector": detector_name,
        "weights": detector.weights_digest,
        "random_init": detector.random_init,
        "box_mode": f"fixed {NUM_BOXES}",
        "feature_dim": detector.feature_dim,
        "source_images": [name for name, _ in images],
        "detector_seconds": time.perf_counter() - started,
    }
    return [(n, im, o) for (n, im), o in zip(images, outputs, strict=True)], info


def build_store(root: Path, sources: list[Any], rows: int, shards: int, feature_dim: int) -> list[str]:
    """Write ``rows`` rows (cycling through ``sources``) into ``shards`` committed parts; returns the keys."""
    from schemas.manifest import ShardAccounting, new_manifest
    from schemas.store import row_schema
    from workers.read.reader import DecodedSample
    from workers.read.tokenizer import CaptionTokenizer
    from workers.rows import ReadSample, build_rows
    from workers.store import ROWS_PER_RECORD_BATCH, PartWriter, StoreLocation, write_manifest

    location = StoreLocation.parse(str(root))
    extraction = {"bench": "store_reads", "feature_dim": feature_dim}
    manifest = new_manifest(
        feature_dim=feature_dim,
        extraction_config=extraction,
        provenance={"weights": {"digest": "bench", "random_init": True}},
    )
    write_manifest(location, manifest)
    tokenizer, captions = CaptionTokenizer(), common.coco_captions()
    per_shard = -(-rows // shards)
    keys: list[str] = []
    for s in range(shards):
        shard = f"bench-{s:03d}"
        writer = PartWriter(location, shard, feature_dim, manifest["config_digest"])
        kept = []
        for r in range(s * per_shard, min(rows, (s + 1) * per_shard)):
            name, image, output = sources[r % len(sources)]
            key = f"{Path(name).stem}-{r:06d}"
            texts = tuple(captions.get(name, ["an image"]))
            sample = DecodedSample(
                key, shard, None, image, image.shape[1], image.shape[0], texts, None, (f"{key}.jpg",)
            )
            kept.append((ReadSample(sample, tokenizer.encode(list(texts))), output))
            keys.append(key)
        for start in range(0, len(kept), ROWS_PER_RECORD_BATCH):  # extract's layout: 64-row record batches
            chunk = kept[start : start + ROWS_PER_RECORD_BATCH]
            writer.add_rows(build_rows(chunk, row_schema(feature_dim), "detector", False))
        n = len(kept)
        writer.commit(ShardAccounting(n, n, 0, {}, n, n, 0))
    return keys


# ------------------------------------------------------------------------------------------------ readers
def open_ours(root: Path, convert: str) -> Callable[[str], tuple[np.ndarray, np.ndarray]]:
    """Our read: ``StoreImages.visual`` (a zero-copy float16 view into the memory-mapped part), then float32
    through torch (``convert="torch"``: vectorised) or numpy's ``astype`` (``"numpy"``: 5-10x slower here)."""
    import warnings

    import torch

    from model.data import StoreImages
    from workers.store import StoreReader

    # torch.from_numpy warns once that the memory-mapped view is read-only; the read never writes to it
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
    images = StoreImages(StoreReader(str(root)))
    index = {key: i for i, (_, key) in enumerate(images.identities())}

    def read_torch(key: str) -> tuple[np.ndarray, np.ndarray]:
        row = images.visual(index[key])
        return torch.from_numpy(row.features).float().numpy(), row.boxes_xyxy_px

    def read_numpy(key: str) -> tuple[np.ndarray, np.ndarray]:
        row = images.visual(index[key])
        return row.features.astype(np.float32), row.boxes_xyxy_px

    return read_torch if convert == "torch" else read_numpy


def write_vilbert_lmdb(path: Path, root: Path, keys: list[str]) -> None:
    """ViLBERT's layout: key → pickled dict with base64 float32 ``features`` / ``boxes`` (written by us)."""
    import lmdb

    from model.data import StoreImages
    from workers.store import StoreReader

    images = StoreImages(StoreReader(str(root)))
    env = lmdb.open(str(path), map_size=_map_size(images, keys, 1.5), subdir=True)
    with env.begin(write=True) as txn:
        for i, key in enumerate(keys):
            row = images.visual(i)
            features = row.features.astype(np.float32)
            item = {
                "image_id": key,
                "image_h": int(row.image_size_px[1]),
                "image_w": int(row.image_size_px[0]),
                "num_boxes": features.shape[0],
                "boxes": base64.b64encode(np.ascontiguousarray(row.boxes_xyxy_px, np.float32).tobytes()),
                "features": base64.b64encode(features.tobytes()),
            }
            txn.put(key.encode(), pickle.dumps(item))
    env.close()


def open_vilbert(path: Path, feature_dim: int) -> Callable[[str], tuple[np.ndarray, np.ndarray]]:
    import lmdb

    env = lmdb.open(str(path), readonly=True, lock=False, readahead=False, meminit=False)

    def read(key: str) -> tuple[np.ndarray, np.ndarray]:
        with env.begin(write=False) as txn:
            item = pickle.loads(txn.get(key.encode()))  # noqa: S301  (bytes this script wrote)
        n = int(item["num_boxes"])
        features = np.frombuffer(base64.b64decode(item["features"]), dtype=np.float32).reshape(n, feature_dim)
        boxes = np.frombuffer(base64.b64decode(item["boxes"]), dtype=np.float32).reshape(n, 4)
        return features, boxes

    return read


def write_uniter_lmdb(path: Path, root: Path, keys: list[str]) -> None:
    """UNITER's layout: key → ``np.savez_compressed`` bytes (float16 features, boxes, float16 conf)."""
    import lmdb

    from model.data import StoreImages
    from workers.store import StoreReader

    images = StoreImages(StoreReader(str(root)))
    env = lmdb.open(str(path), map_size=_map_size(images, keys, 1.0), subdir=True)
    with env.begin(write=True) as txn:
        for i, key in enumerate(keys):
            row = images.visual(i)
            buffer = io.BytesIO()
            np.savez_compressed(
                buffer,
                features=np.ascontiguousarray(row.features, np.float16),
                boxes=np.ascontiguousarray(row.boxes_xyxy_px, np.float32),
                conf=np.ones(row.features.shape[0], np.float16),
            )
            txn.put(key.encode(), buffer.getvalue())
    env.close()


def open_uniter(path: Path) -> Callable[[str], tuple[np.ndarray, np.ndarray]]:
    import lmdb

    env = lmdb.open(str(path), readonly=True, lock=False, readahead=False, meminit=False)
    txn = env.begin(buffers=True)

    def read(key: str) -> tuple[np.ndarray, np.ndarray]:
        dump = np.load(io.BytesIO(txn.get(key.encode())), allow_pickle=False)
        return dump["features"].astype(np.float32), dump["boxes"]

    return read


def _map_size(images: Any, keys: list[str], factor: float) -> int:
    per_row = NUM_BOXES * images.feature_dim * 4 * 4 // 3 + 4096
    return int(len(keys) * per_row * factor) + 2**26


# ------------------------------------------------------------------------------------------------- checks
def check_same(readers: dict[str, Callable], keys: list[str]) -> float:
    """Max |difference| of features between the sides over a few keys; raises if shapes or boxes differ."""
    worst = 0.0
    for key in keys[:: max(1, len(keys) // 16)]:
        ref_f, ref_b = readers["ours"](key)
        for name, read in readers.items():
            f, b = read(key)
            if f.shape != ref_f.shape or f.dtype != np.float32 or not np.array_equal(b, ref_b):
                raise RuntimeError(f"{name} returns another read for {key}: {f.shape} {f.dtype}")
            worst = max(worst, float(np.abs(f - ref_f).max()))
    return worst


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=1000)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--source-images", type=int, default=2)
    parser.add_argument("--detector", default="butd-r101-c4", choices=("butd-r101-c4", "tiny"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the detector")
    parser.add_argument("--quick", action="store_true", help="tiny detector, 200 rows, 3 repeats")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.rows, args.source_images, args.detector, args.repeats = 200, 2, "tiny", 3
    sources, source_info = detector_outputs(args.detector, args.source_images, args.threads)
    dim = source_info["feature_dim"]
    import torch

    torch.set_num_threads(1)  # reads run single-threaded, as in a loader worker
    with tempfile.TemporaryDirectory(prefix="rf-bench-reads-") as tmp:
        root = Path(tmp) / "store"
        keys = build_store(root, sources, args.rows, args.shards, dim)
        write_vilbert_lmdb(Path(tmp) / "vilbert.lmdb", root, keys)
        write_uniter_lmdb(Path(tmp) / "uniter.lmdb", root, keys)
        subdirs = ("store", "store", "vilbert.lmdb", "uniter.lmdb")
        sizes = {name: _du(Path(tmp) / sub) for name, sub in zip(SIDES, subdirs, strict=True)}
        readers = {
            "ours": open_ours(root, "torch"),
            "ours_numpy_astype": open_ours(root, "numpy"),
            "vilbert_lmdb": open_vilbert(Path(tmp) / "vilbert.lmdb", dim),
            "uniter_lmdb": open_uniter(Path(tmp) / "uniter.lmdb"),
        }
        order = list(np.random.default_rng(0).permutation(keys))
        max_diff = check_same(readers, order)

        def pass_over(read: Callable) -> Callable[[], None]:
            return lambda: [read(key) for key in order]

        times = common.alternate({n: pass_over(r) for n, r in readers.items()}, args.repeats, warmup=1)
    rates = {name: len(order) / common.median(t) for name, t in times.items()}
    faster = max(("vilbert_lmdb", "uniter_lmdb"), key=lambda n: rates[n])
    ratio = rates["ours"] / rates[faster]
    result = {
        "goal": GOAL,
        "ratio": ratio,
        "ratio_definition": f"reads/s ours / reads/s {faster} (the faster reference)",
        "ratio_vs": {n: rates["ours"] / rates[n] for n in SIDES[1:]},
        "ours_read": "StoreImages.visual (memory-mapped float16 view) -> torch float32; boxes as stored",
        "reads_per_s": rates,
        "round_seconds": times,
        "bytes_on_disk": sizes,
        "max_abs_feature_diff_between_sides": max_diff,
        "features": {
            **source_info,
            "what": (
                f"RegionDetector({args.detector}, seeded random init, fixed {NUM_BOXES} boxes) outputs of "
                f"{args.source_images} real COCO-mini images; the {args.rows} rows cycle through them under "
                "distinct keys; stored float16 as extract stores them"
            ),
        },
        "parameters": {k: v for k, v in vars(args).items() if k != "out"},
    }
    path = common.write_result("store_reads", result, args.out)
    for name in SIDES:
        print(f"{name:>13}: {rates[name]:10.0f} reads/s ({sizes[name] / 2**20:.0f} MiB on disk)")
    print(f"results: {path}")
    common.print_ratio(f"store reads ours / {faster} ([{NUM_BOXES}, {dim}] float32 + boxes)", ratio, GOAL)
    return 0


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


if __name__ == "__main__":
    raise SystemExit(main())
