"""Public bottom-up-attention checkpoints (detectron2 naming) → regionflow's ``butd-r101-c4`` state dict.

MILVLG bottom-up-attention.pytorch releases the Caffe model of Anderson et al. (2018) converted to
detectron2 names (``bua-caffe-frcn-r101_with_attributes.pth``, ``bua-caffe-frcn-r101-k10-100.pth``; every
key and shape of the attribute model: ``shared/data/butd-checkpoint-keys/bua-caffe-r101-attr.txt``):

* ``.pth`` / ``.pt``: a dict whose ``model`` entry is the state dict of torch tensors or numpy arrays, read
  with ``torch.load(weights_only=True)`` plus an explicit allow-list of numpy's array-reconstruction globals
  (``numpy_safe_globals``; no code runs);
* ``.pkl``: a detectron2 pickle whose ``model`` entry maps the same names to numpy arrays, read through
  ``workers.interop.safe_unpickle`` (builtin containers and numpy arrays only; anything else is refused before it
  runs).

A file holding the state dict itself (no ``model`` entry) is accepted too.

Which released files are known to load, and what was checked: no released file was downloaded here (no
network at run time, no weights in the repository). Checked: every one of the 616 keys and shapes MILVLG's
model defines for ``bua-caffe-frcn-r101_with_attributes.pth`` (``shared/data/butd-checkpoint-keys``), as
seeded random tensors, loads through ``KEY_MAP`` from a ``.pth`` of torch tensors, a ``.pth`` of numpy arrays
(numpy 2 ``numpy._core`` names, and numpy 1 ``numpy.core`` names in a protocol-2 legacy file) and a ``.pkl``
of numpy arrays; a file that names any other global is refused before it runs (``tests/test_butd_checkpoint.py``).
The same layout, saved with MILVLG's own model code and these names, gave the reference's outputs through
``regionflow extract --weights`` (parity check, issue 13). MILVLG's ``configs/caffe/test-caffe-r101.yaml``
runs ``bua-caffe-frcn-r101-k10-100.pth`` with ``ATTRIBUTE_ON: True``, so that file is expected to hold the same
keys; neither released file itself has been loaded by regionflow yet.

``KEY_MAP`` is the documented table from their names to ours, first matching rule wins. regionflow's
detector (``workers/detect/network.py``) names its modules as the checkpoint does, so most rules copy a tensor
to the same name; what is not a plain copy:

============================================  ==================================================================
their name                                    handling
============================================  ==================================================================
``backbone.stem.conv1.weight`` [64, 3, 7, 7]  copied: its input channels are **BGR** (Caffe), and regionflow
                                              feeds BGR minus the Caffe pixel means (``prepare_image``), so no
                                              channel flip
``*.norm.num_batches_tracked`` (scalar)       dropped: a training counter of ``BatchNorm2d`` (res4, res5); our
                                              frozen batch norms (eps 1e-5, as detectron2's) have none
``…anchor_generator.cell_anchors.0`` [A, 4]   not loaded (our anchors are computed, Caffe ``generate_anchors``):
                                              detectron2 keeps the anchors as a buffer, so the file says which
                                              anchor each RPN output channel belongs to. They must be a row
                                              permutation of ours; the RPN channels below are reordered to our
                                              anchor order (identity for the released files). Absent: our order
``…rpn_head.objectness_logits`` [2A, 512, …]  Caffe layout: A background logits, then A foreground logits
                                              (``rpn_cls_score`` reshaped to 2 × A, softmax over the 2), as
                                              ``ProposalGenerator`` reads them; each half permuted by anchor
``…rpn_head.anchor_deltas`` [4A, 512, …]      anchor-major ``(dx, dy, dw, dh)`` per anchor; permuted by anchor
``roi_heads.box_predictor.*``                 copied: 1601 classes with background at index 0; ``bbox_pred``
                                              [6404] per class (loaded, not run); attribute head (class
                                              embedding 1601 → 256, 2304 → 512 → 401)
============================================  ==================================================================

Missing keys, keys no rule maps (passed through under their own names) and shape mismatches are reported
together by ``workers.detect.weights.load_weights``, which dispatches ``.pth`` / ``.pt`` / ``.pkl`` here.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from workers.interop.safe_unpickle import safe_load

BUTD_SUFFIXES = (".pth", ".pt", ".pkl")
ANCHORS_KEY = "proposal_generator.anchor_generator.cell_anchors.0"
ANCHOR_MATCH_TOLERANCE_PX = 1e-3
_BOX_DIM = 4
_OBJECTNESS_WAYS = 2  # background, foreground

Handling = Literal["copy", "drop_counter", "anchors", "rpn_objectness", "rpn_deltas"]


class ButdCheckpointError(ValueError):
    """The file is not a bottom-up-attention checkpoint regionflow can map (message says why)."""


@dataclass(frozen=True)
class KeyRule:
    """One row of the key map.

    Attributes:
        pattern: regular expression that must match their whole key.
        handling: ``copy`` (to ``target``), ``drop_counter`` (scalar, not loaded), ``anchors`` (checked,
            not loaded), ``rpn_objectness`` / ``rpn_deltas`` (copied with RPN channels in our anchor order).
        target: ``re`` replacement template giving our name (``\\g<0>``: the same name); None when not loaded.
        note: shape and convention, for humans.
    """

    pattern: str
    handling: Handling
    target: str | None
    note: str


_SAME = r"\g<0>"
_NORM = r"\.norm\.(weight|bias|running_mean|running_var)"
_BLOCKS = r"(backbone\.res[234]|roi_heads\.res5)\.\d+\.(shortcut|conv[123])"

KEY_MAP: tuple[KeyRule, ...] = (
    KeyRule(r".+\.norm\.num_batches_tracked", "drop_counter", None, "BatchNorm2d step counter, scalar"),
    KeyRule(r"backbone\.stem\.conv1\.weight", "copy", _SAME, "[64, 3, 7, 7], input channels BGR"),
    KeyRule(r"backbone\.stem\.conv1" + _NORM, "copy", _SAME, "frozen batch norm [64]"),
    KeyRule(_BLOCKS + r"\.weight", "copy", _SAME, "bias-free conv; stride in conv1 (1×1); res5 dilation 2"),
    KeyRule(_BLOCKS + _NORM, "copy", _SAME, "frozen batch norm [C]"),
    KeyRule(re.escape(ANCHORS_KEY), "anchors", None, "[A, 4] xyxy anchors of one cell, +1 convention"),
    KeyRule(r"proposal_generator\.rpn_head\.conv\.(weight|bias)", "copy", _SAME, "3×3 conv 1024 → 512"),
    KeyRule(
        r"proposal_generator\.rpn_head\.objectness_logits\.(weight|bias)",
        "rpn_objectness",
        _SAME,
        "[2A]: A background then A foreground logits",
    ),
    KeyRule(
        r"proposal_generator\.rpn_head\.anchor_deltas\.(weight|bias)",
        "rpn_deltas",
        _SAME,
        "[4A]: (dx, dy, dw, dh) per anchor",
    ),
    KeyRule(
        r"roi_heads\.box_predictor\.(cls_score|bbox_pred|attr_linear1|attr_linear2)\.(weight|bias)",
        "copy",
        _SAME,
        "1601 classes (0 = background), 6404 = 1601 × 4 deltas, attributes 2304 → 512 → 401",
    ),
    KeyRule(r"roi_heads\.box_predictor\.cls_embed\.weight", "copy", _SAME, "[1601, 256] class embedding"),
)


def rule_for(key: str) -> KeyRule | None:
    """The first ``KEY_MAP`` rule whose pattern matches all of ``key``, or None."""
    return next((rule for rule in KEY_MAP if re.fullmatch(rule.pattern, key)), None)


def load_butd_checkpoint(path: Path, our_anchors: torch.Tensor) -> dict[str, torch.Tensor]:
    """Read a bottom-up-attention checkpoint and map it onto regionflow's names (``map_butd_state``).

    Args:
        path: ``.pth`` / ``.pt`` (torch, ``weights_only=True``) or ``.pkl`` (numpy arrays, restricted
            unpickler).
        our_anchors: float ``[A, 4]`` cell anchors of the model being loaded (``RegionDetectorModel.cell_anchors``),
            in its RPN channel order.

    Returns:
        our name → float32 (or the file's non-float dtype) CPU tensor; keys no rule maps keep their names.

    Raises:
        ButdCheckpointError: another suffix, no state dict inside, a non-array value, bad anchors.
        workers.interop.safe_unpickle.UnsafePickleError: the ``.pkl`` names a global that could run code.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in BUTD_SUFFIXES:
        raise ButdCheckpointError(f"{path}: not a bottom-up-attention checkpoint suffix {BUTD_SUFFIXES}")
    if suffix == ".pkl":
        with path.open("rb") as handle:
            loaded = safe_load(handle, where=str(path))
    else:
        with torch.serialization.safe_globals(numpy_safe_globals()):
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    return map_butd_state(_state_dict_of(loaded, path), our_anchors.detach().cpu(), where=str(path))


_NUMPY_DTYPES = (
    np.float16,
    np.float32,
    np.float64,
    np.int8,
    np.int16,
    np.int32,
    np.int64,
    np.uint8,
    np.bool_,
)


def numpy_safe_globals() -> list[Any]:
    """The explicit allow-list of numpy globals a ``.pth`` may name under ``torch.load(weights_only=True)``.

    Detectron2-era checkpoints often store numpy arrays (and numpy scalars), which pickle as calls to
    ``numpy(._)core.multiarray._reconstruct`` / ``scalar`` with ``numpy.ndarray`` and a ``numpy.dtype`` (and
    the dtype's class under numpy 2). These rebuild an array from its bytes and run no other code; they are
    the same names ``workers.interop.safe_unpickle`` admits for ``.pkl`` files. Both the numpy 1
    (``numpy.core``) and numpy 2 (``numpy._core``) names are listed. Anything else is still refused by
    torch's weights-only unpickler.
    """
    core = getattr(np, "_core", None) or np.core
    listed: list[Any] = [np.ndarray, np.dtype, *(type(np.dtype(t)) for t in _NUMPY_DTYPES)]
    for function in (core.multiarray._reconstruct, core.multiarray.scalar):
        listed.append(function)
        listed += [
            (function, f"{module}.multiarray.{function.__name__}") for module in ("numpy.core", "numpy._core")
        ]
    return listed


def _state_dict_of(loaded: Any, path: Path) -> dict[str, torch.Tensor]:
    """The ``model`` entry (or the dict itself), every value as a CPU tensor."""
    if not isinstance(loaded, Mapping):
        raise ButdCheckpointError(f"{path}: expected a dict, got {type(loaded).__name__}")
    state = loaded.get("model", loaded)
    if not isinstance(state, Mapping) or not state:
        raise ButdCheckpointError(f"{path}: its 'model' entry is not a non-empty dict of tensors")
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if isinstance(value, np.ndarray) and value.dtype != object:
            out[str(key)] = torch.from_numpy(np.ascontiguousarray(value))
        elif isinstance(value, torch.Tensor):
            out[str(key)] = value
        else:
            raise ButdCheckpointError(f"{path}: value of {key!r} is a {type(value).__name__}, not an array")
    return out


def map_butd_state(
    state: Mapping[str, torch.Tensor], our_anchors: torch.Tensor, *, where: str = "checkpoint"
) -> dict[str, torch.Tensor]:
    """Apply ``KEY_MAP`` to a detectron2-named state dict.

    Args:
        state: their name → tensor.
        our_anchors: float ``[A, 4]`` cell anchors of the model being loaded, in its RPN channel order.
        where: names the source in error messages.

    Returns:
        our name → tensor (floats as contiguous float32); unmapped keys pass through under their names.

    Raises:
        ButdCheckpointError: a non-scalar ``num_batches_tracked``; anchors of another shape or that are not
            a row permutation of ``our_anchors``; RPN tensors whose first dimension is not 2A / 4A.
    """
    order = anchor_order(state[ANCHORS_KEY], our_anchors, where) if ANCHORS_KEY in state else None
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        rule = rule_for(key)
        if rule is None:
            out[key] = tensor
            continue
        if rule.handling == "drop_counter":
            if tensor.numel() != 1:
                raise ButdCheckpointError(
                    f"{where}: {key} should be a scalar counter, has shape {tuple(tensor.shape)}"
                )
            continue
        if rule.handling == "anchors":
            continue
        assert rule.target is not None, rule
        value = tensor.float() if tensor.is_floating_point() else tensor
        if order is not None and rule.handling in ("rpn_objectness", "rpn_deltas"):
            value = _permute_rpn(value, order, rule.handling, key, where)
        out[re.sub(rule.pattern, rule.target, key)] = value.contiguous()
    return out


def anchor_order(theirs: torch.Tensor, ours: torch.Tensor, where: str = "checkpoint") -> torch.Tensor:
    """``order[i]`` = index of their anchor equal to our anchor ``i`` (within ``ANCHOR_MATCH_TOLERANCE_PX``).

    Raises:
        ButdCheckpointError: shapes differ, or some anchor of ours has no equal among theirs (the message
            shows both tables).
    """
    theirs, ours = theirs.detach().float(), ours.float()
    if theirs.shape != ours.shape:
        raise ButdCheckpointError(
            f"{where}: {ANCHORS_KEY} has shape {tuple(theirs.shape)}, the model has {tuple(ours.shape)} anchors"
        )
    distance = (ours[:, None, :] - theirs[None, :, :]).abs().amax(dim=2)  # [A_ours, A_theirs]
    best = distance.argmin(dim=1)
    matched = distance.gather(1, best[:, None]).squeeze(1) <= ANCHOR_MATCH_TOLERANCE_PX
    if not bool(matched.all()) or best.unique().numel() != best.numel():
        raise ButdCheckpointError(
            f"{where}: its RPN anchors ({ANCHORS_KEY}) are not a reordering of the model's Caffe anchors, so "
            f"its RPN outputs cannot be mapped.\n  file: {theirs.tolist()}\n  model: {ours.tolist()}"
        )
    return best


def _permute_rpn(
    value: torch.Tensor, order: torch.Tensor, handling: str, key: str, where: str
) -> torch.Tensor:
    """Reorder the anchor axis of an RPN conv weight/bias: ``[2A, …]`` (2 × A) or ``[4A, …]`` (A × 4)."""
    anchors = order.numel()
    rest = value.shape[1:]
    if handling == "rpn_objectness":
        expected, grouped, axis = _OBJECTNESS_WAYS * anchors, (_OBJECTNESS_WAYS, anchors, *rest), 1
    else:
        expected, grouped, axis = _BOX_DIM * anchors, (anchors, _BOX_DIM, *rest), 0
    if value.shape[0] != expected:
        raise ButdCheckpointError(
            f"{where}: {key} has {value.shape[0]} outputs, expected {expected} for {anchors} anchors"
        )
    return value.reshape(grouped).index_select(axis, order).reshape(value.shape)
