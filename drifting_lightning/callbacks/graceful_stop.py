"""SIGTERM (SLURM preemption, ``kill``) and Ctrl-C during training: finish the step, write ``last.ckpt``, exit with
128 + the signal number."""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

from drifting_lightning.console import notice


class GracefulStop(Callback):
    """SIGTERM or Ctrl-C (SIGINT): finish the current step, write ``last.ckpt``, exit with 128 + the signal number
    (143 for SIGTERM, 130 for SIGINT). SIGKILL stops at once, without a checkpoint.

    Lightning already notes SIGTERM and stops at the next step boundary (``SIGTERMException``); this callback routes
    SIGINT the same way and writes the checkpoint when that stop happens. Without a ModelCheckpoint
    (``enable_checkpointing: false``) nothing is written. A signal during an epoch's last step or its end hooks stops
    the run after the epoch's end; that checkpoint resumes at the next epoch through ``EpochBoundaryResume``.
    """

    def __init__(self) -> None:
        self._signal = signal.SIGTERM

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning has installed its SIGTERM handler by now and restores every handler of the process when fit ends.
        # Every Ctrl-C takes the SIGTERM path: with several processes, a second SIGINT from the terminal must not
        # interrupt one of them in the middle of a collective.
        if threading.current_thread() is threading.main_thread():

            def on_sigint(signum: int, frame: FrameType | None) -> None:
                self._signal = signal.SIGINT
                handler = signal.getsignal(signal.SIGTERM)
                if not callable(handler):
                    raise KeyboardInterrupt
                handler(signum, frame)

            signal.signal(signal.SIGINT, on_sigint)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException):
            return
        name = signal.Signals(self._signal).name
        checkpoints = [c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint) and c.dirpath]
        if checkpoints:
            keeper = next((c for c in checkpoints if c.save_last), checkpoints[0])
            path = keeper.last_model_path or os.path.join(keeper.dirpath, keeper.CHECKPOINT_NAME_LAST + ".ckpt")
            # Recorded before saving, as ModelCheckpoint does: the resumed run then refreshes this file.
            keeper.last_model_path = path
            trainer.save_checkpoint(path)
            where = f"saved {path}; resume with --ckpt_path last (or --ckpt_path {path})"
        else:
            where = "no checkpoint written (checkpointing is off)"
        notice(f"{name} received: stopped after step {trainer.global_step}, {where}")
        # SIGTERMException is a SystemExit; its code becomes the exit status once it leaves the CLI.
        exception.code = 128 + int(self._signal)
