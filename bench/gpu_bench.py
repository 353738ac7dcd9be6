"""GPU benchmark of the region detector and of an in-process extraction pipeline (run by ``bench/gpu.sh``).

Made for a lent GPU machine that has Python, torch, torchvision, pyarrow, OpenCV and Pillow but no Ray, no
webdataset and no network, with the checkout on ``PYTHONPATH`` (nothing installed). It measures:

1. ``butd-r101-c4`` images/s at batch 1, 8, 32 in float32 and bfloat16 autocast (``RegionDetector.extract``;
   on CUDA the trunk runs per image, unpadded, and the RoI head over all images' crops). Goal: >= 300
   images/s per H200 in bf16.
2. bf16 and fp16 vs fp32 agreement: RPN proposals (share of the fp32 proposals matched at IoU >= 0.5 / 0.7 /
   0.9, mean best IoU) and region features at fixed boxes (the fp32 run's boxes given to all; relative error
   ``||f - f_fp32|| / ||f_fp32||`` per image, checked against ``AUTOCAST_FEATURE_TOLERANCE``).
3. An in-process pipeline: JPEG bytes decoded by a thread pool (``workers.read.decode.decode_image``), the detector on
   the GPU (bf16, the largest batch), rows built (``workers.rows.build_rows``) and written to an Arrow part
   (``workers.store.PartWriter``) by a writer thread; images/s end to end, and ÷ the detector alone.
4. FLOPs per image of the trunk and of the RoI head (``torch.utils.flop_counter``), to read the figures against
   the GPU's peak.

Images: COCO-mini (``shared/data/coco-train-mini`` beside or inside the checkout) when present, else synthetic
scenes (``workers.corpus.synth``); resized to 480×640 and, for the pipeline, re-encoded as JPEG (q 90).
Every measurement is capped by iterations and seconds so the whole run stays within ``--budget-s``.
Results: ``$OUT/gpu_bench.json`` when ``OUT`` is set, else ``bench/results/gpu_bench.json``.

    bash bench/gpu.sh                 # on the GPU machine
    bash bench/gpu.sh --cpu           # CPU smoke run: tiny config, 2 images, batch 1 and 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import sys
import threading
import time
import types
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from gpu_accuracy import accuracy, flops_per_image, precision  # noqa: E402

GOAL_BF16_IMAGES_PER_S = 300.0
SIZE_HW = (480, 640)
JPEG_QUALITY = 90
NUM_BOXES = 36
DATA_CANDIDATES = (REPO.parent / "shared" / "data", REPO / "shared" / "data")


# --------------------------------------------------------------------------------------------- environment
def import_workers() -> dict[str, Any]:
    """Import the detector, decode, rows and store modules with Ray and webdataset blocked (they must not be
    needed); a missing ``safetensors`` (only used to load weights files) is replaced by a stub that raises."""
    sys.modules.setdefault("ray", None)  # type: ignore[arg-type]
    sys.modules.setdefault("webdataset", None)  # type: ignore[arg-type]
    stubbed = False
    try:
        import safetensors.torch  # noqa: F401
    except ImportError:
        stub = types.ModuleType("safetensors.torch")

        def unavailable(*_: object, **__: object) -> None:
            raise ImportError("safetensors is not installed on this machine")

        stub.load_file = stub.save_file = unavailable  # type: ignore[attr-defined]
        sys.modules["safetensors"] = types.ModuleType("safetensors")
        sys.modules["safetensors.torch"] = stub
        stubbed = True
    import workers.detect.detector
    import workers.read.reader
    import workers.store

    return {"safetensors_stubbed": stubbed, "detector_module": workers.detect.detector.__file__}


def environment(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "device": str(device),
        "cpu_count": os.cpu_count(),
        "load_average_1_5_15": list(os.getloadavg()),
        "platform": platform.platform(),
    }
    for name in ("torchvision", "numpy", "pyarrow", "cv2", "PIL"):
        module = sys.modules.get(name) or __import__(name)
        info[name] = getattr(module, "__version__", None)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1))
        info["tf32"] = {
            "matmul": torch.backends.cuda.matmul.allow_tf32,
            "cudnn": torch.backends.cudnn.allow_tf32,
        }
    return info


# ------------------------------------------------------------------------------------------------- images
def find_coco() -> Path | None:
    for root in DATA_CANDIDATES:
        images = root / "coco-train-mini" / "images"
        if images.is_dir() and any(images.glob("*.jpg")):
            return images
    return None


def load_images(count: int) -> tuple[list[np.ndarray], str]:
    """``count`` uint8 RGB images of ``SIZE_HW`` (COCO-mini if found, else synthetic scenes)."""
    coco = find_coco()
    height, width = SIZE_HW
    images = []
    if coco is not None:
        paths = sorted(coco.glob("*.jpg"))
        for i in range(count):
            bgr = cv2.imread(str(paths[i % len(paths)]), cv2.IMREAD_COLOR)
            images.append(np.ascontiguousarray(cv2.resize(bgr, (width, height))[:, :, ::-1]))
        return images, f"COCO-mini ({coco}), {min(count, len(paths))} distinct, resized to {height}x{width}"
    from workers.corpus.synth import SynthConfig, generate_sample

    config = SynthConfig()
    for i in range(count):
        rgb = generate_sample(0, i, config).image_rgb
        images.append(np.ascontiguousarray(cv2.resize(rgb, (width, height), interpolation=cv2.INTER_LINEAR)))
    return images, f"synthetic scenes (workers.corpus.synth, seed 0), resized to {height}x{width}"


def encode(images: list[np.ndarray]) -> list[bytes]:
    params = [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY]
    return [cv2.imencode(".jpg", im[:, :, ::-1], params)[1].tobytes() for im in images]


# ----------------------------------------------------------------------------------------------- detector
def build_detector(config_name: str, device: torch.device) -> Any:
    from workers.detect.config import BoxSelectionConfig, detector_config
    from workers.detect.detector import RegionDetector

    return RegionDetector(
        detector_config(config_name),
        BoxSelectionConfig(mode="fixed", num_boxes=NUM_BOXES),
        device=str(device),
    )


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def throughput(
    detector: Any, images: list[np.ndarray], batch: int, args: argparse.Namespace
) -> dict[str, Any]:
    """images/s of ``extract`` on ``batch`` images (warm-up, then until ``--point-s`` or ``--max-iters``)."""
    chunk = [images[i % len(images)] for i in range(batch)]
    for _ in range(args.warmup):
        detector.extract(chunk)
    sync(detector.device)
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < args.min_iters or (
        len(times) < args.max_iters and time.perf_counter() - started < args.point_s
    ):
        t0 = time.perf_counter()
        detector.extract(chunk)  # outputs are copied to host numpy: synchronises
        times.append(time.perf_counter() - t0)
    median = float(np.median(times))
    out: dict[str, Any] = {
        "batch": batch,
        "iters": len(times),
        "seconds": times,
        "images_per_s": batch / median,
    }
    if detector.device.type == "cuda":
        out["max_memory_gib"] = round(torch.cuda.max_memory_allocated(detector.device) / 2**30, 2)
    return out


# ------------------------------------------------------------------------------------------------ pipeline
def pipeline(detector: Any, jpegs: list[bytes], batch: int, threads: int, store: Path) -> dict[str, Any]:
    """Decode (thread pool) → detector → rows → Arrow part (writer thread); images/s end to end."""
    from schemas.manifest import ShardAccounting
    from schemas.store import row_schema
    from workers.read.decode import decode_image
    from workers.read.reader import DecodedSample
    from workers.read.tokenizer import TokenizedCaptions
    from workers.rows import ReadSample, build_rows
    from workers.store import PartWriter, StoreLocation

    location = StoreLocation.parse(str(store))
    writer = PartWriter(location, "gpu-bench", detector.feature_dim, "bench")
    schema = row_schema(detector.feature_dim)
    tokens = TokenizedCaptions(input_ids=[], truncated=[])
    pending: queue.Queue = queue.Queue(maxsize=4)

    def write_loop() -> None:
        while (item := pending.get()) is not None:
            start, images, outputs = item
            kept = [
                (
                    ReadSample(
                        DecodedSample(f"img{start + i:06d}", "gpu-bench", None, im, im.shape[1], im.shape[0],
                                      (), None, (f"img{start + i:06d}.jpg",)),
                        tokens,
                    ),
                    out,
                )
                for i, (im, out) in enumerate(zip(images, outputs, strict=True))
            ]  # fmt: skip
            writer.add_rows(build_rows(kept, schema, "detector", False))

    def decode(data: bytes) -> np.ndarray:
        return decode_image(data, 50_000_000)

    started = time.perf_counter()
    write_thread = threading.Thread(target=write_loop)
    write_thread.start()
    with ThreadPoolExecutor(threads) as pool:
        chunks = [jpegs[i : i + batch] for i in range(0, len(jpegs), batch)]
        ahead = [pool.map(decode, chunks[0])] if chunks else []
        for index in range(len(chunks)):
            if index + 1 < len(chunks):
                ahead.append(pool.map(decode, chunks[index + 1]))  # decode the next batch meanwhile
            images = list(ahead[index])
            ahead[index] = None  # type: ignore[call-overload]
            pending.put((index * batch, images, detector.extract(images)))
    pending.put(None)
    write_thread.join()
    n = len(jpegs)
    writer.commit(ShardAccounting(n, n, 0, {}, n, n, 0))
    seconds = time.perf_counter() - started
    return {
        "images": n,
        "batch": batch,
        "decode_threads": threads,
        "seconds": seconds,
        "images_per_s": n / seconds,
    }


# ---------------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--cpu", action="store_true", help="run on the CPU: tiny config, 2 images, batch 1, 2"
    )
    parser.add_argument(
        "--config", default=None, help="detector config (default butd-r101-c4; tiny with --cpu)"
    )
    parser.add_argument("--batch-sizes", default="1,8,32")
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--images", type=int, default=64, help="distinct images in the pool")
    parser.add_argument("--accuracy-images", type=int, default=8)
    parser.add_argument("--pipeline-images", type=int, default=512)
    parser.add_argument("--decode-threads", type=int, default=min(16, os.cpu_count() or 1))
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--min-iters", type=int, default=3)
    parser.add_argument("--max-iters", type=int, default=30)
    parser.add_argument("--point-s", type=float, default=20.0, help="seconds cap per throughput point")
    parser.add_argument("--budget-s", type=float, default=420.0, help="skip later phases past this")
    parser.add_argument(
        "--out", type=Path, default=None, help="results folder (default $OUT or bench/results)"
    )
    args = parser.parse_args(argv)
    if args.cpu:
        args.config = args.config or "tiny"
        args.batch_sizes, args.images, args.accuracy_images, args.pipeline_images = "1,2", 2, 2, 4
        args.warmup, args.min_iters, args.max_iters, args.point_s = 1, 1, 2, 5.0
        args.decode_threads = 2
    args.config = args.config or "butd-r101-c4"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    imports = import_workers()
    device = torch.device("cpu" if args.cpu or not torch.cuda.is_available() else "cuda")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # one input size per batch size: pick the fastest kernels
    out_dir = args.out or Path(os.environ.get("OUT") or REPO / "bench" / "results")
    result: dict[str, Any] = {
        "benchmark": "gpu_bench",
        "environment": environment(device),
        "imports": imports,
        "parameters": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "goal_bf16_images_per_s": GOAL_BF16_IMAGES_PER_S,
        "skipped": [],
    }

    def over_budget(phase: str) -> bool:
        if time.perf_counter() - started > args.budget_s:
            result["skipped"].append(phase)
            print(f"skipped {phase}: past the {args.budget_s:.0f} s budget", flush=True)
            return True
        return False

    def save() -> Path:
        result["wall_seconds"] = time.perf_counter() - started
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / "gpu_bench.json"
        path.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
        return path

    images, source = load_images(args.images)
    result["images"] = source
    t0 = time.perf_counter()
    detector = build_detector(args.config, device)
    result["detector"] = {"config": args.config, "weights": detector.weights_digest, "build_s": time.perf_counter() - t0,
                          "box_mode": f"fixed {NUM_BOXES}"}  # fmt: skip
    print(
        f"{args.config} on {device} ({result['environment'].get('gpu', 'cpu')}), images: {source}", flush=True
    )
    result["flops_per_image"] = flops_per_image(detector, images[0])
    save()

    result["throughput"] = {}
    for dtype in args.dtypes.split(","):
        for batch in (int(b) for b in args.batch_sizes.split(",")):
            if over_budget(f"throughput {dtype} batch {batch}"):
                continue
            with precision(detector, dtype):
                point = throughput(detector, images, batch, args)
            result["throughput"][f"{dtype}_batch_{batch}"] = point
            print(
                f"{dtype} batch {batch:>3}: {point['images_per_s']:8.2f} images/s ({point['iters']} iters)",
                flush=True,
            )
            save()

    if not over_budget("accuracy"):
        result["autocast_vs_fp32"] = acc = accuracy(detector, images[: args.accuracy_images])
        for dtype in ("bf16", "fp16"):
            fixed = acc[dtype]["features_at_fixed_boxes"]
            print(f"{dtype} vs fp32: proposals matched at IoU 0.7 {acc[dtype]['rpn_proposals']['matched_at_iou_0.7']:.3f}, "
                  f"features at fixed boxes relative error median {fixed['median']:.2e} max {fixed['max']:.2e} "
                  f"(tolerance {fixed['tolerance']:g}: {'within' if fixed['within_tolerance'] else 'EXCEEDED'})", flush=True)  # fmt: skip
        save()

    best_batch = max(int(b) for b in args.batch_sizes.split(","))
    pipe_dtype = "bf16" if "bf16" in args.dtypes.split(",") else args.dtypes.split(",")[0]
    if not over_budget("pipeline"):
        import tempfile

        jpegs = encode([images[i % len(images)] for i in range(args.pipeline_images)])
        with tempfile.TemporaryDirectory(prefix="rf-gpu-bench-") as tmp, precision(detector, pipe_dtype):
            run = pipeline(detector, jpegs, best_batch, args.decode_threads, Path(tmp) / "store")
        alone = result["throughput"].get(f"{pipe_dtype}_batch_{best_batch}", {}).get("images_per_s")
        run["dtype"] = pipe_dtype
        run["efficiency_vs_detector_alone"] = run["images_per_s"] / alone if alone else None
        result["pipeline"] = run
        print(f"pipeline ({pipe_dtype}, batch {best_batch}, {args.decode_threads} decode threads): "
              f"{run['images_per_s']:.2f} images/s, efficiency {run['efficiency_vs_detector_alone'] or float('nan'):.3f}")  # fmt: skip

    bf16 = [p["images_per_s"] for k, p in result["throughput"].items() if k.startswith("bf16")]
    best = max(bf16) if bf16 else float("nan")
    result["bf16_best_images_per_s"] = best
    path = save()
    print(f"results: {path}")
    verdict = "met" if best >= GOAL_BF16_IMAGES_PER_S else "NOT met"
    print(f"{args.config} bf16 images/s (best batch) on {device}: {best:.2f} "
          f"(goal >= {GOAL_BF16_IMAGES_PER_S:g} on an H200: {verdict})")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
