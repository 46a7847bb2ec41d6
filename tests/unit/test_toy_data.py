import math

import pytest
import torch

from drifting_lightning.data.toy import (
    TOY_DISTRIBUTIONS,
    ToyDataModule,
    bimodal_centers,
    sample_bimodal,
    sample_checkerboard,
    sample_eight_gaussians,
    sample_spiral,
    sample_two_moons,
)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("name", sorted(TOY_DISTRIBUTIONS))
def test_shape_dtype_and_determinism(name):
    fn = TOY_DISTRIBUTIONS[name]
    a, b, c = fn(500, gen(1)), fn(500, gen(1)), fn(500, gen(2))
    assert a.shape == (500, 2) and a.dtype == torch.float32
    assert torch.isfinite(a).all()
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert a.abs().max() < 3.0  # all toys live in about [-2, 2]^2


def test_checkerboard_support_and_balance():
    x = sample_checkerboard(20000, gen())
    assert x.abs().max() <= 2.0
    cells = torch.floor(x).long()
    assert ((cells[:, 0] + cells[:, 1]) % 2 == 0).all()  # only the 'black' squares
    # all 8 black squares are used, each about equally
    idx = (cells[:, 0] + 2) * 4 + (cells[:, 1] + 2)
    counts = torch.bincount(idx, minlength=16)
    black = counts[counts > 0]
    assert len(black) == 8
    assert (black.float() / len(x) - 1 / 8).abs().max() < 0.01


def test_spiral_noiseless_lies_on_the_roll():
    x = sample_spiral(2000, gen(), noise=0.0).double()
    scale = 2.0 / (4.5 * math.pi)
    t = x.norm(dim=1) / scale  # on the roll the radius is scale * t and the angle is t
    assert ((t >= 1.5 * math.pi - 1e-4) & (t <= 4.5 * math.pi + 1e-4)).all()
    assert torch.allclose(x, scale * t[:, None] * torch.stack([t.cos(), t.sin()], 1), atol=1e-4)
    assert x.abs().max() <= 2.0 + 1e-6


def test_bimodal_modes_and_parameters():
    x = sample_bimodal(20000, gen())
    left = x[:, 0] < 0
    assert abs(left.float().mean().item() - 0.5) < 0.02
    for mask, cx in ((left, -1.0), (~left, 1.0)):
        pts = x[mask]
        assert torch.allclose(pts.mean(0), torch.tensor([cx, 0.0]), atol=0.01)
        assert torch.allclose(pts.std(0), torch.tensor([0.15, 0.15]), atol=0.01)
    y = sample_bimodal(20000, gen(), offset=2.0, std=0.05, weight=0.8)
    assert abs((y[:, 0] < 0).float().mean().item() - 0.8) < 0.02
    assert torch.allclose(y[y[:, 0] < 0].mean(0), torch.tensor([-2.0, 0.0]), atol=0.01)
    assert torch.equal(bimodal_centers(2.0), torch.tensor([[-2.0, 0.0], [2.0, 0.0]]))


def test_eight_gaussians_on_circle():
    x = sample_eight_gaussians(16000, gen())
    angle = torch.atan2(x[:, 1], x[:, 0])
    k = torch.round(angle / (math.pi / 4)).remainder(8)
    centers = 2.0 * torch.stack([torch.cos(k * math.pi / 4), torch.sin(k * math.pi / 4)], 1)
    assert (x - centers).std(0).sub(0.1).abs().max() < 0.005
    assert torch.bincount(k.long(), minlength=8).min() > 1800


def test_two_moons_on_arcs():
    x = sample_two_moons(4000, gen(), noise=0.0) * 0.75 + torch.tensor([0.5, 0.25])  # back to sklearn units
    d_upper = (x.norm(dim=1) - 1).abs() + torch.relu(-x[:, 1])
    d_lower = ((x - torch.tensor([1.0, 0.5])).norm(dim=1) - 1).abs() + torch.relu(x[:, 1] - 0.5)
    assert (torch.minimum(d_upper, d_lower) < 1e-5).all()
    scaled = sample_two_moons(4000, gen(), noise=0.0)
    assert torch.allclose(scaled.min(0).values, torch.tensor([-2.0, -1.0]), atol=0.02)
    assert torch.allclose(scaled.max(0).values, torch.tensor([2.0, 1.0]), atol=0.02)


def test_unknown_distribution_suggests_name():
    with pytest.raises(ValueError, match="checkerboard.*Did you mean 'checkerboard'"):
        ToyDataModule("checkerbord")
    with pytest.raises(ValueError, match="bad distribution_kwargs for 'bimodal'"):
        ToyDataModule("bimodal", distribution_kwargs={"radius": 2.0})


def test_datamodule_batches_fresh_and_reproducible():
    dm = ToyDataModule("eight_gaussians", positives_per_step=16, steps_per_epoch=5, seed=3)
    assert dm.sample_shape == (2,) and dm.num_classes == 0
    loader = dm.train_dataloader()
    assert len(loader) == 5
    epoch0 = [b["positives"] for b in loader]
    epoch1 = [b["positives"] for b in loader]
    assert len(epoch0) == 5 and all(b.shape == (1, 16, 2) for b in epoch0)
    assert not torch.equal(epoch0[0], epoch0[1])  # fresh every step
    assert not torch.equal(epoch0[0], epoch1[0])  # and every epoch
    assert dm.state_dict() == {"epoch": 2}

    again = ToyDataModule("eight_gaussians", positives_per_step=16, steps_per_epoch=5, seed=3)
    assert all(torch.equal(a, b["positives"]) for a, b in zip(epoch0, again.train_dataloader(), strict=True))
    other_seed = ToyDataModule("eight_gaussians", positives_per_step=16, steps_per_epoch=5, seed=4)
    assert not torch.equal(epoch0[0], next(iter(other_seed.train_dataloader()))["positives"])


def test_resume_continues_with_new_epochs():
    dm = ToyDataModule(positives_per_step=8, steps_per_epoch=2)
    loader = dm.train_dataloader()
    list(loader)
    second = [b["positives"] for b in loader]
    resumed = ToyDataModule(positives_per_step=8, steps_per_epoch=2)
    resumed.load_state_dict({"epoch": 1})
    assert all(torch.equal(a, b["positives"]) for a, b in zip(second, resumed.train_dataloader(), strict=True))


def test_real_samples_separate_streams():
    dm = ToyDataModule("checkerboard", positives_per_step=32, steps_per_epoch=1)
    x, labels = dm.real_samples(32)
    assert x.shape == (32, 2) and labels is None
    assert torch.equal(x, dm.real_samples(32)[0])
    assert not torch.equal(x, dm.real_samples(32, seed=1)[0])
    assert not torch.equal(x, dm.real_samples(32, split="test")[0])
    assert not torch.equal(x, next(iter(dm.train_dataloader()))["positives"][0])
    with pytest.raises(ValueError, match="unknown split"):
        dm.real_samples(4, split="validation")
