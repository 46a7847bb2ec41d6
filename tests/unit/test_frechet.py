"""Frechet distance math, running sums, reference cache and ADM npz files."""

import numpy as np
import pytest
import scipy.linalg
import torch
from torchmetrics.image.fid import _compute_fid

from drifting_lightning.encoders.base import FeatureEncoder
from drifting_lightning.metrics.extractors import EncoderExtractor
from drifting_lightning.metrics.frechet import FrechetDistance, feature_moments, frechet_distance, mean_cov
from drifting_lightning.metrics.npz import to_uint8, write_adm_npz
from drifting_lightning.metrics.reference import (
    content_fingerprint,
    files_fingerprint,
    load_reference_npz,
    reference_statistics,
)


def random_spd(f: int, seed: int) -> np.ndarray:
    a = np.random.default_rng(seed).normal(size=(f, 2 * f))
    return a @ a.T / (2 * f) + 0.1 * np.eye(f)


def scipy_fd(mu1, s1, mu2, s2) -> float:
    """The pytorch-fid / ADM evaluator formula with scipy's sqrtm."""
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def test_closed_form_diagonal_gaussians():
    # For diagonal covariances FD = |mu1 - mu2|^2 + sum (sqrt(a_i) - sqrt(b_i))^2.
    rng = np.random.default_rng(0)
    f = 8
    mu1, mu2 = rng.normal(size=f), rng.normal(size=f)
    a, b = rng.uniform(0.2, 3, size=f), rng.uniform(0.2, 3, size=f)
    exact = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(exact, rel=1e-12)
    a[:3], b[3:5] = 0.0, 0.0  # both singular: no Cholesky factor, the eigen-decomposition path
    exact = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(exact, rel=1e-12)

    # The same from 50k samples per side through the metric: sampling error only.
    g = torch.Generator().manual_seed(0)
    metric = FrechetDistance(num_features=f)
    for mu, var, real in ((mu1, a, True), (mu2, b, False)):
        mu, std = torch.from_numpy(mu), torch.from_numpy(np.sqrt(var))
        for _ in range(5):
            metric.update(mu + std * torch.randn(10000, f, generator=g, dtype=torch.float64), real)
    assert metric.compute().item() == pytest.approx(exact, rel=2e-2)


def test_identical_distributions_give_zero():
    s = random_spd(16, 1)
    mu = np.arange(16.0)
    assert abs(frechet_distance(mu, s, mu, s)) < 1e-9


def test_agrees_with_torchmetrics_and_scipy():
    f = 64
    mu1, mu2 = np.random.default_rng(2).normal(size=(2, f))
    s1, s2 = random_spd(f, 3), random_spd(f, 4)
    ours = frechet_distance(mu1, s1, mu2, s2)
    tm = _compute_fid(*(torch.from_numpy(x) for x in (mu1, s1, mu2, s2))).item()
    assert ours == pytest.approx(tm, rel=1e-9)
    assert ours == pytest.approx(scipy_fd(mu1, s1, mu2, s2), rel=1e-9)


def test_agrees_with_torchmetrics_metric_on_features():
    from torchmetrics.image.fid import FrechetInceptionDistance

    g = torch.Generator().manual_seed(5)
    real, fake = torch.randn(500, 32, generator=g), torch.randn(400, 32, generator=g) * 1.3 + 0.2
    tm = FrechetInceptionDistance(feature=torch.nn.Identity(), input_img_size=(32,))
    tm.inception.num_features = 32
    tm.update(real, real=True)
    tm.update(fake, real=False)
    ours = FrechetDistance(num_features=32)
    ours.update(real, True)
    ours.update(fake, False)
    assert ours.compute().item() == pytest.approx(tm.compute().double().item(), rel=1e-5)


