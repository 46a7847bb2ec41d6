"""DriftingLoss: feature dict -> loss, with feature scale, several temperatures and drift normalisation.

The specification is ``drift/reference.py::authors_loss``, the literal transcription of PAPER.md 3 ("Exact reading
of the authors' loss"); tests hold this file to it at float32 rounding. Read ``_feature_loss`` against PAPER.md 3,
one step at a time (comments cite the paper: ``# A.6`` is paper appendix A.6, ``# Alg. 2`` its Algorithm 2):
1. feature scale S and the input scale s_in (A.6), from every row's distances;
2. each temperature's field V_tau and its sum of squares (Alg. 2, PAPER.md 2), for lambda_tau (A.6);
3. the force F = sum over tau of V_tau / (s_in lambda_tau), in the normalised units of the loss;
4. the loss MSE(gen / s_in, sg(gen / s_in + F)) (PAPER.md 1) from F alone: its value is mean F^2 and its gradient
   -2 F / (s_in numel) (``stop_gradient.StopGradientMSE``; the force buffer is written as that gradient).
The rows (class group x location) are walked in chunks under ``max_chunk_elements`` by ``chunks.RowWalk``, whose
docstring is where the memory budget is explained; everything here runs in float32, autocast off, no autograd.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn

from drifting_lightning.drift.chunks import Chunk, RowWalk, Workspace, field_slabs, sq_sum
from drifting_lightning.drift.fields import DriftField, MeanShift
from drifting_lightning.drift.functional import is_temperature, mask_self_pairs
from drifting_lightning.drift.kernels import Kernel, Laplace
from drifting_lightning.drift.stop_gradient import StopGradientMSE

FeatureDict = Mapping[str, Tensor]

@dataclass
class DriftLossOutput:
    """loss: scalar to minimise; drift_sq_norm: [temperatures] the un-normalised mean ||V_tau||^2 summed over
    features (an honest progress signal, PAPER.md 3); stats: detached scalars worth logging, ``<feature>/<name>``."""

    loss: Tensor
    drift_sq_norm: Tensor
    stats: dict[str, Tensor] = field(default_factory=dict)


@dataclass
class _Statistics:
    """Per statistics group (one, or one per class group): S, s_in, lambda [temperatures, groups] and this rank's
    sums of V_tau^2 [temperatures, groups] in feature units."""

    scale: Tensor
    s_in: Tensor
    lam: Tensor
    raw_sq: Tensor


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
    max_chunk_elements: bound on rows x N x T per chunk (None: no bound); the memory it buys is explained in
    ``drifting_lightning.drift.chunks`` (``chunk_budget_bytes``). On the CPU the loss keeps that working memory
    from one call to the next (see ``_workspace_for``).
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
        self._cpu_workspaces: dict[int, Workspace] = {}

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
        features (PAPER.md 3) and the statistics."""
        gen, pos = _as_dict(gen), _as_dict(pos)
        neg = _as_dict(neg) if neg is not None else None
        if set(pos) != set(gen) or (neg is not None and set(neg) != set(gen)):
            raise ValueError(
                f"feature names differ: gen {sorted(gen)}, pos {sorted(pos)}"
                + (f", neg {sorted(neg)}" if neg is not None else "")
            )
        if not gen:
            raise ValueError("no features given to DriftingLoss")
        losses, sq_norms, stats = [], [], {}
        # One for every feature (they run one after the other). On the CPU it outlives the call (see _workspace_for).
        workspace = self._workspace_for(next(iter(gen.values())).device)
        for name in gen:
            loss, st, rows = self._feature_loss(name, gen[name], pos[name], None if neg is None else neg[name],
                                                neg_weights, workspace)
            sq_norm = st.raw_sq.sum(1) / rows  # mean ||V_tau||^2 over this rank's generated samples
            losses.append(loss)
            sq_norms.append(sq_norm)
            stats[f"{name}/scale"] = st.scale.mean()
            for k, tau in enumerate(self.temperatures):
                stats[f"{name}/lambda/tau{tau:g}"] = st.lam[k].mean()
                stats[f"{name}/drift_sq_norm/tau{tau:g}"] = sq_norm[k]
            stats[f"{name}/loss"] = loss.detach()
        return DriftLossOutput(sum(losses[1:], losses[0]), sum(sq_norms[1:], sq_norms[0]), stats)

    def _workspace_for(self, device: torch.device) -> Workspace:
        """The CPU workspace lives as long as the loss: a step's buffers are then already faulted in for the next
        step (drift/chunks.py), at the price of holding them between steps (at most the chunk budget plus the kept
        matrices, which every step needs anyway while the generator's activations are alive). On a GPU the caching
        allocator already reuses memory, so a new workspace per call returns it to the allocator at the end."""
        if device.type != "cpu":
            return Workspace()
        # one per thread: a loss shared by threads (e.g. ranks simulated as threads) must not share buffers
        return self._cpu_workspaces.setdefault(threading.get_ident(), Workspace())

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state["_cpu_workspaces"] = {}  # buffers, not state: a copy or a pickle starts without them
        return state

    def _feature_loss(
        self, name: str, gen: Tensor, pos: Tensor, neg: Tensor | None, neg_weights: Tensor | None,
        workspace: Workspace,
    ) -> tuple[Tensor, _Statistics, int]:
        """One feature's loss, its statistics and its number of generated samples (rows x N)."""
        weights = _check(name, gen, pos, neg, neg_weights)
        parts = [_locations(t) for t in ([gen.detach(), pos] if neg is None else [gen.detach(), neg, pos])]
        walk = RowWalk(parts, weights, self.statistics == "group", self.max_chunk_elements, len(self.temperatures),
                       workspace)
        need_grad = gen.requires_grad and torch.is_grad_enabled()
        with torch.no_grad(), torch.autocast(gen.device.type, enabled=False):
            st = self._feature_scale(walk)  # A.6
            keep = walk.keep_fields or walk.keep_coefficients
            kept = self._fields(walk, st) if self.drift_normalization or keep else None
            if self.drift_normalization:
                st.lam = self._drift_normalisation(walk, st)  # A.6
            factor = 1 / (st.s_in * st.lam)  # [temperatures, groups]: V_tau -> V_tau / (s_in lambda_tau)
            numel = gen.numel()
            # The loss's gradient is -2 F / (s_in numel): the force buffer is written with that factor in, so it is
            # the gradient as it stands (its sum of squares is scaled back for the value).
            grad_scale = -2.0 / numel / st.s_in if need_grad else torch.ones_like(st.s_in)
            force = torch.empty_like(gen, dtype=torch.float32) if need_grad else None
            f_sq = (self._force(walk, st, factor * grad_scale, kept, force) / grad_scale.square()).sum()
            # Table 8: sum_tau mean(V~_tau^2), one MSE per temperature; authors' code: mean(F^2), one MSE against
            # the summed field. Both have the gradient of the latter.
            value = (st.raw_sq * factor.square()).sum() / numel if self.loss_per_temperature else f_sq / numel
        loss = StopGradientMSE.apply(gen, value, force) if need_grad else value
        return loss, st, walk.rows * walk.n

    def _feature_scale(self, walk: RowWalk) -> _Statistics:
        """A.6: S = weighted mean distance of the generated samples to all targets (under stop-gradient, from the
        batch), s_in = max(S / sqrt(C), 1e-3) the scale the features are divided by. Pass 1 over the rows."""
        n_stats = walk.g if walk.per_group else 1
        ones = torch.ones(n_stats, device=walk.device, dtype=torch.float32)
        lam = torch.ones(len(self.temperatures), n_stats, device=walk.device, dtype=torch.float32)
        raw_sq = torch.zeros_like(lam)
        if not self.feature_normalization:
            return _Statistics(ones, ones, lam, raw_sq)
        dw_sum, w_sum = torch.zeros_like(ones), torch.zeros_like(ones)
        for ch in walk.chunks():
            if ch.weights is None:
                dw_sum.index_add_(0, ch.stat_ids, ch.distances.sum((1, 2)))
                w_sum.index_add_(0, ch.stat_ids, torch.full_like(ch.stat_ids, walk.t * walk.n, dtype=torch.float32))
            else:  # the weights are per column: weigh each row's column sums (a product with them is 2x slower)
                dw_sum.index_add_(0, ch.stat_ids, ch.distances.sum(1).mul_(ch.weights).sum(-1))
                w_sum.index_add_(0, ch.stat_ids, ch.weights.sum(-1) * walk.n)
        dw_sum, w_sum = self._reduce(dw_sum, w_sum)
        scale = dw_sum / w_sum
        return _Statistics(scale, (scale / math.sqrt(walk.c)).clamp_min(1e-3), lam, raw_sq)

    def _drift_normalisation(self, walk: RowWalk, st: _Statistics) -> Tensor:
        """A.6: lambda_tau = sqrt(mean (V_tau / s_in)^2) over every generated sample and channel of the group."""
        counts = torch.full_like(st.s_in, walk.rows // len(st.s_in) * walk.n * walk.c)
        sq, counts = self._reduce(st.raw_sq, counts)
        return (sq / (counts * st.s_in.square())).clamp_min(1e-8).sqrt()

    def _coefficients(self, walk: RowWalk, ch: Chunk, st: _Statistics, out: Tensor | None = None) -> Iterator[Tensor]:
        """Alg. 2 per temperature: W_tau [rows, N, T] with V_tau = W_tau @ Y in feature units (``_fold``), in
        ``out[k]`` for temperature k when given, else in one reused workspace matrix.

        A.6 divides distances by S; kernels depend on d / tau only, so k(d / S, tau) = k(d, tau S): no normalised
        copy of the distances. Each W is the kernel's logits, turned into coefficients in place by the field. The
        field may take them relative to each row's largest logit: kernels fall with distance, so that is the logit
        of the row's smallest distance, found once for every temperature. On the CPU the field runs over the chunk
        in slabs of rows (``chunks.FIELD_SLAB_ELEMENTS``): its dozen passes then stay near the cache."""
        d_div = ch.per_row(st.scale.clamp_min(1e-3))
        masked = self.mask_self and self.field.masks_self
        hint = walk.device.type == "cpu" and self.field.uses_row_maxima
        nearest = _nearest(ch.distances, walk.n, masked) if hint else None
        slabs = [(s, ch.distances[s], _slab_of(d_div, s), _slab_of(nearest, s), _slab_of(ch.weights, s))
                 for s in field_slabs(len(ch.stat_ids), walk.n * walk.t, walk.device)]
        for k, tau in enumerate(self.temperatures):
            coef = out[k] if out is not None else walk.workspace.take("logits", ch.distances.shape, walk.device)
            for s, d, div, near, weights in slabs:
                self._slab_coefficients(d, div * tau, near, weights, walk, masked, coef[s])
            yield coef

    def _slab_coefficients(
        self, distances: Tensor, temperature: Tensor, nearest: Tensor | None, weights: Tensor | None,
        walk: RowWalk, masked: bool, out: Tensor,
    ) -> None:
        """One temperature's W for a slab of a chunk's rows into ``out``, ``temperature`` tau S (``_coefficients``)."""
        result = None
        if nearest is not None:  # relative to each row's largest, which the field takes as a hint
            logits = self.kernel.relative_logits(distances, temperature, nearest, out=out)
            row_maxima = self.kernel.logits(nearest, temperature)
            result = self.field.coefficients_and_row_sums(_masked(logits, masked), walk.n_neg, weights, row_maxima)
        if result is None:  # no hint, or the field spent the relative logits and asks for plain ones
            logits = self.kernel.logits(distances, temperature, out=out)
            result = self.field.coefficients_and_row_sums(_masked(logits, masked), walk.n_neg, weights)
        coef = _fold(*result, walk.n)
        if coef.data_ptr() != out.data_ptr():  # a field that returns a new matrix (e.g. SinkhornDrift)
            out.copy_(coef)

    def _fields(self, walk: RowWalk, st: _Statistics) -> Tensor | None:
        """Pass 2: every temperature's V per chunk and its sum of squares into ``st.raw_sq``. Returns what the force
        needs kept ([temperatures, R, N, C or T], else None: the force pass recomputes them): the fields
        themselves when ``walk.keep_fields``, or their coefficients W when ``walk.keep_coefficients`` (the force
        is then one product of their weighted sum)."""
        kept = None
        if walk.keep_fields or walk.keep_coefficients:
            size = walk.c if walk.keep_fields else walk.t
            kept = walk.workspace.take("kept_fields", (len(self.temperatures), walk.rows, walk.n, size), walk.device)
        for ch in walk.chunks():
            coef_out = kept[:, ch.rows] if walk.keep_coefficients else None
            for k, coef in enumerate(self._coefficients(walk, ch, st, coef_out)):
                v_shape = (len(ch.stat_ids), walk.n, walk.c)
                v_out = kept[k, ch.rows] if walk.keep_fields else walk.workspace.take("field", v_shape, walk.device)
                v = torch.bmm(coef, ch.targets, out=v_out)
                ch.add_sq_sums(st.raw_sq[k], v, walk.per_group)
        return kept

    def _force(
        self, walk: RowWalk, st: _Statistics, factor: Tensor, kept: Tensor | None, force: Tensor | None
    ) -> Tensor:
        """sum_tau factor_tau V_tau into ``force`` (gen's shape; None: value only); returns its sum of squares per
        statistics group.

        From the kept fields (their weighted sum, written in gen's layout), else in one product per chunk: V is
        linear in W, so F = (sum_tau W_tau factor_tau) @ Y, from the kept coefficients or recomputed ones (that
        pass also sums each V_tau^2 when pass 2 did not run)."""
        f_sq = torch.zeros_like(st.s_in)
        force_loc = None if force is None else _locations(force)
        # one statistics group and a contiguous force: its sum of squares in one product at the end
        at_end = force is not None and not walk.per_group and force.is_contiguous()
        for ch in walk.chunks(data=not walk.keep_fields):
            rows = (len(ch.stat_ids), walk.n, walk.c)
            if walk.keep_fields:
                vs = kept[:, ch.rows]
                region = walk.workspace.take("field", rows, walk.device) if force_loc is None else None
                f_c = walk.in_layout(region, ch) if region is not None else force_loc[ch.groups, :, ch.locs]
                torch.mul(walk.in_layout(vs[0], ch), ch.per_row_in_layout(factor[0]), out=f_c)
                for k in range(1, len(vs)):
                    f_c.addcmul_(walk.in_layout(vs[k], ch), ch.per_row_in_layout(factor[k]))
                if not at_end:
                    ch.add_sq_sums(f_sq, f_c, walk.per_group)
                continue
            if walk.keep_coefficients:
                ws = kept[:, ch.rows]
                w_sum = ws[0].mul_(ch.per_row(factor[0]))
                for k in range(1, len(ws)):
                    w_sum.addcmul_(ws[k], ch.per_row(factor[k]))
            else:
                w_sum = walk.workspace.take("coefficient_sum", ch.distances.shape, walk.device)
                for k, coef in enumerate(self._coefficients(walk, ch, st)):
                    if not self.drift_normalization:  # the statistics need each V_tau
                        v = torch.bmm(coef, ch.targets, out=walk.workspace.take("field", rows, walk.device))
                        ch.add_sq_sums(st.raw_sq[k], v, walk.per_group)
                    f_rows = ch.per_row(factor[k])
                    torch.mul(coef, f_rows, out=w_sum) if k == 0 else w_sum.addcmul_(coef, f_rows)
            if force_loc is None:
                f_c = torch.bmm(w_sum, ch.targets, out=walk.workspace.take("field", rows, walk.device))
                ch.add_sq_sums(f_sq, f_c, walk.per_group)
                continue
            for w_rows, y_rows, out in walk.group_views(force_loc, ch, w_sum, ch.targets):
                torch.bmm(w_rows, y_rows, out=out)  # written in gen's layout: the product takes strided outputs
            if not at_end:
                ch.add_sq_sums(f_sq, force_loc[ch.groups, :, ch.locs], walk.per_group)
        if at_end:
            f_sq[0] = sq_sum(force)
        return f_sq

    def _reduce(self, *sums: Tensor) -> tuple[Tensor, ...]:
        """Sums over ranks in "batch" mode with ``distributed_statistics`` (one all-reduce), else as they are."""
        if not (self.distributed_statistics and self.statistics == "batch"):
            return sums
        if not (dist.is_available() and dist.is_initialized()):
            return sums
        packed = torch.cat([s.reshape(-1) for s in sums])
        dist.all_reduce(packed)
        return tuple(p.reshape(s.shape) for p, s in zip(packed.split([s.numel() for s in sums]), sums, strict=True))


def _slab_of(t: Tensor | None, rows: slice) -> Tensor | None:
    """The slab's rows of a per-row tensor of a chunk; a 0-d factor (shared by every row) or None as it is."""
    return t if t is None or t.dim() == 0 else t[rows]


def _masked(logits: Tensor, masked: bool) -> Tensor:
    return mask_self_pairs(logits) if masked else logits


def _fold(coef: Tensor, row_sums: Tensor, n: int) -> Tensor:
    """W with V = W @ Y - rowsum(W) x turned into V = W' @ Y, ONE product (in place): the first N targets are the
    generated samples x themselves, so -rowsum(W) joins the diagonal of W's generated block."""
    coef[..., :n].diagonal(dim1=-2, dim2=-1).sub_(row_sums.squeeze(-1))
    return coef


def _nearest(d: Tensor, n: int, masked: bool) -> Tensor:
    """Each row's smallest distance [rows, N, 1], self-pairs left out when ``masked``: their distance becomes +inf for
    good (the mask overwrites their logits anyway). Kernels fall with distance: its logit is the row's largest."""
    if masked:
        d[:, :, :n].diagonal(dim1=1, dim2=2).fill_(math.inf)
    return d.amin(-1, keepdim=True)


def _as_dict(x: Tensor | FeatureDict) -> dict[str, Tensor]:
    return {"x": x} if isinstance(x, Tensor) else dict(x)


def _locations(t: Tensor) -> Tensor:
    """[G, K, C] -> [G, K, 1, C] view; [G, K, L, C] as is."""
    return t.unsqueeze(2) if t.dim() == 3 else t


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
        # float32 whatever the default dtype (a "-true" precision sets it for the forward)
        ones = {"device": gen.device, "dtype": torch.float32}
        w = torch.ones(g, m, **ones) if neg_weights is None else neg_weights.float().to(gen.device)
        if w.dim() == 1:
            w = w.unsqueeze(1).expand(g, m)
        if w.shape != (g, m):
            raise ValueError(f"neg_weights must be [G] or [G, M] = [{g}] or [{g}, {m}], got {tuple(w.shape)}")
        return torch.cat([torch.ones(g, n, **ones), w, torch.ones(g, p, **ones)], dim=1)
