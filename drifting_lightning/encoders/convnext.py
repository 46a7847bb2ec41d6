"""ConvNeXt-V2 features for pixel generators, as the authors take them (their ``models/convnext.py``).

The network is transformers' ``ConvNextV2Model`` with the weights their code loads
(``facebook/convnextv2-base-22k-224``); this module only adds their pre-processing and their 13 feature sets
(PAPER.md section 4).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from drifting_lightning.encoders.base import FeatureEncoder
from drifting_lightning.encoders.stats import safe_std, to_sets

CONVNEXT_WEIGHTS = "facebook/convnextv2-base-22k-224"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LN_EPS = 1e-6  # their final LayerNorm is flax's (eps 1e-6); transformers' config says 1e-12


def _hub_offline() -> bool:
    flags = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    return any(os.environ.get(k, "0") not in ("", "0", "false", "False") for k in flags)


def load_convnext(weights: str):
    """A ``ConvNextV2Model`` from a local transformers folder, or from the hub id ``weights`` when online."""
    from transformers import ConvNextV2Model

    if Path(weights).expanduser().is_dir():
        return ConvNextV2Model.from_pretrained(str(Path(weights).expanduser()))
    if _hub_offline():
        raise FileNotFoundError(
            f"ConvNeXt-V2 weights {weights!r}: not a local folder and the hub is offline (HF_HUB_OFFLINE); download "
            f"{CONVNEXT_WEIGHTS} (huggingface-cli download {CONVNEXT_WEIGHTS} --local-dir DIR) and pass weights: DIR"
        )
    return ConvNextV2Model.from_pretrained(weights)


def _channel_normalize(y: Tensor) -> Tensor:
    """Per location, standardise over channels: (y - mean) / (std + 1e-3) (their ``normalize``). y: [B, C, H, W]."""
    y = y.float()
    mean = y.mean(1, keepdim=True)
    std = (y - mean).square().mean(1, keepdim=True).sqrt()
    return (y - mean) / (std + 1e-3)


class ConvNeXtV2(FeatureEncoder):
    """Frozen ConvNeXt-V2 with the authors' feature sets for pixel samples.

    x: [B, 3, H, W] in [-1, 1] -> mapped to [0, 1], ImageNet-normalised, resized to ``resolution`` (bilinear,
    antialiased like ``jax.image.resize`` when shrinking), then through the stem and the 4 stages. Each stage's
    output is standardised over channels per location; returned (their names, their spelling):
      - ``convenxt_stage_{i}`` [B, h*w, C_i] for stages 1-3 (every location);
      - ``convenxt_stage_{i}_mean``, ``convenxt_stage_{i}_std`` [B, 1, C_i] for stages 0-3;
      - ``global_mean`` [B, 1, C_3]: the final LayerNorm of the raw last map's mean; ``global_std`` [B, 1, C_3].
    13 sets. ``weights``: a transformers folder or hub id (offline: a local folder only).
    """

    def __init__(self, weights: str = CONVNEXT_WEIGHTS, resolution: int = 224) -> None:
        super().__init__()
        self.net = load_convnext(weights)
        self.resolution = resolution
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.freeze()

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        y = ((x.float() + 1) / 2 - self.mean) / self.std
        if y.shape[-2:] != (self.resolution, self.resolution):
            y = F.interpolate(y, size=(self.resolution, self.resolution), mode="bilinear", align_corners=False,
                              antialias=y.shape[-1] > self.resolution or y.shape[-2] > self.resolution)
        h = self.net.embeddings(y)
        feats: dict[str, Tensor] = {}
        for i, stage in enumerate(self.net.encoder.stages):
            h = stage(h)
            normed = _channel_normalize(h)
            name = f"convenxt_stage_{i}"
            if i > 0:
                feats[name] = to_sets(normed)
            feats[f"{name}_mean"] = to_sets(normed.mean((2, 3), keepdim=True))
            feats[f"{name}_std"] = to_sets(safe_std(normed, (2, 3)))
        norm = self.net.layernorm
        pooled = F.layer_norm(h.mean((2, 3)).float(), norm.normalized_shape, norm.weight, norm.bias, LN_EPS)
        feats["global_mean"] = pooled.unsqueeze(1)
        feats["global_std"] = to_sets(safe_std(_channel_normalize(h), (2, 3)))
        return feats
