"""DistilBERT's triple loss (Sanh et al. 2019, arXiv:1910.01108), for encoders and decoders alike.

    L = alpha_kd * D_T(teacher, student) * T^2  +  alpha_lm * CE(labels)  +  alpha_cos * (1 - cos(h_t, h_s))

- D is the forward KL of DistilBERT by default, or any divergence of :mod:`alambic.losses.divergences`
  (``loss.divergence``: reverse KL, generalised JSD, skew KL, skew reverse KL, total variation);
- soft targets on the LM logits of every non-pad token, or of the rows with a hard target only (``loss.kd_rows=masked``:
  masked tokens for MLM, assistant tokens for chat data, which ``auto`` picks);
- the hard loss is masked-LM cross-entropy for encoders and next-token cross-entropy for decoders (DistilGPT2);
- the cosine term aligns the last hidden states of non-pad tokens (same width only).
The vocabulary projection runs only on the rows a loss reads; the teacher runs under inference_mode.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass

import torch
from torch import nn

from alambic.errors import AlambicError
from alambic.ranges import ABOVE_ZERO, NON_NEGATIVE, PROBABILITY, UNIT_INTERVAL, check_ranges
from alambic.losses import cosine_distance
from alambic.losses.divergences import check_divergence
from alambic.losses.vocabulary import fused_vocabulary_loss
from alambic.modeling import has_lm_head, hidden_size, lm_body, split_lm_head


KD_ROWS = ("auto", "tokens", "masked")


@dataclass
class DistilBERTLossConfig:
    alpha_kd: float = 5.0
    """Weight of the soft-target divergence (x T^2) on the LM logits."""
    alpha_lm: float = 2.0
    """Weight of the hard masked-LM / next-token cross-entropy."""
    alpha_cos: float = 1.0
    """Weight of the cosine distance between last hidden states (non-pad tokens)."""
    temperature: float = 2.0
    """Softmax temperature of the soft targets (T > 1 softens them). Left unset, `distill` trains a decoder on chat
    data at 1 (chosen on validation), except on teacher-written answers (`alambic generate`'s output), which keep 2 as
    raw text and encoders do (DistilBERT's)."""
    divergence: str = "forward_kl"
    """Soft-target divergence: forward_kl, reverse_kl, jsd, skew_kl, skew_reverse_kl or tvd (methods.md section 10)."""
    divergence_param: float | None = None
    """The divergence's parameter in [0, 1]: jsd's beta (default 0.5; 0 = forward KL, 1 = reverse KL), skew_kl's and skew_reverse_kl's alpha (default 0.1); empty: the default."""
    kd_rows: str = "auto"
    """Rows of the soft-target loss: tokens (every non-pad token, as DistilBERT), masked (the rows with a hard target: masked tokens for MLM, assistant tokens for chat data) or auto (masked for chat data, tokens otherwise)."""
    mlm_probability: float = 0.15
    """Share of tokens masked (encoders)."""
    mlm_smoothing: float | None = None
    """Mask tokens with probability proportional to count^-s (DistilBERT used 0.7); empty for uniform masking."""
    logit_chunk_rows: int = 0
    """Rows of vocabulary logits computed at once by the fused KL + cross-entropy (memory for logits stays bounded
    whatever the sequence length and vocabulary); 0: about 2^23 logits per chunk on CPU, 2^26 on GPU."""

    RANGES: typing.ClassVar[dict] = {
        "alpha_kd": NON_NEGATIVE, "alpha_lm": NON_NEGATIVE, "alpha_cos": NON_NEGATIVE, "temperature": ABOVE_ZERO,
        "mlm_probability": PROBABILITY, "mlm_smoothing": ABOVE_ZERO, "logit_chunk_rows": NON_NEGATIVE,
        "divergence_param": UNIT_INTERVAL,
    }

    def validate(self):
        check_ranges(self, "loss.")
        if self.alpha_kd + self.alpha_lm + self.alpha_cos == 0:
            raise AlambicError("all loss weights are 0: set at least one of loss.alpha_kd, loss.alpha_lm, loss.alpha_cos")
        if self.kd_rows not in KD_ROWS:
            raise AlambicError(f"loss.kd_rows must be one of {', '.join(KD_ROWS)}, got {self.kd_rows!r}")
        check_divergence(self.divergence, self.divergence_param)


def _token_hidden_states(model: nn.Module, batch: dict) -> torch.Tensor:
    """Last hidden states of the non-pad tokens, ``(N_tok, d)``."""
    hidden = lm_body(model)(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    return hidden.flatten(0, 1).index_select(0, batch["token_positions"])


def resolve_kd_rows(loss: DistilBERTLossConfig, chat: bool) -> None:
    """``loss.kd_rows=auto`` made explicit for the data: the assistant tokens of chat data (``masked``: the rows
    with a hard target), every token of raw text. A recipe given ``auto`` unresolved reads it as ``tokens``."""
    if loss.kd_rows == "auto":
        loss.kd_rows = "masked" if chat else "tokens"


def _kd_on_every_token(loss: DistilBERTLossConfig) -> bool:
    return loss.kd_rows != "masked"


def distilbert_row_counts(batch: dict, loss: DistilBERTLossConfig) -> dict[str, int]:
    """Rows each term averages over: tokens (or masked tokens) for the KL, hard targets, tokens for the cosine.
    A batch of the student's own answers (on-policy, ``batch["sampled"]``) has no hard targets: GKD trains the
    divergence alone on them, never a cross-entropy towards the student's own samples."""
    tokens, masked = len(batch["token_positions"]), len(batch["lm_positions"])
    return {"kd": tokens if _kd_on_every_token(loss) else masked, "lm": 0 if "sampled" in batch else masked,
            "cos": tokens}


class DistilBERTObjective(nn.Module):
    """The student and the triple loss; ``forward`` returns the loss and each term (for logging)."""

    def __init__(self, student: nn.Module, loss: DistilBERTLossConfig):
        super().__init__()
        self.student = student
        self.cfg = loss
        self.head = split_lm_head(student)  # (features, projection); a tuple, so not registered twice

    def forward(self, batch: dict, teacher: dict, num_items: dict) -> tuple[torch.Tensor, dict]:
        c = self.cfg
        hidden = _token_hidden_states(self.student, batch)
        lm_rows, lm_targets = batch["lm_token_rows"], batch["lm_targets"]
        zero = hidden.new_zeros((), dtype=torch.float32)
        loss = kd = lm = cos = zero
        if c.alpha_kd > 0 or c.alpha_lm > 0:
            # One vocabulary projection serves both terms: on every token when soft targets cover all tokens (hard
            # targets placed on their rows), else on the masked / next-token rows only.
            # The teacher comes live (its features and projection) or from a cache (its stored top-k outputs).
            teacher_rows, topk = teacher.get("features"), teacher.get("topk")
            if c.alpha_kd > 0 and _kd_on_every_token(c):
                rows = hidden
                targets = torch.full((len(hidden),), -100, dtype=torch.long, device=hidden.device)
                targets = targets.index_copy(0, lm_rows, lm_targets)
            else:
                rows = hidden.index_select(0, lm_rows)
                teacher_rows = teacher_rows.index_select(0, lm_rows) if teacher_rows is not None else None
                topk = tuple(t.index_select(0, lm_rows) for t in topk) if topk is not None else None
                targets = lm_targets
            if c.alpha_kd == 0:
                teacher_rows = topk = None
            features, projection = self.head
            loss, kd_sum, ce_sum = fused_vocabulary_loss(
                features(rows), projection, teacher_rows, teacher.get("projection"),
                targets if c.alpha_lm > 0 and "sampled" not in batch else None, c.temperature,
                kd_weight=c.alpha_kd / num_items["kd"].clamp(min=1), ce_weight=c.alpha_lm / num_items["lm"].clamp(min=1),
                chunk_rows=c.logit_chunk_rows, teacher_topk=topk,
                divergence=c.divergence, divergence_param=c.divergence_param,
            )
            kd = kd_sum / num_items["kd"].clamp(min=1)
            lm = ce_sum / num_items["lm"].clamp(min=1)
        if c.alpha_cos > 0:
            cos = cosine_distance(hidden, teacher["hidden"], num_items["cos"])
            loss = loss + c.alpha_cos * cos
        return loss, {"kd": kd, "lm": lm, "cos": cos}


class DistilBERTRecipe:
    """Pairs a frozen teacher with a :class:`DistilBERTObjective` for :func:`alambic.engine.loop.train`."""

    masks_inputs = True

    def __init__(self, teacher: nn.Module | None, student: nn.Module, loss: DistilBERTLossConfig):
        if teacher is None and loss.alpha_kd + loss.alpha_cos > 0:
            raise AlambicError("without a teacher only the hard loss trains: set loss.alpha_kd=0 and loss.alpha_cos=0")
        if teacher is None:  # supervised fine-tuning (alambic finetune --task chat / lm): the hard loss alone
            self.teacher, self.student, self.cfg = None, student, loss
            self.objective = DistilBERTObjective(student, loss)
            return
        if loss.alpha_kd > 0 and not has_lm_head(teacher):
            raise AlambicError(
                f"the teacher ({type(teacher).__name__}) has no language-model head, so it gives no soft targets: "
                "set loss.alpha_kd=0 to distil its hidden states only, or use --recipe tinybert / minilm"
            )
        if loss.alpha_cos > 0 and hidden_size(teacher.config) != hidden_size(student.config):
            raise AlambicError(
                f"the cosine loss needs equal hidden sizes, but the teacher has {hidden_size(teacher.config)} and the "
                f"student {hidden_size(student.config)}: set loss.alpha_cos=0 for a narrower student"
            )
        self.teacher = teacher.eval().requires_grad_(False)
        self.student = student
        self.cfg = loss
        self.objective = DistilBERTObjective(student, loss)
        if loss.alpha_kd > 0:
            self.teacher_head_features, self.teacher_projection = split_lm_head(teacher)

    def row_counts(self, batch: dict) -> dict[str, int]:
        return distilbert_row_counts(batch, self.cfg)

    def teacher_targets(self, batch: dict) -> dict:
        if self.cfg.alpha_kd == 0 and self.cfg.alpha_cos == 0:
            return {}  # hard labels only: the teacher is not consulted
        with torch.inference_mode():
            hidden = _token_hidden_states(self.teacher, batch)
            features = self.teacher_head_features(hidden) if self.cfg.alpha_kd > 0 else None
        # Leave inference mode: the student's losses save these for backward, which inference tensors forbid.
        # The teacher's vocabulary projection runs inside the fused loss, a chunk of rows at a time.
        targets = {"hidden": hidden.clone()}
        if features is not None:
            targets["features"], targets["projection"] = features.clone(), self.teacher_projection
        return targets
