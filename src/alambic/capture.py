"""Read what intermediate-layer losses need from inside a running model, with forward hooks.

The model runs its own forward with whatever attention kernel it was loaded with (SDPA, flash, eager): nothing
forces ``output_attentions`` or eager attention. Hooks take the hidden states of the mapped layers and the query /
key / value projections of the mapped attention modules; attention scores are then computed for those layers alone.

Indices follow TinyBERT: hidden state 0 is the embedding output (the input of the first transformer layer) and
hidden state ``m`` the output of transformer layer ``m`` (1-based); attention ``m`` is that of layer ``m``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from alambic.errors import AlambicError
from alambic.modeling import head_dim, lm_body, model_inputs, transformer_layers

# (attention module inside a layer, query, key, value): one row per family of Hugging Face layer layouts.
SEPARATE_PROJECTIONS = (
    ("attention.self", "query", "key", "value"),  # BERT, RoBERTa, XLM-R, ELECTRA, CamemBERT
    ("attention", "q_lin", "k_lin", "v_lin"),  # DistilBERT
    ("self_attn", "q_proj", "k_proj", "v_proj"),  # Llama, Qwen2, Mistral, Gemma, Phi, OPT
)
FUSED_PROJECTIONS = (("attn", "c_attn"),)  # GPT-2: one projection whose output is [q | k | v]


def _get(module: nn.Module, path: str):
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


@dataclass
class Projections:
    """Query, key and value of one attention layer, ``(B, heads, L, head_dim)``; rotary embeddings applied."""

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor

    def scores(self) -> torch.Tensor:
        """Pre-softmax attention scores ``Q K^T / sqrt(head_dim)``, ``(B, heads, L, L)`` (keys shared across grouped
        query heads are repeated, as the model does)."""
        key = self.key
        if key.shape[1] != self.query.shape[1]:
            key = key.repeat_interleave(self.query.shape[1] // key.shape[1], dim=1)
        return self.query @ key.transpose(-1, -2) * self.query.shape[-1] ** -0.5

    def merged(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Q, K, V with heads concatenated, ``(B, L, heads * head_dim)``: the input of MiniLM's relation loss."""
        return tuple(x.transpose(1, 2).flatten(2) for x in (self.query, self.key, self.value))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def _output_tensor(output):
    return output[0] if isinstance(output, (tuple, list)) else output


@dataclass
class LayerTaps:
    """Context manager: while active, hooks on ``model`` record ``hidden[m]`` and ``attention[m]`` for the asked m."""

    model: nn.Module
    hidden_layers: tuple[int, ...] = ()
    attention_layers: tuple[int, ...] = ()
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)
    _raw: dict[int, dict] = field(default_factory=dict)
    _handles: list = field(default_factory=list)

    def __enter__(self) -> "LayerTaps":
        layers = transformer_layers(self.model)
        self.head_dim = head_dim(self.model.config)
        for m in self.hidden_layers:
            if m == 0:
                self._handles.append(layers[0].register_forward_pre_hook(self._embedding_hook, with_kwargs=True))
            else:
                self._handles.append(layers[m - 1].register_forward_hook(self._hidden_hook(m)))
        for m in self.attention_layers:
            self._tap_attention(layers[m - 1], m)
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def run(self, batch: dict) -> torch.Tensor:
        """One forward of the model's transformer body (no LM head) on ``batch`` (ids, mask and, for models with
        token types, segments) with the taps recording; returns the body's ``last_hidden_state`` (after any final
        norm: what the LM head reads)."""
        self.hidden.clear()
        self._raw.clear()
        return lm_body(self.model)(**model_inputs(self.model, batch)).last_hidden_state

    # -- hidden states ------------------------------------------------------------------------------------------
    def _embedding_hook(self, module, args, kwargs):
        self.hidden[0] = args[0] if args else kwargs["hidden_states"]

    def _hidden_hook(self, m: int):
        def hook(module, args, output):
            self.hidden[m] = _output_tensor(output)

        return hook

    # -- attention ----------------------------------------------------------------------------------------------
    def _tap_attention(self, layer: nn.Module, m: int) -> None:
        for attention_path, *names in SEPARATE_PROJECTIONS:
            attention = _get(layer, attention_path)
            projections = [_get(attention, n) for n in names] if attention is not None else []
            if projections and all(isinstance(p, nn.Module) for p in projections):
                for part, module in zip("qkv", projections):
                    self._handles.append(module.register_forward_hook(self._projection_hook(m, part)))
                self._handles.append(attention.register_forward_pre_hook(self._rotary_hook(m), with_kwargs=True))
                return
        for attention_path, fused_name in FUSED_PROJECTIONS:
            fused = _get(layer, f"{attention_path}.{fused_name}")
            if fused is not None:
                self._handles.append(fused.register_forward_hook(self._projection_hook(m, "qkv")))
                return
        raise AlambicError(
            f"cannot find the query/key/value projections of {type(self.model).__name__} "
            f"(layer class {type(layer).__name__}), which the attention losses read: set the attention and relation "
            "loss weights to 0 to distil hidden states only"
        )

    def _projection_hook(self, m: int, part: str):
        def hook(module, args, output):
            self._raw.setdefault(m, {})[part] = output

        return hook

    def _rotary_hook(self, m: int):
        def hook(module, args, kwargs):
            rotary = kwargs.get("position_embeddings")
            if rotary is None and len(args) > 1 and isinstance(args[1], tuple):
                rotary = args[1]
            if rotary is not None:
                self._raw.setdefault(m, {})["rotary"] = rotary

        return hook

    def attention(self, m: int) -> Projections:
        raw = self._raw[m]
        if "qkv" in raw:
            query, key, value = raw["qkv"].chunk(3, dim=-1)
        else:
            query, key, value = raw["q"], raw["k"], raw["v"]
        query, key, value = (self._split_heads(x) for x in (query, key, value))
        if "rotary" in raw:  # the scores the model really computes use rotated queries and keys
            cos, sin = (t.unsqueeze(1) for t in raw["rotary"])
            query = query * cos + _rotate_half(query) * sin
            key = key * cos + _rotate_half(key) * sin
        return Projections(query, key, value)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        return x.view(batch, length, width // self.head_dim, self.head_dim).transpose(1, 2)


def valid_pairs(attention_mask: torch.Tensor, causal: bool) -> torch.Tensor:
    """``(B, L, L)`` bool: query i may attend to key j (both real tokens, and j <= i for causal models)."""
    real = attention_mask.bool()
    valid = real[:, :, None] & real[:, None, :]
    if causal:
        valid = valid & torch.ones(valid.shape[-2:], dtype=torch.bool, device=valid.device).tril()
    return valid


def count_valid_pairs(attention_mask: torch.Tensor, causal: bool) -> int:
    """Number of valid query-key pairs, from the lengths alone (host side, no device work)."""
    lengths = attention_mask.sum(dim=1)
    return int((lengths * (lengths + 1) // 2).sum() if causal else (lengths * lengths).sum())
