"""Checkpoints written after an epoch's last step resume at the next epoch's first step.

Lightning (2.6) restores such a checkpoint as a run still inside the finished epoch: its epoch loop is not done while
restarting (it waits for a validation run that never comes), so it trains one more step in that epoch, with
``batch_idx`` = steps_per_epoch, and only then ends it. Every later step then has another epoch and ``batch_idx`` than
in the uninterrupted run, and the group noise is drawn from generators keyed by step and ``batch_idx``: the resumed run
diverges. Two checkpoints are written at that moment: ModelCheckpoint's at every epoch end (``last.ckpt``), and
GracefulStop's when a SIGTERM or Ctrl-C arrives during an epoch's last step or its end hooks (Lightning then stops
after the epoch, not after the step).
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback


def close_finished_epoch(loops: dict[str, Any]) -> None:
    """Rewrite the loop state of a checkpoint (``checkpoint["loops"]``) taken after the last step of an epoch, before
    the next one began, into the state Lightning starts the next epoch from: the epoch counted as completed, the
    per-epoch counters of batches, optimizer steps and scheduler steps at 0 (what the next epoch's start would reset).
    Any other state (mid-epoch, or an epoch cut short by ``max_steps``) is left as it is."""
    fit = loops.get("fit_loop")
    if not fit:
        return
    epochs, batches = fit["epoch_progress"], fit["epoch_loop.batch_progress"]
    finished = (
        batches["is_last_batch"]
        and batches["current"]["completed"] == batches["current"]["ready"]
        and epochs["current"]["processed"] == epochs["current"]["ready"]
    )
    if not finished:
        return
    for counts in (epochs["current"], epochs["total"]):
        counts["completed"] = counts["processed"]
    batches["is_last_batch"] = False
    optimizer = fit["epoch_loop.automatic_optimization.optim_progress"]["optimizer"]
    for progress in (batches, fit["epoch_loop.scheduler_progress"], optimizer["step"], optimizer["zero_grad"]):
        progress["current"] = dict.fromkeys(progress["current"], 0)
    val_batches = fit["epoch_loop.val_loop.batch_progress"]
    val_batches["total"] = dict.fromkeys(val_batches["total"], 0)


class EpochBoundaryResume(Callback):
    """Every checkpoint of the run that is written between two epochs resumes at the next epoch's first step
    (``close_finished_epoch``); checkpoints written before this callback existed are mended when loaded."""

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:  # fmt: skip
        close_finished_epoch(checkpoint.get("loops") or {})

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:  # fmt: skip
        # Called before Lightning restores its loops from the same dict.
        close_finished_epoch(checkpoint.get("loops") or {})
