"""Resumable training streams, and the seeded stream of fresh positives that the toy and vector DataModules share.

Every DataModule here hands out one batch per training step through a ``StreamLoader`` and saves its position in the
checkpoint (``state_dict``), so a resumed run draws exactly the batches that the uninterrupted run would have drawn.
The position is the number of batches training has consumed; a ``PassTracker`` counts it from the trainer's count of
batches its steps took, for every DataModule alike (Lightning fetches ahead of the step, workers further ahead).

Toy and vector data: batch k of epoch e (position e * steps_per_epoch + k) on rank r, worker w is drawn from a
generator seeded by (seed, e, r, w), so a run repeats exactly, ranks and workers never share samples, and each epoch
is new. The checkpoint holds the position as (epoch, batch).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from drifting_lightning.rng import torch_generator

# Stream tags: the training batches and each split of ``real_samples`` never share a generator state.
TRAIN_STREAM = 0
SPLIT_STREAMS = {"train": 1, "val": 2, "test": 3}


def split_stream(split: str) -> int:
    """The stream tag of ``split``; an unknown split raises ValueError."""
    if split not in SPLIT_STREAMS:
        raise ValueError(f"unknown split {split!r}; valid: {', '.join(SPLIT_STREAMS)}")
    return SPLIT_STREAMS[split]


class PassTracker:
    """The stream position that training has consumed. A loader pass begins at position ``start``; Lightning fetches
    a batch ahead of the step and workers run further ahead, so the position is ``start`` plus the trainer's count of
    batches its steps took since the pass began (``batch_progress.total.ready``), or, without a trainer, plus the
    batches the loader handed out."""

    def __init__(self) -> None:
        self._start: int | None = None  # None: no pass in progress
        self._trainer_start: int | None = None
        self._yielded = 0

    @staticmethod
    def _trainer_batches(trainer: Any) -> int | None:
        return None if trainer is None else trainer.fit_loop.epoch_loop.batch_progress.total.ready

    def begin(self, start: int, trainer: Any) -> None:
        self._start, self._trainer_start, self._yielded = start, self._trainer_batches(trainer), 0

    def forget(self) -> None:
        """Drop the pass in progress (a loaded state replaces its position)."""
        self._start = None

    def position(self, trainer: Any) -> int | None:
        """The position of the next batch training will take; None when no pass has begun."""
        if self._start is None:
            return None
        now = self._trainer_batches(trainer)
        consumed = self._yielded if now is None or self._trainer_start is None else now - self._trainer_start
        return self._start + consumed

    def count(self, batches: Iterator[Any]) -> Iterator[Any]:
        for batch in batches:
            self._yielded += 1
            yield batch


class StreamLoader(DataLoader):
    """The training loader of a resumable stream (one batch dict per step, ``batch_size=None``), the one every
    DataModule here returns. Each pass first calls ``begin_pass()``, which points the dataset at the position
    training has consumed and begins the pass of ``tracker``; the tracker counts the batches the loader hands out.
    Stateful, with an empty state (the DataModule saves the position), which tells Lightning that this loader resumes
    mid-epoch."""

    def __init__(self, dataset: IterableDataset, begin_pass: Callable[[], None], tracker: PassTracker,
                 **kwargs: Any) -> None:  # fmt: skip
        super().__init__(dataset, batch_size=None, **kwargs)
        self._begin_pass, self._tracker = begin_pass, tracker

    def __iter__(self) -> Iterator[Any]:
        self._begin_pass()
        return self._tracker.count(super().__iter__())

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class SeededStream(IterableDataset):
    """``steps`` batches ``{"positives": [1, P, *shape]}`` per epoch, ``draw(generator) -> [P, *shape]``; a pass
    yields epoch ``epoch`` from its batch ``start`` on (the owner points it at the consumed position before each pass).

    ``draw`` must be picklable (a module-level function or a ``functools.partial`` of one) for workers.
    """

    def __init__(self, draw: Callable[[torch.Generator], Tensor], steps: int, seed: int, rank: int) -> None:
        self.draw, self.steps, self.seed, self.rank = draw, steps, seed, rank
        self.epoch, self.start = 0, 0

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        gen = torch_generator(self.seed, TRAIN_STREAM, self.epoch, self.rank, worker)
        for i in range(worker, self.steps, workers):
            positives = self.draw(gen)  # drawn even when skipped, so the generator is where the first pass had it
            if i >= self.start:
                yield {"positives": positives.unsqueeze(0)}


class StreamingDataModule(L.LightningDataModule, ABC):
    """Base of DataModules whose every training step is ``{"positives": [1, P, *sample_shape]}`` of fresh
    samples; subclasses set ``sample_shape`` and implement ``draw_fn`` and ``real_samples``."""

    num_classes = 0
    sample_shape: tuple[int, ...]

    def __init__(self, positives_per_step: int, steps_per_epoch: int, seed: int) -> None:
        super().__init__()
        if positives_per_step < 1 or steps_per_epoch < 1:
            raise ValueError(
                f"positives_per_step and steps_per_epoch must be >= 1, got {positives_per_step}, {steps_per_epoch}"
            )
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.positives_per_step = positives_per_step
        self.steps_per_epoch = steps_per_epoch
        self.seed = seed
        self._loaded = 0  # the position a checkpoint gave (0 for a new run), until a pass begins
        self._tracker = PassTracker()

    @abstractmethod
    def draw_fn(self) -> Callable[[torch.Generator], Tensor]:
        """A picklable ``generator -> [positives_per_step, *sample_shape]``."""

    @abstractmethod
    def real_samples(self, n: int, split: str = "train", seed: int = 0) -> tuple[Tensor, Tensor | None]:
        """``n`` target samples and their labels (None when unconditional), independent of training batches."""

    def train_dataloader(self) -> DataLoader:
        rank = self.trainer.global_rank if self.trainer is not None else 0
        stream = SeededStream(self.draw_fn(), self.steps_per_epoch, self.seed, rank)
        return StreamLoader(stream, lambda: self._begin_pass(stream), self._tracker)

    def state_dict(self) -> dict[str, Any]:
        """``{"epoch": e}`` at an epoch boundary, ``{"epoch": e, "batch": k}`` after k batches of epoch e."""
        epoch, batch = divmod(self._position(), self.steps_per_epoch)
        return {"epoch": epoch, "batch": batch} if batch else {"epoch": epoch}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loaded = int(state_dict.get("epoch", 0)) * self.steps_per_epoch + int(state_dict.get("batch", 0))
        self._tracker.forget()

    def _position(self) -> int:
        """The number of batches training has consumed."""
        position = self._tracker.position(self.trainer)
        return self._loaded if position is None else position

    def _begin_pass(self, stream: SeededStream) -> None:
        """A new pass of the loader continues at the consumed position."""
        position = self._position()
        stream.epoch, stream.start = divmod(position, self.steps_per_epoch)
        self._tracker.begin(position, self.trainer)
