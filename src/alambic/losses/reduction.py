"""The one reduction every loss uses: a sum over rows divided by the number of items that count."""

import torch


def per_item_mean(row_values: torch.Tensor, num_items: int | torch.Tensor | None = None) -> torch.Tensor:
    """``row_values.sum() / num_items`` (``num_items`` defaults to the number of rows).

    An empty selection gives 0 with a gradient path rather than 0/0 = NaN, so a micro-batch without, say, any masked
    token contributes nothing instead of poisoning the step.
    """
    if num_items is None:
        num_items = row_values.shape[0]
    if isinstance(num_items, torch.Tensor):
        return row_values.sum() / num_items.clamp(min=1)
    return row_values.sum() / max(int(num_items), 1)
