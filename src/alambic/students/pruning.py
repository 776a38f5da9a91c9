"""Narrow students sliced out of the teacher by measured importance (Minitron: Muralidharan et al. 2024).

One pass of the teacher over calibration text (non-pad tokens only) scores:

- each FFN neuron: mean |activation| of its intermediate output (the input of the FFN's output projection);
- each attention head: mean L2 norm of its output (its slice of the input of the attention output projection);
  with grouped-query attention, a key/value group scores the sum of its query heads, and whole groups are kept;
- each hidden (embedding) channel: mean |output| of every LayerNorm / RMSNorm of the model's width, summed over them.

The top ones are kept, in their original order, in every matrix that reads or writes them: embeddings, norms,
q / k / v / o, the FFN, pooler, task and LM heads. A student built this way starts close to its teacher instead of
at random; distillation then recovers the rest. Where a tensor cannot be sliced (e.g. a head size that changes), it
is left freshly initialised and ``init_student`` says so.

Roles of the projections are read from their names (BERT / RoBERTa / XLM-R, DistilBERT, Llama / Qwen2 / Mistral,
GPT-2 naming); GPT-2's ``Conv1D`` stores its weight transposed, which :meth:`WidthPruning.slice` accounts for.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn

from alambic import modeling
from alambic.errors import AlambicError

# Module names inside one transformer layer -> role. "inner" roles read the hidden state and write heads or FFN
# neurons (their output rows are sliced by the inner ranking); "outer" roles read heads or neurons and write the
# hidden state (their input columns are sliced).
_ROLES = (
    ("q", r"(^|\.)(query|q_proj|q_lin)$"),
    ("k", r"(^|\.)(key|k_proj|k_lin)$"),
    ("v", r"(^|\.)(value|v_proj|v_lin)$"),
    ("qkv", r"(^|\.)(attn\.c_attn|qkv_proj|query_key_value)$"),
    ("o", r"(^|\.)(attention\.output\.dense|o_proj|out_lin|attn\.c_proj|out_proj)$"),
    ("ffn_in", r"(^|\.)(intermediate\.dense|gate_proj|up_proj|lin1|mlp\.c_fc|fc1)$"),
    ("ffn_out", r"(^|\.)(output\.dense|down_proj|lin2|mlp\.c_proj|fc2)$"),
)
_READS_INNER = ("o", "ffn_out")
_NORM = re.compile(r"(LayerNorm|RMSNorm)$")


def layer_roles(layer: nn.Module) -> dict[str, str]:
    """``{module name inside the layer: role}`` for the projections of one transformer layer."""
    roles = {}
    for name, module in layer.named_modules():
        if not name or not hasattr(module, "weight"):
            continue
        for role, pattern in _ROLES:
            if re.search(pattern, name):
                roles[name] = role
                break
    return roles


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D"  # GPT-2: weight is (in, out)


@dataclass
class Importance:
    """Scores measured on the teacher (one entry per teacher layer where per layer)."""

    hidden: torch.Tensor
    ffn: list[torch.Tensor]
    heads: list[torch.Tensor]
    tokens: int


@torch.no_grad()
def measure_importance(teacher: nn.Module, batches: list[dict]) -> Importance:
    """One forward of the teacher's body per calibration batch, with hooks reading activations at non-pad tokens."""
    config = teacher.config
    hidden, heads, head_dim = modeling.hidden_size(config), modeling.num_heads(config), modeling.head_dim(config)
    layers = modeling.transformer_layers(teacher)
    mask = {}
    ffn = [None] * len(layers)
    head_scores = [None] * len(layers)
    channel = torch.zeros(hidden, dtype=torch.float64)

    def rows(x):  # (B, L, D) -> the (N, D) rows of real tokens, fp32
        return x.reshape(-1, x.shape[-1])[mask["rows"]].float()

    def ffn_hook(i):
        def hook(module, args):
            score = rows(args[0]).abs().sum(0).double().cpu()
            ffn[i] = score if ffn[i] is None else ffn[i] + score
        return hook

    def head_hook(i):
        def hook(module, args):
            x = rows(args[0])
            score = x.view(x.shape[0], -1, head_dim).norm(dim=-1).sum(0).double().cpu()
            head_scores[i] = score if head_scores[i] is None else head_scores[i] + score
        return hook

    def norm_hook(module, args, output):
        nonlocal channel
        channel += rows(output).abs().sum(0).double().cpu()

    handles = []
    try:
        for i, layer in enumerate(layers):
            found = {role: layer.get_submodule(name) for name, role in layer_roles(layer).items()}
            if "ffn_out" not in found or "o" not in found:
                raise AlambicError(f"{type(teacher).__name__}: width pruning does not recognise the attention output "
                                   "and FFN output projections of its layers (BERT, DistilBERT, Llama, Qwen2 and "
                                   "GPT-2 naming are known); use width init random")
            handles.append(found["ffn_out"].register_forward_pre_hook(ffn_hook(i)))
            handles.append(found["o"].register_forward_pre_hook(head_hook(i)))
        for module in teacher.modules():
            shape = getattr(module, "normalized_shape", None) or getattr(getattr(module, "weight", None), "shape", None)
            if _NORM.search(type(module).__name__) and tuple(shape or ()) == (hidden,):
                handles.append(module.register_forward_hook(norm_hook))
        body, tokens = modeling.lm_body(teacher), 0
        device = next(teacher.parameters()).device
        for batch in batches:
            mask["rows"] = batch["attention_mask"].reshape(-1).bool().to(device)
            tokens += int(mask["rows"].sum())
            body(**{k: v.to(device) for k, v in modeling.model_inputs(teacher, batch).items()})
    finally:
        for handle in handles:
            handle.remove()
    if tokens == 0 or any(score is None for score in ffn + head_scores):
        raise AlambicError("width pruning needs calibration text with at least one real token")
    if len(head_scores[0]) != heads:
        raise AlambicError(f"{type(teacher).__name__}: its attention output has {len(head_scores[0])} heads of size "
                           f"{head_dim}, not {heads}; width pruning does not support it")
    return Importance(channel / tokens, [s / tokens for s in ffn], [s / tokens for s in head_scores], tokens)


