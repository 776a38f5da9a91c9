"""Batched sampling from a causal LM with a KV cache: ids in, ids out.

``generate`` (sequence-level distillation), on-policy distillation and chat evaluation all need many answers to
many prompts, fast and reproducibly. :func:`sample` runs one left-padded batch: one prefill forward over the
prompts, then one forward of a single token per row per step, reusing the keys and values of everything before it
(a transformers ``DynamicCache``). Positions come from the attention mask, so a padded row sees the positions it
would see alone and its greedy answer is the one it gets unpadded. Rows that have produced an end-of-sequence id
are finished: they are fed padding (masked out) until every row is finished or ``max_new_tokens`` is reached.

Randomness comes only from ``generator``: one uniform number per row per step, drawn on the generator's own device
(a CPU generator works for a model on a GPU: the numbers are drawn on the CPU and copied, a few bytes a step),
turned into a token by inverting the cumulative distribution on the model's device. The same generator state thus
gives the same tokens on any device the model runs on, up to floating-point differences in the logits. Nothing is
re-tokenised: prompts are token ids and so are the answers.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

import torch

from alambic.errors import AlambicError


def _eos_set(eos_token_ids) -> list[int]:
    if eos_token_ids is None:
        return []
    if isinstance(eos_token_ids, int):
        return [eos_token_ids]
    return sorted({int(i) for i in eos_token_ids})


def left_pad(prompts: list[list[int]], pad_token_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` of ``prompts`` padded on the left to the longest (generation appends on the
    right, so every row's last prompt token sits in the last column)."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        if len(prompt):
            ids[row, width - len(prompt):] = torch.as_tensor(prompt, dtype=torch.long)
            mask[row, width - len(prompt):] = 1
    return ids.to(device), mask.to(device)


@functools.lru_cache(maxsize=None)
def _forward_names(model_type: type) -> tuple[str, bool]:
    """The name of the cache argument (``cache`` in transformers >= 5.x, ``past_key_values`` before) and whether
    the forward takes ``logits_to_keep`` (prefill then computes the vocabulary projection of the last token only)."""
    params = inspect.signature(model_type.forward).parameters
    return ("cache" if "cache" in params else "past_key_values"), "logits_to_keep" in params


def _new_cache(model):
    from transformers import DynamicCache

    try:  # sliding-window layers (Qwen2 with use_sliding_window) need the config
        return DynamicCache(config=getattr(model, "config", None))
    except TypeError:  # older transformers
        return DynamicCache()


def _uniform(rows: int, generator: torch.Generator | None, device) -> torch.Tensor:
    where = generator.device if generator is not None else torch.device("cpu")
    return torch.rand(rows, generator=generator, device=where, dtype=torch.float64).to(device)


def pick_tokens(logits: torch.Tensor, temperature: float, top_p: float,
                generator: torch.Generator | None) -> torch.Tensor:
    """One token per row of ``logits`` (rows, vocab): the argmax when ``temperature`` is 0, else a draw from
    softmax(logits / temperature) restricted to the smallest set of most probable tokens whose mass reaches
    ``top_p`` (the most probable token always kept, so ``top_p`` -> 0 is greedy)."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    order = None
    if top_p < 1:
        probs, order = probs.sort(dim=-1, descending=True, stable=True)  # ties: lowest id first, as argmax
        before = probs.cumsum(-1) - probs  # the mass of the more probable tokens
        keep = before < top_p
        keep[:, 0] = True
        probs = probs * keep
    cdf = probs.double().cumsum(-1)
    u = _uniform(len(probs), generator, probs.device) * cdf[:, -1]
    index = torch.searchsorted(cdf, u[:, None], right=True).clamp_(max=probs.shape[-1] - 1)
    return (order.gather(-1, index) if order is not None else index).squeeze(-1)


@dataclass
class Prefix:
    """What a causal LM has read so far, row by row: its keys and values (``cache``), the attention mask over them
    and the position each row's next token takes. :func:`prefill` makes one, :func:`extend` reads more tokens."""

    cache: object
    mask: torch.Tensor
    next_position: torch.Tensor
    cache_arg: str

    def select(self, rows: torch.Tensor) -> None:
        """Keep (and repeat) the given rows, in that order: several continuations of one prompt share its prefill."""
        self.cache.reorder_cache(rows.to(self.mask.device))
        self.mask = self.mask[rows]
        self.next_position = self.next_position[rows]


