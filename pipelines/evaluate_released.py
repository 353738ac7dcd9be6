"""``regionflow evaluate CHECKPOINT STORE``: a released vilbert-multi-task checkpoint evaluated directly.

When ``RUN`` is a file, it is a released checkpoint (`model.released`): the model is
``--model-config`` (default ``vilbert-base``, whose text stream comes from ``--text-dir``; or
``--model-config-json`` with a regionflow ``ModelConfig`` dict for another size), with what the file decides
(task tokens, matching head, 3129 answers; `model.released.released_config`). Every image of the store is
evaluated (a released model has no split of this store). VQA uses the checkpoint's own answer vocabulary
(``--answers``: vilbert-multi-task's ``trainval_label2ans.pkl``, a JSON list or a text file, index = logit
column); retrieval and matching use its matching logit (``vil_logit`` for 12-in-1, the 2-way
``bi_seq_relationship`` of the pretraining model as match - mismatch). Captions: the release has no decoder.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

RELEASED_EVAL_SUFFIX = "-eval"  # default report directory: CHECKPOINT-eval next to the file
RELEASED_SPLIT = "every image of the store (a released checkpoint has no split of it)"


def add_released_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags used only when ``RUN`` is a released checkpoint file."""
    parser.add_argument(
        "--model-config",
        default="vilbert-base",
        help="released checkpoint: the preset it was trained with",
    )
    parser.add_argument(
        "--model-config-json",
        default="",
        metavar="FILE",
        help="released checkpoint: a regionflow ModelConfig as JSON (instead of --model-config)",
    )
    parser.add_argument(
        "--text-dir", default="", metavar="DIR", help="released checkpoint: its bert-base-uncased directory"
    )
    parser.add_argument(
        "--answers",
        default="",
        metavar="FILE",
        help="released checkpoint: its VQA answer list (trainval_label2ans.pkl, .json or .txt)",
    )


def load_released_model(
    path: Path, args: argparse.Namespace, store: Any, tasks: list[str], device: torch.device
) -> tuple[Any, dict[str, Any]]:
    """The released model in eval mode and a run description shaped like ``run.json`` for the evaluator.

    Raises:
        EvalInputError: captions asked of a model without a decoder; VQA without ``--answers``.
        model.released.ReleasedCheckpointError: a file, text directory, answer list or store that does not fit.
    """
    from model.config import ModelConfig, preset_config
    from model.released import (
        check_store_feature_dim,
        init_from_released,
        load_answer_list,
        read_released,
        released_config,
    )
    from model.tasks import TaskModel
    from pipelines.evaluate_tasks import EvalInputError
    from schemas.manifest import manifest_digest

    try:
        if args.model_config_json:
            config = ModelConfig.from_dict(json.loads(Path(args.model_config_json).read_text()))
        else:
            text = str(Path(args.text_dir).resolve()) if args.text_dir else ""
            config = preset_config(args.model_config, store.feature_dim, text_checkpoint=text)
    except (ValueError, TypeError) as exc:  # unknown preset or field, invalid value, malformed JSON
        raise EvalInputError(f"model config of the released checkpoint: {exc}") from exc
    check_store_feature_dim(config, store.feature_dim, str(args.store))
    released = read_released(path)
    config = released_config(released, _with_vqa(config, "vqa" in tasks))
    if "vqa" in tasks and not args.answers:
        raise EvalInputError("--task vqa of a released checkpoint needs --answers (its answer list)")
    model = TaskModel(config)
    report = init_from_released(model, released, heads_may_differ=False)
    for task, prefix in (("caption", "caption_decoder."), ("vqa", "vqa_head.")):
        if task in tasks and any(k.startswith(prefix) for k in report.not_in_checkpoint):
            raise EvalInputError(f"{path}: the released model has no {prefix[:-1]}: drop {task} from --task")
    vocab = load_answer_list(args.answers, expected=config.num_answers) if "vqa" in tasks else []
    run_info = {
        "model_config": config.to_dict(),
        "released": report.to_dict(),
        "split": {"holdout_fraction": None, "hash_rule": RELEASED_SPLIT},
        "store": {"manifest_digest": manifest_digest(store.manifest)},
        "vqa": {"answer_vocab": vocab} if vocab else None,
        "train": {},
    }
    return model.to(device).eval(), run_info


def _with_vqa(config: Any, vqa: bool) -> Any:
    import dataclasses

    return dataclasses.replace(config, num_answers=max(1, config.num_answers) if vqa else 0)
