"""2-D scatter plots of generated samples over the target (paper Fig. 3, 4), to TensorBoard and PNG."""

from __future__ import annotations

import os
import shutil

import lightning as L
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor

from drifting_lightning.callbacks.periodic import PeriodicCallback, datamodule_of, fixed_noise, tensorboards


def first_two_coords(x: Tensor) -> Tensor:
    """Samples [n, ...] -> [n, 2] float CPU: the first two coordinates (a zero second one for 1-D data)."""
    x = x.detach().flatten(1).float().cpu()
    if x.shape[1] == 1:
        x = torch.cat([x, torch.zeros_like(x)], dim=1)
    return x[:, :2]


def scatter_figure(generated: Tensor, target: Tensor | None, title: str = "") -> Figure:
    """Generated points (orange) over target points (blue), both [n, 2]; the axes fit the target only, so the
    frame stays the same from plot to plot (the generated points without a target). Drawn on the Agg canvas: no
    display is needed."""
    frame = generated if target is None else target
    lo, hi = frame.min(0).values, frame.max(0).values
    pad = 0.1 * (hi - lo).clamp_min(1e-3)
    fig = Figure(figsize=(5, 5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if target is not None:
        ax.scatter(target[:, 0], target[:, 1], s=3, alpha=0.5, c="tab:blue", label="target", linewidths=0)
    ax.scatter(generated[:, 0], generated[:, 1], s=3, alpha=0.5, c="tab:orange", label="generated", linewidths=0)
    ax.set_xlim(float(lo[0] - pad[0]), float(hi[0] + pad[0]))
    ax.set_ylim(float(lo[1] - pad[1]), float(hi[1] + pad[1]))
    ax.set_aspect("equal", adjustable="box")
    ax.legend(loc="upper right", markerscale=4)
    ax.set_title(title)
    fig.tight_layout()
    return fig


class ScatterPlotCallback(PeriodicCallback):
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
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        super().__init__(every_n_steps)
        self.num_samples = num_samples
        self.filename = filename
        self.use_ema = use_ema
        self.last_path: str | None = None
        self._target: Tensor | None = None

    def finish(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        shutil.copyfile(self.last_path, os.path.join(self.log_dir, "samples_final.png"))

    def run(self, trainer: L.Trainer, pl_module: L.LightningModule, final: bool) -> None:
        step = trainer.global_step
        if self._target is None:
            self._target = first_two_coords(datamodule_of(trainer).real_samples(self.num_samples)[0])
        with torch.no_grad():
            noise = fixed_noise(pl_module, seed=0)
            generated = first_two_coords(pl_module.sample(self.num_samples, use_ema=self.use_ema, generator=noise))
        fig = scatter_figure(generated, self._target, title=f"step {step}")
        self.last_path = os.path.join(self.log_dir, self.filename.format(step=step))
        os.makedirs(os.path.dirname(self.last_path), exist_ok=True)
        fig.savefig(self.last_path)
        for board in tensorboards(trainer):
            board.add_figure("samples/scatter", fig, global_step=step, close=False)
