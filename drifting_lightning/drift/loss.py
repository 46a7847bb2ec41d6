"""DriftingLoss: feature dict -> loss, with feature scale, several temperatures and drift normalisation (PAPER.md 3).

Per feature set of dimension C the engine regroups samples to rows [G*L, N, C] (G class groups x L locations),
computes one distance matrix per row against cat(generated, extra negatives, positives), derives every temperature's
field from it, normalises, and returns one MSE against the stop-gradient target gen + V. All drift math runs in
float32 with autocast off and without gradients; only the final MSE carries gradient to the generated features.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from drifting_lightning.drift.fields import DriftField, MeanShift
from drifting_lightning.drift.functional import apply_coefficients, mask_self_pairs
from drifting_lightning.drift.kernels import Kernel, Laplace

FeatureDict = Mapping[str, Tensor]


@dataclass
class DriftLossOutput:
    """loss: scalar to minimise; stats: detached scalars worth logging, keyed ``<feature>/<statistic>``."""

    loss: Tensor
    stats: dict[str, Tensor] = field(default_factory=dict)


@dataclass
class _Rows:
    """One feature regrouped to rows: gen [R, N, C], targets' pieces, column weights [R, T] and stat ids [R]."""

    gen: Tensor
    neg: Tensor | None
    pos: Tensor
    weights: Tensor | None
    stat_ids: Tensor
    n_stats: int


