"""The two-stream (ViLBERT, Lu et al. 2019) encoder: a BERT text stream, a visual stream over region features,
Co-TRM blocks after configured text layers, and pooled + fused outputs.

Schedule (``co_layers_after = (i_0, i_1, ...)``): text layers run in order and Co-TRM block k runs right after
text layer i_k; visual layer k runs right after Co-TRM block k (ViLBERT's "Co-TRM then TRM"), and visual layers
beyond the number of blocks run before the first block. In vilbert-multi-task's terms (``BertEncoder``), block k
runs before text layer ``t_biattention_id[k] = i_k + 1`` and before visual layer ``v_biattention_id[k] =
(visual_layers - blocks) + k``; text and visual layers between two blocks do not read each other, so their order
there does not matter.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertConfig, BertModel

from model.coattention import LAYER_NORM_EPS, MASK_VALUE, CoTransformerBlock, TransformerLayer
from model.config import LOCATION_DIM, ModelConfig
from schemas.text_checkpoint import resolve_text_checkpoint

INIT_STD = 0.02  # BERT's initializer_range


@dataclass
class TwoStreamOutput:
    """Encoder outputs.

    Attributes:
        text_states: float32 ``[B, T, text_hidden]`` (index 0: ``[CLS]``), aligned with ``input_ids``: a
            12-in-1 task token's state (position 1 inside the encoder) is not included.
        visual_states: float32 ``[B, 1 + N, visual_hidden]`` (index 0: the global image region).
        visual_mask: bool ``[B, 1 + N]``, True = real region (the global region is always real).
        pooled_text: float32 ``[B, co_hidden]`` = ReLU(Linear([CLS] state)).
        pooled_visual: float32 ``[B, co_hidden]`` = ReLU(Linear(global region state)).
        fused: float32 ``[B, co_hidden]``: ``pooled_text * pooled_visual`` ("product") or
            ``Linear([pooled_text; pooled_visual])`` ("concat").
    """

    text_states: torch.Tensor
    visual_states: torch.Tensor
    visual_mask: torch.Tensor
    pooled_text: torch.Tensor
    pooled_visual: torch.Tensor
    fused: torch.Tensor


def region_locations(boxes_xyxy_px: torch.Tensor, image_size_px: torch.Tensor) -> torch.Tensor:
    """5-d region location ``[x1/W, y1/H, x2/W, y2/H, area/(W*H)]`` (ViLBERT).

    Args:
        boxes_xyxy_px: float ``[B, N, 4]`` boxes in pixels.
        image_size_px: float ``[B, 2]`` (width, height) in pixels, positive.
    Returns:
        float ``[B, N, 5]``, in [0, 1] for boxes inside the image.
    """
    w = image_size_px[:, 0, None]  # (B, 1)
    h = image_size_px[:, 1, None]
    x1, y1, x2, y2 = boxes_xyxy_px.unbind(-1)  # each (B, N)
    area = (x2 - x1) * (y2 - y1)
    return torch.stack([x1 / w, y1 / h, x2 / w, y2 / h, area / (w * h)], dim=-1)


class VisualEmbedding(nn.Module):
    """Region features and their 5-d locations embedded, with a global image region prepended.

    ``visual_embedding_norm="separate"``: ``LayerNorm(Linear(features)) + LayerNorm(Linear(location))``;
    ``"joint"``: ``LayerNorm(Linear(features) + Linear(location))`` (vilbert-multi-task ``BertImageEmbeddings``).
    The global region (slot 0) is the mean feature of the real regions with the whole-image box, location
    ``[0, 0, 1, 1, 1]`` (as vilbert-multi-task's ``ImageFeaturesH5Reader``; its Conceptual Captions pretraining
    loader divides the sum by another count). Padded regions are zeroed first, so whatever they hold never
    reaches a real region.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        joint = config.visual_embedding_norm == "joint"
        hidden = config.visual_hidden
        # Registration order (feature, feature_norm, location, location_norm) kept from before "joint" existed:
        # it fixes the random init draws and the optimizer's parameter order of existing runs.
        self.feature = nn.Linear(config.feature_dim, hidden)
        self.feature_norm = None if joint else nn.LayerNorm(hidden, eps=LAYER_NORM_EPS)
        self.location = nn.Linear(LOCATION_DIM, hidden)
        self.location_norm = None if joint else nn.LayerNorm(hidden, eps=LAYER_NORM_EPS)
        self.norm = nn.LayerNorm(hidden, eps=LAYER_NORM_EPS) if joint else None
        self.dropout = nn.Dropout(config.dropout)

    def forward(
        self,
        features: torch.Tensor,
        boxes_xyxy_px: torch.Tensor,
        image_size_px: torch.Tensor,
        region_mask: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Embed ``features [B, N, D]`` with ``boxes_xyxy_px [B, N, 4]``, ``image_size_px [B, 2]``.

        Returns ``(embeddings [B, 1 + N, visual_hidden], mask bool [B, 1 + N])``.
        """
        real = region_mask[..., None]  # (B, N, 1)
        features = torch.where(real, features, 0.0)
        boxes = torch.where(real, boxes_xyxy_px, 0.0)
        count = region_mask.sum(dim=1, keepdim=True).clamp(min=1).to(features.dtype)  # (B, 1)
        global_feature = features.sum(dim=1) / count  # (B, D)
        w, h = image_size_px.unbind(-1)
        zero = torch.zeros_like(w)
        global_box = torch.stack([zero, zero, w, h], dim=-1)  # (B, 4)
        features = torch.cat([global_feature[:, None], features], dim=1)  # (B, 1 + N, D)
        boxes = torch.cat([global_box[:, None], boxes], dim=1)  # (B, 1 + N, 4)
        mask = torch.cat([torch.ones_like(region_mask[:, :1]), region_mask], dim=1)
        locations = region_locations(boxes, image_size_px)
        if self.norm is not None:
            embedded = self.norm(self.feature(features) + self.location(locations))
        else:
            assert self.feature_norm is not None and self.location_norm is not None
            embedded = self.feature_norm(self.feature(features)) + self.location_norm(
                self.location(locations)
            )
        return self.dropout(embedded), mask


def load_text_bert(config: ModelConfig) -> BertModel:
    """Build the text stream: the first ``num_text_layers`` layers of the BERT checkpoint, no pooler.

    ``text_init="pretrained"`` loads the weights (local files only); ``"random"`` initialises a BERT of the
    checkpoint's vocabulary with the ``text_*`` size overrides. BERT's dropouts are set to ``config.dropout``.
    Turns transformers' progress bars off for the process (its "Loading weights" bar, once per rank).
    Raises ``FileNotFoundError`` for a missing checkpoint, ``ValueError`` when it has too few layers.
    """
    directory = resolve_text_checkpoint(config.text_checkpoint)
    bert_config = BertConfig.from_pretrained(directory, local_files_only=True)
    if config.num_text_layers > bert_config.num_hidden_layers:
        raise ValueError(
            f"num_text_layers={config.num_text_layers} but {directory} has {bert_config.num_hidden_layers}"
        )
    dropouts = dict(hidden_dropout_prob=config.dropout, attention_probs_dropout_prob=config.dropout)
    if config.text_init == "pretrained":
        # Load every layer (so no checkpoint key is left over), then keep the first ones and drop the pooler.
        # No "Loading weights: 100%" bar: a local file in well under a second, printed once per training rank.
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
        bert = BertModel.from_pretrained(
            directory,
            local_files_only=True,
            attn_implementation="sdpa",
            hidden_dropout_prob=config.dropout,
            attention_probs_dropout_prob=config.dropout,
        )
        bert.encoder.layer = bert.encoder.layer[: config.num_text_layers]
        bert.config.num_hidden_layers = config.num_text_layers
        bert.pooler = None
        return bert
    overrides: dict[str, int | float] = dict(dropouts, num_hidden_layers=config.num_text_layers)
    for field, value in (
        ("hidden_size", config.text_hidden),
        ("num_attention_heads", config.text_heads),
        ("intermediate_size", config.text_intermediate),
    ):
        if value:
            overrides[field] = value
    bert_config.update(overrides)
    bert_config._attn_implementation = "sdpa"
    return BertModel(bert_config, add_pooling_layer=False)


# BERT's own masked-LM head in an HF BertForPreTraining file -> `model.heads.MLMHead` names (the decoder weight is
# the tied word embedding matrix). Older files (bert-base-uncased's pytorch_model.bin) spell LayerNorm gamma/beta.
_BERT_MLM_HEAD = {
    "cls.predictions.transform.dense.weight": "transform.dense.weight",
    "cls.predictions.transform.dense.bias": "transform.dense.bias",
    "cls.predictions.transform.LayerNorm.weight": "transform.norm.weight",
    "cls.predictions.transform.LayerNorm.bias": "transform.norm.bias",
    "cls.predictions.transform.LayerNorm.gamma": "transform.norm.weight",
    "cls.predictions.transform.LayerNorm.beta": "transform.norm.bias",
    "cls.predictions.bias": "decoder.bias",
}


def pretrained_mlm_head(directory: Path) -> dict[str, torch.Tensor]:
    """BERT's pretrained masked-LM head from an HF BERT directory, under `model.heads.MLMHead` names.

    vilbert-multi-task starts its MLM head from these too (``from_pretrained("bert-base-uncased")`` of
    ``BertForMultiModalPreTraining`` fills ``cls.predictions``). Reads ``model.safetensors`` or else
    ``pytorch_model.bin`` (``torch.load(weights_only=True)``); returns ``{}`` when the file has no such head
    (e.g. the packaged sentence-transformers MiniLM, a bare ``BertModel``) or there is no weights file.
    """
    safetensors_file, bin_file = directory / "model.safetensors", directory / "pytorch_model.bin"
    if safetensors_file.is_file():
        from safetensors import safe_open

        with safe_open(str(safetensors_file), framework="pt") as f:
            return {_BERT_MLM_HEAD[k]: f.get_tensor(k) for k in f.keys() if k in _BERT_MLM_HEAD}
    if bin_file.is_file():
        state = torch.load(bin_file, map_location="cpu", weights_only=True)
        return {_BERT_MLM_HEAD[k]: v for k, v in state.items() if k in _BERT_MLM_HEAD}
    return {}


def init_weights(module: nn.Module) -> None:
    """BERT initialisation for the modules regionflow adds (normal(0, 0.02) weights, zero bias, unit norm)."""
    if isinstance(module, nn.Linear | nn.Embedding):
        nn.init.normal_(module.weight, std=INIT_STD)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class TwoStreamModel(nn.Module):
    """ViLBERT encoder: BERT text stream + visual stream, joined by Co-TRM blocks; pooled and fused outputs."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.bert = load_text_bert(config)
        bert_config = self.bert.config
        self.text_hidden: int = bert_config.hidden_size
        self.visual_embedding = VisualEmbedding(config)
        self.visual_layers = nn.ModuleList(
            TransformerLayer(
                config.visual_hidden, config.visual_heads, config.visual_intermediate, config.dropout
            )
            for _ in range(config.visual_layers)
        )
        self.co_blocks = nn.ModuleList(
            CoTransformerBlock(
                config.visual_hidden,
                self.text_hidden,
                config.co_hidden,
                config.co_heads,
                config.visual_intermediate,
                bert_config.intermediate_size,
                config.dropout,
            )
            for _ in range(config.num_co_layers)
        )
        self.text_pooler = nn.Linear(self.text_hidden, config.co_hidden)
        self.visual_pooler = nn.Linear(config.visual_hidden, config.co_hidden)
        self.fusion = nn.Linear(2 * config.co_hidden, config.co_hidden) if config.fusion == "concat" else None
        for part in (self.visual_embedding, self.visual_layers, self.co_blocks, self.text_pooler):
            part.apply(init_weights)
        self.visual_pooler.apply(init_weights)
        if self.fusion is not None:
            self.fusion.apply(init_weights)
        # 12-in-1 task tokens (vilbert-multi-task ``BertEmbeddings.task_embeddings``); created last so that
        # configs without them draw the same initial weights as before they existed.
        self.task_embeddings: nn.Embedding | None = None
        if config.num_task_tokens:
            self.task_embeddings = nn.Embedding(config.num_task_tokens, self.text_hidden)
            init_weights(self.task_embeddings)

    @property
    def word_embeddings(self) -> nn.Embedding:
        """BERT's word embeddings ``[vocab, text_hidden]`` (tied to the MLM and caption decoders)."""
        return self.bert.embeddings.word_embeddings

    def forward(
        self,
        features: torch.Tensor,
        boxes_xyxy_px: torch.Tensor,
        image_size_px: torch.Tensor,
        region_mask: torch.Tensor,
        input_ids: torch.Tensor,
        token_mask: torch.Tensor,
        cross: bool = True,
        task_id: int | None = None,
    ) -> TwoStreamOutput:
        """Encode regions (``features [B, N, D]``, boxes xyxy px, image size, ``region_mask``) and tokens
        (``input_ids [B, T]``, ``token_mask``); see `model.batch.Batch` for the conventions.

        ``cross=False`` skips every Co-TRM block: a unimodal pass whose pooled text does not depend on the image
        nor pooled image on the text (the cheap first-stage retrieval encoders). ``task_id`` selects the 12-in-1
        task token (`model.config.TASK_TOKEN_IDS`) of a model with ``num_task_tokens > 0`` (None: no task token, e.g.
        pre-training); a ``task_id`` for a model without task tokens raises ``ValueError``.
        """
        visual, visual_mask = self.visual_embedding(features, boxes_xyxy_px, image_size_px, region_mask)
        text, token_mask = self._embed_text(input_ids, token_mask, task_id)
        has_task_token = task_id is not None
        text_bias = self._additive_mask(token_mask, text.dtype)  # (B, 1, 1, T)
        num_early_visual = max(0, len(self.visual_layers) - len(self.co_blocks))
        for layer in self.visual_layers[:num_early_visual]:
            visual = layer(visual, visual_mask)
        block = 0
        for i, text_layer in enumerate(self.bert.encoder.layer):
            text = text_layer(text, attention_mask=text_bias)
            if block < len(self.co_blocks) and i == self.config.co_layers_after[block]:
                if cross:
                    states = self.co_blocks[block](visual, visual_mask, text, token_mask)
                    visual, text = states.visual, states.text
                if num_early_visual + block < len(self.visual_layers):
                    visual = self.visual_layers[num_early_visual + block](visual, visual_mask)
                block += 1
        if has_task_token:
            text = torch.cat([text[:, :1], text[:, 2:]], dim=1)  # drop the task token: aligned with input_ids
        return self._pool(text, visual, visual_mask)

    def _embed_text(
        self, input_ids: torch.Tensor, token_mask: torch.Tensor, task_id: int | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """BERT embeddings ``[B, T, text_hidden]`` and the token mask; with a task token ``[B, 1 + T, ...]``.

        The 12-in-1 path follows vilbert-multi-task's ``BertEmbeddings``: word + position + token-type
        embeddings of the T tokens (positions 0..T-1), the task embedding inserted at index 1 (no position or
        type embedding of its own, no shift of the tokens' positions), then the embedding LayerNorm and dropout.
        """
        embeddings = self.bert.embeddings
        if task_id is None:
            return embeddings(input_ids=input_ids, token_type_ids=torch.zeros_like(input_ids)), token_mask
        if self.task_embeddings is None:
            raise ValueError("task_id given but this model has no task tokens (num_task_tokens=0)")
        if not 0 <= task_id < self.config.num_task_tokens:
            raise ValueError(f"task_id must be in [0, {self.config.num_task_tokens}), got {task_id!r}")
        b, t = input_ids.shape
        positions = torch.arange(t, device=input_ids.device)
        x = embeddings.word_embeddings(input_ids) + embeddings.position_embeddings(positions)[None]
        x = x + embeddings.token_type_embeddings(torch.zeros_like(input_ids))
        task = self.task_embeddings(torch.full((b, 1), task_id, dtype=torch.long, device=input_ids.device))
        x = torch.cat([x[:, :1], task, x[:, 1:]], dim=1)  # (B, 1 + T, text_hidden)
        mask = torch.cat([token_mask[:, :1], torch.ones_like(token_mask[:, :1]), token_mask[:, 1:]], dim=1)
        return embeddings.dropout(embeddings.LayerNorm(x)), mask

    @staticmethod
    def _additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """bool ``[B, T]`` -> additive ``[B, 1, 1, T]`` (0 real, -10000 padded), BERT's layer mask format."""
        return torch.where(mask, 0.0, MASK_VALUE).to(dtype)[:, None, None, :]

    def _pool(self, text: torch.Tensor, visual: torch.Tensor, visual_mask: torch.Tensor) -> TwoStreamOutput:
        pooled_text = F.relu(self.text_pooler(text[:, 0]))  # (B, co_hidden) from [CLS]
        pooled_visual = F.relu(self.visual_pooler(visual[:, 0]))  # (B, co_hidden) from the global region
        if self.fusion is None:
            fused = pooled_text * pooled_visual
        else:
            fused = self.fusion(torch.cat([pooled_text, pooled_visual], dim=-1))
        return TwoStreamOutput(
            text_states=text,
            visual_states=visual,
            visual_mask=visual_mask,
            pooled_text=pooled_text,
            pooled_visual=pooled_visual,
            fused=fused,
        )
