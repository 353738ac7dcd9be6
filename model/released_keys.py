"""The key map between vilbert-multi-task's released checkpoints and regionflow's `model.tasks.TaskModel`.

Source: facebookresearch/vilbert-multi-task, ``vilbert/vilbert.py`` (``BertForMultiModalPreTraining``,
``VILBertForVLTasks``) at f22b84a; both released files (``pretrained_model.bin``, Conceptual Captions
pretraining, and ``multi_task_model.bin``, 12-in-1) are ``torch.save(model.state_dict())`` of those classes for
``config/bert_base_6layer_6conect.json``. Read it as "released name -> regionflow name" (``i`` text layer,
``j`` visual layer, ``k`` co-attention block; ``.weight``/``.bias`` follow each Linear and LayerNorm):

| released | regionflow |
|---|---|
| ``bert.embeddings.{word,position,token_type}_embeddings``, ``.LayerNorm`` | ``encoder.bert.embeddings.<same>`` |
| ``bert.embeddings.task_embeddings`` (12-in-1 only) | ``encoder.task_embeddings`` |
| ``bert.encoder.layer.i.<sub>`` | ``encoder.bert.encoder.layer.i.<sub>`` (HF BERT names) |
| ``bert.v_embeddings.image_embeddings`` / ``.image_location_embeddings`` / ``.LayerNorm`` | ``encoder.visual_embedding.feature`` / ``.location`` / ``.norm`` |
| ``bert.encoder.v_layer.j.attention.self.{query,key,value}`` | ``encoder.visual_layers.j.attention.{query,key,value}`` |
| ``bert.encoder.v_layer.j.attention.output.dense`` / ``.LayerNorm`` | ``encoder.visual_layers.j.attention.out`` / ``.residual.norm`` |
| ``bert.encoder.v_layer.j.intermediate.dense``, ``.output.dense``, ``.output.LayerNorm`` | ``encoder.visual_layers.j.feed_forward.up``, ``.down``, ``.residual.norm`` |
| ``bert.encoder.c_layer.k.biattention.query1`` / ``key2`` / ``value2`` (regions query tokens) | ``encoder.co_blocks.k.visual_attention.query`` / ``.key`` / ``.value`` |
| ``bert.encoder.c_layer.k.biattention.query2`` / ``key1`` / ``value1`` (tokens query regions) | ``encoder.co_blocks.k.text_attention.query`` / ``.key`` / ``.value`` |
| ``bert.encoder.c_layer.k.biOutput.dense1`` / ``.LayerNorm1`` | ``encoder.co_blocks.k.visual_attention.out`` / ``.visual_residual.norm`` |
| ``bert.encoder.c_layer.k.biOutput.dense2`` / ``.LayerNorm2`` | ``encoder.co_blocks.k.text_attention.out`` / ``.text_residual.norm`` |
| ``bert.encoder.c_layer.k.biOutput.q_dense1`` / ``q_dense2`` | unused (in every checkpoint, never run) |
| ``bert.encoder.c_layer.k.{v,t}_intermediate.dense``, ``{v,t}_output.dense``, ``{v,t}_output.LayerNorm`` | ``encoder.co_blocks.k.{visual,text}_feed_forward.up``, ``.down``, ``.residual.norm`` |
| ``bert.t_pooler.dense`` / ``bert.v_pooler.dense`` | ``encoder.text_pooler`` / ``encoder.visual_pooler`` |
| ``cls.predictions.transform.dense`` / ``.LayerNorm``, ``cls.predictions.bias`` | ``mlm_head.transform.dense`` / ``.norm``, ``mlm_head.decoder.bias`` |
| ``cls.predictions.decoder.weight`` | tied: must equal ``bert.embeddings.word_embeddings.weight`` |
| ``cls.imagePredictions.transform.dense`` / ``.LayerNorm`` / ``.decoder`` | ``region_head.transform.dense`` / ``.norm`` / ``.class_logits`` |
| ``cls.bi_seq_relationship`` (2-way, index 0 = match) | ``match_head.score`` when ``match_outputs=2``, else unused |
| ``vil_logit`` (12-in-1 retrieval score) | ``match_head.score`` when ``match_outputs=1``, else unused |
| ``vil_prediction.logit_fc.{0,2,3}`` (VQA, 3129 answers) | ``vqa_head.net.{0,2,4}`` when ``num_answers > 0``, else unused |
| ``vil_prediction_gqa``, ``vil_binary_prediction``, ``vil_tri_prediction``, ``vision_logit``, ``linguisic_logit`` | unused (12-in-1 heads of tasks regionflow does not train) |

regionflow keys with no released counterpart: ``region_head.feature`` (feature regression), ``caption_decoder.*``,
``vqa_head.*`` for the pretraining file; tied copies of the word embeddings follow them.
"""

