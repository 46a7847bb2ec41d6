"""DriftingModule: one training step's data flow, guidance weights, EMA, sampling, non-finite loss policy."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from drifting_lightning.drift import DriftingLoss
from drifting_lightning.models.mlp import MLPGenerator
from drifting_lightning.module import DriftingModule
from drifting_lightning.sampling.guidance import GuidanceSampler


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


def test_sample_is_class_balanced_and_reproducible():
    module = DriftingModule(MLPGenerator(num_classes=4))
    a = module.sample(8, generator=torch.Generator().manual_seed(3))
    b = module.sample(8, generator=torch.Generator().manual_seed(3))
    assert a.shape == (8, 2)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    labels = torch.arange(8) % 4
    c = module.sample(8, labels=labels, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, c, rtol=0, atol=0)


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="generated_per_group"):
        DriftingModule(MLPGenerator(), generated_per_group=0)
    with pytest.raises(ValueError, match="ema_decay"):
        DriftingModule(MLPGenerator(), ema_decay=1.0)