def test_rank_deficient_covariance_is_finite_and_nonnegative():
    # Fewer samples than features (a quick FID on 8 images): sqrtm of S1 S2 goes complex, ours stays real.
    x, y = torch.randn(8, 64, dtype=torch.float64), torch.randn(8, 64, dtype=torch.float64)
    mu1, s1 = mean_cov(8, *feature_moments(x))
    mu2, s2 = mean_cov(8, *feature_moments(y))
    d = frechet_distance(mu1, s1, mu2, s2)
    assert np.isfinite(d) and d >= 0
    assert abs(frechet_distance(mu1, s1, mu1, s1)) < 1e-9


def test_batch_splits_do_not_change_the_result():
    g = torch.Generator().manual_seed(6)
    real, fake = torch.randn(300, 12, generator=g), torch.rand(300, 12, generator=g)
    values = []
    for sizes in ([300], [1, 299], [7, 50, 243], [100, 100, 100]):
        m = FrechetDistance(num_features=12)
        for r, f in zip(real.split(sizes), fake.split(sizes)):
            m.update(r, True)
            m.update(f, False)
        values.append(m.compute().item())
    assert max(values) - min(values) < 1e-10
    mu1, s1 = np.mean(real.double().numpy(), 0), np.cov(real.double().numpy(), rowvar=False)
    mu2, s2 = np.mean(fake.double().numpy(), 0), np.cov(fake.double().numpy(), rowvar=False)
    assert values[0] == pytest.approx(frechet_distance(mu1, s1, mu2, s2), rel=1e-10)


def test_extractor_and_reference_statistics():
    g = torch.Generator().manual_seed(7)
    real, fake = torch.randn(200, 3, 4, generator=g), torch.randn(200, 3, 4, generator=g) + 0.5
    flat = torch.nn.Flatten()
    with_real = FrechetDistance(flat, num_features=12)
    with_real.update(real, True)
    with_real.update(fake, False)
    with_ref = FrechetDistance(flat, num_features=12)
    with_ref.set_reference(*mean_cov(200, *feature_moments(real.flatten(1))))
    with_ref.update(fake, False)
    assert with_ref.compute().item() == pytest.approx(with_real.compute().item(), rel=1e-12)
    with pytest.raises(RuntimeError, match="reference"):
        with_ref.update(real, True)
    with_ref.reset()  # the reference survives a reset
    with_ref.update(fake, False)
    assert with_ref.compute().item() == pytest.approx(with_real.compute().item(), rel=1e-12)
    with pytest.raises(ValueError, match="12 features"):
        with_ref.set_reference(np.zeros(5), np.eye(5))


def test_needs_num_features():
    with pytest.raises(ValueError, match="num_features"):
        FrechetDistance(torch.nn.Flatten())


def test_reference_cache_hit_miss_and_invalidation(tmp_path):
    data_file = tmp_path / "data.bin"
    data_file.write_bytes(b"0" * 100)
    feats = torch.randn(64, 5, generator=torch.Generator().manual_seed(8))
    calls = []

    def samples():
        calls.append(1)
        return iter(feats.split(10))

    cache = tmp_path / "cache"
    mu, sigma = reference_statistics("raw", samples, 50, cache, files_fingerprint([data_file]))
    assert len(calls) == 1 and len(list(cache.glob("ref_*.npz"))) == 1
    np.testing.assert_allclose(mu, feats[:50].double().mean(0).numpy(), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(feats[:50].double().numpy(), rowvar=False), rtol=1e-10)

    mu2, sigma2 = reference_statistics("raw", samples, 50, cache, files_fingerprint([data_file]))  # hit
    assert len(calls) == 1
    np.testing.assert_array_equal(mu, mu2)
    np.testing.assert_array_equal(sigma, sigma2)

    data_file.write_bytes(b"1" * 101)  # the data changed: a new file, recomputed
    reference_statistics("raw", samples, 50, cache, files_fingerprint([data_file]))
    assert len(calls) == 2 and len(list(cache.glob("ref_*.npz"))) == 2
    reference_statistics("raw", samples, 40, cache, files_fingerprint([data_file]))  # another n
    reference_statistics("other", samples, 40, cache, files_fingerprint([data_file]))  # another extractor
    assert len(calls) == 4

    fp = {"content": content_fingerprint(feats[:10])}
    reference_statistics("raw", samples, 50, cache, fp, extractor=lambda x: 2 * x)
    assert len(calls) == 5
    assert content_fingerprint(feats[:10] + 1e-3) != fp["content"]

    with pytest.raises(ValueError, match="n=100"):
        reference_statistics("raw", samples, 100, cache, fp)


