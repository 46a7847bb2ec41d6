"""benchmarks/guidance.py: the guided-target weights and their summary, and an end-to-end run on a tiny generator."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import guidance  # noqa: E402

from drifting_lightning.export import export_generator  # noqa: E402
from drifting_lightning.models.dit import DiT  # noqa: E402

TINY_DIT = dict(hidden_size=32, depth=1, num_heads=2, num_style_tokens=4, style_codebook_size=8, num_context_tokens=2)


def test_guided_weights_follow_the_linear_extrapolation():
    posterior = torch.tensor([1.0, 0.5, 0.1, 0.05, 0.01])
    prior = torch.full((5,), 0.1)
    assert torch.equal(guidance.guided_weights(posterior, prior, 1.0), torch.ones(5))
    # alpha - (alpha - 1) P(c) / P(c|x) at alpha 2: 2 - 0.1 / P(c|x), clipped at zero.
    expected = torch.tensor([1.9, 1.8, 1.0, 0.0, 0.0])
    assert torch.allclose(guidance.guided_weights(posterior, prior, 2.0), expected)


def test_ideal_row_on_a_two_image_class():
    # P(c) = 0.5; one image certain (P(c|x) = 1), one ambiguous (0.5). alpha 2: weights 1.5 and 1.0 -> 1.2, 0.8.
    posterior, prior = torch.tensor([1.0, 0.5]), torch.tensor([0.5, 0.5])
    correct = torch.tensor([True, False])
    tv, removed, accuracy = guidance.ideal_row(posterior, prior, correct, 2.0)
    assert tv == pytest.approx(0.2 / 2)
    assert removed == 0.0
    assert accuracy == pytest.approx(0.6)
    assert guidance.ideal_row(posterior, prior, correct, 1.0) == pytest.approx((0.0, 0.0, 0.5))
    # alpha 3: 3 - 2 * 0.5 / 0.5 = 1 and 3 - 1 = 2 -> the ambiguous image keeps 1/3 of the mass.
    assert guidance.ideal_row(posterior, prior, correct, 3.0)[2] == pytest.approx(2 / 3)


def test_hardest_picks_the_least_class_like_samples_of_each_class():
    # 2 classes x 3 samples, grouped by class.
    posterior = torch.tensor([0.9, 0.2, 0.5, 0.1, 0.8, 0.3])
    assert guidance.hardest(posterior, num_classes=2, per_class=3, k=2).tolist() == [1, 2, 3, 5]


def test_benchmark_runs_on_a_tiny_generator(tmp_path, capsys):
    torch.manual_seed(0)
    generator = DiT("digits", init_output_std=0.5, **TINY_DIT)
    with torch.no_grad():  # a fresh DiT ignores alpha (adaLN-zero): perturb every weight so that alpha matters
        for p in generator.parameters():
            p.add_(0.05 * torch.randn_like(p))
    export = export_generator(generator, tmp_path / "export")
    grid, hard = tmp_path / "grid.png", tmp_path / "hard.png"
    result = guidance.main(["--checkpoint", str(export), "--data", "digits", "--alphas", "1,2", "--per-class", "8",
                            "--grid", str(grid), "--hard-grid", str(hard)])  # fmt: skip
    assert 0.9 <= result["classifier_accuracy"] < 1.0  # logistic regression on digits pixels
    assert result["ideal"][1.0][:2] == pytest.approx((0.0, 0.0), abs=5e-4) and 0.9 <= result["ideal"][1.0][2] < 1.0
    assert list(result["generator"]) == [1.0, 2.0]
    moves = [row[4] for row in result["generator"].values()]
    assert moves[0] == pytest.approx(0.0, abs=5e-4) and moves[1] > 0.0  # alpha 1 is the reference; 2 moves
    assert grid.stat().st_size > 0
    from PIL import Image

    with Image.open(grid) as im:  # two panels of 10 x 8 tiles of 8x8 pixels (+ padding), enlarged 4x
        assert im.size == (4 * (2 * (8 * 9 + 1) + 4), 4 * (10 * 9 + 1))
    with Image.open(hard) as im:  # 4 per class
        assert im.size == (4 * (2 * (4 * 9 + 1) + 4), 4 * (10 * 9 + 1))
    assert list(result["hardest"]) == [1.0, 2.0]
    # By construction these are the least class-like alpha-1 samples: below the mean P(c|x) of all of them.
    assert result["hardest"][1.0][1] <= result["generator"][1.0][1]
