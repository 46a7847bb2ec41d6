"""Class x sample image grids from the EMA generator at fixed noise, one per guidance scale, to TensorBoard and PNG."""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torchvision.utils import make_grid, save_image

from drifting_lightning.callbacks.periodic import PeriodicCallback, fixed_noise, tensorboards
from drifting_lightning.sampling.labels import balanced_labels


def alpha_tag(alpha: float) -> str:
    """How a guidance scale appears in file names and metric keys: ``str(float(alpha))``, e.g. "1.0", "1.25"."""
    return str(float(alpha))


def as_alpha_list(alpha: float | Sequence[float]) -> list[float]:
    """A float or a sequence of floats -> a non-empty list of floats >= 1 (alpha = 1 means no guidance)."""
    alphas = [float(alpha)] if isinstance(alpha, (int, float)) else [float(a) for a in alpha]
    if not alphas:
        raise ValueError("give at least one guidance scale alpha")
    if min(alphas) < 1.0:
        raise ValueError(f"guidance scales must be >= 1 (1 = no guidance), got {alphas}")
    return alphas


def displayable(x: Tensor) -> Tensor:
    """Images [B, C, H, W] -> [B, 1 or 3, H, W] for display: C = 1 or 3 as is, other C (undecoded latents) keep
    their first three channels (or the first one when C = 2), which is enough to watch the structure emerge."""
    if x.dim() != 4:
        raise ValueError(f"a sample grid needs images [B, C, H, W], got samples of shape {list(x.shape)}")
    if x.shape[1] in (1, 3):
        return x
    return x[:, :3] if x.shape[1] > 3 else x[:, :1]


def generator_classes(pl_module: L.LightningModule) -> int:
    """Number of classes of the module's (EMA) generator; 0 when unconditional or unknown."""
    net = getattr(pl_module, "ema_generator", None)
    net = getattr(pl_module, "generator", None) if net is None else net
    return int(getattr(net, "num_classes", 0))


def grid_labels(num_classes: int, max_classes: int, per_class: int, device: torch.device) -> Tensor | None:
    """Labels [rows * per_class] in row-major grid order (row r is class r); None for an unconditional generator."""
    rows = balanced_labels(min(num_classes, max_classes), num_classes, device)
    return None if rows is None else rows.repeat_interleave(per_class)


class SampleGridCallback(PeriodicCallback):
    """Every ``every_n_steps`` optimiser steps and at the end of training: a grid with one row per class (at most
    ``max_classes`` rows; an unconditional generator gets ``max_classes`` rows of unconditional samples) and
    ``samples_per_class`` columns, drawn by ``pl_module.sample(..., use_ema=True)`` from the same seeded noise every
    time, so successive grids differ only by the weights.

    ``alpha`` is one guidance scale or a list (e.g. ``[1.0, 2.0]``): one grid per scale, all from the same noise,
    so the grids compare guidance side by side. Samples pass through ``pl_module.decode_samples`` (latent runs decode
    to pixels). Each grid goes to every TensorBoard logger (tag ``samples/grid_alpha<a>``) and to
    ``trainer.log_dir/grid_step<step:06d>_alpha<a>.png``; at the end also ``grid_final_alpha<a>.png``. Images are
    mapped from [-1, 1] to [0, 1] (values outside are clipped). Runs on global rank 0 only.
    """

    def __init__(
        self,
        every_n_steps: int = 1000,
        samples_per_class: int = 8,
        max_classes: int = 10,
        alpha: float | list[float] = 1.0,
        seed: int = 0,
        padding: int = 2,
    ) -> None:
        if samples_per_class < 1 or max_classes < 1 or padding < 0:
            raise ValueError(
                "need samples_per_class, max_classes >= 1 and padding >= 0, got "
                f"{samples_per_class}, {max_classes}, {padding}"
            )
        super().__init__(every_n_steps)
        self.samples_per_class = samples_per_class
        self.max_classes = max_classes
        self.alphas = as_alpha_list(alpha)
        self.seed = seed
        self.padding = padding
        self.last_paths: dict[float, str] = {}

    def finish(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for a, path in self.last_paths.items():
            shutil.copyfile(path, os.path.join(self.log_dir, f"grid_final_alpha{alpha_tag(a)}.png"))

    @torch.no_grad()
    def grids(self, pl_module: L.LightningModule) -> dict[float, Tensor]:
        """{alpha: grid image [3, H', W'] float in [0, 1]} for the module's current EMA weights."""
        num_classes = generator_classes(pl_module)
        labels = grid_labels(num_classes, self.max_classes, self.samples_per_class, pl_module.device)
        n = len(labels) if labels is not None else self.max_classes * self.samples_per_class
        out = {}
        for a in self.alphas:
            noise = fixed_noise(pl_module, self.seed)  # the same noise for every alpha
            x = pl_module.sample(n, labels=labels, alpha=a, use_ema=True, generator=noise)
            images = displayable(pl_module.decode_samples(x)).float().cpu()
            out[a] = make_grid(
                images, nrow=self.samples_per_class, padding=self.padding, normalize=True, value_range=(-1, 1)
            )
        return out

    def run(self, trainer: L.Trainer, pl_module: L.LightningModule, final: bool) -> None:
        step = trainer.global_step
        try:
            grids = self.grids(pl_module)
        except ValueError as err:  # e.g. vector samples: say so, but never stop training for a picture
            rank_zero_warn(f"SampleGridCallback: no grid at step {step}: {err}")
            return
        os.makedirs(self.log_dir, exist_ok=True)
        for a, grid in grids.items():
            path = os.path.join(self.log_dir, f"grid_step{step:06d}_alpha{alpha_tag(a)}.png")
            save_image(grid, path)
            self.last_paths[a] = path
            for board in tensorboards(trainer):
                board.add_image(f"samples/grid_alpha{alpha_tag(a)}", grid, global_step=step)
