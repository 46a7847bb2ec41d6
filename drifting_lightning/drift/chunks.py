"""The rows of one feature, walked in chunks under a memory bound: the machinery behind loss.py, no paper step.

A feature [G, K, L, C] has R = G x L rows (class group, location); each row is N generated samples against
T = N + M + P targets (the generated samples, extra negatives, positives). The loss walks the rows chunk by chunk,
and per chunk works on [rows, N, T] float32 matrices.

Memory (the one place it is explained). ``max_chunk_elements`` bounds rows x N x T, the elements of ONE such
matrix. Per chunk at most ``LIVE_MATRICES`` = 3 are alive: the distances, one temperature's logits that the field
turns into coefficients in place (its normalisers are vectors) and the running sum of the temperatures'
coefficients when the force needs a pass of its own, plus (T + N) C float32 values per row: the centred targets
[rows, T, C] and one field [rows, N, C]. So a chunk needs at most ``chunk_budget_bytes`` =
4 B x rows x (3 N T + (T + N) C). Beyond the chunks the loss holds one float32 force buffer the size of the
generated features (it becomes the gradient in place) and per-row vectors. What may outlive a chunk, to save
recomputation:
- every row's distances (one product per pass saved) when R N T <= max_chunk_elements, and every row's targets
  (one layout copy per pass saved) when R T C <= max_chunk_elements, or there is no bound: at most
  max_chunk_elements float32 values each;
- every temperature's field V (no third pass: the force is their weighted sum) when len(taus) R N C fits the
  bound, else their coefficients W when len(taus) R N T does (the force is then one product of their weighted
  sum): at most max_chunk_elements more float32 values. Kept V beat kept W even when W are smaller (T < C):
  measured in one process, alternating steps, one thread, V/W time 0.91 at G = 64, N = 64, T = 144, L = 16,
  C = 256 and 0.93-0.97 for one global feature of C = 256 or 1024.
Chunk temporaries and kept matrices live in a ``Workspace``: buffers that the first chunk allocates and every later
chunk (and every later feature) reuses; on the CPU the loss keeps its workspace from one call to the next
(``DriftingLoss._workspace_for``). A fresh buffer of this size costs more than the arithmetic done in it: the C
allocator returns large blocks to the OS when they are freed, so each new one is faulted in page by page (on a
2-core Xeon, filling a fresh 150 MB buffer took 66 ms against 19 ms for a reused one).
Without a bound, chunks on the CPU hold ``CACHE_ELEMENTS`` (the matrix passes then stay near the cache); on a GPU
one chunk holds every row (fewer, larger kernels).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

# [rows, N, T] float32 matrices alive at once per chunk, at most (see the module docstring).
LIVE_MATRICES = 3
# Elements of one [rows, N, T] matrix per CPU chunk when the bound allows more (16 MiB). Measured on a 2-core Xeon
# (benchmarks/drift_loss.py shapes, one thread, one process alternating steps, time ratios): 2**19 against 2**20
# 1.14 at L = 64 locations (C = 128); 2**21 against 2**20 0.96 there and 0.99 at L = 16 (C = 256); 2**22 against
# 2**21 0.99 and 0.97. Fewer, larger chunks mean fewer small operations per row; the workspace keeps their memory.
CACHE_ELEMENTS = 2**22
# The distance product x y^T (y transposed) sums over at most this many channels at a time: one thread of a 2-core
# Xeon (MKL) ran it at 44-58 GFLOPS over C = 256 and 49 over C = 1024, at 66-72 in slices of 128 (88 at C = 128).
PRODUCT_CHANNELS = 128
# Rows of a chunk whose coefficients one temperature's elementwise passes (kernel, field) run over at a time on the
# CPU: about a dozen passes over [rows, N, T], so a slab near the cache beats one over the whole chunk.
FIELD_SLAB_ELEMENTS = 2**20
# Up to this many channels, distances come from per-channel differences (exact) instead of the matrix product.
DIRECT_CHANNELS = 8


def chunk_budget_bytes(max_chunk_elements: int, n: int, t: int, c: int) -> int:
    """Upper bound on the working memory of one chunk, in bytes, for N generated samples, T targets, C channels:
    rows = max(1, max_chunk_elements // (N T)) rows of LIVE_MATRICES [N, T] matrices and (T + N) C values."""
    rows = max(1, max_chunk_elements // (n * t))
    return 4 * rows * (LIVE_MATRICES * n * t + (t + n) * c)


class Workspace:
    """Named float32 buffers, each as large as the largest request so far, handed out as views: a chunk's
    temporaries reuse the memory of the previous chunk's instead of fresh pages. One name, one live use: a view
    is valid until the next ``take`` of the same name."""

    def __init__(self) -> None:
        self._buffers: dict[str, Tensor] = {}

    def take(self, name: str, shape: tuple[int, ...], device: torch.device) -> Tensor:
        numel = math.prod(shape)
        buffer = self._buffers.get(name)
        if buffer is None or buffer.numel() < numel or buffer.device != device:
            buffer = self._buffers[name] = torch.empty(numel, dtype=torch.float32, device=device)
        return buffer[:numel].view(shape)


@dataclass
class Chunk:
    """Rows of one chunk: class groups x locations (a contiguous range ``rows`` of the R = G x L rows), their
    statistics ids [rows], column weights [rows, T] (or None), centred float32 targets [rows, T, C] (generated
    samples first) and distances [rows, N, T] (both None when the walk was asked for the rows only)."""

    groups: slice
    locs: slice
    rows: slice
    stat_ids: Tensor
    weights: Tensor | None
    targets: Tensor | None = None
    distances: Tensor | None = None

    def per_row(self, values: Tensor) -> Tensor:
        """A per-statistics-group vector as a factor for the chunk's [rows, ., .] matrices: [rows, 1, 1], or a 0-d
        tensor when all rows share one group (a scalar broadcasts faster)."""
        return values[0] if len(values) == 1 else values[self.stat_ids, None, None]

    def per_row_in_layout(self, values: Tensor) -> Tensor:
        """``per_row`` for the chunk's region of the features [groups, N, locs, C]."""
        if len(values) == 1:
            return values[0]
        return values[self.stat_ids].view(self.groups.stop - self.groups.start, 1, self.locs.stop - self.locs.start, 1)

    def add_sq_sums(self, sums: Tensor, v: Tensor, per_group: bool) -> None:
        """Adds sum of v^2 into ``sums`` [statistics groups], v being the chunk's rows [rows, N, C] or its region
        [groups, N, locs, C] of the features: one reduction over the whole chunk, or one per class group of it (a
        chunk holds whole groups or part of one)."""
        if not per_group:
            sums[0] += sq_sum(v)
            return
        grouped = v if v.dim() == 4 else v.view(self.groups.stop - self.groups.start, -1, *v.shape[1:])
        sums[self.groups] += torch.linalg.vector_norm(grouped, dim=(1, 2, 3)).square()


class RowWalk:
    """The chunks of one feature. parts: [gen (detached), neg?, pos], each [G, K, L, C]; weights: [G, T] column
    weights or None; per_group: one statistics id per class group (else all rows share id 0); n_fields: the
    temperatures, for what to keep (module docstring)."""

    def __init__(
        self, parts: list[Tensor], weights: Tensor | None, per_group: bool, max_chunk_elements: int | None,
        n_fields: int, workspace: Workspace,
    ) -> None:
        g, n, loc, c = parts[0].shape
        t = sum(p.shape[1] for p in parts)
        self.parts, self.weights, self.per_group, self.workspace = parts, weights, per_group, workspace
        self.g, self.n, self.loc, self.c, self.t = g, n, loc, c, t
        self.rows = g * loc
        self.n_neg = t - parts[-1].shape[1]  # the generated samples and the extra negatives
        self.device = parts[0].device
        bound = max_chunk_elements
        per_chunk = self.rows if self.device.type != "cpu" else max(1, CACHE_ELEMENTS // (n * t))
        if bound is not None:
            per_chunk = min(per_chunk, max(1, bound // (n * t)))
        self.spans = spans(g, loc, per_chunk)
        fits = lambda elements: bound is None or elements <= bound  # noqa: E731
        self.keep_fields = fits(n_fields * self.rows * n * c)
        self.keep_coefficients = not self.keep_fields and fits(n_fields * self.rows * n * t)
        self._distances = workspace.take("kept_distances", (self.rows, n, t), self.device) if fits(
            self.rows * n * t) else None
        self._targets = workspace.take("kept_targets", (self.rows, t, c), self.device) if fits(
            self.rows * t * c) else None
        self._inputs_ready = False  # the kept distances and targets hold every row
        self._span_rows: list[tuple[slice, Tensor, Tensor | None]] = []  # ``_rows`` of each span, once
        self._targets_of: slice | None = None  # the rows whose targets the workspace buffer holds

    def chunks(self, data: bool = True) -> Iterator[Chunk]:
        """Every chunk, one at a time (its workspace views are reused by the next); without ``data``, the rows
        alone (no targets, no distances)."""
        for i, (groups, locs) in enumerate(self.spans):
            yield self._build(i, groups, locs, data)
        if data:
            self._inputs_ready = True

    def group_views(self, out: Tensor, chunk: Chunk, *rows: Tensor) -> Iterator[tuple[Tensor, ...]]:
        """Per class group of ``chunk``: its part of each of ``rows`` ([rows, ...] tensors of the chunk) and its
        region of ``out`` [G, N, L, C] as [locs, N, C] (a strided view; one view of all groups when L = 1)."""
        if self.loc == 1:
            yield *rows, out[chunk.groups, :, 0]
            return
        ls = chunk.locs.stop - chunk.locs.start
        for i, g in enumerate(range(chunk.groups.start, chunk.groups.stop)):
            yield *(r[i * ls : (i + 1) * ls] for r in rows), out[g, :, chunk.locs].transpose(0, 1)

    def in_layout(self, rows: Tensor, chunk: Chunk) -> Tensor:
        """A chunk's rows [rows, N, C] as a view shaped like its region of the features, [groups, N, locs, C]."""
        gs, ls = chunk.groups.stop - chunk.groups.start, chunk.locs.stop - chunk.locs.start
        return rows.view(gs, ls, self.n, self.c).transpose(1, 2)

    def _rows(self, groups: slice, locs: slice) -> tuple[slice, Tensor, Tensor | None]:
        """A chunk's range of rows, statistics ids [rows] and column weights [rows, T] (or None)."""
        ls = locs.stop - locs.start
        first = groups.start * self.loc + locs.start
        rows = slice(first, first + (groups.stop - groups.start) * ls)
        ids = torch.arange(groups.start, groups.stop, device=self.device).repeat_interleave(ls)
        if not self.per_group:
            ids = torch.zeros_like(ids)
        w = None if self.weights is None else self.weights[groups].repeat_interleave(ls, dim=0)
        return rows, ids, w

    def _build(self, i: int, groups: slice, locs: slice, data: bool) -> Chunk:
        if i == len(self._span_rows):  # first walk: every later pass reuses them
            self._span_rows.append(self._rows(groups, locs))
        rows, ids, w = self._span_rows[i]
        if not data:
            return Chunk(groups, locs, rows, ids, w)
        y = self._chunk_targets(groups, locs, rows)
        if self._distances is None:
            d = _distances(y, self.n, self.workspace.take("distances", (len(ids), self.n, self.t), self.device))
        elif self._inputs_ready:
            d = self._distances[rows]
        else:
            d = _distances(y, self.n, self._distances[rows])
        return Chunk(groups, locs, rows, ids, w, y, d)

    def _chunk_targets(self, groups: slice, locs: slice, rows: slice) -> Tensor:
        """The chunk's targets [rows, T, C]: kept ones, or built into the workspace (left as they are when the
        buffer already holds these rows: one chunk)."""
        gs, ls = groups.stop - groups.start, locs.stop - locs.start
        if self._targets is not None:
            y = self._targets[rows]
            if not self._inputs_ready:
                self._build_targets(groups, locs, y.view(gs, ls, self.t, self.c))
            return y
        y = self.workspace.take("targets", (gs * ls, self.t, self.c), self.device)
        if self._targets_of != rows:
            self._build_targets(groups, locs, y.view(gs, ls, self.t, self.c))
            self._targets_of = rows
        return y

    def _build_targets(self, groups: slice, locs: slice, out: Tensor) -> None:
        """Centred float32 targets of one chunk into ``out`` [groups, locs, T, C]: cat(gen, neg, pos) along samples.

        The layout change [G, K, L, C] -> rows happens here, per chunk, in the one pass that also converts to
        float32 and centres. Centring on the generated mean changes neither distances nor V (both translation
        invariant) but keeps ||x||^2 + ||y||^2 - 2 x.y from cancelling away the digits of features with a large
        common offset.
        """
        centre = self.parts[0][groups, :, locs].mean(1, dtype=torch.float32).unsqueeze(2)  # [gs, ls, 1, C]
        start = 0
        for part in self.parts:
            k = part.shape[1]
            torch.sub(part[groups, :, locs].transpose(1, 2), centre, out=out[:, :, start : start + k])
            start += k


def spans(g: int, loc: int, rows: int) -> list[tuple[slice, slice]]:
    """(groups, locations) of chunks of at most ``rows`` rows (at least one): whole class groups if a group's
    locations fit, else locations of one group, so that every chunk is a plain slice of [G, K, L, C] features."""
    rows = max(1, rows)
    if rows >= loc:
        step = rows // loc
        return [(slice(a, min(a + step, g)), slice(0, loc)) for a in range(0, g, step)]
    return [(slice(a, a + 1), slice(b, min(b + rows, loc))) for a in range(g) for b in range(0, loc, rows)]


def sq_sum(v: Tensor) -> Tensor:
    """sum(v^2) as a 0-d tensor: a dot product for a contiguous v (on a 2-core Xeon 1.7x faster than
    ``vector_norm`` on one thread and 5x on two, where the norm's reduction got slower), else the norm squared."""
    if v.is_contiguous():
        flat = v.view(-1)
        return torch.dot(flat, flat)
    return torch.linalg.vector_norm(v).square()


def field_slabs(rows: int, per_row: int, device: torch.device) -> list[slice]:
    """Slices of a chunk's ``rows`` for the field's passes: FIELD_SLAB_ELEMENTS at a time on the CPU, one on a GPU."""
    step = rows if device.type != "cpu" else max(1, FIELD_SLAB_ELEMENTS // per_row)
    return [slice(a, min(a + step, rows)) for a in range(0, rows, step)]


def _distances(y: Tensor, n: int, out: Tensor) -> Tensor:
    """Plain L2 distances [rows, N, T] of the first N targets (the generated samples) to all T targets [rows, T, C],
    written into ``out``.

    Up to DIRECT_CHANNELS channels: sum_c (x_c - y_c)^2, one channel at a time, exact for close points, where the
    product form loses digits (1-D, 2-D toy data). Beyond: ||x||^2 + ||y||^2 - 2 x.y in one matrix, the product
    added in place, ``PRODUCT_CHANNELS`` channels at a time (torch.cdist's matmul path would copy both sides padded
    with norms and ones); x_i to itself is exactly 0.
    """
    c = y.shape[-1]
    if c <= DIRECT_CHANNELS:
        out.zero_()
        for k in range(c):
            diff = y[:, :n, k, None] - y[:, None, :, k]
            out.addcmul_(diff, diff)
        return out.sqrt_()
    sq = torch.linalg.vector_norm(y, dim=-1).square_()
    torch.add(sq[:, :n, None], sq[:, None, :], out=out)
    for a in range(0, c, PRODUCT_CHANNELS):
        k = slice(a, a + PRODUCT_CHANNELS)
        out.baddbmm_(y[:, :n, k], y[:, :, k].transpose(1, 2), alpha=-2)
    out.clamp_min_(0).sqrt_()
    out[:, :, :n].diagonal(dim1=1, dim2=2).zero_()
    return out
