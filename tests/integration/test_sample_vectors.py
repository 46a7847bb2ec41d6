"""`drifting sample` of a vector model (toy data): float32 [N, D] in the .npz, a scatter plot, flags that do not
apply refused before sampling; `drifting evaluate` of such samples: the energy distance."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from drifting_lightning.checkpoints.loading import load_module
from drifting_lightning.commands import evaluate, export, sample
from drifting_lightning.data.toy import ToyDataModule
from drifting_lightning.metrics.energy import energy_distance
from drifting_lightning.metrics.npz import write_adm_npz, write_vector_npz
from tests.integration.cli_helpers import REPO, run_drifting

TOY = str(REPO / "configs" / "toy" / "checkerboard.yaml")


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("toy")
    out = run_drifting("fit", "--config", TOY, "--trainer.callbacks=[]", "--trainer.max_steps", "2",
                       "--trainer.logger.init_args.save_dir", str(root), "--trainer.logger.init_args.name", "toy",
                       "--trainer.enable_progress_bar", "false", "--data.init_args.positives_per_step", "32",
                       "--model.init_args.generated_per_group", "32")  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    return root / "toy" / "version_0"


def test_vector_samples_are_float_points_and_a_plot(toy_run, tmp_path, capsys):
    npz, plot = tmp_path / "points.npz", tmp_path / "plots" / "points.png"
    args = ["--num", "300", "--batch-size", "128", "--seed", "3", "--device", "cpu", "--no-progress"]
    assert sample.main(["--ckpt", str(toy_run), "--out", str(npz), "--plot", str(plot), *args]) == 0
    assert f"wrote 300 samples [2] (alpha 1.0, 0 classes) to {npz}; the plot to {plot}" in capsys.readouterr().out
    with np.load(npz) as f:
        assert sorted(f.files) == ["arr_0"]  # unconditional: no labels
        points = f["arr_0"]
    assert points.dtype == np.float32 and points.shape == (300, 2)
    assert plot.read_bytes()[:4] == b"\x89PNG"

    # the same points as the module's own EMA samples with that noise, batch after batch
    module = load_module(toy_run)
    noise = torch.Generator().manual_seed(3)
    expected = torch.cat([module.sample(n, generator=noise) for n in (128, 128, 44)])
    np.testing.assert_array_equal(points, expected.numpy())

    # an export samples the same points
    assert export.main(["--ckpt", str(toy_run), "--out", str(tmp_path / "export")]) == 0
    assert sample.main(["--ckpt", str(tmp_path / "export"), "--out", str(tmp_path / "e"), *args]) == 0
    assert f"to {tmp_path / 'e.npz'}" in capsys.readouterr().out  # .npz added, as numpy.savez adds it
    with np.load(tmp_path / "e.npz") as f:
        np.testing.assert_array_equal(f["arr_0"], points)


def test_flags_that_do_not_fit_the_samples_are_refused_before_sampling(toy_run, tmp_path, capsys):
    npz = tmp_path / "x.npz"
    base = ["--ckpt", str(toy_run), "--out", str(npz), "--num", "10", "--device", "cpu", "--no-progress"]
    assert sample.main([*base, "--png-dir", str(tmp_path / "png")]) == 1
    assert "--png-dir: this model makes vectors, not images; --plot FILE.png draws them" in capsys.readouterr().err
    assert sample.main([*base, "--plot", str(tmp_path / "x.txt")]) == 1
    assert f"--plot {tmp_path / 'x.txt'}: name a picture file" in capsys.readouterr().err
    assert not npz.exists() and not (tmp_path / "png").exists()


def test_evaluate_gives_vector_samples_their_energy_distance(toy_run, tmp_path, capsys):
    npz = tmp_path / "points.npz"
    assert sample.main(["--ckpt", str(toy_run), "--out", str(npz), "--num", "200", "--no-progress"]) == 0
    out = tmp_path / "metrics.json"
    assert evaluate.main([str(npz), "--data-config", str(toy_run / "config.yaml"), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["metric"] == "energy_distance" and result["num_samples"] == result["num_reference"] == 200
    with np.load(npz) as f:
        points = torch.from_numpy(f["arr_0"])
    real = ToyDataModule("checkerboard").real_samples(200, split="train", seed=0)[0]
    assert result["energy_distance"] == pytest.approx(energy_distance(points, real), rel=1e-12)
    assert f"energy_distance: {result['energy_distance']:.6g}" in capsys.readouterr().out

    ref = write_vector_npz(tmp_path / "ref.npz", real)  # the same points as a reference file
    assert evaluate.main([str(npz), "--ref", str(ref), "--metric", "energy", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["energy_distance"] == pytest.approx(result["energy_distance"], rel=1e-12)

    assert evaluate.main([str(npz), "--ref", str(ref), "--metric", "fid"]) == 1
    assert "holds vectors [2] (a toy or vector model): their metric is --metric energy_distance" in (
        capsys.readouterr().err)
    images = write_adm_npz(tmp_path / "images.npz", torch.zeros(4, 8, 8, 1, dtype=torch.uint8))
    assert evaluate.main([str(images), "--ref", str(ref), "--metric", "energy_distance"]) == 1
    assert "--metric energy_distance is for vector samples [N, D]" in capsys.readouterr().err
