"""A callback the distributed tests add to `drifting fit` runs (by class path) to see inside every rank."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch.distributed.tensor import DTensor


class DistributedProbe(pl.Callback):
    """Writes ``<out>/rank<r>.json`` at the end of training: how the generator's parameters are held on this rank
    (DTensor or not, local and full element counts) and the unclipped gradient norm of every step. With
    ``die_rank`` set, that rank ends its process abruptly (``os._exit``, no clean-up, as a killed or crashed
    worker would) when training step ``die_step`` starts. With ``nan_rank`` set, that rank's generator outputs NaN
    in batch ``nan_batch`` of the epoch (so its drift loss is NaN there), and the report holds a digest of the
    generator's and the EMA's weights after every batch."""

    def __init__(self, out: str, die_rank: int | None = None, die_step: int = 1, nan_rank: int | None = None,
                 nan_batch: int = 1) -> None:  # fmt: skip
        self.out, self.die_rank, self.die_step = Path(out), die_rank, die_step
        self.nan_rank, self.nan_batch, self.batch_idx = nan_rank, nan_batch, -1
        self.grad_norms: list[float] = []
        self.digests: list[list[str]] = []

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if trainer.global_rank != self.nan_rank:
            return

        def poison(module: torch.nn.Module, args: Any, x: torch.Tensor) -> torch.Tensor:
            return x * float("nan") if self.batch_idx == self.nan_batch else x

        pl_module.generator.register_forward_hook(poison)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
                             ) -> None:  # fmt: skip
        self.batch_idx = batch_idx
        if trainer.global_rank == self.die_rank and trainer.global_step == self.die_step:
            os._exit(17)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if self.nan_rank is not None:
            self.digests.append([_digest(pl_module.generator), _digest(pl_module.ema_generator)])

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        # Gathering a sharded gradient is a collective: every rank runs this hook.
        grads = [p.grad for p in pl_module.generator.parameters() if p.grad is not None]
        full = [g.full_tensor() if isinstance(g, DTensor) else g for g in grads]
        self.grad_norms.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in full])).item())

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        params = list(pl_module.generator.parameters())
        local = [p.to_local() if isinstance(p, DTensor) else p for p in params]
        report = {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "dtensor": [isinstance(p, DTensor) for p in params],
            "local_numel": sum(t.numel() for t in local),
            "numel": sum(p.numel() for p in params),
            "ema_numel": sum(p.numel() for p in pl_module.ema_generator.parameters()),
            "grad_norms": self.grad_norms,
            "digests": self.digests,
        }
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(report))


def _digest(module: torch.nn.Module) -> str:
    """SHA-256 of the module's whole parameters (gathered when sharded: a collective, every rank calls it)."""
    params = [p.full_tensor() if isinstance(p, DTensor) else p for p in module.parameters()]
    return hashlib.sha256(torch.cat([p.detach().flatten() for p in params]).numpy().tobytes()).hexdigest()
