"""TensorBoard curves of a resumed run continue from its checkpoint, without the steps the interrupted run logged
after it.

A run killed without warning (SIGKILL, a lost node) logged steps past its last checkpoint; the resume trains them
again and logs them a second time, so every curve would double back. TensorBoard drops earlier events from a step on
when the event file holds a session start at that step (what ``SummaryWriter(purge_step=...)`` writes). Lightning
creates the writer before it reads the checkpoint, so the start is written into it here once the step is known.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger


class PurgeLogsAfterCheckpoint(Callback):
    """On a resume from a checkpoint at optimiser step s, TensorBoard drops what an earlier run logged from step s + 1
    on. Callbacks log step s's metrics before the checkpoint of step s is written, so they stay; Lightning logs
    training scalars under the step count before the step, so a training point logged at s (the step after the
    checkpoint) stays too and appears twice when the resumed run logs it again."""

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        step = checkpoint.get("global_step")
        if not isinstance(step, int) or not trainer.is_global_zero:
            return
        from tensorboard.compat.proto.event_pb2 import Event, SessionLog

        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                writer = logger.experiment._get_file_writer()
                writer.add_event(Event(step=step + 1, session_log=SessionLog(status=SessionLog.START)))