from __future__ import annotations

from model.config import ModelConfig

KINDS = ("pretraining", "vl-tasks")
VQA_ANSWERS = 3129  # VILBertForVLTasks.vil_prediction, fixed in their code
GQA_ANSWERS = 1533  # VILBertForVLTasks.vil_prediction_gqa
WORD_EMBEDDINGS = "encoder.bert.embeddings.word_embeddings.weight"

_TEXT_LAYER_SUBS = (
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
    "attention.output.dense",
    "attention.output.LayerNorm",
    "intermediate.dense",
    "output.dense",
    "output.LayerNorm",
)
_VISUAL_LAYER_SUBS = {
    "attention.self.query": "attention.query",
    "attention.self.key": "attention.key",
    "attention.self.value": "attention.value",
    "attention.output.dense": "attention.out",
    "attention.output.LayerNorm": "residual.norm",
    "intermediate.dense": "feed_forward.up",
    "output.dense": "feed_forward.down",
    "output.LayerNorm": "feed_forward.residual.norm",
}
_CO_LAYER_SUBS: dict[str, str | None] = {
    "biattention.query1": "visual_attention.query",
    "biattention.key1": "text_attention.key",
    "biattention.value1": "text_attention.value",
    "biattention.query2": "text_attention.query",
    "biattention.key2": "visual_attention.key",
    "biattention.value2": "visual_attention.value",
    "biOutput.dense1": "visual_attention.out",
    "biOutput.LayerNorm1": "visual_residual.norm",
    "biOutput.q_dense1": None,
    "biOutput.dense2": "text_attention.out",
    "biOutput.LayerNorm2": "text_residual.norm",
    "biOutput.q_dense2": None,
    "v_intermediate.dense": "visual_feed_forward.up",
    "v_output.dense": "visual_feed_forward.down",
    "v_output.LayerNorm": "visual_feed_forward.residual.norm",
    "t_intermediate.dense": "text_feed_forward.up",
    "t_output.dense": "text_feed_forward.down",
    "t_output.LayerNorm": "text_feed_forward.residual.norm",
}
_CLASSIFIER = {
    "logit_fc.0": "net.0",
    "logit_fc.2": "net.2",
    "logit_fc.3": "net.4",
}  # Linear, LayerNorm, Linear


def _module(released: str, ours: str | None) -> list[tuple[str, str | None]]:
    """A Linear or LayerNorm: its weight and bias."""
    return [(f"{released}.{p}", None if ours is None else f"{ours}.{p}") for p in ("weight", "bias")]


