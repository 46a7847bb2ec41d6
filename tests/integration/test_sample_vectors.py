"""`drifting sample` of a vector model (toy data): float32 [N, D] in the .npz, a scatter plot, and flags that do not
apply refused before sampling."""

from pathlib import Path

import numpy as np
import pytest
import torch

from drifting_lightning.checkpoints.loading import load_module
from drifting_lightning.commands import export, sample
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
    assert sample.main(["--ckpt", str(tmp_path / "export"), "--out", str(tmp_path / "e.npz"), *args]) == 0
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
