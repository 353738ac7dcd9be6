"""Detector weights on disk: regionflow's own ``.safetensors`` state dicts, and their digest.

The format is chosen by file suffix through ``_LOADERS``; the public bottom-up-attention checkpoints
(``.pth`` / ``.pt`` / ``.pkl``, detectron2 naming) go through the key map of ``workers.detect.butd_checkpoint``
(torch tensors with ``weights_only=True``, pickles through the restricted unpickler).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from workers.detect.butd_checkpoint import BUTD_SUFFIXES, load_butd_checkpoint

_HASH_CHUNK_BYTES = 1 << 20
_MAX_KEYS_IN_ERROR = 20


def _load_safetensors(path: Path, model: nn.Module) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file  # lazy: the GPU bench machine has no safetensors

    return load_file(str(path), device="cpu")


def _load_butd(path: Path, model: nn.Module) -> dict[str, torch.Tensor]:
    anchors = getattr(model, "cell_anchors", None)
    if not isinstance(anchors, torch.Tensor):
        raise ValueError(f"{path}: a bottom-up-attention checkpoint loads into a region detector model only")
    return load_butd_checkpoint(path, anchors)


_LOADERS: dict[str, Callable[[Path, nn.Module], dict[str, torch.Tensor]]] = {
    ".safetensors": _load_safetensors,
    **dict.fromkeys(BUTD_SUFFIXES, _load_butd),  # bottom-up-attention, workers/detect/butd_checkpoint.py
}


def supported_suffixes() -> tuple[str, ...]:
    """File suffixes ``load_weights`` reads."""
    return tuple(sorted(_LOADERS))


def load_weights(model: nn.Module, path: Path) -> None:
    """Load a state dict saved by ``save_weights`` into ``model`` (in place, strict).

    Args:
        model: the module whose state-dict names the file uses (for a bottom-up-attention checkpoint, a
            ``RegionDetectorModel``: its ``cell_anchors`` order the RPN channels).
        path: a ``.safetensors`` file, or a bottom-up-attention ``.pth`` / ``.pt`` / ``.pkl`` checkpoint.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: an unsupported suffix (the message lists the supported ones); keys missing from or
            unexpected in the file (listed); a tensor whose shape differs from the model's (listed).
    """
    path = Path(path)
    loader = _LOADERS.get(path.suffix.lower())
    if loader is None:
        raise ValueError(
            f"weights format {path.suffix or '(no suffix)'!r} of {path} is not supported yet; "
            f"supported: {', '.join(supported_suffixes())}"
        )
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    state = loader(path, model)
    _check_state(model.state_dict(), state, path)
    model.load_state_dict(state, strict=True)


def _check_state(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor], path: Path) -> None:
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    mismatched = sorted(
        f"{k}: file {tuple(found[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(expected) & set(found)
        if found[k].shape != expected[k].shape
    )
    problems = [
        f"{label} ({len(items)}): {_listing(items)}"
        for label, items in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches", mismatched),
        )
        if items
    ]
    if problems:
        raise ValueError(f"weights {path} do not fit the model: " + "; ".join(problems))


def _listing(items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_KEYS_IN_ERROR])
    more = len(items) - _MAX_KEYS_IN_ERROR
    return shown + (f", ... and {more} more" if more > 0 else "")


def save_weights(model: nn.Module, path: Path) -> None:
    """Write ``model.state_dict()`` (contiguous CPU tensors) to a ``.safetensors`` file.

    Raises:
        ValueError: ``path`` does not end in ``.safetensors``.
    """
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise ValueError(f"save_weights writes .safetensors only, got {path}")
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    from safetensors.torch import save_file

    save_file(state, str(path))


def weights_digest(path: Path) -> str:
    """``"sha256:<hex>"`` of the file's bytes (recorded in the manifest and the extraction-config digest).

    Raises:
        FileNotFoundError: ``path`` does not exist.
    """
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for chunk in iter(lambda: handle.read(_HASH_CHUNK_BYTES), b""):
            digest.update(chunk)
    return f"sha256:{digest.hexdigest()}"
