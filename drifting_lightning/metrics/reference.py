"""Reference (real-data) statistics for the Frechet distance: computed once, cached, or read from an ADM .npz.

The cache file ``ref_<sha>.npz`` holds ``mu`` and ``sigma`` (the keys of ADM's reference batches, so both load
the same way) plus the fingerprint as JSON. The sha hashes everything that made the statistics: the extractor
name, the number of samples and a fingerprint of the data (``files_fingerprint`` or ``content_fingerprint``);
changed data gives a new hash and the statistics are recomputed.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from drifting_lightning.files import atomic_write
from drifting_lightning.metrics.frechet import FeatureMoments
from drifting_lightning.metrics.npz import open_npz


def files_fingerprint(paths: Iterable[str | os.PathLike]) -> dict[str, list[int]]:
    """{file name: [size in bytes, mtime in ns]} of the data files: cheap, and changes whenever they do."""
    return {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in sorted(Path(p) for p in paths)}


def content_fingerprint(samples: Tensor) -> str:
    """sha256 of the bytes of a sample tensor (e.g. the first 1000 samples) for data without files."""
    return hashlib.sha256(samples.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


def describe(extractor_name: str, n: int, fingerprint: dict) -> str:
    """Canonical JSON of what makes a set of reference statistics; its sha256 names the cache file."""
    return json.dumps({"extractor": extractor_name, "n": n, "data": fingerprint}, sort_keys=True, default=str)


def load_reference_npz(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """(mu [F], sigma [F, F]) float64 from an ADM-style reference .npz (or a cache file of ours)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"reference statistics file {path} does not exist")
    with open_npz(path, "reference statistics file") as f:
        missing = [k for k in ("mu", "sigma") if k not in f.files]
        if missing:
            raise KeyError(f"{path} lacks key(s) {missing} (it has {sorted(f.files)}); expected ADM-style mu and sigma")
        mu, sigma = f["mu"].astype(np.float64), f["sigma"].astype(np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"{path}: mu {list(mu.shape)} and sigma {list(sigma.shape)} are not [F] and [F, F]")
    return mu, sigma


def save_reference_npz(path: str | os.PathLike, mu: np.ndarray, sigma: np.ndarray, **extra: str) -> Path:
    """Write mu, sigma (+ string metadata) atomically: temporary file beside ``path``, then rename."""
    path = Path(path)
    with atomic_write(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, mu=mu, sigma=sigma, **{k: np.array(v) for k, v in extra.items()})
    return path


def compute_statistics(
    samples_fn: Callable[[], Iterable[Tensor]], n: int, extractor: Callable[[Tensor], Tensor] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) float64 of the first n samples of ``samples_fn()`` (batches [B, ...], features if no extractor)."""
    moments = FeatureMoments()
    for batch in samples_fn():
        batch = batch[: n - moments.n]
        with torch.no_grad():
            moments.add(extractor(batch) if extractor is not None else batch)
        if moments.n >= n:
            break
    if moments.n < n:
        raise ValueError(f"reference statistics need n={n} samples but the data gave only {moments.n}; lower n")
    mu, sigma = moments.statistics()
    return mu.cpu().numpy(), sigma.cpu().numpy()


def reference_statistics(
    extractor_name: str,
    samples_fn: Callable[[], Iterable[Tensor]],
    n: int,
    cache_dir: str | os.PathLike,
    fingerprint: dict,
    extractor: Callable[[Tensor], Tensor] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(mu [F], sigma [F, F]) of n real samples, read from ``cache_dir/ref_<sha>.npz`` or computed and cached.

    ``samples_fn()`` yields batches of samples (passed through ``extractor``) or of features [B, F] (no
    extractor); it is called only on a cache miss. Safe when several ranks miss at once (atomic writes), but
    cheaper when rank 0 computes and the others wait at a barrier.
    """
    what = describe(extractor_name, n, fingerprint)
    path = Path(cache_dir) / f"ref_{hashlib.sha256(what.encode()).hexdigest()[:16]}.npz"
    if path.is_file():
        return load_reference_npz(path)
    mu, sigma = compute_statistics(samples_fn, n, extractor)
    save_reference_npz(path, mu, sigma, fingerprint=what)
    return mu, sigma
