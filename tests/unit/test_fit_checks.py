"""The checks made before the first step name both sides of a mismatch and the key to set."""

from __future__ import annotations

import pytest

from drifting_lightning.fit_checks import check_generator_fits_data
from drifting_lightning.models.dit import DiT
from drifting_lightning.models.mlp import MLPGenerator


class Data:
    def __init__(self, sample_shape: tuple[int, ...], num_classes: int) -> None:
        self.sample_shape, self.num_classes = sample_shape, num_classes


def test_matching_parts_pass():
    check_generator_fits_data(MLPGenerator(noise_dim=4, output_dim=2, hidden=[8]), Data((2,), 0))
    check_generator_fits_data(MLPGenerator(noise_dim=4, output_dim=2, hidden=[8], num_classes=12), Data((2,), 10))
    check_generator_fits_data(MLPGenerator(noise_dim=4, output_dim=2, hidden=[8]), Data((2,), 10))  # unconditional
    check_generator_fits_data(MLPGenerator(noise_dim=4, output_dim=2, hidden=[8]), None)


def test_sample_shape_mismatch_names_both_shapes_and_the_key():
    with pytest.raises(ValueError) as err:
        check_generator_fits_data(MLPGenerator(noise_dim=4, output_dim=2, hidden=[8]), Data((3,), 0))
    assert str(err.value) == (
        "the generator (MLPGenerator) makes samples of shape (2,), the data (Data) holds samples of shape (3,): "
        "set model.generator.init_args.output_dim 3"
    )
    dit = DiT("digits", hidden_size=32, depth=1, num_heads=2)
    with pytest.raises(ValueError, match=r"shape \(1, 8, 8\), the data \(Data\) holds samples of shape \(3, 16, 16\): "
                       r"set model.generator.init_args.in_channels 3 and model.generator.init_args.input_size 16"):
        check_generator_fits_data(dit, Data((3, 16, 16), 10))


def test_too_few_classes_and_labels_missing():
    gen = MLPGenerator(noise_dim=4, output_dim=2, hidden=[8], num_classes=5)
    with pytest.raises(ValueError) as err:
        check_generator_fits_data(gen, Data((2,), 10))
    assert str(err.value) == (
        "the data (Data) has 10 classes, the generator (MLPGenerator) only 5 (model.generator.init_args.num_classes): "
        "set model.generator.init_args.num_classes 10"
    )
    with pytest.raises(ValueError, match="has no labels: set model.generator.init_args.num_classes 0"):
        check_generator_fits_data(gen, Data((2,), 0))
