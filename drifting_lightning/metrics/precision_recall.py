"""Improved precision and recall (Kynkaanniemi et al. 2019): k-NN manifold estimates in feature space.

Each set's manifold is the union of balls around its samples with radius the distance to the k-th nearest
neighbour within the set. Precision: fraction of generated samples inside the real manifold; recall: fraction of
real samples inside the generated manifold. O(N^2 F) time, O(N * chunk) memory: cheap up to ~10k samples.
"""

from __future__ import annotations

import torch
from torch import Tensor


def knn_radii(x: Tensor, k: int = 3, chunk_size: int = 10000) -> Tensor:
    """x: [N, F] -> distance of each sample to its k-th nearest neighbour in x (itself excluded): [N]."""
    if x.shape[0] <= k:
        raise ValueError(f"need more than k={k} samples for k-NN radii, got {x.shape[0]}")
    return torch.cat([torch.cdist(c, x).kthvalue(k + 1, dim=1).values for c in x.split(chunk_size)])


def manifold_coverage(query: Tensor, support: Tensor, radii: Tensor, chunk_size: int = 10000) -> float:
    """Fraction of query [M, F] lying within radii [N] of some support sample [N, F]."""
    inside = [(torch.cdist(c, support) <= radii[None]).any(dim=1) for c in query.split(chunk_size)]
    return torch.cat(inside).float().mean().item()


def precision_recall(real: Tensor, fake: Tensor, k: int = 3, chunk_size: int = 10000) -> tuple[float, float]:
    """real: [N, F], fake: [M, F] -> (precision, recall), as torch-fidelity's ``prc`` with neighbourhood k."""
    if real.dim() != 2 or fake.dim() != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"expected features [N, F] and [M, F], got {list(real.shape)} and {list(fake.shape)}")
    precision = manifold_coverage(fake, real, knn_radii(real, k, chunk_size), chunk_size)
    recall = manifold_coverage(real, fake, knn_radii(fake, k, chunk_size), chunk_size)
    return precision, recall
