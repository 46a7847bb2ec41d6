"""The Inception path end to end, with a randomly initialised weights file of the real shapes (no download).

Inception runs at 299x299 whatever the input size, so every test feeds only a few images.
"""

import math
from unittest import mock

import pytest
import torch
from torch_fidelity.metric_isc import isc_features_to_metric

from drifting_lightning.encoders.base import Identity
from drifting_lightning.metrics.extractors import (
    INCEPTION_ENV,
    INCEPTION_FILENAME,
    EncoderExtractor,
    InceptionExtractor,
    resolve_inception_weights,
)
from drifting_lightning.metrics.frechet import FrechetDistance
from drifting_lightning.metrics.inception_score import inception_score


@pytest.fixture(scope="module")
def extractor(random_inception_weights):
    with pytest.warns(UserWarning, match="not the published"):
        return InceptionExtractor(str(random_inception_weights))


def test_missing_weights_say_where_to_put_them(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.delenv(INCEPTION_ENV, raising=False)
    expected = tmp_path / "torch_home" / "hub" / "checkpoints" / INCEPTION_FILENAME
    with pytest.raises(FileNotFoundError) as err:
        InceptionExtractor()
    assert str(expected) in str(err.value) and INCEPTION_ENV in str(err.value)
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        resolve_inception_weights(str(tmp_path / "nowhere.pth"))
    monkeypatch.setenv(INCEPTION_ENV, str(tmp_path / "env.pth"))
    with pytest.raises(FileNotFoundError, match="env.pth"):
        resolve_inception_weights()


def test_lookup_order(tmp_path, monkeypatch, random_inception_weights):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.delenv(INCEPTION_ENV, raising=False)
    cached = tmp_path / "torch_home" / "hub" / "checkpoints" / INCEPTION_FILENAME
    cached.parent.mkdir(parents=True)
    cached.symlink_to(random_inception_weights)
    assert resolve_inception_weights() == cached
    monkeypatch.setenv(INCEPTION_ENV, str(random_inception_weights))
    assert resolve_inception_weights() == random_inception_weights
    explicit = tmp_path / "explicit.pth"
    explicit.symlink_to(random_inception_weights)
    assert resolve_inception_weights(str(explicit)) == explicit


def test_quantisation_is_the_dit_rule(extractor):
    x = torch.linspace(-1.2, 1.2, 2 * 3 * 8 * 8).reshape(2, 3, 8, 8)
    dit = torch.clamp(127.5 * x + 128.0, 0, 255).to(torch.uint8)
    assert torch.equal(extractor.network_input(x), dit)
    assert torch.equal(extractor.network_input(x[:, :1]), dit[:, :1].expand(-1, 3, -1, -1))  # grayscale -> RGB
    dummy = (torch.zeros(2, 2048), torch.zeros(2, 1008))
    with mock.patch.object(extractor.net, "forward", return_value=dummy) as fwd:
        extractor(x)
    assert torch.equal(fwd.call_args.args[0], dit)  # what the network sees


def test_end_to_end_features_fd_and_inception_score(extractor):
    assert extractor.metric_name == "fd_inception"  # random weights are not the published file: not "fid"
    x = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    feats, logits = extractor.features_and_logits(x)
    assert feats.shape == (4, 2048) and logits.shape == (4, 1008)
    assert torch.isfinite(feats).all() and torch.isfinite(logits).all()

    fd = FrechetDistance(num_features=extractor.num_features)
    fd.set_reference(torch.zeros(2048), torch.eye(2048))  # full rank: the fast Cholesky path
    fd.update(feats, real=False)
    value = fd.compute()
    assert torch.isfinite(value) and value >= 0
    mean, std = inception_score(logits, splits=2)
    assert math.isfinite(mean) and mean >= 1.0 and std >= 0


def test_matches_torchmetrics_without_antialias(extractor, random_inception_weights):
    from torchmetrics.image.fid import NoTrainInceptionV3

    tm = NoTrainInceptionV3("inception-v3-compat", ["2048"], str(random_inception_weights), antialias=False)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    torch.testing.assert_close(extractor(x), tm(extractor.network_input(x)), rtol=1e-5, atol=1e-5)


def test_inception_score_matches_torch_fidelity():
    logits = torch.randn(100, 1008, generator=torch.Generator().manual_seed(1)) * 3
    mean, std = inception_score(logits, splits=10)
    ref = isc_features_to_metric(logits, splits=10)
    assert mean == pytest.approx(ref["inception_score_mean"], rel=1e-10)
    assert std == pytest.approx(ref["inception_score_std"], rel=1e-8)
    # One confident class per sample, all classes equally used: IS = number of classes.
    assert inception_score(torch.eye(10).repeat(10, 1) * 1000, splits=1)[0] == pytest.approx(10.0)


def test_encoder_extractor_flattens_one_location():
    ext = EncoderExtractor(Identity())
    assert ext.metric_name == "fd_encoder"
    x = torch.arange(24.0).reshape(3, 2, 4)
    assert torch.equal(ext(x), x.flatten(1))  # Identity: one location holding the flat sample
