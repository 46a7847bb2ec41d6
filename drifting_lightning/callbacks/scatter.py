"""2-D scatter plots of generated samples over the target (paper Fig. 3, 4), to TensorBoard and PNG."""

from __future__ import annotations

import os
import shutil
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor


def first_two_coords(x: Tensor) -> Tensor:
    """Samples [n, ...] -> [n, 2] float CPU: the first two coordinates (a zero second one for 1-D data)."""
    x = x.detach().flatten(1).float().cpu()
    if x.shape[1] == 1:
        x = torch.cat([x, torch.zeros_like(x)], dim=1)
    return x[:, :2]


def scatter_figure(generated: Tensor, target: Tensor, title: str = "") -> Figure:
    """Generated points (orange) over target points (blue), both [n, 2]; the axes fit the target only,
    so the frame stays the same from plot to plot. Drawn on the Agg canvas: no display is needed."""
    lo, hi = target.min(0).values, target.max(0).values
    pad = 0.1 * (hi - lo).clamp_min(1e-3)
    fig = Figure(figsize=(5, 5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.scatter(target[:, 0], target[:, 1], s=3, alpha=0.5, c="tab:blue", label="target", linewidths=0)
    ax.scatter(generated[:, 0], generated[:, 1], s=3, alpha=0.5, c="tab:orange", label="generated", linewidths=0)
    ax.set_xlim(float(lo[0] - pad[0]), float(hi[0] + pad[0]))
    ax.set_ylim(float(lo[1] - pad[1]), float(hi[1] + pad[1]))
    ax.set_aspect("equal", adjustable="box")
    ax.legend(loc="upper right", markerscale=4)
    ax.set_title(title)
    fig.tight_layout()
    return fig


def fixed_noise(pl_module: L.LightningModule, seed: int) -> torch.Generator:
    """A generator on the module's device, reseeded at every evaluation: the same noise each time, so
    successive plots and metric values differ only by the weights."""
    return torch.Generator(device=pl_module.device).manual_seed(seed)


def datamodule_of(trainer: L.Trainer) -> Any:
    """The trainer's DataModule; the toy callbacks need its ``real_samples``."""
    dm = trainer.datamodule
    if dm is None or not hasattr(dm, "real_samples"):
        raise RuntimeError(
            "this callback needs a DataModule with real_samples(n, split, seed), e.g. ToyDataModule or "
            "VectorDataModule; pass it as trainer.fit(model, datamodule=...)"
        )
    return dm


class ScatterPlotCallback(L.Callback):
    """Every ``every_n_steps`` optimiser steps and at the end of training: ``pl_module.sample(num_samples,
    use_ema=use_ema, generator=g)`` (g: the same seeded noise each time) drawn over ``num_samples`` target
    points (the first two coordinates for D > 2).

    The figure goes to every TensorBoard logger (tag ``samples/scatter``) and to ``trainer.log_dir/filename``;
    the last one is also copied to ``samples_final.png``. Runs on global rank 0 only.
    """

    def __init__(
        self,
        every_n_steps: int = 200,
        num_samples: int = 2000,
        filename: str = "samples_step{step:06d}.png",
        use_ema: bool = True,
    ) -> None:
        if every_n_steps < 1 or num_samples < 1:
            raise ValueError(f"every_n_steps and num_samples must be >= 1, got {every_n_steps}, {num_samples}")
        self.every_n_steps = every_n_steps
        self.num_samples = num_samples
        self.filename = filename
        self.use_ema = use_ema
        self.last_path: str | None = None
        self._last_step = -1
        self._target: Tensor | None = None
        self._log_dir = ""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._log_dir = trainer.log_dir  # a collective call: every rank must ask

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if trainer.is_global_zero and step > 0 and step % self.every_n_steps == 0 and step != self._last_step:
            self._plot(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        if trainer.global_step != self._last_step:
            self._plot(trainer, pl_module)
        shutil.copyfile(self.last_path, os.path.join(self._log_dir, "samples_final.png"))

    def _plot(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        step = trainer.global_step
        if self._target is None:
            self._target = first_two_coords(datamodule_of(trainer).real_samples(self.num_samples)[0])
        with torch.no_grad():
            noise = fixed_noise(pl_module, seed=0)
            generated = first_two_coords(pl_module.sample(self.num_samples, use_ema=self.use_ema, generator=noise))
        fig = scatter_figure(generated, self._target, title=f"step {step}")
        self.last_path = os.path.join(self._log_dir, self.filename.format(step=step))
        os.makedirs(os.path.dirname(self.last_path), exist_ok=True)
        fig.savefig(self.last_path)
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_figure("samples/scatter", fig, global_step=step, close=False)
        self._last_step = step
