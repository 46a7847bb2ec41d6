"""configs/classifier/fashion_mnist.yaml through the CLI on a tiny IDX data set: trains, logs, exports."""

from pathlib import Path

import numpy as np
import torch

from drifting_lightning.metrics.extractors import ClassifierExtractor
from tests.integration.cli_helpers import REPO, run_drifting
from tests.unit.test_image_data import write_idx

CONFIG = str(REPO / "configs" / "classifier" / "fashion_mnist.yaml")


def test_classifier_config_trains_and_exports(tmp_path: Path):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 60), ("t10k", 20)):
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8))
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10)
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
