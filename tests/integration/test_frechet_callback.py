"""FrechetCallback: the value and its name (never ``fid`` without the published Inception weights), guidance sweeps,
the reference cache, and training that goes on when Inception weights are missing."""

import json
import warnings
from unittest import mock

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from drifting_lightning.callbacks.frechet import FrechetCallback, make_extractor, metric_kind
from drifting_lightning.data.images import DigitsDataModule
from drifting_lightning.metrics.classifier import SmallCNN, save_classifier
from drifting_lightning.metrics.extractors import INCEPTION_ENV, INCEPTION_FILENAME
from drifting_lightning.metrics.frechet import FrechetDistance, frechet_distance
from drifting_lightning.metrics.reference import save_reference_npz
from drifting_lightning.models.dit import DiT
from drifting_lightning.module import DriftingModule
from drifting_lightning.sampling.positives import ClassAwareSampler

TINY_DIT = dict(hidden_size=32, depth=1, num_heads=2, num_style_tokens=4, style_codebook_size=8, num_context_tokens=2)


def tiny_module() -> DriftingModule:
    torch.manual_seed(0)
    return DriftingModule(DiT("digits", **TINY_DIT), generated_per_group=4, lr=1e-2, ema_decay=0.0)


def digits() -> DigitsDataModule:
    return DigitsDataModule(positives=ClassAwareSampler(classes_per_step=10, positives_per_class=4), steps_per_epoch=10)


def fit(tmp_path, callbacks, module=None, steps=3) -> tuple[L.Trainer, DriftingModule]:
    module = module or tiny_module()
    trainer = L.Trainer(
        max_steps=steps, accelerator="cpu", logger=TensorBoardLogger(tmp_path), default_root_dir=tmp_path,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
    )  # fmt: skip
    trainer.fit(module, datamodule=digits())
    return trainer, module


def scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(log_dir, size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


@pytest.fixture(scope="module")
def classifier_file(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("clf") / "classifier.pt"
    arch = dict(in_channels=1, num_classes=10, width=4, feature_dim=8)
    return str(save_classifier(path, SmallCNN(**arch), arch, test_accuracy=None))


def through_uint8(x):
    """What a saved sample looks like to the evaluator: the DiT uint8 rule, then back to [-1, 1]."""
    return torch.clamp(127.5 * x + 128, 0, 255).to(torch.uint8).float() / 127.5 - 1


def expected_fd(module, extractor, n, batch_size, alpha, seed=0):
    """The callback's protocol by hand: n real train images (order from seed) vs n EMA samples, sample i of class
    i mod 10, noise from one generator seeded with seed, in batches. Compare at rel 1e-6: CPU kernels may round
    float32 features differently from call to call (memory alignment), and the distance amplifies that."""
    real = digits().real_samples(n, split="train", seed=seed)[0]
    metric = FrechetDistance(extractor)
    metric.update(through_uint8(real), real=True)
    noise = torch.Generator().manual_seed(seed)
    for idx in torch.arange(n).split(batch_size):
        x = module.sample(len(idx), labels=idx % 10, alpha=alpha, generator=noise)
        metric.update(through_uint8(x), real=False)
    return metric.compute().item()


def test_classifier_metric_value_name_and_cache(tmp_path, classifier_file):
    cache = tmp_path / "refs"
    cb = FrechetCallback(every_n_steps=2, num_samples=60, metric="classifier", checkpoint=classifier_file,
                         batch_size=25, cache_dir=str(cache))  # fmt: skip
    trainer, module = fit(tmp_path / "a", [cb])
    logged = scalars(trainer.log_dir)
    assert [s for s, _ in logged["metrics/fd_classifier"]] == [2, 3]
    assert not any("fid" in tag for tag in logged)  # a classifier's distance is never called FID
    expected = expected_fd(module, make_extractor("classifier", classifier_file), 60, 25, 1.0)
    assert cb.history[-1][1]["metrics/fd_classifier"] == pytest.approx(expected, rel=1e-6)
    assert logged["metrics/fd_classifier"][-1][1] == pytest.approx(expected, rel=1e-6)  # TensorBoard is float32
    # the end's value (step 3 = max_steps) is evaluated at its batch end, where pl_module.log feeds callback_metrics
    last = cb.history[-1][1]["metrics/fd_classifier"]
    assert trainer.callback_metrics["metrics/fd_classifier"].item() == pytest.approx(last)
    record = json.loads((tmp_path / "a" / "lightning_logs" / "version_0" / "fd_classifier.json").read_text())
    assert [h["step"] for h in record["history"]] == [2, 3] and record["metric"] == "fd_classifier"

    (ref_file,) = cache.glob("ref_*.npz")  # computed once, cached
    with mock.patch("drifting_lightning.metrics.reference.compute_statistics", side_effect=AssertionError("miss")):
        cb2 = FrechetCallback(every_n_steps=100, num_samples=60, checkpoint=classifier_file, batch_size=25,
                              cache_dir=str(cache))  # fmt: skip
        fit(tmp_path / "b", [cb2])
    assert list(cache.glob("ref_*.npz")) == [ref_file]
    assert cb2.history[-1][1]["metrics/fd_classifier"] == pytest.approx(expected, rel=1e-6)  # same weights, step 3


def test_guidance_sweep_keys_and_plot(tmp_path, classifier_file):
    cb = FrechetCallback(every_n_steps=100, num_samples=30, alphas=[1.0, 1.5, 3.0], checkpoint=classifier_file,
                         batch_size=30, cache_dir=str(tmp_path / "refs"))  # fmt: skip
    trainer, module = fit(tmp_path, [cb])
    keys = ["metrics/fd_classifier_alpha1.0", "metrics/fd_classifier_alpha1.5", "metrics/fd_classifier_alpha3.0"]
    logged = scalars(trainer.log_dir)
    assert all([s for s, _ in logged[k]] == [3] for k in keys) and "metrics/fd_classifier" not in logged
    step, values = cb.history[-1]
    assert step == 3 and list(values) == keys
    extractor = make_extractor("classifier", classifier_file)
    assert values[keys[2]] == pytest.approx(expected_fd(module, extractor, 30, 30, 3.0), rel=1e-6)
    assert len(set(values.values())) == 3  # alpha changes the samples
    assert (tmp_path / "lightning_logs" / "version_0" / "fd_classifier_vs_alpha_step000003.png").stat().st_size > 1000
    events = EventAccumulator(trainer.log_dir, size_guidance={"images": 0})
    events.Reload()
    assert [e.step for e in events.Images("metrics/fd_classifier_vs_alpha")] == [3]


def test_encoder_metric_with_reference_npz(tmp_path):
    # metric "encoder" defaults to the module's own encoder (Identity: the raw 64 pixels); the reference is a file.
    g = np.random.default_rng(0)
    mu, a = g.normal(size=64), g.normal(size=(64, 80))
    sigma = a @ a.T / 80
    ref = save_reference_npz(tmp_path / "ref.npz", mu, sigma)
    cb = FrechetCallback(every_n_steps=100, num_samples=40, metric="encoder", reference_npz=str(ref), batch_size=40)
    _, module = fit(tmp_path, [cb])
    assert cb.name == "fd_encoder"
    x = module.sample(40, labels=torch.arange(40) % 10, generator=torch.Generator().manual_seed(0))
    x = through_uint8(x).flatten(1)
    expected = frechet_distance(mu, sigma, x.double().mean(0), torch.cov(x.double().T))
    assert cb.history[-1][1]["metrics/fd_encoder"] == pytest.approx(expected, rel=1e-6)
    assert not (tmp_path / "reference_stats").exists()  # nothing computed from the data


def test_missing_inception_weights_warn_once_and_training_goes_on(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))
    monkeypatch.delenv(INCEPTION_ENV, raising=False)
    cb = FrechetCallback(every_n_steps=1, num_samples=10, metric="inception")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer, _ = fit(tmp_path, [cb])
    said = [str(w.message) for w in caught if "FrechetCallback" in str(w.message)]
    assert len(said) == 1 and INCEPTION_FILENAME in said[0] and INCEPTION_ENV in said[0]
    assert trainer.global_step == 3 and cb.disabled and cb.history == []
    assert not any(tag.startswith("metrics/") for tag in scalars(trainer.log_dir))


def test_inception_with_other_weights_is_fd_inception_never_fid(tmp_path, random_inception_weights):
    weights = random_inception_weights  # the published name, other content: the hash decides
    cb = FrechetCallback(every_n_steps=100, num_samples=4, metric="fid", weights=str(weights), batch_size=4,
                         cache_dir=str(tmp_path / "refs"))  # fmt: skip
    with pytest.warns(UserWarning, match="not the published"):
        trainer, _ = fit(tmp_path, [cb], steps=1)
    assert cb.name == "fd_inception"
    logged = scalars(trainer.log_dir)
    assert "metrics/fd_inception" in logged and not any("fid" in tag for tag in logged)
    assert np.isfinite(cb.history[-1][1]["metrics/fd_inception"])


def test_argument_errors(tmp_path):
    assert metric_kind("fid") == "inception" and metric_kind("fd_classifier") == "classifier"
    with pytest.raises(ValueError, match="unknown Frechet metric"):
        FrechetCallback(metric="kid")
    with pytest.raises(ValueError, match="classifier.pt"):
        FrechetCallback(metric="classifier")
    with pytest.raises(ValueError, match=">= 1"):
        FrechetCallback(metric="encoder", alphas=[0.0])
    cb = FrechetCallback(metric="encoder", reference_npz=str(tmp_path / "nope.npz"))
    with pytest.raises(FileNotFoundError, match="nope.npz"):
        fit(tmp_path, [cb], steps=1)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        FrechetCallback(checkpoint=str(tmp_path / "missing.pt")).on_fit_start(mock.MagicMock(), tiny_module())


@pytest.mark.slow
def test_ddp_two_processes_equal_the_protocol_by_hand(tmp_path, classifier_file):
    """2 CPU processes (ddp_spawn, gloo): each samples its share, the metric sums both, rank 0 writes the value."""
    cb = FrechetCallback(every_n_steps=100, num_samples=40, checkpoint=classifier_file, batch_size=8,
                         cache_dir=str(tmp_path / "refs"))  # fmt: skip
    module = tiny_module()
    trainer = L.Trainer(
        max_steps=2, accelerator="cpu", devices=2, strategy="ddp_spawn", logger=TensorBoardLogger(tmp_path),
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[cb],
    )  # fmt: skip
    trainer.fit(module, datamodule=digits())  # the weights come back to this process after training
    record = json.loads((tmp_path / "lightning_logs" / "version_0" / "fd_classifier.json").read_text())
    value = record["history"][-1]["metrics/fd_classifier"]

    extractor = make_extractor("classifier", classifier_file)
    metric = FrechetDistance(extractor)
    metric.update(through_uint8(digits().real_samples(40, split="train", seed=0)[0]), real=True)
    for rank in range(2):  # rank r: samples r, r + 2, ... with noise seeded 0 + r
        noise = torch.Generator().manual_seed(rank)
        for idx in torch.arange(rank, 40, 2).split(8):
            x = module.sample(len(idx), labels=idx % 10, generator=noise)
            metric.update(through_uint8(x), real=False)
    assert value == pytest.approx(metric.compute().item(), rel=1e-6)


def test_two_callbacks_of_one_metric_log_under_their_tags(tmp_path, classifier_file):
    common = dict(metric="classifier", checkpoint=classifier_file, batch_size=30, cache_dir=str(tmp_path / "refs"))
    frequent = FrechetCallback(every_n_steps=2, num_samples=30, **common)
    large = FrechetCallback(every_n_steps=100, num_samples=60, tag="60", **common)
    assert frequent.state_key != large.state_key  # Lightning refuses two stateful callbacks with one key
    trainer, module = fit(tmp_path, [frequent, large])
    logged = scalars(trainer.log_dir)
    assert [s for s, _ in logged["metrics/fd_classifier"]] == [2, 3]
    assert [s for s, _ in logged["metrics/fd_classifier_60"]] == [3]
    assert "time/fd_classifier_s" in logged and "time/fd_classifier_60_s" in logged
    extractor = make_extractor("classifier", classifier_file)
    assert large.history[-1][1]["metrics/fd_classifier_60"] == pytest.approx(
        expected_fd(module, extractor, 60, 30, 1.0), rel=1e-6
    )
    folder = tmp_path / "lightning_logs" / "version_0"
    assert json.loads((folder / "fd_classifier_60.json").read_text())["num_samples"] == 60
    assert json.loads((folder / "fd_classifier.json").read_text())["num_samples"] == 30


def test_two_callbacks_with_one_tag_are_refused_with_the_fix(tmp_path, classifier_file):
    from drifting_lightning.commands import explain

    common = dict(metric="classifier", checkpoint=classifier_file, batch_size=30, cache_dir=str(tmp_path / "refs"))
    with pytest.raises(RuntimeError, match="more than one stateful callback") as err:
        fit(tmp_path, [FrechetCallback(num_samples=30, **common), FrechetCallback(num_samples=60, **common)])
    assert explain(err.value).endswith("Give each FrechetCallback of one metric its own `tag` (e.g. tag: 50k).")
    with pytest.raises(ValueError, match="tag must be letters"):
        FrechetCallback(tag="50 k", **common)
