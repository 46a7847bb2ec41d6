"""The authors' MAE ResNet encoder (their ``models/mae_model.py``) and its feature sets (their ``get_activations``).

``ResNetConfig`` is the one home of the architecture's arguments; ``ResNetEncoder`` is the trunk that the MAE
pretraining (``mae.py``) trains and that the import of their released encoders (``official/encoder.py``) fills;
``ResNetMAE`` wraps a frozen copy and returns the 86 named feature sets of a latent MAE (PAPER.md section 4).
Module names mirror the authors' parameter tree (``stages.1.0.proj_gn`` is their ``stages_1/layers_0/proj_gn``).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from drifting_lightning.checkpoints.reading import read_weights
from drifting_lightning.encoders.base import FeatureEncoder
from drifting_lightning.encoders.checkpoint import load_weights, tensors_under
from drifting_lightning.encoders.stats import FAMILIES, flat_channels_last, input_statistic, multiscale_features

GN_EPS = 1e-6  # flax's GroupNorm default, which the authors keep


@dataclass(frozen=True)
class ResNetConfig:
    """The architecture of the authors' MAE ResNet (their ``model_config``).

    in_channels: channels of a sample (4 for SD-VAE latents, 3 for pixels); width: the first stage's width C (stages
    are C, 2C, 4C, 8C wide; their MAE-640 is width 640, ~2.1B encoder parameters); stages: basic blocks per stage (4
    stages); patchify: p x p pixel patches become channels before the encoder (8 for 256x256 pixels).
    """

    in_channels: int = 4
    width: int = 256
    stages: tuple[int, int, int, int] = field(default=(3, 4, 6, 3))
    patchify: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "stages", tuple(int(n) for n in self.stages))
        if len(self.stages) != 4 or any(n < 1 for n in self.stages):
            raise ValueError(f"stages must be 4 positive block counts (the authors' layers), got {list(self.stages)}")
        if self.in_channels < 1 or self.width < 1 or self.patchify < 1:
            raise ValueError(f"in_channels, width and patchify must be positive, got {self}")

    @property
    def encoder_in(self) -> int:
        """Channels entering the encoder: in_channels * patchify^2."""
        return self.in_channels * self.patchify**2

    @property
    def widths(self) -> list[int]:
        return [self.width * 2**i for i in range(4)]

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["stages"] = list(self.stages)
        return d

    @classmethod
    def of(cls, value: ResNetConfig | Mapping[str, Any]) -> ResNetConfig:
        return value if isinstance(value, ResNetConfig) else cls(**dict(value))


def gn_groups(channels: int, max_groups: int = 32) -> int:
    """The largest divisor of ``channels`` that is at most ``max_groups`` (their ``_choose_gn_groups``)."""
    g = min(max_groups, channels)
    while g > 1 and channels % g:
        g -= 1
    return max(g, 1)


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(gn_groups(channels), channels, eps=GN_EPS)


def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """conv3x3-GN-ReLU-conv3x3-GN plus the input (through proj_conv 1x1 + proj_gn when the shape changes), ReLU."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1, self.gn1 = conv3x3(cin, cout, stride), group_norm(cout)
        self.conv2, self.gn2 = conv3x3(cout, cout), group_norm(cout)
        self.project = stride != 1 or cin != cout
        if self.project:  # flax creates these parameters only when the block uses them
            self.proj_conv = nn.Conv2d(cin, cout, 1, stride=stride, bias=False)
            self.proj_gn = group_norm(cout)

    def forward(self, x: Tensor) -> Tensor:
        y = self.gn2(self.conv2(F.relu(self.gn1(self.conv1(x)))))
        residual = self.proj_gn(self.proj_conv(x)) if self.project else x
        return F.relu(residual + y)


