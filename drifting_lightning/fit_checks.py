"""Checks that the parts of a run fit together, made before the first step, in the terms of the config.

Without them a generator that knows fewer classes than the data fails inside its embedding (an IndexError 139 lines
deep), and one that makes samples of another shape fails inside the drift loss ("groups, locations and channels
must agree"); neither names the key to change.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

KEY = "model.generator.init_args"
ENCODER_KEY = "model.encoder"


def check_parts_fit(
    generator: nn.Module, encoder: nn.Module, guidance: Any, trainer: Any, device: torch.device
) -> None:
    """Every check below for a DriftingModule's parts against ``trainer.datamodule``, before the first step. The
    encoder runs in the training precision's forward context, as in training (bf16-true weights take bf16 input)."""
    datamodule = trainer.datamodule
    check_precision_trains(str(trainer.precision))
    check_generator_fits_data(generator, datamodule)
    with trainer.precision_plugin.forward_context():
        check_encoder_fits_data(encoder, datamodule, device)
    check_guidance_has_negatives(guidance, datamodule)


def check_precision_trains(precision: str) -> None:
    """Refuse "16-true": float16 weights with AdamW's state in float16 (its eps of 1e-8 is 0 there) turn NaN at the
    first update, which the NaN check would then blame on the learning rate."""
    if precision == "16-true":
        raise ValueError(
            "trainer.precision 16-true: float16 weights and AdamW state break at the first update (its eps of 1e-8 "
            "is 0 in float16); use 16-mixed (float32 weights, float16 compute), bf16-mixed or bf16-true"
        )


def check_generator_fits_data(generator: nn.Module, datamodule: Any) -> None:
    """Raise ValueError naming both sides and the key to set when ``generator`` cannot make the samples of
    ``datamodule``: another sample shape, fewer classes than the data has, or classes the data does not have.
    A DataModule without ``sample_shape`` / ``num_classes`` is not checked."""
    if datamodule is None:
        return
    gen, data = type(generator).__name__, type(datamodule).__name__
    data_shape = getattr(datamodule, "sample_shape", None)
    gen_shape = tuple(getattr(generator, "sample_shape", ()))
    if data_shape is not None and gen_shape and tuple(data_shape) != gen_shape:
        raise ValueError(
            f"the generator ({gen}) makes samples of shape {gen_shape}, the data ({data}) holds samples of shape "
            f"{tuple(data_shape)}: {_shape_fix(generator, tuple(data_shape))}"
        )
    data_classes = getattr(datamodule, "num_classes", None)
    gen_classes = getattr(generator, "num_classes", 0)
    if data_classes is None:
        return
    if gen_classes > 0 and data_classes == 0:
        raise ValueError(
            f"the generator ({gen}) is class-conditional ({KEY}.num_classes={gen_classes}), the data ({data}) has no "
            f"labels: set {KEY}.num_classes 0, or use labelled data"
        )
    if 0 < gen_classes < data_classes:
        raise ValueError(
            f"the data ({data}) has {data_classes} classes, the generator ({gen}) only {gen_classes} "
            f"({KEY}.num_classes): set {KEY}.num_classes {data_classes}"
        )


def _shape_fix(generator: nn.Module, shape: tuple[int, ...]) -> str:
    params = inspect.signature(type(generator).__init__).parameters
    if len(shape) == 1 and "output_dim" in params:
        return f"set {KEY}.output_dim {shape[0]}"
    if len(shape) == 3 and {"in_channels", "input_size"} <= set(params) and shape[1] == shape[2]:
        return f"set {KEY}.in_channels {shape[0]} and {KEY}.input_size {shape[1]}"
    if len(shape) == 1:
        return f"vectors need a vector generator: --model.generator MLPGenerator --{KEY}.output_dim {shape[0]}"
    if len(shape) == 3:
        return "images need an image generator: --model.generator DiT (its in_channels and input_size)"
    return f"configure the generator to make samples of shape {shape}"


def check_encoder_fits_data(encoder: nn.Module, datamodule: Any, device: torch.device) -> None:
    """Raise ValueError naming ``model.encoder`` when ``encoder`` cannot take the samples of ``datamodule``: one
    forward of two zero samples of the data's shape must run and give every feature set one row per sample (an image
    encoder given vectors may read the whole batch as one image, and train on nonsense without an error). A
    DataModule without ``sample_shape`` is not checked."""
    shape = getattr(datamodule, "sample_shape", None)
    if shape is None:
        return
    shape, name = tuple(shape), type(encoder).__name__
    try:
        with torch.no_grad():
            features = encoder(torch.zeros(2, *shape, device=device))
    except (RuntimeError, ValueError, IndexError, TypeError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"the encoder ({name}, {ENCODER_KEY}) cannot take the data's samples of shape {shape}: {reason}."
            f"{_encoder_fix(encoder, shape)}"
        ) from err
    merged = {key: tuple(f.shape) for key, f in features.items() if f.shape[0] != 2}
    if merged:
        key, got = next(iter(merged.items()))
        raise ValueError(
            f"the encoder ({name}, {ENCODER_KEY}) does not keep the data's samples apart: two samples of shape {shape} "
            f"gave its feature set {key!r} the shape {got}.{_encoder_fix(encoder, shape)}"
        )


def _encoder_fix(encoder: nn.Module, shape: tuple[int, ...]) -> str:
    if len(shape) == 1:
        return f" Vector data takes no image encoder: leave {ENCODER_KEY} out (the raw samples, Identity)"
    channels = getattr(getattr(encoder, "arch", None), "in_channels", None)
    if channels is not None and channels != shape[0]:
        return (f" It takes {channels} channels, the data has {shape[0]}: set {ENCODER_KEY}.init_args.arch.in_channels "
                f"{shape[0]} (a random encoder), or give it a checkpoint trained on this data")
    return ""


def check_guidance_has_negatives(guidance: Any, datamodule: Any) -> None:
    """Raise ValueError when ``model.guidance`` is set but the data gives no unconditional samples, the negatives it
    weighs: without them the guidance sampler is never used and the run trains without guidance, silently."""
    if guidance is None or datamodule is None:
        return
    data = type(datamodule).__name__
    if getattr(datamodule, "num_classes", None) == 0:
        raise ValueError(f"model.guidance is set, but the data ({data}) has no class labels, so there is nothing to "
                         "guide: leave model.guidance out")  # fmt: skip
    positives = getattr(datamodule, "positives", None)
    if getattr(positives, "unconditional_per_class", None) == 0:
        raise ValueError(
            "model.guidance is set, but the data draws no unconditional samples, the negatives guidance weighs: set "
            "data.init_args.positives.init_args.unconditional_per_class (e.g. 8), or leave model.guidance out"
        )
