"""MLP generator for 2-D toys and low-dimensional vectors (paper Fig. 3-4: MLP 32-256-256-256-2)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from drifting_lightning.models.base import Generator

InitMode = Literal["default", "collapsed", "far"]


class MLPGenerator(Generator):
    """f(noise) for vectors: noise [B, noise_dim] -> [B, output_dim] through SiLU hidden layers.

    Weights start variance-preserving (He-normal hidden layers, LeCun-normal output, zero biases), as the JAX
    default the paper used: PyTorch's default init shrinks the output to std ~0.04, a start collapsed at the origin
    from which a local kernel cannot reach far modes. ``init`` reproduces the starts of paper Fig. 3: "default"
    (that init), "collapsed" (the last layer's weights
    scaled by ``init_scale`` and its bias set to ``init_point``, so every sample starts on one point, e.g. one mode),
    "far" (bias set to ``init_point``, far from the data). With ``num_classes`` > 0 a class embedding is added to the
    first hidden layer, and the guidance scale (alpha - 1) enters as an extra input.
    """

    def __init__(
        self,
        noise_dim: int = 32,
        output_dim: int = 2,
        hidden: Sequence[int] = (256, 256, 256),
        num_classes: int = 0,
        init: InitMode = "default",
        init_point: Sequence[float] | None = None,
        init_scale: float = 0.01,
    ) -> None:
        super().__init__()
        if init not in ("default", "collapsed", "far"):
            raise ValueError(f"init must be 'default', 'collapsed' or 'far', got {init!r}")
        if not hidden:
            raise ValueError("hidden must list at least one layer width")
        for name, value in (("noise_dim", noise_dim), ("output_dim", output_dim), ("hidden", min(hidden))):
            if value < 1:
                got = list(hidden) if name == "hidden" else value
                raise ValueError(f"{name} must be >= 1 (a layer's width), got {got}")
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0 (0: unconditional), got {num_classes}")
        self.noise_shape = (noise_dim,)
        self.sample_shape = (output_dim,)
        self.num_classes = num_classes
        widths = [noise_dim + (1 if num_classes > 0 else 0), *hidden]
        layers: list[nn.Module] = []
        for a, b in zip(widths[:-1], widths[1:], strict=True):
            layers += [nn.Linear(a, b), nn.SiLU()]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(widths[-1], output_dim)
        self.class_embedding = nn.Embedding(num_classes, hidden[0]) if num_classes > 0 else None
        self._initialise(init, init_point, init_scale, output_dim)

    def _initialise(self, init: InitMode, point: Sequence[float] | None, scale: float, dim: int) -> None:
        for layer in self.body:
            if isinstance(layer, nn.Linear):
                nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
                nn.init.zeros_(layer.bias)
        nn.init.normal_(self.head.weight, std=self.head.in_features**-0.5)
        nn.init.zeros_(self.head.bias)
        if init == "default":
            return
        default_point = [1.0] + [0.0] * (dim - 1) if init == "collapsed" else [6.0] * dim
        point = list(point) if point is not None else default_point
        if len(point) != dim:
            raise ValueError(f"init_point has {len(point)} coordinates, the output has {dim}")
        with torch.no_grad():
            if init == "collapsed":
                self.head.weight.mul_(scale)
            self.head.bias.copy_(torch.tensor(point, dtype=self.head.bias.dtype))

    def forward(self, noise: Tensor, labels: Tensor | None = None, alpha: Tensor | None = None) -> Tensor:
        noise = noise.to(self.head.weight.dtype)  # float32 noise into a bf16 or float64 ("-true") model
        h = noise
        if self.class_embedding is not None:
            if labels is None:
                raise ValueError("this MLPGenerator is class-conditional (num_classes > 0): pass labels")
            guidance = torch.zeros_like(noise[:, :1]) if alpha is None else (alpha.to(noise.dtype) - 1.0)[:, None]
            h = torch.cat([h, guidance], dim=1)
            h = self.body[0](h) + self.class_embedding(labels)
            h = self.body[1:](h)
        else:
            h = self.body(h)
        return self.head(h)
