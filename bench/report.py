"""The README performance table, generated from ``bench/results/*.json``.

Prints the table (markdown); ``--write README.md`` replaces the block between ``<!-- perf-table:start -->`` and
``<!-- perf-table:end -->`` in that file (the markers must exist). Every ratio is stated so that bigger is better;
the load average says how busy the machine was (the development machine is shared; ratios are taken with the
two sides alternating in one run, absolute times are not comparable across rows).

    python bench/report.py [--results bench/results] [--write README.md]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
START, END = "<!-- perf-table:start -->", "<!-- perf-table:end -->"
HEADER = (
    "| benchmark | ratio (bigger is better) | goal | met | what was measured | machine, load |\n"
    "|---|---|---|---|---|---|"
)


def _f(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _load(result: dict[str, Any]) -> str:
    machine = result.get("machine") or result.get("environment") or {}
    load = machine.get("load_average_1_5_15", [machine.get("load_average_1m")])[0]
    where = machine.get("gpu") or f"{machine.get('cpu_count', '?')} CPU cores"
    return f"{where}, load {_f(load, 1)}" if load is not None else where


def _coattention(r: dict[str, Any]) -> tuple[float, float | None, str]:
    core, block = r["attention_core"], r["coattention_block"]
    text = (
        f"co-attention core fwd+bwd, SDPA vs per-head loop (batch {r['parameters']['batch']}); "
        f"whole Co-TRM block {block['ratio']:.2f}x; max diff {core['max_abs_diff_out']:.1e}"
    )
    return core["ratio"], r["parameters"].get("goal_core_ratio"), text


def _efficiency(r: dict[str, Any]) -> tuple[float, float | None, str]:
    p = r["parameters"]
    ours = r.get("extract_images_per_s_median") or r.get("extract", {}).get("images_per_s")
    alone = r.get("detector_alone_images_per_s_median") or r.get("detector_alone_images_per_s_mean")
    images = p.get("decoded_images") or p.get("images")
    text = (
        f"`extract` images/s / detector alone, {p['config']}, {images} images, "
        f"{_f(ours)} vs {_f(alone)} images/s"
    )
    return r["ratio"], r.get("goal"), text


def _batching(r: dict[str, Any]) -> tuple[float, float | None, str]:
    p, ips = r["parameters"], r["images_per_s"]
    text = (
        f"detector {p['config']} CPU, batch {p['images']} / batch 1 images/s ({ips['batch_n']:.2f} / "
        f"{ips['batch_1']:.2f}), max feature diff {r['max_abs_feature_diff_batch_n_vs_1']:g}"
    )
    if "true_batch_ratio" in r:
        text += f"; forced one-forward batches {r['true_batch_ratio']:.2f}x"
    return r["ratio"], r.get("goal"), text


def _store_reads(r: dict[str, Any]) -> tuple[float, float | None, str]:
    rates, dim = r["reads_per_s"], r["features"]["feature_dim"]
    text = (
        f"random reads [36, {dim}] float32 + boxes: ours {rates['ours']:.0f}/s vs ViLBERT LMDB "
        f"{rates['vilbert_lmdb']:.0f}/s, UNITER LMDB {rates['uniter_lmdb']:.0f}/s (ratio vs the faster)"
    )
    return r["ratio"], r.get("goal"), text


def _memory(r: dict[str, Any]) -> tuple[float, float | None, str]:
    big = next(k for k in r if k.startswith("corpus_") and k != "corpus_1x")
    small_mib = r["corpus_1x"]["peak_driver_plus_workers_bytes"] / 2**20
    big_mib = r[big]["peak_driver_plus_workers_bytes"] / 2**20
    text = (
        f"`extract --config tiny` peak PSS driver + Ray workers, {r['corpus_1x']['rows']} rows {small_mib:.0f} MiB "
        f"vs {r[big]['rows']} rows {big_mib:.0f} MiB (1x / {big.split('_')[1]})"
    )
    return r["ratio"], r.get("goal"), text


def _train_memory(r: dict[str, Any]) -> tuple[float, float | None, str]:
    small, big = (r["stores"][k] for k in sorted(r["stores"], key=lambda k: int(k.rstrip("x"))))
    mib = 2**20
    text = (
        f"train peak PSS of one rank, {small['rows']} vs {big['rows']} butd-size rows (64-row batches): "
        f"{small['train']['peak_rank_pss_bytes'] / mib:.0f} vs {big['train']['peak_rank_pss_bytes'] / mib:.0f} MiB; "
        f"driver 1x/8x {r['driver_ratio']:.2f}; opening a store adds "
        f"{100 * r['open_anonymous_fraction']:.2f}% of its feature bytes in anonymous memory (goal <= 5%)"
    )
    return r["ratio"], r.get("goal"), text


def _train(r: dict[str, Any]) -> tuple[float, float | None, str]:
    s = r["samples_per_s"]
    text = (
        f"Ray Train samples/s, 2 workers / 1 worker, tiny model, same cores "
        f"({s['2_workers']:.1f} / {s['1_workers']:.1f})"
    )
    return r["ratio"], r.get("goal"), text


def _gpu(r: dict[str, Any]) -> tuple[float, float | None, str]:
    goal = r["goal_bf16_images_per_s"]
    best = r["bf16_best_images_per_s"]
    device = r.get("environment", {}).get("device", "?")
    text = (
        f"{r['detector']['config']} on {device}: bf16 images/s at the best batch / goal {goal:g} images/s "
        f"({best:.1f} images/s)"
    )
    acc = r.get("autocast_vs_fp32", {}).get("bf16") or r.get("bf16_vs_fp32")  # the latter: older results
    if acc:
        text += (
            f"; bf16 vs fp32: proposals matched at IoU 0.7 {acc['rpn_proposals']['matched_at_iou_0.7']:.3f}, "
            f"feature rel. error {acc['features_at_fixed_boxes']['median']:.1e}"
        )
    return best / goal, 1.0, text


def _driver_load(r: dict[str, Any]) -> tuple[float, float | None, str]:
    ips = {run["actors"]: run["images_per_s"] for run in r["runs"]}
    text = (
        f"`extract`, stand-in detector [36, 2048] rows, 3-node Cluster: images/s 4 / 1 actors "
        f"({ips[4]:.1f} / {ips[1]:.1f}; 2 actors {ips[2]:.1f}); bytes to the driver "
        f"{r['driver_bytes_per_image']:.0f} B/image (goal <= {r['goal_driver_bytes_per_image']} B; first "
        f"design {r['first_design_driver_bytes_per_image'] / 1000:.0f} KB); driver CPU "
        f"{r['driver_cpu_s_per_1000_images']:.2f} s per 1000 images"
    )
    return r["ratio"], r.get("goal"), text


ROWS: dict[str, Callable[[dict[str, Any]], tuple[float, float | None, str]]] = {
    "extract_efficiency": _efficiency,
    "driver_load": _driver_load,
    "batching": _batching,
    "store_reads": _store_reads,
    "coattention": _coattention,
    "memory": _memory,
    "train_memory": _train_memory,
    "train_throughput": _train,
    "gpu_bench": _gpu,
}


def row(name: str, result: dict[str, Any]) -> str | None:
    kind = result.get("benchmark", name)
    handler = ROWS.get(kind) or next((h for k, h in ROWS.items() if name.startswith(k)), None)
    if handler is None:
        return None
    ratio, goal, text = handler(result)
    met = "—" if goal is None else ("yes" if ratio >= goal else "**no**")
    goal_text = "report" if goal is None else f">= {goal:g}"
    return f"| {name} | {ratio:.2f} | {goal_text} | {met} | {text} | {_load(result)} |"


def table(results_dir: Path) -> str:
    order = list(ROWS)
    paths = sorted(
        results_dir.glob("*.json"),
        key=lambda p: (next((i for i, k in enumerate(order) if p.stem.startswith(k)), len(order)), p.stem),
    )
    lines = [HEADER]
    for path in paths:
        line = row(path.stem, json.loads(path.read_text()))
        if line is not None:
            lines.append(line)
    return "\n".join(lines)


def write_into(readme: Path, text: str) -> None:
    """Replace the text between the markers of ``readme``. Raises ValueError if they are missing."""
    content = readme.read_text()
    start, end = content.find(START), content.find(END)
    if start < 0 or end < start:
        raise ValueError(f"{readme} lacks the {START} ... {END} markers")
    readme.write_text(content[: start + len(START)] + "\n" + text + "\n" + content[end:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--write", type=Path, default=None, help="README to update between the markers")
    args = parser.parse_args(argv)
    text = table(args.results)
    print(text)
    if args.write is not None:
        try:
            write_into(args.write, text)
        except ValueError as exc:
            print(f"report: {exc}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
