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
