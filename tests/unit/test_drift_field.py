"""Drift fields and kernels (PAPER.md 2): anti-symmetry, equivariance, Alg. 2, ablation variants, numerics, errors."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from drifting_lightning.drift import (
    MMD,
    Cauchy,
    Gaussian,
    InverseMultiquadric,
    Laplace,
    MeanShift,
    SinkhornDrift,
    drift_field,
)
from drifting_lightning.drift.functional import mask_self_pairs
from drifting_lightning.drift.reference import algorithm2

FAST = settings(max_examples=12, deadline=None, derandomize=True)
FIELDS = {
    "both": MeanShift("both"),
    "both-nofloor": MeanShift("both", affinity_floor=0.0),
    "targets": MeanShift("targets"),
    "none": MeanShift("none"),
    "mmd": MMD(),
    "sinkhorn": SinkhornDrift(iterations=10),
}
KERNELS = [Laplace(), Gaussian(), Cauchy(), InverseMultiquadric()]

sizes = st.tuples(
    st.integers(1, 3),  # groups
    st.integers(1, 7),  # generated N
    st.integers(1, 6),  # positives P
    st.integers(1, 5),  # extra negatives M
    st.integers(1, 6),  # feature size D
    st.integers(0, 2**31 - 1),  # seed
)
temperatures = st.sampled_from([0.3, 1.0, 3.0])


def randn(*shape: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-6) -> None:
    """|a - b| <= tol * (1 + max|b|), the float32 rounding of sums over a handful of terms."""
    torch.testing.assert_close(a, b, atol=tol * (1 + b.abs().max().item()), rtol=0)


# Kernels.


def test_kernel_logits_match_their_formulas():
    d = torch.tensor([0.0, 0.1, 0.5, 1.0, 2.0, 7.0])
    for tau in (0.05, 0.5, 2.0):
        close(Laplace().logits(d, tau), (-d / tau))
        close(Gaussian().logits(d, tau), (-(d**2) / (2 * tau**2)))
        close(Cauchy().logits(d, tau).exp(), 1 / (1 + (d / tau) ** 2))
        close(InverseMultiquadric().logits(d, tau).exp(), (1 + (d / tau) ** 2) ** -0.5)
    for kernel in KERNELS:
        assert kernel.logits(torch.zeros(3), 0.7).eq(0).all(), kernel  # k(x, x) = 1
        logits = kernel.logits(d, 0.5)
        assert (logits.diff() < 0).all(), f"{kernel} must decrease with distance"
        assert repr(kernel) == f"{type(kernel).__name__}()"


@pytest.fixture
def one_thread():
    """Small matrices in a loop: a second thread only adds synchronisation (badly so on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("kernel", KERNELS, ids=repr)
def test_each_kernel_moves_particles_to_the_target(kernel, one_thread):
    """Toy field dynamics x <- x + V(x) (mask_self, y_neg = x) carry a shifted Gaussian onto the target's mean."""
    y = randn(256, 2, seed=1)
    x = randn(256, 2, seed=2) + torch.tensor([3.0, -2.0])
    for _ in range(100):
        x = x + drift_field(x, y, x, 1.0, kernel=kernel)
    assert (x.mean(0) - y.mean(0)).norm() < 0.1
    assert ((x.std(0) / y.std(0)) - 1).abs().max() < 0.5  # neither collapsed nor blown up


# Anti-symmetry and its destruction (Table 1).


@FAST
@given(sizes, temperatures, st.sampled_from(list(FIELDS)))
def test_swapping_positives_and_negatives_flips_the_field(shape, tau, name):
    g, n, p, m, d, seed = shape
    x, a, b = randn(g, n, d, seed=seed), randn(g, p, d, seed=seed + 1), randn(g, m, d, seed=seed + 2) + 0.5
    field = FIELDS[name]
    v = drift_field(x, a, b, tau, mask_self=False, field=field)
    v_swapped = drift_field(x, b, a, tau, mask_self=False, field=field)
    close(v_swapped, -v)


@FAST
@given(sizes, temperatures, st.sampled_from(list(FIELDS)))
def test_field_vanishes_when_positives_and_negatives_are_the_same_set(shape, tau, name):
    g, n, p, _, d, seed = shape
    x, y = randn(g, n, d, seed=seed), randn(g, p, d, seed=seed + 1) + 0.3
    same_set = y[:, torch.randperm(p, generator=torch.Generator().manual_seed(seed))]
    v = drift_field(x, y, same_set, tau, mask_self=False, field=FIELDS[name])
    typical = drift_field(x, y, same_set + 1.0, tau, mask_self=False, field=FIELDS[name])  # sets one unit apart
    assert v.abs().max() <= 1e-6 * (1 + typical.abs().max())


@pytest.mark.parametrize("scales", [(1.5, 1.0), (1.0, 1.5), (2.0, 1.0), (1.0, 2.0), (1.0, 0.0)])
@pytest.mark.parametrize("normalization", ["both", "targets", "none"])
def test_destructive_variants_break_anti_symmetry(scales, normalization):
    """a V+ - r V- with a != r no longer vanishes at p = q: it is (a - r) times the attraction term."""
    attraction, repulsion = scales
    x, y = randn(2, 6, 3, seed=0), randn(2, 5, 3, seed=1) + 1.0
    default = drift_field(x, y, y, 1.0, mask_self=False, field=MeanShift(normalization))
    attraction_only = drift_field(x, y, y, 1.0, mask_self=False, field=MeanShift(normalization, repulsion_scale=0))
    variant = MeanShift(normalization, attraction_scale=attraction, repulsion_scale=repulsion)
    broken = drift_field(x, y, y, 1.0, mask_self=False, field=variant)
    close(default, torch.zeros_like(default))
    assert attraction_only.norm(dim=-1).min() > 1e-3
    close(broken, (attraction - repulsion) * attraction_only)


def _attraction_by_hand(x, y_pos, y_neg, tau, normalization, floor):
    """V with repulsion_scale = 0, one group, from explicit differences [N, P, D] (fine at test sizes)."""
    logits = torch.cat([-torch.cdist(x, y_neg), -torch.cdist(x, y_pos)], dim=1) / tau
    logits[:, : x.shape[0]].fill_diagonal_(-math.inf)  # x_i is not its own negative
    k = logits.exp()
    if normalization == "both":
        a = (logits.softmax(-1) * logits.softmax(-2)).clamp_min(floor).sqrt()
    elif normalization == "targets":
        a = k / k.sum(-1, keepdim=True)
    else:
        a = k
    a_neg, a_pos = a[:, : y_neg.shape[0]], a[:, y_neg.shape[0] :]
    diffs = y_pos[None] - x[:, None]  # [N, P, D]
    return a_neg.sum(-1, keepdim=True) * (a_pos[..., None] * diffs).sum(1)


@pytest.mark.parametrize("normalization", ["both", "targets", "none"])
def test_repulsion_scale_zero_is_the_attraction_only_mean_shift(normalization):
    x, y_pos, extra = randn(7, 3, seed=3), randn(5, 3, seed=4) + 1.0, randn(4, 3, seed=5)
    y_neg = torch.cat([x, extra])
    for floor in (0.0, 1e-6):
        field = MeanShift(normalization, affinity_floor=floor, repulsion_scale=0.0)
        v = drift_field(x, y_pos, y_neg, 0.8, field=field)
        close(v, _attraction_by_hand(x, y_pos, y_neg, 0.8, normalization, floor), 1e-5)
    if normalization != "both":
        # Textbook mean shift V+ = E_p[k (y - x)] / E_p[k], times the row factor Z+ Z- (/ Z^2 with "targets").
        k_pos, k_neg = (-torch.cdist(x, y_pos) / 0.8).exp(), (-torch.cdist(x, y_neg) / 0.8).exp()
        k_neg.fill_diagonal_(0)
        z_pos, z_neg = k_pos.sum(-1, keepdim=True), k_neg.sum(-1, keepdim=True)
        v_plus = (k_pos @ y_pos) / z_pos - x
        factor = z_pos * z_neg / ((z_pos + z_neg) ** 2 if normalization == "targets" else 1)
        field = MeanShift(normalization, repulsion_scale=0.0)
        close(drift_field(x, y_pos, y_neg, 0.8, field=field), factor * v_plus, 1e-5)


# Equivariance and invariance.


@FAST
@given(sizes, temperatures, st.sampled_from(list(FIELDS)), st.booleans())
def test_permutation_equivariance_in_x_and_invariance_in_targets(shape, tau, name, weighted):
    g, n, p, m, d, seed = shape
    x, y_pos, extra = randn(g, n, d, seed=seed), randn(g, p, d, seed=seed + 1), randn(g, m, d, seed=seed + 2)
    w = torch.rand(g, m, generator=torch.Generator().manual_seed(seed)) if weighted else None
    neg_w = None if w is None else torch.cat([torch.ones(g, n), w], dim=1)
    gen = torch.Generator().manual_seed(seed + 3)
    px, pp, pm = torch.randperm(n, generator=gen), torch.randperm(p, generator=gen), torch.randperm(m, generator=gen)

    field = FIELDS[name]
    v = drift_field(x, y_pos, torch.cat([x, extra], 1), tau, field=field, neg_weights=neg_w)
    x2, extra2 = x[:, px], extra[:, pm]
    neg_w2 = None if w is None else torch.cat([torch.ones(g, n), w[:, pm]], dim=1)
    v2 = drift_field(x2, y_pos[:, pp], torch.cat([x2, extra2], 1), tau, field=field, neg_weights=neg_w2)
    close(v2, v[:, px], 1e-5)


@FAST
@given(sizes, temperatures, st.sampled_from(list(FIELDS)))
def test_translation_invariance_and_homogeneity(shape, tau, name):
    g, n, p, m, d, seed = shape
    x, y_pos, extra = randn(g, n, d, seed=seed), randn(g, p, d, seed=seed + 1), randn(g, m, d, seed=seed + 2)
    field = FIELDS[name]
    v = drift_field(x, y_pos, torch.cat([x, extra], 1), tau, field=field)
    shift = randn(d, seed=seed + 4, scale=5.0)
    xs = x + shift
    close(drift_field(xs, y_pos + shift, torch.cat([xs, extra + shift], 1), tau, field=field), v, 1e-4)
    # Laplace logits -d / tau are unchanged when distances and tau scale together, so V scales with them.
    close(drift_field(3 * x, 3 * y_pos, torch.cat([3 * x, 3 * extra], 1), 3 * tau, field=field), 3 * v, 1e-5)


# Alg. 2 as printed.


@pytest.mark.parametrize("tau", [0.02, 0.05, 0.2, 1.0])
@pytest.mark.parametrize("mask_self", [True, False])
def test_matches_algorithm2(tau, mask_self):
    x, y_pos, extra = randn(9, 5, seed=7), randn(6, 5, seed=8) + 0.2, randn(3, 5, seed=9)
    y_neg = torch.cat([x, extra]) if mask_self else extra
    v = drift_field(x, y_pos, y_neg, tau, mask_self=mask_self, field=MeanShift(affinity_floor=0))
    close(v, algorithm2(x, y_pos, y_neg, tau, mask_self=mask_self), 1e-5)
    assert v.shape == x.shape and v.dtype == torch.float32


def test_grouped_input_is_independent_groups():
    x, y_pos, extra = randn(3, 5, 4, seed=10), randn(3, 6, 4, seed=11), randn(3, 2, 4, seed=12)
    v = drift_field(x, y_pos, torch.cat([x, extra], 1), 0.5)
    for g in range(3):
        close(v[g], drift_field(x[g], y_pos[g], torch.cat([x[g], extra[g]]), 0.5))


def test_self_pair_gets_no_weight():
    """With mask_self the row of x_i equals the field computed against the other samples alone ("targets")."""
    x, y_pos = randn(6, 3, seed=13), randn(4, 3, seed=14)
    v = drift_field(x, y_pos, x, 0.5, normalization="targets")
    for i in range(6):
        others = torch.cat([x[:i], x[i + 1 :]])
        close(v[i : i + 1], drift_field(x[i : i + 1], y_pos, others, 0.5, normalization="targets", mask_self=False))


@pytest.mark.parametrize("kernel", KERNELS, ids=repr)
def test_self_pair_stays_masked_for_a_flat_kernel(kernel):
    """Far-apart points: every logit is hugely negative, the masked self-pair must still weigh nothing.

    x_0 is equidistant (1e4) from x_1 and both positives, so with the self-pair masked its "targets" affinities are
    1/3 each and V(x_0) = -(2/9) x_1 exactly; x_1's nearest target is x_0 (a negative), so V(x_1) = 0.
    """
    r = 1e4
    x = torch.tensor([[0.0, 0.0], [r, 0.0]])
    y_pos = torch.tensor([[0.0, r], [0.0, -r]])
    v = drift_field(x, y_pos, x, 0.05, normalization="targets", kernel=kernel)
    assert torch.isfinite(v).all()
    if isinstance(kernel, (Laplace, Gaussian)):  # one-hot rows, the exact value above
        close(v, torch.tensor([[-2 * r / 9, 0.0], [0.0, 0.0]]), 1e-5)


# Numerics.


@pytest.mark.parametrize("slab", [2**17, 70, 1])
def test_logsumexp_over_slabs_equals_torchs(slab, monkeypatch):
    """fields._logsumexp (its exp transient one reused slab of dim-0 entries) is torch.logsumexp, masked and infinite
    entries included, whether the slab holds all entries, two of them (and a short last one) or one."""
    from drifting_lightning.drift import fields

    monkeypatch.setattr(fields, "LSE_SLAB_ELEMENTS", slab)
    x = randn(3, 5, 7, seed=20, scale=30.0)
    x[0, 1, 2] = torch.finfo(torch.float32).min
    x[1, :, 3] = torch.finfo(torch.float32).min  # a whole column masked
    x[2, 4, :] = -math.inf  # a whole row at -inf
    for dim in (-1, -2, 1, 2):
        torch.testing.assert_close(fields._logsumexp(x, dim), x.logsumexp(dim, keepdim=True), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="dim 0"):
        fields._logsumexp(x, 0)


def test_logsumexp_slabs_are_few_on_a_gpu():
    """CPU: slabs of LSE_SLAB_ELEMENTS (cache-sized). GPU: at most MAX_GPU_SLABS slabs, since each is a launch."""
    from drifting_lightning.drift import fields

    shape = (65_536, 64, 144)  # ImageNet config: stage-1 locations x 64 groups, N = 64, T = 144
    assert fields.slab_rows(shape, on_gpu=False) == fields.LSE_SLAB_ELEMENTS // (64 * 144) == 14
    gpu = fields.slab_rows(shape, on_gpu=True)
    assert gpu == 65_536 // fields.MAX_GPU_SLABS and -(-shape[0] // gpu) == fields.MAX_GPU_SLABS
    small = (10, 4, 4)  # a small matrix: one slab either way
    assert fields.slab_rows(small, on_gpu=False) >= 10 and fields.slab_rows(small, on_gpu=True) >= 10


@pytest.mark.parametrize("name", list(FIELDS))
def test_degenerate_inputs_stay_finite(name):
    field = FIELDS[name]
    same = torch.ones(5, 3)
    cases = [
        (same, same, same),  # every point coincides
        (randn(1, 3, seed=0), randn(4, 3, seed=1), randn(1, 3, seed=0)),  # N = 1: the only negative is masked
        (randn(5, 3, seed=2, scale=1e4), randn(4, 3, seed=3, scale=1e4), None),  # flat kernel
    ]
    for x, y_pos, y_neg in cases:
        y_neg = x if y_neg is None else y_neg
        for tau in (0.02, 1.0):
            v = drift_field(x, y_pos, y_neg, tau, field=field)
            assert v.dtype == torch.float32 and torch.isfinite(v).all(), (name, tau, x.shape)
    v = drift_field(same, same, same, 0.05, field=field)
    close(v, torch.zeros_like(v))


def test_bf16_inputs_under_autocast_computed_in_float32():
    x, y_pos = randn(6, 4, seed=0).bfloat16(), randn(5, 4, seed=1).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        v = drift_field(x, y_pos, x, 0.02)
    assert v.dtype == torch.float32 and torch.isfinite(v).all()
    close(v, drift_field(x.float(), y_pos.float(), x.float(), 0.02))


@pytest.mark.parametrize("field", [MeanShift("none"), MMD()], ids=repr)
def test_zero_weights_on_extra_negatives_remove_them(field):
    """Weights act after normalisation (authors' code), so removal is exact only for un-normalised kernels."""
    x, y_pos, extra = randn(5, 3, seed=0), randn(4, 3, seed=1), randn(3, 3, seed=2)
    weights = torch.cat([torch.ones(5), torch.zeros(3)])[None]
    v = drift_field(x, y_pos, torch.cat([x, extra]), 1.0, field=field, neg_weights=weights)
    close(v, drift_field(x, y_pos, x, 1.0, field=field))


# Errors.


def test_errors_name_the_problem():
    x = torch.zeros(4, 3)
    with pytest.raises(ValueError, match=r"\(1, 0, 3\)"):
        drift_field(x, torch.zeros(0, 3), x, 0.1)
    with pytest.raises(ValueError, match=r"\(1, 4, 3\).*\(1, 2, 5\)"):
        drift_field(x, torch.zeros(2, 5), x, 0.1)
    with pytest.raises(ValueError, match=r"\(2, 4, 3\)"):
        drift_field(torch.zeros(2, 4, 3), torch.zeros(3, 2, 3), torch.zeros(2, 4, 3), 0.1)
    with pytest.raises(ValueError, match="y_neg has 2 rows"):
        drift_field(x, torch.zeros(2, 3), torch.zeros(2, 3), 0.1)
    with pytest.raises(ValueError, match="shape"):
        drift_field(torch.zeros(2, 2, 2, 2), torch.zeros(2, 3), torch.zeros(2, 3), 0.1)
    with pytest.raises(ValueError, match="normalization"):
        drift_field(x, x, x, 0.1, normalization="rows")
    with pytest.raises(ValueError, match="normalization"):
        MeanShift("softmax")
    with pytest.raises(ValueError, match="affinity_floor"):
        MeanShift(affinity_floor=-1.0)
    with pytest.raises(ValueError, match="iterations"):
        SinkhornDrift(iterations=0)


@pytest.mark.parametrize("tau", [0.0, -0.05, math.nan])
def test_bad_temperature_is_rejected(tau):
    x = randn(4, 3, seed=0)
    with pytest.raises(ValueError, match="temperature"):
        drift_field(x, randn(3, 3, seed=1), x, tau)


@pytest.mark.parametrize("spread", [1.0, 30.0, 300.0])
def test_one_exponential_path_equals_the_log_domain_softmaxes(spread):
    """The floored "both" affinities from one exp (CPU fast path) equal exp(l - lse_targets / 2 - lse_rows / 2)
    floored, also when rows lie far apart (logits hundreds apart: the path must then decline, not lose digits)."""
    from drifting_lightning.drift import fields

    gen_ = torch.Generator().manual_seed(3)
    logits = -spread * torch.rand(4, 6, 11, generator=gen_)
    logits[1, 2] -= 10 * spread  # one row far from every target
    floor = 1e-6
    expected = (logits - logits.logsumexp(-1, keepdim=True) / 2 - logits.logsumexp(-2, keepdim=True) / 2)
    expected = expected.clamp_min(0.5 * math.log(floor)).exp()
    factored = fields._floored_both_one_exp(logits.clone(), floor)
    fast = None if factored is None else factored[0] * factored[1]
    if fast is None:  # declined: the engine falls back to the log-domain path
        assert spread == 300.0
    else:
        torch.testing.assert_close(fast, expected, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(MeanShift(affinity_floor=floor).affinities(logits.clone()), expected, rtol=1e-5,
                               atol=1e-7)


def test_one_exponential_path_declines_a_fully_masked_column():
    from drifting_lightning.drift import fields

    logits = torch.zeros(1, 1, 3)
    mask_self_pairs(logits)  # N = 1 and no other negative: column 0 holds only the masked self-pair
    untouched = logits.clone()
    assert fields._floored_both_one_exp(logits, 1e-6) is None
    assert torch.equal(logits, untouched)


def _relative_one_exp(logits, floor):
    """The engine's call: logits relative to their rows' largest, with those maxima as the hint."""
    from drifting_lightning.drift import fields

    row_max = logits.amax(-1, keepdim=True)
    factored = fields._floored_both_one_exp(logits - row_max, floor, None, row_max.clone())
    return None if factored is None else factored[0] * factored[1]


def _log_domain_affinities(logits, floor):
    expected = logits - logits.logsumexp(-1, keepdim=True) / 2 - logits.logsumexp(-2, keepdim=True) / 2
    return expected.clamp_min(0.5 * math.log(floor)).exp()


def test_one_exponential_path_keeps_a_light_column_whose_entries_are_below_the_floor():
    """A target far from every row (relative logits -500: its column's mass underflows) no longer makes the path
    decline: each of its entries is below the floor on its row's softmax alone, so its affinities are the floor."""
    floor = 1e-6
    logits = -5 * torch.rand(2, 5, 9, generator=torch.Generator().manual_seed(4))
    logits[..., 8] -= 500
    fast = _relative_one_exp(logits, floor)
    assert fast is not None
    torch.testing.assert_close(fast, _log_domain_affinities(logits.double(), floor).float(), rtol=1e-5, atol=1e-7)


def test_one_exponential_path_declines_a_light_column_that_one_far_row_dominates():
    """A row far from everything (its largest logit 500 below the others') whose nearest target is far from every
    other row: that column's mass underflows, yet its affinity for that row is far above the floor. Declined."""
    floor = 1e-6
    logits = -5 * torch.rand(1, 5, 9, generator=torch.Generator().manual_seed(5))
    logits[0, 2] -= 500
    logits[0, 2, 7] = -500.0  # row 2's nearest target
    logits[0, [0, 1, 3, 4], 7] = -900.0  # far from every other row
    assert _log_domain_affinities(logits.double(), floor)[0, 2, 7] > 0.1
    assert _relative_one_exp(logits, floor) is None
