"""Forward FLOPs per token: computed from the configuration, and counted on the real model to check the formula.

Convention (the one of ``torch.utils.flop_counter``): a multiply-accumulate is 2 FLOPs, and only matrix products
count (linear layers, the two attention products, the LM head); norms, activations, softmax, embedding look-ups and
residual additions are left out (they are a few % of the total). The attention products count the full L x L score
matrix, as dense kernels compute it: a causal kernel that skips masked blocks does up to half of that work.

Per token of a sequence of length ``L``, with hidden size ``d``, ``h`` query heads and ``k`` key/value heads of size
``e``, feed-forward width ``f`` and vocabulary ``V``::

    layer = 2 d (h e)          query projection
          + 2 * 2 d (k e)      key and value projections (grouped-query attention: k < h)
          + 2 (h e) d          output projection
          + 2 * 2 L (h e)      scores Q K^T and the weighted sum of V over L positions
          + m * 2 d f          feed-forward: m = 3 for gated MLPs (Llama, Qwen, Mistral ...: gate, up, down), else 2
    head  = 2 d V              LM head (+ 2 d d for the masked-LM transform of BERT-like encoders)
          | 2 d d / L          bare encoder: the pooler, once per sequence
    total = layers * layer + head
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from alambic import modeling

# Families whose MLP is gated (gate_proj, up_proj, down_proj): three d x f matrices instead of two.
GATED_MLP_FAMILIES = frozenset({
    "llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "gemma3_text", "phi3", "olmo",
    "olmo2", "granite", "cohere", "smollm3", "starcoder2_gated", "internlm2", "deepseek_v2", "exaone", "helium",
    "glm", "nemotron_gated", "arcee_gated", "ministral",
})
HEADS = ("lm", "mlm", "pooler", "none")


@dataclass
class FlopBreakdown:
    """Forward FLOPs per token at one sequence length, by part."""

    seq_len: int
    attention_projections: int
    attention_scores: float
    mlp: int
    head: float
    layers: int

    @property
    def per_layer(self) -> float:
        return self.attention_projections + self.attention_scores + self.mlp

    @property
    def total(self) -> float:
        return self.layers * self.per_layer + self.head

    def to_dict(self) -> dict:
        return {**asdict(self), "per_layer": self.per_layer, "total": self.total}


def is_gated_mlp(config) -> bool:
    config = modeling._config(config)
    return config.model_type in GATED_MLP_FAMILIES


def head_type(model: torch.nn.Module) -> str:
    """Which output part a forward of ``model`` runs: ``lm`` (decoder head), ``mlm`` (encoder head with its
    transform), ``pooler`` (an encoder whose pooler runs: bare, or under a sequence-classification head) or ``none``.
    Task heads themselves (a d x C matrix or two) are left out of the formula; the counted figure includes them."""
    if modeling.has_lm_head(model):
        return "lm" if modeling.model_kind(model) == "causal" else "mlm"
    return "pooler" if getattr(modeling.lm_body(model), "pooler", None) is not None else "none"


def flops_per_token(config, seq_len: int, head: str = "lm") -> FlopBreakdown:
    """The formula of this module's docstring for a Hugging Face ``config`` (see :func:`head_type` for ``head``)."""
    if head not in HEADS:
        raise ValueError(f"head must be one of {HEADS}, got {head!r}")
    cfg = modeling._config(config)
    d, h = modeling.hidden_size(cfg), modeling.num_heads(cfg)
    e = getattr(cfg, "head_dim", None) or d // h
    kv = getattr(cfg, "num_key_value_heads", None) or h
    f, vocab = modeling.intermediate_size(cfg), modeling.vocab_size(cfg)
    projections = 2 * d * h * e + 2 * 2 * d * kv * e + 2 * h * e * d
    scores = 2 * 2 * seq_len * h * e
    mlp = (3 if is_gated_mlp(cfg) else 2) * 2 * d * f
    head_flops = {"lm": 2 * d * vocab, "mlm": 2 * d * d + 2 * d * vocab, "pooler": 2 * d * d / seq_len, "none": 0}[head]
    return FlopBreakdown(seq_len, projections, scores, mlp, head_flops, modeling.num_layers(cfg))


def _sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """Q K^T and A V of ``scaled_dot_product_attention`` (query heads; grouped K/V are broadcast to them)."""
    *batch, lq, e = query_shape
    lk, ev = key_shape[-2], value_shape[-1]
    n = 1
    for size in batch:
        n *= size
    return 2 * n * lq * lk * e + 2 * n * lq * lk * ev


def _attention_ops() -> dict:
    """Attention ops torch's counter leaves out on CPU (the composite op is seen whole under inference mode)."""
    aten = torch.ops.aten
    ops = {aten.scaled_dot_product_attention: _sdpa_flops}
    cpu_flash = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if cpu_flash is not None:
        ops[cpu_flash] = _sdpa_flops
    return ops


@torch.no_grad()
def measured_flops_per_token(model: torch.nn.Module, seq_len: int, batch_size: int = 1) -> float:
    """Count the FLOPs of one forward of ``model`` on ``batch_size`` x ``seq_len`` tokens with
    ``torch.utils.flop_counter.FlopCounterMode`` (matrix products and attention), per token."""
    from torch.utils.flop_counter import FlopCounterMode

    device = next(model.parameters()).device
    vocab = modeling.vocab_size(model.config)
    ids = torch.randint(0, vocab, (batch_size, seq_len), generator=torch.Generator().manual_seed(0)).to(device)
    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False, custom_mapping=_attention_ops())
    try:
        with counter, torch.inference_mode():
            model(input_ids=ids, attention_mask=torch.ones_like(ids))
    finally:
        model.train(was_training)
    return counter.get_total_flops() / (batch_size * seq_len)
