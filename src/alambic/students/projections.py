"""Learnable maps from the student's hidden width to the teacher's (TinyBERT's W_e and W_h).

They exist only for training: they live in the recipe's objective, are saved beside checkpoints for resuming, and
never enter the exported student.
"""

from __future__ import annotations

import torch
from torch import nn


class HiddenProjections(nn.Module):
    """One ``Linear(d_student, d_teacher)`` per mapped layer, or a single shared one (as the TinyBERT reference);
    nothing at all when the widths are equal."""

    def __init__(self, student_width: int, teacher_width: int, layers: list[int], shared: bool = False):
        super().__init__()
        self.identity = student_width == teacher_width
        if self.identity:
            return
        if shared:
            self.shared = nn.Linear(student_width, teacher_width)
        else:
            self.per_layer = nn.ModuleDict({str(m): nn.Linear(student_width, teacher_width) for m in layers})

    def forward(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        if self.identity:
            return hidden
        if hasattr(self, "shared"):
            return self.shared(hidden)
        return self.per_layer[str(layer)](hidden)
