"""Soft-target losses between teacher and student logits (Hinton et al. 2015; methods.md section 1)."""

import torch
import torch.nn.functional as F

from alambic.losses.reduction import per_item_mean


def soft_target_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    num_items: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """Temperature-softened KL divergence, scaled by T^2.

    ``L = T^2 * sum_rows KL(softmax(z_t / T) || softmax(z_s / T)) / num_items``

    Shapes: ``(N, V), (N, V) -> ()``; one row per token (or example) that counts. The softmax is over the vocabulary
    (last) axis and computed in fp32 whatever the input dtype. ``T^2`` keeps gradient magnitudes comparable across
    temperatures. KL rather than cross-entropy: same gradient, but 0 when the student matches the teacher.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} differ: "
            "teacher and student must share one vocabulary"
        )
    teacher_log_probs = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    student_log_probs = F.log_softmax(student_logits.float() / temperature, dim=-1)
    row_kl = (teacher_log_probs.exp() * (teacher_log_probs - student_log_probs)).sum(dim=-1)
    return per_item_mean(row_kl, num_items) * temperature**2


def logit_mse(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    num_items: int | torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean squared error between logits (the Korean RoBERTa study's prediction-layer loss), in fp32.

    ``L = sum_rows mean_{valid columns} (z_s - z_t)^2 / num_items``

    Shapes: ``(N, C), (N, C) [, mask (N, C) bool] -> ()``; one row per example or token that counts. ``mask`` marks
    the columns that count in each row (for QA: the context positions a start or end may take); without it every
    column counts, which with ``num_items = N`` is ``torch.nn.MSELoss()`` on the rows. Unlike the KL, MSE does not
    ignore a constant shift of the logits: it matches the teacher's logits, not only its distribution.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} differ: "
            "teacher and student must predict the same classes"
        )
    error = (student_logits.float() - teacher_logits.float()).pow(2)
    if mask is None:
        row_error = error.mean(dim=-1)
    else:
        row_error = torch.where(mask, error, torch.zeros((), device=error.device)).sum(dim=-1)
        row_error = row_error / mask.sum(dim=-1).clamp(min=1)
    return per_item_mean(row_error, num_items)


def topk_targets(teacher_logits: torch.Tensor, k: int, temperature: float = 1.0):
    """The teacher's softened distribution kept as its ``k`` most probable classes plus the rest of the mass.

    ``p = softmax(z_t / T)``; returns ``(ids, log_probs, rest_log_prob)``: the top-``k`` class ids ``(N, k)`` (most
    probable first), ``log p`` at those ids ``(N, k)`` and ``log(1 - sum_topk p)`` ``(N,)``, computed as a log-sum-exp
    over the other classes (no cancellation; ``-inf`` when ``k = V``). fp32 whatever the input dtype.
    """
    log_p = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    top = log_p.topk(min(k, log_p.shape[-1]), dim=-1)
    rest = torch.logsumexp(log_p.scatter(-1, top.indices, float("-inf")), dim=-1)
    return top.indices, top.values, rest


def topk_soft_target_kl(
    student_logits: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_log_probs: torch.Tensor,
    rest_log_prob: torch.Tensor,
    temperature: float = 1.0,
    num_items: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """KL from a teacher kept as its top-k classes plus one "rest" class (offline teacher outputs), x T^2.

    With ``K`` the stored ids, ``p_i`` the stored teacher probabilities (at temperature T), ``p_rest = 1 - sum_K p_i``,
    and the student's ``q = softmax(z_s / T)`` grouped the same way, ``q_rest = 1 - sum_K q_i``:

    ``L = T^2 * sum_rows [ sum_{i in K} p_i (log p_i - log q_i) + p_rest (log p_rest - log q_rest) ] / num_items``

    the exact KL between the two distributions over the k + 1 classes (``0 log 0 = 0``), so with ``k = V`` it is
    the full :func:`soft_target_kl`. Its gradient is ``T (q - p~)`` with ``p~ = p`` on ``K`` and the teacher's rest
    mass spread like the student's, ``p~_j = p_rest q_j / q_rest``, off it. Shapes: ``(N, V), (N, k) long,
    (N, k), (N,) -> ()``; fp32 math.
    """
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_q_rest = torch.logsumexp(log_q.scatter(-1, topk_ids, float("-inf")), dim=-1)
    log_p, rest = topk_log_probs.float(), rest_log_prob.float()
    kept = (log_p.exp() * (log_p - log_q.gather(-1, topk_ids))).sum(dim=-1)
    tail = torch.where(rest > float("-inf"), rest.exp() * (rest - log_q_rest), torch.zeros_like(rest))
    return per_item_mean(kept + tail, num_items) * temperature**2
