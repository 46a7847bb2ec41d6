"""The checks made before the first step name both sides of a mismatch and the key to set."""

from __future__ import annotations

import pytest
import torch

from drifting_lightning.encoders.base import FeatureEncoder, Identity
from drifting_lightning.encoders.resnet_mae import ResNetConfig, ResNetMAE
from drifting_lightning.fit_checks import check_encoder_fits_data, check_generator_fits_data, check_precision_trains
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
    # a generator of the other kind: the one to use instead
    with pytest.raises(ValueError, match=r"\(2,\): vectors need a vector generator: --model.generator MLPGenerator "
                       r"--model.generator.init_args.output_dim 2$"):
        check_generator_fits_data(dit, Data((2,), 0))
    with pytest.raises(ValueError, match=r"images need an image generator: --model.generator DiT \(its in_channels"):
        check_generator_fits_data(MLPGenerator(noise_dim=4, output_dim=2, hidden=[8]), Data((1, 8, 8), 10))


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


class WholeBatchAsOneSample(FeatureEncoder):
    """What an image encoder does with a batch of vectors [B, D]: one feature row for the whole batch."""

    def forward(self, x):
        return {"pooled": x.reshape(1, 1, -1)}


def tiny_resnet_mae(in_channels: int) -> ResNetMAE:
    return ResNetMAE(ResNetConfig(in_channels=in_channels, width=4, stages=(1, 1, 1, 1)))


def test_an_encoder_that_cannot_take_the_data_names_model_encoder_and_the_fix():
    cpu = torch.device("cpu")
    check_encoder_fits_data(Identity(), Data((2,), 0), cpu)
    check_encoder_fits_data(tiny_resnet_mae(1), Data((1, 8, 8), 10), cpu)
    check_encoder_fits_data(WholeBatchAsOneSample(), None, cpu)  # no data module: nothing to check

    with pytest.raises(ValueError) as err:
        check_encoder_fits_data(WholeBatchAsOneSample(), Data((2,), 0), cpu)
    assert str(err.value) == (
        "the encoder (WholeBatchAsOneSample, model.encoder) does not keep the data's samples apart: two samples of "
        "shape (2,) gave its feature set 'pooled' the shape (1, 1, 4). Vector data takes no image encoder: leave "
        "model.encoder out (the raw samples, Identity)"
    )
    with pytest.raises(ValueError) as err:
        check_encoder_fits_data(tiny_resnet_mae(4), Data((1, 8, 8), 10), cpu)
    assert str(err.value).startswith("the encoder (ResNetMAE, model.encoder) cannot take the data's samples of shape "
                                     "(1, 8, 8): Given groups=1")  # fmt: skip
    assert str(err.value).endswith(
        "It takes 4 channels, the data has 1: set model.encoder.init_args.arch.in_channels 1 (a random encoder), or "
        "give it a checkpoint trained on this data"
    )
    with pytest.raises(ValueError, match=r"cannot take the data's samples of shape \(2,\): .*Vector data takes no"):
        check_encoder_fits_data(tiny_resnet_mae(4), Data((2,), 0), cpu)



def test_guidance_without_unconditional_samples_is_refused():
    from types import SimpleNamespace

    from drifting_lightning.fit_checks import check_guidance_has_negatives
    from drifting_lightning.sampling.guidance import GuidanceSampler
    from drifting_lightning.sampling.positives import ClassAwareSampler

    guidance = GuidanceSampler()
    with_negatives = SimpleNamespace(num_classes=10, positives=ClassAwareSampler(unconditional_per_class=4))
    check_guidance_has_negatives(guidance, with_negatives)
    check_guidance_has_negatives(None, Data((2,), 0))  # no guidance: nothing to check
    with pytest.raises(ValueError, match=r"the data \(Data\) has no class labels, so there is nothing to guide"):
        check_guidance_has_negatives(guidance, Data((2,), 0))
    without = SimpleNamespace(num_classes=10, positives=ClassAwareSampler(unconditional_per_class=0))
    with pytest.raises(ValueError, match="set data.init_args.positives.init_args.unconditional_per_class"):
        check_guidance_has_negatives(guidance, without)


def test_the_encoder_check_runs_in_the_precision_of_training():
    from lightning.pytorch.plugins.precision import HalfPrecision

    encoder = tiny_resnet_mae(1).to(torch.bfloat16)  # as bf16-true leaves its weights
    with pytest.raises(ValueError, match="cannot take the data's samples"):  # float32 zeros: the wrong verdict
        check_encoder_fits_data(encoder, Data((1, 8, 8), 10), torch.device("cpu"))
    with HalfPrecision("bf16-true").forward_context():  # what DriftingModule.on_fit_start wraps the check in
        check_encoder_fits_data(encoder, Data((1, 8, 8), 10), torch.device("cpu"))


def test_float16_weights_are_refused_before_they_turn_nan():
    check_precision_trains("16-mixed")
    check_precision_trains("bf16-true")
    with pytest.raises(ValueError, match="trainer.precision 16-true: .* use 16-mixed"):
        check_precision_trains("16-true")
