"""Drifting fields as plug-ins: kernel logits -> signed coefficients W with V = W @ Y - rowsum(W) * x.

Every field sees one group at a time (batched over groups): generated rows x [G, N, D] against targets
Y [G, T, D] whose first ``n_neg`` columns are negatives (the generated samples themselves first, then any extra
weighted negatives) and whose remaining columns are positives. Working with coefficients instead of differences
keeps memory at G*N*T + G*N*D: an [N, T, D] tensor of differences is never formed (PAPER.md 2).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

Normalization = Literal["both", "targets", "none"]


class DriftField:
    """Base class. ``coefficients(logits, n_neg, column_weights)`` -> W [G, N, T], negatives signed negative.

    A field may overwrite ``logits`` (it is a temporary of the engine). logits: [G, N, T] kernel logits, masked
    self-pairs already set to the dtype's lowest finite value when ``masks_self`` (functional.mask_self_pairs);
    column_weights: [G, T] kernel weights of the targets (the guidance weight w on extra negatives) or None.
    """

    masks_self: bool = True
    # Whether ``coefficients_and_row_sums`` takes the ``row_maxima`` hint and logits relative to their row maxima.
    uses_row_maxima: bool = False

    def coefficients(self, logits: Tensor, n_neg: int, column_weights: Tensor | None = None) -> Tensor:
        raise NotImplementedError

    def coefficients_and_row_sums(
        self, logits: Tensor, n_neg: int, column_weights: Tensor | None = None,
        row_maxima: Tensor | None = None,
    ) -> tuple[Tensor, Tensor] | None:
        """``coefficients`` and W's row sums [G, N, 1], as the engine asks for them. Fields that know the row sums
        without a pass over W override this. row_maxima: given only to fields that set ``uses_row_maxima``: each
        row's largest kernel logit [G, N, 1] (the field may overwrite it), and then ``logits`` are relative to it
        (each row's largest is 0; masked self-pairs still the lowest value). With it a field may return None: it
        spent ``logits`` and asks for them again, absolute, without the hint."""
        coef = self.coefficients(logits, n_neg, column_weights)
        return coef, coef.sum(-1, keepdim=True)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


# Elements of the log-sum-exp's transient exp(x - max), a slab of x along dim 0 reused slab after slab (512 KiB,
# within a 1 MiB L2). A transient the size of x (torch.logsumexp makes two) is a fresh allocation per call, paid in
# page faults (in a profile of the loss on Fashion-MNIST-sized features, that allocating subtraction took 4x as
# long as the same subtraction in place), and one more [rows, N, T] matrix in the engine's memory budget.
LSE_SLAB_ELEMENTS = 2**17
# On a GPU the cost is per kernel launch, not per page: slabs of LSE_SLAB_ELEMENTS would mean thousands of launches
# per call at ImageNet sizes (e.g. 65,536 rows of 64 x 144). There, at most this many slabs, so the transient stays
# at 1/16 of x.
MAX_GPU_SLABS = 16


def slab_rows(shape: tuple[int, ...], on_gpu: bool) -> int:
    """Entries of dim 0 per slab of ``_logsumexp`` for a tensor of ``shape``."""
    rows = max(1, LSE_SLAB_ELEMENTS // max(1, math.prod(shape[1:])))
    return max(rows, -(-shape[0] // MAX_GPU_SLABS)) if on_gpu else rows


def _logsumexp(x: Tensor, dim: int) -> Tensor:
    """torch.logsumexp(x, dim, keepdim=True) for dim != 0, same algorithm (shift by the max, an infinite max shifted
    by 0), with exp(x - max) formed over slabs of whole entries of dim 0 (``slab_rows``) in one reused buffer."""
    dim %= x.dim()
    if dim == 0:
        raise ValueError("_logsumexp walks over dim 0 in slabs, so it cannot reduce over it")
    m = x.amax(dim, keepdim=True)
    m.masked_fill_(m.isinf(), 0.0)
    out = torch.empty_like(m)
    step = slab_rows(tuple(x.shape), x.device.type != "cpu")
    slab = x.new_empty((min(step, x.shape[0]), *x.shape[1:]))
    for a in range(0, x.shape[0], step):
        b = min(a + step, x.shape[0])
        torch.sum(torch.sub(x[a:b], m[a:b], out=slab[: b - a]).exp_(), dim, keepdim=True, out=out[a:b])
    return out.log_().add_(m)


# The one-exp path of the floored "both" normalisation (below) is exact to float32 rounding for floors down to this.
MIN_ONE_EXP_FLOOR = 1e-12
# ... provided every column's mass, relative to the group's largest entry, is at least this: then no entry whose
# affinity clears the floor is lost to underflow (see _floored_both_one_exp).
MIN_COLUMN_MASS = 1e-15
LOG_MIN_COLUMN_MASS = math.log(MIN_COLUMN_MASS)
# Relative logits are raised to this before the exponential. The vectorised exp of an input below about -87 (where
# float32 leaves its normal range) takes a slow path for its whole vector: 30x slower on a 2-core Xeon for logits
# down to -200, and the masked self-pairs (the dtype's lowest value) alone make it 2x slower. Nothing changes: an
# entry this far below its row's largest has E c < e^-80 x 10^7.5 < 1e-27, below every floor allowed here (r <= 1:
# each row's largest E is 1), and its share of a row's or a checked column's mass is far below float32's resolution.
LOWEST_RELATIVE_LOGIT = -80.0


def _floored_both_one_exp(
    logits: Tensor, floor: float, column_weights: Tensor | None = None, row_max: Tensor | None = None
) -> tuple[Tensor, Tensor] | None:
    """A = max(sqrt(softmax_targets * softmax_rows), sqrt(floor)) x column_weights with ONE exponential, as (B, r)
    with A = r B (B in place of ``logits``, r [G, N, 1]: a row factor the caller folds into its own row factors),
    or None where that would lose digits. On the CPU the exponentials are most of the field's time. row_max: the
    rows' largest logits when known (the engine has them from the distances; overwritten), and then ``logits`` are
    already relative to them. column_weights [G, T] must be >= 0 (they then commute with the floor).

    E = exp(l - rowmax) gives the row softmax E / rowsum; the column softmax reuses it: exp(l) is E u up to one
    factor per group, u_n = exp(rowmax_n - M) with M the group's largest logit, so it is E u / colsum(E u). Underflow
    in E or u only drops entries far below the floor, as long as every column's mass colsum(E u) >= 1e-15 (an entry
    above the floor has E >= 1e-12 and E u >= 1e-12 colsum(E u), far from float32's smallest). Without ``row_max``
    that is checked before anything is overwritten, from the columns' largest logits (None: ``logits`` untouched;
    a fully masked column fails it); with it, on the computed masses (None: ``logits`` spent), where a lighter
    column also passes when all its E are <= floor: then its row softmaxes are too, every affinity in it is the
    floor, and the computed column softmax, <= 1 like the true one, cannot lift any of them above it (features with
    outliers, e.g. a far positive, give such columns at small temperatures).
    With r = sqrt(u / rowsum) and c = colsum(E u)^(-1/2): max(E r c, f) w = r max(E c, f / r) w, two passes over
    [G, N, T] instead of three, and w only where it is not 1 (the extra negatives' columns).
    """
    relative = row_max is not None
    if not relative:
        row_max, col_max = logits.amax(-1, keepdim=True), logits.amax(-2, keepdim=True)
        if not bool((col_max - col_max.amax(-1, keepdim=True) >= LOG_MIN_COLUMN_MASS).all()):
            return None
        logits.sub_(row_max)
    e = logits.clamp_min_(LOWEST_RELATIVE_LOGIT).exp_()
    row_scale = row_max.sub_(row_max.amax(-2, keepdim=True)).exp_()  # u = exp(rowmax - M)
    col_mass = torch.bmm(row_scale.transpose(1, 2), e)  # [G, 1, T]: colsum(E u)
    # a light column is harmless if none of its entries exceeds the floor on its row's softmax alone (E <= floor, as
    # every row sum of E is >= 1): its affinities are then the floor, whatever its mass
    light = col_mass < MIN_COLUMN_MASS if relative else None
    if light is not None and bool(light.any()) and bool(light.logical_and_(e.amax(-2, keepdim=True) > floor).any()):
        return None
    # r of a row far from everything underflows; any r <= 1e-30 gives the same A (r E c <= 1e-30 x 10^7.5 stays
    # below every floor allowed here), so clamping it keeps f / r finite and r x f / r = f
    r = row_scale.div_(e.sum(-1, keepdim=True)).sqrt_().clamp_min_(1e-30)
    b = torch.maximum(e.mul_(col_mass.rsqrt_()), math.sqrt(floor) / r, out=e)
    if column_weights is not None:
        weighted = (column_weights != 1).any(0).nonzero()
        if len(weighted):
            cols = slice(int(weighted[0]), int(weighted[-1]) + 1)
            b[..., cols].mul_(column_weights[:, None, cols])
    return b, r


def _cross_weight_(
    a: Tensor, n_neg: int, attraction: float, repulsion: float, row_factor: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Alg. 2 in place on A [G, N, T] (given as row_factor x ``a`` when row_factor [G, N, 1] is not None):
    W_pos = A_pos * rowsum(A_neg), W_neg = A_neg * rowsum(A_pos), negatives signed negative, so that
    V = W_pos @ y+ - W_neg @ y- (written as W @ Y - rowsum(W) x to allow unequal scales). Returns W and its row
    sums, rowsum(A_neg) rowsum(A_pos) (attraction - repulsion), known without a pass."""
    r = 1.0 if row_factor is None else row_factor
    neg_mass = a[..., :n_neg].sum(-1, keepdim=True) * r
    pos_mass = a[..., n_neg:].sum(-1, keepdim=True) * r
    a[..., :n_neg].mul_(pos_mass * r * -repulsion)
    a[..., n_neg:].mul_(neg_mass * r * attraction)
    return a, neg_mass.mul_(pos_mass).mul_(attraction - repulsion)


class MeanShift(DriftField):
    """Mean-shift attraction minus repulsion (paper Eq. 11, Alg. 2), the paper's field.

    normalization: "both" = sqrt(softmax over targets * softmax over generated rows) (the default), "targets" =
    softmax over targets only, "none" = the raw kernel (paper Table 11). ``affinity_floor`` is the authors' code:
    A = sqrt(max(product, floor)) in "both" mode, so every entry keeps at least sqrt(floor) weight; 0 gives Alg. 2
    as printed. ``attraction_scale`` / ``repulsion_scale`` != 1 break anti-symmetry on purpose (Table 1 ablation:
    e.g. 1.5 V+ - V-); ``repulsion_scale=0`` is "V+ only".
    """

    def __init__(
        self,
        normalization: Normalization = "both",
        affinity_floor: float = 1e-6,
        attraction_scale: float = 1.0,
        repulsion_scale: float = 1.0,
    ) -> None:
        if normalization not in ("both", "targets", "none"):
            raise ValueError(f"normalization must be 'both', 'targets' or 'none', got {normalization!r}")
        if affinity_floor < 0:
            raise ValueError(f"affinity_floor must be >= 0, got {affinity_floor}")
        self.normalization = normalization
        self.affinity_floor = affinity_floor
        self.attraction_scale = attraction_scale
        self.repulsion_scale = repulsion_scale

    @property
    def uses_row_maxima(self) -> bool:  # type: ignore[override]
        """The one-exponential path (floored "both") starts from logits relative to their row maxima."""
        return self.normalization == "both" and self.affinity_floor >= MIN_ONE_EXP_FLOOR

    def affinities(self, logits: Tensor) -> Tensor:
        """A [G, N, T] from logits [G, N, T] under the chosen normalisation (overwrites ``logits``)."""
        a, row_factor = self._weighted_affinities(logits, None, None)
        return a if row_factor is None else a.mul_(row_factor)

    def _weighted_affinities(
        self, logits: Tensor, column_weights: Tensor | None, row_max: Tensor | None
    ) -> tuple[Tensor, Tensor | None] | None:
        """A times the column weights (after the normalisation, as in the authors' code), as (B, r) with A = r B
        (r [G, N, 1], or None for A = B); None when ``row_max`` was given and the logits were spent."""
        if (self.uses_row_maxima and logits.device.type == "cpu"
                and (column_weights is None or bool((column_weights >= 0).all()))):
            factored = _floored_both_one_exp(logits, self.affinity_floor, column_weights, row_max)
            if factored is not None or row_max is not None:
                return factored
        if row_max is not None:  # back to absolute logits: the log-domain softmax over rows needs them
            logits.add_(row_max)
        a = self._affinities(logits)
        return (a if column_weights is None else a.mul_(column_weights.unsqueeze(-2))), None

    def _affinities(self, logits: Tensor) -> Tensor:
        if self.normalization == "both":
            # sqrt(softmax_targets * softmax_rows) = exp(l - (lse_targets + lse_rows) / 2), one matrix, in place;
            # the floor on the product becomes a floor of log(floor) / 2 on its logarithm.
            lse_targets = _logsumexp(logits, -1).mul_(0.5)
            lse_rows = _logsumexp(logits, -2).mul_(0.5)
            log_a = logits.sub_(lse_targets).sub_(lse_rows)
            if self.affinity_floor > 0:
                log_a.clamp_min_(0.5 * math.log(self.affinity_floor))
            return log_a.exp_()
        if self.normalization == "targets":
            # softmax over targets in place (no second matrix), shifted by the max as torch.softmax: exp(l - lse)
            # would lose the digits of l - lse to the rounding of l when logits are huge (far-apart points).
            m = logits.amax(-1, keepdim=True)
            m.masked_fill_(m.isinf(), 0.0)
            e = logits.sub_(m).exp_()
            return e.div_(e.sum(-1, keepdim=True))
        return logits.exp_()

    def coefficients(self, logits: Tensor, n_neg: int, column_weights: Tensor | None = None) -> Tensor:
        return self.coefficients_and_row_sums(logits, n_neg, column_weights)[0]  # never None without the hint

    def coefficients_and_row_sums(
        self, logits: Tensor, n_neg: int, column_weights: Tensor | None = None,
        row_maxima: Tensor | None = None,
    ) -> tuple[Tensor, Tensor] | None:
        factored = self._weighted_affinities(logits, column_weights, row_maxima)
        if factored is None:
            return None
        return _cross_weight_(factored[0], n_neg, self.attraction_scale, self.repulsion_scale, factored[1])


class MMD(DriftField):
    """The MMD field of paper C.2: V(x) = E_p[k(x,y)(y-x)] - E_q[k(x,y)(y-x)], un-normalised kernel averages.

    With the Gaussian kernel this is sigma^2 times the gradient of the MMD witness function; the constant is
    absorbed by drift normalisation. Extra negatives are averaged with their weights.
    """

    def coefficients(self, logits: Tensor, n_neg: int, column_weights: Tensor | None = None) -> Tensor:
        k = logits.exp_()  # in place, like MeanShift: one [G, N, T] matrix
        if column_weights is None:
            column_weights = torch.ones(k.shape[0], k.shape[-1], dtype=k.dtype, device=k.device)
        else:
            k.mul_(column_weights.unsqueeze(-2))
        neg_mass = column_weights[:, :n_neg].sum(-1).clamp_min(1e-12)[:, None, None]
        pos_mass = column_weights[:, n_neg:].sum(-1).clamp_min(1e-12)[:, None, None]
        k[..., :n_neg].div_(-neg_mass)
        k[..., n_neg:].div_(pos_mass)
        return k


class SinkhornDrift(DriftField):
    """Sinkhorn drifting (He et al., "Sinkhorn-Drifting Generative Models", arXiv 2603.12366).

    Cross-minus-self: V(x_i) = barycentre of x_i under the entropic OT plan x -> positives minus its barycentre under
    the plan x -> negatives (the generated set itself, self-pairs included, plus weighted extra negatives). Both plans
    come from two-sided Sinkhorn scaling (uniform row marginals, column marginals proportional to the column weights),
    which makes V = 0 imply q = p; the one-sided mean shift is the zero-iteration limit. ``iterations`` Sinkhorn steps
    run in log space.
    """

    masks_self = False

    def __init__(self, iterations: int = 20) -> None:
        if iterations < 1:
            raise ValueError(f"iterations must be >= 1, got {iterations}")
        self.iterations = iterations

    def _plan(self, logits: Tensor, weights: Tensor | None) -> Tensor:
        n, t = logits.shape[-2], logits.shape[-1]
        log_a = -math.log(n)
        if weights is None:
            log_b = torch.full(logits.shape[:-2] + (1, t), -math.log(t), dtype=logits.dtype, device=logits.device)
        else:
            w = weights.clamp_min(0).unsqueeze(-2)
            log_b = (w / w.sum(-1, keepdim=True).clamp_min(1e-12)).clamp_min(1e-30).log()
        g = torch.zeros_like(log_b)
        for _ in range(self.iterations):
            f = log_a - (logits + g).logsumexp(dim=-1, keepdim=True)
            g = log_b - (logits + f).logsumexp(dim=-2, keepdim=True)
        plan = (logits + f + g).exp()
        return plan / plan.sum(-1, keepdim=True).clamp_min(1e-30)  # barycentric projection weights

    def coefficients(self, logits: Tensor, n_neg: int, column_weights: Tensor | None = None) -> Tensor:
        w_neg = None if column_weights is None else column_weights[:, :n_neg]
        w_pos = None if column_weights is None else column_weights[:, n_neg:]
        return torch.cat(
            [-self._plan(logits[..., :n_neg], w_neg), self._plan(logits[..., n_neg:], w_pos)], dim=-1
        )