def _top(scores: torch.Tensor, k: int) -> list[int]:
    """Indices of the ``k`` largest scores, in their original order (ties: the lower index)."""
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    return sorted(order[:k])


@dataclass
class WidthPruning:
    """Which teacher channels, neurons and heads a narrower student keeps, and how to slice a teacher tensor."""

    hidden: list[int] | None
    """Kept hidden channels (None: the width is unchanged)."""
    ffn: dict[int, list[int]] = field(default_factory=dict)
    """Teacher layer -> kept FFN neurons (empty: unchanged)."""
    heads: dict[int, list[int]] = field(default_factory=dict)
    """Teacher layer -> kept query heads (empty: unchanged)."""
    kv_heads: dict[int, list[int]] = field(default_factory=dict)
    """Teacher layer -> kept key/value heads (grouped-query attention)."""
    head_dim: int = 0
    teacher_hidden: int = 0
    teacher_heads: int = 0
    teacher_ffn: int = 0
    tokens: int = 0
    roles: dict[str, tuple[int, str]] = field(default_factory=dict)
    """Teacher module name -> (teacher layer, role), for the projections of the kept layers."""
    conv1d: set[str] = field(default_factory=set)
    embeddings: set[str] = field(default_factory=set)
    """Teacher embedding tables: (entries, hidden), so only their last dimension carries hidden channels, whatever
    the number of entries (gpt2-medium has 1024 positions and 1024 channels)."""

    def slice(self, key: str, source: torch.Tensor) -> torch.Tensor:
        """``source`` (the teacher tensor named ``key``) with the kept indices of every dimension that shrinks."""
        module = key.rpartition(".")[0]
        layer, role = self.roles.get(module, (None, None))
        out_dim, in_dim = (1, 0) if module in self.conv1d else (0, 1)
        if source.dim() == 1:
            out_dim, in_dim = 0, None
        index: list[list[int] | None] = [None] * source.dim()
        handled = set()
        if role is not None:
            inner = self._inner(layer, role)
            if role in _READS_INNER:
                if in_dim is not None:
                    index[in_dim] = inner
                    handled.add(in_dim)
            else:
                index[out_dim] = inner
                handled.add(out_dim)
        # the dimensions that carry hidden channels: by role (a projection's other side, an embedding's last
        # dimension), never by a size that happens to equal the width
        hidden_dims = range(source.dim())
        if module in self.embeddings:
            hidden_dims = [source.dim() - 1]
        elif role is not None:  # a projection writes (or reads) the hidden state on its other side only
            side = out_dim if role in _READS_INNER else in_dim
            hidden_dims = [side] if side is not None else []
        for dim in hidden_dims:
            if dim not in handled and source.shape[dim] == self.teacher_hidden and self.hidden is not None:
                index[dim] = self.hidden
        for dim, kept in enumerate(index):
            if kept is not None:
                source = source.index_select(dim, torch.tensor(kept, dtype=torch.long, device=source.device))
        return source

    def _inner(self, layer: int, role: str) -> list[int] | None:
        if role in ("ffn_in", "ffn_out"):
            return self.ffn.get(layer)
        heads = self.heads.get(layer)
        if role in ("k", "v") and layer in self.kv_heads:
            heads = self.kv_heads[layer]
        if heads is None:
            return None
        rows = [h * self.head_dim + j for h in heads for j in range(self.head_dim)]
        if role == "qkv":  # GPT-2's fused projection: [q | k | v], each teacher_heads * head_dim wide
            width = self.teacher_heads * self.head_dim
            return rows + [width + r for r in rows] + [2 * width + r for r in rows]
        return rows

    def summary(self) -> list[str]:
        """One line per narrowed dimension: what was kept and how it was scored."""
        lines = []
        if self.hidden is not None:
            lines.append(f"hidden channels: {len(self.hidden)} of {self.teacher_hidden} kept by mean |norm output|")
        if self.heads:
            first = next(iter(self.heads.values()))
            group = f" ({len(next(iter(self.kv_heads.values())))} key/value groups)" if self.kv_heads else ""
            lines.append(f"attention heads: {len(first)} of {self.teacher_heads}{group} per layer kept by output norm; "
                         + "; ".join(f"layer {i}: {','.join(map(str, h))}" for i, h in self.heads.items()))
        if self.ffn:
            first = next(iter(self.ffn.values()))
            lines.append(f"FFN neurons: {len(first)} of {self.teacher_ffn} per layer kept by mean |activation|")
        return [f"{line} (calibration: {self.tokens} tokens)" for line in lines]


