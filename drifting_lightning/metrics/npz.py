"""Samples as the standard evaluators read them: uint8 quantisation as in DiT and ADM-style .npz files."""

from __future__ import annotations

import contextlib
import os
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from drifting_lightning.files import atomic_write


@contextlib.contextmanager
def open_npz(path: str | os.PathLike, what: str) -> Iterator[np.lib.npyio.NpzFile]:
    """``np.load`` of an .npz archive (no pickles), as a context manager; any other file is an error that names
    ``what`` and ``path`` (numpy's own speak of pickled data or of context managers)."""
    try:
        loaded = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile):
        raise ValueError(f"{what} {path} is not an .npz archive (np.savez writes one)") from None
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise ValueError(f"{what} {path} is a .npy array, not an .npz archive; save it with np.savez(path, arr_0=...)")
    with loaded:
        yield loaded


def to_uint8(x: Tensor, channels_last: bool = True) -> Tensor:
    """x: [B, C, H, W] float in [-1, 1] -> uint8, [B, H, W, C] (default) or [B, C, H, W].

    The DiT rule (``sample_ddp.py``): clamp(127.5 * x + 128, 0, 255), then truncation to uint8, so -1 -> 0,
    0 -> 128 and 1 -> 255. Every number we report passes through this function exactly once.
    """
    if x.dim() != 4:
        raise ValueError(f"expected images [B, C, H, W], got shape {list(x.shape)}")
    q = torch.clamp(127.5 * x.float() + 128.0, 0, 255).to(torch.uint8)
    return q.permute(0, 2, 3, 1).contiguous() if channels_last else q


def from_uint8(u: Tensor | np.ndarray, channels_last: bool = True) -> Tensor:
    """uint8 images, [B, H, W, C] (default) or [B, C, H, W] with C = 1 or 3 -> float32 [B, C, H, W] in [-1, 1]:
    u / 127.5 - 1. The inverse of ``to_uint8`` on its outputs (127.5 x + 128 = u + 0.5 before truncation), so an
    extractor that quantises again (Inception) sees the same image."""
    x = torch.as_tensor(u)
    c = x.shape[-1] if channels_last else (x.shape[1] if x.dim() > 1 else 0)
    if x.dtype != torch.uint8 or x.dim() != 4 or c not in (1, 3):
        layout = "[N, H, W, C]" if channels_last else "[N, C, H, W]"
        raise ValueError(f"expected uint8 images {layout} with C in (1, 3), got {x.dtype} {list(x.shape)}")
    x = x.permute(0, 3, 1, 2) if channels_last else x
    return x.float() / 127.5 - 1.0


def through_uint8(x: Tensor) -> Tensor:
    """Images [B, 1 or 3, H, W] in [-1, 1] -> the same images after ``to_uint8`` and ``from_uint8``: what a saved
    .npz gives back, so training-time and offline metrics see the same pixels. Other tensors (undecoded latents,
    vectors) are returned unchanged."""
    if x.dim() != 4 or x.shape[1] not in (1, 3):
        return x
    return from_uint8(to_uint8(x, channels_last=False), channels_last=False)


def write_adm_npz(
    path: str | os.PathLike, images: Tensor | np.ndarray, labels: Tensor | np.ndarray | None = None
) -> Path:
    """Write an ADM-evaluator sample batch: ``arr_0`` = images uint8 [N, H, W, C] (+ ``arr_1`` = labels [N]).

    Written to a temporary file beside ``path`` and renamed, so a reader never sees a partial file.
    """
    images = images.cpu().numpy() if isinstance(images, Tensor) else np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(
            f"expected uint8 images [N, H, W, C] with C in (1, 3), got {images.dtype} {list(images.shape)}; "
            "convert samples in [-1, 1] with to_uint8(x)"
        )
    return _write_samples(path, images, labels)


def write_vector_npz(
    path: str | os.PathLike, vectors: Tensor | np.ndarray, labels: Tensor | np.ndarray | None = None
) -> Path:
    """Write samples of vector data (toy, actions) in the same layout: ``arr_0`` = float32 [N, D] (+ ``arr_1``)."""
    vectors = vectors.cpu().numpy() if isinstance(vectors, Tensor) else np.asarray(vectors)
    if vectors.ndim != 2:
        raise ValueError(f"expected vectors [N, D], got {list(vectors.shape)}")
    return _write_samples(path, vectors.astype(np.float32, copy=False), labels)


def _write_samples(path: str | os.PathLike, samples: np.ndarray, labels: Tensor | np.ndarray | None) -> Path:
    """``arr_0`` = samples (+ ``arr_1`` = labels [N]), written to a temporary file beside ``path`` and renamed."""
    arrays = {"arr_0": samples}
    if labels is not None:
        labels = labels.cpu().numpy() if isinstance(labels, Tensor) else np.asarray(labels)
        if labels.shape != (samples.shape[0],):
            raise ValueError(f"labels must be [{samples.shape[0]}] to match the samples, got {list(labels.shape)}")
        arrays["arr_1"] = labels
    path = Path(path)
    with atomic_write(path) as tmp, open(tmp, "wb") as f:  # a file object: np.savez appends .npz to other names
        np.savez(f, **arrays)
    return path
