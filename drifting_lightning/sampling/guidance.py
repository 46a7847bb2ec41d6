"""Guidance by unconditional negatives (PAPER.md section 5): the alpha distribution and the weight w."""

from __future__ import annotations

import torch
from torch import Tensor


class GuidanceSampler:
    """Draws one guidance scale alpha per class label from p(alpha) ~ alpha^-k on [alpha_min, alpha_max].

    With probability ``p_unguided`` alpha is exactly 1 (the mixture one of the paper's configs uses).
    ``power`` = k = 0 gives the uniform distribution; alpha_min = alpha_max gives a fixed alpha.
    """

    def __init__(
        self, power: float = 3.0, alpha_min: float = 1.0, alpha_max: float = 4.0, p_unguided: float = 0.0
    ) -> None:
        if not 1.0 <= alpha_min <= alpha_max:
            raise ValueError(f"need 1 <= alpha_min <= alpha_max, got alpha_min={alpha_min}, alpha_max={alpha_max}")
        if not 0.0 <= p_unguided <= 1.0:
            raise ValueError(f"p_unguided must lie in [0, 1], got {p_unguided}")
        self.power = power
        self.alpha_min = alpha_min
        self.alpha_max = alpha_max
        self.p_unguided = p_unguided

    def inverse_cdf(self, u: Tensor) -> Tensor:
        """Quantile function of the truncated power law: u in [0, 1] -> alpha."""
        lo, hi, k = self.alpha_min, self.alpha_max, self.power
        if hi == lo:
            return torch.full_like(u, lo)
        if abs(k - 1.0) < 1e-12:
            return lo * (hi / lo) ** u
        e = 1.0 - k
        return (lo**e + u * (hi**e - lo**e)) ** (1.0 / e)

    def sample(
        self, n: int, device: torch.device | str | None = None, generator: torch.Generator | None = None
    ) -> Tensor:
        """n guidance scales, float32 [n]."""
        u = torch.rand(n, device=device, generator=generator, dtype=torch.float64)
        alpha = self.inverse_cdf(u)
        if self.p_unguided > 0:
            unguided = torch.rand(n, device=device, generator=generator, dtype=torch.float64) < self.p_unguided
            alpha = torch.where(unguided, torch.ones_like(alpha), alpha)
        return alpha.float()

    def __repr__(self) -> str:
        return (
            f"GuidanceSampler(power={self.power}, alpha_min={self.alpha_min}, alpha_max={self.alpha_max}, "
            f"p_unguided={self.p_unguided})"
        )


def guidance_weight(alpha: Tensor, n_generated: int, n_unconditional: int) -> Tensor:
    """w = (alpha - 1)(N_neg - 1) / N_unc, the kernel weight of each unconditional negative (PAPER.md 5).

    alpha: [G] -> w: [G]. alpha = 1 gives w = 0 (no guidance).
    """
    if n_unconditional <= 0:
        raise ValueError(f"guidance needs at least one unconditional sample, got n_unconditional={n_unconditional}")
    return (alpha - 1.0) * (n_generated - 1) / n_unconditional
