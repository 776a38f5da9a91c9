"""Task examples -> token features -> batches (the task extension of the batch contract in docs/architecture.md).

Every index a loss needs is computed here, on the CPU, so the training step never asks the device how many rows
count. A batch holds ``input_ids``, ``attention_mask``, ``token_type_ids``, ``token_positions`` (as every batch) and
``feature_ids`` (which features it holds: the key of the teacher-logit cache), plus per task:

| task | keys | rows of the prediction loss |
| --- | --- | --- |
| classification | ``labels`` (B,) | one per example |
| ner | ``label_positions`` (N,): flat ``b * L + t`` of each word's first sub-word; ``label_ids`` (N,) | words |
| qa | ``context_mask`` (B, L) bool; ``start_positions``, ``end_positions`` (B,) | start and end of each example |

``hard_rows`` lists the prediction rows of labelled examples: the hard-label loss averages over those, the
soft-target loss over every row, so unlabelled (transfer-set) examples add soft targets only.

NER labels only the first sub-word of each word (the others are neither trained nor predicted). QA features are
windows of the context (``doc_stride`` tokens of overlap); only context tokens are valid start / end positions,
question, special and padding tokens are masked; training keeps the windows that contain the answer.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np
import torch

from alambic.data.batching import length_grouped_batches
from alambic.data.collate import pad_rows, pad_id_of
from alambic.data.tokenized import tokenize_checked
from alambic.errors import AlambicError


@dataclass
class Feature:
    input_ids: list[int]
    token_type_ids: list[int]
    example: int
    label: int = -1  # classification
    first_subwords: list[int] | None = None  # ner: token index of each labelled word's first sub-word
    words: list[int] | None = None  # ner: the word each of those is
    label_ids: list[int] | None = None  # ner
    context: tuple[int, int] | None = None  # qa: first and last context token
    offsets: list[tuple[int, int]] | None = None  # qa: character span of each token in the context
    start: int = -1  # qa: answer start / end token, -1 when the answer is not in this window
    end: int = -1
    labelled: bool = True  # False: a transfer-set example, trained on the teacher's soft targets only


def _check_fast(tokenizer) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise AlambicError(f"{type(tokenizer).__name__} is a slow tokenizer: NER and QA need a fast (Rust) tokenizer "
                           "for word and character offsets; save the model with its tokenizer.json")


def _types(encoding, i: int) -> list[int]:
    types = encoding.get("token_type_ids")
    return list(types[i]) if types is not None else [0] * len(encoding["input_ids"][i])


def encode(task: str, examples: list, tokenizer, labels: list[str], *, max_length: int = 128, doc_stride: int = 32,
           training: bool = False) -> list[Feature]:
    """Features of ``examples``; ``training`` drops QA windows that do not contain the answer."""
    if max_length < 16:
        raise AlambicError(f"max_length must be at least 16 tokens, got {max_length}")
    label_id = {label: i for i, label in enumerate(labels)}
    if task == "classification":
        return _encode_classification(examples, tokenizer, label_id, max_length)
    _check_fast(tokenizer)
    if task == "ner":
        return _encode_ner(examples, tokenizer, label_id, max_length)
    return _encode_qa(examples, tokenizer, max_length, doc_stride, training)


def _encode_classification(examples, tokenizer, label_id, max_length):
    paired = [e.text_pair is not None for e in examples]
    if any(paired) and not all(paired):
        raise AlambicError("some examples have a text pair and others not: give every example a text_pair or none")
    pairs = all(paired)
    encoding = tokenize_checked(tokenizer, examples, lambda some: tokenizer(
        [e.text for e in some], [e.text_pair for e in some] if pairs else None, truncation=True,
        max_length=max_length), what="example", text_of=lambda e: e.text)
    return [Feature(list(ids), _types(encoding, i), i, label_id.get(examples[i].label, -1),
                    labelled=examples[i].labelled) for i, ids in enumerate(encoding["input_ids"])]


def _encode_ner(examples, tokenizer, label_id, max_length):
    encoding = tokenize_checked(tokenizer, examples, lambda some: tokenizer(
        [e.words for e in some], is_split_into_words=True, truncation=True, max_length=max_length),
        what="sentence", text_of=lambda e: " ".join(e.words))
    features = []
    for i, example in enumerate(examples):
        word_ids = encoding.word_ids(i)
        firsts, words = [], []
        for t, w in enumerate(word_ids):
            if w is not None and (t == 0 or word_ids[t - 1] != w):
                firsts.append(t)
                words.append(w)
        tags = example.tags
        features.append(Feature(list(encoding["input_ids"][i]), _types(encoding, i), i, first_subwords=firsts,
                                words=words, label_ids=[label_id.get(tags[w], -1) if tags else -1 for w in words],
                                labelled=example.labelled))
    return features


def _encode_qa(examples, tokenizer, max_length, doc_stride, training):
    if 2 * doc_stride > max_length:
        raise AlambicError(f"doc_stride ({doc_stride}) must be well below max_length ({max_length}), e.g. a quarter")
    specials = tokenizer.num_special_tokens_to_add(pair=True)
    if not examples:
        return []
    longest = max(range(len(examples)), key=lambda i: len(tokenizer.tokenize(examples[i].question)))
    room = max_length - specials - len(tokenizer.tokenize(examples[longest].question))
    if room <= doc_stride:
        raise AlambicError(f"question {examples[longest].id!r} leaves {max(room, 0)} of max_length {max_length} tokens "
                           f"for the context, not more than doc_stride {doc_stride}: raise --max-length or lower "
                           "--doc-stride")
    encoding = tokenize_checked(tokenizer, examples, lambda some: tokenizer(
        [e.question for e in some], [e.context for e in some], truncation="only_second", max_length=max_length,
        stride=doc_stride, return_overflowing_tokens=True, return_offsets_mapping=True),
        what="question", text_of=lambda e: e.question)
    features = []
    for i, ids in enumerate(encoding["input_ids"]):
        example_index = encoding["overflow_to_sample_mapping"][i]
        example = examples[example_index]
        sequence = encoding.sequence_ids(i)
        context = [t for t, s in enumerate(sequence) if s == 1]
        if not context:
            continue
        first, last = context[0], context[-1]
        offsets = [tuple(o) if sequence[t] == 1 else (0, 0) for t, o in enumerate(encoding["offset_mapping"][i])]
        start = end = -1
        if not example.labelled:  # a transfer-set question: every window, soft targets only
            features.append(Feature(list(ids), _types(encoding, i), example_index, context=(first, last),
                                    offsets=offsets, labelled=False))
            continue
        begin, stop = example.starts[0], example.starts[0] + len(example.answers[0])
        if offsets[first][0] <= begin and offsets[last][1] >= stop:
            start = first
            while start <= last and offsets[start][0] <= begin:
                start += 1
            start -= 1
            end = last
            while end >= first and offsets[end][1] >= stop:
                end -= 1
            end += 1
        if training and start < 0:
            continue
        features.append(Feature(list(ids), _types(encoding, i), example_index, context=(first, last),
                                offsets=offsets, start=start, end=end))
    if not features and any(e.labelled for e in examples):
        raise AlambicError("no QA window holds its answer: raise --max-length or check the answers")
    return features


def features_fingerprint(features: list[Feature]) -> str:
    """Changes whenever the token ids (or their order) change: part of the teacher-logit cache key."""
    digest = hashlib.sha256()
    for f in features:
        digest.update(json.dumps([f.input_ids, f.token_type_ids]).encode())
    return digest.hexdigest()[:16]


def collate(task: str, features: list[Feature], ids: list[int], pad_id: int) -> dict[str, torch.Tensor]:
    """The batch of ``features`` (whose indices are ``ids``) as described in the module docstring."""
    input_ids, attention_mask = pad_rows([f.input_ids for f in features], pad_id)
    token_type_ids, _ = pad_rows([f.token_type_ids for f in features], 0)
    length = input_ids.shape[1]
    batch = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "token_type_ids": token_type_ids,
        "token_positions": attention_mask.reshape(-1).nonzero().squeeze(1),
        "feature_ids": torch.tensor(ids, dtype=torch.long),
        "hard_rows": _labelled_rows(task, features),
    }
    if task == "classification":
        batch["labels"] = torch.tensor([f.label for f in features], dtype=torch.long)
    elif task == "ner":
        batch["label_positions"] = torch.tensor([b * length + t for b, f in enumerate(features)
                                                 for t in f.first_subwords], dtype=torch.long)
        batch["label_ids"] = torch.tensor([y for f in features for y in f.label_ids], dtype=torch.long)
        batch["label_counts"] = torch.tensor([len(f.first_subwords) for f in features], dtype=torch.long)
    else:
        mask = torch.zeros_like(attention_mask, dtype=torch.bool)
        for b, f in enumerate(features):
            mask[b, f.context[0]:f.context[1] + 1] = True
        batch["context_mask"] = mask
        batch["start_positions"] = torch.tensor([f.start for f in features], dtype=torch.long)
        batch["end_positions"] = torch.tensor([f.end for f in features], dtype=torch.long)
    return batch


def _labelled_rows(task: str, features: list[Feature]) -> torch.Tensor:
    """Indices of the prediction rows (see ``prediction_rows``) that have a gold label: the hard loss reads only
    these, the soft-target loss reads every row."""
    if task == "classification":
        rows = [b for b, f in enumerate(features) if f.labelled]
    elif task == "ner":
        rows, offset = [], 0
        for f in features:
            if f.labelled:
                rows.extend(range(offset, offset + len(f.first_subwords)))
            offset += len(f.first_subwords)
    else:
        labelled = [b for b, f in enumerate(features) if f.labelled]
        rows = labelled + [len(features) + b for b in labelled]
    return torch.tensor(rows, dtype=torch.long)


class TaskBatches:
    """Training batches addressed by a global index (the engine's ``BatchSource``): epoch ``index // per_epoch``
    is a seeded, length-grouped shuffle of the features, recomputed (not stored), so resume is exact."""

    def __init__(self, task: str, features: list[Feature], tokenizer, batch_size: int, seed: int):
        if not features:
            raise AlambicError("no training features: the training data is empty")
        self.task, self.features, self.batch_size, self.seed = task, features, batch_size, seed
        self.pad_id = pad_id_of(tokenizer)
        self.lengths = np.array([len(f.input_ids) for f in features])
        self.per_epoch = -(-len(features) // batch_size)
        self._epoch, self._order = None, None

    def __call__(self, index: int) -> dict[str, torch.Tensor]:
        epoch, position = divmod(index, self.per_epoch)
        if epoch != self._epoch:
            self._order = length_grouped_batches(self.lengths, self.batch_size, seed=self.seed, epoch=epoch)
            self._epoch = epoch
        ids = self._order[position]
        return collate(self.task, [self.features[i] for i in ids], ids, self.pad_id)


def evaluation_batches(task: str, features: list[Feature], tokenizer, batch_size: int = 32):
    """Every feature once, longest first (little padding), as ``(ids, batch)`` pairs."""
    pad_id = pad_id_of(tokenizer)
    order = sorted(range(len(features)), key=lambda i: -len(features[i].input_ids))
    for begin in range(0, len(order), batch_size):
        ids = order[begin:begin + batch_size]
        yield ids, collate(task, [features[i] for i in ids], ids, pad_id)
