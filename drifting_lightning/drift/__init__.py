"""The drift engine: kernels, drifting fields and the drifting loss (pure PyTorch, PAPER.md 2-3)."""

from drifting_lightning.drift.fields import MMD, DriftField, MeanShift, SinkhornDrift
from drifting_lightning.drift.functional import drift_field
from drifting_lightning.drift.kernels import Cauchy, Gaussian, InverseMultiquadric, Kernel, Laplace
from drifting_lightning.drift.loss import DriftingLoss, DriftLossOutput

__all__ = [
    "MMD",
    "Cauchy",
    "DriftField",
    "DriftLossOutput",
    "DriftingLoss",
    "Gaussian",
    "InverseMultiquadric",
    "Kernel",
    "Laplace",
    "MeanShift",
    "SinkhornDrift",
    "drift_field",
]
