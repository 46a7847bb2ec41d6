"""Parameters rebuilt from a few numbers instead of committed: the MAE fixtures' weights.

A random model's weights are megabytes that compress to nothing. Instead the fixture tool (in the JAX venv) stores a
spec, every leaf's shape and its initialiser's mean and standard deviation, replaces the weights by ``values(spec)``
(same shapes and statistics, SplitMix64 of integer counters: bit-identical on any machine) before running the
authors' code, and the tests write the same values into an artifact of the authors' format with
``write_flax_msgpack``. Pure numpy and msgpack: imported by tools/official_encoder_fixtures.py and by
tests/unit/test_official_encoder.py.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

Tree = dict[str, Any]


def spec_of(tree: Tree) -> Tree:
    """Each leaf array of ``tree`` as {"shape", "mean", "std"} (float64 statistics of its values)."""
    out: Tree = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out[key] = spec_of(value)
        else:
            a = np.asarray(value, np.float64)
            out[key] = {"shape": list(a.shape), "mean": float(a.mean()), "std": float(a.std())}
    return out


def values(spec: Tree) -> Tree:
    """float32 arrays exactly representable in bfloat16: mean + std x (uniform with unit variance), the uniform
    numbers from SplitMix64 of (leaf number in sorted key order, index)."""
    return _values(spec, itertools.count())


def _values(spec: Tree, counter: Iterator[int]) -> Tree:
    out: Tree = {}
    for key in sorted(spec):
        leaf = spec[key]
        if "shape" not in leaf:
            out[key] = _values(leaf, counter)
            continue
        i = next(counter)
        n = int(np.prod(leaf["shape"], dtype=np.int64))
        unit = (_splitmix64(np.arange(n, dtype=np.uint64) + np.uint64(i << 40)) / 2.0**64 - 0.5) * np.sqrt(12.0)
        out[key] = _bf16(leaf["mean"] + leaf["std"] * unit).reshape(leaf["shape"])
    return out


def _splitmix64(z: np.ndarray) -> np.ndarray:
    """SplitMix64's output function on uint64 counters (wrapping arithmetic), as float64 in [0, 2^64)."""
    z = z * np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return (z ^ (z >> np.uint64(31))).astype(np.float64)


def _bf16(a: np.ndarray) -> np.ndarray:
    """float32 rounded to the nearest bfloat16 (ties to even), as float32."""
    bits = a.astype(np.float32).view(np.uint32)
    bits = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) & np.uint32(0xFFFF0000)
    return bits.view(np.float32)


def write_flax_msgpack(path: Path, tree: Tree) -> None:
    """``tree`` (float32 leaves exactly representable in bfloat16) as flax ``msgpack_serialize`` writes it with
    bfloat16 leaves: ext 1 holding (shape, "bfloat16", C-order bytes)."""

    def encode(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: encode(v) for k, v in node.items()}
        a = np.ascontiguousarray(node, np.float32)
        raw = (a.view(np.uint32) >> np.uint32(16)).astype(np.uint16).tobytes()
        return msgpack.ExtType(1, msgpack.packb((list(a.shape), "bfloat16", raw)))

    Path(path).write_bytes(msgpack.packb(encode(tree)))
