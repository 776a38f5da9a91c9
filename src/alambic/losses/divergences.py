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
