"""Drifting Models (one-step generators trained by a kernel drifting field) as a PyTorch Lightning application.

``load_generator(dir)`` reads a ``drifting export`` directory without Lightning; everything else lives in the
subpackages (``drift``, ``models``, ``module``, ``data``, ``metrics``, ``callbacks``).
"""

from drifting_lightning.export import load_generator

__all__ = ["load_generator"]
