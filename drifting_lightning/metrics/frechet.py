"""Frechet distance between Gaussian fits of two feature sets, in constant memory and correct under DDP.

FD = |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))  (Heusel et al. 2017). With Inception-V3 2015-12-05 pool
features this is FID; with any other extractor it is a Frechet distance and is logged under its own name
(``fd_classifier``, ``fd_encoder``, ...), never as FID.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric

ArrayLike = Tensor | np.ndarray


def _float64(x: ArrayLike, device: torch.device) -> Tensor:
    x = x.detach() if isinstance(x, Tensor) else torch.from_numpy(np.asarray(x))
    return x.to(device, torch.float64)


def _psd_eigenvalues(w: Tensor) -> Tensor:
    """Eigenvalues [F] of a PSD matrix with round-off removed: those below max * F * eps are set to zero."""
    tol = w.max().clamp_min(0.0) * w.shape[0] * torch.finfo(torch.float64).eps
    return torch.where(w > tol, w, torch.zeros_like(w))


def _sqrt_psd(s: Tensor) -> Tensor:
    """Symmetric square root of a PSD matrix [F, F]."""
    w, v = torch.linalg.eigh(s)
    return (v * _psd_eigenvalues(w).sqrt()) @ v.T


def _trace_sqrt_product(sigma1: Tensor, sigma2: Tensor) -> Tensor:
    """tr((S1 S2)^(1/2)) for PSD S1, S2 [F, F].

    With S1 = R R^T (Cholesky, or the symmetric square root when S1 is singular), S1 S2 has the eigenvalues of
    the symmetric PSD matrix R^T S2 R, so the trace is a sum of square roots of real eigenvalues: no complex
    parts, exact for rank-deficient covariances. The product is symmetric in S1, S2, so whichever has a
    Cholesky factor is factored; only when both are singular are eigenvectors needed.
    """
    root, info = torch.linalg.cholesky_ex(sigma1)
    other = sigma2
    if info.item() != 0:
        root, info = torch.linalg.cholesky_ex(sigma2)
        other = sigma1
        if info.item() != 0:
            root, other = _sqrt_psd(sigma1), sigma2
    inner = root.T @ other @ root
    return _psd_eigenvalues(torch.linalg.eigvalsh((inner + inner.T) / 2)).sqrt().sum()


def frechet_distance(mu1: ArrayLike, sigma1: ArrayLike, mu2: ArrayLike, sigma2: ArrayLike) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64: mu [F], sigma [F, F].

    Runs on the device of the first tensor argument (CPU for numpy arrays). Agrees with scipy's
    ``sqrtm(S1 @ S2)`` (pytorch-fid, the ADM evaluator) where that is well defined, and stays real and finite
    where it is not (fewer samples than features): eigenvalues at round-off level (below max * F * eps,
    negative ones included) are set to zero before the square root.
    """
    device = next((a.device for a in (mu1, sigma1, mu2, sigma2) if isinstance(a, Tensor)), torch.device("cpu"))
    mu1, sigma1, mu2, sigma2 = (_float64(a, device) for a in (mu1, sigma1, mu2, sigma2))
    if mu1.dim() != 1 or mu1.shape != mu2.shape:
        raise ValueError(f"means must be vectors of equal length, got {list(mu1.shape)} and {list(mu2.shape)}")
    f = mu1.shape[0]
    for name, s in (("sigma1", sigma1), ("sigma2", sigma2)):
        if s.shape != (f, f):
            raise ValueError(f"{name} must be [{f}, {f}] to match the means, got {list(s.shape)}")
    for name, a in (("mu1", mu1), ("sigma1", sigma1), ("mu2", mu2), ("sigma2", sigma2)):
        if not torch.isfinite(a).all():
            raise ValueError(f"{name} has non-finite entries (NaN/inf): the features fed to the metric were not finite")
    sigma1, sigma2 = (sigma1 + sigma1.T) / 2, (sigma2 + sigma2.T) / 2
    diff = mu1 - mu2
    fd = diff @ diff + sigma1.trace() + sigma2.trace() - 2.0 * _trace_sqrt_product(sigma1, sigma2)
    return fd.item()


def feature_moments(features: Tensor) -> tuple[Tensor, Tensor]:
    """features: [B, F] -> (sum [F], sum of outer products [F, F]), both float64 (the running sums of FD)."""
    x = features.detach().to(torch.float64)
    return x.sum(0), x.T @ x


def mean_cov(n: int | Tensor, total: Tensor, outer: Tensor) -> tuple[Tensor, Tensor]:
    """Mean [F] and unbiased covariance [F, F] (divided by n - 1) from the running sums, float64."""
    n = int(n)
    if n < 2:
        raise ValueError(f"a covariance needs at least 2 samples, got {n}")
    mu = total.to(torch.float64) / n
    cov = (outer.to(torch.float64) - n * torch.outer(mu, mu)) / (n - 1)
    return mu, (cov + cov.T) / 2


