"""Multi-scale feature statistics of a feature map (PAPER.md section 4, paper A.5).

From one map ``[B, C, H, W]`` the drifting loss takes several *sets* of C-dimensional vectors, each with its own
kernel, drift and loss: (a) every location, (b) the global mean and std, (c) mean and std over 2x2 patches,
(d) over 4x4 patches. Plus a per-channel statistic of the encoder input. Every set is returned as ``[B, L, C]``
(L = number of vectors per sample), the shape ``FeatureEncoder`` promises.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

FAMILIES = ("location", "global", "patch2", "patch4")
_PATCH = {"patch2": 2, "patch4": 4}
INPUT_STATISTICS = ("sqrt_mean_sq", "mean_sq")


def _std(x: Tensor, dims: tuple[int, ...], mean: Tensor, eps: float) -> Tensor:
    """Population std over ``dims`` with ``eps`` inside the sqrt, so the gradient stays finite at zero variance."""
    var = (x - mean).square().mean(dims, keepdim=True)
    return torch.sqrt(var + eps)


def _to_sets(t: Tensor) -> Tensor:
    """[B, C, h, w] -> [B, h*w, C]."""
    return t.flatten(2).transpose(1, 2)


def patch_fits(height: int, width: int, patch: int) -> bool:
    """Whether ``patch`` x ``patch`` statistics are taken on an ``height`` x ``width`` map.

    A patch family is used when the patch tiles the map exactly (both sides divisible by ``patch``) and the map
    is larger than one patch; a single patch covering the whole map would repeat the global statistics.
    """
    return height % patch == 0 and width % patch == 0 and (height, width) != (patch, patch)


def multiscale_features(
    fmap: Tensor, prefix: str, families: Sequence[str] = FAMILIES, eps: float = 1e-6
) -> dict[str, Tensor]:
    """Vector sets of one feature map, named ``{prefix}.{set}`` (paper A.5 (a)-(d)).

    fmap: [B, C, H, W]. Returns, for the requested ``families``:
      "location": ``{prefix}.location``                        [B, H*W, C]   (a) every location
      "global":   ``{prefix}.mean``, ``{prefix}.std``            [B, 1, C]     (b) over all of H, W
      "patch2":   ``{prefix}.patch2.mean``, ``.patch2.std``      [B, H*W/4, C] (c) non-overlapping 2x2 patches
      "patch4":   ``{prefix}.patch4.mean``, ``.patch4.std``      [B, H*W/16, C] (d) non-overlapping 4x4 patches
    A patch family is skipped (no key) when ``patch_fits`` is false: the patch does not tile the map exactly,
    or it covers the whole map. Std is the population std, sqrt(var + eps).
    """
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        raise ValueError(f"unknown feature families {unknown}; choose from {list(FAMILIES)}")
    if fmap.ndim != 4:
        raise ValueError(f"multiscale_features expects a [B, C, H, W] map, got shape {tuple(fmap.shape)}")
    b, c, h, w = fmap.shape
    out: dict[str, Tensor] = {}
    if "location" in families:  # (a)
        out[f"{prefix}.location"] = _to_sets(fmap)
    if "global" in families:  # (b)
        mean = fmap.mean((2, 3), keepdim=True)
        out[f"{prefix}.mean"] = _to_sets(mean)
        out[f"{prefix}.std"] = _to_sets(_std(fmap, (2, 3), mean, eps))
    for family, p in _PATCH.items():  # (c), (d)
        if family not in families or not patch_fits(h, w, p):
            continue
        patches = fmap.reshape(b, c, h // p, p, w // p, p)
        mean = patches.mean((3, 5), keepdim=True)
        std = _std(patches, (3, 5), mean, eps)
        out[f"{prefix}.{family}.mean"] = _to_sets(mean.squeeze(5).squeeze(3))
        out[f"{prefix}.{family}.std"] = _to_sets(std.squeeze(5).squeeze(3))
    return out


def input_statistic(x: Tensor, kind: str = "sqrt_mean_sq", eps: float = 1e-6) -> Tensor:
    """Per-channel second moment of the encoder input (paper A.5).

    x: [B, C, H, W] -> [B, 1, C]. ``"mean_sq"``: mean over H, W of x^2 (the paper's text);
    ``"sqrt_mean_sq"``: sqrt(mean x^2 + eps) (the authors' code, the default).
    """
    if kind not in INPUT_STATISTICS:
        raise ValueError(f"unknown input statistic {kind!r}; choose from {list(INPUT_STATISTICS)}")
    ms = x.square().mean((2, 3)).unsqueeze(1)
    return ms if kind == "mean_sq" else torch.sqrt(ms + eps)
