"""Load vilbert-multi-task's released checkpoints into regionflow, and write regionflow weights back under their
names. The key map is `model.released_keys` (its docstring is the documented table).

Every file is read with ``torch.load(weights_only=True)``. A file that does not fit the model is refused whole
with `ReleasedCheckpointError`, a one-line message naming the file and what differs (missing or unexpected keys,
a shape, the text directory's vocabulary, the feature size): there is no partial load. The 12-in-1 answer list
is read by `load_answer_list`.
"""

from __future__ import annotations

import dataclasses
import json
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from model.config import ModelConfig
from model.released_keys import KINDS, WORD_EMBEDDINGS, key_pairs, unused_shapes
from schemas.text_checkpoint import resolve_text_checkpoint

HEAD_PREFIXES = ("region_head.", "match_head.", "vqa_head.")  # may be re-initialised with heads_may_differ
SHOWN = 4  # keys listed in an error message
_TASK_EMBEDDINGS = "bert.embeddings.task_embeddings.weight"
_FEATURE_EMBEDDING = "bert.v_embeddings.image_embeddings.weight"


class ReleasedCheckpointError(ValueError):
    """A released checkpoint, answer list or text directory that does not fit; the message is one line."""


@dataclass(frozen=True)
class ReleasedFile:
    """A released checkpoint read once: ``state`` holds its tensors under their (normalised) names."""

    path: str
    state: dict[str, torch.Tensor]

    @property
    def kind(self) -> str:
        """ "vl-tasks" (``VILBertForVLTasks``, has ``vil_prediction``) or "pretraining"."""
        return "vl-tasks" if any(k.startswith("vil_prediction.") for k in self.state) else "pretraining"


@dataclass(frozen=True)
class LoadReport:
    """What a load did.

    Attributes:
        path: the checkpoint file; kind: one of `KINDS`.
        loaded: regionflow keys filled from the file (tied copies included).
        not_in_checkpoint: regionflow keys the release has no counterpart for (the caller's fresh init stays).
        reshaped: head keys whose shape differs from the file's (``heads_may_differ=True``), freshly initialised.
        unused: released tensors regionflow does not use (q_dense1/2, other 12-in-1 heads, ...), by their names;
            `to_released_state_dict` puts them back.
    """

    path: str
    kind: str
    loaded: tuple[str, ...]
    not_in_checkpoint: tuple[str, ...]
    reshaped: tuple[str, ...]
    unused: dict[str, torch.Tensor] = field(repr=False)

    def to_dict(self) -> dict[str, Any]:
        """Builtins for ``run.json``."""
        return {
            "path": self.path,
            "kind": self.kind,
            "loaded_keys": len(self.loaded),
            "not_in_checkpoint": list(self.not_in_checkpoint),
            "reshaped": list(self.reshaped),
            "unused": sorted(self.unused),
        }


def read_released(path: str | Path) -> ReleasedFile:
    """Read a released state dict (or their training ``.tar`` with ``model_state_dict``) with weights_only.

    Key spelling is normalised as their loader does: a ``module.`` prefix on every key is dropped, LayerNorm
    ``gamma``/``beta`` become ``weight``/``bias``. Raises `ReleasedCheckpointError`.
    """
    try:
        raw = torch.load(Path(path), map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as exc:  # weights_only refusals included
        raise ReleasedCheckpointError(
            f"{path}: cannot load as a weights-only torch file ({_one_line(exc)})"
        ) from exc
    if isinstance(raw, dict) and isinstance(raw.get("model_state_dict"), dict):
        raw = raw["model_state_dict"]
    if (
        not isinstance(raw, dict)
        or not raw
        or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in raw.items())
    ):
        raise ReleasedCheckpointError(f"{path}: not a state dict (a dict of tensors)")
    state: dict[str, torch.Tensor] = raw
    if all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    state = {_normalise(k): v for k, v in state.items()}
    return ReleasedFile(path=str(path), state=state)


_LEGACY_NAMES = {"gamma": "weight", "beta": "bias"}  # TF-era LayerNorm names, renamed by their loader too


def _normalise(key: str) -> str:
    head, dot, last = key.rpartition(".")
    return f"{head}{dot}{_LEGACY_NAMES.get(last, last)}"


