"""Predictions of a task model on examples, and their metrics (:mod:`alambic.tasks.metrics`)."""

from __future__ import annotations

import torch

from alambic.modeling import model_device
from alambic.tasks import metrics
from alambic.tasks.features import Feature, evaluation_batches
from alambic.tasks.models import prediction_rows, task_logits

MAIN_METRIC = {"classification": "accuracy", "ner": "f1", "qa": "f1"}
MAX_ANSWER_TOKENS = 30
N_BEST = 20


@torch.no_grad()
def _feature_outputs(model, task: str, features: list[Feature], tokenizer, batch_size: int) -> list[torch.Tensor]:
    was_training = model.training
    model.eval()
    device = model_device(model)
    outputs: list[torch.Tensor | None] = [None] * len(features)
    try:
        for ids, batch in evaluation_batches(task, features, tokenizer, batch_size):
            batch = {k: v.to(device) for k, v in batch.items()}
            logits = task_logits(model, task, batch)
            if task == "classification":
                pieces = list(logits.float().cpu())
            elif task == "ner":
                rows = prediction_rows(task, logits, batch).float().cpu()
                pieces = list(rows.split(batch["label_counts"].tolist()))
            else:
                pieces = list(logits.float().cpu().transpose(0, 1))  # (2, L) per feature
            for i, piece in zip(ids, pieces):
                outputs[i] = piece
    finally:
        model.train(was_training)
    return outputs


def _best_span(start: torch.Tensor, end: torch.Tensor, feature: Feature) -> tuple[float, int, int] | None:
    first, last = feature.context
    starts = torch.topk(start[first:last + 1], min(N_BEST, last - first + 1)).indices.tolist()
    ends = torch.topk(end[first:last + 1], min(N_BEST, last - first + 1)).indices.tolist()
    best = None
    for s in starts:
        for e in ends:
            if s <= e < s + MAX_ANSWER_TOKENS:
                score = float(start[first + s] + end[first + e])
                if best is None or score > best[0]:
                    best = (score, first + s, first + e)
    return best


def predict(model, task: str, examples: list, features: list[Feature], tokenizer, labels: list[str],
            batch_size: int = 32) -> list:
    """One prediction per example: a label, a tag per word, or an answer text (best span over its windows)."""
    outputs = _feature_outputs(model, task, features, tokenizer, batch_size)
    if task == "classification":
        predictions = [None] * len(examples)
        for feature, logits in zip(features, outputs):
            predictions[feature.example] = labels[int(logits.argmax())]
        return predictions
    if task == "ner":
        predictions = [["O"] * len(e.words) for e in examples]  # words cut off by max_length count as O
        for feature, rows in zip(features, outputs):
            for word, label in zip(feature.words, rows.argmax(dim=-1).tolist()):
                predictions[feature.example][word] = labels[label]
        return predictions
    best: list[tuple[float, str] | None] = [None] * len(examples)
    for feature, logits in zip(features, outputs):
        span = _best_span(logits[0], logits[1], feature)
        if span is not None and (best[feature.example] is None or span[0] > best[feature.example][0]):
            context = examples[feature.example].context
            text = context[feature.offsets[span[1]][0]:feature.offsets[span[2]][1]]
            best[feature.example] = (span[0], text)
    return [b[1] if b is not None else "" for b in best]


def score(task: str, examples: list, predictions: list, qa_metric: str = "squad") -> dict[str, float]:
    if task == "classification":
        golds = [e.label for e in examples]
        return {"accuracy": metrics.accuracy(predictions, golds), "macro_f1": metrics.macro_f1(predictions, golds)}
    if task == "ner":
        return metrics.entity_scores(predictions, [e.tags for e in examples])
    return metrics.squad_scores(predictions, [e.answers for e in examples], qa_metric)


def evaluate_task(model, task: str, examples: list, features: list[Feature], tokenizer, labels: list[str],
                  batch_size: int = 32, qa_metric: str = "squad") -> dict[str, float]:
    """accuracy and macro_f1 / precision, recall and f1 (entities) / exact_match and f1 (percent; SQuAD's or
    KorQuAD's definitions, ``qa_metric``)."""
    return score(task, examples, predict(model, task, examples, features, tokenizer, labels, batch_size), qa_metric)
