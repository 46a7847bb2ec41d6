"""The latent-MAE feature encoder: a GroupNorm ResNet with basic blocks (PAPER.md section 4, paper A.3, A.5).

``ResNetBackbone`` is the trainable trunk (the MAE pretraining module in ``mae.py`` trains it);
``ResNetMAE`` wraps a frozen copy and turns its taps into the multi-scale feature sets of ``stats.py``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch.nn.functional as F
from torch import Tensor, nn

from drifting_lightning.checkpoints.reading import read_weights
from drifting_lightning.encoders.base import FeatureEncoder
from drifting_lightning.encoders.checkpoint import load_weights, tensors_under
from drifting_lightning.encoders.stats import FAMILIES, INPUT_STATISTICS, input_statistic, multiscale_features


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with 32 groups, or the largest divisor of ``channels`` below that (small test widths)."""
    return nn.GroupNorm(math.gcd(32, channels), channels)


def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """conv3x3-GN-ReLU-conv3x3-GN plus shortcut (1x1 conv + GN when the shape changes), then ReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1, self.norm1 = conv3x3(cin, cout, stride), group_norm(cout)
        self.conv2, self.norm2 = conv3x3(cout, cout), group_norm(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), group_norm(cout))

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu(self.norm1(self.conv1(x)))
        return F.relu(self.norm2(self.conv2(y)) + self.shortcut(x))


def stage_strides(size: int, num_stages: int, min_map: int = 4) -> list[int]:
    """Stride of each stage's first block for an input map of ``size`` x ``size``.

    Stage 1 keeps the stem's resolution; every later stage halves the map while the map entering it is at least
    ``2 * min_map`` (so no map gets smaller than ``min_map``), else keeps it. With min_map = 4:
    32 -> maps 32, 16, 8, 4 (the paper's); 28 -> 28, 14, 7, 7; 8 -> 8, 4, 4, 4.
    """
    strides, s = [], size
    for i in range(num_stages):
        if i > 0 and s >= 2 * min_map:
            strides.append(2)
            s = (s + 1) // 2
        else:
            strides.append(1)
    return strides


class ResNetBackbone(nn.Module):
    """GroupNorm ResNet trunk: 3x3 stride-1 stem, stages of basic blocks with widths C, 2C, 4C, 8C.

    ``forward(x: [B, in_channels, S, S])`` returns the taps in order, ``{name: [B, C_i, H_i, W_i]}``: ``"stem"``,
    then ``"stage{i}.block{j}"`` (1-based) after every 2nd block of a stage and after its last block
    (paper A.5; the stem tap follows the authors' code). ``skip_names`` are the stem and the stage outputs,
    the skips of the MAE's U-Net decoder; ``skip_channels`` their widths.
    """

    def __init__(
        self,
        in_channels: int = 4,
        width: int = 256,
        stages: Sequence[int] = (3, 4, 6, 3),
        input_size: int = 32,
        min_map: int = 4,
    ) -> None:
        super().__init__()
        if not stages or any(n < 1 for n in stages):
            raise ValueError(f"stages must be a non-empty list of positive block counts, got {list(stages)}")
        self.stem = nn.Sequential(conv3x3(in_channels, width), group_norm(width), nn.ReLU())
        self.strides = stage_strides(input_size, len(stages), min_map)
        self.stages = nn.ModuleList()
        self.tap_names, self.skip_names, self.skip_channels = ["stem"], ["stem"], [width]
        cin = width
        for i, (blocks, stride) in enumerate(zip(stages, self.strides)):
            cout = width * 2**i
            self.stages.append(
                nn.Sequential(
                    *[BasicBlock(cin if j == 0 else cout, cout, stride if j == 0 else 1) for j in range(blocks)]
                )
            )
            cin = cout
            self.tap_names += [
                f"stage{i + 1}.block{j + 1}" for j in range(blocks) if (j + 1) % 2 == 0 or j + 1 == blocks
            ]
            self.skip_names.append(f"stage{i + 1}.block{blocks}")
            self.skip_channels.append(cout)
        self.out_channels = cin

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        taps = {"stem": self.stem(x)}
        y = taps["stem"]
        for i, stage in enumerate(self.stages):
            for j, block in enumerate(stage):
                y = block(y)
                name = f"stage{i + 1}.block{j + 1}"
                if name in self.tap_names:
                    taps[name] = y
        return taps


def patchify(x: Tensor, p: int) -> Tensor:
    """[B, C, H, W] -> [B, C*p*p, H/p, W/p] (space-to-depth; 256x256x3 -> 32x32x192 at p = 8)."""
    return x if p == 1 else F.pixel_unshuffle(x, p)


def unpatchify(x: Tensor, p: int) -> Tensor:
    """Inverse of ``patchify``."""
    return x if p == 1 else F.pixel_shuffle(x, p)


class ResNetMAE(FeatureEncoder):
    """Frozen latent-MAE (or pixel-MAE) ResNet encoder with multi-scale feature statistics (paper A.5).

    x: [B, in_channels, input_size, input_size] -> feature sets ``{name: [B, L, C]}``:
      - for every backbone tap (``ResNetBackbone``): ``multiscale_features(tap, name, families)``, e.g.
        ``"stage2.block4.location"``, ``"stage2.block4.mean"``, ``"stage2.block4.patch2.std"``;
      - ``"input.stat"`` [B, 1, C_in]: the per-channel ``input_statistic`` of the backbone input (after patchify);
      - ``"raw"`` [B, 1, prod(x.shape[1:])]: the input as one flat vector.
    ``patchify`` > 1 first maps p x p pixel patches to channels (pixel variant: 256x256x3, p 8 -> 32x32x192).
    Down-sampling rule (``stage_strides``): a stage after the first halves its map while the map entering it is
    at least ``2 * min_map``; at min_map 4 maps are 32,16,8,4 for 32x32 inputs, 28,14,7,7 for 28x28, 8,4,4,4
    for 8x8. Patch families that do not tile a map are skipped (``stats.patch_fits``).
    ``checkpoint``: weights written by ``MAEPretraining`` (a Lightning .ckpt; its EMA encoder is used, else its
    online encoder), or a plain state_dict of the backbone (.pt/.pth/.safetensors, keys optionally prefixed
    ``backbone.``). Without a checkpoint the weights are random. The encoder is frozen and stays in eval mode.
    """

    def __init__(
        self,
        in_channels: int = 4,
        width: int = 256,
        stages: Sequence[int] = (3, 4, 6, 3),
        input_size: int = 32,
        patchify: int = 1,
        min_map: int = 4,
        families: Sequence[str] = FAMILIES,
        include_input_stats: bool = True,
        input_stat: str = "sqrt_mean_sq",
        include_raw: bool = True,
        checkpoint: str | None = None,
    ) -> None:
        super().__init__()
        if patchify < 1 or input_size % patchify:
            raise ValueError(f"input_size={input_size} must be a multiple of patchify={patchify}")
        if input_stat not in INPUT_STATISTICS:
            raise ValueError(f"unknown input_stat {input_stat!r}; choose from {list(INPUT_STATISTICS)}")
        unknown = [f for f in families if f not in FAMILIES]
        if unknown:
            raise ValueError(f"unknown feature families {unknown}; choose from {list(FAMILIES)}")
        self.config = {
            "in_channels": in_channels,
            "width": width,
            "stages": list(stages),
            "input_size": input_size,
            "patchify": patchify,
            "min_map": min_map,
        }
        self.patch = patchify
        self.families = tuple(families)
        self.include_input_stats, self.input_stat, self.include_raw = include_input_stats, input_stat, include_raw
        self.backbone = ResNetBackbone(in_channels * patchify**2, width, stages, input_size // patchify, min_map)
        if checkpoint is not None:
            self.load_checkpoint(checkpoint)
        self.freeze()

    def load_checkpoint(self, path: str | Path) -> None:
        """Load backbone weights from an ``MAEPretraining`` Lightning checkpoint or a plain state_dict file."""
        obj = read_weights(path, "encoder checkpoint")
        hint = ""
        if isinstance(obj.get("state_dict"), dict):  # Lightning checkpoint of MAEPretraining
            lightning = obj["state_dict"]
            state = tensors_under(lightning, "ema_encoder.") or tensors_under(lightning, "encoder.")
            if not state:
                raise RuntimeError(
                    f"{str(path)!r} is a Lightning checkpoint without encoder weights (no keys starting with "
                    f"'ema_encoder.' or 'encoder.'); is it a checkpoint of MAEPretraining?"
                )
            trained = obj.get("encoder_config")
            if isinstance(trained, dict):
                diff = {k: v for k, v in trained.items() if self.config.get(k) != v}
                if diff:
                    hint = f"the checkpoint was trained with {diff}; this encoder has " + str(
                        {k: self.config.get(k) for k in diff}
                    )
        else:
            state = tensors_under(obj, "backbone.") or tensors_under(obj, "")
        load_weights(self.backbone, state, str(path), hint)
        if hint:  # same weight shapes, other down-sampling (input_size, min_map): loads, but features differ
            warnings.warn(f"{str(path)!r}: {hint}", stacklevel=2)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        z = patchify(x, self.patch)
        feats: dict[str, Tensor] = {}
        for name, fmap in self.backbone(z).items():
            feats.update(multiscale_features(fmap, name, self.families))
        if self.include_input_stats:  # A.5: per-channel statistic of the encoder input
            feats["input.stat"] = input_statistic(z, self.input_stat)
        if self.include_raw:  # A.5: the raw sample as one flat vector
            feats["raw"] = x.flatten(1).unsqueeze(1)
        return feats