class FeatureMoments:
    """Running float64 sums of features (count, sum [F], sum of outer products [F, F]) in one process: the
    statistics of the Frechet distance in O(F^2) memory, whatever the number of samples. (``FrechetDistance`` keeps
    the same sums as torchmetrics states, which DDP adds across ranks.)"""

    def __init__(self) -> None:
        self.n = 0
        self.total: Tensor | None = None
        self.outer: Tensor | None = None

    def add(self, features: Tensor) -> None:
        """Add features [B, F]."""
        s, ss = feature_moments(features)
        self.total, self.outer = (s, ss) if self.total is None else (self.total + s, self.outer + ss)
        self.n += features.shape[0]

    def statistics(self) -> tuple[Tensor, Tensor]:
        """(mean [F], unbiased covariance [F, F]) float64 of the features added so far."""
        if self.total is None:
            raise ValueError("a covariance needs at least 2 samples, got 0")
        return mean_cov(self.n, self.total, self.outer)


class FrechetDistance(Metric):
    """Frechet distance between real (or reference) and generated features, from float64 running sums.

    ``extractor``: a callable ``[B, ...] -> [B, F]`` applied in ``update`` (registered as a submodule when it is
    an ``nn.Module``, so ``.to(device)`` moves it); ``None`` means ``update`` receives features ``[B, F]``.
    ``num_features``: F; read from ``extractor.num_features`` when not given.

    State is (n, sum, sum of outer products) per side, O(F^2) whatever the number of samples. Under DDP every
    rank feeds its own samples and the states are summed across ranks inside ``compute()``, which is a
    collective: call ``compute()`` on every rank (calling it on rank 0 only hangs). Every rank gets the same value.

    ``set_reference(mu, sigma)`` replaces the real side with fixed statistics (a cache or an ADM .npz); they are
    kept in float64, are the same on every rank and survive ``reset()``. The distance itself is computed in
    float64 on the metric's device (on a GPU the matrix square root takes well under a second for F = 2048).
    """

    higher_is_better = False
    is_differentiable = False
    full_state_update = False

    def __init__(
        self, extractor: Callable[[Tensor], Tensor] | None = None, num_features: int | None = None, **kwargs
    ) -> None:
        super().__init__(**kwargs)
        if num_features is None:
            num_features = getattr(extractor, "num_features", None)
        if not isinstance(num_features, int) or num_features < 1:
            raise ValueError(
                "FrechetDistance needs num_features (the feature dimension F); pass it explicitly when the "
                f"extractor has no integer `num_features` attribute (got {num_features!r})"
            )
        self.extractor = extractor
        self.num_features = num_features
        self._ref_mu: Tensor | None = None
        self._ref_sigma: Tensor | None = None
        for side in ("real", "fake"):
            self.add_state(f"{side}_n", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")
            self.add_state(f"{side}_sum", torch.zeros(num_features, dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state(
                f"{side}_outer", torch.zeros(num_features, num_features, dtype=torch.float64), dist_reduce_fx="sum"
            )

    def set_reference(self, mu: ArrayLike, sigma: ArrayLike) -> None:
        """Use fixed real statistics mu: [F], sigma: [F, F] instead of accumulating real samples."""
        mu_t, sigma_t = _float64(mu, torch.device("cpu")), _float64(sigma, torch.device("cpu"))
        f = self.num_features
        if mu_t.shape != (f,) or sigma_t.shape != (f, f):
            raise ValueError(
                f"reference statistics have shapes mu {list(mu_t.shape)}, sigma {list(sigma_t.shape)}; this metric "
                f"has {f} features (expected [{f}] and [{f}, {f}]): were they computed with a different extractor?"
            )
        self._ref_mu, self._ref_sigma = mu_t, sigma_t
        self._computed = None

    @property
    def has_reference(self) -> bool:
        return self._ref_mu is not None

    def features(self, x: Tensor) -> Tensor:
        """x: [B, ...] -> features [B, F] through the extractor (identity when there is none)."""
        with torch.no_grad():
            f = self.extractor(x) if self.extractor is not None else x
        if f.dim() != 2 or f.shape[1] != self.num_features:
            raise ValueError(f"expected features [B, {self.num_features}], got {list(f.shape)}")
        return f

    def update(self, x: Tensor, real: bool) -> None:
        """Add a batch x: [B, ...] (samples, or features [B, F] without extractor) to the real or fake side."""
        if real and self.has_reference:
            raise RuntimeError("reference statistics were set with set_reference(); real samples would be ignored")
        f = self.features(x)
        total, outer = feature_moments(f)
        side = "real" if real else "fake"
        getattr(self, f"{side}_n").add_(f.shape[0])
        getattr(self, f"{side}_sum").add_(total)
        getattr(self, f"{side}_outer").add_(outer)

    def statistics(self, real: bool) -> tuple[Tensor, Tensor]:
        """(mu [F], sigma [F, F]) float64 of one side from this rank's sums (the reference for real if set)."""
        if real and self.has_reference:
            return self._ref_mu.to(self.fake_sum.device), self._ref_sigma.to(self.fake_sum.device)
        side = "real" if real else "fake"
        return mean_cov(getattr(self, f"{side}_n"), getattr(self, f"{side}_sum"), getattr(self, f"{side}_outer"))

    def compute(self) -> Tensor:
        """The Frechet distance, a float64 scalar. A collective under DDP: call it on every rank."""
        mu1, sigma1 = self.statistics(real=True)
        mu2, sigma2 = self.statistics(real=False)
        return torch.tensor(frechet_distance(mu1, sigma1, mu2, sigma2), dtype=torch.float64)
