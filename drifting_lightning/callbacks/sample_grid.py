"""Class x sample image grids from the EMA generator at fixed noise, one per guidance scale, to TensorBoard and PNG."""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torchvision.utils import make_grid, save_image


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


def decode(pl_module: L.LightningModule, x: Tensor) -> Tensor:
    """Samples in the generator's space -> images: ``pl_module.decode_samples(x)`` when the module has it (latent
    runs decode VAE latents to pixels), else x unchanged."""
    fn = getattr(pl_module, "decode_samples", None)
    return fn(x) if callable(fn) else x


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
    if num_classes <= 0:
        return None
    return torch.arange(min(num_classes, max_classes), device=device).repeat_interleave(per_class)


class SampleGridCallback(L.Callback):
    """Every ``every_n_steps`` optimiser steps and at the end of training: a grid with one row per class (at most
    ``max_classes`` rows; an unconditional generator gets ``max_classes`` rows of unconditional samples) and
    ``samples_per_class`` columns, drawn by ``pl_module.sample(..., use_ema=True)`` from the same seeded noise every
    time, so successive grids differ only by the weights.

    ``alpha`` is one guidance scale or a list (e.g. ``[1.0, 2.0]``): one grid per scale, all from the same noise,
    so the grids compare guidance side by side. Samples pass through ``pl_module.decode_samples`` when the module
    has it. Each grid goes to every TensorBoard logger (tag ``samples/grid_alpha<a>``) and to
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
        if every_n_steps < 1 or samples_per_class < 1 or max_classes < 1 or padding < 0:
            raise ValueError(
                "need every_n_steps, samples_per_class, max_classes >= 1 and padding >= 0, got "
                f"{every_n_steps}, {samples_per_class}, {max_classes}, {padding}"
            )
        self.every_n_steps = every_n_steps
        self.samples_per_class = samples_per_class
        self.max_classes = max_classes
        self.alphas = as_alpha_list(alpha)
        self.seed = seed
        self.padding = padding
        self.last_paths: dict[float, str] = {}
        self._last_step = -1
        self._log_dir = ""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._log_dir = trainer.log_dir or trainer.default_root_dir  # a collective call: every rank must ask

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if trainer.is_global_zero and step > 0 and step % self.every_n_steps == 0 and step != self._last_step:
            self._draw(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        if trainer.global_step != self._last_step:
            self._draw(trainer, pl_module)
        for a, path in self.last_paths.items():
            shutil.copyfile(path, os.path.join(self._log_dir, f"grid_final_alpha{alpha_tag(a)}.png"))

    @torch.no_grad()
    def grids(self, pl_module: L.LightningModule) -> dict[float, Tensor]:
        """{alpha: grid image [3, H', W'] float in [0, 1]} for the module's current EMA weights."""
        num_classes = generator_classes(pl_module)
        labels = grid_labels(num_classes, self.max_classes, self.samples_per_class, pl_module.device)
        n = len(labels) if labels is not None else self.max_classes * self.samples_per_class
        out = {}
        for a in self.alphas:
            noise = torch.Generator(device=pl_module.device).manual_seed(self.seed)  # same noise for every alpha
            x = pl_module.sample(n, labels=labels, alpha=a, use_ema=True, generator=noise)
            images = displayable(decode(pl_module, x)).float().cpu()
            out[a] = make_grid(
                images, nrow=self.samples_per_class, padding=self.padding, normalize=True, value_range=(-1, 1)
            )
        return out

    def _draw(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        step = trainer.global_step
        try:
            grids = self.grids(pl_module)
        except ValueError as err:  # e.g. vector samples: say so, but never stop training for a picture
            rank_zero_warn(f"SampleGridCallback: no grid at step {step}: {err}")
            self._last_step = step
            return
        os.makedirs(self._log_dir, exist_ok=True)
        for a, grid in grids.items():
            path = os.path.join(self._log_dir, f"grid_step{step:06d}_alpha{alpha_tag(a)}.png")
            save_image(grid, path)
            self.last_paths[a] = path
            for logger in trainer.loggers:
                if isinstance(logger, TensorBoardLogger):
                    logger.experiment.add_image(f"samples/grid_alpha{alpha_tag(a)}", grid, global_step=step)
        self._last_step = step
