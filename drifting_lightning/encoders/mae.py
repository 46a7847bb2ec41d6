"""MAE pretraining of the feature encoder with the authors' recipe, as a LightningModule (their ``train_mae.py``,
``configs/mae/*.yaml``; PAPER.md section 4, paper A.3).

Per step: random resized crop + horizontal flip in pixel space, then (latent MAE) the frozen VAE's encoder; mask 2x2
patches of the encoder input with p = 0.5; ``MAEModel`` reconstructs them (squared error over masked positions).
AdamW with weight decay on every parameter, linear warm-up then a constant rate, an EMA of the encoder. In the last
``finetune_last_steps`` the classifier joins: lam * CE + (1 - lam) * recon on the masked input, lam ramping to
``finetune_cls`` over ``finetune_warmup`` steps. Gradient clipping is the trainer's (``gradient_clip_val: 2.0``).
``export_encoder`` writes the EMA encoder as an encoder checkpoint for ``ResNetMAE(checkpoint=...)``.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor

from drifting_lightning.encoders.mae_model import MAEModel, patch_mask
from drifting_lightning.encoders.resnet_mae import ResNetConfig, patchify, save_encoder, unpatchify


def random_resized_crop(
    x: Tensor,
    scale: tuple[float, float] = (0.2, 1.0),
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


def random_flip(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Flip each image of [B, C, H, W] left-right with probability 1/2."""
    flip = torch.rand(x.shape[0], generator=generator, device=x.device) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


