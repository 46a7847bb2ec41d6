"""Multi-scale feature statistics of a feature map, named as the authors' ``get_activations`` names them.

From one map ``[B, C, H, W]`` the drifting loss takes several *sets* of C-dimensional vectors, each with its own
kernel, drift and loss (PAPER.md section 4, paper A.5): (a) every location, (b) the global mean and std, (c) mean and
std over 2x2 patches, (d) over 4x4 patches. Plus a per-channel statistic of the encoder input. Every set is returned
as ``[B, L, C]`` (L = number of vectors per sample), the shape ``FeatureEncoder`` and ``DriftingLoss`` use.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

FAMILIES = ("location", "global", "patch2", "patch4")
_PATCH = {"patch2": 2, "patch4": 4}
INPUT_STATISTICS = ("sqrt_mean_sq", "mean_sq")


def safe_std(x: Tensor, dims: tuple[int, ...], eps: float = 1e-6, keepdim: bool = True) -> Tensor:
    """Population std over ``dims`` with ``eps`` inside the sqrt (finite gradient at zero variance), at least in
    float32 (the authors' ``safe_std``)."""
    x = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    var = (x - x.mean(dims, keepdim=True)).square().mean(dims, keepdim=keepdim)
    return torch.sqrt(var.clamp(min=0) + eps)


def to_sets(t: Tensor) -> Tensor:
    """[B, C, h, w] -> [B, h*w, C] (locations in row-major order, as the authors' ``b (h w) c``)."""
    return t.flatten(2).transpose(1, 2)


def patch_fits(height: int, width: int, patch: int) -> bool:
    """Whether ``patch`` x ``patch`` statistics are taken: the patch tiles the map exactly (the authors' rule; a
    4x4 patch on a 4x4 map is kept although it repeats the global statistics)."""
    return height % patch == 0 and width % patch == 0


def multiscale_features(
    fmap: Tensor, name: str, families: Sequence[str] = FAMILIES, eps: float = 1e-6
) -> dict[str, Tensor]:
    """Vector sets of one feature map, named like the authors' ``get_activations``.

    fmap: [B, C, H, W]. Returns, for the requested ``families``:
      "location": ``{name}``                             [B, H*W, C]    (a) every location
      "global":   ``{name}_mean``, ``{name}_std``         [B, 1, C]      (b) over all of H, W
      "patch2":   ``{name}_mean_2``, ``{name}_std_2``     [B, H*W/4, C]  (c) non-overlapping 2x2 patches
      "patch4":   ``{name}_mean_4``, ``{name}_std_4``     [B, H*W/16, C] (d) non-overlapping 4x4 patches
    A patch family is skipped (no key) when the patch does not tile the map. Std is ``safe_std``.
    """
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        raise ValueError(f"unknown feature families {unknown}; choose from {list(FAMILIES)}")
    if fmap.ndim != 4:
        raise ValueError(f"multiscale_features expects a [B, C, H, W] map, got shape {tuple(fmap.shape)}")
    b, c, h, w = fmap.shape
    out: dict[str, Tensor] = {}
    if "location" in families:  # (a)
        out[name] = to_sets(fmap)
    if "global" in families:  # (b)
        out[f"{name}_mean"] = to_sets(fmap.mean((2, 3), keepdim=True))
        out[f"{name}_std"] = to_sets(safe_std(fmap, (2, 3), eps))
    for family, p in _PATCH.items():  # (c), (d)
        if family in families and patch_fits(h, w, p):
            patches = fmap.reshape(b, c, h // p, p, w // p, p)
            out[f"{name}_mean_{p}"] = to_sets(patches.mean((3, 5)))
            out[f"{name}_std_{p}"] = to_sets(safe_std(patches, (3, 5), eps, keepdim=False))
    # The authors list the patch means of every size before the patch stds.
    order = [name, f"{name}_mean", f"{name}_std", *(f"{name}_mean_{p}" for p in (2, 4)),
             *(f"{name}_std_{p}" for p in (2, 4))]
    return {k: out[k] for k in order if k in out}


def input_statistic(x: Tensor, kind: str = "sqrt_mean_sq", eps: float = 1e-6) -> Tensor:
    """Per-channel second moment of the encoder input (paper A.5; the authors' ``norm_x``).

    x: [B, C, H, W] -> [B, 1, C]. ``"mean_sq"``: mean over H, W of x^2 (the paper's text);
    ``"sqrt_mean_sq"``: sqrt(mean x^2 + eps) (the authors' code, the default).
    """
    if kind not in INPUT_STATISTICS:
        raise ValueError(f"unknown input statistic {kind!r}; choose from {list(INPUT_STATISTICS)}")
    ms = x.square().mean((2, 3)).unsqueeze(1)
    return ms if kind == "mean_sq" else torch.sqrt(ms + eps)


def flat_channels_last(x: Tensor) -> Tensor:
    """The raw sample as one vector [B, 1, H*W*C] in (h, w, c) order, as the authors flatten their NHWC input."""
    return x.permute(0, 2, 3, 1).flatten(1).unsqueeze(1) if x.ndim == 4 else x.flatten(1).unsqueeze(1)
