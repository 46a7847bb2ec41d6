"""Whether saved weights fit a model: one report of the keys and shapes that differ, for every loader (a resumed
run, an export, an encoder's pretrained weights)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

_SHOW = 8  # keys listed per kind of difference


def _listing(keys: list[str]) -> str:
    return "; ".join(keys[:_SHOW]) + (f"; ... (+{len(keys) - _SHOW} more)" if len(keys) > _SHOW else "")


def describe_mismatch(expected: Mapping[str, Tensor], found: Mapping[str, Any], theirs: str, ours: str) -> str:
    """'' when ``found`` has exactly the keys and shapes of ``expected``; else the differences in one line: missing
    keys (in ``expected`` only), unexpected keys (in ``found`` only) and shape mismatches, a few of each, with
    ``theirs``/``ours`` naming the two sides (e.g. "the checkpoint", "this run")."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    shapes = [f"{k} {list(found[k].shape)} in {theirs}, {list(v.shape)} in {ours}" for k, v in expected.items()
              if k in found and isinstance(found[k], Tensor) and found[k].shape != v.shape]  # fmt: skip
    kinds = (("shape mismatches", shapes), ("missing keys", missing), ("unexpected keys", unexpected))
    return ". ".join(f"{len(keys)} {title}: {_listing(keys)}" for title, keys in kinds if keys)


def check_state_fits(expected: Mapping[str, Tensor], checkpoint: Mapping[str, Any], source: str) -> None:
    """Raise ValueError naming every tensor of ``checkpoint["state_dict"]`` that is missing, unexpected or of another
    shape than in ``expected`` (the module's state_dict)."""
    report = describe_mismatch(expected, checkpoint.get("state_dict", {}), "the checkpoint", "this run")
    if report:
        raise ValueError(
            f"checkpoint {source} was written by a run with a different model config. {report}. Resume with the "
            "config of the run that wrote it (config.yaml in its run folder), or start a new run without --ckpt_path."
        )
