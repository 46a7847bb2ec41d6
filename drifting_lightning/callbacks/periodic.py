"""What the evaluation callbacks share: run every ``every_n_steps`` optimiser steps and once at the end of training,
from fixed noise, writing to the run's folder and its TensorBoard loggers."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger


def fixed_noise(pl_module: L.LightningModule, seed: int) -> torch.Generator:
    """A generator on the module's device, reseeded at every evaluation: the same noise each time, so
    successive plots and metric values differ only by the weights."""
    return torch.Generator(device=pl_module.device).manual_seed(seed)


def datamodule_of(trainer: L.Trainer) -> Any:
    """The trainer's DataModule; the callbacks that compare with real data need its ``real_samples``."""
    dm = trainer.datamodule
    if dm is None or not hasattr(dm, "real_samples"):
        raise RuntimeError(
            "this callback needs a DataModule with real_samples(n, split, seed), e.g. ToyDataModule or "
            "VectorDataModule; pass it as trainer.fit(model, datamodule=...)"
        )
    return dm


def tensorboards(trainer: L.Trainer) -> Iterator[Any]:
    """The ``SummaryWriter`` of every TensorBoard logger of the trainer (images and figures go only there)."""
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            yield logger.experiment


class PeriodicCallback(L.Callback):
    """Calls ``run(trainer, pl_module, final)`` at every ``every_n_steps``-th optimiser step (``final`` False) and at
    the end of training, then ``finish``. The end's run happens at the batch end of training's last batch (step
    ``max_steps``, or the last batch of epoch ``max_epochs``; ``final`` False): Lightning calls ModelCheckpoint's hooks
    after the other callbacks', so the checkpoint of that step holds it, and a resumed run keeps it in its history.
    A run that is stopped early (a signal, ``max_time``, early stopping) has it in ``on_train_end`` (``final`` True;
    skipped when that step has just run).

    ``global_zero_only``: run on global rank 0 only (pictures); otherwise every rank runs (collective metrics) and
    the subclass shares the result. ``last_step()`` is the step of the latest run (subclasses that keep a history in
    the checkpoint read it from there, so a resumed run does not repeat its last evaluation). ``log_dir`` is the
    run's folder, asked for at fit start (a collective call: every rank asks).
    """

    global_zero_only = True

    def __init__(self, every_n_steps: int) -> None:
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self.log_dir = ""
        self._last_step = -1

    def last_step(self) -> int:
        return self._last_step

    def run(self, trainer: L.Trainer, pl_module: L.LightningModule, final: bool) -> None:
        raise NotImplementedError

    def finish(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """After the final run, on the ranks that run."""

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.log_dir = trainer.log_dir or trainer.default_root_dir

    def runs_here(self, trainer: L.Trainer) -> bool:
        return trainer.is_global_zero or not self.global_zero_only

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        due = (step > 0 and step % self.every_n_steps == 0) or _ends_training(trainer)
        if self.runs_here(trainer) and due and step != self.last_step():
            self.run(trainer, pl_module, final=False)
            self._last_step = step

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.runs_here(trainer):
            return
        if trainer.global_step != self.last_step():
            self.run(trainer, pl_module, final=True)
            self._last_step = trainer.global_step
        self.finish(trainer, pl_module)


def _ends_training(trainer: L.Trainer) -> bool:
    """Whether the batch that just ended is training's last: it reached ``max_steps``, or it is the last batch of
    the last epoch (``max_epochs``)."""
    if 0 < trainer.max_steps <= trainer.global_step:
        return True
    last_epoch = trainer.max_epochs is not None and 0 <= trainer.max_epochs - 1 <= trainer.current_epoch
    return last_epoch and trainer.is_last_batch


class MetricCallback(PeriodicCallback):
    """A periodic metric: ``evaluate(trainer, pl_module) -> {key: value}`` runs on every rank (a collective: every
    rank gets the same values), appends ``(step, ...)`` to ``history`` (kept in checkpoints, so a resumed run does
    not repeat its last evaluation) and writes to the loggers. During training the values are also
    ``pl_module.log``-ged without logger, so they are in ``trainer.callback_metrics`` for ModelCheckpoint."""

    global_zero_only = False
    prog_bar = False  # show the values in the progress bar

    def __init__(self, every_n_steps: int) -> None:
        super().__init__(every_n_steps)
        self.history: list[tuple[int, Any]] = []

    def last_step(self) -> int:
        return self.history[-1][0] if self.history else -1

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history}

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        raise NotImplementedError

    def run(self, trainer: L.Trainer, pl_module: L.LightningModule, final: bool) -> None:
        values = self.evaluate(trainer, pl_module)
        if not final:  # pl_module.log is not allowed in on_train_end
            for key, value in values.items():
                # logger=False: the loggers have it at this exact step already (self.log would wait for
                # log_every_n_steps); this feeds callback_metrics and the progress bar.
                pl_module.log(key, value, logger=False, prog_bar=self.prog_bar, on_step=True, on_epoch=False)
