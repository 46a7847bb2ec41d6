"""The feature-encoder interface: samples -> {feature_name: [B, L, C]}."""

from __future__ import annotations

from torch import Tensor, nn


class FeatureEncoder(nn.Module):
    """Maps a batch of samples ``[B, ...]`` to named feature sets ``{name: [B, L, C]}``.

    L is the number of locations (1 for a global vector). Every feature set gets its own kernel, drift and
    loss term. Encoders are frozen: their weights never train and they stay in eval mode, but gradients
    flow through them to the samples (PAPER.md section 4).
    """

    def freeze(self) -> FeatureEncoder:
        self.requires_grad_(False)
        return self.train(False)

    def train(self, mode: bool = True) -> FeatureEncoder:
        # A frozen encoder must stay in eval mode when Lightning calls .train() on the parent module.
        return super().train(False)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        raise NotImplementedError


class Identity(FeatureEncoder):
    """The raw sample as one flat vector (the paper's "vanilla" term): ``{"raw": [B, 1, prod(shape)]}``."""

    def __init__(self, name: str = "raw") -> None:
        super().__init__()
        self.name = name

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return {self.name: x.flatten(1).unsqueeze(1)}
