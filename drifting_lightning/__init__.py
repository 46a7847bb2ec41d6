"""Drifting Models (one-step generators trained by a kernel drifting field) as a PyTorch Lightning application.

``load_generator(dir)`` reads a ``drifting export`` directory without Lightning; everything else lives in the
subpackages (``drift``, ``models``, ``module``, ``data``, ``metrics``, ``callbacks``).
"""

from typing import Any

__all__ = ["load_generator"]


def __getattr__(name: str) -> Any:
    # Loaded on first use: `drifting` imports this package before torch, to handle a Ctrl-C during start-up.
    if name == "load_generator":
        from drifting_lightning.export import load_generator

        return load_generator
    raise AttributeError(f"module 'drifting_lightning' has no attribute {name!r}")
