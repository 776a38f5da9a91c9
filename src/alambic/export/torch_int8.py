"""PyTorch dynamic int8 quantisation: every ``nn.Linear`` keeps int8 weights with one scale per tensor and quantises
its input on the fly (``torch.ao.quantization.quantize_dynamic``); embeddings and norms stay float32.

Saved as ``model-int8.pt`` (a state dict that loads with ``weights_only=True``) beside the model's ``config.json``;
loading rebuilds the architecture from the config, quantises it the same way and loads the state dict.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

WEIGHTS = "model-int8.pt"


def quantize(model: torch.nn.Module) -> torch.nn.Module:
    with warnings.catch_warnings():  # torch.ao's eager quantisation announces its move to torchao on every call
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)


def save(model: torch.nn.Module, folder: Path) -> None:
    torch.save(model.state_dict(), Path(folder) / WEIGHTS)


def load(folder: Path, auto_class) -> torch.nn.Module:
    """The quantised model saved in ``folder``, built with ``auto_class`` (e.g. ``AutoModelForCausalLM``)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder)
    model = quantize(auto_class.from_config(config))  # not on "meta": non-persistent buffers (RoPE) are computed here
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        state = torch.load(Path(folder) / WEIGHTS, weights_only=True, map_location="cpu")
    model.load_state_dict(state, strict=True)
    return model.eval()