def test_to_uint8_is_the_dit_rule():
    x = torch.linspace(-1.3, 1.3, 2 * 3 * 5 * 7).reshape(2, 3, 5, 7)
    dit = torch.clamp(127.5 * x + 128.0, 0, 255).permute(0, 2, 3, 1).to("cpu", dtype=torch.uint8)
    q = to_uint8(x)
    assert q.dtype == torch.uint8 and q.shape == (2, 5, 7, 3)
    assert torch.equal(q, dit)
    assert to_uint8(torch.tensor([-1.0, 0.0, 1.0]).view(1, 3, 1, 1)).flatten().tolist() == [0, 128, 255]
    assert torch.equal(to_uint8(x, channels_last=False), dit.permute(0, 3, 1, 2))


def test_write_adm_npz(tmp_path):
    images = to_uint8(torch.rand(6, 3, 8, 8) * 2 - 1)
    labels = torch.arange(6)
    path = write_adm_npz(tmp_path / "samples.npz", images, labels)
    with np.load(path) as f:
        assert sorted(f.files) == ["arr_0", "arr_1"]
        assert f["arr_0"].dtype == np.uint8 and f["arr_0"].shape == (6, 8, 8, 3)
        np.testing.assert_array_equal(f["arr_0"], images.numpy())
        np.testing.assert_array_equal(f["arr_1"], labels.numpy())
    assert [p.name for p in tmp_path.iterdir()] == ["samples.npz"]  # no temporary file left behind
    with np.load(write_adm_npz(tmp_path / "nolabels.npz", images.numpy())) as f:
        assert f.files == ["arr_0"]
    with pytest.raises(ValueError, match="uint8"):
        write_adm_npz(tmp_path / "bad.npz", torch.rand(2, 8, 8, 3))


def test_load_reference_npz(tmp_path):
    mu, sigma = np.arange(4.0), random_spd(4, 9)
    np.savez(tmp_path / "VIRTUAL_ref.npz", mu=mu.astype(np.float32), sigma=sigma, mu_s=mu, arr_0=np.zeros(1))
    mu2, sigma2 = load_reference_npz(tmp_path / "VIRTUAL_ref.npz")
    assert mu2.dtype == np.float64
    np.testing.assert_array_equal(mu2, mu)
    np.testing.assert_array_equal(sigma2, sigma)
    np.savez(tmp_path / "bad.npz", mu=mu, arr_0=np.zeros(1))
    with pytest.raises(KeyError, match=r"\['sigma'\]"):
        load_reference_npz(tmp_path / "bad.npz")
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        load_reference_npz(tmp_path / "missing.npz")


def test_fd_encoder_on_an_encoder_of_many_feature_sets_names_the_option_to_choose_one():
    class Many(FeatureEncoder):
        def forward(self, x):
            return {f"layer{i:02d}": x.flatten(1).unsqueeze(1) for i in range(10)}

    with pytest.raises(ValueError) as err:
        EncoderExtractor(Many())(torch.zeros(2, 3))
    assert str(err.value) == (
        "the encoder returns 10 feature sets (layer00, layer01, layer02, layer03, layer04, layer05, layer06, layer07, "
        "... (10 in all)) and fd_encoder needs one: choose one with FrechetCallback's feature_key (or `drifting "
        "evaluate --feature-key`)"
    )
    assert EncoderExtractor(Many(), "layer03")(torch.zeros(2, 3)).shape == (2, 3)
    with pytest.raises(KeyError, match="no feature set 'layer99'; it returns layer00, "):
        EncoderExtractor(Many(), "layer99")(torch.zeros(2, 3))
