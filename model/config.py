"""ModelConfig: the one frozen config of the two-stream co-attention model (ViLBERT, Lu et al. 2019), and every
named preset of it (`PRESETS`, `preset_config`: ``train --model-config``).

Saved as a plain dict in every checkpoint (`to_dict`) and rebuilt with validation (`from_dict`).
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any

from schemas.store import NUM_OBJECT_OUTPUTS

FUSIONS = ("product", "concat")
TEXT_INITS = ("pretrained", "random")
MRM_REGRESSION_LOSSES = ("mse", "smooth_l1")
VISUAL_EMBEDDING_NORMS = ("separate", "joint")
MATCH_OUTPUTS = (1, 2)
NUM_DETECTOR_CLASSES = NUM_OBJECT_OUTPUTS  # 1601: 1600 Visual Genome classes + background (schemas.store)
LOCATION_DIM = 5  # [x1/W, y1/H, x2/W, y2/H, area/(W*H)]
# 12-in-1 task-token ids of regionflow's tasks (vilbert-multi-task ``vilbert_tasks.yml``: TASK1 VQA,
# TASK7 RetrievalCOCO); used only when ``ModelConfig.num_task_tokens > 0``. Pretraining and captioning were
# not 12-in-1 tasks: they get no task token.
TASK_TOKEN_IDS = {"vqa": 1, "retrieval": 7}
# vilbert-multi-task ``config/bert_base_6layer_6conect.json``: co-attention before text layers 6..11
# (t_biattention_id), i.e. after text layers 5..10, and before visual layers 0..5 (v_biattention_id).
VILBERT_BASE_CO_LAYERS_AFTER = (5, 6, 7, 8, 9, 10)


@dataclass(frozen=True)
class ModelConfig:
    """Configuration of `model.tasks.TaskModel`; every field has a type and a default.

    Text stream:
        text_checkpoint (str, ""): HF-format BERT directory; "" = the packaged all-MiniLM-L6-v2 ``model/`` folder.
        text_init (str, "pretrained"): "pretrained" loads the checkpoint's weights; "random" builds a randomly
            initialised BERT from the checkpoint's ``config.json`` (same vocabulary) for tests.
        text_hidden (int, 0): hidden size override for ``text_init="random"`` (0 = the checkpoint's).
        text_heads (int, 0): attention-head override for ``text_init="random"`` (0 = the checkpoint's).
        text_intermediate (int, 0): feed-forward size override for ``text_init="random"`` (0 = the checkpoint's).
        num_text_layers (int, 6): how many of the checkpoint's BERT layers to use (the first ones).
        co_layers_after (tuple[int, ...], (3, 4, 5)): 0-based text-layer indices after which a Co-TRM block runs;
            strictly increasing, each < ``num_text_layers``, at least one.
    Visual stream:
        feature_dim (int, 2048): region feature size D (from the store manifest).
        visual_hidden (int, 1024): hidden size of the visual stream.
        visual_layers (int, 3): visual TRM layers. As in ViLBERT, visual layer j runs right after Co-TRM block j;
            layers beyond the number of blocks run before the first block.
        visual_heads (int, 8), visual_intermediate (int, 1024): visual TRM heads and feed-forward size.
        visual_embedding_norm (str, "separate"): "separate" = ``LayerNorm(Linear(features)) +
            LayerNorm(Linear(location))``; "joint" = vilbert-multi-task's ``BertImageEmbeddings``, one LayerNorm
            over ``Linear(features) + Linear(location)`` (needed for the released weights).
    Co-attention:
        co_hidden (int, 1024): size the co-attention projections map both streams into.
        co_heads (int, 8): co-attention heads (``co_hidden % co_heads == 0``).
    Fusion and heads:
        fusion (str, "product"): pooled text x pooled image, "product" (ViLBERT) or "concat" (+ linear projection).
        num_answers (int, 0): VQA answer vocabulary size; 0 = no VQA head.
        match_outputs (int, 1): outputs of the matching head. 1 = one logit; 2 = vilbert-multi-task's
            ``bi_seq_relationship`` (2-way softmax, index 0 = match), whose logit is ``s_match - s_mismatch``.
        num_task_tokens (int, 0): 12-in-1 task embeddings (vilbert-multi-task ``task_specific_tokens``: 20);
            when > 0 the task's embedding is inserted at text position 1, before the embedding LayerNorm,
            without shifting the tokens' positions (see `TASK_TOKEN_IDS`).
        num_region_classes (int, 1601): detector classes predicted by masked region modelling (KL target).
        caption_decoder_layers (int, 2): transformer decoder layers of the caption head; 0 = no caption head.
        caption_decoder_heads (int, 6): decoder heads (the decoder works at the text hidden size).
        max_caption_tokens (int, 36): longest caption the decoder handles, ``[CLS]``/``[SEP]`` included.
        dropout (float, 0.1): dropout of the visual stream, co-attention blocks, heads and decoder.
    Pre-training:
        mlm_probability (float, 0.15): fraction of real non-special tokens masked (BERT 80/10/10 recipe).
        mrm_probability (float, 0.15): fraction of real regions whose features are zeroed (ViLBERT).
        mrm_regression (str, "mse"): loss when the store has no ``cls_prob``: "mse" or "smooth_l1".
        itm_negative_fraction (float, 0.5): fraction of pairs whose image is swapped for another image.
        contrastive_weight (float, 0.0): weight of an in-batch contrastive loss on the unimodal pooled vectors
            added to "retrieval" (0 = ITM only); it trains the cheap first-stage dot product.
        itm_hard_negatives (bool, False): in "retrieval", draw each ITM negative's image from the batch's other
            images with probability ∝ exp(contrastive similarity / temperature) instead of uniformly (ALBEF,
            Li et al. 2021, §3.2), so the matching head learns the near misses that ``--rerank-top`` must order.
            Needs ``contrastive_weight > 0``.
    Special tokens (BERT uncased WordPiece ids):
        pad_token_id (int, 0), cls_token_id (int, 101), sep_token_id (int, 102), mask_token_id (int, 103).
    """

    text_checkpoint: str = ""
    text_init: str = "pretrained"
    text_hidden: int = 0
    text_heads: int = 0
    text_intermediate: int = 0
    num_text_layers: int = 6
    co_layers_after: tuple[int, ...] = (3, 4, 5)
    feature_dim: int = 2048
    visual_hidden: int = 1024
    visual_layers: int = 3
    visual_heads: int = 8
    visual_intermediate: int = 1024
    visual_embedding_norm: str = "separate"
    co_hidden: int = 1024
    co_heads: int = 8
    fusion: str = "product"
    num_answers: int = 0
    match_outputs: int = 1
    num_task_tokens: int = 0
    num_region_classes: int = NUM_DETECTOR_CLASSES
    caption_decoder_layers: int = 2
    caption_decoder_heads: int = 6
    max_caption_tokens: int = 36
    dropout: float = 0.1
    mlm_probability: float = 0.15
    mrm_probability: float = 0.15
    mrm_regression: str = "mse"
    itm_negative_fraction: float = 0.5
    contrastive_weight: float = 0.0
    itm_hard_negatives: bool = False
    pad_token_id: int = 0
    cls_token_id: int = 101
    sep_token_id: int = 102
    mask_token_id: int = 103

    def __post_init__(self) -> None:
        # JSON round trips turn tuples into lists; normalise before validating (frozen: use object.__setattr__).
        if isinstance(self.co_layers_after, list):
            object.__setattr__(self, "co_layers_after", tuple(self.co_layers_after))
        self._check_types()
        self._check_values()

    def _check_types(self) -> None:
        hints = typing.get_type_hints(ModelConfig)
        for f in dataclasses.fields(self):
            value, hint = getattr(self, f.name), hints[f.name]
            if hint is float:
                ok = isinstance(value, int | float) and not isinstance(value, bool)
            elif hint is int:
                ok = isinstance(value, int) and not isinstance(value, bool)
            elif hint is str:
                ok = isinstance(value, str)
            elif hint is bool:
                ok = isinstance(value, bool)
            else:  # tuple[int, ...]
                ok = isinstance(value, tuple) and all(
                    isinstance(v, int) and not isinstance(v, bool) for v in value
                )
            if not ok:
                raise ValueError(f"ModelConfig.{f.name} must be {hint}, got {value!r}")

    def _check_values(self) -> None:
        _require(self.text_init in TEXT_INITS, f"text_init must be one of {TEXT_INITS}")
        _require(self.fusion in FUSIONS, f"fusion must be one of {FUSIONS}")
        _require(
            self.visual_embedding_norm in VISUAL_EMBEDDING_NORMS,
            f"visual_embedding_norm must be one of {VISUAL_EMBEDDING_NORMS}",
        )
        _require(self.match_outputs in MATCH_OUTPUTS, f"match_outputs must be one of {MATCH_OUTPUTS}")
        _require(self.num_task_tokens >= 0, "num_task_tokens must be >= 0")
        _require(
            self.num_task_tokens == 0 or self.num_task_tokens > max(TASK_TOKEN_IDS.values()),
            f"num_task_tokens must be 0 or > {max(TASK_TOKEN_IDS.values())} (TASK_TOKEN_IDS)",
        )
        _require(self.mrm_regression in MRM_REGRESSION_LOSSES, f"mrm_regression in {MRM_REGRESSION_LOSSES}")
        _require(self.num_text_layers >= 1, "num_text_layers must be >= 1")
        co = self.co_layers_after
        _require(len(co) >= 1, "co_layers_after needs at least one text-layer index")
        _require(
            all(0 <= i < self.num_text_layers for i in co) and list(co) == sorted(set(co)),
            f"co_layers_after must be strictly increasing indices < num_text_layers, got {co}",
        )
        for name in ("feature_dim", "visual_hidden", "visual_heads", "visual_intermediate", "co_hidden"):
            _require(getattr(self, name) >= 1, f"{name} must be >= 1")
        _require(self.co_heads >= 1 and self.co_hidden % self.co_heads == 0, "co_hidden % co_heads != 0")
        _require(self.visual_hidden % self.visual_heads == 0, "visual_hidden % visual_heads != 0")
        for name in ("visual_layers", "num_answers", "caption_decoder_layers", "text_hidden", "text_heads"):
            _require(getattr(self, name) >= 0, f"{name} must be >= 0")
        _require(self.text_intermediate >= 0, "text_intermediate must be >= 0")
        _require(self.num_region_classes >= 2, "num_region_classes must be >= 2")
        _require(self.caption_decoder_heads >= 1, "caption_decoder_heads must be >= 1")
        _require(self.max_caption_tokens >= 3, "max_caption_tokens must be >= 3 ([CLS] word [SEP])")
        _require(0.0 <= self.dropout < 1.0, "dropout must be in [0, 1)")
        for name in ("mlm_probability", "mrm_probability", "itm_negative_fraction"):
            _require(0.0 <= getattr(self, name) <= 1.0, f"{name} must be in [0, 1]")
        _require(self.contrastive_weight >= 0.0, "contrastive_weight must be >= 0")
        _require(
            not self.itm_hard_negatives or self.contrastive_weight > 0.0,
            "itm_hard_negatives draws from the contrastive similarity: it needs contrastive_weight > 0",
        )

    @property
    def num_co_layers(self) -> int:
        """Number of Co-TRM blocks."""
        return len(self.co_layers_after)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of builtins (tuples become lists), safe for JSON and ``torch.save(weights_only)``."""
        d = dataclasses.asdict(self)
        d["co_layers_after"] = list(self.co_layers_after)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Build and validate a config from `to_dict` output; raises ``ValueError`` on unknown keys or values.

        Missing keys take their defaults (older checkpoints stay loadable when fields are added).
        """
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown ModelConfig field(s): {sorted(unknown)}")
        return cls(**d)

    @classmethod
    def tiny(cls, feature_dim: int = 16, **overrides: Any) -> ModelConfig:
        """A ~1M-parameter config for tests: random 2-layer BERT of width 32, two Co-TRM blocks.

        The word embeddings keep the checkpoint's vocabulary (30522 x 32), so real token ids stay valid.
        """
        values: dict[str, Any] = dict(
            text_init="random",
            text_hidden=32,
            text_heads=2,
            text_intermediate=64,
            num_text_layers=2,
            co_layers_after=(0, 1),
            feature_dim=feature_dim,
            visual_hidden=24,
            visual_layers=1,
            visual_heads=2,
            visual_intermediate=48,
            co_hidden=16,
            co_heads=2,
            caption_decoder_layers=1,
            caption_decoder_heads=2,
            max_caption_tokens=36,
            dropout=0.0,
        )
        values.update(overrides)
        return cls(**values)

    @classmethod
    def vilbert_base(cls, text_checkpoint: str, feature_dim: int = 2048, **overrides: Any) -> ModelConfig:
        """Exactly vilbert-multi-task's ``config/bert_base_6layer_6conect.json`` (the released checkpoints').

        Text: the 12 layers of 768 of the HF BERT directory ``text_checkpoint`` (laid out like
        bert-base-uncased: ``config.json``, ``vocab.txt``, weights). Visual: 6 layers of 1024, 8 heads,
        intermediate 1024, joint embedding LayerNorm. Co-attention: 6 blocks after text layers 5..10 (their
        ``t_biattention_id`` 6..11) and before visual layers 0..5, 1024 wide, 8 heads. Product fusion, 1601
        region classes, 2-way matching head. No caption decoder (the release has none; pass
        ``caption_decoder_layers=2, caption_decoder_heads=12`` to train one). Raises ``ValueError`` for an empty
        ``text_checkpoint`` (the packaged MiniLM is 6 x 384, not BERT-base).
        """
        if not text_checkpoint:
            raise ValueError("ModelConfig.vilbert_base needs a bert-base-uncased-like text directory")
        values: dict[str, Any] = dict(
            text_checkpoint=text_checkpoint,
            text_init="pretrained",
            num_text_layers=12,
            co_layers_after=VILBERT_BASE_CO_LAYERS_AFTER,
            feature_dim=feature_dim,
            visual_hidden=1024,
            visual_layers=6,
            visual_heads=8,
            visual_intermediate=1024,
            visual_embedding_norm="joint",
            co_hidden=1024,
            co_heads=8,
            fusion="product",
            match_outputs=2,
            num_region_classes=NUM_DETECTOR_CLASSES,
            caption_decoder_layers=0,
            dropout=0.1,
        )
        values.update(overrides)
        return cls(**values)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(f"ModelConfig: {message}")


# ``small``: ``ModelConfig.tiny`` widened to 128 (4 heads) with full-length captions (~5.6M parameters, random-init
# text: trains on CPU in minutes; the demo's preset).
SMALL_OVERRIDES: dict[str, Any] = {
    "text_hidden": 128,
    "text_heads": 4,
    "text_intermediate": 256,
    "visual_hidden": 128,
    "visual_heads": 4,
    "visual_intermediate": 256,
    "co_hidden": 128,
    "co_heads": 4,
    "caption_decoder_heads": 4,
    "max_caption_tokens": 36,
}


def _tiny_preset(feature_dim: int, text_checkpoint: str) -> ModelConfig:
    return ModelConfig.tiny(feature_dim=feature_dim, text_checkpoint=text_checkpoint)


def _small_preset(feature_dim: int, text_checkpoint: str) -> ModelConfig:
    return ModelConfig.tiny(feature_dim=feature_dim, text_checkpoint=text_checkpoint, **SMALL_OVERRIDES)


def _base_preset(feature_dim: int, text_checkpoint: str) -> ModelConfig:
    return ModelConfig(feature_dim=feature_dim, text_checkpoint=text_checkpoint)


def _vilbert_base_preset(feature_dim: int, text_checkpoint: str) -> ModelConfig:
    if not text_checkpoint:  # FileNotFoundError, as for a directory that is not there
        raise FileNotFoundError(
            "the vilbert-base preset needs a BERT directory laid out like bert-base-uncased (config.json, "
            "vocab.txt, weights); the packaged MiniLM (6 x 384) is not BERT-base"
        )
    return ModelConfig.vilbert_base(text_checkpoint, feature_dim=feature_dim)


# name -> (builder of the preset for a store's feature size D and a text directory ("" = the packaged MiniLM),
# one-line description for ``--help``)
PRESETS: dict[str, tuple[typing.Callable[[int, str], ModelConfig], str]] = {
    "tiny": (_tiny_preset, "tests: random 2-layer text of width 32"),
    "small": (_small_preset, "the CPU demo: random-init text of width 128, ~5.6M parameters"),
    "base": (_base_preset, "pretrained MiniLM text (the packaged checkpoint), ~80M parameters"),
    "vilbert-base": (
        _vilbert_base_preset,
        "ViLBERT's bert_base_6layer_6conect (the released checkpoints'): BERT-base text from a "
        "bert-base-uncased directory, 6 x 1024 visual, 6 co-attention blocks, ~250M parameters",
    ),
}


def preset_config(
    preset: str,
    feature_dim: int,
    num_answers: int = 0,
    text_layers: int = 0,
    contrastive_weight: float = 0.0,
    hard_negatives: bool = False,
    text_checkpoint: str = "",
) -> ModelConfig:
    """The `ModelConfig` of a named preset (`PRESETS`) for a store's feature size, with the run's head settings.

    Args:
        preset: a key of `PRESETS`.
        feature_dim: region feature size D of the store (``manifest.json`` ``feature_dim``).
        num_answers: VQA answer vocabulary size (0 = no VQA head).
        text_layers: BERT layers used (0 = the preset's); the Co-TRM blocks move to the last ones.
        contrastive_weight, hard_negatives: see `ModelConfig`.
        text_checkpoint: HF BERT directory of the text stream ("" = the packaged MiniLM; required by
            "vilbert-base").

    Raises:
        ValueError: unknown preset, or a resulting config that fails `ModelConfig` validation.
        FileNotFoundError: "vilbert-base" without ``text_checkpoint``.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; known: {', '.join(PRESETS)}")
    base = PRESETS[preset][0](feature_dim, text_checkpoint)
    changes: dict[str, Any] = {
        "num_answers": num_answers,
        "contrastive_weight": contrastive_weight,
        "itm_hard_negatives": hard_negatives,
    }
    if text_layers:
        co = tuple(range(max(0, text_layers - base.num_co_layers), text_layers))
        changes.update(num_text_layers=text_layers, co_layers_after=co)
    return dataclasses.replace(base, **changes)
