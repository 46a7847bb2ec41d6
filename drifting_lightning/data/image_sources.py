"""Image sets by index: in-memory arrays (digits, IDX files) and lazily read image folders (ADM centre crop).

An ``ImageSource`` holds one split: ``labels [N]``, ``class_names`` and ``load(idx)``, which turns an index array of
any shape into float32 images ``[*idx.shape, C, H, W]`` in [-1, 1].
"""

from __future__ import annotations

import gzip
import logging
import multiprocessing
import os
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm", ".pgm")
# What PIL raises on a truncated, corrupt or unreadable file.
_READ_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


class ImageSource:
    """One split of an image set: ``labels`` [N] int64, ``class_names``, ``sample_shape`` (C, H, W)."""

    labels: np.ndarray
    class_names: list[str]
    sample_shape: tuple[int, int, int]

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def skipped(self) -> int:
        """Unreadable images replaced so far (in every process reading this source)."""
        return 0

    def load(self, idx: np.ndarray, rng: np.random.Generator | None = None, threads: int = 1) -> Tensor:
        """idx: int array of any shape -> float32 [*idx.shape, *sample_shape] in [-1, 1].

        ``rng`` drives random augmentation (none when None: deterministic images).
        """
        raise NotImplementedError


class ArraySource(ImageSource):
    """Images held in memory as integers 0..max_value, [N, C, H, W], scaled to [-1, 1] when loaded."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, max_value: float, class_names: list[str]) -> None:
        if images.ndim != 4 or len(images) != len(labels):
            raise ValueError(f"need images [N, C, H, W] and labels [N], got {images.shape} and {labels.shape}")
        self.images = images
        self.labels = np.asarray(labels, dtype=np.int64)
        self.max_value = float(max_value)
        self.class_names = list(class_names)
        self.sample_shape = tuple(int(s) for s in images.shape[1:])

    def load(self, idx: np.ndarray, rng: np.random.Generator | None = None, threads: int = 1) -> Tensor:
        x = torch.from_numpy(self.images[np.asarray(idx)]).float()
        return x.mul_(2.0 / self.max_value).sub_(1.0)


_IDX_DTYPES = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """Parse an IDX file (gzipped if the name ends in .gz): magic 0 0 <dtype> <ndim>, big-endian int32 dims, data."""
    path = Path(path)
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
            data = f.read()
    except (EOFError, gzip.BadGzipFile, zlib.error) as err:
        raise ValueError(f"{path} is not a complete gzip file ({err}): expected a gzipped IDX file; download it "
                         "again") from err  # fmt: skip
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (magic number {data[:4].hex() or 'missing'})")
    ndim = data[3]
    if len(data) < 4 + 4 * ndim:
        raise ValueError(f"{path} is not a complete IDX file: its header is cut short ({len(data)} bytes, "
                         f"{ndim} dimensions need {4 + 4 * ndim}); download it again")  # fmt: skip
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    body = data[4 + 4 * ndim :]
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(body) != expected:
        raise ValueError(f"{path}: the header promises shape {shape} ({expected} bytes) but {len(body)} bytes follow")
    return np.frombuffer(body, dtype).reshape(shape).astype(dtype.newbyteorder("="))


def find_idx(root: str | Path, name: str) -> Path:
    """``root/name`` or ``root/name.gz``; a clear error naming both and the way to get them otherwise."""
    root = Path(root)
    for candidate in (root / name, root / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    where = f"{root} has no {name}(.gz)" if root.is_dir() else f"folder {root} does not exist"
    raise FileNotFoundError(
        f"IDX data not found: {where}. For Fashion-MNIST install with: apt-get update && apt-get install -y "
        "dataset-fashion-mnist, or point `root` at a folder with train-images-idx3-ubyte(.gz), "
        "train-labels-idx1-ubyte(.gz), t10k-images-idx3-ubyte(.gz) and t10k-labels-idx1-ubyte(.gz)."
    )


def center_crop_arr(image: Image.Image, resolution: int) -> np.ndarray:
    """ADM centre crop: halve with BOX filtering while the short side is >= 2 * resolution, BICUBIC-resize the short
    side to ``resolution``, keep the centre square. -> uint8 [resolution, resolution, channels]."""
    while min(image.size) >= 2 * resolution:
        image = image.resize(tuple(s // 2 for s in image.size), resample=Image.Resampling.BOX)
    scale = resolution / min(image.size)
    image = image.resize(tuple(round(s * scale) for s in image.size), resample=Image.Resampling.BICUBIC)
    arr = np.asarray(image)
    top, left = (arr.shape[0] - resolution) // 2, (arr.shape[1] - resolution) // 2
    return arr[top : top + resolution, left : left + resolution]


def list_image_folder(root: str | Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Files of root/<class>/**/<image>, sorted: (relative paths as bytes [N], labels [N], class names).

    Paths are kept in one numpy bytes array: no per-file Python object, so forked workers share the pages.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist (expected the layout root/<class>/<image>)")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise ValueError(f"image folder {root} has no class sub-folders (expected the layout root/<class>/<image>)")
    files: list[bytes] = []
    labels: list[np.ndarray] = []
    for c, name in enumerate(classes):
        found = sorted(
            os.fsencode(os.path.relpath(os.path.join(d, f), root))
            for d, _, names in os.walk(root / name, followlinks=True)
            for f in names
            if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith(".")
        )
        if not found:
            raise ValueError(
                f"class folder {root / name} has no images ({', '.join(IMAGE_EXTENSIONS)}): "
                "add images or remove the folder"
            )
        files += found
        labels.append(np.full(len(found), c, dtype=np.int64))
    return np.array(files), np.concatenate(labels), classes


class FolderSource(ImageSource):
    """Images of an ImageFolder-layout directory, read from disk on demand (ADM centre crop, optional flips).

    Only the file list lives in memory. An unreadable image is replaced by a readable one of the same class, each
    draw of it counted in ``skipped`` (a counter shared with the DataLoader workers); a warning names each bad file
    once per process.
    """

    def __init__(self, root: str | Path, resolution: int = 256, random_flip: bool = True) -> None:
        self.root = os.fsencode(Path(root))
        self.files, self.labels, self.class_names = list_image_folder(root)
        self.resolution = int(resolution)
        self.random_flip = random_flip
        self.sample_shape = (3, self.resolution, self.resolution)
        # Files are sorted by class: class c owns files[starts[c]:starts[c + 1]].
        self._starts = np.searchsorted(self.labels, np.arange(len(self.class_names) + 1))
        self._bad: set[int] = set()
        self._skipped = multiprocessing.Value("q", 0)

    @property
    def skipped(self) -> int:
        return int(self._skipped.value)

    def path(self, i: int) -> str:
        return os.fsdecode(os.path.join(self.root, self.files[i]))

    def read(self, i: int) -> np.ndarray | None:
        """uint8 [H, W, 3] of file i after the centre crop, or None if it cannot be read."""
        if i in self._bad:
            return None
        try:
            with Image.open(self.path(i)) as image:
                return center_crop_arr(image.convert("RGB"), self.resolution)
        except _READ_ERRORS as err:
            self._bad.add(i)
            log.warning("skipping unreadable image %s (%s: %s)", self.path(i), type(err).__name__, err)
            return None

    def _read_or_replace(self, i: int, seed: int) -> np.ndarray:
        arr = self.read(i)
        if arr is not None:
            return arr
        c = int(self.labels[i])
        start, stop = int(self._starts[c]), int(self._starts[c + 1])
        with self._skipped.get_lock():
            self._skipped.value += 1
        for j in start + np.random.default_rng(seed).permutation(stop - start):
            arr = self.read(int(j))
            if arr is not None:
                return arr
        raise RuntimeError(f"no readable image in class folder {os.fsdecode(self.root)}/{self.class_names[c]}")

    def load(self, idx: np.ndarray, rng: np.random.Generator | None = None, threads: int = 1) -> Tensor:
        idx = np.asarray(idx)
        flat = idx.reshape(-1).tolist()
        if not flat:
            return torch.empty((*idx.shape, *self.sample_shape))
        # Per-item randomness is drawn up front so that the result does not depend on ``threads``.
        seeds = rng.integers(2**62, size=len(flat)).tolist() if rng is not None else flat
        flips = (rng.random(len(flat)) < 0.5) if rng is not None and self.random_flip else np.zeros(len(flat), bool)
        if threads > 1 and len(flat) > 1:
            with ThreadPoolExecutor(threads) as pool:
                arrays = list(pool.map(self._read_or_replace, flat, seeds))
        else:
            arrays = [self._read_or_replace(i, s) for i, s in zip(flat, seeds)]
        hwc = np.stack([arr[:, ::-1] if flip else arr for arr, flip in zip(arrays, flips)])  # uint8 [n, H, W, 3]
        out = torch.from_numpy(hwc).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
        return out.reshape(*idx.shape, *self.sample_shape)
