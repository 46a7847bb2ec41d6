"""DriftingModule: one training step's data flow, guidance weights, EMA, sampling, non-finite loss policy."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset

from drifting_lightning.drift import DriftingLoss
from drifting_lightning.models.mlp import MLPGenerator
from drifting_lightning.module import DriftingModule, NonFiniteLossError
from drifting_lightning.sampling.guidance import GuidanceSampler


class _Batches(IterableDataset):
    def __init__(self, batch: dict, steps: int) -> None:
        self.batch, self.steps = batch, steps

    def __iter__(self):
        for _ in range(self.steps):
            yield self.batch


def _trainer(tmp_path: Path, steps: int) -> pl.Trainer:
    return pl.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)


def _conditional_batch(groups: int = 3, pos: int = 5, unc: int = 4) -> dict:
    g = torch.Generator().manual_seed(0)
    return {"positives": torch.randn(groups, pos, 2, generator=g), "labels": torch.arange(groups),
            "unconditional": torch.randn(groups, unc, 2, generator=g)}


def _detach_from_loop(module: DriftingModule) -> None:
    """Call training_step outside a fit loop: a trainer for the strategy, logging switched off."""
    module.trainer = pl.Trainer(accelerator="cpu", logger=False)
    module.log = module.log_dict = lambda *args, **kwargs: None


def test_training_step_passes_guidance_weights_to_the_loss():
    seen = {}

    class Spy(DriftingLoss):
        def forward(self, gen, pos, neg=None, neg_weights=None):
            seen.update(gen={k: v.shape for k, v in gen.items()}, neg=None if neg is None else neg["raw"].shape,
                        w=neg_weights)
            return super().forward(gen, pos, neg, neg_weights)

    module = DriftingModule(MLPGenerator(num_classes=3), loss=Spy(), guidance=GuidanceSampler(alpha_min=2.0,
                            alpha_max=2.0), generated_per_group=6)
    _detach_from_loop(module)
    module.training_step(_conditional_batch(), 0)
    assert seen["gen"]["raw"] == (3, 6, 1, 2)
    assert seen["neg"] == (3, 4, 1, 2)
    # w = (alpha - 1)(N_neg - 1) / N_unc = 1 * 5 / 4 for alpha = 2
    torch.testing.assert_close(seen["w"], torch.full((3,), 1.25))


def test_without_guidance_unconditional_samples_are_ignored():
    seen = {}

    class Spy(DriftingLoss):
        def forward(self, gen, pos, neg=None, neg_weights=None):
            seen["neg"] = neg
            return super().forward(gen, pos, neg, neg_weights)

    module = DriftingModule(MLPGenerator(num_classes=3), loss=Spy(), generated_per_group=4)
    _detach_from_loop(module)
    module.training_step(_conditional_batch(), 0)
    assert seen["neg"] is None


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


def test_sample_is_class_balanced_and_reproducible():
    module = DriftingModule(MLPGenerator(num_classes=4))
    a = module.sample(8, generator=torch.Generator().manual_seed(3))
    b = module.sample(8, generator=torch.Generator().manual_seed(3))
    assert a.shape == (8, 2)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    labels = torch.arange(8) % 4
    c = module.sample(8, labels=labels, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, c, rtol=0, atol=0)


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
    before = [p.detach().clone() for p in module.generator.parameters()]
    batch = {"positives": torch.randn(1, 8, 2)}
    _trainer(tmp_path, 2).fit(module, DataLoader(_Batches(batch, 2), batch_size=None))
    assert all(torch.equal(a, b) for a, b in zip(module.generator.parameters(), before))


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="generated_per_group"):
        DriftingModule(MLPGenerator(), generated_per_group=0)
    with pytest.raises(ValueError, match="ema_decay"):
        DriftingModule(MLPGenerator(), ema_decay=1.0)
