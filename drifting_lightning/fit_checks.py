"""Checks that the parts of a run fit together, made before the first step, in the terms of the config.

Without them a generator that knows fewer classes than the data fails inside its embedding (an IndexError 139 lines
deep), and one that makes samples of another shape fails inside the drift loss ("groups, locations and channels
must agree"); neither names the key to change.
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

KEY = "model.generator.init_args"


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
    return f"configure the generator to make samples of shape {shape}"
