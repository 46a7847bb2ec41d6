"""Resumable training streams, and the seeded stream of fresh positives that the toy and vector DataModules share.

Every DataModule here hands out one batch per training step through a ``StreamLoader`` and saves its position in the
checkpoint (``state_dict``), so a resumed run draws exactly the batches that the uninterrupted run would have drawn.
The image DataModules count the consumed steps with a ``PassTracker``; the toy and vector ones save (epoch, batch).

Toy and vector data: pass ``epoch`` of rank r, worker w draws from a generator seeded by (seed, epoch, r, w), so a
run repeats exactly, ranks and workers never share samples, and each epoch is new. The epoch and the number of its
batches that training consumed (the trainer's count, as Lightning fetches ahead) are what the checkpoint holds.
"""

from __future__ import annotations

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
    """The training loader of a resumable stream (one batch dict per step, ``batch_size=None``). Each pass first
    calls ``begin_pass()`` (when given), which points the dataset at the position training has consumed; a
    ``tracker`` counts the batches the loader hands out. Stateful, with an empty state (the DataModule saves the
    position), which tells Lightning that this loader resumes mid-epoch."""

    def __init__(self, dataset: IterableDataset, begin_pass: Callable[[], None] | None = None,
                 tracker: PassTracker | None = None, **kwargs: Any) -> None:  # fmt: skip
        super().__init__(dataset, batch_size=None, **kwargs)
        self._begin_pass, self._tracker = begin_pass, tracker

    def __iter__(self) -> Iterator[Any]:
        if self._begin_pass is not None:
            self._begin_pass()
        batches = super().__iter__()
        return batches if self._tracker is None else self._tracker.count(batches)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class SeededStream(IterableDataset):
    """``steps`` batches ``{"positives": [1, P, *shape]}`` per pass, ``draw(generator) -> [P, *shape]``.

    ``draw`` must be picklable (a module-level function or a ``functools.partial`` of one) for workers. The next pass
    is epoch ``epoch`` and begins at its batch ``start`` (a resumed epoch); ``position`` is the index of the next batch
    of the pass in progress (None before the first pass; counted in this process, so without workers only).
    """

    def __init__(
        self, draw: Callable[[torch.Generator], Tensor], steps: int, seed: int, rank: int, epoch: int = 0,
        start: int = 0,
    ) -> None:  # fmt: skip
        self.draw, self.steps, self.seed, self.rank, self.epoch = draw, steps, seed, rank, epoch
        self.start = start
        self.position: int | None = None

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        gen = torch_generator(self.seed, TRAIN_STREAM, self.epoch, self.rank, worker)
        start, self.start = self.start, 0
        self.epoch += 1
        self.position = start
        for i in range(worker, self.steps, workers):
            positives = self.draw(gen)  # drawn even when skipped, so the generator is where the first pass had it
            if i >= start:
                self.position = i + 1
                yield {"positives": positives.unsqueeze(0)}


class StreamingDataModule(L.LightningDataModule):
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
        self._epoch, self._batch = 0, 0
        self._stream: SeededStream | None = None

    def draw_fn(self) -> Callable[[torch.Generator], Tensor]:
        """A picklable ``generator -> [positives_per_step, *sample_shape]``."""
        raise NotImplementedError

    def real_samples(self, n: int, split: str = "train", seed: int = 0) -> tuple[Tensor, Tensor | None]:
        """``n`` target samples and their labels (None when unconditional), independent of training batches."""
        raise NotImplementedError

    def train_dataloader(self) -> DataLoader:
        rank = self.trainer.global_rank if self.trainer is not None else 0
        state = self.state_dict()
        self._stream = SeededStream(self.draw_fn(), self.steps_per_epoch, self.seed, rank, state["epoch"],
                                    state.get("batch", 0))  # fmt: skip
        return StreamLoader(self._stream)

    def state_dict(self) -> dict[str, Any]:
        """``{"epoch": e}`` at an epoch boundary, ``{"epoch": e, "batch": k}`` after k batches of epoch e."""
        stream = self._stream
        if stream is None:
            epoch, batch = self._epoch, self._batch
        elif stream.position is None:
            epoch, batch = stream.epoch, stream.start
        else:
            # Lightning fetches a batch ahead of the step: the trainer's count of batches its steps used is exact.
            trainer = self.trainer
            batch = stream.position if trainer is None else trainer.fit_loop.epoch_loop.batch_progress.current.ready
            epoch = stream.epoch - 1
            if batch >= stream.steps:
                epoch, batch = epoch + 1, 0
        return {"epoch": epoch, "batch": batch} if batch else {"epoch": epoch}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._epoch, self._batch = int(state_dict.get("epoch", 0)), int(state_dict.get("batch", 0))
        if self._stream is not None:
            self._stream.epoch, self._stream.start, self._stream.position = self._epoch, self._batch, None
