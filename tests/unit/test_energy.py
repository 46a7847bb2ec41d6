import numpy as np
import pytest
import torch

from drifting_lightning.data.toy import ToyDataModule, bimodal_centers, sample_bimodal
from drifting_lightning.metrics.energy import energy_distance, gaussian_mmd2, median_bandwidth, mode_fractions


def energy_numpy(x: np.ndarray, y: np.ndarray, unbiased: bool = False) -> float:
    """The textbook O(n^2) formula, with the full [n, m, D] difference tensor."""

    def mean_dist(a, b, drop_diagonal):
        d = np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))
        return d.sum() / (len(a) * (len(a) - 1)) if drop_diagonal else d.mean()

    return 2 * mean_dist(x, y, False) - mean_dist(x, x, unbiased) - mean_dist(y, y, unbiased)


def mmd_numpy(x: np.ndarray, y: np.ndarray, h: float) -> float:
    def k(a, b):
        return np.exp(-((a[:, None, :] - b[None, :, :]) ** 2).sum(-1) / (2 * h * h)).mean()

    return k(x, x) + k(y, y) - 2 * k(x, y)


def test_identical_sets_give_zero():
    x = torch.randn(300, 3, generator=torch.Generator().manual_seed(0))
    assert abs(energy_distance(x, x)) < 1e-12
    assert abs(gaussian_mmd2(x, x, 1.0)) < 1e-12


def test_two_point_masses():
    # X = a, Y = b: E|X-Y| = |a - b|, the within terms vanish, so the distance is 2 |a - b|.
    x = torch.tensor([[0.0, 0.0]]).repeat(10, 1)
    y = torch.tensor([[3.0, 4.0]]).repeat(7, 1)
    assert energy_distance(x, y) == pytest.approx(10.0, abs=1e-12)
    assert gaussian_mmd2(x, y, 5.0) == pytest.approx(2 - 2 * np.exp(-0.5), abs=1e-12)


@pytest.mark.parametrize("unbiased", [False, True])
@pytest.mark.parametrize("chunk_size", [50, 1024])  # 50: several blocks, a ragged last one
def test_matches_direct_formula_on_shifted_gaussians(unbiased, chunk_size):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(203, 4, generator=g)
    y = torch.randn(151, 4, generator=g) + torch.tensor([0.5, 0.0, -0.3, 0.0])
    expected = energy_numpy(x.double().numpy(), y.double().numpy(), unbiased)
    assert energy_distance(x, y, unbiased=unbiased, chunk_size=chunk_size) == pytest.approx(expected, rel=1e-10)
    assert energy_distance(x, y, chunk_size=chunk_size) > 0.05
    assert gaussian_mmd2(x, y, 1.3, chunk_size=chunk_size) == pytest.approx(
        mmd_numpy(x.double().numpy(), y.double().numpy(), 1.3), rel=1e-10
    )


def test_shifted_gaussians_population_value():
    # 1-D N(0,1) vs N(mu,1): population energy distance 2 E|Z + mu| - 2 E|Z'| with Z ~ N(0, 2);
    # E|N(mu, 2)| = 2 phi(mu / sqrt2) sqrt2 + mu (1 - 2 Phi(-mu / sqrt2)).
    from math import erf, exp, pi, sqrt

    mu, s = 1.0, sqrt(2.0)
    e_abs = s * sqrt(2 / pi) * exp(-(mu**2) / (2 * s * s)) + mu * erf(mu / (s * sqrt(2)))
    population = 2 * e_abs - 2 * s * sqrt(2 / pi)
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(4000, 1, generator=g), torch.randn(4000, 1, generator=g) + mu
    assert energy_distance(x, y, unbiased=True) == pytest.approx(population, abs=0.03)


def test_two_checkerboard_samples_floor():
    dm = ToyDataModule("checkerboard")
    a, b = dm.real_samples(5000, seed=1)[0], dm.real_samples(5000, seed=2)[0]
    value = energy_distance(a, b)
    print(f"energy distance between two independent 5k checkerboard samples: {value:.5f}")
    # V-statistic floor: E|X - X'| (1/n + 1/m) ~= 2.08 * 2 / 5000 ~= 0.0008, plus sampling noise
    assert 0.0 < value < 0.003
    shifted = energy_distance(a, b + torch.tensor([0.5, 0.0]))
    assert shifted > 20 * value


def test_errors():
    with pytest.raises(ValueError, match="same dimension"):
        energy_distance(torch.zeros(3, 2), torch.zeros(3, 3))
    with pytest.raises(ValueError, match="bandwidth"):
        gaussian_mmd2(torch.zeros(3, 2), torch.zeros(3, 2), 0.0)


def test_median_bandwidth():
    x = torch.tensor([[0.0], [1.0], [3.0]])  # pairwise distances 1, 2, 3
    assert median_bandwidth(x) == pytest.approx(2.0)


def test_mode_fractions_detects_collapse():
    centers = bimodal_centers()
    balanced = sample_bimodal(10000, torch.Generator().manual_seed(0))
    fractions = mode_fractions(balanced, centers)
    assert fractions.shape == (2,) and fractions.sum().item() == pytest.approx(1.0)
    assert torch.allclose(fractions, torch.tensor([0.5, 0.5], dtype=fractions.dtype), atol=0.02)
    collapsed = torch.tensor([[1.0, 0.0]]) + 0.1 * torch.randn(500, 2)
    assert mode_fractions(collapsed, centers).tolist() == [0.0, 1.0]
