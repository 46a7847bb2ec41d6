"""configs/fashion_mnist.yaml and configs/fashion_mnist_mae.yaml through the CLI on tiny IDX files: a few CPU
steps with their own callbacks (fd_classifier, grids), the classifier file and the MAE encoder made by the test.

The MAE encoder is built from configs/mae/fashion_mnist.yaml's own arguments, so a drift between the pretraining
config and the encoder arguments of fashion_mnist_mae.yaml fails here, not after a 20-minute pretraining run.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from drifting_lightning.encoders.mae import MAEPretraining
from drifting_lightning.metrics.classifier import ARCH_KEYS, ClassifierTraining, save_classifier
from tests.integration.cli_helpers import REPO, run_drifting


def config_of(name: str) -> dict:
    return yaml.safe_load((REPO / "configs" / name).read_text())


def write_classifier(path: Path) -> None:
    args = config_of("classifier/fashion_mnist.yaml")["model"]["init_args"]
    torch.manual_seed(0)
    module = ClassifierTraining(**{k: args[k] for k in ARCH_KEYS})
    save_classifier(path, module.net, {k: args[k] for k in ARCH_KEYS}, None)


def write_mae_encoder(path: Path) -> None:
    args = config_of("mae/fashion_mnist.yaml")["model"]["init_args"]
    torch.manual_seed(0)
    MAEPretraining(**args).export_encoder(path)


@pytest.mark.parametrize("config", ["fashion_mnist.yaml", "fashion_mnist_mae.yaml"])
def test_fashion_config_trains_and_logs_fd_classifier(config: str, tmp_path: Path, fashion_mnist_files):
    fashion_mnist_files(tmp_path)
    write_classifier(tmp_path / "classifier.pt")
    callbacks = config_of(config)["trainer"]["callbacks"]
    frechet = next(c for c in callbacks if c["class_path"].endswith("FrechetCallback"))
    frechet["init_args"].update(
        checkpoint=str(tmp_path / "classifier.pt"), num_samples=20, num_reference=20, batch_size=10
    )
    model: dict = {
        "generated_per_group": 4,
        "generator": {"init_args": {"hidden_size": 32, "depth": 1}},
    }
    if "encoder" in config_of(config)["model"]["init_args"]:
        write_mae_encoder(tmp_path / "encoder.pt")
        model["encoder"] = {"init_args": {"checkpoint": str(tmp_path / "encoder.pt")}}
    overrides = {
        "trainer": {"max_steps": 2, "callbacks": callbacks, "enable_progress_bar": False,
                    "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                               "init_args": {"save_dir": str(tmp_path / "runs")}}},
        "model": {"init_args": model},
        "data": {"init_args": {"root": str(tmp_path), "positives": {"init_args": {
            "positives_per_class": 4, "unconditional_per_class": 2}}}},
    }  # fmt: skip
    (tmp_path / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    out = run_drifting(
        "fit", "--config", str(REPO / "configs" / config), "--config", str(tmp_path / "overrides.yaml"),
        "--trainer.default_root_dir", str(tmp_path),
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    run = next((tmp_path / "runs").glob("*/version_0"))
    record = json.loads((run / "fd_classifier.json").read_text())
    assert record["metric"] == "fd_classifier" and record["alphas"] == [1.0, 2.0]
    final = record["history"][-1]
    assert final["step"] == 2 and all(v > 0 for k, v in final.items() if k != "step")
    assert (run / "grid_final_alpha2.0.png").exists()
