"""Kernels k(x, y) = exp(logit(||x - y||, tau)) as plug-ins that turn distances into logits.

The drift fields only ever need log k, so a kernel is the map distance -> logit. Distances are plain L2
(not squared); with feature normalisation they are divided by the batch mean distance first (PAPER.md 3).
Each kernel writes its result once, into ``out`` when given (the engine's reused buffer) or a new tensor, and works
in place on it: the engine budgets one [rows, N, T] matrix per temperature's logits, with no kernel transient beside
it.
"""

from __future__ import annotations

import torch
from torch import Tensor


class Kernel:
    """Base class: ``logits(distance, temperature, out=None)`` returns log k for distances of any shape, in ``out``
    (distance's shape) when given.

    Kernels are scale families, functions of distance / temperature only (the loss relies on it to fold the feature
    scale into the temperature), and non-increasing in distance (the loss takes a row's largest logit from its
    smallest distance); ``temperature`` may be a tensor broadcastable to ``distance``.
    """

    def logits(self, distance: Tensor, temperature: float, out: Tensor | None = None) -> Tensor:
        raise NotImplementedError

    def relative_logits(
        self, distance: Tensor, temperature: float, nearest: Tensor, out: Tensor | None = None
    ) -> Tensor:
        """logits(distance) - logits(nearest): each row's logits relative to its largest, given ``nearest``
        [..., 1], the row's smallest distance (the engine's one-exponential softmax starts from these)."""
        return self.logits(distance, temperature, out=out).sub_(self.logits(nearest, temperature))

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Laplace(Kernel):
    """The paper's kernel k = exp(-d / tau) (PAPER.md 2), the default."""

    def logits(self, distance: Tensor, temperature: float, out: Tensor | None = None) -> Tensor:
        return torch.div(distance, -temperature, out=out)

    def relative_logits(
        self, distance: Tensor, temperature: float, nearest: Tensor, out: Tensor | None = None
    ) -> Tensor:
        if isinstance(temperature, Tensor) and (temperature.dim() or temperature.device.type != "cpu"):
            return super().relative_logits(distance, temperature, nearest, out)
        # (nearest - d) / tau in one pass over the distances instead of two (a scalar alpha keeps it vectorised)
        return torch.add(nearest / temperature, distance, alpha=-1 / float(temperature), out=out)


class Gaussian(Kernel):
    """Gaussian kernel k = exp(-d^2 / (2 tau^2)): lighter tails, sharper at small tau."""

    def logits(self, distance: Tensor, temperature: float, out: Tensor | None = None) -> Tensor:
        return torch.square(distance, out=out).mul_(-0.5 / (temperature * temperature))


class Cauchy(Kernel):
    """Heavy-tailed Cauchy kernel k = 1 / (1 + (d / tau)^2): far points still pull, which keeps the field
    informative when everything is far apart (a flat Laplace kernel)."""

    def logits(self, distance: Tensor, temperature: float, out: Tensor | None = None) -> Tensor:
        return torch.div(distance, temperature, out=out).square_().log1p_().neg_()


class InverseMultiquadric(Kernel):
    """Inverse multiquadric k = (1 + (d / tau)^2)^(-1/2), heavier-tailed still than Cauchy."""

    def logits(self, distance: Tensor, temperature: float, out: Tensor | None = None) -> Tensor:
        return torch.div(distance, temperature, out=out).square_().log1p_().mul_(-0.5)
