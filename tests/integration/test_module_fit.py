"""DriftingModule inside a real Trainer.fit on tiny batches: weights and EMA move, the non-finite policies, and a
resume with another model config refused before loading."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset

from drifting_lightning.models.mlp import MLPGenerator
from drifting_lightning.module import DriftingModule
from drifting_lightning.step_failures import NonFiniteLossError


class _Batches(IterableDataset):
    def __init__(self, batch: dict, steps: int) -> None:
        self.batch, self.steps = batch, steps

    def __iter__(self):
        for _ in range(self.steps):
            yield self.batch


def _trainer(tmp_path: Path, steps: int) -> pl.Trainer:
    return pl.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)


def test_fit_moves_weights_and_ema_follows(tmp_path: Path):
    torch.manual_seed(0)
    module = DriftingModule(MLPGenerator(), generated_per_group=16, lr=1e-2, ema_decay=0.5)
    before = [p.detach().clone() for p in module.generator.parameters()]
    batch = {"positives": torch.randn(1, 16, 2) + 3.0}
    _trainer(tmp_path, 3).fit(module, DataLoader(_Batches(batch, 3), batch_size=None))
    after = list(module.generator.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(after, before))
    ema = list(module.ema_generator.parameters())
    moved = [(e, a, b) for e, a, b in zip(ema, after, before) if not torch.equal(a, b)]
    assert moved and all(not torch.equal(e, a) and not torch.equal(e, b) for e, a, b in moved)
    assert not any(e.requires_grad for e in ema)


class _NaNGenerator(MLPGenerator):
    def forward(self, noise, labels=None, alpha=None):
        return super().forward(noise) * float("nan")


def test_nonfinite_loss_stops_with_step_stats_and_a_checkpoint(tmp_path: Path):
    module = DriftingModule(_NaNGenerator(), generated_per_group=8)
    batch = {"positives": torch.randn(1, 8, 2)}
    with pytest.raises(NonFiniteLossError, match=r"step 0.*nonfinite-step0\.ckpt.*raw/scale"):
        _trainer(tmp_path, 2).fit(module, DataLoader(_Batches(batch, 2), batch_size=None))
    assert (tmp_path / "nonfinite-step0.ckpt").exists()


def test_nonfinite_loss_skip_policy_skips_the_step(tmp_path: Path):
    module = DriftingModule(_NaNGenerator(), generated_per_group=8, nonfinite="skip")
    with torch.no_grad():  # an EMA apart from the weights, which an update would move
        torch._foreach_add_(list(module.ema_generator.parameters()), 1.0)
    before = [p.detach().clone() for p in module.generator.parameters()]
    ema = [p.detach().clone() for p in module.ema_generator.parameters()]
    batch = {"positives": torch.randn(1, 8, 2)}
    _trainer(tmp_path, 2).fit(module, DataLoader(_Batches(batch, 2), batch_size=None))
    assert all(torch.equal(a, b) for a, b in zip(module.generator.parameters(), before))
    assert all(torch.equal(a, b) for a, b in zip(module.ema_generator.parameters(), ema))


class _Steps(IterableDataset):
    def __init__(self, steps: int = 2) -> None:
        self.steps = steps

    def __iter__(self):
        for _ in range(self.steps):
            yield {"positives": torch.randn(1, 8, 2)}


class _WeightsAfterSteps(pl.Callback):
    """The generator's weights after each optimiser step (the last batch of each accumulation)."""

    def __init__(self, accumulate: int) -> None:
        self.accumulate, self.weights = accumulate, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if (batch_idx + 1) % self.accumulate == 0:
            self.weights.append([p.detach().clone() for p in pl_module.generator.parameters()])


def test_ema_follows_optimiser_steps_under_gradient_accumulation(tmp_path: Path):
    """4 batches accumulated 2 by 2 are 2 optimiser steps, so 2 EMA updates, each toward that step's weights."""
    torch.manual_seed(0)
    module = DriftingModule(MLPGenerator(hidden=[16]), generated_per_group=8, lr=1e-2, ema_decay=0.5)
    expected = [p.detach().clone() for p in module.ema_generator.parameters()]
    steps = _WeightsAfterSteps(accumulate=2)
    trainer = pl.Trainer(max_steps=2, accumulate_grad_batches=2, accelerator="cpu", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path, callbacks=[steps])  # fmt: skip
    trainer.fit(module, DataLoader(_Steps(4), batch_size=None))
    assert trainer.global_step == 2 and len(steps.weights) == 2
    assert not any(torch.equal(a, b) for a, b in zip(*steps.weights))  # both steps moved every weight
    for weights in steps.weights:
        torch._foreach_lerp_(expected, weights, 0.5)
    assert all(torch.equal(a, b) for a, b in zip(module.ema_generator.parameters(), expected))


def test_trainer_resume_with_another_model_config_is_refused_before_loading(tmp_path: Path):
    def trainer(steps: int) -> pl.Trainer:
        return pl.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                          enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)  # fmt: skip

    first = trainer(1)
    first.fit(DriftingModule(MLPGenerator(hidden=[16]), generated_per_group=8), DataLoader(_Steps(), batch_size=None))
    first.save_checkpoint(tmp_path / "a.ckpt")
    with pytest.raises(ValueError, match=r"a\.ckpt was written by .* generator\.body\.0\.weight \[16, 32\]"):
        trainer(2).fit(DriftingModule(MLPGenerator(hidden=[24]), generated_per_group=8),
                       DataLoader(_Steps(), batch_size=None), ckpt_path=tmp_path / "a.ckpt")  # fmt: skip
