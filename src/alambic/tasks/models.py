"""Task models: load any encoder with a task head (fresh when the checkpoint has none), run it, pick loss rows.

The task is read from the saved class (``architectures``: ``*ForSequenceClassification``, ``*ForTokenClassification``,
``*ForQuestionAnswering``) and the label set from ``config.id2label``, both written by ``save_pretrained``.
"""

from __future__ import annotations

import torch

from alambic.errors import AlambicError
from alambic.modeling import head_auto_class, model_inputs

HEAD_SUFFIX = {"classification": "ForSequenceClassification", "ner": "ForTokenClassification",
               "qa": "ForQuestionAnswering"}
MASKED = -1e4
"""The logit given to positions that cannot be an answer (finite, so KL and cross-entropy stay NaN-free)."""


def head_task(config_or_model) -> str | None:
    """The task of a model's head, from its class or saved ``architectures``; None for a model without one."""
    names = []
    if isinstance(config_or_model, torch.nn.Module):
        names.append(type(config_or_model).__name__)
        config_or_model = config_or_model.config
    names += list(getattr(config_or_model, "architectures", None) or [])
    for name in names:
        for task, suffix in HEAD_SUFFIX.items():
            if name.endswith(suffix):
                return task
    return None


def model_labels(model_or_config) -> list[str]:
    config = getattr(model_or_config, "config", model_or_config)
    id2label = {int(k): v for k, v in (config.id2label or {}).items()}
    return [id2label[i] for i in range(len(id2label))]


def load_task_model(spec, task: str, labels: list[str] | None = None, *, role: str = "model",
                    need_head: bool = False):
    """``(model, tokenizer, path)``: a float32 ``AutoModelFor<task>`` of ``spec``.

    A checkpoint with this task's head keeps it, and its labels must equal ``labels`` when given; a checkpoint
    without a task head (a pre-trained or general-distilled encoder) gets a fresh head for ``labels`` unless
    ``need_head`` (a teacher must be fine-tuned). A head for another task is refused.
    """
    from transformers import AutoConfig, AutoTokenizer

    from alambic.teachers import _quiet_transformers, resolve_model_path

    path = resolve_model_path(spec)
    config = AutoConfig.from_pretrained(path)
    found = head_task(config)
    if found is not None and found != task:
        raise AlambicError(f"{role} {spec} was fine-tuned for {found}, not {task}: give a {task} model "
                           f"(make one with `alambic finetune --task {task}`) or use --task {found}")
    kwargs = {}
    if found == task:
        saved = model_labels(config)
        if task != "qa" and labels is not None and saved != list(labels):
            raise AlambicError(f"{role} {spec} predicts the labels [{', '.join(saved)}] but the data needs "
                               f"[{', '.join(labels)}]: use a {role} fine-tuned on this label set")
    elif need_head:
        raise AlambicError(f"{role} {spec} has no {task} head: fine-tune it first with "
                           f"`alambic finetune --task {task} --model {spec} ...` and give that folder")
    elif task == "qa":
        kwargs = {"num_labels": 2}
    else:
        if not labels:
            raise AlambicError(f"{role} {spec} has no {task} head and no label set was given")
        kwargs = {"num_labels": len(labels), "id2label": dict(enumerate(labels)),
                  "label2id": {label: i for i, label in enumerate(labels)}}
    try:
        with _quiet_transformers():
            model = head_auto_class(task).from_pretrained(path, dtype=torch.float32, **kwargs)
    except ValueError as error:
        raise AlambicError(f"{role} {spec} ({config.model_type}) has no {task} head class in transformers: "
                           f"{str(error).splitlines()[0]}") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as error:
        raise AlambicError(f"{path} has no usable tokenizer ({str(error).splitlines()[0]}); save one next to the model")
    return model, tokenizer, path


def load_evaluated_model(spec, task: str):
    """``(model, tokenizer, parameters)`` of a task model to evaluate: a model or run folder in PyTorch (as
    :func:`load_task_model` with ``need_head``), or an ``alambic export`` folder in its own runtime."""
    from alambic.export.runtime import export_folder, load_exported, read_manifest

    folder = export_folder(spec)
    if folder is None:
        from alambic.students import count_parameters

        model, tokenizer, _ = load_task_model(spec, task, role="model", need_head=True)
        return model, tokenizer, count_parameters(model)
    from transformers import AutoTokenizer

    manifest = read_manifest(folder)
    if manifest["head"] != task:
        raise AlambicError(f"{spec} is an export of a {manifest['head']} model, not a {task} one: give the export "
                           f"of a model fine-tuned for {task}")
    return load_exported(folder, manifest), AutoTokenizer.from_pretrained(folder), manifest["parameters"]["total"]


def task_logits(model: torch.nn.Module, task: str, batch: dict) -> torch.Tensor:
    """``(B, C)`` class logits, ``(B, L, C)`` token logits, or ``(2, B, L)`` start / end logits.

    ``token_type_ids`` are passed only to models that have more than one token type (see
    :func:`alambic.modeling.model_inputs`)."""
    output = model(**model_inputs(model, batch))
    if task == "qa":
        return torch.stack([output.start_logits, output.end_logits])
    return output.logits


def prediction_rows(task: str, logits: torch.Tensor, batch: dict) -> torch.Tensor:
    """The rows the prediction losses read: one per example (classification), per first sub-word (ner), or the
    start rows of every example then their end rows (qa; ``(2B, L)``, non-context positions set to ``MASKED``)."""
    if task == "classification":
        return logits
    if task == "ner":
        return logits.flatten(0, 1).index_select(0, batch["label_positions"])
    mask = batch["context_mask"].repeat(2, 1)
    return torch.where(mask, logits.flatten(0, 1).float(), torch.full((), MASKED, device=logits.device))


def hard_targets(task: str, batch: dict) -> torch.Tensor:
    if task == "classification":
        return batch["labels"]
    if task == "ner":
        return batch["label_ids"]
    return torch.cat([batch["start_positions"], batch["end_positions"]])


def labelled_row_count(batch: dict) -> int:
    """Rows with a gold label (``hard_rows``): what the hard loss averages over."""
    return len(batch["hard_rows"])


def row_count(task: str, batch: dict) -> int:
    if task == "classification":
        return len(batch["labels"])
    if task == "ner":
        return len(batch["label_positions"])
    return 2 * len(batch["start_positions"])
