"""Hard-label language-modelling loss: masked-token or next-token cross-entropy."""

import torch
import torch.nn.functional as F

from alambic.losses.reduction import per_item_mean


def token_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, num_items: int | torch.Tensor | None = None
) -> torch.Tensor:
    """``L = sum_rows -log softmax(z)[target] / num_items``, at temperature 1, in fp32.

    Shapes: ``(N, V), (N,) -> ()``; rows are the masked positions (MLM) or the positions that have a next token (CLM).
    """
    row_nll = F.cross_entropy(logits.float(), targets, reduction="none")
    return per_item_mean(row_nll, num_items)
