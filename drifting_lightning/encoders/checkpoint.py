"""Reading encoder weights from a file, with errors that name the file and the keys that do not match."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

_SHOW = 8  # keys listed per kind of mismatch


def read_checkpoint(path: str | Path) -> Mapping[str, Any]:
    """The object stored in ``path``: a ``.safetensors`` file, or a ``torch.save`` file (.pt/.pth/.ckpt/.bin).

    Torch files are read with ``weights_only=True`` (no arbitrary code runs) onto the CPU.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"encoder checkpoint not found: {str(path)!r} (check the path; nothing is downloaded)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # a pickle that holds more than tensors and containers
        raise RuntimeError(
            f"could not read encoder checkpoint {str(path)!r} with torch.load(weights_only=True): {err}. "
            "Save the weights as a plain state_dict (.pt) or .safetensors file."
        ) from err
    if not isinstance(obj, Mapping):
        raise TypeError(f"encoder checkpoint {str(path)!r} holds a {type(obj).__name__}, expected a dict")
    return obj


def tensors_under(state: Mapping[str, Any], prefix: str) -> dict[str, Tensor]:
    """The tensors of ``state`` whose key starts with ``prefix``, with the prefix removed."""
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix) and isinstance(v, Tensor)}


def _listing(keys: list[str]) -> str:
    more = f" ... (+{len(keys) - _SHOW} more)" if len(keys) > _SHOW else ""
    return ", ".join(keys[:_SHOW]) + more


def load_weights(module: nn.Module, state: Mapping[str, Tensor], source: str, hint: str = "") -> None:
    """Load ``state`` into ``module`` strictly; on any mismatch raise an error naming ``source`` and the keys.

    The message lists missing keys (in the module, not in the file), unexpected keys (in the file, not in the
    module) and keys whose shapes differ, a few of each.
    """
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} (file {tuple(state[k].shape)} vs model {tuple(own[k].shape)})"
        for k in own
        if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or shapes:
        parts = [f"weights in {source!r} do not match {type(module).__name__}:"]
        if missing:
            parts.append(f"{len(missing)} missing keys: {_listing(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys: {_listing(unexpected)}")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatches: {_listing(shapes)}")
        if hint:
            parts.append(hint)
        raise RuntimeError("\n  ".join(parts))
    module.load_state_dict(dict(state), strict=True)
