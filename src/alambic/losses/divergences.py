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
