"""Image DataModules: one class-grouped training batch per step (PAPER.md section 6), drawn by a PositiveSource.

Every training batch is the dict
    {"positives": float32 [Nc, Npos, C, H, W], "labels": int64 [Nc], "unconditional": float32 [Nc, Nunc, C, H, W]}
with images in [-1, 1]. The positive source's state (step, queues) is part of the DataModule's ``state_dict``, which
Lightning stores in checkpoints, so a resumed run draws exactly the batches the uninterrupted run would have drawn.
"""

from __future__ import annotations

import copy
import logging
import os
from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from jsonargparse import lazy_instance
from lightning.pytorch import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from drifting_lightning.data.image_sources import ArraySource, FolderSource, ImageSource, find_idx, read_idx
from drifting_lightning.data.stream import PassTracker, StreamLoader, split_stream
from drifting_lightning.data.workers import leave_stop_signals_to_the_main_process
from drifting_lightning.sampling.positives import ClassAwareSampler, PositiveSource

log = logging.getLogger(__name__)

_FLIP_STREAM = 100  # generator stream of the positive source used for augmentation (see PositiveSource.rng)
# The default source, shown in full by --print_config; each DataModule draws from its own copy.
DEFAULT_POSITIVES = lazy_instance(ClassAwareSampler)


