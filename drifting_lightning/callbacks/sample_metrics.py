"""A sample-based metric (energy distance or Gaussian MMD^2) against a fixed target sample during training."""

from __future__ import annotations

import difflib
import json
import os
from typing import Any

import lightning as L
import torch
from torch import Tensor

from drifting_lightning.callbacks.scatter import datamodule_of, fixed_noise
from drifting_lightning.metrics.energy import energy_distance, gaussian_mmd2, median_bandwidth

METRICS = ("energy_distance", "mmd")


class SampleMetricCallback(L.Callback):
    """Every ``every_n_steps`` optimiser steps and at the end of training: the metric between
    ``pl_module.sample(num_samples, use_ema=use_ema, generator=g)`` and ONE target sample
    ``real_samples(num_samples, seed=seed)`` drawn at the first evaluation; g is seeded with ``seed`` each
    time, so values at different steps differ only by the weights.

    Rank 0 computes the value and broadcasts it, so every rank logs the same number. It is written to the
    loggers at the exact step as ``metrics/<metric>`` and, during training, also ``pl_module.log``-ged
    (without logger) so that it is in ``trainer.callback_metrics`` and can be monitored by ModelCheckpoint.
    ``last_value`` holds the latest value, ``metrics.json`` in ``trainer.log_dir`` the whole history (kept
    across a resume through the callback's state in the checkpoint).

    ``energy_distance`` is the V-statistic, whose floor for two independent samples of one distribution is
    E|X - X'| (1/n + 1/m) (about 0.0007 between two 5k checkerboard samples); ``mmd`` is the Gaussian-kernel
    MMD^2 with ``bandwidth`` (default: the median pairwise distance of the target sample).
    """

    def __init__(
        self,
        metric: str = "energy_distance",
        every_n_steps: int = 200,
        num_samples: int = 5000,
        seed: int = 1234,
        use_ema: bool = True,
        bandwidth: float | None = None,
    ) -> None:
        if metric not in METRICS:
            close = difflib.get_close_matches(metric, METRICS, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"unknown metric {metric!r}; valid: {', '.join(METRICS)}.{hint}")
        if every_n_steps < 1 or num_samples < 2:
            raise ValueError(f"need every_n_steps >= 1 and num_samples >= 2, got {every_n_steps}, {num_samples}")
        self.metric = metric
        self.every_n_steps = every_n_steps
        self.num_samples = num_samples
        self.seed = seed
        self.use_ema = use_ema
        self.bandwidth = bandwidth
        self.last_value: float | None = None
        self.history: list[tuple[int, float]] = []
        self._target: Tensor | None = None
        self._log_dir = ""

    @property
    def name(self) -> str:
        return f"metrics/{self.metric}"

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._log_dir = trainer.log_dir  # a collective call: every rank must ask

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if step > 0 and step % self.every_n_steps == 0 and (not self.history or self.history[-1][0] != step):
            value = self._evaluate(trainer, pl_module)
            # logger=False: the loggers already have it at this exact step (self.log would wait for
            # log_every_n_steps); this puts it in trainer.callback_metrics and the progress bar.
            pl_module.log(self.name, value, logger=False, prog_bar=True, on_step=True, on_epoch=False)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.history or self.history[-1][0] != trainer.global_step:
            self._evaluate(trainer, pl_module)  # pl_module.log is not allowed in on_train_end
        if trainer.is_global_zero:
            os.makedirs(self._log_dir, exist_ok=True)
            step, value = self.history[-1]
            record = {
                "metric": self.metric,
                "value": value,
                "step": step,
                "num_samples": self.num_samples,
                "bandwidth": self.bandwidth,
                "history": self.history,
            }
            with open(os.path.join(self._log_dir, "metrics.json"), "w") as f:
                json.dump(record, f, indent=2)

    @property
    def state_key(self) -> str:
        return self._generate_state_key(metric=self.metric)  # an energy and an MMD callback can sit side by side

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [(int(step), float(value)) for step, value in state_dict.get("history", [])]
        self.last_value = self.history[-1][1] if self.history else None

    def compute(self, trainer: L.Trainer, pl_module: L.LightningModule) -> float:
        """The metric now (on this rank, no logging)."""
        if self._target is None:
            self._target = datamodule_of(trainer).real_samples(self.num_samples, seed=self.seed)[0].flatten(1)
            if self.metric == "mmd" and self.bandwidth is None:
                self.bandwidth = median_bandwidth(self._target)
        with torch.no_grad():
            noise = fixed_noise(pl_module, self.seed)
            generated = pl_module.sample(self.num_samples, use_ema=self.use_ema, generator=noise).flatten(1)
        if self.metric == "mmd":
            return gaussian_mmd2(generated, self._target, self.bandwidth)
        return energy_distance(generated, self._target)

    def _evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> float:
        """Compute on rank 0, share with every rank, record and write to the loggers."""
        step = trainer.global_step
        value = self.compute(trainer, pl_module) if trainer.is_global_zero else 0.0
        value = float(trainer.strategy.broadcast(value, src=0))
        self.last_value = value
        self.history.append((step, value))
        for logger in trainer.loggers:
            logger.log_metrics({self.name: value}, step=step)
        return value
