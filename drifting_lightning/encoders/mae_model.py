"""The authors' MAE as a network: encoder, U-Net decoder (with its ``bridge``), classifier head, and the loss of
their ``MAEResNetJAX.__call__`` on a masked input (PAPER.md section 4, paper A.3).

``mae.py`` trains it; ``official/encoder.py`` loads their released weights into it. Names mirror their parameter tree.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from drifting_lightning.encoders.resnet_mae import ResNetConfig, ResNetEncoder, conv3x3, group_norm, patchify


class ConvGNReLU(nn.Module):
    """conv3x3 (no bias) - GroupNorm - ReLU (their ``_ConvGNReLU``)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv, self.gn = conv3x3(cin, cout), group_norm(cout)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.gn(self.conv(x)))


class UpBlock(nn.Module):
    """Bilinear resize to the skip's size, concat the skip, GroupNorm, ``proj`` and ``refine`` (their ``_UpBlock``;
    their concat norm has 32 groups, which ``group_norm`` gives whenever 32 divides the width)."""

    def __init__(self, cin: int, cskip: int, cout: int) -> None:
        super().__init__()
        self.concat_norm_fn = group_norm(cin + cskip)
        self.proj, self.refine = ConvGNReLU(cin + cskip, cout), ConvGNReLU(cout, cout)

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        return self.refine(self.proj(self.concat_norm_fn(torch.cat([x, skip], 1))))


class UNetDecoder(nn.Module):
    """``bridge`` on layer4, then up through layer3, layer2, layer1 and conv1 to a 1x1 ``head`` (their
    ``_UNetDecoder``: widths 8C, 4C, 2C, C, C)."""

    def __init__(self, width: int, out_channels: int) -> None:
        super().__init__()
        c = width
        self.bridge = ConvGNReLU(8 * c, 8 * c)
        self.up43 = UpBlock(8 * c, 4 * c, 4 * c)
        self.up32 = UpBlock(4 * c, 2 * c, 2 * c)
        self.up21 = UpBlock(2 * c, c, c)
        self.up10 = UpBlock(c, c, c)
        self.head = nn.Conv2d(c, out_channels, 1)

    def forward(self, feats: dict[str, Tensor]) -> Tensor:
        x = self.bridge(feats["layer4"])
        x = self.up43(x, feats["layer3"])
        x = self.up32(x, feats["layer2"])
        x = self.up21(x, feats["layer1"])
        return self.head(self.up10(x, feats["conv1"]))


def patch_mask(
    shape: tuple[int, int, int],
    patch: int,
    ratio: float,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Mask [B, 1, H, W] on the encoder's grid (1 = masked, their convention): each ``patch`` x ``patch`` patch is
    masked with probability ``ratio`` (their ``make_patch_mask``). shape: (B, H, W); H, W multiples of ``patch``."""
    b, h, w = shape
    if h % patch or w % patch:
        raise ValueError(f"a {h}x{w} encoder input is not tiled by {patch}x{patch} mask patches")
    noise = torch.rand(b, 1, h // patch, w // patch, generator=generator, device=device)
    return (noise < ratio).float().repeat_interleave(patch, 2).repeat_interleave(patch, 3)


class MAEModel(nn.Module):
    """The authors' ``MAEResNetJAX``: ``encoder`` (``ResNetEncoder``), ``decoder`` (``UNetDecoder``) and ``fc``.

    ``forward(x, labels, mask, lambda_cls)``: x [B, in_channels, H, W] (pixels or latents), mask [B, 1, H/p, W/p]
    (1 = masked, on the patchified grid), labels [B] or None. Returns per-sample tensors ``{"loss", "recon_loss",
    "cls_loss", "accuracy"}``: recon_loss is the squared error summed over channels, averaged over the masked
    positions; the classifier reads the mean of the masked input's layer4; loss = lam * cls + (1 - lam) * recon.
    """

    def __init__(self, arch: ResNetConfig, num_classes: int = 1000) -> None:
        super().__init__()
        self.arch = arch
        self.encoder = ResNetEncoder(arch)
        self.decoder = UNetDecoder(arch.width, arch.encoder_in)
        self.fc = nn.Linear(arch.widths[-1], num_classes)

    def forward(self, x: Tensor, labels: Tensor | None, mask: Tensor, lambda_cls: float = 0.0) -> dict[str, Tensor]:
        target = patchify(x, self.arch.patchify)
        feats = self.encoder(target * (1.0 - mask))
        recon = self.decoder(feats)
        err = ((recon.float() - target.float()).square() * mask).sum((1, 2, 3))
        out = {"recon_loss": err / (mask.sum((1, 2, 3)) + 1e-8), "recon": recon}
        out["loss"] = out["recon_loss"]
        if labels is not None:
            logits = self.fc(feats["layer4"].mean((2, 3))).float()
            out["cls_loss"] = F.cross_entropy(logits, labels, reduction="none")
            out["accuracy"] = (logits.argmax(1) == labels).float()
            out["loss"] = lambda_cls * out["cls_loss"] + (1.0 - lambda_cls) * out["recon_loss"]
        return out
