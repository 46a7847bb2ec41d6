"""Where each step's real samples come from (PAPER.md section 6): class groups of positives + unconditional reals.

A ``PositiveSource`` works on dataset indices only. Per step it returns ``labels [Nc]``, ``pos_idx [Nc, Npos]``
(every index of row g has label ``labels[g]``) and ``unc_idx [Nc, Nunc]`` (any class, the negatives that carry the
guidance weight of PAPER.md section 5). Two sources, picked by name (``--data.positives ClassQueue``):

- ``ClassAwareSampler``: the class-aware loader the paper calls the more principled design (default).
- ``ClassQueue``: the paper's MoCo-style per-class queue (128 per class, 1000 unconditional, push 64 per step).

Randomness is counter-based: the draw of step s comes from generators seeded by (seed, stream, s, key), so the
state of a stream is its step counter (plus the queue contents for ``ClassQueue``), a resume continues it exactly,
and any process can replay it. Labels come from a stream shared by all ranks and are split between ranks, so a
class group never spans ranks and ranks get different labels whenever Nc * world_size <= num_classes. A group's
items come from its own generator, keyed by the group's index in the global batch (rank r holds groups r Nc to
r Nc + Nc - 1): when Nc * world_size <= num_classes, the global batch of a step is the same for every split of
its groups over ranks (2 ranks x 5 groups draw what 1 rank x 10 groups draws).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from drifting_lightning.rng import numpy_generator

log = logging.getLogger(__name__)

# Stream tags of this module's keys (seed, stream, step, rank or global group); see drifting_lightning.rng.
_LABELS, _INDICES, _PUSH_ORDER, _QUEUE_FILL = 0, 1, 2, 3


class PositiveDraw(NamedTuple):
    """One step's indices: labels [Nc], pos_idx [Nc, Npos], unc_idx [Nc, Nunc] (all int64)."""

    labels: Tensor
    pos_idx: Tensor
    unc_idx: Tensor


