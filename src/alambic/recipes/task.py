"""Task distillation (fine-tuning stage): a fine-tuned teacher's predictions teach a student the same task.

    L = alpha_ce * L_hard + alpha_kd * L_kd (+ the TinyBERT intermediate terms in the joint stage)

- ``L_kd``: ``distribution_divergence`` (by default the KL of the temperature-softened distributions x T^2, same
  gradient as the soft cross-entropy; or any divergence of :mod:`alambic.losses.divergences`) or ``logit_mse`` (the Korean RoBERTa study) on the prediction rows: one per example for
  classification, one per word (its first sub-word) for NER, and for extractive QA the start rows then the end rows,
  over context positions only, so that the sum over 2B rows divided by 2B is ``(L_start + L_end) / 2``;
- ``L_hard``: cross-entropy with the gold labels on the rows of labelled examples (``alpha_kd = 0`` is plain
  fine-tuning). Unlabelled examples (a transfer set) have prediction rows but no gold label: they count in
  ``L_kd`` only. Each term is normalised by its own row count over the accumulated batch: ``L_kd`` by every
  prediction row, ``L_hard`` by the labelled ones;
- intermediate layers (the ``trm`` stage alone, or the ``joint`` stage together with the prediction loss) reuse
  :class:`alambic.recipes.tinybert.TinyBERTRecipe` as it is: the layer map, projections, hooks and losses.

The teacher's prediction rows come from a :class:`alambic.tasks.cache.TeacherLogitCache` when one is given, so the
teacher runs once per training feature, not once per epoch.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass

import torch
from torch import nn

from alambic.errors import AlambicError
from alambic.ranges import ABOVE_ZERO, NON_NEGATIVE, UNIT_INTERVAL, check_ranges
from alambic.losses import logit_mse, token_cross_entropy
from alambic.losses.divergences import check_divergence, distribution_divergence
from alambic.tasks.models import MASKED, hard_targets, labelled_row_count, prediction_rows, row_count, task_logits

PREDICTION_LOSSES = ("kl", "mse")


@dataclass
class TaskLossConfig:
    prediction_loss: str = "kl"
    """Soft-target loss on the predictions: kl (soft cross-entropy / KL x T^2) or mse (MSE on logits)."""
    temperature: float = 1.0
    """Softmax temperature of the kl loss (unused by mse)."""
    alpha_kd: float = 1.0
    """Weight of the soft-target loss (0: fine-tuning on the gold labels alone)."""
    alpha_ce: float = 1.0
    """Weight of the cross-entropy with the gold labels (on labelled examples only)."""
    divergence: str = "forward_kl"
    """The kl loss's divergence: forward_kl, reverse_kl, jsd, skew_kl, skew_reverse_kl or tvd."""
    divergence_param: float | None = None
    """Its parameter in [0, 1] (jsd's beta, the skew divergences' alpha); empty: the default."""
    # Defaults measured on BBC News validation accuracy (benchmarks/task_quality.py --phase sweep, docs/benchmarks.md):
    # for a narrow student trained from scratch, kd 1 + ce 1 at T = 1 gave 87.8% against 84.5% for soft targets
    # alone at T = 2 and 84.0 / 82.3% with ce at T = 2 / 4; for a student pruned from the teacher all four tied.

    RANGES: typing.ClassVar[dict] = {"temperature": ABOVE_ZERO, "alpha_kd": NON_NEGATIVE, "alpha_ce": NON_NEGATIVE,
                                     "divergence_param": UNIT_INTERVAL}

    def validate(self):
        check_ranges(self)
        if self.prediction_loss not in PREDICTION_LOSSES:
            raise AlambicError(f"prediction loss must be kl or mse, got {self.prediction_loss!r}")
        if self.alpha_kd + self.alpha_ce == 0:
            raise AlambicError("alpha_kd and alpha_ce are both 0: give the prediction stage at least one loss")
        check_divergence(self.divergence, self.divergence_param)
        return self