class ResNetEncoder(nn.Module):
    """The GroupNorm ResNet trunk: 3x3 stride-1 stem ``conv1``-``gn1``-ReLU, then 4 stages of basic blocks (the first
    block of stages 2-4 has stride 2), each followed by a GroupNorm ``layer{i}_norm`` whose output is both the
    stage's feature and the next stage's input.

    ``forward(x: [B, encoder_in, H, W], blocks=False)`` returns ``{"conv1", "layer1".."layer4"}`` maps
    ``[B, C_i, H_i, W_i]``; with ``blocks=True`` also the raw output of every block, ``{"layer{i}": [...]}``.
    """

    def __init__(self, arch: ResNetConfig) -> None:
        super().__init__()
        self.arch = arch
        self.conv1, self.gn1 = conv3x3(arch.encoder_in, arch.width), group_norm(arch.width)
        self.stages = nn.ModuleList()
        cin = arch.width
        for i, (blocks, cout) in enumerate(zip(arch.stages, arch.widths)):
            stride = 2 if i > 0 else 1
            self.stages.append(nn.ModuleList([BasicBlock(cin if j == 0 else cout, cout, stride if j == 0 else 1)
                                              for j in range(blocks)]))
            self.add_module(f"layer{i + 1}_norm", group_norm(cout))
            cin = cout

    def forward(self, x: Tensor, blocks: bool = False) -> Any:
        feats = {"conv1": F.relu(self.gn1(self.conv1(x)))}
        outs: dict[str, list[Tensor]] = {}
        y = feats["conv1"]
        for i, stage in enumerate(self.stages):
            name = f"layer{i + 1}"
            outs[name] = []
            for block in stage:
                y = block(y)
                outs[name].append(y)
            y = getattr(self, f"{name}_norm")(y)
            feats[name] = y
        return (feats, outs) if blocks else feats


