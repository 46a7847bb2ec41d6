"""DriftingLoss (PAPER.md 3, 5): the authors' loss, gradients, normalisations, chunking, regrouping, numerics."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from drifting_lightning.drift import (
    MMD,
    Cauchy,
    DriftingLoss,
    Gaussian,
    InverseMultiquadric,
    Laplace,
    MeanShift,
    SinkhornDrift,
    chunks,
    drift_field,
)
from drifting_lightning.drift.reference import authors_loss

FAST = settings(max_examples=10, deadline=None, derandomize=True)
TAUS = (0.02, 0.05, 0.2)

sizes = st.tuples(
    st.integers(1, 3),  # groups G
    st.integers(1, 6),  # generated N
    st.integers(1, 5),  # positives P
    st.integers(1, 4),  # extra negatives M
    st.integers(1, 8),  # channels C
    st.integers(0, 2**31 - 1),  # seed
)


def make(g, n, p, m, c, seed, loc=None, weights="random"):
    """gen (requires grad) [G, N, (L,) C], pos, neg and guidance weights w [G, M] ("random", "zero" or "one")."""
    gen_ = torch.Generator().manual_seed(seed)
    shape = (lambda k: (g, k, c)) if loc is None else (lambda k: (g, k, loc, c))
    gen = torch.randn(*shape(n), generator=gen_).requires_grad_()
    pos = torch.randn(*shape(p), generator=gen_) + 0.5
    neg = torch.randn(*shape(m), generator=gen_)
    w = {"random": torch.rand(g, m, generator=gen_), "zero": torch.zeros(g, m), "one": torch.ones(g, m)}[weights]
    return gen, pos, neg, w


def value_and_grad(loss_fn, gen, *args, **kwargs):
    out = loss_fn(gen, *args, **kwargs)
    loss = out.loss if hasattr(out, "loss") else out
    (grad,) = torch.autograd.grad(loss, gen)
    return loss.detach(), grad, getattr(out, "stats", None)


def close(a, b, tol=1e-5):
    torch.testing.assert_close(a, b, atol=tol * (1 + b.abs().max().item()), rtol=tol)


def field_by_hand(gen, pos, neg, w, taus=TAUS, drift_normalization=True):
    """Summed normalised field F [G, N, C] and s_in, built from drift_field per temperature (PAPER.md 3).

    Scaled features x / s_in with s_in = S / sqrt(C) and temperature tau * sqrt(C) reproduce logits -d / (S tau).
    """
    x = gen.detach()
    c = x.shape[-1]
    targets = torch.cat([x, neg, pos], 1)
    col_w = torch.cat([torch.ones(x.shape[:2]), w, torch.ones(pos.shape[:2])], 1)
    d = torch.cdist(x, targets)
    s = (d * col_w[:, None]).sum() / (col_w.sum() * x.shape[1])
    s_in = s / math.sqrt(c)
    neg_w = torch.cat([torch.ones(x.shape[:2]), w], 1)
    force = torch.zeros_like(x)
    for tau in taus:
        v = drift_field(x / s_in, pos / s_in, torch.cat([x, neg], 1) / s_in, tau * math.sqrt(c), neg_weights=neg_w)
        force += v / v.square().mean().sqrt() if drift_normalization else v
    return force, s_in, s


# The authors' loss, literally.


@FAST
@given(sizes, st.sampled_from(["random", "zero", "one"]))
def test_matches_the_authors_loss(shape, weights):
    gen, pos, neg, w = make(*shape, weights=weights)
    value, grad, _ = value_and_grad(DriftingLoss(), gen, pos, neg, w)
    ref_value, ref_grad, _ = value_and_grad(authors_loss, gen, pos, neg, w)
    close(value, ref_value)
    close(grad, ref_grad)


def test_matches_the_authors_loss_at_the_ablation_shape():
    gen, pos, neg, w = make(8, 64, 64, 16, 32, seed=0)
    value, grad, _ = value_and_grad(DriftingLoss(), gen, pos, neg, w)
    ref_value, ref_grad, _ = value_and_grad(authors_loss, gen, pos, neg, w)
    close(value, ref_value)
    close(grad, ref_grad)


def test_targets_far_beyond_the_exponentials_range_match_the_authors_loss():
    """Relative logits far below float32's exp range (here down to about -2000 at tau = 0.02): the engine raises
    them to LOWEST_RELATIVE_LOGIT before its exponential, which must not change the loss."""
    gen, pos, neg, w = make(4, 16, 12, 4, 8, seed=3)
    pos = pos.clone()
    pos[:, -3:] *= 40  # a few positives far away from everything else
    value, grad, _ = value_and_grad(DriftingLoss(), gen, pos, neg, w)
    ref_value, ref_grad, _ = value_and_grad(authors_loss, gen, pos, neg, w)
    close(value, ref_value)
    close(grad, ref_grad)


@pytest.mark.parametrize("c", [2, 32])
def test_features_far_from_the_origin_keep_their_digits(c):
    """A common offset (post-activation features, latents with a mean) must not cost accuracy: distances come from
    features centred per row, so the float32 engine still matches the float64 transcription (plain ||x||^2 + ||y||^2
    - 2 x.y on the raw features loses ~1e-2 of the gradient at offset 200)."""
    gen, pos, neg, w = make(3, 40, 40, 10, c, seed=13)
    offset = 200.0
    gen = (gen.detach() + offset).requires_grad_()
    value, grad, _ = value_and_grad(DriftingLoss(), gen, pos + offset, neg + offset, w)
    gen64 = gen.detach().double().requires_grad_()
    ref_value, ref_grad, _ = value_and_grad(authors_loss, gen64, (pos + offset).double(), (neg + offset).double(),
                                            w.double())
    close(value.double(), ref_value, 1e-5)
    close(grad.double(), ref_grad, 1e-5)


# Gradient and value.


@FAST
@given(sizes)
def test_gradient_is_minus_two_force_and_value_is_mean_square_force(shape):
    """d loss / d gen = -2 F / (s_in * numel) and loss = mean ||F||^2 with F the summed normalised field."""
    gen, pos, neg, w = make(*shape)
    value, grad, stats = value_and_grad(DriftingLoss(), gen, pos, neg, w)
    force, s_in, s = field_by_hand(gen, pos, neg, w)
    close(grad, -2 * force / (s_in * gen.numel()))
    close(value, force.square().mean())
    close(stats["x/scale"], s)


@pytest.mark.parametrize("loc", [None, 3])
def test_without_drift_normalization_the_force_is_the_plain_sum(loc):
    """drift_normalization=False: F = sum_tau V_tau in normalised units, chunked or not (pass 3 then also collects
    the statistics, from each temperature's own V next to the summed coefficients)."""
    g, n, p, m, c = 2, 5, 4, 3, 6
    gen, pos, neg, w = make(g, n, p, m, c, seed=17, loc=loc)

    def rows(t):
        return t if loc is None else t.transpose(1, 2).reshape(g * loc, t.shape[1], c)

    force, s_in, _ = field_by_hand(rows(gen), rows(pos), rows(neg), w.repeat_interleave(loc or 1, 0),
                                   drift_normalization=False)
    normalised = DriftingLoss()(gen, pos, neg, w).stats
    for chunk in (None, 2 * n * (n + m + p)):
        value, grad, stats = value_and_grad(DriftingLoss(drift_normalization=False, max_chunk_elements=chunk),
                                            gen, pos, neg, w)
        close(rows(grad), -2 * force / (s_in * gen.numel()))
        close(value, force.square().mean())
        for tau in TAUS:  # the raw drift, the same as with drift normalisation
            assert stats[f"x/lambda/tau{tau:g}"] == 1
            close(stats[f"x/drift_sq_norm/tau{tau:g}"], normalised[f"x/drift_sq_norm/tau{tau:g}"])


def test_statistics_report_the_raw_drift():
    """drift_sq_norm/tau is the un-normalised mean ||V||^2 in feature units: an honest progress signal."""
    gen, pos, neg, w = make(3, 6, 5, 2, 4, seed=3)
    _, _, stats = value_and_grad(DriftingLoss(), gen, pos, neg, w)
    s = stats["x/scale"]
    for tau in TAUS:
        v = drift_field(gen.detach(), pos, torch.cat([gen.detach(), neg], 1), tau * s.item(),
                        neg_weights=torch.cat([torch.ones(3, 6), w], 1))
        close(stats[f"x/drift_sq_norm/tau{tau:g}"], v.square().sum(-1).mean())
        scaled = v / (s / math.sqrt(4))
        close(stats[f"x/lambda/tau{tau:g}"], scaled.square().mean().sqrt())
    close(stats["x/loss"], DriftingLoss()(gen, pos, neg, w).loss.detach())


def test_no_gradient_flows_through_the_target():
    gen, pos, neg, w = make(2, 5, 4, 3, 6, seed=1)
    pos.requires_grad_()
    neg.requires_grad_()
    w.requires_grad_()
    DriftingLoss()(gen, pos, neg, w).loss.backward()
    assert gen.grad is not None and gen.grad.abs().sum() > 0
    assert pos.grad is None and neg.grad is None and w.grad is None


def test_the_graph_keeps_one_force_buffer_and_no_targets():
    """Only F (float32, gen's size) and a per-group scale wait for backward: no prediction, target or field stack."""
    gen, pos, neg, w = make(3, 6, 5, 2, 8, seed=12, loc=4)
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = DriftingLoss()(gen, pos, neg, w).loss
    assert gen.numel() * 4 <= sum(saved) <= gen.numel() * 4 + 64, saved
    (grad,) = torch.autograd.grad(loss, gen)
    assert grad.shape == gen.shape and torch.isfinite(grad).all()


@pytest.mark.parametrize("loc", [None, 4])
def test_the_gradient_is_the_force_buffer_scaled_in_place(loc):
    """For float32 gen, backward turns the force buffer into the gradient and autograd adopts it as gen.grad, so the
    loss adds no gen-sized buffer to the gradient's own; a second backward through the same loss raises."""
    gen, pos, neg, w = make(3, 6, 5, 2, 8, seed=12, loc=loc)
    addresses = []

    def pack(t):
        addresses.append(t.data_ptr())  # the address only: holding the tensor would stop autograd adopting it
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = DriftingLoss(max_chunk_elements=2 * 6 * 13)(gen, pos, neg, w).loss
    loss.backward()
    assert gen.grad.data_ptr() in addresses
    expected = gen.grad.clone()
    loss = DriftingLoss(max_chunk_elements=2 * 6 * 13)(gen, pos, neg, w).loss
    loss.backward(retain_graph=True)
    close(gen.grad, 2 * expected)  # accumulates into the existing gradient
    with pytest.raises(RuntimeError, match="one backward per loss"):
        loss.backward()


def test_gradient_follows_the_incoming_gradient_and_gens_strides():
    gen, pos, neg, w = make(2, 5, 4, 3, 6, seed=14)
    strided = gen.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()  # [G, N, C], C outermost
    loss_fn = DriftingLoss(statistics="group")
    value, grad, _ = value_and_grad(loss_fn, gen, pos, neg, w)
    (grad_s,) = torch.autograd.grad(3 * loss_fn(strided, pos, neg, w).loss, strided)
    assert grad_s.stride() == strided.stride()
    close(grad_s, 3 * grad)
    with torch.no_grad():  # no graph, no force buffer: the same value
        close(loss_fn(gen, pos, neg, w).loss, value)
    close(loss_fn(gen.detach(), pos, neg, w).loss, value)


@pytest.mark.parametrize("statistics", ["batch", "group"])
def test_loss_per_temperature_changes_the_value_not_the_gradient(statistics):
    gen, pos, neg, w = make(3, 6, 5, 2, 4, seed=2)
    value, grad, _ = value_and_grad(DriftingLoss(statistics=statistics), gen, pos, neg, w)
    per_tau, grad_per_tau, _ = value_and_grad(
        DriftingLoss(statistics=statistics, loss_per_temperature=True), gen, pos, neg, w
    )
    close(per_tau, torch.tensor(float(len(TAUS))))  # each normalised field has unit mean square
    assert abs(value.item() - len(TAUS)) > 0.05  # the default's value is mean ||sum of fields||^2, not a constant
    close(grad_per_tau, grad)


# Invariances.


@FAST
@given(sizes, st.sampled_from([7.3, 0.2]))
def test_global_scale_and_shift_of_the_features(shape, scale):
    """Feature normalisation: same loss and normalised field, gradient / scale; a shift changes nothing."""
    gen, pos, neg, w = make(*shape)
    loss_fn = DriftingLoss()
    value, grad, stats = value_and_grad(loss_fn, gen, pos, neg, w)
    gen2 = (gen.detach() * scale).requires_grad_()
    value2, grad2, stats2 = value_and_grad(loss_fn, gen2, pos * scale, neg * scale, w)
    close(value2, value)
    close(grad2, grad / scale)
    close(stats2["x/scale"], stats["x/scale"] * scale)
    c = gen.shape[-1]

    def normalised_force(g, st_):
        return -g * (st_["x/scale"] / math.sqrt(c)) * gen.numel() / 2

    close(normalised_force(grad2, stats2), normalised_force(grad, stats))
    shift = torch.randn(c, generator=torch.Generator().manual_seed(shape[-1])) * 3
    gen3 = (gen.detach() + shift).requires_grad_()
    value3, grad3, _ = value_and_grad(loss_fn, gen3, pos + shift, neg + shift, w)
    close(value3, value, 1e-4)
    close(grad3, grad, 1e-4)


# Chunking, regrouping, statistics.


@pytest.mark.parametrize("statistics", ["batch", "group"])
@pytest.mark.parametrize("loc", [None, 3])
def test_chunked_equals_unchunked(statistics, loc):
    g, n, p, m = 3, 5, 4, 2
    gen, pos, neg, w = make(g, n, p, m, 6, seed=4, loc=loc)
    value, grad, stats = value_and_grad(DriftingLoss(statistics=statistics), gen, pos, neg, w)
    rows_per_chunk = [1, 2, 4]
    for k in rows_per_chunk:
        chunked = DriftingLoss(statistics=statistics, max_chunk_elements=k * n * (n + m + p))
        value_c, grad_c, stats_c = value_and_grad(chunked, gen, pos, neg, w)
        close(value_c, value)
        close(grad_c, grad)
        for key in stats:
            close(stats_c[key], stats[key])
    # A budget below one row still runs, one row at a time.
    close(value_and_grad(DriftingLoss(statistics=statistics, max_chunk_elements=1), gen, pos, neg, w)[0], value)


@pytest.mark.parametrize("statistics", ["batch", "group"])
@pytest.mark.parametrize("field", [MeanShift(), MeanShift("targets"), SinkhornDrift(iterations=3)], ids=repr)
def test_field_slabs_equal_one_slab(monkeypatch, statistics, field):
    """The field's passes over a chunk in slabs of rows (one row each here) give what one pass over it gives."""
    g, n, p, m, loc = 3, 5, 4, 2, 3
    gen, pos, neg, w = make(g, n, p, m, 6, seed=8, loc=loc)
    whole = value_and_grad(DriftingLoss(field=field, statistics=statistics), gen, pos, neg, w)
    monkeypatch.setattr(chunks, "FIELD_SLAB_ELEMENTS", n * (n + m + p))
    slabbed = value_and_grad(DriftingLoss(field=field, statistics=statistics), gen, pos, neg, w)
    close(slabbed[0], whole[0])
    close(slabbed[1], whole[1])


@pytest.mark.parametrize("field", [MeanShift(), SinkhornDrift(iterations=3)], ids=repr)
def test_kept_coefficients_equal_recomputed_ones(field):
    """A bound that fits every temperature's W but not their V (C > T) keeps W for the force pass, also for a
    field that returns its coefficients in a new matrix instead of the engine's buffer."""
    g, n, p, m, c = 2, 4, 3, 2, 16
    t = n + m + p
    gen, pos, neg, w = make(g, n, p, m, c, seed=9)
    value, grad, _ = value_and_grad(DriftingLoss(field=field), gen, pos, neg, w)
    kept = DriftingLoss(field=field, max_chunk_elements=len(TAUS) * g * n * t)
    value_k, grad_k, _ = value_and_grad(kept, gen, pos, neg, w)
    close(value_k, value)
    close(grad_k, grad)


class _ShapeSpy(Laplace):
    """Laplace that records the shape of every distance matrix it turns into logits (in batch statistics, where
    Laplace's relative logits are one operation and do not call ``logits`` on the matrix)."""

    def __init__(self):
        self.shapes, self.relative = [], []

    def logits(self, distance, temperature, out=None):
        if distance.shape[-1] != 1:  # not the rows' nearest distances
            self.shapes.append(tuple(distance.shape))
        return super().logits(distance, temperature, out=out)

    def relative_logits(self, distance, temperature, nearest, out=None):
        self.shapes.append(tuple(distance.shape))
        self.relative.append(tuple(distance.shape))
        return super().relative_logits(distance, temperature, nearest, out=out)


@pytest.mark.parametrize("loc", [None, 4])
@pytest.mark.parametrize("rows", [1, 3, 5, 100])
def test_max_chunk_elements_bounds_every_distance_matrix(loc, rows):
    """rows x N x T <= max_chunk_elements for every [rows, N, T] matrix, and each temperature sees every row once
    per pass (chunks are whole groups or locations of one group) in the relative logits the field starts from (a
    chunk where the field declines them gets plain logits too: also bounded)."""
    g, n, p, m = 3, 5, 4, 2
    t = n + m + p
    gen, pos, neg, w = make(g, n, p, m, 6, seed=15, loc=loc)
    spy = _ShapeSpy()
    DriftingLoss(kernel=spy, max_chunk_elements=rows * n * t)(gen, pos, neg, w)
    assert all(r * nn * tt <= max(rows, 1) * n * t and (nn, tt) == (n, t) for r, nn, tt in spy.shapes), spy.shapes
    per_pass = len(TAUS) * g * (loc or 1)
    assert spy.relative and sum(r for r, _, _ in spy.relative) % per_pass == 0


def test_locations_equal_manually_regrouped_rows():
    g, n, p, m, loc, c = 2, 5, 4, 3, 3, 6
    gen, pos, neg, w = make(g, n, p, m, c, seed=5, loc=loc)
    value, grad, _ = value_and_grad(DriftingLoss(), gen, pos, neg, w)

    def rows(t):
        return t.transpose(1, 2).reshape(g * loc, t.shape[1], c)

    gen_rows = rows(gen.detach()).requires_grad_()
    value_r, grad_r, _ = value_and_grad(DriftingLoss(), gen_rows, rows(pos), rows(neg), w.repeat_interleave(loc, 0))
    close(value_r, value)
    close(grad_r, rows(grad))


@pytest.mark.parametrize("loc", [None, 3])
def test_group_statistics_equal_each_group_alone(loc):
    g = 3
    gen, pos, neg, w = make(g, 5, 4, 2, 6, seed=6, loc=loc)
    value, grad, _ = value_and_grad(DriftingLoss(statistics="group"), gen, pos, neg, w)
    values = []
    for k in range(g):
        gen_k = gen.detach()[k : k + 1].requires_grad_()
        value_k, grad_k, _ = value_and_grad(DriftingLoss(), gen_k, pos[k : k + 1], neg[k : k + 1], w[k : k + 1])
        values.append(value_k)
        close(grad[k : k + 1], grad_k / g)
    close(value, torch.stack(values).mean())
    # and "batch" statistics differ once groups differ in spread
    spread = torch.tensor([0.2, 1.0, 5.0]).view(-1, *([1] * (gen.dim() - 1)))
    gen2 = (gen.detach() * spread).requires_grad_()
    grouped = DriftingLoss(statistics="group")(gen2, pos * spread, neg * spread, w).loss
    batched = DriftingLoss(statistics="batch")(gen2, pos * spread, neg * spread, w).loss
    assert not torch.allclose(grouped, batched, rtol=1e-3)


def test_distributed_statistics_equal_one_process_with_the_whole_batch(monkeypatch):
    """Two ranks (threads, with an all-reduce that sums over them) holding half the groups each: with
    distributed_statistics, S and lambda are those of the whole batch in both passes, so each rank's force is the
    whole batch's on its rows (its gradient differs only by the numel of its own mean)."""
    import threading

    import drifting_lightning.drift.loss as loss_module

    g, loc = 4, 3
    gen, pos, neg, w = make(g, 5, 4, 2, 6, seed=16, loc=loc)
    loss_fn = DriftingLoss(distributed_statistics=True, max_chunk_elements=2 * 5 * 11)
    _, grad, stats = value_and_grad(loss_fn, gen, pos, neg, w)  # not initialised: no reduction

    barrier, slots = threading.Barrier(2), [None, None]

    def all_reduce(tensor):
        rank = int(threading.current_thread().name[-1])
        slots[rank] = tensor.clone()
        barrier.wait()
        tensor.copy_(slots[0] + slots[1])
        barrier.wait()

    fake = type("FakeDist", (), {"is_available": staticmethod(lambda: True),
                                 "is_initialized": staticmethod(lambda: True), "all_reduce": staticmethod(all_reduce)})
    monkeypatch.setattr(loss_module, "dist", fake)
    results = [None, None]

    def rank_main(rank):
        part = slice(2 * rank, 2 * rank + 2)
        results[rank] = value_and_grad(loss_fn, gen.detach()[part].requires_grad_(), pos[part], neg[part], w[part])

    threads = [threading.Thread(target=rank_main, args=(k,), name=f"rank{k}") for k in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for rank, (_, grad_k, stats_k) in enumerate(results):
        for key in ("x/scale", "x/lambda/tau0.02", "x/lambda/tau0.2"):
            close(stats_k[key], stats[key])
        close(grad_k / 2, grad[2 * rank : 2 * rank + 2])  # each rank's mean is over half the elements


def test_feature_dict_sums_features():
    a = make(2, 4, 3, 2, 5, seed=7)
    b = make(2, 4, 3, 2, 8, seed=8, loc=3)
    loss_fn = DriftingLoss()
    out = loss_fn({"a": a[0], "b": b[0]}, {"a": a[1], "b": b[1]}, {"a": a[2], "b": b[2]}, a[3])
    close(out.loss, loss_fn(a[0], a[1], a[2], a[3]).loss + loss_fn(b[0], b[1], b[2], a[3]).loss)
    assert {"a/loss", "b/loss", "a/scale", "b/lambda/tau0.02"} <= set(out.stats)


def test_scalar_guidance_weight_per_group():
    gen, pos, neg, w = make(3, 4, 3, 2, 5, seed=9)
    per_group = torch.tensor([0.0, 0.5, 2.0])
    expanded = per_group[:, None].expand(3, 2)
    close(DriftingLoss()(gen, pos, neg, per_group).loss, DriftingLoss()(gen, pos, neg, expanded).loss)


# Numerics.

FIELDS = [MeanShift(), MeanShift("targets"), MeanShift("none"), MMD(), SinkhornDrift(iterations=5)]


def _finite(loss_fn, gen, *args):
    """Loss, gradient and statistics are finite float32; returns the move of the target in feature units."""
    out = loss_fn(gen, *args)
    (grad,) = torch.autograd.grad(out.loss, gen)
    assert out.loss.dtype == torch.float32
    assert torch.isfinite(out.loss) and torch.isfinite(grad).all(), loss_fn
    assert all(torch.isfinite(v).all() for v in out.stats.values()), out.stats
    s_in = (out.stats["x/scale"] / math.sqrt(gen.shape[-1])).clamp_min(1e-3) if loss_fn.feature_normalization else 1
    return -grad * s_in**2 * gen.numel() / 2  # F * s_in, from d loss / d gen = -2 F / (s_in numel)


@pytest.mark.parametrize("field", FIELDS, ids=repr)
def test_degenerate_batches_stay_finite(field):
    loss_fn = DriftingLoss(field=field)
    same = torch.ones(2, 4, 3)
    # Every sample coincides: V is rounding noise, which drift normalisation lifts to O(1) in normalised units
    # (lambda's floor is absolute), but S = 0 clamps s_in to 1e-3, so the target moves by ~1e-3 feature units.
    move = _finite(loss_fn, same.clone().requires_grad_(), same, same[:, :2], torch.ones(2, 2))
    assert move.abs().max() < 1e-2
    gen, pos, neg, w = make(2, 4, 3, 2, 3, seed=0)
    _finite(loss_fn, gen, gen.detach().clone(), neg, w)  # gen == pos
    _finite(loss_fn, gen, pos, neg, torch.zeros_like(w))  # w = 0 (alpha = 1)
    gen1, pos1, _, _ = make(3, 1, 2, 1, 3, seed=1)
    _finite(loss_fn, gen1, pos1)  # N = 1, no extra negatives: the only negative is masked
    for kernel in (Laplace(), Gaussian(), Cauchy(), InverseMultiquadric()):  # features 1e4 apart, no normalisation
        flat = DriftingLoss(kernel=kernel, field=field, feature_normalization=False)
        far = (gen.detach() * 1e4).requires_grad_()
        _finite(flat, far, pos * 1e4, neg * 1e4, w)


def test_bf16_autocast_matches_float32_of_the_same_values():
    gen, pos, neg, w = make(2, 6, 5, 3, 8, seed=11)
    gen_b = gen.detach().bfloat16().requires_grad_()
    pos_b, neg_b = pos.bfloat16(), neg.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = DriftingLoss()(gen_b, pos_b, neg_b, w)
    (grad_b,) = torch.autograd.grad(out.loss, gen_b)
    assert out.loss.dtype == torch.float32 and grad_b.dtype == torch.bfloat16
    gen_f = gen_b.detach().float().requires_grad_()
    value_f, grad_f, _ = value_and_grad(DriftingLoss(), gen_f, pos_b.float(), neg_b.float(), w)
    close(out.loss.detach(), value_f)
    torch.testing.assert_close(grad_b.float(), grad_f, atol=1e-2 * grad_f.abs().max().item(), rtol=1e-2)


# Errors.


def test_shape_errors_name_the_shapes():
    gen, pos, neg, w = make(2, 4, 3, 2, 5, seed=0)
    loss_fn = DriftingLoss()
    with pytest.raises(ValueError, match=r"pos \(2, 0, 5\)"):
        loss_fn(gen, pos[:, :0])
    with pytest.raises(ValueError, match=r"gen \(2, 4, 5\), pos \(2, 3, 6\)"):
        loss_fn(gen, torch.zeros(2, 3, 6))
    with pytest.raises(ValueError, match=r"gen \(2, 4, 5\), pos \(3, 3, 5\)"):
        loss_fn(gen, torch.zeros(3, 3, 5))
    with pytest.raises(ValueError, match=r"neg \(2, 2, 4\)"):
        loss_fn(gen, pos, torch.zeros(2, 2, 4), w)
    with pytest.raises(ValueError, match=r"pos \(2, 3, 1, 5\)"):
        loss_fn(gen, pos[:, :, None])
    with pytest.raises(ValueError, match=r"gen \(2, 4\)"):
        loss_fn(gen[..., 0], pos[..., 0])
    with pytest.raises(ValueError, match=r"gen \(2, 0, 5\)"):
        loss_fn(gen[:, :0], pos)
    with pytest.raises(ValueError, match=r"\[2, 2\].*\(2, 3\)"):
        loss_fn(gen, pos, neg, torch.ones(2, 3))
    with pytest.raises(ValueError, match="neg_weights given without neg"):
        loss_fn(gen, pos, None, w)
    with pytest.raises(ValueError, match=r"gen \['a'\], pos \['b'\]"):
        loss_fn({"a": gen}, {"b": pos})
    with pytest.raises(ValueError, match="no features"):
        loss_fn({}, {})


@pytest.mark.parametrize("temperatures", [(), (0.0,), (0.05, -0.2), (math.nan,)])
def test_bad_temperatures_are_rejected(temperatures):
    with pytest.raises(ValueError, match="temperatures"):
        DriftingLoss(temperatures=temperatures)


def test_bad_options_are_rejected():
    with pytest.raises(ValueError, match="statistics"):
        DriftingLoss(statistics="rank")
    with pytest.raises(ValueError, match="max_chunk_elements"):
        DriftingLoss(max_chunk_elements=0)
    with pytest.raises(ValueError, match="normalization"):
        DriftingLoss(field=MeanShift("columns"))
