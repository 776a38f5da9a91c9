"""MiniLMv2's multi-head self-attention relation distillation (Wang et al. 2021, arXiv:2012.15828).

    L = sum_{(m, g) in layer map} sum_{X in Q, K, V} alpha_X * RelKL(X_s[m], X_t[g])

where RelKL compares, per relation head, the softmax of scaled dot products between the tokens' queries (keys,
values) of one teacher layer and one student layer (see ``alambic.losses.attention_relation_kl``). The relations are
L x L whatever the widths, so teacher and student may differ in hidden size and head count. By default the last
student layer learns from the last teacher layer; MiniLMv2 found an upper-middle teacher layer better for large
teachers (``--layer-map 6:18``, say).
"""

from __future__ import annotations

import typing
from dataclasses import dataclass

import torch
from torch import nn

from alambic.capture import LayerTaps, valid_pairs
from alambic.errors import AlambicError
from alambic.ranges import NON_NEGATIVE, POSITIVE, check_ranges
from alambic.losses import attention_relation_kl
from alambic.modeling import hidden_size, model_kind, num_heads, num_layers
from alambic.students.layer_map import parse_layer_map


@dataclass
class MiniLMLossConfig:
    layer_map: str = "last"
    """Student layer -> teacher layer pairs: last (last to last), copied (each layer from the teacher layer it was
    copied from), or pairs such as 6:18 (no embeddings: 0)."""
    relation_heads: int | None = None
    """Relation heads R; both hidden sizes must divide by it. Empty: the student's attention head count."""
    alpha_query: float = 1.0
    """Weight of the query-query relation loss."""
    alpha_key: float = 1.0
    """Weight of the key-key relation loss."""
    alpha_value: float = 1.0
    """Weight of the value-value relation loss."""

    RANGES: typing.ClassVar[dict] = {"relation_heads": POSITIVE, "alpha_query": NON_NEGATIVE,
                                     "alpha_key": NON_NEGATIVE, "alpha_value": NON_NEGATIVE}

    def validate(self):
        check_ranges(self, "loss.")
        if self.alpha_query + self.alpha_key + self.alpha_value == 0:
            raise AlambicError("all loss weights are 0: set loss.alpha_query, loss.alpha_key or loss.alpha_value")


class MiniLMObjective(nn.Module):
    def __init__(self, student: nn.Module, cfg: MiniLMLossConfig, pairs: list[tuple[int, int]], heads: int):
        super().__init__()
        self.student, self.cfg, self.pairs, self.heads = student, cfg, pairs, heads

    def forward(self, batch: dict, teacher: dict, num_items: dict) -> tuple[torch.Tensor, dict]:
        c = self.cfg
        with LayerTaps(self.student, attention_layers=tuple(m for m, _ in self.pairs)) as taps:
            taps.run(batch)
        valid = teacher["valid"]
        zero = valid.new_zeros((), dtype=torch.float32)
        terms = {"query": zero, "key": zero, "value": zero}
        for m, g in self.pairs:
            for name, s, t in zip(terms, taps.attention(m).merged(), teacher["states"][g]):
                terms[name] = terms[name] + attention_relation_kl(s, t, valid, self.heads, num_items["rows"])
        loss = c.alpha_query * terms["query"] + c.alpha_key * terms["key"] + c.alpha_value * terms["value"]
        return loss, terms


class MiniLMRecipe:
    """Self-attention relation distillation for :func:`alambic.engine.loop.train`."""

    masks_inputs = False

    def __init__(self, teacher: nn.Module, student: nn.Module, loss: MiniLMLossConfig):
        self.pairs = parse_layer_map(loss.layer_map, num_layers(student.config), num_layers(teacher.config))
        if any(m == 0 for m, _ in self.pairs):
            raise AlambicError(f"layer map {loss.layer_map!r}: relations come from attention layers, not the embeddings (0)")
        heads = loss.relation_heads or num_heads(student.config)
        for who, model in (("teacher", teacher), ("student", student)):
            if hidden_size(model.config) % heads:
                raise AlambicError(
                    f"the {who}'s hidden size {hidden_size(model.config)} does not divide into {heads} relation heads: "
                    "set loss.relation_heads to a common divisor of both hidden sizes"
                )
        self.teacher = teacher.eval().requires_grad_(False)
        self.student = student
        self.causal = model_kind(teacher) == "causal"
        self.objective = MiniLMObjective(student, loss, self.pairs, heads)

    def row_counts(self, batch: dict) -> dict[str, int]:
        return {"rows": len(batch["token_positions"])}  # every real token is a query row with a valid key

    def teacher_targets(self, batch: dict) -> dict:
        layers = tuple(g for _, g in self.pairs)
        with torch.inference_mode(), LayerTaps(self.teacher, attention_layers=layers) as taps:
            taps.run(batch)
            states = {g: taps.attention(g).merged() for g in layers}
        return {
            "states": {g: tuple(x.clone() for x in qkv) for g, qkv in states.items()},
            "valid": valid_pairs(batch["attention_mask"], self.causal),
        }