def patchify(x: Tensor, p: int) -> Tensor:
    """[B, C, H, W] -> [B, p*p*C, H/p, W/p], channels in the authors' (h, w, c) order (``b (h1 h2) (w1 w2) c ->
    b h1 w1 (h2 w2 c)``): 256x256x3 -> 32x32x192 at p = 8."""
    if p == 1:
        return x
    b, c, h, w = x.shape
    return x.reshape(b, c, h // p, p, w // p, p).permute(0, 3, 5, 1, 2, 4).reshape(b, p * p * c, h // p, w // p)


def unpatchify(x: Tensor, p: int, channels: int) -> Tensor:
    """Inverse of ``patchify``."""
    if p == 1:
        return x
    b, _, h, w = x.shape
    return x.reshape(b, p, p, channels, h, w).permute(0, 3, 4, 1, 5, 2).reshape(b, channels, h * p, w * p)


def save_encoder(path: str | Path, state: Mapping[str, Tensor], arch: ResNetConfig) -> None:
    """An encoder checkpoint: ``{"encoder_config": arch, "encoder": state_dict}`` (torch.save writes each tensor
    from its own storage, so saving needs no second copy of CPU weights)."""
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    torch.save({"encoder_config": arch.as_dict(), "encoder": state}, str(path))


def encoder_checkpoint(path: str | Path) -> tuple[dict[str, Tensor], dict[str, Any] | None]:
    """(encoder state_dict, architecture dict or None) from any encoder file this project writes or reads:

    - an encoder checkpoint (``MAEPretraining.export_encoder``, ``drifting import-official``): a torch file
      ``{"encoder_config": {...}, "encoder": state_dict}``;
    - a Lightning checkpoint of ``MAEPretraining`` (its EMA encoder, else its online encoder);
    - a plain state_dict of the encoder (.pt/.pth/.safetensors, keys optionally prefixed ``encoder.``).
    """
    obj = read_weights(path, "encoder checkpoint")
    config = obj.get("encoder_config") if isinstance(obj.get("encoder_config"), dict) else None
    if isinstance(obj.get("encoder"), dict):
        return dict(obj["encoder"]), config
    if isinstance(obj.get("state_dict"), dict):  # Lightning checkpoint of MAEPretraining
        lightning = obj["state_dict"]
        state = tensors_under(lightning, "ema_encoder.") or tensors_under(lightning, "model.encoder.")
        if not state:
            raise RuntimeError(
                f"{str(path)!r} is a Lightning checkpoint without encoder weights (no keys starting with "
                "'ema_encoder.' or 'model.encoder.'); is it a checkpoint of MAEPretraining?"
            )
        return state, config
    return tensors_under(obj, "encoder.") or tensors_under(obj, ""), config


class ResNetMAE(FeatureEncoder):
    """Frozen MAE ResNet with the authors' feature sets (``get_activations`` with patch sizes 2 and 4, means, stds,
    every 2nd block).

    x: [B, in_channels, H, W] -> ``{name: [B, L, C]}`` with the authors' names:
      - ``"global"`` [B, 1, H*W*C]: the raw sample as one vector, (h, w, c) order (``include_raw``);
      - ``"norm_x"`` [B, 1, C_in]: per-channel RMS of the encoder input after patchify (``include_input_stats``);
      - for every tap ``conv1``, ``layer1``..``layer4`` (GroupNorm'd stage outputs) and ``layer{i}_blk{k}`` (raw
        output of every ``every_k_block``-th block): ``multiscale_features(tap, name, families)``, e.g. ``layer2``,
        ``layer2_mean``, ``layer2_std``, ``layer2_mean_2``, ``layer2_std_4``.
    A latent MAE (32x32x4, stages 3-4-6-3) gives 86 sets. ``arch``: the ``ResNetConfig`` (or its dict); when None it
    is read from the checkpoint (default ``ResNetConfig()`` without one). ``checkpoint``: an encoder file (see
    ``encoder_checkpoint``). Without a checkpoint the weights are random.
    """

    def __init__(
        self,
        arch: ResNetConfig | None = None,
        checkpoint: str | None = None,
        families: Sequence[str] = FAMILIES,
        every_k_block: int = 2,
        include_input_stats: bool = True,
        include_raw: bool = True,
    ) -> None:
        super().__init__()
        unknown = [f for f in families if f not in FAMILIES]
        if unknown:
            raise ValueError(f"unknown feature families {unknown}; choose from {list(FAMILIES)}")
        if every_k_block < 1:
            raise ValueError(f"every_k_block must be >= 1, got {every_k_block}")
        try:
            state, stored = encoder_checkpoint(checkpoint) if checkpoint is not None else ({}, None)
        except FileNotFoundError as err:
            raise FileNotFoundError(
                f"{err}. Pretrain one (`drifting fit --config configs/mae/<data>.yaml` writes "
                "runs/mae/<data>/checkpoints/last.ckpt), convert the authors' (`drifting import-official`), or set "
                "checkpoint: null for random weights"
            ) from None
        self.arch = ResNetConfig.of(arch if arch is not None else stored or ResNetConfig())
        self.families, self.every_k_block = tuple(families), every_k_block
        self.include_input_stats, self.include_raw = include_input_stats, include_raw
        self.encoder = ResNetEncoder(self.arch)
        if checkpoint is not None:
            hint = ""
            if stored is not None and ResNetConfig.of(stored) != self.arch:
                hint = f"the file holds an encoder with arch {stored}; this one has {self.arch.as_dict()}"
            load_weights(self.encoder, state, str(checkpoint), hint)
            if hint:
                warnings.warn(f"{checkpoint!r}: {hint}", stacklevel=2)
        self.freeze()

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        z = patchify(x, self.arch.patchify)
        feats: dict[str, Tensor] = {}
        if self.include_raw:
            feats["global"] = flat_channels_last(x)
        if self.include_input_stats:
            feats["norm_x"] = input_statistic(z)
        maps, blocks = self.encoder(z, blocks=True)
        for name, fmap in maps.items():
            feats.update(multiscale_features(fmap, name, self.families))
        for name, outs in blocks.items():
            for k, fmap in enumerate(outs, start=1):
                if k % self.every_k_block == 0:
                    feats.update(multiscale_features(fmap, f"{name}_blk{k}", self.families))
        return feats
