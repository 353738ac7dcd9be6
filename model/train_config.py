"""TrainConfig: one training run's settings, validated on construction (before any Ray runtime starts).

Saved in ``RUN/run.json`` (``train``) and handed whole to every rank as a dict (`TrainConfig.to_dict`).
The task schedule (`task_schedule`) and the learning-rate schedule (`lr_factor`) are functions of it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from model.data import DEFAULT_HOLDOUT_FRACTION, check_holdout_fraction
from model.vqa import DEFAULT_MAX_QUESTION_TOKENS, DEFAULT_MIN_ANSWER_COUNT

TASK_SCHEDULE = (
    "weighted round-robin: optimizer step s trains schedule[s % len(schedule)], each task listed as often as"
    " its weight (round r lists the tasks whose weight exceeds r), each task with its own data stream"
)
DEFAULT_KEEP_CHECKPOINTS = 3

# smallest value of each integer field; the messages name the ``train`` flag of the field
INT_MINIMUMS = {
    "workers": 1,
    "batch_size": 1,
    "grad_accum": 1,
    "max_steps": 0,  # 0 only until the driver fixes it from --epochs (`Trainer` needs >= 1)
    "stop_after_steps": 0,
    "checkpoint_every": 1,
    "keep_checkpoints": 1,
    "warmup_steps": 0,
    "threads": 0,
    "max_failures": 0,
    "vqa_min_answer_count": 1,
    "max_question_tokens": 3,
}
POSITIVE_FLOATS = ("lr", "max_grad_norm")
NON_NEGATIVE_FLOATS = ("weight_decay",)


class TrainInputError(ValueError):
    """Arguments, store or run directory that cannot be trained on (the message says why, naming the flag)."""


def flag(name: str) -> str:
    """``batch_size`` -> ``--batch-size``."""
    return "--" + name.replace("_", "-")


def check_ranges(
    values: Any,
    int_minimums: dict[str, int],
    positive_floats: tuple[str, ...],
    non_negative_floats: tuple[str, ...],
) -> None:
    """The one range rule of train's numeric flags, for `TrainConfig` fields and CLI-only flags alike.

    ``values`` is any object with those attributes (a config or an ``argparse.Namespace``). Raises
    `TrainInputError` naming the first flag below its integer minimum, or a float that is NaN, infinite, or
    not > 0 (``positive_floats``) / >= 0 (``non_negative_floats``).
    """
    for name, minimum in int_minimums.items():
        if getattr(values, name) < minimum:
            raise TrainInputError(f"{flag(name)} must be >= {minimum}, got {getattr(values, name)}")
    for name in positive_floats + non_negative_floats:
        value = getattr(values, name)
        positive = name in positive_floats
        if not ((value > 0 if positive else value >= 0) and math.isfinite(value)):
            raise TrainInputError(
                f"{flag(name)} must be a finite number {'> 0' if positive else '>= 0'}, got {value}"
            )


@dataclass(frozen=True)
class TrainConfig:
    """One training run (saved in ``run.json``; passed whole to every rank as a dict).

    Attributes:
        store, out: store location (absolute path or URL) and absolute run directory.
        tasks: distinct task names from ``model.tasks.TASKS``, in schedule order.
        task_weights: steps of each task per schedule cycle, aligned with ``tasks`` (empty = 1 each).
        workers: DDP ranks.
        max_steps: optimizer steps of the whole run (the schedule's length); 0 = not fixed yet.
        batch_size: pairs (or questions) per rank per micro-batch; grad_accum: micro-batches per step.
        lr, weight_decay, warmup_steps, max_grad_norm: AdamW and schedule settings (`lr_factor`).
        stop_after_steps: stop (with a checkpoint) after this many steps, as an interrupted run (0 = no stop).
        checkpoint_every: steps between checkpoints (a checkpoint is also written at the end and at a stop).
        keep_checkpoints: checkpoints kept on disk (the oldest go first).
        holdout_fraction: see ``model.data.HASH_RULE``.
        threads: torch intra-op threads per rank (0 = torch's default).
        seed: data order, initial weights and per-rank RNG streams derive from it.
        vqa_questions, vqa_annotations, vqa_min_answer_count, max_question_tokens: VQA inputs.
        max_failures: worker failures recovered from the last checkpoint (Ray Train ``FailureConfig``).
        inject_fault: ``"RANK:STEP"`` kills that rank once before that step (marker file in ``out``; tests only).
        use_gpu: one GPU per rank, ``nccl``, bf16 autocast.
        init_from: a finished run directory, ``model.pt`` or a released checkpoint whose weights start this run
            ("" = fresh initialisation).

    Raises:
        TrainInputError: a value out of range (NaN and infinity included), unknown or repeated tasks, weights
            not one per task, a malformed ``inject_fault``.
    """

    store: str
    out: str
    tasks: tuple[str, ...]
    workers: int
    max_steps: int
    task_weights: tuple[int, ...] = ()
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    stop_after_steps: int = 0
    checkpoint_every: int = 100
    keep_checkpoints: int = DEFAULT_KEEP_CHECKPOINTS
    holdout_fraction: float = DEFAULT_HOLDOUT_FRACTION
    threads: int = 0
    seed: int = 0
    vqa_questions: str = ""
    vqa_annotations: str = ""
    vqa_min_answer_count: int = DEFAULT_MIN_ANSWER_COUNT
    max_question_tokens: int = DEFAULT_MAX_QUESTION_TOKENS
    max_failures: int = 0
    inject_fault: str = ""
    use_gpu: bool = False
    init_from: str = ""

    def __post_init__(self) -> None:
        from model.tasks import TASKS

        if isinstance(self.tasks, list) or isinstance(self.task_weights, list):
            object.__setattr__(self, "tasks", tuple(self.tasks))
            object.__setattr__(self, "task_weights", tuple(self.task_weights))
        if (
            not self.tasks
            or any(t not in TASKS for t in self.tasks)
            or len(set(self.tasks)) != len(self.tasks)
        ):
            raise TrainInputError(
                f"--task must list distinct tasks from {TASKS}, got {','.join(self.tasks)!r}"
            )
        if self.task_weights and (
            len(self.task_weights) != len(self.tasks) or any(w < 1 for w in self.task_weights)
        ):
            raise TrainInputError(
                f"--task-weights must give one integer >= 1 per --task ({len(self.tasks)}: "
                f"{','.join(self.tasks)}), got {','.join(map(str, self.task_weights))!r}"
            )
        self._check_numbers()
        if self.inject_fault and not _is_rank_step(self.inject_fault):
            raise TrainInputError(f"--inject-fault must be RANK:STEP, got {self.inject_fault!r}")

    def _check_numbers(self) -> None:
        check_ranges(self, INT_MINIMUMS, POSITIVE_FLOATS, NON_NEGATIVE_FLOATS)
        try:
            check_holdout_fraction(self.holdout_fraction)
        except ValueError as exc:
            raise TrainInputError(f"--holdout-fraction: {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of builtins (tuples become lists) for JSON and Ray."""
        d = dataclasses.asdict(self)
        d["tasks"] = list(self.tasks)
        d["task_weights"] = list(self.task_weights)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Inverse of `to_dict`; missing keys take their defaults (older run.json files)."""
        return cls(**{**d, "tasks": tuple(d["tasks"]), "task_weights": tuple(d.get("task_weights", ()))})

    @property
    def schedule(self) -> tuple[str, ...]:
        """One cycle of tasks, e.g. tasks (a, b, c) with weights (1, 3, 2) → (a, b, c, b, c, b)."""
        return task_schedule(self.tasks, self.task_weights)


def _is_rank_step(text: str) -> bool:
    parts = text.split(":")
    return len(parts) == 2 and all(p.isdigit() for p in parts)


def task_schedule(tasks: tuple[str, ...], weights: tuple[int, ...]) -> tuple[str, ...]:
    """Round ``r`` lists, in ``tasks`` order, the tasks whose weight exceeds ``r`` (empty weights = 1 each)."""
    weights = weights or (1,) * len(tasks)
    return tuple(t for r in range(max(weights)) for t, w in zip(tasks, weights, strict=True) if w > r)


def lr_factor(step: int, warmup_steps: int, max_steps: int) -> float:
    """Learning-rate multiplier at optimizer step ``step`` (0-based): ``(step + 1) / (warmup + 1)`` during
    warmup, then linear decay reaching 0 at ``max_steps``."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    return max(0.0, (max_steps - step) / max(1, max_steps - warmup_steps))
