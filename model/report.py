"""Evaluation report: ``report.json`` (everything), ``report.md`` (tables) and PNG plots (matplotlib, Agg).

Plots: ``training_loss.png`` (per-task training loss against the optimizer step, from ``RUN/losses.jsonl``) and
``recall_at_k.png`` (recall@1/5/10 in both retrieval directions, with the chance level of a random ranking).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from schemas.manifest import canonical_json

REPORT_JSON = "report.json"
REPORT_MD = "report.md"
LOSS_PLOT = "training_loss.png"
RECALL_PLOT = "recall_at_k.png"


def read_losses(path: Path) -> list[dict[str, Any]]:
    """The records of a ``losses.jsonl`` (empty when the file is absent)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_report(out_dir: Path, report: dict[str, Any], losses: list[dict[str, Any]]) -> list[Path]:
    """Write report.json, report.md and the plots into ``out_dir``; returns the written paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / REPORT_JSON, out_dir / REPORT_MD]
    written[0].write_bytes(canonical_json(report))
    written[1].write_text(markdown(report))
    if losses:
        written.append(plot_losses(losses, out_dir / LOSS_PLOT))
    retrieval = report.get("metrics", {}).get("retrieval")
    if retrieval:
        written.append(plot_recall(retrieval, out_dir / RECALL_PLOT))
    return written


# ----------------------------------------------------------------------------------------------- markdown
def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}"


def markdown(report: dict[str, Any]) -> str:
    """The report as Markdown: context, then one section per metric family."""
    lines = [f"# regionflow evaluation: {report['run']}", ""]
    lines += [f"- {note}" for note in report.get("notes", [])]
    split = report.get("split", {})
    lines += ["", f"Held-out split: {split.get('images', '?')} images, {split.get('captions', '?')} captions "
              f"(holdout fraction {split.get('holdout_fraction')}, rule `{split.get('hash_rule')}`).", ""]  # fmt: skip
    metrics = report.get("metrics", {})
    for name, render in (
        ("retrieval", _md_retrieval),
        ("matching", _md_matching),
        ("vqa", _md_vqa),
        ("caption", _md_caption),
    ):
        if name in metrics:
            lines += render(metrics[name]) + [""]
    if report.get("efficiency"):
        lines += _md_efficiency(report["efficiency"])
    return "\n".join(lines) + "\n"


def _md_retrieval(m: dict[str, Any]) -> list[str]:
    rows = ["## Retrieval (matching logits)", "", f"Scoring: {m['scoring']}", ""]
    rows += ["| direction | R@1 | R@5 | R@10 | median rank | chance R@1 | chance R@10 | queries |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for direction in ("text_to_image", "image_to_text"):
        d = m[direction]
        r, c = d["recall"], d["chance_recall"]
        rows.append(
            f"| {direction} | {_pct(r['1'])} | {_pct(r['5'])} | {_pct(r['10'])} | {d['median_rank']:g} "
            f"| {_pct(c['1'])} | {_pct(c['10'])} | {d['num_queries']} |"
        )
    return rows


def _md_matching(m: dict[str, Any]) -> list[str]:
    return [
        "## Image–text matching",
        "",
        f"Accuracy {_pct(m['accuracy'])}% (positives {_pct(m['positive_accuracy'])}%, negatives "
        f"{_pct(m['negative_accuracy'])}%) over {m['num_pairs']} pairs; chance {_pct(m['chance'])}%.",
    ]


def _md_vqa(m: dict[str, Any]) -> list[str]:
    rows = [
        "## VQA (official accuracy)",
        "",
        f"Model {_pct(m['model']['overall'])}% vs majority-answer baseline {_pct(m['baseline']['overall'])}% "
        f"over {m['model']['num_questions']} held-out questions.",
        "",
        "| question type | model | majority baseline |",
        "|---|---|---|",
    ]
    for qtype, acc in m["model"]["per_question_type"].items():
        rows.append(f"| {qtype} | {_pct(acc)} | {_pct(m['baseline']['per_question_type'].get(qtype))} |")
    return rows


def _md_caption(m: dict[str, Any]) -> list[str]:
    return [
        "## Captioning",
        "",
        f"BLEU-4 {m['bleu4']:.4f}, CIDEr {m['cider']:.4f} on {m['num_images']} images "
        f"(tokeniser: {m['tokenizer']}; decoding: {m.get('decoding', '?')}).",
    ]


def _md_efficiency(eff: dict[str, Any]) -> list[str]:
    rows = ["## Efficiency", "", "| phase | samples/s | p50 ms | p95 ms | peak memory MiB | device |", "|---|---|---|---|---|---|"]  # fmt: skip
    for phase, e in eff.items():
        rows.append(
            f"| {phase} | {e['samples_per_s']:.1f} | {e['latency_p50_ms']:.2f} | {e['latency_p95_ms']:.2f} "
            f"| {e['peak_memory_bytes'] / 2**20:.0f} ({e['peak_memory_kind']}) | {e['device']} |"
        )
    return rows


# ------------------------------------------------------------------------------------------------- plots
def plot_losses(losses: list[dict[str, Any]], path: Path) -> Path:
    """Training loss per task against the optimizer step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for task in sorted({r["task"] for r in losses}):
        points = [(r["step"], r["loss"]) for r in losses if r["task"] == task]
        ax.plot([p[0] for p in points], [p[1] for p in points], label=task, linewidth=1)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (mean over ranks)")
    ax.set_title("Training loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_recall(retrieval: dict[str, Any], path: Path) -> Path:
    """Grouped bars of recall@K per direction, chance levels as markers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = ["1", "5", "10"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for j, direction in enumerate(("text_to_image", "image_to_text")):
        d = retrieval[direction]
        xs = [i + 0.35 * j for i in range(len(ks))]
        ax.bar(xs, [d["recall"][k] for k in ks], width=0.35, label=direction.replace("_", " "))
        ax.scatter(xs, [d["chance_recall"][k] for k in ks], color="black", marker="_", s=200, zorder=3)
    ax.set_xticks([i + 0.175 for i in range(len(ks))], [f"R@{k}" for k in ks])
    ax.set_ylim(0, 1)
    ax.set_ylabel("recall (black: chance)")
    ax.set_title("Held-out retrieval")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