class MAEPretraining(pl.LightningModule):
    """Masked-autoencoder pretraining of ``ResNetEncoder`` (the encoder of ``ResNetMAE``) with the authors' recipe.

    Batches: the drifting data modules' dict (``"positives"`` [Nc, Npos, C, H, W], ``"labels"`` [Nc]; flattened, labels
    repeated per group) or ``(images, labels)``. ``vae``: a diffusers AutoencoderKL folder: the (augmented) pixel
    batch is encoded on the fly, a posterior sample times the latent scale, as the authors' latent MAE does;
    ``arch.in_channels`` is then the VAE's latent channels. ``mask_ratio``: the fraction of ``mask_patch`` x
    ``mask_patch`` patches of the encoder input that are masked. Logs ``mae/loss``, ``mae/recon`` (+ ``mae/ce``,
    ``mae/acc``, ``mae/lambda`` during the fine-tune) and every ``log_images_every_n_steps`` an image grid.
    """

    def __init__(
        self,
        arch: ResNetConfig,
        num_classes: int = 1000,
        lr: float = 4e-3,
        weight_decay: float = 0.01,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 4000,
        ema_decay: float = 0.9995,
        mask_ratio: float = 0.5,
        mask_patch: int = 2,
        total_steps: int | None = None,
        finetune_last_steps: int = 0,
        finetune_warmup: int = 1000,
        finetune_cls: float = 0.1,
        crop_scale: tuple[float, float] = (0.2, 1.0),
        crop_ratio: tuple[float, float] = (3 / 4, 4 / 3),
        flip: bool = True,
        vae: str | None = None,
        log_images_every_n_steps: int = 1000,
    ) -> None:
        super().__init__()
        arch = ResNetConfig.of(arch)
        if mask_patch < 1:
            raise ValueError(f"mask_patch must be >= 1, got {mask_patch}")
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must lie in [0, 1), got {mask_ratio}")
        if not 0.0 < crop_scale[0] <= crop_scale[1] <= 1.0:
            raise ValueError(f"crop_scale must satisfy 0 < min <= max <= 1, got {crop_scale}")
        if finetune_last_steps > 0 and num_classes < 2:
            raise ValueError(f"finetune_last_steps={finetune_last_steps} needs num_classes >= 2, got {num_classes}")
        self.save_hyperparameters(ignore=["arch"])
        self.hparams["arch"] = arch.as_dict()  # plain types: checkpoints stay readable with weights_only=True
        self.arch = arch
        self.model = MAEModel(arch, num_classes)
        self.ema_encoder = copy.deepcopy(self.model.encoder).requires_grad_(False)
        self.codec = None
        if vae is not None:
            from drifting_lightning.models.vae import VAECodec  # only the latent MAE needs diffusers

            self.codec = VAECodec(vae)
            if self.codec.latent_channels != arch.in_channels:
                raise ValueError(f"vae {vae!r} has {self.codec.latent_channels} latent channels but arch.in_channels "
                                 f"is {arch.in_channels}; set arch.in_channels to {self.codec.latent_channels}")

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

    def last_step(self) -> int:
        hp = self.hparams
        if hp.total_steps is not None:
            return hp.total_steps
        trainer = self._trainer
        if trainer is None or trainer.max_steps is None or trainer.max_steps < 0:
            raise ValueError("finetune_last_steps > 0 needs total_steps or the trainer's max_steps")
        return trainer.max_steps

    def classifier_lambda(self, step: int) -> float:
        """0 before the last ``finetune_last_steps``; then finetune_cls * min(1, steps since start / warm-up)."""
        hp = self.hparams
        if hp.finetune_last_steps <= 0:
            return 0.0
        start = self.last_step() - hp.finetune_last_steps
        if step < start:
            return 0.0
        return hp.finetune_cls * min(1.0, (step - start) / max(1, hp.finetune_warmup))

    def inputs(self, images: Tensor, augment: bool = True, generator: torch.Generator | None = None) -> Tensor:
        """The MAE's input: augmented pixels, VAE-encoded for a latent MAE."""
        hp = self.hparams
        with torch.no_grad():
            if augment:
                images = random_resized_crop(images, hp.crop_scale, hp.crop_ratio, generator=generator)
                if hp.flip:
                    images = random_flip(images, generator)
            if self.codec is not None:
                images = self.codec.encode(images, generator=generator)
        return images

    def mae_step(self, images: Tensor, labels: Tensor | None, step: int, augment: bool = True,
                 generator: torch.Generator | None = None) -> dict[str, Tensor]:
        hp = self.hparams
        x = self.inputs(images, augment, generator)
        p = self.arch.patchify
        mask = patch_mask((x.shape[0], x.shape[2] // p, x.shape[3] // p), hp.mask_patch, hp.mask_ratio, x.device,
                          generator)
        lam = self.classifier_lambda(step)
        out = self.model(x, labels if lam > 0 else None, mask, lam)
        result = {"loss": out["loss"].mean(), "recon": out["recon_loss"].mean(), "x": x, "mask": mask,
                  "pred": out["recon"]}
        if lam > 0:
            result.update(ce=out["cls_loss"].mean(), acc=out["accuracy"].mean(), **{"lambda": torch.tensor(lam)})
        return result

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        images, labels = self.images_and_labels(batch)
        out = self.mae_step(images, labels, self.global_step)
        for k in ("loss", "recon", "ce", "acc", "lambda"):
            if k in out:
                self.log(f"mae/{k}", out[k].detach(), prog_bar=k == "loss", batch_size=images.shape[0])
        every = self.hparams.log_images_every_n_steps
        if every > 0 and self.global_step % every == 0 and self.trainer.is_global_zero:
            self.log_images(out["x"], out["pred"], out["mask"])
        return out["loss"]

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        # Once per optimiser step, and before any on_train_batch_end: Lightning runs the callbacks' (where
        # ModelCheckpoint(every_n_train_steps) saves) before the module's, and a checkpoint must hold its step's EMA.
        self.update_ema()

    @torch.no_grad()
    def update_ema(self) -> None:
        """ema <- decay * ema + (1 - decay) * online, for every parameter of the encoder."""
        ema = list(self.ema_encoder.parameters())
        online = [p.detach() for p in self.model.encoder.parameters()]
        torch._foreach_lerp_(ema, online, 1 - self.hparams.ema_decay)

    @torch.no_grad()
    def log_images(self, x: Tensor, pred: Tensor, mask: Tensor, n: int = 8) -> None:
        """Rows: masked input / reconstruction pasted into the masked patches / original; first 3 channels, scaled
        by the originals' range (the loss sees only masked patches, so the pasted row is the one to judge)."""
        import torchvision

        p, c = self.arch.patchify, self.arch.in_channels
        target = patchify(x[:n].float(), p)
        m = mask[:n].bool()
        rows = [unpatchify(t, p, c)[:, :3] for t in (target * ~m, torch.where(m, pred[:n].float(), target), target)]
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
        # The authors decay every parameter (optax.adamw without a mask), norms and biases included.
        opt = torch.optim.AdamW(self.model.parameters(), lr=hp.lr, betas=tuple(hp.betas), weight_decay=hp.weight_decay)
        if hp.warmup_steps <= 0:
            return opt
        warm = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / hp.warmup_steps))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": warm, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["encoder_config"] = self.arch.as_dict()

    def export_encoder(self, path: str | Path) -> None:
        """Write the EMA encoder as an encoder checkpoint (``save_encoder``) for ``ResNetMAE(checkpoint=...)``."""
        save_encoder(path, self.ema_encoder.state_dict(), self.arch)
