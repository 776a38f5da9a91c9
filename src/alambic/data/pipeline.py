"""From data specs to the micro-batches the engine and the evaluators read.

Training micro-batch ``i`` is reproducible from ``(seed, i)`` alone: epoch ``i // per_epoch`` fixes the batch plan
and ``seed`` with ``i`` fixes the masks. That is what lets any process fetch its share of a global batch and a
resumed run continue exactly where it stopped.
"""

from __future__ import annotations

import functools
from typing import Callable

from alambic.data.batching import length_grouped_batches, sequential_batches
from alambic.data.chat import ChatCollator, is_chat_data, read_chat, tokenize_chat
from alambic.data.collate import CausalLMCollator, MaskedLMCollator, PaddingCollator, smoothed_token_weights
from alambic.data.tokenized import build_or_load, encoder_chunks, packed_blocks
from alambic.errors import AlambicError


class IndexedBatches:
    """An endless stream of collated micro-batches addressed by index, epoch after epoch."""

    def __init__(self, examples, collator, plan: Callable[[int], list[list[int]]], seed: int):
        self.examples, self.collator, self.plan, self.seed = examples, collator, plan, seed
        self._epoch, self._batches = 0, plan(0)
        self.per_epoch = len(self._batches)

    def __call__(self, index: int) -> dict:
        return self.collator(self.examples_at(index), seed=self.batch_seed(index))

    def examples_at(self, index: int) -> list:
        """The examples of micro-batch ``index``, before collation."""
        epoch, position = divmod(index, self.per_epoch)
        if epoch != self._epoch:  # micro-batches are read in order, so one epoch's plan is kept at a time
            self._epoch, self._batches = epoch, self.plan(epoch)
        return [self.examples[i] for i in self._batches[position]]

    def batch_seed(self, index: int) -> int:
        return self.seed * 1_000_003 + index


def is_chat(specs, data_cfg) -> bool:
    """Whether ``specs`` are read as conversations (``data.format``: chat, text, or auto: chat records found)."""
    if data_cfg.format != "auto":
        return data_cfg.format == "chat"
    return is_chat_data(specs)


def _examples(specs, tokenizer, kind: str, data_cfg):
    if is_chat(specs, data_cfg):
        if kind != "causal":
            raise AlambicError("chat data trains decoders (causal LMs); this model is an encoder: give raw text, or a "
                               "decoder teacher")
        return None, tokenize_chat(read_chat(specs, need_response=True), tokenizer, data_cfg.max_length)
    corpus = build_or_load(list(specs), tokenizer, text_field=data_cfg.text_field, split_documents=data_cfg.split_documents)
    if kind == "causal":
        return corpus, packed_blocks(corpus, tokenizer, data_cfg.max_length)
    return corpus, encoder_chunks(corpus, tokenizer, data_cfg.max_length, min_tokens=data_cfg.min_tokens)


def training_examples(specs, tokenizer, kind: str, data_cfg):
    """The examples ``training_batches`` draws from: packed blocks (decoders) or document chunks (encoders)."""
    return _examples(specs, tokenizer, kind, data_cfg)[1]


def _collator(corpus, tokenizer, kind: str, masking):
    """Next-token targets for decoders; for encoders, dynamic masking when ``masking`` (an object with
    ``mlm_probability`` and ``mlm_smoothing``) is given, plain unmasked text otherwise."""
    if corpus is None:
        return ChatCollator(tokenizer)
    if kind == "causal":
        return CausalLMCollator(tokenizer)
    if masking is None:
        return PaddingCollator(tokenizer)
    weights = None
    if masking.mlm_smoothing is not None:
        weights = smoothed_token_weights(corpus.token_counts(), power=masking.mlm_smoothing)
    return MaskedLMCollator(tokenizer, mlm_probability=masking.mlm_probability, token_weights=weights)


def training_batches(specs, tokenizer, kind: str, data_cfg, masking, batch_size: int, seed: int) -> IndexedBatches:
    """Length-grouped batches of encoder chunks or conversations, or shuffled packed blocks of decoder text."""
    corpus, examples = _examples(specs, tokenizer, kind, data_cfg)
    if corpus is not None and kind == "causal":
        plan = functools.partial(sequential_batches, len(examples), batch_size, seed=seed)
    else:
        plan = functools.partial(length_grouped_batches, examples.lengths, batch_size, seed=seed)
    return IndexedBatches(examples, _collator(corpus, tokenizer, kind, masking), lambda epoch: plan(epoch=epoch), seed)


def heldout_batches(specs, tokenizer, kind: str, data_cfg, batch_size: int = 8, seed: int = 0) -> list[dict]:
    """Fixed held-out micro-batches (same order and masks on every call), up to ``data_cfg.eval_max_tokens`` tokens."""
    corpus, examples = _examples(specs, tokenizer, kind, data_cfg)
    collator = _collator(corpus, tokenizer, kind, None) if kind == "causal" else MaskedLMCollator(tokenizer)
    batches, tokens = [], 0
    for start in range(0, len(examples), batch_size):
        batch = collator([examples[i] for i in range(start, min(start + batch_size, len(examples)))], seed=seed + start)
        batches.append(batch)
        tokens += len(batch["token_positions"])
        if tokens >= data_cfg.eval_max_tokens:
            break
    return batches