class ImageDataModule(LightningDataModule, ABC):
    """Base of the image DataModules: subclasses implement ``make_source(split)`` for "train" and "test" (the
    held-out split; "val" means the same).

    ``positives`` is the configured source; the DataModule draws from its own copy, set up with the train split's
    labels and this process's rank (``trainer.global_rank`` / ``trainer.world_size`` when attached, else 0 / 1).
    Each epoch is ``steps_per_epoch`` batches; ``num_workers`` DataLoader workers read images in parallel
    (worker w of K builds steps w, w + K, ..., so the batches do not depend on K).
    """

    def __init__(
        self,
        positives: PositiveSource = DEFAULT_POSITIVES,
        steps_per_epoch: int = 1000,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if steps_per_epoch < 1 or num_workers < 0:
            raise ValueError(f"need steps_per_epoch >= 1 and num_workers >= 0, got {steps_per_epoch}, {num_workers}")
        self.positives = positives
        self.steps_per_epoch = int(steps_per_epoch)
        self.num_workers = int(num_workers)
        self._sources: dict[str, ImageSource] = {}
        self._live: PositiveSource | None = None  # the copy of `positives` this DataModule draws from
        self._pending: dict[str, Any] | None = None  # state loaded before setup()
        self._tracker = PassTracker()  # the step training has consumed; the source in this process catches up lazily
        self._skips_reported = 0

    @abstractmethod
    def make_source(self, split: str) -> ImageSource:
        """The image source of a split ("train" or "test")."""

    def source(self, split: str = "train") -> ImageSource:
        """The split's image source, built once ("val" and "test" both mean the held-out split)."""
        split_stream(split)  # raises on an unknown split
        split = "train" if split == "train" else "test"
        if split not in self._sources:
            self._sources[split] = self.make_source(split)
        return self._sources[split]

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """Shape of one image, (C, H, W)."""
        return self.source("train").sample_shape

    @property
    def num_classes(self) -> int:
        return len(self.source("train").class_names)

    def real_samples(self, n: int | None = None, split: str = "train", seed: int = 0) -> tuple[Tensor, Tensor]:
        """min(n, split size) distinct real images of ``split`` (all of them when n is None), in an order drawn
        from ``seed``, without augmentation -> (float32 [m, C, H, W] in [-1, 1], labels int64 [m]).

        Images are never repeated: a sample-based metric would read repeats as a perfect match.
        """
        source = self.source(split)
        if n is not None and n > len(source):
            log.warning(
                "%s: asked for %d real %s images, the split holds %d: returning all of them",
                type(self).__name__,
                n,
                split,
                len(source),
            )
        m = len(source) if n is None else min(n, len(source))
        held_out = split != "train"
        idx = np.random.default_rng([seed, held_out]).choice(len(source), m, replace=False)
        images = source.load(idx, rng=None, threads=min(16, os.cpu_count() or 1))
        return images, torch.from_numpy(source.labels[idx])

    def setup(self, stage: str | None = None) -> None:
        if self._live is not None:
            return
        train = self.source("train")
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        live = copy.deepcopy(self.positives)
        live.setup(train.labels, len(train.class_names), rank, world, train.class_names)
        self._live = live
        if self._pending is not None:
            self.load_state_dict(self._pending)

    def train_dataloader(self) -> DataLoader:
        self.setup()
        stream = _PositiveStream(self.source("train"), self._live, self.steps_per_epoch)
        return StreamLoader(stream, lambda: self._begin_pass(stream), self._tracker, num_workers=self.num_workers,
                            worker_init_fn=leave_stop_signals_to_the_main_process)  # fmt: skip

    def teardown(self, stage: str | None = None) -> None:
        self._report_skips()

    def state_dict(self) -> dict[str, Any]:
        """The positive source's state at the last batch the training loop consumed."""
        if self._live is None:
            return dict(self._pending or {})
        self._catch_up()
        return {"positives": self._live.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "positives" not in state:
            return
        if self._live is None:
            self._pending = state
            return
        self._live.load_state_dict(state["positives"])
        self._pending = None
        self._tracker.forget()

    def _catch_up(self) -> None:
        """Advance the source in this process to the step training has consumed (workers and Lightning's prefetching
        run ahead of training; the tracker knows how far training got)."""
        consumed = self._tracker.position(self.trainer)
        if consumed is not None and consumed > self._live.step:
            self._live.skip(consumed - self._live.step)

    def _begin_pass(self, stream: _PositiveStream) -> None:
        """A new pass of the loader draws from a copy of the source at the consumed position."""
        self._catch_up()
        self._report_skips()
        self._tracker.begin(self._live.step, self.trainer)
        stream.positives = copy.deepcopy(self._live)

    def _report_skips(self) -> None:
        train = self._sources.get("train")
        if train is not None and train.skipped > self._skips_reported:
            self._skips_reported = train.skipped
            log.warning(
                "%s: %d draw(s) of unreadable training images so far, each replaced by a readable image of the same "
                "class (a bad file counts each time it is drawn; the warnings above name the files)",
                type(self).__name__,
                train.skipped,
            )


class _PositiveStream(IterableDataset):
    """``steps`` training batches drawn by (a copy of) ``positives``; with K workers, worker w builds steps w, w + K,
    ... and only skips over the others, so every worker follows the same index stream."""

    def __init__(self, source: ImageSource, positives: PositiveSource, steps: int) -> None:
        self.source, self.positives, self.steps = source, positives, steps

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        positives = copy.deepcopy(self.positives)
        for i in range(self.steps):
            if i % workers != worker:
                positives.skip(1)
                continue
            rng = positives.rng(_FLIP_STREAM, positives.step)
            labels, pos_idx, unc_idx = positives.draw()
            yield {
                "positives": self.source.load(pos_idx.numpy(), rng),
                "labels": labels,
                "unconditional": self.source.load(unc_idx.numpy(), rng),
            }


class DigitsDataModule(ImageDataModule):
    """scikit-learn's 8x8 digits: 1,797 grey images (levels 0..16), 10 classes; the last 297 are the test split."""

    test_size = 297

    def make_source(self, split: str) -> ImageSource:
        from sklearn.datasets import load_digits

        digits = load_digits()
        images, labels = digits.images.astype(np.uint8)[:, None], digits.target
        cut = len(labels) - self.test_size
        part = slice(None, cut) if split == "train" else slice(cut, None)
        return ArraySource(images[part], labels[part], 16, [str(c) for c in digits.target_names])


class IDXDataModule(ImageDataModule):
    """MNIST-format IDX files (Fashion-MNIST by default): train-* is the train split, t10k-* the test split.

    ``pad_to`` pads the 28x28 images with background to ``pad_to`` x ``pad_to`` (e.g. 32).
    """

    def __init__(
        self,
        root: str = "/usr/share/datasets/fashion-mnist",
        pad_to: int | None = None,
        positives: PositiveSource = DEFAULT_POSITIVES,
        steps_per_epoch: int = 1000,
        num_workers: int = 0,
    ) -> None:
        super().__init__(positives, steps_per_epoch, num_workers)
        self.root = root
        self.pad_to = pad_to

    def make_source(self, split: str) -> ImageSource:
        prefix = "train" if split == "train" else "t10k"
        images = read_idx(find_idx(self.root, f"{prefix}-images-idx3-ubyte"))
        labels = read_idx(find_idx(self.root, f"{prefix}-labels-idx1-ubyte")).astype(np.int64)
        if images.ndim != 3 or len(images) != len(labels):
            raise ValueError(
                f"{self.root}: expected images [N, H, W] and labels [N], got {images.shape}, {labels.shape}"
            )
        if self.pad_to is not None:
            extra = [self.pad_to - s for s in images.shape[1:]]
            if min(extra) < 0:
                raise ValueError(f"pad_to={self.pad_to} is smaller than the images ({images.shape[1:]})")
            images = np.pad(images, [(0, 0)] + [(e // 2, e - e // 2) for e in extra])
        # Class names from the train labels, so both splits agree even if one lacks a class.
        num_classes = int(labels.max()) + 1 if split == "train" else self.num_classes
        return ArraySource(images[:, None], labels, 255, [str(c) for c in range(num_classes)])


class ImageFolderDataModule(ImageDataModule):
    """Images in ImageFolder layout (root/<class>/<image>; the ImageNet train layout is the same), ADM centre
    crop to ``resolution`` and random horizontal flips, read lazily by the workers. ``val_root`` (same layout, same
    class folders) is the held-out split, used by ``real_samples(..., split="val")``."""

    def __init__(
        self,
        root: str,
        resolution: int = 256,
        random_flip: bool = True,
        val_root: str | None = None,
        positives: PositiveSource = DEFAULT_POSITIVES,
        steps_per_epoch: int = 1000,
        num_workers: int = 0,
    ) -> None:
        super().__init__(positives, steps_per_epoch, num_workers)
        self.root, self.resolution, self.random_flip, self.val_root = root, resolution, random_flip, val_root

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return (3, self.resolution, self.resolution)

    def make_source(self, split: str) -> ImageSource:
        if split == "train":
            return FolderSource(self.root, self.resolution, self.random_flip)
        if self.val_root is None:
            raise ValueError(f"{type(self).__name__}: split {split!r} needs val_root (a folder in the same layout)")
        source = FolderSource(self.val_root, self.resolution, random_flip=False)
        if source.class_names != self.source("train").class_names:
            raise ValueError(f"class folders of val_root {self.val_root} differ from those of root {self.root}")
        return source
