"""Examples -> the batch contract of docs/architecture.md: padded ids plus every index the losses need.

All positions are found here, on the CPU, so the training step never waits on the device to learn how many rows a
loss has. Masks are drawn from a generator seeded per batch: a batch is reproducible (and so resumable) from its
seed alone, and a new seed re-draws the masks (dynamic masking, as in RoBERTa and DistilBERT).
"""

import numpy as np
import torch

from alambic.errors import AlambicError


def smoothed_token_weights(counts, power: float = 0.7) -> np.ndarray:
    """DistilBERT's ``count ** -power`` masking weights: rare tokens get masked more often.

    Unseen tokens count as seen once (the reference's ``max(count, 1)``), so every token has a finite weight.
    """
    return np.maximum(np.asarray(counts, dtype=np.float64), 1.0) ** -power


def pad_id_of(tokenizer) -> int:
    for pad in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if pad is not None:
            return int(pad)
    return 0  # the attention mask, not the id, marks padding


def pad_rows(examples, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest example; the mask comes from lengths, since a pad id may also occur as a token."""
    rows = [torch.as_tensor(np.asarray(e, dtype=np.int64)) for e in examples]
    if not rows:
        raise ValueError("cannot collate an empty list of examples")
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, :len(row)] = row
        attention_mask[i, :len(row)] = 1
    return input_ids, attention_mask


def batch_contract(input_ids, attention_mask, lm_positions, lm_targets) -> dict[str, torch.Tensor]:
    flat_mask = attention_mask.reshape(-1)
    token_positions = flat_mask.nonzero().squeeze(1)
    row_of = torch.cumsum(flat_mask, 0) - 1  # flat position -> its index among non-pad tokens
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "token_positions": token_positions,
        "lm_positions": lm_positions,
        "lm_targets": lm_targets,
        "lm_token_rows": row_of[lm_positions],
    }


class MaskedLMCollator:
    """Dynamic MLM masking: choose ``mlm_probability`` of the maskable tokens; of those, ``mask_ratio`` become
    the mask token, ``random_ratio`` a random non-special token and the rest stay unchanged.

    Uniform mode draws each token independently (at least one per batch, so the MLM loss is never empty);
    with ``token_weights`` exactly ``round(p * maskable)`` positions are drawn without replacement with probability
    proportional to their token's weight, as the DistilBERT reference does.
    """

    def __init__(self, tokenizer, mlm_probability: float = 0.15, mask_ratio: float = 0.8, random_ratio: float = 0.1,
                 token_weights=None):
        if not 0 < mlm_probability <= 1:
            raise AlambicError(f"mlm_probability must be in (0, 1], got {mlm_probability}: use e.g. 0.15")
        if mask_ratio < 0 or random_ratio < 0 or mask_ratio + random_ratio > 1:
            raise AlambicError(f"mask_ratio {mask_ratio} and random_ratio {random_ratio} must be >= 0 and sum to "
                               "at most 1: use e.g. 0.8 and 0.1")
        if tokenizer.mask_token_id is None and mask_ratio > 0:
            raise AlambicError(f"{type(tokenizer).__name__} has no mask token, which masked-LM training needs: "
                               "use an encoder tokenizer or set tokenizer.mask_token")
        self.p, self.mask_ratio, self.random_ratio = mlm_probability, mask_ratio, random_ratio
        self.mask_id = tokenizer.mask_token_id
        self.pad_id = pad_id_of(tokenizer)
        self.special_ids = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long)
        vocab = torch.arange(len(tokenizer))
        self.random_ids = vocab[~torch.isin(vocab, self.special_ids)]
        self.token_weights = None
        if token_weights is not None:
            weights = torch.as_tensor(np.asarray(token_weights, dtype=np.float64))
            if len(weights) < len(tokenizer):
                raise AlambicError(f"token_weights has {len(weights)} entries for a vocabulary of {len(tokenizer)}: "
                                   "compute them from this tokenizer's token counts")
            self.token_weights = weights.clamp_min(1e-12)  # every maskable token stays drawable

    def __call__(self, examples, seed: int) -> dict[str, torch.Tensor]:
        input_ids, attention_mask = pad_rows(examples, self.pad_id)
        generator = torch.Generator().manual_seed(int(seed))
        maskable = attention_mask.bool() & ~torch.isin(input_ids, self.special_ids)
        chosen = self._choose(input_ids, maskable, generator).reshape(-1)
        lm_positions = chosen.nonzero().squeeze(1)  # ascending = row-major
        lm_targets = input_ids.reshape(-1)[lm_positions].clone()

        action = torch.rand(len(lm_positions), generator=generator)
        to_mask = action < self.mask_ratio
        to_random = (action >= self.mask_ratio) & (action < self.mask_ratio + self.random_ratio)
        flat = input_ids.view(-1)
        flat[lm_positions[to_mask]] = self.mask_id if self.mask_id is not None else 0
        picks = torch.randint(len(self.random_ids), (int(to_random.sum()),), generator=generator)
        flat[lm_positions[to_random]] = self.random_ids[picks]
        return batch_contract(input_ids, attention_mask, lm_positions, lm_targets)

    def _choose(self, input_ids, maskable, generator) -> torch.Tensor:
        flat_maskable = maskable.reshape(-1)
        n_maskable = int(flat_maskable.sum())
        chosen = torch.zeros_like(flat_maskable)
        if n_maskable == 0:
            return chosen
        if self.token_weights is None:
            chosen = torch.bernoulli(flat_maskable.double() * self.p, generator=generator).bool()
            if not chosen.any():
                chosen[torch.multinomial(flat_maskable.double(), 1, generator=generator)] = True
            return chosen
        n = max(1, round(self.p * n_maskable))
        weights = self.token_weights[input_ids.reshape(-1)] * flat_maskable
        chosen[torch.multinomial(weights, n, replacement=False, generator=generator)] = True
        return chosen


class CausalLMCollator:
    """Next-token targets: every real token that has a real successor in its row predicts it."""

    def __init__(self, tokenizer):
        self.pad_id = pad_id_of(tokenizer)

    def __call__(self, examples, seed: int = 0) -> dict[str, torch.Tensor]:
        """``seed`` is unused (nothing is random) and accepted so both collators are called the same way."""
        input_ids, attention_mask = pad_rows(examples, self.pad_id)
        has_next = torch.zeros_like(attention_mask, dtype=torch.bool)
        has_next[:, :-1] = attention_mask[:, :-1].bool() & attention_mask[:, 1:].bool()
        lm_positions = has_next.reshape(-1).nonzero().squeeze(1)
        lm_targets = input_ids.reshape(-1)[lm_positions + 1]
        return batch_contract(input_ids, attention_mask, lm_positions, lm_targets)


class PaddingCollator:
    """Encoder text fed as it is (no masking, no hard targets): for losses that read only hidden states or
    attention, as TinyBERT's and MiniLM's general distillation do."""

    def __init__(self, tokenizer):
        self.pad_id = pad_id_of(tokenizer)

    def __call__(self, examples, seed: int = 0) -> dict[str, torch.Tensor]:
        input_ids, attention_mask = pad_rows(examples, self.pad_id)
        empty = torch.zeros(0, dtype=torch.long)
        return batch_contract(input_ids, attention_mask, empty, empty)


class StoredMaskCollator:
    """Encoder examples whose masks were drawn once and stored (static masking, as in a teacher cache): each example
    is ``(input ids with the masks applied, targets: the original token at masked positions, -100 elsewhere)``."""

    def __init__(self, tokenizer):
        self.pad_id = pad_id_of(tokenizer)

    def __call__(self, examples, seed: int = 0) -> dict[str, torch.Tensor]:
        """``seed`` is unused: the masks are the stored ones."""
        input_ids, attention_mask = pad_rows([ids for ids, _ in examples], self.pad_id)
        targets, _ = pad_rows([t for _, t in examples], -100)
        targets = targets.masked_fill(~attention_mask.bool(), -100).reshape(-1)
        lm_positions = (targets != -100).nonzero().squeeze(1)
        return batch_contract(input_ids, attention_mask, lm_positions, targets[lm_positions])
