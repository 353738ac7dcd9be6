"""The demo's results: what the corpus holds (captions, held-out keys) and the table of the evaluation reports.

``collect`` reads the three ``evaluate`` reports (the model and its two controls), ``results_markdown`` writes
the table (recall@1/5/10 with candidates and chance, VQA accuracy beside the majority baseline, BLEU-4,
CIDEr, the duplicate-caption share, the stage times) and ``target_lines`` states each target as met or missed.
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path
from typing import Any

from pipelines.demo_stages import TEXT_STREAMS, DemoError, DemoPaths, box_flags

TARGETS = {"text_to_image_recall_at_1": 0.8, "vqa_accuracy": 0.9, "wall_time_s": 15 * 60}
TARGET_CANDIDATES = 100
CONTROLS = (  # the evaluate controls: (report name, label in the table)
    ("shuffle_visual", "control: shuffled visual rows"),
    ("shuffle_features", "control: shuffled features"),
)


# ------------------------------------------------------------------------------------------- the corpus
def corpus_captions(corpus: Path) -> list[tuple[str, str, list[str]]]:
    """(shard id, key, captions) of every sample in the corpus shards, read from their ``KEY.json`` members."""
    out = []
    for shard in sorted(corpus.glob("synth-*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar:
                data = tar.extractfile(member) if member.isfile() else None
                if data is not None and member.name.endswith(".json"):
                    record = json.loads(data.read())
                    out.append(
                        (shard.name.split(".", 1)[0], member.name[: -len(".json")], record["captions"])
                    )
    return out


def caption_duplicates(corpus: Path, holdout_fraction: float) -> dict[str, float]:
    """Duplicate-caption share over the whole corpus and over the held-out images (the retrieval candidates)."""
    from model.data import is_heldout
    from workers.corpus.synth import duplicate_caption_share

    samples = corpus_captions(corpus)
    held = [c for shard, key, c in samples if is_heldout(shard, key, holdout_fraction)]
    return {
        "all_images": duplicate_caption_share(c for _, _, c in samples),
        "heldout_images": duplicate_caption_share(held),
        "heldout_count": float(len(held)),
    }


def heldout_keys(corpus: Path, holdout_fraction: float, count: int) -> list[tuple[str, str]]:
    """The first ``count`` held-out (shard id, key) pairs in corpus order."""
    from model.data import is_heldout

    held = [(s, k) for s, k, _ in corpus_captions(corpus) if is_heldout(s, k, holdout_fraction)]
    return held[:count]


# ------------------------------------------------------------------------------------------- the results
def _report(paths: DemoPaths, control: str) -> dict[str, Any]:
    path = paths.eval_dir(control) / "report.json"
    if not path.exists():
        raise DemoError(f"evaluate wrote no {path}")
    return json.loads(path.read_text())


def collect(paths: DemoPaths) -> dict[str, Any]:
    """The metrics the table shows, from the three evaluation reports."""
    out: dict[str, Any] = {}
    for control in ("none", "shuffle_visual", "shuffle_features"):
        metrics = _report(paths, control)["metrics"]
        entry: dict[str, Any] = {}
        if "retrieval" in metrics:
            entry["retrieval"] = {
                d: {
                    "recall": metrics["retrieval"][d]["recall"],
                    "chance_recall": metrics["retrieval"][d]["chance_recall"],
                    "num_candidates": metrics["retrieval"][d]["num_candidates"],
                    "num_queries": metrics["retrieval"][d]["num_queries"],
                    "median_rank": metrics["retrieval"][d]["median_rank"],
                }
                for d in ("text_to_image", "image_to_text")
            }
            entry["retrieval"]["scoring"] = metrics["retrieval"]["scoring"]
        if "matching" in metrics:
            entry["matching_accuracy"] = metrics["matching"]["accuracy"]
        if "vqa" in metrics:
            vqa = metrics["vqa"]
            entry["vqa"] = {
                "accuracy": vqa["model"]["overall"],
                "num_questions": vqa["model"]["num_questions"],
                "per_question_type": vqa["model"]["per_question_type"],
                "majority_baseline": vqa["baseline"]["overall"],
                "baseline_kind": vqa["baseline"].get("kind", ""),
                "baseline_per_question_type": vqa["baseline"].get("per_question_type", {}),
            }
        if "caption" in metrics:
            entry["caption"] = {
                k: metrics["caption"][k] for k in ("bleu4", "cider", "num_images", "decoding")
            }
            entry["caption"]["examples"] = metrics["caption"].get("examples", [])[:3]
        out[control] = entry
    return out


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _retrieval_rows(label: str, entry: dict[str, Any]) -> list[str]:
    rows = []
    for direction in ("text_to_image", "image_to_text"):
        d = entry["retrieval"][direction]
        r, c = d["recall"], d["chance_recall"]
        rows.append(
            f"| {label} | {direction.replace('_', ' ')} | {_pct(r['1'])} | {_pct(r['5'])} | {_pct(r['10'])} "
            f"| {d['num_candidates']} | {_pct(c['1'])} / {_pct(c['5'])} / {_pct(c['10'])} |"
        )
    return rows


def _weighted_tasks(config: dict[str, Any]) -> str:
    weights = config.get("task_weights") or [1] * len(config["tasks"])
    return ", ".join(f"{t} ({w})" for t, w in zip(config["tasks"], weights, strict=True)) + " steps per cycle"


def _context_lines(summary: dict[str, Any]) -> list[str]:
    """The title and one paragraph: corpus, held-out images, features, model, steps, tasks."""
    config = summary["config"]
    return [
        "# regionflow demo results",
        "",
        f"Corpus: {config['images']} synthetic images (seed {config['seed']}), "
        f"{summary['heldout_images']} held out by key hash (fraction {config['holdout_fraction']}). "
        f"Features: `extract --config tiny {' '.join(box_flags(config.get('boxes', 'given'), config.get('num_boxes', 0)))}` "
        f"(random-init detector, {'true boxes' if config.get('boxes', 'given') == 'given' else 'its own boxes'}). "
        f"Model: `--model-config {config['model_config']}` (text stream: {TEXT_STREAMS[config['model_config']]}), "
        f"{config['max_steps']} steps of batch {config['batch_size']} per worker, {config['workers']} Ray Train "
        f"workers on CPU, tasks {_weighted_tasks(config)}.",
        "",
    ]


def _retrieval_section(results: dict[str, Any]) -> list[str]:
    """Recall@1/5/10 of the model and each control, both directions, and how retrieval was scored."""
    lines = [
        "## Retrieval (held-out images; recall@1 / @5 / @10)",
        "",
        "| run | direction | R@1 | R@5 | R@10 | candidates | chance @1 / @5 / @10 |",
        "|---|---|---|---|---|---|---|",
    ]
    for control, label in (("none", "model"), *CONTROLS):
        if "retrieval" in results[control]:
            lines += _retrieval_rows(label, results[control])
    return lines + ["", f"Scoring: {results['none']['retrieval']['scoring']}", ""]


def _vqa_section(results: dict[str, Any]) -> list[str]:
    """VQA accuracy of the model, the baseline and the controls, then per question type (none without VQA)."""
    main = results["none"]
    if "vqa" not in main:
        return []
    lines = ["## VQA (official accuracy, held-out questions)", "", "| run | accuracy | questions |",
             "|---|---|---|"]  # fmt: skip
    lines.append(f"| model | {_pct(main['vqa']['accuracy'])} | {main['vqa']['num_questions']} |")
    lines.append(
        f"| baseline: {main['vqa']['baseline_kind'] or 'majority answer'} "
        f"| {_pct(main['vqa']['majority_baseline'])} | {main['vqa']['num_questions']} |"
    )
    for control, label in CONTROLS:
        if "vqa" in results[control]:
            lines.append(f"| {label} | {_pct(results[control]['vqa']['accuracy'])} | |")
    lines += ["", "| question type | model | majority baseline |", "|---|---|---|"]
    for qtype, acc in main["vqa"]["per_question_type"].items():
        base = main["vqa"]["baseline_per_question_type"].get(qtype)
        lines.append(f"| {qtype} | {_pct(acc)} | {_pct(base)} |")
    return lines + [""]


def _caption_section(main: dict[str, Any]) -> list[str]:
    """BLEU-4 and CIDEr of the model with a few generated captions (none without captioning)."""
    if "caption" not in main:
        return []
    cap = main["caption"]
    lines = ["## Captioning (held-out images)", "",
             f"BLEU-4 {cap['bleu4']:.3f}, CIDEr {cap['cider']:.3f} on {cap['num_images']} images "
             f"({cap['decoding']} decoding).", ""]  # fmt: skip
    for example in cap.get("examples", []):
        lines.append(f"- generated: “{example['generated']}” — reference: “{example['reference']}”")
    return lines + [""]


def _closing_lines(summary: dict[str, Any]) -> list[str]:
    """The duplicate-caption share, the targets, the stage times, the reports and the pictures."""
    dup = summary["duplicate_captions"]
    lines = [
        "## Corpus",
        "",
        f"Duplicate-caption share (captions whose exact text also captions another image): "
        f"{_pct(dup['all_images'])} of all captions, {_pct(dup['heldout_images'])} among the held-out images.",
        "",
        "## Targets",
        "",
    ]
    lines += [f"- {line}" for line in summary["targets"]]
    lines += ["", "## Stages (wall time)", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {s['name']} | {s['seconds']:.1f} |" for s in summary["stages"]]
    lines += [f"| **total** | **{summary['wall_time_s']:.1f}** |", ""]
    return lines + [
        "Reports: " + ", ".join(summary["reports"]),
        "",
        "Pictures: "
        + ", ".join(summary["pictures"])
        + " (boxes labelled with the random-init detector's class id "
        "and confidence: without weights they carry no meaning; training progress is in run/losses.jsonl)",
        "",
    ]


def results_markdown(summary: dict[str, Any]) -> str:
    """The results table and context lines as Markdown."""
    results = summary["results"]
    lines = _context_lines(summary) + _retrieval_section(results) + _vqa_section(results)
    lines += _caption_section(results["none"]) + _closing_lines(summary)
    return "\n".join(lines)


def target_lines(results: dict[str, Any], wall_time_s: float) -> list[str]:
    """One line per issue target: measured value, target, met or missed."""
    main = results["none"]
    t2i = main["retrieval"]["text_to_image"]
    r1, candidates = t2i["recall"]["1"], t2i["num_candidates"]
    lines = [
        f"text-to-image recall@1 {_pct(r1)} with {candidates} candidate images (target >= "
        f"{_pct(TARGETS['text_to_image_recall_at_1'])} with >= {TARGET_CANDIDATES}): "
        + (
            "met"
            if r1 >= TARGETS["text_to_image_recall_at_1"] and candidates >= TARGET_CANDIDATES
            else "MISSED"
        ),
    ]
    if "vqa" in main:
        acc = main["vqa"]["accuracy"]
        lines.append(
            f"VQA accuracy {_pct(acc)} (target >= {_pct(TARGETS['vqa_accuracy'])}): "
            + ("met" if acc >= TARGETS["vqa_accuracy"] else "MISSED")
        )
    lines.append(
        f"wall time {wall_time_s / 60:.1f} min from synth to the last picture (target <= "
        f"{TARGETS['wall_time_s'] / 60:.0f} min on 2 CPU cores; `make setup` not included): "
        + ("met" if wall_time_s <= TARGETS["wall_time_s"] else "MISSED")
    )
    return lines
