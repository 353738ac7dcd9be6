"""Task-level API of the co-attention model: losses per task, matching logits, pooled vectors, VQA logits and
captions. Input corruption (token and region masking, negative pairs) is drawn from a caller-owned CPU
``torch.Generator``, so a resumed run reproduces the same masks and negatives.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from model import losses
from model.batch import Batch
from model.config import TASK_TOKEN_IDS, ModelConfig
from model.heads import CaptionDecoder, MatchHead, MLMHead, RegionHead, VQAHead
from model.vilbert import TwoStreamModel, TwoStreamOutput, init_weights, pretrained_mlm_head
from schemas.text_checkpoint import resolve_text_checkpoint

TASKS = ("pretrain", "retrieval", "vqa", "caption")
MLM_REPLACE_WITH_MASK = 0.8  # BERT: of the chosen tokens, 80% [MASK], 10% random token, 10% unchanged
MLM_REPLACE_WITH_RANDOM = 0.1
_GUMBEL_EPS = 1e-12  # keeps log(-log(u)) finite for u drawn at 0 or 1


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
    """Unimodal pooled vectors for a cheap first-stage retrieval score (their dot product = cosine similarity).

    Attributes:
        pooled_text: float32 ``[B, co_hidden]``, L2-normalised, from the text stream alone.
        pooled_visual: float32 ``[B, co_hidden]``, L2-normalised, from the visual stream alone.
    """

    pooled_text: torch.Tensor
    pooled_visual: torch.Tensor


@dataclass
class Corruption:
    """Pre-training input corruption for one batch (all on the batch's device).

    Attributes:
        partner: int64 ``[B]`` row whose image is paired with row i's text (``i`` itself for a match).
        is_match: bool ``[B]``, True = the pair is the original image–text pair.
        input_ids: int64 ``[B, T]`` token ids after masking; mlm_labels: int64 ``[B, T]`` (``IGNORE_INDEX`` = not masked).
        region_masked: bool ``[B, N]``, True = the region's features are zeroed and must be predicted.
    """

    partner: torch.Tensor
    is_match: torch.Tensor
    input_ids: torch.Tensor
    mlm_labels: torch.Tensor
    region_masked: torch.Tensor


def sample_negatives(
    image_index: torch.Tensor,
    fraction: float,
    generator: torch.Generator,
    logits: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick, for about ``fraction`` of the rows, another row whose image differs (``image_index``).

    Uniformly, or with ``logits`` (float ``[B, B]``, row i's text against row j's image, e.g. contrastive
    similarity / temperature) with probability ∝ ``exp(logits[i, j])`` over the other images' rows (hard
    negatives, ALBEF), drawn by the Gumbel-max trick. A row with no other image in the batch stays a match.
    Draws ``B + B*B`` uniforms from ``generator`` (CPU) either way. Returns ``(partner int64 [B], is_match bool
    [B])`` on CPU.
    """
    index = image_index.cpu()
    b = index.shape[0]
    wants_negative = torch.rand(b, generator=generator) < fraction
    draw = torch.rand(b, b, generator=generator)
    if logits is not None:  # Gumbel-max: argmax_j(logits_ij + Gumbel noise) ~ softmax_j(logits_ij)
        gumbel = -torch.log(-torch.log(draw.clamp(min=_GUMBEL_EPS, max=1.0 - _GUMBEL_EPS)))
        draw = logits.detach().float().cpu() + gumbel
    draw = torch.where(index[:, None] == index[None, :], -math.inf, draw)  # never the same image
    best, partner = draw.max(dim=1)
    is_match = ~(wants_negative & (best > -math.inf))
    partner = torch.where(is_match, torch.arange(b), partner)
    return partner, is_match


def mask_tokens(
    input_ids: torch.Tensor,
    token_mask: torch.Tensor,
    config: ModelConfig,
    vocab_size: int,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking: each real token other than ``[CLS]``/``[SEP]``/pad is chosen with ``mlm_probability``;
    a chosen token becomes ``[MASK]`` (80%), a uniform random id (10%) or stays (10%).

    Returns ``(masked input_ids [B, T], labels [B, T])`` on CPU, labels ``IGNORE_INDEX`` where not chosen.
    """
    ids = input_ids.cpu()
    special = (ids == config.cls_token_id) | (ids == config.sep_token_id) | (ids == config.pad_token_id)
    candidates = token_mask.cpu() & ~special
    chosen = (torch.rand(ids.shape, generator=generator) < config.mlm_probability) & candidates
    action = torch.rand(ids.shape, generator=generator)
    random_ids = torch.randint(vocab_size, ids.shape, generator=generator)
    masked = torch.where(chosen & (action < MLM_REPLACE_WITH_MASK), config.mask_token_id, ids)
    use_random = (
        chosen
        & (action >= MLM_REPLACE_WITH_MASK)
        & (action < MLM_REPLACE_WITH_MASK + MLM_REPLACE_WITH_RANDOM)
    )
    masked = torch.where(use_random, random_ids, masked)
    labels = torch.where(chosen, ids, losses.IGNORE_INDEX)
    return masked, labels


def mask_regions(region_mask: torch.Tensor, probability: float, generator: torch.Generator) -> torch.Tensor:
    """Choose each real region with ``probability`` (ViLBERT zeroes the chosen features). bool ``[B, N]`` on CPU."""
    mask = region_mask.cpu()
    return (torch.rand(mask.shape, generator=generator) < probability) & mask


class TaskModel(nn.Module):
    """ViLBERT-style two-stream model with every head regionflow trains.

    Under DDP call it through ``forward`` (= `losses`) and wrap it with ``find_unused_parameters=True``:
    each task uses only some heads.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = TwoStreamModel(config)
        word_embeddings = self.encoder.word_embeddings
        self.mlm_head = MLMHead(word_embeddings)
        self.region_head = RegionHead(config.visual_hidden, config.num_region_classes, config.feature_dim)
        self.match_head = MatchHead(config.co_hidden, config.dropout, config.match_outputs)
        self.vqa_head = (
            VQAHead(config.co_hidden, config.num_answers, config.dropout) if config.num_answers else None
        )
        self.caption_decoder = None
        if config.caption_decoder_layers:
            self.caption_decoder = CaptionDecoder(
                word_embeddings,
                config.visual_hidden,
                config.caption_decoder_layers,
                config.caption_decoder_heads,
                config.max_caption_tokens,
                config.dropout,
            )
        self._init_heads()

    def _init_heads(self) -> None:
        tied = self.encoder.word_embeddings.weight
        for head in (self.mlm_head, self.region_head, self.match_head, self.vqa_head, self.caption_decoder):
            if head is None:
                continue
            for module in head.modules():
                if module is self.encoder.word_embeddings or getattr(module, "weight", None) is tied:
                    continue  # BERT's embeddings keep their checkpoint values; the tied bias stays zero
                init_weights(module)
            if isinstance(head, MLMHead):
                nn.init.zeros_(head.decoder.bias)
        if self.config.text_init == "pretrained":  # BERT's own MLM head when the checkpoint has one (ViLBERT)
            bert_head = pretrained_mlm_head(resolve_text_checkpoint(self.config.text_checkpoint))
            if bert_head:
                self.mlm_head.load_state_dict(bert_head, strict=False)  # decoder.weight: the tied embeddings

    @property
    def vocab_size(self) -> int:
        return int(self.encoder.word_embeddings.weight.shape[0])

    # ---- encoder entry points -------------------------------------------------------------------------------

    def encode(self, batch: Batch, cross: bool = True, task: str | None = None) -> TwoStreamOutput:
        """Run the two-stream encoder on ``batch`` (``cross=False``: unimodal pass, see `TwoStreamModel`).

        ``task`` picks the 12-in-1 task token (`model.config.TASK_TOKEN_IDS`) when the model has task tokens.
        """
        task_id = TASK_TOKEN_IDS.get(task or "") if self.config.num_task_tokens else None
        return self.encoder(
            batch.features,
            batch.boxes_xyxy_px,
            batch.image_size_px,
            batch.region_mask,
            batch.input_ids,
            batch.token_mask,
            cross=cross,
            task_id=task_id,
        )

    def match_logits(self, batch: Batch) -> torch.Tensor:
        """Image–text matching logit float32 ``[B]`` of each (image, text) row; the retrieval score."""
        return self.match_head(self.encode(batch, task="retrieval").fused).float()

    def pooled(self, batch: Batch) -> PooledOutput:
        """Unimodal, L2-normalised pooled vectors ``[B, co_hidden]``: text from the text stream alone, image from
        the visual stream alone (Co-TRM blocks skipped), so ``pooled_text @ pooled_visual.T`` scores every pair
        at the cost of one pass per side. Meaningful once trained with ``contrastive_weight > 0``."""
        out = self.encode(batch, cross=False, task="retrieval")
        return PooledOutput(
            pooled_text=F.normalize(out.pooled_text.float(), dim=-1),
            pooled_visual=F.normalize(out.pooled_visual.float(), dim=-1),
        )

    def vqa_logits(self, batch: Batch) -> torch.Tensor:
        """Answer logits float32 ``[B, num_answers]`` for the questions in ``batch.input_ids``.

        Raises ``ValueError`` when the config has no VQA head (``num_answers=0``).
        """
        if self.vqa_head is None:
            raise ValueError("this model has no VQA head (ModelConfig.num_answers=0)")
        return self.vqa_head(self.encode(batch, task="vqa").fused).float()

    @torch.no_grad()
    def generate_captions(self, batch: Batch, max_tokens: int, beam_size: int = 1) -> list[list[int]]:
        """Caption each image of ``batch``; returns per row the token ids without ``[CLS]``/``[SEP]``/pad.

        At most ``min(max_tokens, max_caption_tokens - 2)`` tokens. ``beam_size=1`` is greedy decoding.
        Raises ``ValueError`` without a caption decoder or for ``beam_size < 1`` / ``max_tokens < 1``.
        """
        decoder = self._require_decoder()
        if beam_size < 1 or max_tokens < 1:
            raise ValueError(f"need beam_size >= 1 and max_tokens >= 1, got {beam_size}, {max_tokens}")
        max_tokens = min(max_tokens, self.config.max_caption_tokens - 2)
        memory, memory_mask = self._caption_memory(batch)
        start, end = self.config.cls_token_id, self.config.sep_token_id
        if beam_size == 1:
            return decoder.greedy(memory, memory_mask, max_tokens, start, end)
        return decoder.beam_search(memory, memory_mask, max_tokens, beam_size, start, end)

    # ---- losses ---------------------------------------------------------------------------------------------

    def forward(self, batch: Batch, task: str, generator: torch.Generator) -> LossOutput:
        """Same as `losses` (the entry point DDP hooks into)."""
        return self.losses(batch, task, generator)

    def losses(self, batch: Batch, task: str, generator: torch.Generator) -> LossOutput:
        """Training loss of ``task`` (one of `TASKS`) on ``batch``; random draws come from ``generator`` (CPU).

        - pretrain: MLM + MRM + ITM, unweighted sum (ViLBERT); MLM and MRM count on matched pairs only.
        - retrieval: ITM (+ ``contrastive_weight`` x in-batch contrastive loss on the unimodal pooled vectors).
        - vqa: soft-score BCE x num_answers (bottom-up-attention VQA recipe, see `losses.vqa_loss`).
        - caption: teacher-forced cross-entropy of the decoder.
        Raises ``ValueError`` for an unknown task, an invalid batch (`Batch.validate`) or one lacking the
        task's targets.
        """
        table: dict[str, Callable[[Batch, torch.Generator], dict[str, torch.Tensor]]] = {
            "pretrain": self._pretrain_losses,
            "retrieval": self._retrieval_losses,
            "vqa": self._vqa_losses,
            "caption": self._caption_losses,
        }
        if task not in table:
            raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
        batch.validate()
        parts = table[task](batch, generator)
        total = torch.stack(list(parts.values())).sum()
        return LossOutput(total=total, parts={name: float(value.detach()) for name, value in parts.items()})

    def corrupt(self, batch: Batch, generator: torch.Generator) -> Corruption:
        """Draw negatives, then token masks, then region masks (fixed order) for pre-training."""
        device = batch.input_ids.device
        partner, is_match = sample_negatives(batch.image_index, self.config.itm_negative_fraction, generator)
        ids, labels = mask_tokens(batch.input_ids, batch.token_mask, self.config, self.vocab_size, generator)
        labels = torch.where(is_match[:, None], labels, losses.IGNORE_INDEX)
        region_masked = mask_regions(batch.region_mask.cpu()[partner], self.config.mrm_probability, generator)
        region_masked &= is_match[:, None]
        return Corruption(
            partner=partner.to(device),
            is_match=is_match.to(device),
            input_ids=ids.to(device),
            mlm_labels=labels.to(device),
            region_masked=region_masked.to(device),
        )

    def _pretrain_losses(self, batch: Batch, generator: torch.Generator) -> dict[str, torch.Tensor]:
        c = self.corrupt(batch, generator)
        paired = _pair_images(batch, c.partner)
        features = torch.where(
            c.region_masked[..., None], 0.0, paired.features
        )  # ViLBERT zeroes masked regions
        out = self.encode(paired.replace(features=features, input_ids=c.input_ids))
        chosen = c.mlm_labels != losses.IGNORE_INDEX
        mlm = losses.mlm_loss(self.mlm_head(out.text_states[chosen]), c.mlm_labels[chosen])
        region_states = out.visual_states[:, 1:]  # drop the global region
        if paired.cls_prob is not None:
            logits = self.region_head(region_states, predict_classes=True)
            mrm = losses.mrm_kl_loss(logits, paired.cls_prob, c.region_masked)
        else:
            predicted = self.region_head(region_states, predict_classes=False)
            mrm = losses.mrm_regression_loss(
                predicted, paired.features, c.region_masked, self.config.mrm_regression
            )
        itm = losses.itm_loss(self.match_head(out.fused), c.is_match)
        return {"mlm": mlm, "mrm": mrm, "itm": itm}

    def _retrieval_losses(self, batch: Batch, generator: torch.Generator) -> dict[str, torch.Tensor]:
        parts, similarity = {}, None
        if self.config.contrastive_weight > 0:
            pooled = self.pooled(batch)
            itc = losses.contrastive_loss(pooled.pooled_text, pooled.pooled_visual, batch.image_index)
            parts["itc"] = self.config.contrastive_weight * itc
            if self.config.itm_hard_negatives:
                similarity = losses.contrastive_logits(pooled.pooled_text, pooled.pooled_visual)
        fraction = self.config.itm_negative_fraction
        partner, is_match = sample_negatives(batch.image_index, fraction, generator, similarity)
        paired = _pair_images(batch, partner.to(batch.input_ids.device))
        parts["itm"] = losses.itm_loss(self.match_logits(paired), is_match.to(batch.input_ids.device))
        return parts

    def _vqa_losses(self, batch: Batch, generator: torch.Generator) -> dict[str, torch.Tensor]:
        if batch.vqa_targets is None:
            raise ValueError("task 'vqa' needs Batch.vqa_targets")
        return {"vqa": losses.vqa_loss(self.vqa_logits(batch), batch.vqa_targets)}

    def _caption_losses(self, batch: Batch, generator: torch.Generator) -> dict[str, torch.Tensor]:
        decoder = self._require_decoder()
        if batch.caption_ids is None or batch.caption_mask is None:
            raise ValueError("task 'caption' needs Batch.caption_ids and Batch.caption_mask")
        memory, memory_mask = self._caption_memory(batch)
        ids, mask = batch.caption_ids, batch.caption_mask
        logits = decoder(ids[:, :-1], mask[:, :-1], memory, memory_mask)  # position i predicts token i + 1
        return {"caption": losses.caption_loss(logits, ids[:, 1:], mask[:, 1:])}

    def _caption_memory(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Visual states ``[B, 1 + N, visual_hidden]`` and mask from an encoder pass whose text is only
        ``[CLS] [SEP]`` (text-free conditioning through the same network as pre-training)."""
        b = batch.batch_size
        device = batch.input_ids.device
        ids = torch.tensor([self.config.cls_token_id, self.config.sep_token_id], device=device).expand(b, 2)
        out = self.encode(batch.replace(input_ids=ids, token_mask=torch.ones_like(ids, dtype=torch.bool)))
        return out.visual_states, out.visual_mask

    def _require_decoder(self) -> CaptionDecoder:
        if self.caption_decoder is None:
            raise ValueError("this model has no caption decoder (ModelConfig.caption_decoder_layers=0)")
        return self.caption_decoder


def _pair_images(batch: Batch, partner: torch.Tensor) -> Batch:
    """Row i keeps its text and takes the image (features, boxes, size, mask, class distribution) of ``partner[i]``."""
    return batch.replace(
        features=batch.features[partner],
        boxes_xyxy_px=batch.boxes_xyxy_px[partner],
        image_size_px=batch.image_size_px[partner],
        region_mask=batch.region_mask[partner],
        image_index=batch.image_index[partner],
        cls_prob=None if batch.cls_prob is None else batch.cls_prob[partner],
    )
