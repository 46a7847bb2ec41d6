"""A progress bar in optimiser steps: ``step 10/40``, across epochs and resumes.

Lightning's bar counts the batches of the current epoch against ``max_epochs``: a step-limited run reads
``Epoch 0/-2`` and, after a resume, ``10/4``. Drifting runs are limited by ``max_steps``; this bar shows
``global_step / max_steps`` whenever ``max_steps`` is set, and Lightning's bar otherwise.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import RichProgressBar


class StepProgressBar(RichProgressBar):
    """RichProgressBar of ``trainer.global_step`` out of ``trainer.max_steps`` (Lightning's bar without max_steps)."""

    def _by_steps(self) -> bool:
        return self.trainer.max_steps is not None and self.trainer.max_steps > 0

    @property
    def total_train_batches(self) -> int | float:
        return self.trainer.max_steps if self._by_steps() else super().total_train_batches

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)  # the logger's version is the run folder's name; the bar showed it as 0.000
        return metrics

    def _get_train_description(self, current_epoch: int) -> str:
        return "step" if self._by_steps() else super()._get_train_description(current_epoch)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        if self._by_steps():  # a new epoch resets the bar to 0; the steps go on
            self._update(self.train_progress_bar_id, trainer.global_step)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:  # fmt: skip
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self._by_steps():
            self._update(self.train_progress_bar_id, trainer.global_step)
