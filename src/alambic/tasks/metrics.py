"""Task metrics, computed the way the standard tools do.

- classification: accuracy and macro-F1 (the unweighted mean of per-class F1 over every class that occurs in the gold
  labels or the predictions; a class with no true positive has F1 0, as scikit-learn with ``zero_division=0``);
- NER: entity-level precision / recall / F1 (micro over entities), spans read as seqeval's default (conlleval) mode
  does for IOB2: an entity starts at ``B-X``, or at ``I-X`` that does not continue an ``X`` entity (an ``I-`` without
  its ``B-`` starts one), and runs over the following ``I-X``; an entity counts when type, start and end all match;
- QA: SQuAD v1.1 exact match and token F1 after the official normalisation (lowercase, punctuation removed, articles
  a / an / the removed, whitespace collapsed), each the maximum over the gold answers; reported in percent.
"""

from __future__ import annotations

import re
import string
from collections import Counter

from alambic.errors import AlambicError


def accuracy(predictions, golds) -> float:
    if len(predictions) != len(golds):
        raise ValueError(f"{len(predictions)} predictions for {len(golds)} gold labels")
    return sum(p == g for p, g in zip(predictions, golds)) / max(len(golds), 1)


def _f1(tp: int, fp: int, fn: int) -> tuple[float, float, float]:
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


def macro_f1(predictions, golds) -> float:
    classes = set(golds) | set(predictions)
    scores = []
    for c in classes:
        tp = sum(p == c and g == c for p, g in zip(predictions, golds))
        fp = sum(p == c and g != c for p, g in zip(predictions, golds))
        fn = sum(p != c and g == c for p, g in zip(predictions, golds))
        scores.append(_f1(tp, fp, fn)[2])
    return sum(scores) / len(scores) if scores else 0.0


def entities(tags: list[str]) -> set[tuple[str, int, int]]:
    """``{(type, first, last)}`` of an IOB2 tag sequence (inclusive token indices), seqeval-style."""
    found, current = set(), None  # current = [type, first]
    for i, tag in enumerate(list(tags) + ["O"]):
        prefix, kind = (tag[0], tag[2:]) if tag != "O" and len(tag) > 2 and tag[1] == "-" else ("O", "")
        continues = prefix == "I" and current is not None and current[0] == kind
        if current is not None and not continues:
            found.add((current[0], current[1], i - 1))
            current = None
        if prefix in ("B", "I") and not continues:
            current = [kind, i]
    return found


def entity_scores(predicted: list[list[str]], gold: list[list[str]]) -> dict[str, float]:
    """Micro precision / recall / F1 over the entities of every sentence."""
    tp = fp = fn = 0
    for p_tags, g_tags in zip(predicted, gold, strict=True):
        p, g = entities(p_tags), entities(g_tags)
        tp += len(p & g)
        fp += len(p - g)
        fn += len(g - p)
    precision, recall, f1 = _f1(tp, fp, fn)
    return {"precision": precision, "recall": recall, "f1": f1}


_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """The official SQuAD v1.1 normalisation."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def _overlap_f1(predicted, gold) -> float:
    """F1 of the multiset overlap of two sequences (words for SQuAD, characters for KorQuAD)."""
    common = sum((Counter(predicted) & Counter(gold)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(gold)
    return 2 * precision * recall / (precision + recall)


def squad_f1(prediction: str, gold: str) -> float:
    return _overlap_f1(normalize_answer(prediction).split(), normalize_answer(gold).split())


_KORQUAD_SYMBOLS = str.maketrans({c: " " for c in "'\"《》<>〈〉()‘’"})


def normalize_korquad(text: str) -> str:
    """The official KorQuAD 1.0 normalisation: quotes and brackets (ASCII and CJK) to spaces, lower case, ASCII
    punctuation removed, whitespace collapsed; no English articles removed."""
    text = text.translate(_KORQUAD_SYMBOLS).lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    return " ".join(text.split())


def korquad_exact_match(prediction: str, gold: str) -> float:
    return float(normalize_korquad(prediction) == normalize_korquad(gold))


def korquad_f1(prediction: str, gold: str) -> float:
    """KorQuAD 1.0's F1 over characters (spaces excluded), where SQuAD's counts words: Korean words carry particles
    (조사), so a word-level F1 would score "서울에서" against "서울" as 0."""
    return _overlap_f1(normalize_korquad(prediction).replace(" ", ""), normalize_korquad(gold).replace(" ", ""))


QA_METRICS = {"squad": (exact_match, squad_f1), "korquad": (korquad_exact_match, korquad_f1)}


def squad_scores(predictions: list[str], answers: list[list[str]], style: str = "squad") -> dict[str, float]:
    """Exact match and F1 in percent, each the max over an example's gold answers, averaged over examples;
    ``style``: SQuAD v1.1's definitions (word F1) or KorQuAD 1.0's (character F1)."""
    if style not in QA_METRICS:
        raise AlambicError(f"unknown QA metric {style!r}; use one of: {', '.join(QA_METRICS)}")
    match, overlap = QA_METRICS[style]
    em = f1 = 0.0
    for prediction, golds in zip(predictions, answers, strict=True):
        em += max(match(prediction, g) for g in golds)
        f1 += max(overlap(prediction, g) for g in golds)
    n = max(len(predictions), 1)
    return {"exact_match": 100 * em / n, "f1": 100 * f1 / n}
