"""Candidate student shapes of a teacher: depth, hidden width, heads (key/value groups) and FFN width.

Widths are multiples of an alignment the hardware runs well (64 on CPU, 128 on GPU). The head size is the
teacher's, as width pruning slices whole heads, so a hidden width ``h`` has ``heads_t * h / hidden_t`` heads (and
key/value groups of the teacher's size); widths that would split a head or a key/value group are left out. The FFN
keeps the teacher's ratio to the hidden width, or 3/4 or 1/2 of it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from alambic import modeling
from alambic.evaluation.flops import flops_per_token
from alambic.students.build import student_config

FFN_FRACTIONS = (1.0, 0.75, 0.5)
"""FFN widths tried per hidden width: the teacher's FFN / hidden ratio times these."""


@dataclass(frozen=True, order=True)
class Shape:
    depth: int
    hidden: int
    ffn: int
    heads: int
    kv_heads: int | None = None

    @property
    def key(self) -> str:
        kv = f"kv{self.kv_heads}" if self.kv_heads is not None else ""
        return f"{self.depth}x{self.hidden}-h{self.heads}{kv}-f{self.ffn}"

    def label(self) -> str:
        kv = f"/{self.kv_heads}" if self.kv_heads is not None and self.kv_heads != self.heads else ""
        return f"{self.depth} x {self.hidden}, {self.heads}{kv} heads, FFN {self.ffn}"

    def to_dict(self) -> dict:
        return asdict(self)


def teacher_shape(config) -> Shape:
    config = modeling._config(config)
    return Shape(modeling.num_layers(config), modeling.hidden_size(config), modeling.intermediate_size(config),
                 modeling.num_heads(config), getattr(config, "num_key_value_heads", None))


def _round(value: float, align: int) -> int:
    return max(align, int(round(value / align)) * align)


def enumerate_shapes(config, align: int = 64) -> list[Shape]:
    """Every candidate of the module docstring, the teacher's own shape included (it is a depth-only student's
    width), from the largest down."""
    teacher = teacher_shape(config)
    kv = teacher.kv_heads
    group = teacher.heads // kv if kv else 1
    widths = {w for w in range(align, teacher.hidden + 1, align)} | {teacher.hidden}
    ratio = teacher.ffn / teacher.hidden
    shapes = set()
    for hidden in sorted(widths):
        if (teacher.heads * hidden) % teacher.hidden:
            continue
        heads = teacher.heads * hidden // teacher.hidden
        if heads < 1 or heads % group:
            continue
        ffns = {teacher.ffn} if hidden == teacher.hidden else set()
        ffns |= {min(teacher.ffn, _round(ratio * hidden * fraction, align)) for fraction in FFN_FRACTIONS}
        for ffn in ffns:
            for depth in range(1, teacher.depth + 1):
                shapes.add(Shape(depth, hidden, ffn, heads, heads // group if kv else None))
    return sorted(shapes, reverse=True)


def shape_config(teacher_config, shape: Shape, keep_token_types: bool = False):
    """The Hugging Face configuration of a ``shape`` student of a teacher (layers evenly spaced: the config does
    not depend on which layers are kept)."""
    return student_config(teacher_config, list(range(shape.depth)), shape.hidden, shape.ffn, shape.heads,
                          keep_token_types, [])


def instantiate(teacher: torch.nn.Module, config, device: str | torch.device = "cpu",
                dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A model of the teacher's class with ``config`` and random weights (``device="meta"``: shapes only)."""
    with torch.device(device):
        model = type(teacher)(config)
    return model.to(dtype).eval()


def parameter_count(teacher: torch.nn.Module, config) -> int:
    model = instantiate(teacher, config, "meta")
    return sum(p.numel() for p in model.parameters())


def parameter_counts(teacher: torch.nn.Module, shapes: list[Shape]) -> dict[Shape, int]:
    """The parameter count of every shape, from two counted models per width (1 and 2 layers): every layer of a
    shape has the same size, so ``params(depth) = params(1) + (depth - 1) * (params(2) - params(1))``."""
    per_width = {}
    out = {}
    for shape in shapes:
        width = (shape.hidden, shape.ffn, shape.heads)
        if width not in per_width:
            one, two = (parameter_count(teacher, shape_config(teacher.config, Shape(d, *width, shape.kv_heads)))
                        for d in (1, 2))
            per_width[width] = (one, two - one)
        base, layer = per_width[width]
        out[shape] = base + (shape.depth - 1) * layer
    return out


def flops(config, seq_len: int, head: str) -> float:
    return flops_per_token(config, seq_len, head).total