def released_config(source: str | Path | ReleasedFile, config: ModelConfig) -> ModelConfig:
    """``config`` with the fields the checkpoint decides.

    ``num_task_tokens`` (rows of ``task_embeddings``, else 0); ``match_outputs`` (2 for the pretraining file,
    whose ITM head is 2-way; 1 for 12-in-1, whose retrieval score is ``vil_logit``); ``num_answers`` (3129 from
    ``vil_prediction`` when ``config.num_answers > 0`` and the file is 12-in-1).
    """
    released = source if isinstance(source, ReleasedFile) else read_released(source)
    state = released.state
    changes: dict[str, Any] = {
        "num_task_tokens": int(state[_TASK_EMBEDDINGS].shape[0]) if _TASK_EMBEDDINGS in state else 0,
        "match_outputs": 2 if released.kind == "pretraining" else 1,
    }
    if released.kind == "vl-tasks" and config.num_answers and "vil_prediction.logit_fc.3.weight" in state:
        changes["num_answers"] = int(state["vil_prediction.logit_fc.3.weight"].shape[0])
    return dataclasses.replace(config, **changes)


def load_released_checkpoint(
    source: str | Path | ReleasedFile, config: ModelConfig, heads_may_differ: bool = False
) -> tuple[dict[str, torch.Tensor], LoadReport]:
    """Map a released checkpoint onto ``TaskModel(config)``'s names, checking keys, shapes and vocabulary.

    Shapes come from a ``TaskModel`` of ``config`` built on the meta device (no weights read). Returns
    ``(state_dict, report)``: load with ``model.load_state_dict(state_dict, strict=False)``; the missing keys are
    exactly ``report.not_in_checkpoint + report.reshaped`` (or call `init_from_released`).
    Raises `ReleasedCheckpointError` (one line) for anything that does not fit.
    """
    from model.tasks import TaskModel

    shape_config = config
    if config.text_init == "pretrained":  # same shapes, without reading the text weights
        shape_config = dataclasses.replace(
            config, text_init="random", text_hidden=0, text_heads=0, text_intermediate=0
        )
    with torch.device("meta"):
        model = TaskModel(shape_config)
    return _map(source, config, model, heads_may_differ)


def init_from_released(
    model: torch.nn.Module, source: str | Path | ReleasedFile, heads_may_differ: bool = False
) -> LoadReport:
    """Load a released checkpoint into a built ``TaskModel``; keys it lacks keep the model's current values.

    Raises `ReleasedCheckpointError` before touching ``model`` when the file does not fit.
    """
    config = model.config
    assert isinstance(config, ModelConfig)
    state, report = _map(source, config, model, heads_may_differ)
    result = model.load_state_dict(state, strict=False)
    expected = set(report.not_in_checkpoint) | set(report.reshaped)
    assert not result.unexpected_keys and set(result.missing_keys) == expected, result
    return report


def _map(
    source: str | Path | ReleasedFile, config: ModelConfig, model: torch.nn.Module, heads_may_differ: bool
) -> tuple[dict[str, torch.Tensor], LoadReport]:
    released = source if isinstance(source, ReleasedFile) else read_released(source)
    path, state, kind = released.path, released.state, released.kind
    targets = model.state_dict(keep_vars=True)
    _check_text_dir(path, state, config, int(targets[WORD_EMBEDDINGS].shape[1]))
    _check_specific(path, state, config, kind)
    pairs = key_pairs(config, kind)
    expected = {r for r, _ in pairs}
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ReleasedCheckpointError(
            f"{path}: {kind} checkpoint does not fit this model config: "
            f"missing {_keys(missing)}, unexpected {_keys(unexpected)}{_hint(unexpected)}"
        )
    text_hidden = int(state[WORD_EMBEDDINGS.removeprefix("encoder.")].shape[1])
    unused_shape = unused_shapes(config, text_hidden)
    wrong: list[str] = []
    reshaped: list[str] = []
    ours: dict[str, torch.Tensor] = {}
    unused: dict[str, torch.Tensor] = {}
    for released_key, ours_key in pairs:
        tensor = state[released_key]
        if ours_key is None:
            unused[released_key] = tensor
            shape = unused_shape[released_key]
        else:
            shape = tuple(targets[ours_key].shape)
        if tuple(tensor.shape) != shape:
            if ours_key is not None and heads_may_differ and ours_key.startswith(HEAD_PREFIXES):
                reshaped.append(ours_key)
                continue
            wrong.append(f"{released_key} {tuple(tensor.shape)} vs {ours_key or 'expected'} {shape}")
        elif ours_key is not None:
            if ours_key in ours and not torch.equal(ours[ours_key], tensor):
                raise ReleasedCheckpointError(f"{path}: {released_key} differs from its tied {ours_key}")
            ours[ours_key] = tensor
    if wrong:
        raise ReleasedCheckpointError(f"{path}: wrong shapes: {_keys(wrong)}")
    _fill_aliases(ours, targets)
    left = [k for k in targets if k not in ours and k not in reshaped]
    report = LoadReport(path, kind, tuple(ours), tuple(left), tuple(reshaped), unused)
    return ours, report


