"""SampleGridCallback without a Trainer: grid layout, the decoder hook, helpers and argument errors."""


import pytest
import torch

from drifting_lightning.callbacks.sample_grid import SampleGridCallback, alpha_tag, displayable, grid_labels


def test_decode_hook_and_unconditional_rows(tiny_digits_module):
    module = tiny_digits_module(num_classes=0)
    grid = SampleGridCallback(samples_per_class=2, max_classes=3, alpha=1.5)
    plain = grid.grids(module)[1.5]
    assert plain.shape == (3, 3 * 10 + 2, 2 * 10 + 2)  # unconditional: max_classes rows
    module.decoder = lambda x: torch.ones_like(x)  # a latent run's decoder, here: all white
    decoded = grid.grids(module)[1.5]
    assert decoded[:, 2:10, 2:10].min() == 1.0


def test_helpers_and_argument_errors():
    assert alpha_tag(1) == "1.0" and alpha_tag(1.25) == "1.25"
    assert grid_labels(10, 4, 2, torch.device("cpu")).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert grid_labels(0, 4, 2, torch.device("cpu")) is None
    assert displayable(torch.zeros(2, 4, 5, 5)).shape == (2, 3, 5, 5)  # latents: first three channels
    with pytest.raises(ValueError, match="images"):
        displayable(torch.zeros(2, 2))
    with pytest.raises(ValueError, match=">= 1"):
        SampleGridCallback(alpha=[0.5])
    with pytest.raises(ValueError, match="samples_per_class"):
        SampleGridCallback(samples_per_class=0)
