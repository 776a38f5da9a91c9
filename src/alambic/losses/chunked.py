"""Vocabulary-sized losses with bounded logits memory.

For N rows and a vocabulary of V, computing all logits at once materialises several (N, V) tensors (student and
teacher logits, log-probabilities, gradients): 8 x 4,096 tokens of a 128k vocabulary is 16 GB per fp32 copy. Past
``chunk_rows`` rows, the vocabulary projection runs inside the loss a chunk of rows at a time under activation
checkpointing: each chunk's logits are freed after its forward and recomputed during backward, so at most one chunk
of logits is alive. The price is one extra projection per row in the backward pass, paid only past ``chunk_rows``.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.utils.checkpoint import checkpoint

from alambic.losses.divergences import soft_target_kl
from alambic.losses.language_modeling import token_cross_entropy

Head = Callable[[torch.Tensor], torch.Tensor]


def _sums(student_hidden, teacher_hidden, targets, student_head: Head, teacher_head: Head | None, temperature):
    student_logits = student_head(student_hidden)
    kd = student_logits.new_zeros((), dtype=torch.float32)
    if teacher_head is not None:
        with torch.no_grad():
            teacher_logits = teacher_head(teacher_hidden)
        kd = soft_target_kl(student_logits, teacher_logits, temperature, num_items=1)
    return torch.stack((kd, token_cross_entropy(student_logits, targets, num_items=1)))


def vocabulary_losses(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor | None,
    targets: torch.Tensor,
    student_head: Head,
    teacher_head: Head | None,
    temperature: float,
    chunk_rows: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row sums of the two vocabulary losses, from hidden rows (the heads applied here):

    ``kd_sum = T^2 * sum_rows KL(softmax(teacher_head(h_t) / T) || softmax(student_head(h_s) / T))``
    ``ce_sum = sum_{rows with target != -100} -log softmax(student_head(h_s))[target]``

    i.e. :func:`soft_target_kl` and :func:`token_cross_entropy` with ``num_items=1``; callers divide by their own
    ``num_items``. Shapes: ``(N, d_s), (N, d_t), (N,) -> (), ()``. ``teacher_head=None`` skips the KL.
    ``chunk_rows > 0``: beyond that many rows, compute in checkpointed chunks (same values and gradients).
    """
    rows = student_hidden.shape[0]
    if chunk_rows <= 0 or rows <= chunk_rows:
        total = _sums(student_hidden, teacher_hidden, targets, student_head, teacher_head, temperature)
        return total[0], total[1]
    total = student_hidden.new_zeros(2, dtype=torch.float32)
    for start in range(0, rows, chunk_rows):
        chunk = slice(start, start + chunk_rows)
        teacher_chunk = teacher_hidden[chunk] if teacher_hidden is not None else None
        total = total + checkpoint(_sums, student_hidden[chunk], teacher_chunk, targets[chunk], student_head,
                                   teacher_head, temperature, use_reentrant=False)
    return total[0], total[1]