class PositiveSource:
    """Base class: per step, ``classes_per_step`` class groups of ``positives_per_class`` real items of the
    group's class and ``unconditional_per_class`` real items of any class.

    Call ``setup(labels, ...)`` once with the dataset's label array, then ``draw()`` once per training step.
    """

    def __init__(
        self, classes_per_step: int = 10, positives_per_class: int = 32, unconditional_per_class: int = 0, seed: int = 0
    ) -> None:
        for name, value, low in (
            ("classes_per_step", classes_per_step, 1),
            ("positives_per_class", positives_per_class, 1),
            ("unconditional_per_class", unconditional_per_class, 0),
            ("seed", seed, 0),
        ):
            if int(value) != value or value < low:
                raise ValueError(f"{self.kind}: {name} must be an integer >= {low}, got {value!r}")
        self.classes_per_step = int(classes_per_step)
        self.positives_per_class = int(positives_per_class)
        self.unconditional_per_class = int(unconditional_per_class)
        self.seed = int(seed)
        self.step = 0
        self.rank, self.world_size = 0, 1
        self.num_classes = 0
        self.small_classes: list[int] = []
        self._labels: np.ndarray | None = None  # [N] label of every dataset index
        self._order: np.ndarray | None = None  # dataset indices sorted by label
        self._offsets: np.ndarray | None = None  # class c owns _order[_offsets[c]:_offsets[c + 1]]

    @property
    def kind(self) -> str:
        """The class name (jsonargparse's ``lazy_instance``, used for defaults, subclasses as LazyInstance_<name>)."""
        mro = type(self).__mro__
        return next(
            c.__name__ for c in mro if issubclass(c, PositiveSource) and not c.__name__.startswith("LazyInstance_")
        )

    def setup(
        self,
        labels: Sequence[int] | np.ndarray | Tensor,
        num_classes: int | None = None,
        rank: int = 0,
        world_size: int = 1,
        class_names: Sequence[str] | None = None,
    ) -> None:
        """Index the dataset by class. labels: [N] ints in [0, num_classes). Raises on an empty class.

        Classes with fewer than ``positives_per_class`` items get their positives with replacement; they are
        listed once, in a warning on rank 0.
        """
        labels = np.asarray(labels.cpu() if isinstance(labels, Tensor) else labels).astype(np.int64).reshape(-1)
        if labels.size == 0:
            raise ValueError(f"{self.kind}.setup: the dataset has no items")
        num_classes = int(labels.max()) + 1 if num_classes is None else int(num_classes)
        if labels.min() < 0 or labels.max() >= num_classes:
            raise ValueError(f"labels must lie in [0, {num_classes}), got [{labels.min()}, {labels.max()}]")
        if not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        counts = np.bincount(labels, minlength=num_classes)
        name = (lambda c: f"{c} ({class_names[c]!r})") if class_names is not None else str
        empty = [name(c) for c in np.flatnonzero(counts == 0)]
        if empty:
            raise ValueError(
                f"class {', '.join(empty)} has no items: every class in the label set needs at least one image "
                "(remove the empty class folder or add images to it)"
            )
        first_setup = self._order is None
        self.rank, self.world_size, self.num_classes = int(rank), int(world_size), num_classes
        self._labels = labels
        self._order = np.argsort(labels, kind="stable")
        self._offsets = np.concatenate([[0], np.cumsum(counts)])
        self.small_classes = np.flatnonzero(counts < self.positives_per_class).tolist()
        if first_setup and self.small_classes and self.rank == 0:
            log.warning(
                "%s: %d class(es) have fewer than positives_per_class=%d items, their positives are drawn with "
                "replacement: %s",
                self.kind,
                len(self.small_classes),
                self.positives_per_class,
                ", ".join(f"{name(c)}: {counts[c]} items" for c in self.small_classes),
            )
        self._after_setup()

    def _after_setup(self) -> None:
        """What a subclass prepares once the dataset is indexed by class (nothing here)."""

    @property
    def num_items(self) -> int:
        return 0 if self._offsets is None else int(self._offsets[-1])

    def members(self, c: int) -> np.ndarray:
        """Dataset indices of class c, ascending."""
        self._check_setup()
        return self._order[self._offsets[c] : self._offsets[c + 1]]

    def rng(self, stream: int, step: int, shared: bool = False) -> np.random.Generator:
        """The generator of ``stream`` at ``step``: the same on every rank if ``shared``, else this rank's own.

        Streams 0-99 are this module's; consumers tying other randomness to the step (image flips) use >= 100.
        """
        return numpy_generator(self.seed, stream, step, 0 if shared else self.rank)

    def group_rngs(self, stream: int, step: int) -> list[np.random.Generator]:
        """One generator per class group of this rank at ``step``, keyed by the group's index in the global batch,
        so that a group's draw does not depend on how many ranks share the batch."""
        first = self.rank * self.classes_per_step
        return [numpy_generator(self.seed, stream, step, first + g) for g in range(self.classes_per_step)]

    def draw(self) -> PositiveDraw:
        """The next step's indices (advances the stream by one step)."""
        raise NotImplementedError

    def skip(self, steps: int) -> None:
        """Advance the stream by ``steps`` steps without returning them (same state as ``steps`` draws)."""
        for _ in range(steps):
            self.draw()

    def step_labels(self, step: int) -> np.ndarray:
        """This rank's Nc labels at ``step``: disjoint slices of one shared permutation when Nc * world_size <=
        num_classes, else a per-rank permutation (distinct labels within the rank while Nc <= num_classes)."""
        nc, c, r = self.classes_per_step, self.num_classes, self.rank
        if nc * self.world_size <= c:
            return self.rng(_LABELS, step, shared=True).permutation(c)[r * nc : (r + 1) * nc]
        rng = self.rng(_LABELS, step)
        return np.concatenate([rng.permutation(c) for _ in range(-(-nc // c))])[:nc]

    @staticmethod
    def choose(n: int, k: int, rng: np.random.Generator) -> np.ndarray:
        """k positions in range(n), distinct when n >= k; else every position once plus random repeats."""
        if n >= k:
            return rng.choice(n, k, replace=False)
        return rng.permutation(np.concatenate([np.arange(n), rng.integers(n, size=k - n)]))

    def state_dict(self) -> dict[str, Any]:
        """The stream position. With counter-based generators (seed, step) is the whole RNG state."""
        return {"kind": self.kind, "seed": self.seed, "step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._check_kind(state)
        self.seed, self.step = int(state["seed"]), int(state["step"])

    def _check_kind(self, state: dict[str, Any]) -> None:
        kind = state.get("kind")
        if kind != self.kind:
            raise ValueError(
                f"cannot load a {kind} state into {self.kind}: the checkpoint used another "
                "positive source (set data.positives to the one it was trained with)"
            )

    def _check_setup(self) -> None:
        if self._order is None:
            raise RuntimeError(f"{self.kind}: call setup(labels) before drawing")

    def __repr__(self) -> str:
        return (
            f"{self.kind}(classes_per_step={self.classes_per_step}, "
            f"positives_per_class={self.positives_per_class}, "
            f"unconditional_per_class={self.unconditional_per_class}, seed={self.seed})"
        )


class ClassAwareSampler(PositiveSource):
    """Class-aware batches straight from the dataset: per step Nc labels, for each label Npos distinct items of
    that class (with replacement only for classes smaller than Npos) and Nunc distinct items drawn uniformly
    from the whole dataset."""

    def draw(self) -> PositiveDraw:
        self._check_setup()
        labels = self.step_labels(self.step)
        pos, unc = [], []
        for c, rng in zip(labels, self.group_rngs(_INDICES, self.step), strict=True):
            members = self.members(c)
            pos.append(members[self.choose(len(members), self.positives_per_class, rng)])
            unc.append(self.choose(self.num_items, self.unconditional_per_class, rng))
        self.step += 1
        return _as_draw(labels, pos, unc)

    def skip(self, steps: int) -> None:
        self.step += steps


class ClassQueue(PositiveSource):
    """The paper's MoCo-style queues (A.8): one FIFO of ``queue_size`` items per class and one global
    unconditional FIFO of ``unconditional_queue_size`` items.

    Each step first pushes ``push_per_step`` fresh real items (the next ones of a shuffled pass over the data,
    reshuffled every pass) into their class queue and the unconditional queue, oldest evicted first, then samples
    each group's positives without replacement from the distinct items of its label's queue (with replacement only
    if it holds fewer than Npos) and its unconditional items the same way from the unconditional queue. Queues are
    filled at set-up, so the first steps are valid. The queues are global: the pushes come from the stream shared
    by all ranks, so every rank holds the same queues and the state saved by rank 0 restores every rank.

    Sizing across ranks: ``push_per_step`` and the queue sizes are per run, not per rank, so the same values give
    the same queue dynamics on any number of ranks (while every rank draws its Nc groups from them). Queues kept
    per host, as in the authors' code, take in push x hosts items per step, which is why they raise the push on
    fewer hosts; to match such a run of H hosts, set ``push_per_step`` to H times its per-host push.
    """

    def __init__(
        self,
        classes_per_step: int = 10,
        positives_per_class: int = 32,
        unconditional_per_class: int = 0,
        queue_size: int = 128,
        unconditional_queue_size: int = 1000,
        push_per_step: int = 64,
        seed: int = 0,
    ) -> None:
        super().__init__(classes_per_step, positives_per_class, unconditional_per_class, seed)
        for name, value in (
            ("queue_size", queue_size),
            ("unconditional_queue_size", unconditional_queue_size),
            ("push_per_step", push_per_step),
        ):
            if int(value) != value or value < 1:
                raise ValueError(f"ClassQueue: {name} must be an integer >= 1, got {value!r}")
        if queue_size < positives_per_class:
            log.warning(
                "ClassQueue: queue_size=%d < positives_per_class=%d, positives always repeat",
                queue_size,
                positives_per_class,
            )
        self.queue_size = int(queue_size)
        self.unconditional_queue_size = int(unconditional_queue_size)
        self.push_per_step = int(push_per_step)
        self.pushed = 0  # items taken so far from the shuffled passes over the data
        self.queues = np.zeros((0, self.queue_size), dtype=np.int64)  # [C, queue_size] ring buffers
        self.queue_len = np.zeros(0, dtype=np.int64)  # [C] items held
        self.queue_pos = np.zeros(0, dtype=np.int64)  # [C] next write position
        self.unc_queue = np.zeros(self.unconditional_queue_size, dtype=np.int64)
        self.unc_len = 0
        self.unc_pos = 0
        self._pass: tuple[int, np.ndarray] | None = None  # cache: (pass number, its permutation)

    def _after_setup(self) -> None:
        # Every queue starts full of random items of its class (the same on every rank).
        self._pass = None
        rng = self.rng(_QUEUE_FILL, 0, shared=True)
        self.queues = np.zeros((self.num_classes, self.queue_size), dtype=np.int64)
        self.queue_len = np.zeros(self.num_classes, dtype=np.int64)
        for c in range(self.num_classes):
            members = self.members(c)
            k = min(self.queue_size, len(members))
            self.queues[c, :k] = members[rng.choice(len(members), k, replace=False)]
            self.queue_len[c] = k
        self.queue_pos = self.queue_len % self.queue_size
        k = min(self.unconditional_queue_size, self.num_items)
        self.unc_queue[:] = 0
        self.unc_queue[:k] = rng.choice(self.num_items, k, replace=False)
        self.unc_len, self.unc_pos = k, k % self.unconditional_queue_size

    def fresh_items(self, n: int) -> np.ndarray:
        """The next n items of the shuffled passes over the data (advances ``pushed``)."""
        out = []
        while n > 0:
            number, offset = divmod(self.pushed, self.num_items)
            if self._pass is None or self._pass[0] != number:
                self._pass = (number, self.rng(_PUSH_ORDER, number, shared=True).permutation(self.num_items))
            take = self._pass[1][offset : offset + n]
            out.append(take)
            self.pushed += len(take)
            n -= len(take)
        return np.concatenate(out)

    def push(self, items: np.ndarray) -> None:
        """Enqueue items in order into their class queues and the unconditional queue, evicting the oldest."""
        for i, c in zip(items.tolist(), self._labels[items].tolist()):
            self.queues[c, self.queue_pos[c]] = i
            self.queue_pos[c] = (self.queue_pos[c] + 1) % self.queue_size
            self.queue_len[c] = min(self.queue_len[c] + 1, self.queue_size)
        u = self.unconditional_queue_size
        self.unc_pos = (self.unc_pos + max(0, len(items) - u)) % u  # items evicted within this very push
        for i in items[-u:].tolist():
            self.unc_queue[self.unc_pos] = i
            self.unc_pos = (self.unc_pos + 1) % u
        self.unc_len = min(self.unc_len + len(items), u)

    def queue(self, c: int) -> np.ndarray:
        """The items held for class c, oldest first."""
        held, pos = int(self.queue_len[c]), int(self.queue_pos[c])
        return np.roll(self.queues[c], -pos) if held == self.queue_size else self.queues[c, :held].copy()

    def draw(self) -> PositiveDraw:
        self._check_setup()
        self.push(self.fresh_items(self.push_per_step))
        labels = self.step_labels(self.step)
        # A queue may hold an item twice (pushed again before it left): sample among the distinct items.
        unc_pool = np.unique(self.unc_queue[: self.unc_len])
        pos, unc = [], []
        for c, rng in zip(labels, self.group_rngs(_INDICES, self.step), strict=True):
            pool = np.unique(self.queues[c, : self.queue_len[c]])
            pos.append(pool[self.choose(len(pool), self.positives_per_class, rng)])
            unc.append(unc_pool[self.choose(len(unc_pool), self.unconditional_per_class, rng)])
        self.step += 1
        return _as_draw(labels, pos, unc)

    def skip(self, steps: int) -> None:
        self._check_setup()
        for _ in range(steps):  # sampling changes no state: only the pushes need replaying
            self.push(self.fresh_items(self.push_per_step))
            self.step += 1

    def state_dict(self) -> dict[str, Any]:
        """Step, items pushed so far, and the queues (contents, fill levels, write positions) as tensors."""
        self._check_setup()
        return {
            **super().state_dict(),
            "pushed": self.pushed,
            "queues": torch.from_numpy(self.queues.copy()),
            "queue_len": torch.from_numpy(self.queue_len.copy()),
            "queue_pos": torch.from_numpy(self.queue_pos.copy()),
            "unc_queue": torch.from_numpy(self.unc_queue.copy()),
            "unc_len": self.unc_len,
            "unc_pos": self.unc_pos,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._check_setup()
        self._check_kind(state)
        expected = {"queues": tuple(self.queues.shape), "unc_queue": tuple(self.unc_queue.shape)}
        found = {k: tuple(state[k].shape) for k in expected}
        if found != expected:
            raise ValueError(
                f"ClassQueue state does not fit this set-up: saved shapes {found}, expected {expected} "
                "(num_classes, queue_size and unconditional_queue_size must match the checkpoint)"
            )
        super().load_state_dict(state)
        self.pushed = int(state["pushed"])
        self.queues = state["queues"].numpy().astype(np.int64).copy()
        self.queue_len = state["queue_len"].numpy().astype(np.int64).copy()
        self.queue_pos = state["queue_pos"].numpy().astype(np.int64).copy()
        self.unc_queue = state["unc_queue"].numpy().astype(np.int64).copy()
        self.unc_len, self.unc_pos = int(state["unc_len"]), int(state["unc_pos"])

    def __repr__(self) -> str:
        return (
            f"{super().__repr__()[:-1]}, queue_size={self.queue_size}, "
            f"unconditional_queue_size={self.unconditional_queue_size}, push_per_step={self.push_per_step})"
        )


def _as_draw(labels: np.ndarray, pos: list[np.ndarray], unc: list[np.ndarray]) -> PositiveDraw:
    return PositiveDraw(
        torch.as_tensor(labels, dtype=torch.long),
        torch.as_tensor(np.stack(pos), dtype=torch.long),
        torch.as_tensor(np.stack(unc), dtype=torch.long),
    )
