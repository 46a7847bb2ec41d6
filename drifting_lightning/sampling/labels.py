"""Class-balanced labels: the rule every sampler of a conditional generator follows (training-time metrics, sample
grids, ``drifting sample``), so that their samples are comparable."""

from __future__ import annotations

import torch
from torch import Tensor


def balanced_labels(index: int | Tensor, num_classes: int, device: torch.device | str | None = None) -> Tensor | None:
    """Labels of the samples with global indices ``index`` (an int n means 0 .. n-1): sample i has class i mod K,
    so every class appears n/K times. None for an unconditional generator (K = 0)."""
    if num_classes <= 0:
        return None
    idx = torch.arange(index, device=device) if isinstance(index, int) else index.to(device)
    return idx % num_classes
