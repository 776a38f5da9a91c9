"""Held-out language-model quality: perplexity (decoders) and masked-token accuracy and perplexity (encoders)."""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from alambic.modeling import lm_body, lm_head, model_device, model_kind


@torch.no_grad()
def evaluate_lm(model: torch.nn.Module, batches: list[dict]) -> dict:
    """Mean next-token (or masked-token) cross-entropy over every target in ``batches``, its exp, and for encoders
    the share of masked tokens predicted exactly."""
    was_training = model.training
    model.eval()
    device = model_device(model)
    exported = getattr(model, "exported", False)  # an export's full logits: its head is not a PyTorch module
    nll = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    count = 0
    for batch in batches:
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        positions = batch["lm_positions"].to(device)
        if exported:
            logits = model(input_ids=ids, attention_mask=mask).logits.flatten(0, 1).index_select(0, positions).float()
        else:
            hidden = lm_body(model)(input_ids=ids, attention_mask=mask).last_hidden_state.flatten(0, 1)
            logits = lm_head(model)(hidden.index_select(0, positions)).float()
        targets = batch["lm_targets"].to(device)
        nll += F.cross_entropy(logits, targets, reduction="sum").double()
        correct += (logits.argmax(-1) == targets).sum()
        count += len(targets)
    model.train(was_training)
    loss = nll.item() / max(count, 1)
    result = {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": count}
    if model_kind(model) == "masked":
        result["masked_accuracy"] = correct.item() / max(count, 1)
    return result


def weights_size_bytes(model_dir: Path) -> int:
    """Bytes of weight files in a model folder (safetensors, bin, gguf), as a user would count disk space."""
    suffixes = {".safetensors", ".bin", ".gguf", ".pt", ".onnx"}
    return sum(p.stat().st_size for p in Path(model_dir).iterdir() if p.suffix in suffixes)
