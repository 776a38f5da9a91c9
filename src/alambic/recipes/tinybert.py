"""TinyBERT's transformer distillation (Jiao et al. 2020, arXiv:1909.10351), for encoders and decoders alike.

    L = alpha_embedding * MSE(E_s W_0, E_t)
      + alpha_hidden    * sum_{m=1..M} MSE(H_s[m] W_m, H_t[g(m)])
      + alpha_attention * sum_{m=1..M} (1/h) sum_heads MSE(A_s[m], A_t[g(m)])
      + alpha_prediction * T^2 * KL(softmax(z_t / T) || softmax(z_s / T))

with the layer map g (by default the teacher layers a student was copied from, else uniform g(m) = m N / M; or
explicit), learnable projections W only where the widths differ (dropped at export), hidden-state losses over
non-pad tokens and attention losses over valid query-key pairs only. General distillation on raw text uses the
intermediate terms alone (alpha_prediction = 0), as the paper.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass

import torch
from torch import nn

from alambic.capture import LayerTaps, Projections, count_valid_pairs, valid_pairs
from alambic.errors import AlambicError
from alambic.ranges import ABOVE_ZERO, NON_NEGATIVE, check_ranges
from alambic.losses import attention_mse, hidden_mse
from alambic.losses.vocabulary import fused_vocabulary_loss
from alambic.modeling import has_lm_head, hidden_size, model_kind, num_heads, num_layers, split_lm_head
from alambic.students.layer_map import parse_layer_map
from alambic.students.projections import HiddenProjections


@dataclass
class TinyBERTLossConfig:
    layer_map: str = "auto"
    """Student layer -> teacher layer: auto (copied for a student alambic copied from the teacher, else uniform),
    uniform (m -> m*N/M, 0 = embeddings), last, copied (each layer from the teacher layer it was copied from), or
    pairs such as 0:0,1:4,2:8."""
    alpha_embedding: float = 1.0
    """Weight of the embedding-output MSE (pair 0:0 of the layer map)."""
    alpha_hidden: float = 1.0
    """Weight of the hidden-state MSE, summed over the mapped layers."""
    alpha_attention: float = 1.0
    """Weight of the attention MSE, summed over the mapped layers (needs equal head counts)."""
    attention_target: str = "scores"
    """What the attention loss compares: scores (pre-softmax QK^T/sqrt(d), as TinyBERT) or probs (softmax)."""
    share_projection: bool = False
    """One projection for every mapped layer (the reference implementation) instead of one per layer."""
    alpha_prediction: float = 0.0
    """Weight of the prediction-layer soft targets (0 in general distillation, as the paper)."""
    temperature: float = 1.0
    """Temperature of the prediction-layer soft targets."""

    RANGES: typing.ClassVar[dict] = {"alpha_embedding": NON_NEGATIVE, "alpha_hidden": NON_NEGATIVE,
                                     "alpha_attention": NON_NEGATIVE, "alpha_prediction": NON_NEGATIVE,
                                     "temperature": ABOVE_ZERO}

    def validate(self):
        check_ranges(self, "loss.")
        weights = ("alpha_embedding", "alpha_hidden", "alpha_attention", "alpha_prediction")
        if sum(getattr(self, name) for name in weights) == 0:
            raise AlambicError("all loss weights are 0: set at least one of loss." + ", loss.".join(weights))
        if self.attention_target not in ("scores", "probs"):
            raise AlambicError(f"loss.attention_target must be scores or probs, got {self.attention_target!r}")


def _attention(projections, valid: torch.Tensor, target: str) -> torch.Tensor:
    scores = projections.scores()
    if target == "probs":
        scores = torch.softmax(scores.float().masked_fill(~valid[:, None], float("-inf")), dim=-1).nan_to_num(0.0)
    return scores


class TinyBERTObjective(nn.Module):
    """The student, its projections, and the TinyBERT loss."""

    def __init__(self, student: nn.Module, cfg: TinyBERTLossConfig, pairs: list[tuple[int, int]], teacher_width: int):
        super().__init__()
        self.student = student
        self.cfg = cfg
        self.pairs = pairs
        self.projections = HiddenProjections(
            hidden_size(student.config), teacher_width, [m for m, _ in pairs], shared=cfg.share_projection
        )
        self.head = split_lm_head(student) if cfg.alpha_prediction > 0 else None  # a tuple: not registered twice

    def forward(self, batch: dict, teacher: dict, num_items: dict) -> tuple[torch.Tensor, dict]:
        c, rows, causal = self.cfg, batch["token_positions"], model_kind(self.student) == "causal"
        attention_layers = [m for m, _ in self.pairs if m > 0] if c.alpha_attention > 0 else []
        with LayerTaps(self.student, tuple(m for m, _ in self.pairs), tuple(attention_layers)) as taps:
            final = taps.run(batch)
        zero = rows.new_zeros((), dtype=torch.float32)
        embedding = hidden = attention = prediction = zero
        for m, g in self.pairs:
            student_rows = self.projections(m, taps.hidden[m].flatten(0, 1).index_select(0, rows))
            term = hidden_mse(student_rows, teacher["hidden"][g], num_items["tokens"])
            if m == 0:
                embedding = term
            else:
                hidden = hidden + term
        if attention_layers:
            valid = valid_pairs(batch["attention_mask"], causal)
            for m, g in self.pairs:
                if m > 0:
                    student_attention = _attention(taps.attention(m), valid, c.attention_target)
                    attention = attention + attention_mse(student_attention, teacher["attention"][g], valid,
                                                          num_items["pairs"])
        weighted_prediction = zero
        if c.alpha_prediction > 0:  # soft targets on the LM logits, through the fused vocabulary loss
            (features, projection), tokens = self.head, num_items["tokens"].clamp(min=1)
            weighted_prediction, prediction_sum, _ = fused_vocabulary_loss(
                features(final.flatten(0, 1).index_select(0, rows)), projection, teacher["features"],
                teacher["projection"], None, c.temperature,
                kd_weight=c.alpha_prediction / tokens, ce_weight=0.0,
            )
            prediction = prediction_sum / tokens
        loss = (c.alpha_embedding * embedding + c.alpha_hidden * hidden + c.alpha_attention * attention
                + weighted_prediction)
        return loss, {"embedding": embedding, "hidden": hidden, "attention": attention, "prediction": prediction}


class TinyBERTRecipe:
    """General (or, with alpha_prediction, task) transformer distillation for :func:`alambic.engine.loop.train`."""

    masks_inputs = False

    def __init__(self, teacher: nn.Module, student: nn.Module, loss: TinyBERTLossConfig):
        self.cfg = loss
        self.pairs = parse_layer_map(loss.layer_map, num_layers(student.config), num_layers(teacher.config))
        if loss.alpha_embedding == 0:
            self.pairs = [(m, g) for m, g in self.pairs if m > 0]
        if loss.alpha_attention > 0 and num_heads(student.config) != num_heads(teacher.config):
            raise AlambicError(
                f"the attention loss compares heads one to one, but the student has {num_heads(student.config)} heads "
                f"and the teacher {num_heads(teacher.config)}: give the student --num-heads "
                f"{num_heads(teacher.config)}, set loss.alpha_attention=0, or use --recipe minilm"
            )
        if loss.alpha_prediction > 0 and not (has_lm_head(teacher) and has_lm_head(student)):
            raise AlambicError("loss.alpha_prediction needs language-model heads on teacher and student; set it to 0")
        self.teacher = teacher.eval().requires_grad_(False)
        self.student = student
        self.causal = model_kind(teacher) == "causal"
        self.objective = TinyBERTObjective(student, loss, self.pairs, hidden_size(teacher.config))
        if loss.alpha_prediction > 0:
            self.teacher_head_features, self.teacher_projection = split_lm_head(teacher)

    def row_counts(self, batch: dict) -> dict[str, int]:
        return {"tokens": len(batch["token_positions"]), "pairs": count_valid_pairs(batch["attention_mask"], self.causal)}

    def teacher_targets(self, batch: dict) -> dict:
        c, rows = self.cfg, batch["token_positions"]
        teacher_layers = tuple(g for _, g in self.pairs)
        attention_layers = tuple(g for m, g in self.pairs if m > 0) if c.alpha_attention > 0 else ()
        with torch.inference_mode(), LayerTaps(self.teacher, teacher_layers, attention_layers) as taps:
            final = taps.run(batch)
            hidden = {g: taps.hidden[g].flatten(0, 1).index_select(0, rows) for g in teacher_layers}
            features = (self.teacher_head_features(final.flatten(0, 1).index_select(0, rows))
                        if c.alpha_prediction > 0 else None)
            projections = {g: taps.attention(g) for g in attention_layers}
        # Leave inference mode (the student's losses save these for backward), then derive the rest without autograd.
        targets = {"hidden": {g: h.clone() for g, h in hidden.items()}}
        with torch.no_grad():
            if attention_layers:
                valid = valid_pairs(batch["attention_mask"], self.causal)
                targets["attention"] = {
                    g: _attention(Projections(p.query.clone(), p.key.clone(), p.value), valid, c.attention_target)
                    for g, p in projections.items()
                }
        if features is not None:  # the teacher's vocabulary projection runs inside the fused loss
            targets["features"], targets["projection"] = features.clone(), self.teacher_projection
        return targets
