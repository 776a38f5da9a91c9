"""Distillation losses: small pure functions on the rows that count.

Every loss takes rows already selected by the caller (``(N, V)`` logits or ``(N, d)`` hidden states), sums its
per-row values and divides by ``num_items``: by default the ``N`` rows given, and in training the row count of the
whole accumulated (and, under DDP, global) batch, so that gradient accumulation does not change the loss.
"""

from alambic.losses.divergences import (
    DEFAULT_DIVERGENCE_PARAMS, DIVERGENCES, check_divergence, distribution_divergence, divergence_logit_gradient,
    divergence_rows, logit_mse, resolve_divergence_param, soft_target_kl, topk_divergence, topk_soft_target_kl,
    topk_targets,
)
from alambic.losses.features import attention_mse, attention_relation_kl, cosine_distance, hidden_mse
from alambic.losses.language_modeling import token_cross_entropy

__all__ = [
    "DEFAULT_DIVERGENCE_PARAMS", "DIVERGENCES", "attention_mse", "attention_relation_kl", "check_divergence",
    "cosine_distance", "distribution_divergence", "divergence_logit_gradient", "divergence_rows", "hidden_mse",
    "logit_mse", "resolve_divergence_param", "soft_target_kl", "token_cross_entropy", "topk_divergence",
    "topk_soft_target_kl", "topk_targets",
]
