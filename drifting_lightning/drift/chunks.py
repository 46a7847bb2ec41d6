"""The rows of one feature, walked in chunks under a memory bound: the machinery behind loss.py, no paper step.

A feature [G, K, L, C] has R = G x L rows (class group, location); each row is N generated samples against
T = N + M + P targets (the generated samples, extra negatives, positives). The loss walks the rows chunk by chunk,
and per chunk works on [rows, N, T] float32 matrices.

Memory (the one place it is explained). ``max_chunk_elements`` bounds rows x N x T, the elements of ONE such
matrix. Per chunk at most ``LIVE_MATRICES`` = 3 are alive: the distances, one temperature's logits that the field
turns into coefficients in place (its normalisers are vectors) and the running sum of the temperatures'
coefficients when the force needs a pass of its own, plus
(T + N) C float32 values per row: the centred targets [rows, T, C] and one field [rows, N, C]. So a chunk
needs at most ``chunk_budget_bytes`` = 4 B x rows x (3 N T + (T + N) C). Beyond the chunks the loss holds one float32
force buffer the size of the generated features (it becomes the gradient in place) and per-row vectors. What may
outlive a chunk, to save recomputation:
- every chunk's targets and distances (pass 1 to pass 2), when all R rows' distances fit in one bound
  (R N T <= max_chunk_elements, or no bound): then the whole feature is no larger than one chunk would be;
- every temperature's field V (pass 2 to the force), or its coefficients W when T < C (the smaller), when they
  fit in one bound (len(taus) R N min(T, C) <= max_chunk_elements, or no bound): at most max_chunk_elements more
  float32 values, and no third pass. Kept W also imply kept targets (R N T <= the bound).
Without a bound, chunks on the CPU hold ``CACHE_ELEMENTS`` (the matrix passes then stay near the cache); on a GPU
one chunk holds every row (fewer, larger kernels).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

# [rows, N, T] float32 matrices alive at once per chunk, at most (see the module docstring).
LIVE_MATRICES = 3
# Elements of one [rows, N, T] matrix per CPU chunk when the bound allows more (4 MiB). Measured on a 2-core Xeon
# (benchmarks/drift_loss.py shapes, one thread): below 2**17 the per-operation overhead of small chunks dominates
# (2**14: 3-4x slower), and whole matrices of 4096 rows stream from memory (1.3x slower than 2**20).
CACHE_ELEMENTS = 2**20
# Up to this many channels, distances come from per-channel differences (exact) instead of the matrix product.
DIRECT_CHANNELS = 8


def chunk_budget_bytes(max_chunk_elements: int, n: int, t: int, c: int) -> int:
    """Upper bound on the working memory of one chunk, in bytes, for N generated samples, T targets, C channels:
    rows = max(1, max_chunk_elements // (N T)) rows of LIVE_MATRICES [N, T] matrices and (T + N) C values."""
    rows = max(1, max_chunk_elements // (n * t))
    return 4 * rows * (LIVE_MATRICES * n * t + (t + n) * c)


@dataclass
class Chunk:
    """Rows of one chunk: class groups x locations, their statistics ids [rows], column weights [rows, T] (or None),
    centred float32 targets [rows, T, C] (generated samples first) and distances [rows, N, T] (None when the walk
    was asked for the rows only)."""

    groups: slice
    locs: slice
    stat_ids: Tensor
    weights: Tensor | None
    targets: Tensor | None = None
    distances: Tensor | None = None


class RowWalk:
    """The chunks of one feature. parts: [gen (detached), neg?, pos], each [G, K, L, C]; weights: [G, T] column
    weights or None; per_group: one statistics id per class group (else all rows share id 0)."""

    def __init__(
        self, parts: list[Tensor], weights: Tensor | None, per_group: bool, max_chunk_elements: int | None,
        n_fields: int,
    ) -> None:
        g, n, loc, c = parts[0].shape
        t = sum(p.shape[1] for p in parts)
        self.parts, self.weights, self.per_group = parts, weights, per_group
        self.g, self.n, self.loc, self.c, self.t = g, n, loc, c, t
        self.rows = g * loc
        self.n_neg = t - parts[-1].shape[1]  # the generated samples and the extra negatives
        bound = max_chunk_elements
        on_gpu = parts[0].device.type != "cpu"
        per_chunk = self.rows if on_gpu else max(1, CACHE_ELEMENTS // (n * t))
        if bound is not None:
            per_chunk = min(per_chunk, max(1, bound // (n * t)))
        self.spans = spans(g, loc, per_chunk)
        self.keep_inputs = bound is None or self.rows * n * t <= bound
        self.keep_coefficients = t < c
        self.keep_fields = bound is None or n_fields * self.rows * n * min(t, c) <= bound
        self._kept: list[Chunk] | None = None

    def chunks(self, data: bool = True) -> Iterator[Chunk]:
        """Every chunk, built one at a time, or the kept ones (``keep_inputs``) after the first walk; without
        ``data``, the rows alone (no targets, no distances)."""
        if self._kept is not None:
            yield from self._kept
            return
        kept: list[Chunk] = []
        for groups, locs in self.spans:
            chunk = self._build(groups, locs, data)
            if self.keep_inputs and data:
                kept.append(chunk)
            yield chunk
            del chunk  # before the next chunk's targets and distances exist
        if self.keep_inputs and data:
            self._kept = kept

    def release(self) -> None:
        """Drop the kept chunks."""
        self._kept = None

    def scatter(self, out: Tensor, chunk: Chunk, rows: Tensor) -> None:
        """Writes rows [rows, N, C] of ``chunk`` into their places of ``out`` [G, N, L, C]."""
        gs, ls = chunk.groups.stop - chunk.groups.start, chunk.locs.stop - chunk.locs.start
        out[chunk.groups, :, chunk.locs].copy_(rows.view(gs, ls, self.n, self.c).transpose(1, 2))

    def _build(self, groups: slice, locs: slice, data: bool) -> Chunk:
        ls = locs.stop - locs.start
        device = self.parts[0].device
        ids = torch.arange(groups.start, groups.stop, device=device).repeat_interleave(ls)
        if not self.per_group:
            ids = torch.zeros_like(ids)
        w = None if self.weights is None else self.weights[groups].repeat_interleave(ls, dim=0)
        if not data:
            return Chunk(groups, locs, ids, w)
        y = _targets(self.parts, groups, locs, self.n)
        return Chunk(groups, locs, ids, w, y, _distances(y, self.n))


def spans(g: int, loc: int, rows: int) -> list[tuple[slice, slice]]:
    """(groups, locations) of chunks of at most ``rows`` rows (at least one): whole class groups if a group's
    locations fit, else locations of one group, so that every chunk is a plain slice of [G, K, L, C] features."""
    rows = max(1, rows)
    if rows >= loc:
        step = rows // loc
        return [(slice(a, min(a + step, g)), slice(0, loc)) for a in range(0, g, step)]
    return [(slice(a, a + 1), slice(b, min(b + rows, loc))) for a in range(g) for b in range(0, loc, rows)]


def _targets(parts: list[Tensor], groups: slice, locs: slice, n: int) -> Tensor:
    """Centred float32 targets [rows, T, C] of one chunk: cat(gen, neg, pos) along samples, row = (group, location).

    The layout change [G, K, L, C] -> rows happens here, per chunk, in the one pass that also converts to float32
    and centres.
    Centring on the generated mean changes neither distances nor V (both translation invariant) but keeps
    ||x||^2 + ||y||^2 - 2 x.y from cancelling away the digits of features with a large common offset.
    """
    gs, ls = groups.stop - groups.start, locs.stop - locs.start
    t, c = sum(p.shape[1] for p in parts), parts[0].shape[-1]
    y = torch.empty(gs, ls, t, c, dtype=torch.float32, device=parts[0].device)
    centre = parts[0][groups, :, locs].mean(1, dtype=torch.float32).unsqueeze(2)  # [gs, ls, 1, C]
    start = 0
    for part in parts:
        k = part.shape[1]
        torch.sub(part[groups, :, locs].transpose(1, 2), centre, out=y[:, :, start : start + k])
        start += k
    return y.view(gs * ls, t, c)


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
