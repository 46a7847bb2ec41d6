"""Helpers of the image-data tests (unit and integration): the training batch contract, a loader's first batches,
a small image folder."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

CONTRACT_KEYS = {"positives", "labels", "unconditional"}


def check_batch(batch: dict, nc: int, npos: int, nunc: int, shape: tuple) -> None:
    """The training batch contract: keys, shapes, dtypes, value range."""
    assert set(batch) == CONTRACT_KEYS
    assert batch["positives"].shape == (nc, npos, *shape) and batch["positives"].dtype == torch.float32
    assert batch["unconditional"].shape == (nc, nunc, *shape) and batch["unconditional"].dtype == torch.float32
    assert batch["labels"].shape == (nc,) and batch["labels"].dtype == torch.int64
    for key in ("positives", "unconditional"):
        x = batch[key]
        assert x.numel() == 0 or (x.min() >= -1 and x.max() <= 1)


def first_batches(dm, n: int) -> list[dict]:
    out = []
    for batch in dm.train_dataloader():
        out.append(batch)
        if len(out) == n:
            return out
    return out


def same_batches(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in CONTRACT_KEYS)


def write_folder(root: Path, sizes=((40, 30), (30, 50), (64, 64))) -> None:
    """Three classes of three PNGs each (class k is filled with grey level 60 * k + image number)."""
    for k, name in enumerate(["ant", "bee", "cat"]):
        (root / name).mkdir(parents=True)
        for j, size in enumerate(sizes):
            Image.new("RGB", size, (60 * k + j,) * 3).save(root / name / f"{j}.png")
