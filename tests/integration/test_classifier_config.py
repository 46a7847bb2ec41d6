"""configs/classifier/fashion_mnist.yaml through the CLI on a tiny IDX data set: trains, logs, exports."""

from pathlib import Path

import torch

from drifting_lightning.metrics.extractors import ClassifierExtractor
from tests.integration.cli_helpers import REPO, run_drifting

CONFIG = str(REPO / "configs" / "classifier" / "fashion_mnist.yaml")


def test_classifier_config_trains_and_exports(tmp_path: Path, fashion_mnist_files):
    fashion_mnist_files(tmp_path, train=60)
    export = tmp_path / "classifier.pt"
    out = run_drifting(
        "fit", "--config", CONFIG,
        "--data.init_args.root", str(tmp_path), "--data.init_args.steps_per_epoch", "2",
        "--trainer.max_epochs", "1", "--trainer.accelerator", "cpu", "--trainer.default_root_dir", str(tmp_path),
        "--model.init_args.export_path", str(export),
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert 0.0 <= torch.load(export, weights_only=True)["test_accuracy"] <= 1.0
    extractor = ClassifierExtractor(str(export))
    assert extractor(torch.zeros(3, 1, 28, 28)).shape == (3, 128)
