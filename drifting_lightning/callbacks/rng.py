"""The random stream of the training steps, saved in checkpoints so that a resumed run draws what the uninterrupted
one would have drawn."""

from __future__ import annotations

import random
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn


class TrainingRNG(Callback):
    """The random stream of the training steps, kept apart from everything else and saved in checkpoints.

    Each step starts from the global RNG state (torch, this process's CUDA device, numpy, random) in which the
    previous step ended. Whatever draws between steps (DataLoader iterators at an epoch start, plotting callbacks)
    therefore changes nothing in training, and a resumed run makes exactly the global draws of the uninterrupted one
    (dropout in a plug-in generator, say; DriftingModule's noise and guidance scales come from generators keyed by
    seed, step and group). The checkpoint holds one state per process (rank).
    """

    def __init__(self) -> None:
        self._state: dict[str, Any] | None = None  # where the last training step left the RNGs
        self._loaded: list[dict[str, Any] | None] | None = None  # per rank, from a checkpoint

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._loaded is None:
            return
        rank = trainer.global_rank
        if rank < len(self._loaded):
            self._state = _from_portable(self._loaded[rank])
        else:
            saved = len(self._loaded)
            rank_zero_warn(f"the checkpoint holds the random states of {saved} processes, this run has "
                           f"{trainer.world_size}: ranks {saved} and up start new random streams")  # fmt: skip

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int):
        if self._state is not None:
            _set_rng_state(self._state, pl_module.device)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:  # fmt: skip
        self._state = _rng_state(pl_module.device)

    def state_dict(self) -> dict[str, Any]:
        if self._state is None and self._loaded is not None:  # saved again before the first resumed step
            return {"ranks": self._loaded}
        mine = None if self._state is None else _to_portable(self._state)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            ranks: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(ranks, mine)
            return {"ranks": ranks}
        return {"ranks": [mine]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loaded = list(state_dict.get("ranks", []))


def _rng_state(device: torch.device) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


# Checkpoints hold tensors and plain Python values only, so that they load with torch.load(weights_only=True).
def _to_portable(state: dict[str, Any]) -> dict[str, Any]:
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    return {**state, "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss]}


def _from_portable(state: dict[str, Any] | None) -> dict[str, Any] | None:
    if state is None:
        return None
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    version, internal, gauss_next = state["python"]
    return {**state, "numpy": (kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss),
            "python": (version, tuple(internal), gauss_next)}  # fmt: skip