def _masked(task: str, rows: torch.Tensor, batch: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
    if task != "qa":
        return rows, None
    mask = batch["context_mask"].repeat(2, 1)
    return torch.where(mask, rows.float(), torch.full((), MASKED, device=rows.device)), mask


class TaskObjective(nn.Module):
    """The student, the prediction losses and (joint stage) the TinyBERT objective of the same student."""

    def __init__(self, student: nn.Module, task: str, loss: TaskLossConfig, intermediate: nn.Module | None = None):
        super().__init__()
        self.student, self.task, self.cfg = student, task, loss
        self.intermediate = intermediate

    def forward(self, batch: dict, teacher: dict, num_items: dict) -> tuple[torch.Tensor, dict]:
        c, task = self.cfg, self.task
        rows = prediction_rows(task, task_logits(self.student, task, batch), batch)
        zero = rows.new_zeros((), dtype=torch.float32)
        kd = hard = zero
        if c.alpha_kd > 0:
            teacher_rows, mask = _masked(task, teacher["logits"], batch)
            if c.prediction_loss == "kl":
                kd = distribution_divergence(rows, teacher_rows, c.divergence, c.divergence_param, c.temperature,
                                             num_items["rows"])
            else:
                kd = logit_mse(rows, teacher_rows, num_items["rows"], mask)
        if c.alpha_ce > 0:
            labelled = batch["hard_rows"]
            hard = token_cross_entropy(rows.index_select(0, labelled),
                                       hard_targets(task, batch).index_select(0, labelled), num_items["hard_rows"])
        loss = c.alpha_ce * hard + c.alpha_kd * kd
        terms = {"kd": kd, "hard": hard}
        if self.intermediate is not None:
            extra, extra_terms = self.intermediate(batch, teacher["intermediate"], num_items)
            loss = loss + extra
            terms.update(extra_terms)
        return loss, terms


class TaskRecipe:
    """Prediction-layer task distillation (or, without a teacher, fine-tuning) for :func:`alambic.engine.loop.train`.

    ``intermediate``: a :class:`~alambic.recipes.tinybert.TinyBERTRecipe` of the same teacher and student whose
    terms are added (the joint stage)."""

    def __init__(self, teacher: nn.Module | None, student: nn.Module, task: str, loss: TaskLossConfig, *,
                 cache=None, intermediate=None):
        loss.validate()
        if teacher is None and (loss.alpha_kd > 0 or intermediate is not None):
            raise AlambicError("soft targets need a teacher: give one, or set alpha_kd=0 to fine-tune on the labels")
        self.teacher = teacher.eval().requires_grad_(False) if teacher is not None else None
        self.student, self.task, self.cfg, self.cache = student, task, loss, cache
        self.intermediate = intermediate
        self.objective = TaskObjective(student, task, loss, intermediate.objective if intermediate else None)

    def row_counts(self, batch: dict) -> dict[str, int]:
        counts = {"rows": row_count(self.task, batch), "hard_rows": labelled_row_count(batch)}
        if self.intermediate is not None:
            counts.update(self.intermediate.row_counts(batch))
        return counts

    def teacher_logits(self, batch: dict) -> torch.Tensor:
        device = batch["input_ids"].device
        if self.cache is not None:
            cached = self.cache.get(batch, device)
            if cached is not None:
                return cached
        with torch.inference_mode():
            rows = prediction_rows(self.task, task_logits(self.teacher, self.task, batch), batch)
        rows = rows.clone()  # out of inference mode: the student's losses save it for backward
        if self.cache is not None:
            self.cache.put(batch, rows)
        return rows

    def teacher_targets(self, batch: dict) -> dict:
        targets = {}
        if self.cfg.alpha_kd > 0:
            targets["logits"] = self.teacher_logits(batch)
        if self.intermediate is not None:
            targets["intermediate"] = self.intermediate.teacher_targets(batch)
        return targets
