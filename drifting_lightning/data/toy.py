"""2-D toy distributions (PAPER.md section 9, paper Fig. 3 and 4) and a DataModule that streams them.

Every distribution is a plain function ``sample_<name>(n, generator, **params) -> [n, 2]`` (float32, on the
generator's device), so a test or a notebook can draw from it without Lightning. All lie roughly in [-2, 2]^2.
"""

from __future__ import annotations

import difflib
import functools
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from drifting_lightning.data.stream import StreamingDataModule, split_stream
from drifting_lightning.rng import torch_generator


def _uniform(n: int, generator: torch.Generator, *size: int) -> Tensor:
    return torch.rand((n, *size), generator=generator, device=generator.device)


def _normal(n: int, generator: torch.Generator, *size: int) -> Tensor:
    return torch.randn((n, *size), generator=generator, device=generator.device)


def sample_checkerboard(n: int, generator: torch.Generator, num_cells: int = 4) -> Tensor:
    """Uniform on the 'black' unit squares of a ``num_cells`` x ``num_cells`` board centred at 0 -> [n, 2].

    A point (x, y) is in the support iff floor(x) + floor(y) is even and |x|, |y| <= num_cells / 2.
    ``num_cells`` must be even so that every column holds the same number of black squares.
    """
    if num_cells < 2 or num_cells % 2:
        raise ValueError(f"num_cells must be an even number >= 2, got {num_cells}")
    half = num_cells // 2
    x = _uniform(n, generator) * num_cells - half
    col = torch.floor(x)
    # In column c the black rows are r = -half + 2k + (c mod 2), k = 0 .. half - 1, so c + r is even.
    k = torch.randint(0, half, (n,), generator=generator, device=generator.device)
    row = -half + 2 * k + torch.remainder(col, 2)
    y = row + _uniform(n, generator)
    return torch.stack([x, y], dim=1)


def sample_spiral(n: int, generator: torch.Generator, noise: float = 0.02) -> Tensor:
    """Swiss roll as in sklearn's ``make_swiss_roll`` (t in [1.5 pi, 4.5 pi], point t (cos t, sin t)),
    scaled by 2 / (4.5 pi) so that the noiseless curve lies in [-2, 2]^2; Gaussian noise of std ``noise``
    (in the scaled units) is added -> [n, 2]."""
    t = 1.5 * math.pi * (1.0 + 2.0 * _uniform(n, generator))
    scale = 2.0 / (4.5 * math.pi)
    xy = torch.stack([t * torch.cos(t), t * torch.sin(t)], dim=1) * scale
    return xy + noise * _normal(n, generator, 2)


def sample_bimodal(
    n: int, generator: torch.Generator, offset: float = 1.0, std: float = 0.15, weight: float = 0.5
) -> Tensor:
    """Two isotropic Gaussians at (-offset, 0) and (+offset, 0) with std ``std`` (paper Fig. 3) -> [n, 2].

    ``weight`` is the probability of the left mode.
    """
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"weight must lie in [0, 1], got {weight}")
    left = _uniform(n, generator) < weight
    centers = torch.zeros(n, 2, device=generator.device)
    centers[:, 0] = torch.where(left, -offset, offset)
    return centers + std * _normal(n, generator, 2)


def bimodal_centers(offset: float = 1.0) -> Tensor:
    """The two modes of ``sample_bimodal`` -> [2, 2], for ``metrics.energy.mode_fractions``."""
    return torch.tensor([[-offset, 0.0], [offset, 0.0]])


def sample_eight_gaussians(n: int, generator: torch.Generator, radius: float = 2.0, std: float = 0.1) -> Tensor:
    """Eight isotropic Gaussians (std ``std``) equally spaced on a circle of radius ``radius`` -> [n, 2]."""
    k = torch.randint(0, 8, (n,), generator=generator, device=generator.device)
    angle = k.float() * (math.pi / 4)
    centers = radius * torch.stack([torch.cos(angle), torch.sin(angle)], dim=1)
    return centers + std * _normal(n, generator, 2)


def sample_two_moons(n: int, generator: torch.Generator, noise: float = 0.05) -> Tensor:
    """sklearn's ``make_moons`` (noise std ``noise`` added before rescaling), centred at 0 and scaled by 4/3
    so that the noiseless moons span x in [-2, 2], y in [-1, 1] -> [n, 2]."""
    t = math.pi * _uniform(n, generator)
    upper = _uniform(n, generator) < 0.5
    x = torch.where(upper, torch.cos(t), 1.0 - torch.cos(t))
    y = torch.where(upper, torch.sin(t), 0.5 - torch.sin(t))
    xy = torch.stack([x, y], dim=1) + noise * _normal(n, generator, 2)
    return (xy - torch.tensor([0.5, 0.25], device=xy.device)) * (4.0 / 3.0)


TOY_DISTRIBUTIONS: dict[str, Callable[..., Tensor]] = {
    "checkerboard": sample_checkerboard,
    "spiral": sample_spiral,
    "bimodal": sample_bimodal,
    "eight_gaussians": sample_eight_gaussians,
    "two_moons": sample_two_moons,
}


def get_toy_distribution(name: str) -> Callable[..., Tensor]:
    """The sampler called ``name``; an unknown name raises ValueError with the valid names."""
    if name not in TOY_DISTRIBUTIONS:
        close = difflib.get_close_matches(name, TOY_DISTRIBUTIONS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown toy distribution {name!r}; valid names: {', '.join(TOY_DISTRIBUTIONS)}.{hint}")
    return TOY_DISTRIBUTIONS[name]


class ToyDataModule(StreamingDataModule):
    """Fresh samples of a 2-D toy distribution every step: batches ``{"positives": [1, P, 2]}``.

    One epoch is ``steps_per_epoch`` steps. ``distribution_kwargs`` go to the sampler (e.g. ``{"std": 0.1}``
    for ``bimodal``).
    """

    sample_shape = (2,)

    def __init__(
        self,
        distribution: str = "checkerboard",
        positives_per_step: int = 2048,
        steps_per_epoch: int = 100,
        seed: int = 0,
        distribution_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(positives_per_step, steps_per_epoch, seed)
        self.sampler = get_toy_distribution(distribution)
        self.distribution = distribution
        self.distribution_kwargs = dict(distribution_kwargs or {})
        try:
            self.sampler(1, torch_generator(0), **self.distribution_kwargs)
        except TypeError as err:
            raise ValueError(f"bad distribution_kwargs for {distribution!r}: {err}") from err

    def draw_fn(self) -> Callable[[torch.Generator], Tensor]:
        return functools.partial(_draw, self.sampler, self.positives_per_step, self.distribution_kwargs)

    def real_samples(self, n: int, split: str = "train", seed: int = 0) -> tuple[Tensor, None]:
        """``n`` target samples -> ([n, 2], None), from a stream that the training batches never use."""
        gen = torch_generator(self.seed, split_stream(split), seed)
        return self.sampler(n, gen, **self.distribution_kwargs), None


def _draw(sampler: Callable[..., Tensor], n: int, params: dict[str, Any], generator: torch.Generator) -> Tensor:
    return sampler(n, generator, **params)
