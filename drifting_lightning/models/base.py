"""The generator interface: f(noise, labels, alpha) -> sample, one network evaluation."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class Generator(nn.Module):
    """Base class of one-step generators.

    Subclasses set ``sample_shape`` (shape of one output sample), ``noise_shape`` (shape of one Gaussian
    noise draw) and ``num_classes`` (0 for an unconditional generator), and implement ``forward``.
    ``draw_inputs`` returns every random input the generator takes, as keyword arguments of ``forward``,
    so that sampling with the same inputs is exactly reproducible (style indices of the DiT included).
    """

    sample_shape: tuple[int, ...]
    noise_shape: tuple[int, ...]
    num_classes: int = 0

    def draw_inputs(
        self, n: int, device: torch.device | str | None = None, generator: torch.Generator | None = None
    ) -> dict[str, Tensor]:
        """Random inputs for ``n`` samples: ``{"noise": [n, *noise_shape]}`` (+ extra keys in subclasses)."""
        device = device if device is not None else self._device()
        return {"noise": torch.randn((n, *self.noise_shape), device=device, generator=generator)}

    def forward(self, noise: Tensor, labels: Tensor | None = None, alpha: Tensor | None = None) -> Tensor:
        """noise: [B, *noise_shape]; labels: [B] long or None; alpha: [B] float or None -> [B, *sample_shape]."""
        raise NotImplementedError

    def _device(self) -> torch.device:
        for p in self.parameters():
            return p.device
        return torch.device("cpu")
