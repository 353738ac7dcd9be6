"""What the ``regionflow extract`` driver carries at butd size (issue 12): the driver schedules and commits,
it never receives feature rows.

The real pipeline (read tasks, detector actors, part writers, the driver's scheduler) runs with a stand-in
detector (``StandIn``): it returns 36 boxes of ``[36, 2048]`` features per image after a fixed delay per image,
so the data path is measured, not the network. It runs on a 3-node ``ray.cluster_utils.Cluster`` (a head
without CPUs for the driver, two worker nodes), store on the local disk (``--store-shared-fs``: one machine).

Reported, each beside its goal:
- bytes that reach the driver per image (pickled size of every result it fetched): goal <= 1 KB; for
  comparison, the bytes per image the first design's driver fetched (a pickled ``ChunkRows``, computed here
  from the same stand-in rows);
- the driver's CPU seconds per 1,000 images (its process, all threads, while processing);
- images/s with 1, 2 and 4 detector actors: goal 4 actors / 1 actor >= 3.5 (the stand-in sleeps, so 2 cores
  suffice unless the read/write path itself is the limit).

    python bench/driver_load.py [--images 640] [--shards 16] [--delay-ms 40] [--batch-size 8]
"""

from __future__ import annotations

import argparse
import pickle
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_repo_to_path, print_ratio, set_passive_omp, write_result

set_passive_omp()
add_repo_to_path()

NUM_BOXES, FEATURE_DIM = 36, 2048
GOAL_BYTES_PER_IMAGE = 1024
GOAL_SCALING = 3.5
ACTOR_COUNTS = (1, 2, 4)
IMAGE_SIDE_PX = 64


class StandIn:
    """A detector with ``RegionDetector``'s interface: ``extract`` sleeps ``delay_s`` per image and returns
    ``NUM_BOXES`` boxes of ``[NUM_BOXES, FEATURE_DIM]`` float32 features (values < 1, deterministic)."""

    def __init__(self, spec: Any, delay_s: float) -> None:
        self.delay_s = delay_s
        self.feature_dim = FEATURE_DIM
        self.weights_digest = f"stand-in:delay={delay_s}"
        self.random_init = True
        self.device = "cpu"

    def extract(self, images: list[Any], given: Any = None) -> list[Any]:
        import numpy as np

        from workers.detect.detector import RegionOutput

        time.sleep(self.delay_s * len(images))
        outputs = []
        for image in images:
            h, w = image.shape[:2]
            x = np.linspace(0, w / 2, NUM_BOXES, dtype=np.float32)
            y = np.linspace(0, h / 2, NUM_BOXES, dtype=np.float32)
            boxes = np.stack([x, y, x + w / 2, y + h / 2], axis=1)
            features = np.full((NUM_BOXES, FEATURE_DIM), float(image.mean()) / 255.0, np.float32)
            ids = np.arange(1, NUM_BOXES + 1, dtype=np.int16)
            conf = np.linspace(0.9, 0.1, NUM_BOXES, dtype=np.float32)
            outputs.append(RegionOutput(boxes, features, ids, conf, None, None, None))
        return outputs


class BuildStandIn:
    """Picklable ``build_detector`` for ``extract``: ``StandIn(spec, delay_s)``."""

    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s

    def __call__(self, spec: Any) -> StandIn:
        return StandIn(spec, self.delay_s)


def write_shards(root: Path, images: int, shards: int) -> list[str]:
    """``shards`` tars of 64x64 JPEGs (noise) with a caption each; returns their paths."""
    import cv2
    import numpy as np

    from workers.corpus.tar_writer import write_tar

    rng = np.random.default_rng(0)
    urls = []
    per_shard = images // shards
    for s in range(shards):
        members = []
        for k in range(per_shard):
            pixels = rng.integers(0, 255, (IMAGE_SIDE_PX, IMAGE_SIDE_PX, 3), dtype=np.uint8)
            ok, jpeg = cv2.imencode(".jpg", pixels)
            assert ok
            members += [(f"i{k:04d}.jpg", jpeg.tobytes()), (f"i{k:04d}.txt", b"a picture of noise")]
        path = root / f"dl-{s:03d}.tar"
        write_tar(path, members)
        urls.append(str(path))
    return urls