class DriftingLoss(nn.Module):
    """The drifting loss over one or many feature sets (PAPER.md 2-3, 5).

    kernel: distance -> logit (default Laplace); field: logits -> drift coefficients (default MeanShift("both")).
    temperatures: all computed from one distance matrix. feature_normalization: divide distances by their weighted
    batch mean S and features by S / sqrt(C) (A.6). drift_normalization: divide each temperature's V by
    lambda = sqrt(mean V^2). loss_per_temperature: one MSE per temperature, summed (paper Table 8) instead of one MSE
    against the summed field (authors' code, default). statistics: "batch" shares S and lambda over all groups (code),
    "group" keeps one per class group (all locations of a group always share them). distributed_statistics:
    all-reduce S and lambda sums over ranks in "batch" mode so results do not depend on the number of ranks.
    max_chunk_elements: bound on the elements of one [rows, N, T] matrix; rows are processed in chunks under it.
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
        if not temperatures or any(t <= 0 for t in temperatures):
            raise ValueError(f"temperatures must be a non-empty list of positive numbers, got {list(temperatures)}")
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
        rows = _regroup(name, gen, pos, neg, neg_weights, per_group=self.statistics == "group")
        r, n, c = rows.gen.shape
        n_neg = n + (0 if rows.neg is None else rows.neg.shape[1])
        t = n_neg + rows.pos.shape[1]
        chunk = r if self.max_chunk_elements is None else max(1, self.max_chunk_elements // (n * t))
        bounds = [(a, min(a + chunk, r)) for a in range(0, r, chunk)]
        with torch.no_grad(), torch.autocast(rows.gen.device.type, enabled=False):
            x = rows.gen.detach().float()

            def targets(a: int, b: int) -> Tensor:
                parts = [x[a:b]] + ([] if rows.neg is None else [rows.neg[a:b].float()]) + [rows.pos[a:b].float()]
                return torch.cat(parts, dim=1)

            # A.6 feature normalisation: S = weighted mean distance, under stop-gradient, from the current batch.
            cached: Tensor | None = None
            ones = torch.ones(rows.n_stats, dtype=torch.float32, device=x.device)
            if self.feature_normalization:
                dw_sum, w_sum = torch.zeros_like(ones), torch.zeros_like(ones)
                for a, b in bounds:
                    d = torch.cdist(x[a:b], targets(a, b))
                    w = rows.weights[a:b] if rows.weights is not None else torch.ones_like(d[:, 0])
                    dw_sum.index_add_(0, rows.stat_ids[a:b], (d * w.unsqueeze(1)).sum((1, 2)))
                    w_sum.index_add_(0, rows.stat_ids[a:b], w.sum(-1) * n)
                    cached = d if len(bounds) == 1 else None
                dw_sum, w_sum = self._reduce(dw_sum, w_sum)
                scale = dw_sum / w_sum
            else:
                scale = ones
            s_in = (scale / math.sqrt(c)).clamp_min(1e-3) if self.feature_normalization else ones
            d_div = scale.clamp_min(1e-3)
            s_in_rows, d_div_rows = s_in[rows.stat_ids], d_div[rows.stat_ids]

            fields = torch.empty((len(self.temperatures), r, n, c), dtype=torch.float32, device=x.device)
            sq = torch.zeros(len(self.temperatures), rows.n_stats, dtype=torch.float32, device=x.device)
            raw_sq = torch.zeros(len(self.temperatures), dtype=torch.float32, device=x.device)
            for a, b in bounds:
                ys = targets(a, b)
                d = cached if cached is not None else torch.cdist(x[a:b], ys)
                ys = ys / s_in_rows[a:b, None, None]
                xs = ys[:, :n]
                w = None if rows.weights is None else rows.weights[a:b]
                for k, tau in enumerate(self.temperatures):
                    # Kernels depend on d / tau only, so k(d / S, tau) = k(d, tau * S): no normalised copy of d.
                    logits = self.kernel.logits(d, d_div_rows[a:b, None, None] * tau)
                    if self.mask_self and self.field.masks_self:
                        mask_self_pairs(logits)
                    v = apply_coefficients(self.field.coefficients(logits, n_neg, w), xs, ys)
                    fields[k, a:b] = v
                    v_sq = v.square().sum((1, 2))
                    sq[k].index_add_(0, rows.stat_ids[a:b], v_sq)
                    raw_sq[k] += (v_sq * s_in_rows[a:b].square()).sum()
            counts = torch.zeros_like(ones).index_add_(0, rows.stat_ids, torch.full_like(s_in_rows, n * c))
            sq, counts = self._reduce(sq, counts)
            # A.6 drift normalisation: lambda = sqrt(mean V^2), so that E||V~||^2 / C = 1 per temperature.
            lam = (sq / counts).clamp_min(1e-8).sqrt() if self.drift_normalization else torch.ones_like(sq)
            fields /= lam[:, rows.stat_ids, None, None]
            x_scaled = x / s_in_rows[:, None, None]

        prediction = rows.gen.float() / s_in_rows[:, None, None]
        if self.loss_per_temperature:
            loss = sum(F.mse_loss(prediction, x_scaled + v) for v in fields)
        else:
            loss = F.mse_loss(prediction, x_scaled + fields.sum(0))
        stats = {"scale": scale.mean()}
        for k, tau in enumerate(self.temperatures):
            stats[f"lambda/tau{tau:g}"] = lam[k].mean()
            stats[f"drift_sq_norm/tau{tau:g}"] = raw_sq[k] / (r * n)
        return loss, stats

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


def _regroup(
    name: str, gen: Tensor, pos: Tensor, neg: Tensor | None, neg_weights: Tensor | None, per_group: bool
) -> _Rows:
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
    g = gen.shape[0]
    loc = gen.shape[2] if gen.dim() == 4 else 1

    def rows(t: Tensor) -> Tensor:
        return t.transpose(1, 2).reshape(g * loc, t.shape[1], t.shape[-1]) if t.dim() == 4 else t

    weights = None
    if neg is not None:
        m, n, p = neg.shape[1], gen.shape[1], pos.shape[1]
        w = torch.ones(g, m, device=gen.device) if neg_weights is None else neg_weights.float().to(gen.device)
        if w.dim() == 1:
            w = w.unsqueeze(1).expand(g, m)
        if w.shape != (g, m):
            raise ValueError(f"neg_weights must be [G] or [G, M] = [{g}] or [{g}, {m}], got {tuple(w.shape)}")
        w = torch.cat([torch.ones(g, n, device=w.device), w, torch.ones(g, p, device=w.device)], dim=1)
        weights = w.repeat_interleave(loc, dim=0)
    elif neg_weights is not None:
        raise ValueError("neg_weights given without neg")
    if per_group:
        stat_ids = torch.arange(g, device=gen.device).repeat_interleave(loc)
    else:
        stat_ids = torch.zeros(g * loc, dtype=torch.long, device=gen.device)
    return _Rows(rows(gen), None if neg is None else rows(neg), rows(pos), weights, stat_ids, g if per_group else 1)
