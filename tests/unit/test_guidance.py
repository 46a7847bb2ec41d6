"""Guidance (PAPER.md 5): alpha ~ alpha^-k on [1, 4] and the weight w of the unconditional negatives."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from drifting_lightning.sampling.guidance import GuidanceSampler, guidance_weight


def _power_law_cdf(k: float, lo: float, hi: float):
    e = 1.0 - k
    return lambda a: (a**e - lo**e) / (hi**e - lo**e)


@pytest.mark.parametrize("k", [3.0, 5.0, 1.0, 0.0])
def test_alpha_follows_the_truncated_power_law(k: float):
    alpha = GuidanceSampler(power=k).sample(20000, generator=torch.Generator().manual_seed(0)).double().numpy()
    assert alpha.min() >= 1.0 and alpha.max() <= 4.0
    cdf = (lambda a: np.log(a) / np.log(4.0)) if k == 1.0 else _power_law_cdf(k, 1.0, 4.0)
    assert stats.kstest(alpha, cdf).pvalue > 0.01


def test_a_wrong_power_is_detected_by_the_same_test():
    alpha = GuidanceSampler(power=3.0).sample(20000, generator=torch.Generator().manual_seed(0)).double().numpy()
    assert stats.kstest(alpha, _power_law_cdf(5.0, 1.0, 4.0)).pvalue < 1e-6


def test_unguided_mixture_puts_mass_q_at_one():
    alpha = GuidanceSampler(power=3.0, p_unguided=0.5).sample(20000, generator=torch.Generator().manual_seed(1))
    share = (alpha == 1.0).float().mean().item()
    assert abs(share - 0.5) < 0.02


def test_guidance_weight_formula():
    alpha = torch.tensor([1.0, 2.0, 4.0])
    # w = (alpha - 1)(N_neg - 1) / N_unc with N_neg = 64, N_unc = 16
    torch.testing.assert_close(guidance_weight(alpha, 64, 16), torch.tensor([0.0, 63 / 16, 3 * 63 / 16]))


def test_bad_arguments():
    with pytest.raises(ValueError, match="alpha_min"):
        GuidanceSampler(alpha_min=0.5)
    with pytest.raises(ValueError, match="p_unguided"):
        GuidanceSampler(p_unguided=1.5)
    with pytest.raises(ValueError, match="n_unconditional"):
        guidance_weight(torch.ones(2), 8, 0)