def prefill(model, prompts: list[list[int]], pad_token_id: int) -> tuple[torch.Tensor, Prefix]:
    """``(logits, prefix)``: one forward over the left-padded ``prompts`` keeping their keys and values; ``logits``
    (rows, vocab) are each prompt's next-token logits. Positions come from the attention mask, so a padded row sees
    the positions it would see alone."""
    from alambic.modeling import model_device

    device = model_device(model)
    inner = getattr(model, "module", model)  # a DDP-wrapped student: its model's signature and config
    cache_arg, has_logits_to_keep = _forward_names(type(inner))
    ids, mask = left_pad(prompts, pad_token_id, device)
    positions = (mask.cumsum(-1) - 1).clamp_(min=0)  # pads get position 0; they are masked out anyway
    cache = _new_cache(inner)
    extra = {"logits_to_keep": 1} if has_logits_to_keep else {}
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                   **{cache_arg: cache}, **extra).logits[:, -1]
    return logits, Prefix(cache, mask, positions[:, -1:] + 1, cache_arg)


def extend(model, prefix: Prefix, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The logits (rows, time, vocab) of ``ids`` (rows, time) read after ``prefix``, which then holds them too.
    ``mask`` marks real tokens; padding goes on the right (or is a finished row's repeated token), never read."""
    mask = torch.cat([prefix.mask, mask.to(prefix.mask)], dim=1)
    positions = prefix.next_position + torch.arange(ids.shape[1], device=prefix.next_position.device)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                   **{prefix.cache_arg: prefix.cache}).logits
    prefix.mask, prefix.next_position = mask, prefix.next_position + ids.shape[1]
    return logits


@torch.inference_mode()
def _sample(model, prompts, max_new_tokens, temperature, top_p, eos, pad_token_id, generator) -> list[list[int]]:
    logits, prefix = prefill(model, prompts, pad_token_id)
    eos_ids = torch.tensor(eos, dtype=torch.long, device=logits.device)
    finished = torch.zeros(len(prompts), dtype=torch.bool, device=logits.device)
    steps = []
    for step in range(max_new_tokens):
        token = pick_tokens(logits, temperature, top_p, generator)
        token = token.masked_fill(finished, pad_token_id)
        steps.append(token)
        if len(eos):
            finished |= torch.isin(token, eos_ids)
        if step == max_new_tokens - 1 or bool(finished.all()):
            break
        # a row that just finished feeds its EOS once more, masked: its outputs are no longer read
        logits = extend(model, prefix, token[:, None], (~finished).long()[:, None])[:, -1]
    tokens = torch.stack(steps, dim=1).tolist() if steps else [[] for _ in prompts]
    out = []
    eos_set = set(eos)
    for row in tokens:
        end = next((i + 1 for i, t in enumerate(row) if t in eos_set), len(row))
        out.append(row[:end])
    return out


def sample(model, prompts: list[list[int]], *, max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0,
           eos_token_ids: list[int] | int | None, pad_token_id: int, generator: torch.Generator | None = None,
           ) -> list[list[int]]:
    """The new token ids ``model`` (a causal LM) writes after each prompt, in one batch.

    Each answer ends with its first end-of-sequence id (one of ``eos_token_ids``) when one was produced, and holds
    at most ``max_new_tokens`` ids. ``temperature`` 0 is greedy decoding; otherwise tokens are drawn from the
    softened distribution cut to its ``top_p`` nucleus, with every random number from ``generator`` (None: torch's
    global CPU generator). The model runs in eval mode under ``torch.inference_mode`` and gets its training mode
    back afterwards.
    """
    if max_new_tokens < 0:
        raise AlambicError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise AlambicError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
    if not 0 <= top_p <= 1:
        raise AlambicError(f"top_p must be in [0, 1], got {top_p}")
    prompts = [list(p) for p in prompts]
    empty = [i for i, p in enumerate(prompts) if not p]
    if empty:
        raise AlambicError(f"prompt {empty[0]} has no tokens: every prompt needs at least one (e.g. the BOS id)")
    if not prompts or max_new_tokens == 0:
        return [[] for _ in prompts]
    training = model.training
    model.eval()
    try:
        return _sample(model, prompts, max_new_tokens, temperature, top_p, _eos_set(eos_token_ids), pad_token_id,
                       generator)
    finally:
        model.train(training)


def sample_batched(model, prompts: list[list[int]], batch_size: int, **options) -> list[list[int]]:
    """:func:`sample` over any number of prompts, ``batch_size`` at a time, longest first (sorting by length keeps
    padding small; a too-large batch fails on the first one); the answers come back in the input order. The
    batches draw from the same ``generator`` in turn, so its state fixes every answer."""
    if batch_size < 1:
        raise AlambicError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    answers: list[list[int]] = [[] for _ in prompts]
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        for i, answer in zip(chunk, sample(model, [prompts[i] for i in chunk], **options)):
            answers[i] = answer
    return answers
