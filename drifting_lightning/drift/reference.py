"""Literal transcriptions of the method, loops and all, for tests and benchmarks (never for training).

``authors_loss`` follows PAPER.md section 3 ("Exact reading of the authors' loss") line by line, looping over groups
and temperatures; ``algorithm2`` is paper Alg. 2 for one group. The batched engine in ``loss.py`` must agree with
them to float32 rounding.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def algorithm2(x: Tensor, y_pos: Tensor, y_neg: Tensor, temperature: float, mask_self: bool = True) -> Tensor:
    """Paper Alg. 2 for one group, as printed (no affinity floor).

    x [N, D], y_pos [Np, D], y_neg [Nn, D] -> V [N, D], on the device of x.
    """
    d_pos = torch.cdist(x, y_pos)
    d_neg = torch.cdist(x, y_neg)
    if mask_self:
        n = x.shape[0]
        d_neg = d_neg + torch.eye(n, y_neg.shape[0], dtype=d_neg.dtype, device=d_neg.device) * 1e6
    logit = torch.cat([-d_pos, -d_neg], dim=1) / temperature
    a = torch.sqrt(logit.softmax(dim=-1) * logit.softmax(dim=-2))
    a_pos, a_neg = a[:, : y_pos.shape[0]], a[:, y_pos.shape[0] :]
    w_pos = a_pos * a_neg.sum(dim=1, keepdim=True)
    w_neg = a_neg * a_pos.sum(dim=1, keepdim=True)
    return w_pos @ y_pos - w_neg @ y_neg


def authors_loss(
    gen: Tensor,
    pos: Tensor,
    neg: Tensor,
    w_neg: Tensor,
    temperatures: tuple[float, ...] = (0.02, 0.05, 0.2),
) -> Tensor:
    """The authors' loss for one feature: gen [G, N, C], pos [G, P, C], neg [G, M, C], w_neg [G, M] -> scalar.

    The per-group losses are averaged over groups (the batch mean the training step takes). Runs on gen's device.
    """
    g_count, n, c = gen.shape
    x = gen.detach()
    targets = torch.cat([x, neg, pos], dim=1)
    ones = {"dtype": w_neg.dtype, "device": gen.device}
    w = torch.cat([torch.ones(g_count, n, **ones), w_neg.to(gen.device), torch.ones(g_count, pos.shape[1], **ones)], 1)
    d = torch.stack([torch.cdist(x[g], targets[g]) for g in range(g_count)])
    w3 = w[:, None, :].expand_as(d)
    s = (d * w3).mean() / w3.mean()  # one scalar over all groups, rows and columns
    s_in = max(s / math.sqrt(c), 1e-3)
    dn = d / max(s, 1e-3)
    for g in range(g_count):
        for i in range(n):
            dn[g, i, i] += 100.0
    xs, ys = x / s_in, targets / s_in
    force = torch.zeros_like(xs)
    for tau in temperatures:
        v = torch.zeros_like(xs)
        for g in range(g_count):
            logit = -dn[g] / tau
            a = torch.sqrt(torch.clamp(logit.softmax(dim=-1) * logit.softmax(dim=-2), min=1e-6)) * w[g]
            a_neg, a_pos = a[:, : n + neg.shape[1]], a[:, n + neg.shape[1] :]
            coef = torch.cat([-a_neg * a_pos.sum(-1, keepdim=True), a_pos * a_neg.sum(-1, keepdim=True)], dim=-1)
            v[g] = coef @ ys[g] - coef.sum(-1, keepdim=True) * xs[g]
        force = force + v / torch.sqrt(torch.clamp((v**2).mean(), min=1e-8))  # lambda over all groups
    per_group = ((gen / s_in - (xs + force)) ** 2).mean(dim=(1, 2))
    return per_group.mean()
