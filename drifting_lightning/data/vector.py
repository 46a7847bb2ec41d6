"""The user's own low-dimensional vectors from a ``.npy`` or ``.csv`` file (PAPER.md section 9: the paper's
robotics experiment drifts raw action vectors with no encoder)."""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from drifting_lightning.data.stream import StreamingDataModule, split_stream
from drifting_lightning.rng import torch_generator

# Tag of the generator that splits the rows into train and held-out parts.
_SPLIT_ROWS = 99
_NUMPY_ROW = re.compile(r" at row (\d+), column (\d+)")  # in numpy.loadtxt's error


def _csv_has_header(path: Path) -> bool:
    with path.open() as f:
        first = f.readline()
    try:
        [float(v) for v in first.strip().split(",")]
    except ValueError:
        return True
    return False


def load_vectors(path: str | Path) -> np.ndarray:
    """A 2-D float array [n, D] (n >= 2) from ``.npy`` or ``.csv`` (comma-separated numbers, optional header
    row); every problem raises an error that names the file."""
    path = Path(path)
    if path.suffix.lower() not in (".npy", ".csv"):
        raise ValueError(f"{path}: unsupported file type {path.suffix!r}; give a .npy array or a .csv table")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (VectorDataModule needs a .npy or .csv of shape [n, D])")
    csv = path.suffix.lower() == ".csv"
    header = csv and _csv_has_header(path)
    try:
        if not csv:
            data = np.load(path, allow_pickle=False)
        else:
            data = np.loadtxt(path, delimiter=",", skiprows=int(header), ndmin=2, dtype=np.float64)
    except ValueError as err:  # "from None": the config error shows this message, which holds numpy's
        if csv and (where := _NUMPY_ROW.search(str(err))):  # numpy counts data rows from 0: say the file's line
            line = int(where.group(1)) + 1 + int(header)
            raise ValueError(f"{path}, line {line}, column {where.group(2)}: not a number "
                             f"({_NUMPY_ROW.sub('', str(err)).rstrip('. ')})") from None
        raise ValueError(f"{path}: cannot read numbers from this file ({err})") from None
    if not np.issubdtype(data.dtype, np.number) or np.issubdtype(data.dtype, np.complexfloating):
        raise ValueError(f"{path}: expected real numbers, got dtype {data.dtype}")
    if data.ndim != 2:
        hint = " (for 1-D data save x.reshape(-1, 1))" if data.ndim == 1 else ""
        raise ValueError(f"{path}: expected a 2-D array [n, D], got shape {tuple(data.shape)}{hint}")
    bad = ~np.isfinite(data)
    if bad.any():
        rows = np.unique(np.nonzero(bad)[0])
        first = f"line {int(rows[0]) + 1 + int(header)}" if csv else f"row {int(rows[0])}"
        raise ValueError(
            f"{path}: {int(bad.sum())} non-finite values (NaN/inf) in {len(rows)} rows, "
            f"first at {first}; clean or drop them"
        )
    if data.shape[0] < 2 or data.shape[1] < 1:
        raise ValueError(f"{path}: need at least 2 rows and 1 column, got shape {tuple(data.shape)}")
    return data.astype(np.float32)


def _draw_rows(rows: Tensor, n: int, generator: torch.Generator) -> Tensor:
    """``n`` rows of ``rows`` [N, D], distinct when n <= N, else drawn with replacement -> [n, D]."""
    if n <= rows.shape[0]:
        return rows[torch.randperm(rows.shape[0], generator=generator)[:n]]
    return rows[torch.randint(0, rows.shape[0], (n,), generator=generator)]


class VectorDataModule(StreamingDataModule):
    """Rows of a ``[n, D]`` table as samples: batches ``{"positives": [1, P, D]}``.

    The file is read once, at construction, so ``sample_shape`` is known before the model is built. A
    seeded ``test_fraction`` of the rows is held out (floor(n * test_fraction) rows). With ``standardize``
    every column is shifted and scaled by the train rows' ``mean`` and ``std`` (constant columns keep
    scale 1); the model then works in standardised units and ``unstandardize`` maps its samples back.
    Each step draws ``positives_per_step`` distinct train rows (with replacement only when there are fewer).
    """

    def __init__(
        self,
        path: str,
        positives_per_step: int = 1024,
        steps_per_epoch: int = 100,
        standardize: bool = True,
        test_fraction: float = 0.1,
        seed: int = 0,
    ) -> None:
        super().__init__(positives_per_step, steps_per_epoch, seed)
        if not 0.0 <= test_fraction < 1.0:
            raise ValueError(f"test_fraction must lie in [0, 1), got {test_fraction}")
        self.path = path
        self.standardize = standardize
        data = torch.from_numpy(load_vectors(path))
        n = data.shape[0]
        perm = torch.randperm(n, generator=torch_generator(seed, _SPLIT_ROWS))
        n_test = int(n * test_fraction)
        train, test = data[perm[n_test:]], data[perm[:n_test]]
        if standardize:
            self.mean = train.mean(0)
            std = train.std(0, unbiased=False)
            self.std = torch.where(std > 1e-12, std, torch.ones_like(std))
        else:
            self.mean, self.std = torch.zeros(data.shape[1]), torch.ones(data.shape[1])
        self.train_data = (train - self.mean) / self.std
        self.test_data = (test - self.mean) / self.std
        self.sample_shape = (data.shape[1],)

    def unstandardize(self, x: Tensor) -> Tensor:
        """Standardised samples [..., D] -> the file's units."""
        return x * self.std.to(x) + self.mean.to(x)

    def draw_fn(self) -> Callable[[torch.Generator], Tensor]:
        return functools.partial(_draw_rows, self.train_data, self.positives_per_step)

    def real_samples(self, n: int, split: str = "train", seed: int = 0) -> tuple[Tensor, None]:
        """min(n, rows) distinct rows of a split, in standardised units -> ([m, D], None).

        "val" and "test" both mean the held-out rows. Rows are never repeated: a sample-based metric
        would read repeats as a perfect match.
        """
        stream = split_stream(split)
        rows = self.train_data if split == "train" else self.test_data
        if rows.shape[0] == 0:
            raise ValueError(f"{self.path}: no held-out rows for split {split!r}; set test_fraction > 0")
        perm = torch.randperm(rows.shape[0], generator=torch_generator(self.seed, stream, seed))
        return rows[perm[:n]].clone(), None
