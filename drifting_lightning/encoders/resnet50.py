"""A frozen torchvision ResNet-50 with self-supervised weights from a file (PAPER.md section 4, Table 3).

The paper's pixel-space baselines use MoCo-v2 and SimCLR ResNet-50s. Their weights are read from a local file,
never downloaded; features are the multi-scale statistics of each stage output (layer1..layer4).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import Tensor, nn

from drifting_lightning.checkpoints.reading import read_weights
from drifting_lightning.encoders.base import FeatureEncoder
from drifting_lightning.encoders.checkpoint import load_weights, tensors_under
from drifting_lightning.encoders.stats import FAMILIES, INPUT_STATISTICS, input_statistic, multiscale_features

KEY_LAYOUTS = ("auto", "moco", "torchvision", "simclr")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
STAGES = ("layer1", "layer2", "layer3", "layer4")


def detect_layout(obj: Mapping[str, Any]) -> str:
    """``"moco"`` when the weights sit under ``module.encoder_q.``, else ``"torchvision"``."""
    state = obj.get("state_dict", obj)
    return "moco" if any(k.startswith("module.encoder_q.") for k in state) else "torchvision"


def trunk_state(obj: Mapping[str, Any], layout: str) -> dict[str, Tensor]:
    """The ResNet-50 trunk weights (torchvision key names, ``fc`` dropped) from a checkpoint's contents.

    - ``"moco"`` (MoCo v1/v2 release): ``{"state_dict": {"module.encoder_q.<torchvision key>": ...}}``; the
      key encoder ``module.encoder_k.``, the ``queue`` and the MLP head ``fc.*`` are ignored.
    - ``"torchvision"`` / ``"simclr"`` (SimCLR weights converted to torchvision, plain torchvision state_dicts):
      torchvision key names, at the top level or under ``"state_dict"`` or ``"model"``, optionally prefixed
      ``module.`` (DDP); ``fc.*`` is ignored.
    """
    if layout == "moco":
        state = tensors_under(obj.get("state_dict", obj), "module.encoder_q.")
    else:
        for nest in ("state_dict", "model"):
            if isinstance(obj.get(nest), Mapping):
                obj = obj[nest]
                break
        state = tensors_under(obj, "")
        if state and all(k.startswith("module.") for k in state):
            state = tensors_under(state, "module.")
    return {k: v for k, v in state.items() if not k.startswith("fc.")}


class PretrainedResNet50(FeatureEncoder):
    """Frozen ResNet-50 (torchvision layout, BatchNorm in eval mode) loaded from ``checkpoint``.

    x: [B, 3, H, W] in [-1, 1] -> mapped to [0, 1] and normalised with the ImageNet mean/std, then
    ``multiscale_features`` of each stage output, named like the authors' sets (e.g. ``"layer3_mean_2"``;
    maps are H/4, H/8, H/16, H/32). Optional: ``"input.stat"`` [B, 1, 3] (``input_statistic`` of the normalised
    input) and ``"raw"`` [B, 1, 3*H*W].
    ``key_layout``: "moco", "torchvision"/"simclr" (see ``trunk_state``) or "auto" (MoCo when keys start with
    ``module.encoder_q.``). ``checkpoint=None`` keeps random weights and warns (shape tests only).
    """

    def __init__(
        self,
        checkpoint: str | None = None,
        key_layout: str = "auto",
        families: Sequence[str] = FAMILIES,
        include_input_stats: bool = False,
        input_stat: str = "sqrt_mean_sq",
        include_raw: bool = False,
    ) -> None:
        super().__init__()
        if key_layout not in KEY_LAYOUTS:
            raise ValueError(f"unknown key_layout {key_layout!r}; choose from {list(KEY_LAYOUTS)}")
        if input_stat not in INPUT_STATISTICS:
            raise ValueError(f"unknown input_stat {input_stat!r}; choose from {list(INPUT_STATISTICS)}")
        unknown = [f for f in families if f not in FAMILIES]
        if unknown:
            raise ValueError(f"unknown feature families {unknown}; choose from {list(FAMILIES)}")
        self.families = tuple(families)
        self.include_input_stats, self.input_stat, self.include_raw = include_input_stats, input_stat, include_raw
        self.net = torchvision.models.resnet50(weights=None)
        self.net.fc = nn.Identity()  # the head is never used
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        if checkpoint is None:
            warnings.warn("PretrainedResNet50 without a checkpoint has random weights", stacklevel=2)
        else:
            self.load_checkpoint(checkpoint, key_layout)
        self.freeze()

    def load_checkpoint(self, path: str | Path, key_layout: str = "auto") -> None:
        obj = read_weights(path, "encoder checkpoint")
        layout = detect_layout(obj) if key_layout == "auto" else key_layout
        hint = (
            f"key layout {layout!r}"
            + (" (detected)" if key_layout == "auto" else "")
            + f"; other layouts: {[k for k in KEY_LAYOUTS if k not in ('auto', layout)]}"
        )
        state = trunk_state(obj, layout)
        if state:  # files written before BatchNorm counted its batches lack num_batches_tracked (unused in eval)
            own = self.net.state_dict()
            state.update({k: own[k] for k in own if k.endswith("num_batches_tracked") and k not in state})
        load_weights(self.net, state, str(path), hint)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        z = ((x + 1) / 2 - self.mean) / self.std
        net = self.net
        y = net.maxpool(net.relu(net.bn1(net.conv1(z))))
        feats: dict[str, Tensor] = {}
        for name in STAGES:
            y = getattr(net, name)(y)
            feats.update(multiscale_features(y, name, self.families))
        if self.include_input_stats:
            feats["input.stat"] = input_statistic(z, self.input_stat)
        if self.include_raw:
            feats["raw"] = x.flatten(1).unsqueeze(1)
        return feats
