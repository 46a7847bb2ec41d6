"""DriftingLoss: feature dict -> loss, with feature scale, several temperatures and drift normalisation (PAPER.md 3).

Per feature set of dimension C the engine sees rows (G class groups x L locations), each row N generated samples
against T = N + M + P targets (the generated samples, extra negatives, positives), and walks over chunks of rows in
up to three passes, in float32 with autocast off and without gradients:
1. feature scale S (A.6): the weighted mean distance, summed chunk by chunk;
2. drift normalisation lambda (A.6): sums of V^2 per temperature, V derived from the chunk's one distance matrix
   and dropped;
3. the force F = sum over tau of V_tau / lambda_tau, into ONE float32 buffer shaped like the generated features.
   V is linear in the coefficients W, so F = (sum_tau W_tau / lambda_tau) @ Y - rowsum(...) x: one product per
   chunk instead of one per temperature.
The loss MSE(gen / s_in, sg(gen / s_in + F)) is then known without building it: its value is mean F^2 and its
gradient -2 F / (s_in numel) (``_DriftMSE``), so no prediction or target tensor is kept, and backward scales the
force buffer in place into the gradient: the loss's only generation-sized memory is the gradient's own.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from drifting_lightning.drift.fields import DriftField, MeanShift
from drifting_lightning.drift.functional import apply_coefficients, is_temperature, mask_self_pairs
from drifting_lightning.drift.kernels import Kernel, Laplace

FeatureDict = Mapping[str, Tensor]

# [rows, N, T] float32 matrices alive at once per chunk, at most: the distances, the running sum of the
# temperatures' coefficients (pass 3) and one temperature's logits, turned into its coefficients in place by
# MeanShift. The kernels work in place on their result and the log-sum-exp on slabs (fields.slab_rows: cache-sized
# on the CPU, 1/16 of the matrix on a GPU), so neither adds a whole matrix.
LIVE_MATRICES = 3
# Up to this many channels, distances come from per-channel differences (exact) instead of the matrix product.
DIRECT_CHANNELS = 8


def chunk_budget_bytes(max_chunk_elements: int, n: int, t: int, c: int) -> int:
    """Upper bound on the working memory of one chunk, in bytes, for N generated samples, T targets, C channels.

    rows = max(1, max_chunk_elements // (N T)); per row LIVE_MATRICES [N, T] matrices plus (T + N) C values: the
    centred targets [T, C] (generated samples first) and one [N, C] field, a temperature's V or the chunk's force.
    All of it is alive at once only in pass 3 without drift normalisation (a temperature's V for the statistics
    next to the distances, the coefficient sum and that temperature's coefficients); by default a chunk peaks at
    T C + max(3 N T, 2 N T + N C) values per row.
    """
    rows = max(1, max_chunk_elements // (n * t))
    return 4 * rows * (LIVE_MATRICES * n * t + (t + n) * c)


@dataclass
class DriftLossOutput:
    """loss: scalar to minimise; stats: detached scalars worth logging, keyed ``<feature>/<statistic>``."""

    loss: Tensor
    stats: dict[str, Tensor] = field(default_factory=dict)


@dataclass
class _Chunk:
    """Rows of one chunk: class groups x locations, their stat ids [rows] and column weights [rows, T] (or None)."""

    groups: slice
    locs: slice
    stat_ids: Tensor
    weights: Tensor | None

    @property
    def shape(self) -> tuple[int, int]:
        return self.groups.stop - self.groups.start, self.locs.stop - self.locs.start


class _DriftMSE(torch.autograd.Function):
    """MSE(gen / s_in, sg(gen / s_in + F)) from its value and F alone (PAPER.md 1: the stop-gradient loss).

    forward(gen, value, force, grad_scale) returns the precomputed value; backward returns grad_scale * F times the
    incoming gradient, with grad_scale = -2 / (s_in numel), in gen's dtype and strides. For float32 gen, backward
    scales the force buffer in place and returns it: F is dead once the gradient exists, and autograd adopts the
    buffer as gen.grad (same dtype and strides), so the loss holds no memory the gradient would not need anyway.
    The price: one backward per loss; a second one (retain_graph=True) raises instead of reading a spent buffer.
    """

    @staticmethod
    def forward(ctx, gen: Tensor, value: Tensor, force: Tensor, grad_scale: Tensor) -> Tensor:
        ctx.save_for_backward(force, grad_scale)
        ctx.gen_dtype = gen.dtype
        ctx.spent = False
        return value.clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        if ctx.spent:
            raise RuntimeError(
                "DriftingLoss supports one backward per loss: the first turned its force buffer into the gradient "
                "in place. Compute the loss again instead of backward(retain_graph=True) twice."
            )
        ctx.spent = True
        force, grad_scale = ctx.saved_tensors
        scale = grad_scale * grad_output
        if force.dtype == ctx.gen_dtype:
            return force.mul_(scale), None, None, None
        grad = torch.empty_like(force, dtype=ctx.gen_dtype)
        torch.mul(force, scale, out=grad)  # computed in float32, rounded once into gen's dtype
        return grad, None, None, None


class DriftingLoss(nn.Module):
    """The drifting loss over one or many feature sets (PAPER.md 2-3, 5).

    kernel: distance -> logit (default Laplace); field: logits -> drift coefficients (default MeanShift("both")).
    temperatures: all computed from one distance matrix. feature_normalization: divide distances by their weighted
    batch mean S and features by S / sqrt(C) (A.6). drift_normalization: divide each temperature's V by
    lambda = sqrt(mean V^2). loss_per_temperature: one MSE per temperature, summed (paper Table 8) instead of one MSE
    against the summed field (authors' code, default). statistics: "batch" shares S and lambda over all groups (code),
    "group" keeps one per class group (all locations of a group always share them). distributed_statistics:
    all-reduce S and lambda sums over ranks in "batch" mode so results do not depend on the number of ranks.
    mask_self: mask each generated sample against itself (paper Alg. 2), for the fields that ask for it.

    Memory. max_chunk_elements bounds rows x N x T, the elements of ONE [rows, N, T] distance matrix; rows (whole
    class groups when all L locations of a group fit, else locations of one group; at least one row) are processed
    in chunks under it. Per chunk at most LIVE_MATRICES = 3 such float32 matrices are alive (the distances, the sum
    of the temperatures' coefficients in pass 3, one temperature's logits that MeanShift turns into coefficients in
    place; its log-sum-exps work on small slabs) and (T + N) x C float32 values per row: the centred targets
    [rows, T, C] (generated samples first) and one field [rows, N, C], a temperature's V or the chunk's force. So
    the chunk budget is ``chunk_budget_bytes`` = 4 B x rows x (3 N T + (T + N) C). Beyond it the loss holds one
    float32 force buffer the size of the generated features from the forward to the backward, which becomes the
    gradient in place (float32 gen), and per-row vectors of a chunk. SinkhornDrift holds a few more [rows, N, T]
    temporaries. With a single chunk the targets and distances are kept across the passes; with no
    bound (None, one chunk of all rows) every temperature's V is kept from pass 2 to pass 3 too, trading the
    temperatures' [R, N, C] buffers for the recomputation.
    """

    def __init__(
        self,
        kernel: Kernel | None = None,
        field: DriftField | None = None,
        temperatures: Sequence[float] = (0.02, 0.05, 0.2),
        feature_normalization: bool = True,
        drift_normalization: bool = True,
        loss_per_temperature: bool = False,
        statistics: Literal["batch", "group"] = "batch",
        distributed_statistics: bool = False,
        max_chunk_elements: int | None = None,
        mask_self: bool = True,
    ) -> None:
        super().__init__()
        if not temperatures or not all(is_temperature(t) for t in temperatures):
            raise ValueError(
                f"temperatures must be a non-empty list of positive finite numbers, got {list(temperatures)}"
            )
        if statistics not in ("batch", "group"):
            raise ValueError(f"statistics must be 'batch' or 'group', got {statistics!r}")
        if max_chunk_elements is not None and max_chunk_elements < 1:
            raise ValueError(f"max_chunk_elements must be positive or None, got {max_chunk_elements}")
        self.kernel = kernel if kernel is not None else Laplace()
        self.field = field if field is not None else MeanShift()
        self.temperatures = tuple(float(t) for t in temperatures)
        self.feature_normalization = feature_normalization
        self.drift_normalization = drift_normalization
        self.loss_per_temperature = loss_per_temperature
        self.statistics = statistics
        self.distributed_statistics = distributed_statistics
        self.max_chunk_elements = max_chunk_elements
        self.mask_self = mask_self

    def extra_repr(self) -> str:
        return (
            f"kernel={self.kernel}, field={self.field}, temperatures={self.temperatures}, "
            f"feature_normalization={self.feature_normalization}, drift_normalization={self.drift_normalization}, "
            f"statistics={self.statistics!r}"
        )

    def forward(
        self,
        gen: Tensor | FeatureDict,
        pos: Tensor | FeatureDict,
        neg: Tensor | FeatureDict | None = None,
        neg_weights: Tensor | None = None,
    ) -> DriftLossOutput:
        """gen: {name: [G, N, C] or [G, N, L, C]} generated features (with gradient); pos: {name: [G, P, (L,) C]};
        neg: {name: [G, M, (L,) C]} extra negatives; neg_weights: [G, M] or [G] kernel weights of the extra
        negatives (the guidance weight w). A bare tensor stands for a single feature. Returns the loss summed over
        features and the statistics."""
        gen, pos = _as_dict(gen), _as_dict(pos)
        neg = _as_dict(neg) if neg is not None else None
        if set(pos) != set(gen) or (neg is not None and set(neg) != set(gen)):
            raise ValueError(
                f"feature names differ: gen {sorted(gen)}, pos {sorted(pos)}"
                + (f", neg {sorted(neg)}" if neg is not None else "")
            )
        total: Tensor | None = None
        stats: dict[str, Tensor] = {}
        for name in gen:
            loss, feature_stats = self._feature_loss(name, gen[name], pos[name], None if neg is None else neg[name],
                                                     neg_weights)
            total = loss if total is None else total + loss
            stats.update({f"{name}/{k}": v for k, v in feature_stats.items()})
            stats[f"{name}/loss"] = loss.detach()
        if total is None:
            raise ValueError("no features given to DriftingLoss")
        return DriftLossOutput(total, stats)

    def _feature_loss(
        self, name: str, gen: Tensor, pos: Tensor, neg: Tensor | None, neg_weights: Tensor | None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        weights = _check(name, gen, pos, neg, neg_weights)
        parts = [_locations(t) for t in ([gen.detach(), pos] if neg is None else [gen.detach(), neg, pos])]
        g, n, loc, c = parts[0].shape
        t = sum(part.shape[1] for part in parts)
        n_neg = t - pos.shape[1]
        r, n_stats, taus = g * loc, (g if self.statistics == "group" else 1), self.temperatures
        device, f32 = gen.device, torch.float32
        spans = self._spans(g, loc, r if self.max_chunk_elements is None else self.max_chunk_elements // (n * t))
        single = len(spans) == 1
        need_grad = gen.requires_grad and torch.is_grad_enabled()

        def chunks() -> Iterator[_Chunk]:
            # One at a time: a chunk's stat ids and column weights are per-row tensors, R x T values for all chunks.
            for groups, locs in spans:
                yield self._chunk(groups, locs, weights, device)

        with torch.no_grad(), torch.autocast(device.type, enabled=False):
            # One chunk: its targets and distances serve every pass ("all temperatures from one cdist").
            cache: list[tuple[Tensor, Tensor]] = []

            def prepared(ch: _Chunk) -> tuple[Tensor, Tensor]:
                if cache:
                    return cache[0]
                y = _targets(parts, ch, n)
                y_d = (y, _distances(y, n))
                if single:
                    cache.append(y_d)
                return y_d

            # Pass 1, A.6 feature normalisation: S = weighted mean distance, under stop-gradient, from the batch.
            ones = torch.ones(n_stats, dtype=f32, device=device)
            if self.feature_normalization:
                dw_sum, w_sum = torch.zeros_like(ones), torch.zeros_like(ones)
                for ch in chunks():
                    column_sums = prepared(ch)[1].sum(1)  # [rows, T]
                    rows_w = column_sums.new_full((1, t), 1.0) if ch.weights is None else ch.weights
                    dw_sum.index_add_(0, ch.stat_ids, (column_sums * rows_w).sum(-1))
                    w_sum.index_add_(0, ch.stat_ids, rows_w.sum(-1).expand(len(ch.stat_ids)) * n)
                dw_sum, w_sum = self._reduce(dw_sum, w_sum)
                scale = dw_sum / w_sum
                s_in = (scale / math.sqrt(c)).clamp_min(1e-3)
            else:
                scale = s_in = ones
            d_div = scale.clamp_min(1e-3)

            def coefficients(ch: _Chunk, d: Tensor) -> Iterator[Tensor]:
                """W [rows, N, T] per temperature, acting on the features in their own units: V of x / s_in is
                V / s_in, so the features need no scaled copy and lambda is taken on V / s_in."""
                for tau in taus:
                    # Kernels depend on d / tau only, so k(d / S, tau) = k(d, tau * S): no normalised copy of d.
                    yield self._coefficients(d, n_neg, d_div[ch.stat_ids, None, None] * tau, ch.weights)

            # Pass 2, A.6 drift normalisation: lambda_tau = sqrt(mean (V_tau / s_in)^2) per stat group.
            raw_sq = torch.zeros(len(taus), n_stats, dtype=f32, device=device)  # this rank's sum of V^2
            kept: list[Tensor] = []
            if self.drift_normalization:
                keep = single and self.max_chunk_elements is None
                for ch in chunks():
                    y, d = prepared(ch)
                    for k, coef in enumerate(coefficients(ch, d)):
                        v = apply_coefficients(coef, y[:, :n], y)
                        del coef  # before the next temperature's logits exist
                        raw_sq[k].index_add_(0, ch.stat_ids, _sq_norms(v))
                        if keep:
                            kept.append(v)
                        del v
                    del y, d  # before the next chunk's are built
                counts = torch.full_like(ones, r // n_stats * n * c)
                sq, counts = self._reduce(raw_sq, counts)
                lam = (sq / (counts * s_in.square())).clamp_min(1e-8).sqrt()
            else:
                lam = torch.ones(len(taus), n_stats, dtype=f32, device=device)
            if kept:
                cache.clear()

            # Pass 3: F = sum_tau V_tau / (s_in lambda_tau), in normalised units, one chunk at a time.
            factor = 1 / (s_in * lam)  # [temperatures, stat groups]
            force = torch.empty_like(gen, dtype=f32) if need_grad else None
            force_loc = None if force is None else _locations(force)
            f_sq = torch.zeros((), dtype=f32, device=device)
            for ch in chunks():
                if kept:
                    f_c = kept.pop(0).mul_(factor[0, ch.stat_ids, None, None])
                    for k in range(1, len(taus)):
                        f_c.addcmul_(kept.pop(0), factor[k, ch.stat_ids, None, None])
                else:
                    y, d = prepared(ch)
                    w_sum = None  # sum_tau W_tau / (s_in lambda_tau): V is linear in W, so one product per chunk
                    for k, coef in enumerate(coefficients(ch, d)):
                        if not self.drift_normalization:  # the statistics still need each temperature's own V
                            raw_sq[k].index_add_(0, ch.stat_ids, _sq_norms(apply_coefficients(coef, y[:, :n], y)))
                        f_rows = factor[k, ch.stat_ids, None, None]
                        w_sum = coef.mul_(f_rows) if w_sum is None else w_sum.addcmul_(coef, f_rows)
                        del coef
                    del d
                    f_c = apply_coefficients(w_sum, y[:, :n], y)
                    del y, w_sum
                f_sq += _sq_norms(f_c).sum()
                if force_loc is not None:
                    gs, ls = ch.shape
                    force_loc[ch.groups, :, ch.locs].copy_(f_c.view(gs, ls, n, c).transpose(1, 2))
                del f_c
            cache.clear()

            numel = gen.numel()
            # Table 8: sum_tau mean(V~_tau^2), one MSE per temperature; authors' code: mean(F^2), one MSE against
            # the summed field.
            value = (raw_sq * factor.square()).sum() / numel if self.loss_per_temperature else f_sq / numel
            # Both readings have the gradient of the MSE against the summed field: d/dgen = -2 F / (s_in numel).
            grad_scale = (-2.0 / numel / s_in).view(-1, *([1] * (gen.dim() - 1)))

        loss = _DriftMSE.apply(gen, value, force, grad_scale) if need_grad else value
        stats = {"scale": scale.mean()}
        for k, tau in enumerate(taus):
            stats[f"lambda/tau{tau:g}"] = lam[k].mean()
            stats[f"drift_sq_norm/tau{tau:g}"] = raw_sq[k].sum() / (r * n)
        return loss, stats

    def _coefficients(self, d: Tensor, n_neg: int, temperature: Tensor, weights: Tensor | None) -> Tensor:
        """One temperature's coefficients W [rows, N, T] from distances d [rows, N, T]: the kernel's logits, which
        MeanShift turns into W in place, so W is the one [rows, N, T] matrix that outlives this frame (with d)."""
        logits = self.kernel.logits(d, temperature)
        if self.mask_self and self.field.masks_self:
            mask_self_pairs(logits)
        return self.field.coefficients(logits, n_neg, weights)

    @staticmethod
    def _spans(g: int, loc: int, rows: int) -> list[tuple[slice, slice]]:
        """(groups, locations) of chunks of at most ``rows`` rows (at least one): whole class groups if a group's
        locations fit, else locations of one group, so that every chunk is a plain slice of [G, K, L, C] features."""
        rows = max(1, rows)
        if rows >= loc:
            step = rows // loc
            return [(slice(a, min(a + step, g)), slice(0, loc)) for a in range(0, g, step)]
        return [(slice(a, a + 1), slice(b, min(b + rows, loc))) for a in range(g) for b in range(0, loc, rows)]

    def _chunk(self, groups: slice, locs: slice, weights: Tensor | None, device: torch.device) -> _Chunk:
        """The rows of one span: their stat ids and column weights, row = (group, location)."""
        ls = locs.stop - locs.start
        ids = torch.arange(groups.start, groups.stop, device=device).repeat_interleave(ls)
        if self.statistics == "batch":
            ids = torch.zeros_like(ids)
        w = None if weights is None else weights[groups].repeat_interleave(ls, dim=0)
        return _Chunk(groups, locs, ids, w)

    def _reduce(self, *sums: Tensor) -> tuple[Tensor, ...]:
        if not (self.distributed_statistics and self.statistics == "batch"):
            return sums
        if not (dist.is_available() and dist.is_initialized()):
            return sums
        packed = torch.cat([s.reshape(-1) for s in sums])
        dist.all_reduce(packed)
        return tuple(p.reshape(s.shape) for p, s in zip(packed.split([s.numel() for s in sums]), sums, strict=True))


def _as_dict(x: Tensor | FeatureDict) -> dict[str, Tensor]:
    return {"x": x} if isinstance(x, Tensor) else dict(x)


def _locations(t: Tensor) -> Tensor:
    """[G, K, C] -> [G, K, 1, C] view; [G, K, L, C] as is."""
    return t.unsqueeze(2) if t.dim() == 3 else t


def _targets(parts: list[Tensor], ch: _Chunk, n: int) -> Tensor:
    """Centred float32 targets [rows, T, C] of one chunk: cat(gen, neg, pos) along samples, row = (group, location).

    The layout change [G, K, L, C] -> rows happens here, per chunk, in the one copy that also converts to float32.
    Centring on the generated mean changes neither distances nor V (both translation invariant) but keeps
    ||x||^2 + ||y||^2 - 2 x.y from cancelling away the digits of features with a large common offset.
    """
    gs, ls = ch.shape
    t, c = sum(p.shape[1] for p in parts), parts[0].shape[-1]
    y = torch.empty(gs, ls, t, c, dtype=torch.float32, device=parts[0].device)
    start = 0
    for part in parts:
        k = part.shape[1]
        y[:, :, start : start + k].copy_(part[ch.groups, :, ch.locs].transpose(1, 2))
        start += k
    y = y.view(gs * ls, t, c)
    return y.sub_(y[:, :n].mean(1, keepdim=True))


def _distances(y: Tensor, n: int) -> Tensor:
    """Plain L2 distances [rows, N, T] of the first N targets (the generated samples) to all T targets [rows, T, C].

    Up to DIRECT_CHANNELS channels: sum_c (x_c - y_c)^2, one channel at a time, exact for close points, where the
    product form loses digits (1-D, 2-D toy data). Beyond: ||x||^2 + ||y||^2 - 2 x.y in one matrix, the product
    added in place (torch.cdist's matmul path would copy both sides padded with norms and ones); x_i to itself is
    exactly 0.
    """
    rows, t, c = y.shape
    if c <= DIRECT_CHANNELS:
        d = y.new_zeros(rows, n, t)
        for k in range(c):
            diff = y[:, :n, k, None] - y[:, None, :, k]
            d.addcmul_(diff, diff)
        return d.sqrt_()
    sq = torch.linalg.vector_norm(y, dim=-1).square_()
    d = (sq[:, :n, None] + sq[:, None, :]).baddbmm_(y[:, :n], y.transpose(1, 2), alpha=-2)
    d = d.clamp_min_(0).sqrt_()
    d[:, :, :n].diagonal(dim1=1, dim2=2).zero_()
    return d


def _sq_norms(v: Tensor) -> Tensor:
    """sum of v^2 per row of v [rows, N, C] -> [rows], without a [rows, N, C] temporary (norms over C, then a sum)."""
    return torch.linalg.vector_norm(v, dim=-1).square_().sum(-1)


def _check(name: str, gen: Tensor, pos: Tensor, neg: Tensor | None, neg_weights: Tensor | None) -> Tensor | None:
    """Validates one feature's shapes; returns the column weights [G, T] = cat(ones(N), w, ones(P)) or None."""
    shapes = f"gen {tuple(gen.shape)}, pos {tuple(pos.shape)}" + ("" if neg is None else f", neg {tuple(neg.shape)}")
    if gen.dim() not in (3, 4):
        raise ValueError(f"feature {name!r}: gen must be [G, N, C] or [G, N, L, C], got {shapes}")
    if pos.dim() != gen.dim() or (neg is not None and neg.dim() != gen.dim()):
        raise ValueError(f"feature {name!r}: gen, pos and neg must have the same number of dims, got {shapes}")
    if pos.shape[1] == 0:
        raise ValueError(f"feature {name!r}: positives are empty ({shapes}); each group needs at least one")
    if gen.shape[1] == 0:
        raise ValueError(f"feature {name!r}: no generated samples ({shapes})")
    for other in [pos] + ([] if neg is None else [neg]):
        if other.shape[0] != gen.shape[0] or other.shape[2:] != gen.shape[2:]:
            raise ValueError(f"feature {name!r}: groups, locations and channels must agree, got {shapes}")
    if neg is None:
        if neg_weights is not None:
            raise ValueError("neg_weights given without neg")
        return None
    g, m, n, p = gen.shape[0], neg.shape[1], gen.shape[1], pos.shape[1]
    with torch.no_grad():
        w = torch.ones(g, m, device=gen.device) if neg_weights is None else neg_weights.float().to(gen.device)
        if w.dim() == 1:
            w = w.unsqueeze(1).expand(g, m)
        if w.shape != (g, m):
            raise ValueError(f"neg_weights must be [G] or [G, M] = [{g}] or [{g}, {m}], got {tuple(w.shape)}")
        return torch.cat([torch.ones(g, n, device=w.device), w, torch.ones(g, p, device=w.device)], dim=1)