def plan_pruning(teacher: nn.Module, student_config, layers: list[int], importance: Importance) -> WidthPruning:
    """The kept indices for ``student_config`` (narrower than the teacher's), from ``importance``."""
    t_config = teacher.config
    t_hidden, s_hidden = modeling.hidden_size(t_config), modeling.hidden_size(student_config)
    t_ffn, s_ffn = modeling.intermediate_size(t_config), modeling.intermediate_size(student_config)
    t_heads, s_heads = modeling.num_heads(t_config), modeling.num_heads(student_config)
    t_kv, s_kv = modeling.num_key_value_heads(t_config), modeling.num_key_value_heads(student_config)
    head_dim = modeling.head_dim(t_config)
    plan = WidthPruning(_top(importance.hidden, s_hidden) if s_hidden != t_hidden else None, head_dim=head_dim,
                        teacher_hidden=t_hidden, teacher_heads=t_heads, teacher_ffn=t_ffn, tokens=importance.tokens)
    slice_heads = s_heads != t_heads and modeling.head_dim(student_config) == head_dim
    group = t_heads // t_kv
    if slice_heads and (s_heads % group or s_kv * group != s_heads):
        slice_heads = False  # regrouped heads cannot be sliced; init_student leaves attention fresh and says so
    plan.embeddings = {name for name, module in teacher.named_modules() if isinstance(module, nn.Embedding)}
    t_layers = modeling.transformer_layers(teacher)
    prefix = modeling.module_name(teacher, t_layers)
    for i in layers:
        if s_ffn != t_ffn:
            plan.ffn[i] = _top(importance.ffn[i], s_ffn)
        if slice_heads:
            if t_kv == t_heads:
                plan.heads[i] = _top(importance.heads[i], s_heads)
            else:
                groups = importance.heads[i].view(t_kv, group).sum(1)
                plan.kv_heads[i] = _top(groups, s_kv)
                plan.heads[i] = [g * group + j for g in plan.kv_heads[i] for j in range(group)]
        for name, role in layer_roles(t_layers[i]).items():
            full = f"{prefix}.{i}.{name}"
            plan.roles[full] = (i, role)
            if _is_conv1d(teacher.get_submodule(full)):
                plan.conv1d.add(full)
    return plan
