"""Loading encoder weights into a module, with errors that name the file and the keys that do not match. The file
itself is read (and verified) by ``drifting_lightning.checkpoints.reading.read_weights``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from drifting_lightning.checkpoints.states import describe_mismatch


def tensors_under(state: Mapping[str, Any], prefix: str) -> dict[str, Tensor]:
    """The tensors of ``state`` whose key starts with ``prefix``, with the prefix removed."""
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix) and isinstance(v, Tensor)}


def load_weights(module: nn.Module, state: Mapping[str, Tensor], source: str, hint: str = "") -> None:
    """Load ``state`` into ``module`` strictly; on any mismatch raise an error naming ``source`` and the keys
    (missing: in the module, not in the file; unexpected: in the file only; other shapes), a few of each."""
    report = describe_mismatch(module.state_dict(), state, "the file", "the model")
    if report:
        raise RuntimeError(f"weights in {source!r} do not match {type(module).__name__}: {report}" +
                           (f". {hint}" if hint else ""))  # fmt: skip
    module.load_state_dict(dict(state), strict=True)
