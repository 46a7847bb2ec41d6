"""The field alone, for people who want V without the loss: ``drift_field(x, y_pos, y_neg, temperature)``."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from drifting_lightning.drift.fields import DriftField, MeanShift, Normalization
from drifting_lightning.drift.kernels import Kernel, Laplace


def mask_self_pairs(logits: Tensor) -> Tensor:
    """Mask x_i against itself in place: logits [G, N, T] whose first N columns are the generated rows.

    The mask is the dtype's lowest finite value, below every kernel logit (a constant such as -1e9 is not: Gaussian
    logits of points 1e4 apart at tau = 0.05 are -2e10, and the self-pair would win). Finite on purpose: a column whose
    only entry is masked (N = 1, no extra negatives) log-sum-exps to the mask itself, and the steps after it in
    fields.py (mask - log-sum-exps, then exp) stay finite or underflow to 0, where an -inf mask would give
    -inf - (-inf) = NaN. Log-sum-exps of unmasked entries are at most log T (every kernel logit is <= 0), far too
    small to push the mask past the float range.
    """
    n = logits.shape[-2]
    logits[..., :n].diagonal(dim1=-2, dim2=-1).fill_(torch.finfo(logits.dtype).min)
    return logits


def apply_coefficients(coef: Tensor, x: Tensor, targets: Tensor) -> Tensor:
    """V = W @ Y - rowsum(W) * x for coef [G, N, T], x [G, N, D], targets [G, T, D] -> [G, N, D].

    One [G, N, D] result: the rowsum term is allocated once and the product is added into it in place.
    """
    return (x * -coef.sum(-1, keepdim=True)).baddbmm_(coef, targets)


def is_temperature(value: object) -> bool:
    """True for a finite number > 0. NaN fails every comparison, so a bare ``t <= 0`` check lets it through."""
    try:
        number = float(value)
    except (TypeError, ValueError, RuntimeError):
        return False
    return math.isfinite(number) and number > 0


def _as_grouped(name: str, t: Tensor) -> Tensor:
    if t.dim() == 2:
        return t.unsqueeze(0)
    if t.dim() != 3:
        raise ValueError(f"{name} must be [G, N, D] or [N, D], got shape {tuple(t.shape)}")
    return t


def drift_field(
    x: Tensor,
    y_pos: Tensor,
    y_neg: Tensor,
    temperature: float,
    normalization: Normalization = "both",
    mask_self: bool = True,
    kernel: Kernel | None = None,
    field: DriftField | None = None,
    neg_weights: Tensor | None = None,
) -> Tensor:
    """Drifting field V at x (paper Alg. 2) on raw distances, in float32, without gradients.

    x: [G, N, D] or [N, D]; y_pos: [G, P, D]; y_neg: [G, M, D] with, when ``mask_self``, its first N rows equal to x
    (so x_i is not its own negative); neg_weights: [G, M] kernel weights of the negatives (default 1).
    ``field`` overrides ``normalization`` (default ``MeanShift(normalization)``); ``kernel`` defaults to Laplace.
    Returns V with the shape of x.
    """
    squeeze = x.dim() == 2
    x, y_pos, y_neg = _as_grouped("x", x), _as_grouped("y_pos", y_pos), _as_grouped("y_neg", y_neg)
    if y_pos.shape[1] == 0:
        raise ValueError(f"y_pos is empty (shape {tuple(y_pos.shape)}): the field needs at least one positive")
    if not (x.shape[0] == y_pos.shape[0] == y_neg.shape[0] and x.shape[-1] == y_pos.shape[-1] == y_neg.shape[-1]):
        raise ValueError(
            f"shape mismatch: x {tuple(x.shape)}, y_pos {tuple(y_pos.shape)}, y_neg {tuple(y_neg.shape)}; "
            "groups (dim 0) and feature sizes (last dim) must agree"
        )
    if mask_self and y_neg.shape[1] < x.shape[1]:
        raise ValueError(f"mask_self needs y_neg to start with x: y_neg has {y_neg.shape[1]} rows, x has {x.shape[1]}")
    if not is_temperature(temperature):
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")
    kernel = kernel if kernel is not None else Laplace()
    field = field if field is not None else MeanShift(normalization)
    with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
        x, y_pos, y_neg = x.float(), y_pos.float(), y_neg.float()
        targets = torch.cat([y_neg, y_pos], dim=1)
        logits = kernel.logits(torch.cdist(x, targets), temperature)
        if mask_self and field.masks_self:
            mask_self_pairs(logits)
        weights = None
        if neg_weights is not None:
            ones = torch.ones(y_pos.shape[:2], dtype=torch.float32, device=x.device)
            weights = torch.cat([neg_weights.float().reshape(y_neg.shape[:2]), ones], dim=1)
        v = apply_coefficients(field.coefficients(logits, y_neg.shape[1], weights), x, targets)
    return v.squeeze(0) if squeeze else v
