"""Losses on hidden states."""

import torch
import torch.nn.functional as F

from alambic.losses.reduction import per_item_mean


def cosine_distance(
    student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, num_items: int | torch.Tensor | None = None
) -> torch.Tensor:
    """``L = sum_rows (1 - cos(h_s, h_t)) / num_items`` (DistilBERT's CosineEmbeddingLoss with target 1), in fp32.

    Shapes: ``(N, d), (N, d) -> ()``; rows are non-pad tokens. Both states must have the same width (a student of
    another width needs a projection first).
    """
    if student_hidden.shape != teacher_hidden.shape:
        raise ValueError(
            f"student hidden states {tuple(student_hidden.shape)} and teacher's {tuple(teacher_hidden.shape)} differ: "
            "the cosine loss needs equal widths (set loss.alpha_cos=0 for a narrower student)"
        )
    row_distance = 1.0 - F.cosine_similarity(student_hidden.float(), teacher_hidden.float(), dim=-1, eps=1e-8)
    return per_item_mean(row_distance, num_items)


def hidden_mse(
    student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, num_items: int | torch.Tensor | None = None
) -> torch.Tensor:
    """``L = sum_rows mean_d (h_s - h_t)^2 / num_items`` (TinyBERT's embedding and hidden-state loss), in fp32.

    Shapes: ``(N, d), (N, d) -> ()``; rows are non-pad tokens, so padding never enters the mean (the TinyBERT
    reference averages over pads too). A student of another width is projected to the teacher's first
    (``alambic.students.projections``); with ``num_items = N`` this is ``torch.nn.MSELoss()`` on the rows.
    """
    if student_hidden.shape != teacher_hidden.shape:
        raise ValueError(
            f"student hidden states {tuple(student_hidden.shape)} and teacher's {tuple(teacher_hidden.shape)} differ: "
            "project the student's states to the teacher's width first"
        )
    row_error = (student_hidden.float() - teacher_hidden.float()).pow(2).mean(dim=-1)
    return per_item_mean(row_error, num_items)


def attention_mse(
    student_attention: torch.Tensor,
    teacher_attention: torch.Tensor,
    valid: torch.Tensor,
    num_items: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """TinyBERT's attention loss over the valid query-key pairs only:

    ``L = sum_{(b, i, j) valid} (1/H) sum_h (A_s[b, h, i, j] - A_t[b, h, i, j])^2 / num_items``

    Shapes: ``(B, H, L, L), (B, H, L, L), valid (B, L, L) bool -> ()``. ``A`` are pre-softmax scores ``QK^T/sqrt(d)``
    or probabilities; ``valid`` excludes padded keys, padded query rows and, for causal models, future keys (the
    reference zeroes masked scores but still averages over them). ``num_items`` defaults to the number of valid
    pairs. Teacher and student need the same head count (use the MiniLM relation loss otherwise).
    """
    if student_attention.shape != teacher_attention.shape:
        raise ValueError(
            f"student attention {tuple(student_attention.shape)} and teacher's {tuple(teacher_attention.shape)} "
            "differ: the attention loss needs equal head counts and sequence lengths"
        )
    if num_items is None:
        num_items = valid.sum()
    # Masked entries may hold -inf or garbage: select with where (not multiply) so they cannot turn into NaN.
    pair_error = (student_attention.float() - teacher_attention.float()).pow(2).mean(dim=1)
    pair_error = torch.where(valid, pair_error, torch.zeros((), device=pair_error.device))
    return per_item_mean(pair_error.reshape(-1), num_items)


def attention_relation_kl(
    student_states: torch.Tensor,
    teacher_states: torch.Tensor,
    valid: torch.Tensor,
    num_relation_heads: int,
    num_items: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """MiniLMv2's self-attention relation loss for one of Q, K or V (Wang et al. 2021, arXiv:2012.15828):

    split the concatenated states ``X`` (all heads) into ``R`` relation heads of width ``d / R``;
    ``Rel_r = softmax(X_r X_r^T / sqrt(d / R))`` over the valid keys of each query row;
    ``L = sum_{(b, i) valid rows} (1/R) sum_r KL(Rel_t[b, r, i] || Rel_s[b, r, i]) / num_items``.

    Shapes: ``(B, L, d_s), (B, L, d_t), valid (B, L, L) bool -> ()``; ``d_s`` and ``d_t`` may differ (and so may the
    head counts) as long as both divide by ``R``. A query row is valid when it has a valid key; ``num_items``
    defaults to the number of valid rows.
    """
    rows_valid = valid.any(dim=-1)  # (B, L)
    if num_items is None:
        num_items = rows_valid.sum()
    log_t = _relation_log_probs(teacher_states, valid, num_relation_heads)
    log_s = _relation_log_probs(student_states, valid, num_relation_heads)
    keys = valid[:, None]  # (B, 1, L, L), broadcast over relation heads
    kl = torch.where(keys, log_t.exp() * (log_t - log_s), torch.zeros((), device=log_t.device)).sum(-1)  # (B, R, L)
    row_kl = kl.mean(dim=1)  # mean over relation heads
    row_kl = torch.where(rows_valid, row_kl, torch.zeros((), device=row_kl.device))
    return per_item_mean(row_kl.reshape(-1), num_items)


def _relation_log_probs(states: torch.Tensor, valid: torch.Tensor, heads: int) -> torch.Tensor:
    batch, length, width = states.shape
    if width % heads:
        raise ValueError(f"width {width} does not divide into {heads} relation heads")
    x = states.float().view(batch, length, heads, width // heads).transpose(1, 2)  # (B, R, L, d/R)
    scores = x @ x.transpose(-1, -2) * (width // heads) ** -0.5
    scores = scores.masked_fill(~valid[:, None], float("-inf"))
    # Rows with no valid key (padding) would be all -inf: give them a harmless uniform row, excluded later anyway.
    scores = torch.where(valid[:, None].any(-1, keepdim=True), scores, torch.zeros((), device=scores.device))
    return torch.log_softmax(scores, dim=-1)
