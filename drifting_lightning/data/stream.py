"""What the toy and vector DataModules share: a seeded stream of fresh positives every step.

Pass ``epoch`` of rank r, worker w draws from a generator seeded by (seed, epoch, r, w), so a run repeats
exactly, ranks and workers never share samples, and each epoch is new. The epoch and the number of its batches that
training consumed are saved in the checkpoint (``state_dict``), so a resumed run draws exactly the batches that the
uninterrupted run would have drawn.
"""

from __future__ import annotations

import warnings
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

# Lightning warns on every fit that an IterableDataset with __len__ may be miscounted with several workers;
# SeededStream splits its steps among the workers, so its length is exact.
warnings.filterwarnings("ignore", message=r"Your `IterableDataset` has `__len__` defined", category=UserWarning)


def split_stream(split: str) -> int:
    """The stream tag of ``split``; an unknown split raises ValueError."""
    if split not in SPLIT_STREAMS:
        raise ValueError(f"unknown split {split!r}; valid: {', '.join(SPLIT_STREAMS)}")
    return SPLIT_STREAMS[split]


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


class StatefulStreamLoader(DataLoader):
    """The DataModule saves the stream's position; being stateful tells Lightning that this loader resumes mid-epoch.
    Shared by the toy/vector and the image DataModules."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


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
        return StatefulStreamLoader(self._stream, batch_size=None)

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
