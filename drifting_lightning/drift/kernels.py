"""Kernels k(x, y) = exp(logit(||x - y||, tau)) as plug-ins that turn distances into logits.

The drift fields only ever need log k, so a kernel is the map distance -> logit. Distances are plain L2
(not squared); with feature normalisation they are divided by the batch mean distance first (PAPER.md 3).
Each kernel allocates its result once and works in place on it: the engine budgets one [rows, N, T] matrix per
temperature's logits, with no kernel transient beside it.
"""

from __future__ import annotations

from torch import Tensor


class Kernel:
    """Base class: ``logits(distance, temperature)`` returns log k for distances of any shape.

    Kernels are scale families, functions of distance / temperature only (the loss relies on it to fold the feature
    scale into the temperature); ``temperature`` may be a tensor broadcastable to ``distance``.
    """

    def logits(self, distance: Tensor, temperature: float) -> Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Laplace(Kernel):
    """The paper's kernel k = exp(-d / tau) (PAPER.md 2), the default."""

    def logits(self, distance: Tensor, temperature: float) -> Tensor:
        return distance / -temperature


class Gaussian(Kernel):
    """Gaussian kernel k = exp(-d^2 / (2 tau^2)): lighter tails, sharper at small tau."""

    def logits(self, distance: Tensor, temperature: float) -> Tensor:
        return distance.square().mul_(-0.5 / (temperature * temperature))


class Cauchy(Kernel):
    """Heavy-tailed Cauchy kernel k = 1 / (1 + (d / tau)^2): far points still pull, which keeps the field
    informative when everything is far apart (a flat Laplace kernel)."""

    def logits(self, distance: Tensor, temperature: float) -> Tensor:
        return (distance / temperature).square_().log1p_().neg_()


class InverseMultiquadric(Kernel):
    """Inverse multiquadric k = (1 + (d / tau)^2)^(-1/2), heavier-tailed still than Cauchy."""

    def logits(self, distance: Tensor, temperature: float) -> Tensor:
        return (distance / temperature).square_().log1p_().mul_(-0.5)
