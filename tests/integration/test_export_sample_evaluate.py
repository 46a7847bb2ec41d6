"""fit -> export -> load_generator -> sample -> evaluate: bit-identical generators, ADM .npz files, named metrics."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import yaml

from drifting_lightning.checkpoints.loading import load_module
from drifting_lightning.commands import evaluate, export, sample
from drifting_lightning.data.images import DigitsDataModule
from drifting_lightning.export import export_generator, load_generator
from drifting_lightning.metrics.classifier import ClassifierTraining
from drifting_lightning.metrics.extractors import ClassifierExtractor
from drifting_lightning.metrics.frechet import FrechetDistance
from drifting_lightning.metrics.npz import to_uint8, write_adm_npz
from drifting_lightning.metrics.reference import save_reference_npz
from drifting_lightning.models.dit import DiT
from drifting_lightning.models.mlp import MLPGenerator
from drifting_lightning.module import DriftingModule
from drifting_lightning.sampling.positives import ClassAwareSampler
from tests.integration.cli_helpers import REPO, run_drifting

TINY_DIT = dict(hidden_size=32, depth=1, num_heads=2, num_style_tokens=4, style_codebook_size=8, num_context_tokens=2)
POSITIVES = {"class_path": "drifting_lightning.sampling.positives.ClassAwareSampler",
             "init_args": {"classes_per_step": 10, "positives_per_class": 4}}  # fmt: skip


def run_config(save_dir: Path) -> dict:
    """A 3-step DiT run on the 8x8 digits, with the sample-grid and Frechet callbacks configured by name."""
    return {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "devices": 1, "max_steps": 3, "enable_progress_bar": False,
            "enable_model_summary": False,
            "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                       "init_args": {"save_dir": str(save_dir), "name": "digits"}},
            "callbacks": [
                {"class_path": "drifting_lightning.callbacks.sample_grid.SampleGridCallback",
                 "init_args": {"every_n_steps": 2, "samples_per_class": 2, "alpha": [1.0, 2.0]}},
                {"class_path": "drifting_lightning.callbacks.frechet.FrechetCallback",
                 "init_args": {"every_n_steps": 2, "num_samples": 20, "metric": "encoder", "alphas": [1.0, 2.0],
                               "cache_dir": str(save_dir / "refs")}},
            ],
        },
        "model": {
            "class_path": "drifting_lightning.module.DriftingModule",
            "init_args": {
                "generator": {"class_path": "drifting_lightning.models.dit.DiT",
                              "init_args": {"preset": "digits", **TINY_DIT}},
                "generated_per_group": 4, "lr": 0.01, "ema_decay": 0.5,
            },
        },
        "data": {"class_path": "drifting_lightning.data.images.DigitsDataModule",
                 "init_args": {"positives": POSITIVES, "steps_per_epoch": 10}},
    }  # fmt: skip


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    """One `drifting fit` subprocess shared by the tests: its folder, config file and checkpoint."""
    root = tmp_path_factory.mktemp("fit")
    config = root / "digits.yaml"
    config.write_text(yaml.safe_dump(run_config(root)))
    out = run_drifting("fit", "--config", str(config))
    assert out.returncode == 0, out.stderr[-3000:]
    folder = root / "digits" / "version_0"
    (ckpt,) = (folder / "checkpoints").glob("*.ckpt")
    return {"root": root, "folder": folder, "config": config, "ckpt": ckpt}


def draw(gen, n=12, seed=3, alpha=1.5):
    inputs = gen.draw_inputs(n, device="cpu", generator=torch.Generator().manual_seed(seed))
    labels = torch.arange(n) % gen.num_classes if gen.num_classes else None
    with torch.no_grad():
        return gen(**inputs, labels=labels, alpha=torch.full((n,), alpha))


def test_cli_run_logged_grids_and_fd_encoder(run):
    folder = run["folder"]
    assert (folder / "config.yaml").is_file()
    assert (folder / "grid_final_alpha2.0.png").is_file() and (folder / "fd_encoder_vs_alpha_step000003.png").is_file()
    record = json.loads((folder / "fd_encoder.json").read_text())
    assert [h["step"] for h in record["history"]] == [2, 3]
    assert set(record["history"][-1]) == {"step", "metrics/fd_encoder_alpha1.0", "metrics/fd_encoder_alpha2.0"}


def test_export_in_memory_is_bit_identical_and_lightning_free(tmp_path):
    torch.manual_seed(0)
    module = DriftingModule(DiT("digits", **TINY_DIT), generated_per_group=4, lr=1e-2, ema_decay=0.5)
    dm = DigitsDataModule(positives=ClassAwareSampler(classes_per_step=10, positives_per_class=4), steps_per_epoch=10)
    L.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False).fit(module, datamodule=dm)  # fmt: skip
    out = export_generator(module, tmp_path / "export")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["class_path"] == "drifting_lightning.models.dit.DiT" and cfg["init_args"]["hidden_size"] == 32
    assert cfg["sample_shape"] == [1, 8, 8] and cfg["num_classes"] == 10 and cfg["ema"] is True
    loaded = load_generator(out)
    expected = draw(module.ema_generator)
    assert expected.std() > 0.01  # trained past the zero output of the adaLN-zero init
    assert torch.equal(draw(loaded), expected)
    assert not torch.equal(draw(module.generator), expected)  # the EMA, not the online weights, was exported

    code = f"import sys; from drifting_lightning import load_generator; load_generator({str(out)!r}); " \
           "print(sorted(m for m in ('lightning', 'jsonargparse') if m in sys.modules))"  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_export_mlp_generator(tmp_path):
    torch.manual_seed(0)
    gen = MLPGenerator(noise_dim=8, output_dim=3, hidden=(16, 24), num_classes=4, init="collapsed")
    loaded = load_generator(export_generator(gen, tmp_path))
    assert torch.equal(draw(loaded), draw(gen))
    assert json.loads((tmp_path / "config.json").read_text())["init_args"]["hidden"] == [16, 24]


def test_load_module_export_and_sample_from_checkpoint(run, tmp_path, capsys):
    module = load_module(run["ckpt"])
    assert isinstance(module, DriftingModule) and isinstance(module.ema_generator, DiT)
    assert module.ema_generator.config["hidden_size"] == 32

    assert export.main(["--ckpt", str(run["ckpt"]), "--out", str(tmp_path / "export")]) == 0
    assert torch.equal(draw(load_generator(tmp_path / "export")), draw(module.ema_generator))

    npz = tmp_path / "samples.npz"
    args = ["--num", "50", "--alpha", "1.0", "--batch-size", "16", "--seed", "5", "--device", "cpu", "--no-progress"]
    assert sample.main(["--ckpt", str(run["ckpt"]), "--out", str(npz), "--png-dir", str(tmp_path / "png"), *args]) == 0
    with np.load(npz) as f:
        images, labels = f["arr_0"], f["arr_1"]
    assert images.dtype == np.uint8 and images.shape == (50, 8, 8, 1)
    assert np.bincount(labels).tolist() == [5] * 10
    noise = torch.Generator().manual_seed(5)
    expected = torch.cat([module.sample(len(i), labels=i % 10, alpha=1.0, generator=noise)
                          for i in torch.arange(50).split(16)])  # fmt: skip
    np.testing.assert_array_equal(images, to_uint8(expected).numpy())
    assert len(list((tmp_path / "png").glob("*.png"))) == 50

    from_export = tmp_path / "from_export.npz"
    assert sample.main(["--ckpt", str(tmp_path / "export"), "--out", str(from_export), *args]) == 0
    with np.load(from_export) as f:
        np.testing.assert_array_equal(f["arr_0"], images)

    from_folder = tmp_path / "from_folder.npz"  # the run folder, as `fit --ckpt_path` takes it: its last.ckpt
    assert sample.main(["--ckpt", str(run["folder"]), "--out", str(from_folder), *args]) == 0
    with np.load(from_folder) as f:
        np.testing.assert_array_equal(f["arr_0"], images)

    # --plot is for vector models: refused for images before sampling
    assert sample.main(["--ckpt", str(run["ckpt"]), "--out", str(tmp_path / "c.npz"), "--plot", "p.png", *args]) == 1
    assert "--plot: this model makes images; --png-dir DIR writes them as PNGs" in capsys.readouterr().err
    assert not (tmp_path / "c.npz").exists()

    # export and load_module take the run folder too: its newest last.ckpt
    assert export.main(["--ckpt", str(run["folder"]), "--out", str(tmp_path / "export_of_folder")]) == 0
    assert f"--ckpt is a run folder: exporting from {run['ckpt']}" in capsys.readouterr().err
    assert torch.equal(draw(load_generator(tmp_path / "export_of_folder")), draw(module.ema_generator))
    from_folder_module = load_module(run["folder"])
    assert all(torch.equal(v, module.state_dict()[k]) for k, v in from_folder_module.state_dict().items())


def test_evaluate_fd_classifier(run, tmp_path, capsys):
    dm = DigitsDataModule(positives=ClassAwareSampler(classes_per_step=10, positives_per_class=8), steps_per_epoch=30)
    clf = tmp_path / "classifier.pt"
    L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, default_root_dir=tmp_path).fit(
        ClassifierTraining(width=8, feature_dim=16, lr=1e-2, export_path=str(clf)), datamodule=dm)  # fmt: skip
    module = load_module(run["ckpt"])
    x = module.sample(60, generator=torch.Generator().manual_seed(0))
    samples = write_adm_npz(tmp_path / "samples.npz", to_uint8(x), torch.arange(60) % 10)

    out = tmp_path / "metrics.json"
    argv = [str(samples), "--data-config", str(run["config"]), "--metric", "fd_classifier", "--checkpoint", str(clf),
            "--num-ref", "80", "--pr-samples", "40", "--device", "cpu", "--out", str(out)]  # fmt: skip
    assert evaluate.main(argv) == 0
    printed, shown = capsys.readouterr()
    assert "fd_classifier:" in printed and "fid" not in printed and "precision:" in printed
    assert "fd_classifier of the samples" in shown and "fd_classifier of the reference" in shown  # progress bars
    result = json.loads(out.read_text())
    assert result["metric"] == "fd_classifier" and result["num_samples"] == 60 and result["num_reference"] == 80
    assert 0 <= result["precision"] <= 1 and 0 <= result["recall"] <= 1
    assert result["extractor"] == {"checkpoint": str(clf), "weights": None}  # null, not the string 'None'

    # The same number by hand: both sides through uint8, back to [-1, 1], then the classifier's features.
    real = to_uint8(dm.real_samples(80, split="train", seed=0)[0], channels_last=False).float() / 127.5 - 1
    fake = to_uint8(x, channels_last=False).float() / 127.5 - 1
    fd = FrechetDistance(ClassifierExtractor(str(clf)))
    fd.update(real, real=True)
    fd.update(fake, real=False)
    # rel 1e-6, not exact: CPU conv kernels may round the float32 features of the same images differently from call
    # to call (memory alignment), and the distance amplifies that last-bit noise.
    assert result["fd_classifier"] == pytest.approx(fd.compute().item(), rel=1e-6)

    # A reference .npz of the same real images gives the same value.
    ref = write_adm_npz(tmp_path / "ref.npz", to_uint8(dm.real_samples(80, split="train", seed=0)[0]))
    assert evaluate.main([str(samples), "--ref", str(ref), "--metric", "classifier", "--checkpoint", str(clf),
                          "--device", "cpu", "--out", str(out), "--no-progress"]) == 0  # fmt: skip
    assert "of the samples" not in capsys.readouterr().err
    assert json.loads(out.read_text())["fd_classifier"] == pytest.approx(result["fd_classifier"], rel=1e-6)

    # Statistics only (mu, sigma of the same features): the same value again, and no precision/recall.
    mu, sigma = fd.statistics(real=True)
    stats = save_reference_npz(tmp_path / "stats.npz", mu.numpy(), sigma.numpy())
    assert evaluate.main([str(samples), "--ref", str(stats), "--metric", "fd_classifier", "--checkpoint", str(clf),
                          "--device", "cpu", "--out", str(out)]) == 0  # fmt: skip
    from_stats = json.loads(out.read_text())
    assert from_stats["fd_classifier"] == pytest.approx(result["fd_classifier"], rel=1e-6)
    assert "precision" not in from_stats and from_stats["reference_statistics"] == "file"
    wrong = save_reference_npz(tmp_path / "wrong.npz", np.zeros(5), np.eye(5))  # another feature space
    assert evaluate.main([str(samples), "--ref", str(wrong), "--metric", "fd_classifier", "--checkpoint", str(clf),
                          "--device", "cpu"]) == 1  # fmt: skip
    assert "another feature extractor" in capsys.readouterr().err
    nan = save_reference_npz(tmp_path / "nan.npz", np.full(16, np.nan), np.eye(16))  # damaged statistics: named
    assert evaluate.main([str(samples), "--ref", str(nan), "--metric", "fd_classifier", "--checkpoint", str(clf),
                          "--device", "cpu"]) == 1  # fmt: skip
    assert f"--ref {nan}: mu or sigma holds NaN or Inf; the reference statistics are damaged" in capsys.readouterr().err
    # samples of another size than the classifier's training images: refused, not a meaningless number
    big = write_adm_npz(tmp_path / "big.npz", torch.randint(0, 256, (60, 16, 16, 1), dtype=torch.uint8))
    assert evaluate.main([str(big), "--ref", str(stats), "--metric", "fd_classifier", "--checkpoint", str(clf),
                          "--device", "cpu"]) == 1  # fmt: skip
    err = capsys.readouterr().err
    assert f"the classifier {clf} was trained on 8x8, 1 channel images, these are 16x16, 1 channel" in err
    assert "Traceback" not in err
    # a classifier file given to fd_encoder: named, with its metric
    assert evaluate.main([str(samples), "--ref", str(stats), "--metric", "fd_encoder", "--checkpoint", str(clf),
                          "--device", "cpu"]) == 1  # fmt: skip
    assert f"--checkpoint {clf} is a classifier file: its metric is --metric fd_classifier" in capsys.readouterr().err


@pytest.mark.slow
def test_evaluate_inception_with_other_weights_reports_fd_inception_and_is(tmp_path, capsys, random_inception_weights):
    weights = random_inception_weights
    g = torch.Generator().manual_seed(0)
    samples = write_adm_npz(tmp_path / "s.npz", to_uint8(torch.rand(12, 3, 16, 16, generator=g) * 2 - 1))
    ref = write_adm_npz(tmp_path / "r.npz", to_uint8(torch.rand(12, 3, 16, 16, generator=g) * 2 - 1))
    out = tmp_path / "m.json"
    argv = [str(samples), "--ref", str(ref), "--metric", "fid", "--weights", str(weights), "--device", "cpu",
            "--batch-size", "6", "--out", str(out)]  # fmt: skip
    with pytest.warns(UserWarning, match="not the published"):
        assert evaluate.main(argv) == 0
    printed = capsys.readouterr().out
    assert "fd_inception:" in printed and "fid:" not in printed and "inception_score:" in printed
    result = json.loads(out.read_text())
    assert result["metric"] == "fd_inception" and np.isfinite(result["fd_inception"])
    assert 1.0 <= result["inception_score"] <= 1008  # exp(KL) lies between 1 and the number of classes


def test_missing_files_are_clear_errors(run, tmp_path, capsys):
    missing = str(tmp_path / "nope.ckpt")
    assert sample.main(["--ckpt", missing, "--out", str(tmp_path / "s.npz"), "--device", "cpu"]) == 1
    assert export.main(["--ckpt", missing, "--out", str(tmp_path / "e")]) == 1
    assert evaluate.main([str(tmp_path / "none.npz"), "--ref", str(tmp_path / "r.npz"), "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert err.count("nope.ckpt") == 2 and "none.npz" in err and "Traceback" not in err

    lonely = tmp_path / "lonely.ckpt"  # a checkpoint away from its run folder: no config.yaml
    shutil.copy(run["ckpt"], lonely)
    assert export.main(["--ckpt", str(lonely), "--out", str(tmp_path / "e")]) == 1
    err = capsys.readouterr().err
    assert "config.yaml" in err and "--config" in err and "Traceback" not in err
    assert export.main(["--ckpt", str(lonely), "--out", str(tmp_path / "e"), "--config",
                        str(run["folder"] / "config.yaml")]) == 0  # fmt: skip

    assert sample.main(["--help"]) == 0 and "--png-dir" in capsys.readouterr().out
    assert evaluate.main(["x.npz"]) == 2  # --ref or --data-config is required
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_generator(tmp_path)


def write_sharded(ckpt: dict, folder: Path, model_key: str = "state_dict") -> Path:
    """``ckpt`` in the layout of a sharded save (ModelParallelStrategy / FSDP with save_distributed_checkpoint):
    torch.distributed.checkpoint files for the weights and ``meta.pt`` for the rest, written without a process group."""
    import torch.distributed.checkpoint as dcp

    dcp.save({model_key: ckpt["state_dict"]}, checkpoint_id=folder, no_dist=True)
    meta = {k: v for k, v in ckpt.items() if k not in ("state_dict", "optimizer_states")}
    torch.save(meta, folder / "meta.pt")
    return folder


@pytest.mark.parametrize("model_key", ["state_dict", "model"])  # ModelParallelStrategy's and FSDPStrategy's names
def test_sharded_checkpoint_folders_load_export_and_sample(run, tmp_path, model_key):
    ckpt = torch.load(run["ckpt"], map_location="cpu", weights_only=False)
    # In the run's checkpoints folder, like a sharded last.ckpt, so that the run's config.yaml is found.
    folder = write_sharded(ckpt, run["folder"] / "checkpoints" / f"sharded-{model_key}.ckpt", model_key)

    module = load_module(folder)
    reference = load_module(run["ckpt"])
    assert module.state_dict().keys() == reference.state_dict().keys()
    assert all(torch.equal(v, reference.state_dict()[k]) for k, v in module.state_dict().items())

    assert export.main(["--ckpt", str(folder), "--out", str(tmp_path / "export")]) == 0
    assert torch.equal(draw(load_generator(tmp_path / "export")), draw(reference.ema_generator))
    args = ["--num", "20", "--alpha", "1.0", "--seed", "5", "--device", "cpu", "--no-progress"]
    assert sample.main(["--ckpt", str(folder), "--out", str(tmp_path / "a.npz"), *args]) == 0
    assert sample.main(["--ckpt", str(run["ckpt"]), "--out", str(tmp_path / "b.npz"), *args]) == 0
    with np.load(tmp_path / "a.npz") as a, np.load(tmp_path / "b.npz") as b:
        np.testing.assert_array_equal(a["arr_0"], b["arr_0"])


def test_a_folder_that_is_not_a_checkpoint_is_named(tmp_path, capsys):
    assert export.main(["--ckpt", str(tmp_path), "--out", str(tmp_path / "e")]) == 1
    err = capsys.readouterr().err
    assert f"{tmp_path} is a folder without a last.ckpt" in err and "sharded checkpoint folder (with a .metadata" in err
    assert "Traceback" not in err