def key_pairs(config: ModelConfig, kind: str) -> list[tuple[str, str | None]]:
    """``(released key, regionflow key or None)`` for every key of a released ``kind`` file for ``config``.

    None marks a released tensor regionflow does not use. Two released keys may name the same regionflow key
    (the tied MLM decoder). Raises ``ValueError`` for an unknown ``kind``.
    """
    if kind not in KINDS:
        raise ValueError(f"released checkpoint kind must be one of {KINDS}, got {kind!r}")
    pairs: list[tuple[str, str | None]] = []
    emb = "bert.embeddings"
    for name in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
        pairs.append((f"{emb}.{name}.weight", f"encoder.{emb}.{name}.weight"))
    pairs += _module(f"{emb}.LayerNorm", f"encoder.{emb}.LayerNorm")
    if config.num_task_tokens:
        pairs.append((f"{emb}.task_embeddings.weight", "encoder.task_embeddings.weight"))
    for i in range(config.num_text_layers):
        for sub in _TEXT_LAYER_SUBS:
            pairs += _module(f"bert.encoder.layer.{i}.{sub}", f"encoder.bert.encoder.layer.{i}.{sub}")
    v_emb, ours_v_emb = "bert.v_embeddings", "encoder.visual_embedding"
    pairs += _module(f"{v_emb}.image_embeddings", f"{ours_v_emb}.feature")
    pairs += _module(f"{v_emb}.image_location_embeddings", f"{ours_v_emb}.location")
    pairs += _module(f"{v_emb}.LayerNorm", f"{ours_v_emb}.norm")
    for j in range(config.visual_layers):
        for sub, ours_sub in _VISUAL_LAYER_SUBS.items():
            pairs += _module(f"bert.encoder.v_layer.{j}.{sub}", f"encoder.visual_layers.{j}.{ours_sub}")
    for k in range(config.num_co_layers):
        for sub, co_sub in _CO_LAYER_SUBS.items():
            pairs += _module(f"bert.encoder.c_layer.{k}.{sub}", co_sub and f"encoder.co_blocks.{k}.{co_sub}")
    pairs += _module("bert.t_pooler.dense", "encoder.text_pooler")
    pairs += _module("bert.v_pooler.dense", "encoder.visual_pooler")
    return pairs + _head_pairs(config, kind)


def _head_pairs(config: ModelConfig, kind: str) -> list[tuple[str, str | None]]:
    pairs = _module("cls.predictions.transform.dense", "mlm_head.transform.dense")
    pairs += _module("cls.predictions.transform.LayerNorm", "mlm_head.transform.norm")
    pairs.append(("cls.predictions.bias", "mlm_head.decoder.bias"))
    pairs.append(("cls.predictions.decoder.weight", WORD_EMBEDDINGS))  # tied in their model
    pairs += _module("cls.imagePredictions.transform.dense", "region_head.transform.dense")
    pairs += _module("cls.imagePredictions.transform.LayerNorm", "region_head.transform.norm")
    pairs += _module("cls.imagePredictions.decoder", "region_head.class_logits")
    two_way = kind == "pretraining" or config.match_outputs == 2
    pairs += _module("cls.bi_seq_relationship", "match_head.score" if two_way else None)
    if kind == "pretraining":
        return pairs
    for released, ours in _CLASSIFIER.items():
        pairs += _module(f"vil_prediction.{released}", f"vqa_head.{ours}" if config.num_answers else None)
        pairs += _module(f"vil_prediction_gqa.{released}", None)
        pairs += _module(f"vil_binary_prediction.{released}", None)
    pairs += _module("vil_logit", None if two_way else "match_head.score")
    for name in ("vil_tri_prediction", "vision_logit", "linguisic_logit"):
        pairs += _module(name, None)
    return pairs


def unused_shapes(config: ModelConfig, text_hidden: int) -> dict[str, tuple[int, ...]]:
    """Shapes of every released key that may map to None, for ``config`` (vilbert-multi-task's constructors)."""
    co, v = config.co_hidden, config.visual_hidden
    shapes: dict[str, tuple[int, ...]] = {}

    def linear(name: str, out: int, inp: int) -> None:
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (out, inp), (out,)

    def classifier(name: str, inp: int, hidden: int, out: int) -> None:
        linear(f"{name}.logit_fc.0", hidden, inp)
        shapes[f"{name}.logit_fc.2.weight"] = shapes[f"{name}.logit_fc.2.bias"] = (hidden,)
        linear(f"{name}.logit_fc.3", out, hidden)

    for k in range(config.num_co_layers):
        linear(f"bert.encoder.c_layer.{k}.biOutput.q_dense1", v, co)
        linear(f"bert.encoder.c_layer.{k}.biOutput.q_dense2", text_hidden, co)
    linear("cls.bi_seq_relationship", 2, co)
    classifier("vil_prediction", co, 2 * co, VQA_ANSWERS)
    classifier("vil_prediction_gqa", co, 2 * co, GQA_ANSWERS)
    classifier("vil_binary_prediction", 2 * co, 2 * co, 2)
    linear("vil_logit", 1, co)
    linear("vil_tri_prediction", 3, co)
    linear("vision_logit", 1, v)
    linear("linguisic_logit", 1, text_hidden)
    return shapes