def _fill_aliases(ours: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> None:
    """Keys that name one shared parameter (the tied word embeddings) all get the loaded tensor."""
    by_parameter: dict[int, list[str]] = {}
    for name, tensor in targets.items():
        by_parameter.setdefault(id(tensor), []).append(name)
    for names in by_parameter.values():
        source = next((n for n in names if n in ours), None)
        for name in names:
            if source is not None and name not in ours:
                ours[name] = ours[source]


def _check_text_dir(path: str, state: dict[str, torch.Tensor], config: ModelConfig, text_hidden: int) -> None:
    """The text directory's vocabulary (config.json ``vocab_size``, ``vocab.txt`` lines) and the text stream's
    width (``text_hidden``, from the directory or the config's override) = the checkpoint's."""
    word = state.get(WORD_EMBEDDINGS.removeprefix("encoder."))
    if word is None:
        return  # reported with the other missing keys
    try:
        directory = resolve_text_checkpoint(config.text_checkpoint)
    except FileNotFoundError as exc:
        raise ReleasedCheckpointError(f"{path}: {_one_line(exc)}") from exc
    rows = int(word.shape[0])
    sizes = {"config.json vocab_size": json.loads((directory / "config.json").read_text()).get("vocab_size")}
    vocab_file = directory / "vocab.txt"
    if vocab_file.is_file():
        sizes["vocab.txt"] = len(vocab_file.read_text(encoding="utf-8").splitlines())
    for what, size in sizes.items():
        if size != rows:
            raise ReleasedCheckpointError(
                f"{path}: the checkpoint's vocabulary has {rows} tokens but text directory {directory} has "
                f"{size} ({what}): use the BERT directory the checkpoint was trained with (bert-base-uncased)"
            )
    if int(word.shape[1]) != text_hidden:
        raise ReleasedCheckpointError(
            f"{path}: the checkpoint's text stream is {int(word.shape[1])} wide but the model's, from text "
            f"directory {directory}, is {text_hidden}: use the BERT directory the checkpoint was trained with"
        )


def _check_specific(path: str, state: dict[str, torch.Tensor], config: ModelConfig, kind: str) -> None:
    """Mismatches worth their own message: feature size, embedding norm, task tokens."""
    feature = state.get(_FEATURE_EMBEDDING)
    if feature is not None and int(feature.shape[1]) != config.feature_dim:
        raise ReleasedCheckpointError(
            f"{path}: the checkpoint takes {int(feature.shape[1])}-d region features but the model config has "
            f"feature_dim={config.feature_dim} (the store's feature size)"
        )
    if config.visual_embedding_norm != "joint":
        raise ReleasedCheckpointError(
            f"{path}: released ViLBERT weights need ModelConfig.visual_embedding_norm='joint' (one LayerNorm)"
        )
    if (_TASK_EMBEDDINGS in state) != bool(config.num_task_tokens):
        has = "has" if _TASK_EMBEDDINGS in state else "has no"
        raise ReleasedCheckpointError(
            f"{path}: the {kind} checkpoint {has} 12-in-1 task tokens but num_task_tokens="
            f"{config.num_task_tokens}: build the config with model.released.released_config"
        )


def check_store_feature_dim(config: ModelConfig, store_feature_dim: int, store: str) -> None:
    """Raise `ReleasedCheckpointError` when the store's region features are not ``config.feature_dim`` wide."""
    if store_feature_dim != config.feature_dim:
        raise ReleasedCheckpointError(
            f"{store}: the store's region features are {store_feature_dim}-d but the model takes "
            f"{config.feature_dim}-d: extract the store with the detector the checkpoint was trained on"
        )


def to_released_state_dict(
    state: dict[str, torch.Tensor],
    config: ModelConfig,
    kind: str,
    unused: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """The reverse map: a ``TaskModel`` state dict under vilbert-multi-task's names for a ``kind`` file.

    Released tensors regionflow does not hold come from ``unused`` (e.g. `LoadReport.unused`), else placeholders:
    zeros, and ones for LayerNorm weights. Keys regionflow has and the release lacks (caption decoder, region
    feature regression) are left out. Raises ``KeyError`` when ``state`` lacks a mapped key.
    """
    unused = unused or {}
    text_hidden = int(state[WORD_EMBEDDINGS].shape[1])
    shapes = unused_shapes(config, text_hidden)
    out: dict[str, torch.Tensor] = {}
    for released_key, ours_key in key_pairs(config, kind):
        if ours_key is not None:
            out[released_key] = state[ours_key]
        elif released_key in unused:
            out[released_key] = unused[released_key]
        else:
            is_norm_weight = released_key.endswith("logit_fc.2.weight")
            out[released_key] = (torch.ones if is_norm_weight else torch.zeros)(shapes[released_key])
    return out


def load_answer_list(path: str | Path, expected: int | None = None) -> list[str]:
    """The answer vocabulary of a VQA head, index = logit column.

    Reads a JSON list of strings, a ``.txt`` file with one answer per line, or vilbert-multi-task's
    ``trainval_label2ans.pkl`` (a pickled list of str) through an Unpickler that allows no global at all, so
    nothing but builtin containers and strings can come out of it. Raises `ReleasedCheckpointError` when the
    file is unreadable, not a list of distinct strings, or not ``expected`` long.
    """
    path = Path(path)
    try:
        if path.suffix == ".pkl":
            with path.open("rb") as f:
                answers: Any = _NoGlobalsUnpickler(f).load()
        elif path.suffix == ".json":
            answers = json.loads(path.read_text(encoding="utf-8"))
        else:
            answers = path.read_text(encoding="utf-8").splitlines()
    except (OSError, ValueError, pickle.UnpicklingError, EOFError) as exc:
        raise ReleasedCheckpointError(f"{path}: cannot read the answer list ({_one_line(exc)})") from exc
    if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
        raise ReleasedCheckpointError(f"{path}: the answer list must be a list of strings")
    if len(set(answers)) != len(answers):
        raise ReleasedCheckpointError(f"{path}: the answer list repeats answers")
    if expected is not None and len(answers) != expected:
        raise ReleasedCheckpointError(f"{path}: {len(answers)} answers but the VQA head has {expected}")
    return answers


class _NoGlobalsUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"refused global {module}.{name} (answer lists hold only strings)")


def _keys(keys: list[str]) -> str:
    if not keys:
        return "none"
    more = f" (+{len(keys) - SHOWN} more)" if len(keys) > SHOWN else ""
    return f"{len(keys)} ({', '.join(keys[:SHOWN])}{more})"


def _hint(unexpected: list[str]) -> str:
    if any(
        k.startswith(("bert.encoder.layer.", "bert.encoder.v_layer.", "bert.encoder.c_layer."))
        for k in unexpected
    ):
        return "; the layer counts differ (vilbert-base is ModelConfig.vilbert_base)"
    return ""


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300]


__all__ = [
    "KINDS",
    "LoadReport",
    "ReleasedCheckpointError",
    "ReleasedFile",
    "check_store_feature_dim",
    "init_from_released",
    "load_answer_list",
    "load_released_checkpoint",
    "read_released",
    "released_config",
    "to_released_state_dict",
]
