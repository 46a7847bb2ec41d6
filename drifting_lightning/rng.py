"""Counter-based randomness: every random stream of training is named by a key, a tuple of non-negative ints.

A key is (seed, stream tag, counters...), e.g. (seed, step, batch_idx, global group) for a class group's noise, and
its stream depends on nothing else: not on the order of earlier draws, the number of ranks or dataloader workers,
or whether the run was resumed. That is what makes a resumed run bitwise equal to the uninterrupted one and a run on
2 ranks equal to one rank on the same global batch. Both kinds of generator are drawn from
``numpy.random.SeedSequence(key)``: numpy's as ``default_rng(key)``, torch's seeded with its first 64 bits.

The seed rule (which seed keys what):
- the generator's noise and guidance scales: the run's seed (``seed_everything``, i.e. ``--seed_everything``), rank
  0's value broadcast to every rank (``DriftingModule.on_fit_start``);
- the data: the DataModule's own ``seed`` (toy and vector streams) and the positive source's ``seed`` (which real
  items each step shows). They are separate on purpose, so that one data set (and its held-out split) can be kept
  while the model's noise changes, and the other way round.
Stream tags keep the streams that share a seed apart: the tags of each user are listed where it keys its streams
(``sampling/positives.py``, ``data/stream.py``).
"""

from __future__ import annotations

import numpy as np
import torch


def seed_of(*key: int) -> int:
    """A 64-bit torch seed for ``key``: the first two 32-bit words of ``SeedSequence(key)``."""
    state = np.random.SeedSequence([int(k) for k in key]).generate_state(2, dtype=np.uint32)
    return int(state[0]) << 32 | int(state[1])


def torch_generator(
    *key: int, device: torch.device | str = "cpu", reuse: torch.Generator | None = None
) -> torch.Generator:
    """A torch generator at the start of ``key``'s stream, on ``device``; ``reuse`` (a generator on that device) is
    re-seeded instead of building a new one, which on a GPU saves an allocation per stream."""
    generator = reuse if reuse is not None else torch.Generator(device=device)
    return generator.manual_seed(seed_of(*key))


def numpy_generator(*key: int) -> np.random.Generator:
    """A numpy generator at the start of ``key``'s stream (``np.random.default_rng(key)``)."""
    return np.random.default_rng([int(k) for k in key])
