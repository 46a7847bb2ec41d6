"""MAE pretraining of the ResNet feature encoder, as its own LightningModule (PAPER.md section 4, paper A.3).

Zero 2x2 patches of the input with p = 0.5, encode with the GroupNorm ResNet, reconstruct with a U-Net decoder
(bilinear up, skip concat, GN, two conv-GN-ReLU), L2 on the masked region. AdamW, EMA of the encoder, random
resized crop. Optional classifier fine-tune: lam * CE + (1 - lam) * recon, lam ramping 0 -> classifier_weight.
The saved checkpoint loads into ``ResNetMAE(checkpoint=...)`` (its EMA encoder).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn

from drifting_lightning.encoders.resnet_mae import ResNetBackbone, conv3x3, group_norm, patchify, unpatchify


def random_resized_crop(
    x: Tensor,
    scale: tuple[float, float] = (0.6, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    generator: torch.Generator | None = None,
) -> Tensor:
    """Per-sample random resized crop of a batch, resized back to its size (bilinear), on any device.

    x: [B, C, H, W]. Area fraction ~ U(scale), aspect ratio log-uniform in ``ratio`` and clamped so the crop fits
    inside the image (torchvision resamples instead), position uniform. scale = (1, 1) returns x unchanged.
    """
    if tuple(scale) == (1.0, 1.0):
        return x
    b = x.shape[0]
    u = torch.rand(b, 4, generator=generator, device=x.device)
    area = scale[0] + (scale[1] - scale[0]) * u[:, 0]
    log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[:, 1]
    log_r = torch.minimum(torch.maximum(log_r, area.log()), -area.log())  # keep width, height <= 1
    w, h = (area * log_r.exp()).sqrt(), (area / log_r.exp()).sqrt()  # fractions of the side
    cx, cy = (1 - w) * (2 * u[:, 2] - 1), (1 - h) * (2 * u[:, 3] - 1)  # centre in [-1, 1] coordinates
    zero = torch.zeros_like(w)
    theta = torch.stack([torch.stack([w, zero, cx], 1), torch.stack([zero, h, cy], 1)], 1).to(x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def random_patch_mask(
    shape: Sequence[int],
    patch: int = 2,
    ratio: float = 0.5,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Keep-mask [B, 1, H, W] (1 = visible, 0 = masked): each ``patch`` x ``patch`` patch is masked with prob. ratio.

    shape: (B, C, H, W) of the input; patches at the border are cut when H or W is not a multiple of ``patch``.
    """
    b, _, h, w = shape
    gh, gw = -(-h // patch), -(-w // patch)
    keep = (torch.rand(b, 1, gh, gw, generator=generator, device=device) >= ratio).float()
    return keep.repeat_interleave(patch, 2).repeat_interleave(patch, 3)[:, :, :h, :w]


def reconstruction_loss(pred: Tensor, target: Tensor, keep: Tensor) -> Tensor:
    """Mean squared error over the masked elements only (keep == 0). pred, target: [B, C, H, W]; keep: [B, 1, H, W]."""
    masked = (1 - keep).expand_as(target)
    return ((pred.float() - target.float()).square() * masked).sum() / masked.sum().clamp(min=1)


class UpBlock(nn.Module):
    """Bilinear up to the skip's size, concat the skip, GN, then two conv3x3-GN-ReLU."""

    def __init__(self, cin: int, cskip: int, cout: int) -> None:
        super().__init__()
        self.norm = group_norm(cin + cskip)
        self.convs = nn.Sequential(
            conv3x3(cin + cskip, cout), group_norm(cout), nn.ReLU(), conv3x3(cout, cout), group_norm(cout), nn.ReLU()
        )

    def forward(self, y: Tensor, skip: Tensor) -> Tensor:
        if y.shape[-2:] != skip.shape[-2:]:
            y = F.interpolate(y, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        return self.convs(self.norm(torch.cat([y, skip], 1)))


class UNetDecoder(nn.Module):
    """From the deepest map up through the skips (stage outputs, then the stem) to ``out_channels`` (1x1 conv)."""

    def __init__(self, skip_channels: Sequence[int], out_channels: int) -> None:
        super().__init__()
        cin, ups = skip_channels[-1], []
        for c in reversed(skip_channels[:-1]):
            ups.append(UpBlock(cin, c, c))
            cin = c
        self.ups = nn.ModuleList(ups)
        self.head = nn.Conv2d(cin, out_channels, 1)

    def forward(self, skips: Sequence[Tensor]) -> Tensor:
        y = skips[-1]
        for up, skip in zip(self.ups, reversed(skips[:-1])):
            y = up(y, skip)
        return self.head(y)


class MAEPretraining(pl.LightningModule):
    """Masked-autoencoder pretraining of ``ResNetBackbone`` (the encoder of ``ResNetMAE``).

    Batches: the training batch dict of the drifting data modules (``"positives"`` [Nc, Npos, C, H, W] and
    ``"labels"`` [Nc], flattened to Nc*Npos images with labels repeated per group), or ``(images, labels)``.
    Masking works on the backbone input (after ``patchify``). The classifier (when classifier_weight > 0) reads
    the global average of the last stage on the unmasked image. lam = classifier_weight * min(1, step / ramp).
    Logs ``mae/loss``, ``mae/recon`` (+ ``mae/ce``, ``mae/acc``, ``mae/lambda``), and every
    ``log_images_every_n_steps`` a grid (rows: masked input, reconstruction, original; first 3 channels) to
    TensorBoard and as a PNG under ``{trainer.log_dir}/mae_images``. The checkpoint also holds
    ``encoder_config`` so that ``ResNetMAE(checkpoint=...)`` can say which arguments to match.
    """

    def __init__(
        self,
        in_channels: int = 4,
        width: int = 256,
        stages: Sequence[int] = (3, 4, 6, 3),
        input_size: int = 32,
        patchify: int = 1,
        min_map: int = 4,
        lr: float = 4e-3,
        weight_decay: float = 0.05,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 0,
        ema_decay: float = 0.9995,
        mask_ratio: float = 0.5,
        mask_patch: int = 2,
        classifier_weight: float = 0.0,
        classifier_ramp_steps: int = 0,
        num_classes: int = 0,
        crop_scale: tuple[float, float] = (0.6, 1.0),
        crop_ratio: tuple[float, float] = (3 / 4, 4 / 3),
        log_images_every_n_steps: int = 200,
    ) -> None:
        super().__init__()
        if classifier_weight > 0 and num_classes < 2:
            raise ValueError(f"classifier_weight={classifier_weight} needs num_classes >= 2, got {num_classes}")
        if mask_patch < 1:
            raise ValueError(f"mask_patch must be >= 1, got {mask_patch}")
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must lie in [0, 1), got {mask_ratio}")
        if not 0.0 < crop_scale[0] <= crop_scale[1] <= 1.0:
            raise ValueError(f"crop_scale must satisfy 0 < min <= max <= 1, got {crop_scale}")
        if input_size % patchify:
            raise ValueError(f"input_size={input_size} must be a multiple of patchify={patchify}")
        self.save_hyperparameters()
        self.encoder_config = {
            "in_channels": in_channels,
            "width": width,
            "stages": list(stages),
            "input_size": input_size,
            "patchify": patchify,
            "min_map": min_map,
        }
        self.encoder = ResNetBackbone(in_channels * patchify**2, width, stages, input_size // patchify, min_map)
        self.ema_encoder = copy.deepcopy(self.encoder).requires_grad_(False)
        self.decoder = UNetDecoder(self.encoder.skip_channels, in_channels * patchify**2)
        self.classifier = nn.Linear(self.encoder.out_channels, num_classes) if classifier_weight > 0 else None

    @staticmethod
    def images_and_labels(batch: Any) -> tuple[Tensor, Tensor | None]:
        """images [B, C, H, W] and labels [B] (or None) from a drifting batch dict or an (images, labels) pair."""
        if isinstance(batch, dict):
            pos, labels = batch["positives"], batch.get("labels")
            if labels is not None:
                labels = labels.repeat_interleave(pos.shape[1])
            return pos.flatten(0, 1), labels
        if isinstance(batch, (list, tuple)):
            return batch[0], batch[1] if len(batch) > 1 else None
        return batch, None

    def classifier_lambda(self, step: int) -> float:
        """lam ramps linearly from 0 to classifier_weight over classifier_ramp_steps (constant when 0)."""
        hp = self.hparams
        if self.classifier is None:
            return 0.0
        ramp = hp.classifier_ramp_steps
        return hp.classifier_weight * (1.0 if ramp <= 0 else min(1.0, step / ramp))

    def mae_step(
        self,
        images: Tensor,
        labels: Tensor | None = None,
        augment: bool = True,
        generator: torch.Generator | None = None,
    ) -> dict[str, Tensor]:
        """The loss and its parts for a batch of images [B, C, H, W]; also the tensors for the image grid."""
        hp = self.hparams
        if augment:
            with torch.no_grad():
                images = random_resized_crop(images, hp.crop_scale, hp.crop_ratio, generator=generator)
        target = patchify(images, hp.patchify)
        keep = random_patch_mask(target.shape, hp.mask_patch, hp.mask_ratio, target.device, generator)
        masked = target * keep
        taps = self.encoder(masked)
        pred = self.decoder([taps[n] for n in self.encoder.skip_names])
        out = {
            "recon": reconstruction_loss(pred, target, keep),
            "masked": masked,
            "pred": pred,
            "target": target,
            "keep": keep,
        }
        out["loss"] = out["recon"]
        if self.classifier is not None:
            if labels is None:
                raise ValueError("classifier_weight > 0 needs labels in the batch; this batch has none")
            lam = self.classifier_lambda(self.global_step)
            deepest = self.encoder(target)[self.encoder.skip_names[-1]]
            logits = self.classifier(deepest.mean((2, 3)))
            out["ce"] = F.cross_entropy(logits.float(), labels)
            out["acc"] = (logits.argmax(1) == labels).float().mean()
            out["lambda"] = torch.tensor(lam)
            out["loss"] = lam * out["ce"] + (1 - lam) * out["recon"]
        return out

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        images, labels = self.images_and_labels(batch)
        out = self.mae_step(images, labels)
        for k in ("loss", "recon", "ce", "acc", "lambda"):
            if k in out:
                self.log(f"mae/{k}", out[k].detach(), prog_bar=k == "loss", batch_size=images.shape[0])
        every = self.hparams.log_images_every_n_steps
        if every > 0 and self.global_step % every == 0 and self.trainer.is_global_zero:
            self.log_images(out["masked"], out["pred"], out["target"], out["keep"])
        return out["loss"]

    @torch.no_grad()
    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.update_ema()

    @torch.no_grad()
    def update_ema(self) -> None:
        """ema <- decay * ema + (1 - decay) * online, for every parameter and buffer of the encoder."""
        decay = self.hparams.ema_decay
        ema, online = list(self.ema_encoder.parameters()), [p.detach() for p in self.encoder.parameters()]
        torch._foreach_lerp_(ema, online, 1 - decay)
        for e, b in zip(self.ema_encoder.buffers(), self.encoder.buffers()):
            e.copy_(b)

    @torch.no_grad()
    def log_images(self, masked: Tensor, pred: Tensor, target: Tensor, keep: Tensor, n: int = 8) -> None:
        """Rows masked input / reconstruction pasted into the masked patches / raw reconstruction / original, first
        3 channels, scaled by the originals' range. The loss sees only masked patches, so the raw reconstruction
        of visible patches is untrained and noisy; the pasted row is the one to judge."""
        import torchvision

        p = self.hparams.patchify
        pasted = torch.where(keep.bool(), target, pred)
        rows = [unpatchify(t[:n].detach().float(), p)[:, :3] for t in (masked, pasted, pred, target)]
        lo, hi = rows[-1].amin(), rows[-1].amax()
        grid = torchvision.utils.make_grid(
            ((torch.cat(rows) - lo) / (hi - lo).clamp(min=1e-8)).clamp(0, 1), nrow=rows[0].shape[0], padding=1
        )
        for logger in self.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image("mae/reconstruction", grid, self.global_step)
        if self.trainer.log_dir is not None:
            out = Path(self.trainer.log_dir) / "mae_images"
            out.mkdir(parents=True, exist_ok=True)
            torchvision.utils.save_image(grid, out / f"step_{self.global_step:07d}.png")

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": hp.weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        ]  # no decay on norms, biases
        opt = torch.optim.AdamW(groups, lr=hp.lr, betas=tuple(hp.betas))
        if hp.warmup_steps <= 0:
            return opt
        warm = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / hp.warmup_steps))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": warm, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["encoder_config"] = dict(self.encoder_config)

    def export_encoder(self, path: str | Path) -> None:
        """Write the EMA encoder weights as a plain state_dict (.safetensors, else torch.save) for ResNetMAE."""
        state = {k: v.detach().cpu().contiguous() for k, v in self.ema_encoder.state_dict().items()}
        if str(path).endswith(".safetensors"):
            from safetensors.torch import save_file

            save_file(state, str(path), metadata={k: str(v) for k, v in self.encoder_config.items()})
        else:
            torch.save(state, str(path))