def first_design_bytes_per_image(delay_s: float, urls: list[str], batch_size: int) -> float:
    """Pickled size per image of the ``ChunkRows`` the first design's driver ``ray.get``-ed for each chunk
    (rows built here from the stand-in, one chunk of ``batch_size`` images)."""
    from pipelines.extract_config import ExtractConfig
    from workers.read.tokenizer import CaptionTokenizer
    from workers.rows import RegionRowBuilder, shard_chunks

    config = ExtractConfig(detector="butd-r101-c4")
    tokenizer = CaptionTokenizer(max_tokens=config.max_tokens)
    chunk = next(shard_chunks(urls[0], config.reader_config(), tokenizer, batch_size))
    builder = RegionRowBuilder(StandIn(None, 0.0), box_source="detector", with_cls_prob=False)  # type: ignore[arg-type]
    rows = builder.process(chunk)
    return len(pickle.dumps(rows, protocol=pickle.HIGHEST_PROTOCOL)) / rows.rows.num_rows


def run_once(address: str, urls: list[str], out: Path, actors: int, args: argparse.Namespace) -> dict:
    from pipelines.extract import ExtractConfig, extract

    config = ExtractConfig(
        detector="butd-r101-c4",
        detectors=actors,
        detector_threads=1,
        batch_size=args.batch_size,
        shards_in_flight=max(2, actors),
        address=address,
        store_shared_fs=True,
        captions="optional",
    )
    summary = extract(urls, str(out), config, build_detector=BuildStandIn(args.delay_ms / 1000))
    assert summary.exit_code == 0 and summary.rows == len(urls) * (args.images // len(urls)), summary
    return {
        "actors": actors,
        "rows": summary.rows,
        "images_per_s": summary.images_per_s,
        "processing_s": summary.processing_s,
        "driver_received_bytes": summary.driver_received_bytes,
        "driver_bytes_per_image": summary.driver_received_bytes / summary.rows,
        "driver_cpu_s": summary.driver_cpu_s,
        "driver_cpu_s_per_1000_images": 1000 * summary.driver_cpu_s / summary.rows,
        "max_batches_in_flight": summary.max_batches_in_flight,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=640)
    parser.add_argument("--shards", type=int, default=16)
    parser.add_argument("--delay-ms", type=float, default=40.0, help="stand-in detector time per image")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--node-cpus", type=int, default=3, help="logical CPUs of each of the 2 worker nodes")
    args = parser.parse_args(argv)
    import ray
    from ray.cluster_utils import Cluster

    runs = []
    with tempfile.TemporaryDirectory(prefix="driver-load-") as tmp:
        root = Path(tmp)
        urls = write_shards(root, args.images, args.shards)
        before = first_design_bytes_per_image(args.delay_ms / 1000, urls, args.batch_size)
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
        try:
            for _ in range(2):
                cluster.add_node(num_cpus=args.node_cpus)
            cluster.wait_for_nodes()
            ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False)
            for actors in ACTOR_COUNTS:
                runs.append(run_once(cluster.address, urls, root / f"store-{actors}", actors, args))
                print(runs[-1], flush=True)
        finally:
            ray.shutdown()
            cluster.shutdown()
    by_actors = {r["actors"]: r for r in runs}
    scaling = by_actors[4]["images_per_s"] / by_actors[1]["images_per_s"]
    worst_bytes = max(r["driver_bytes_per_image"] for r in runs)
    result = {
        "parameters": {**vars(args), "feature_shape": [NUM_BOXES, FEATURE_DIM], "nodes": 3},
        "runs": runs,
        "driver_bytes_per_image": worst_bytes,
        "first_design_driver_bytes_per_image": before,
        "goal_driver_bytes_per_image": GOAL_BYTES_PER_IMAGE,
        "driver_cpu_s_per_1000_images": max(r["driver_cpu_s_per_1000_images"] for r in runs),
        "ratio": scaling,
        "goal": GOAL_SCALING,
    }
    path = write_result("driver_load", result)
    print(f"wrote {path}")
    print(
        f"bytes reaching the driver per image: {worst_bytes:.0f} B (goal <= {GOAL_BYTES_PER_IMAGE} B: "
        f"{'met' if worst_bytes <= GOAL_BYTES_PER_IMAGE else 'NOT met'}; first design {before / 1000:.0f} KB)"
    )
    print(f"driver CPU per 1000 images: {result['driver_cpu_s_per_1000_images']:.2f} s")
    for r in runs:
        print(f"{r['actors']} actor(s): {r['images_per_s']:.1f} images/s")
    print_ratio("images/s, 4 actors / 1 actor", scaling, GOAL_SCALING)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
