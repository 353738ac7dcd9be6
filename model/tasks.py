"""Task-level API of the co-attention model: losses per task, matching logits, VQA logits, captions.

`TaskModel` is filled in by the next commit; the output dataclasses and task names are final.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

TASKS = ("pretrain", "retrieval", "vqa", "caption")


@dataclass
class LossOutput:
    """A task's training loss.

    Attributes:
        total: float32 scalar tensor with a grad path, the sum of the weighted parts.
        parts: detached float value of each part, e.g. ``{"mlm": .., "mrm": .., "itm": ..}``.
    """

    total: torch.Tensor
    parts: dict[str, float]


@dataclass
class PooledOutput:
    """Unimodal pooled vectors for a cheap first-stage retrieval score (their dot product).

    Attributes:
        pooled_text: float32 ``[B, co_hidden]`` from the text stream alone.
        pooled_visual: float32 ``[B, co_hidden]`` from the visual stream alone.
    """

    pooled_text: torch.Tensor
    pooled_visual: torch.Tensor
