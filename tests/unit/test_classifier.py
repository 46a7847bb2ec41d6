"""The FD classifier: trains on the class-grouped batch dict, logs test accuracy, exports what the extractor loads."""

import pytest
import torch

from drifting_lightning.metrics.classifier import SmallCNN, flatten_batch
from drifting_lightning.metrics.extractors import ClassifierExtractor


def test_flatten_batch_repeats_labels():
    batch = {"positives": torch.arange(12.0).view(3, 2, 2), "labels": torch.tensor([5, 6, 7])}
    x, y = flatten_batch(batch)
    assert x.shape == (6, 2) and y.tolist() == [5, 5, 6, 6, 7, 7]


@pytest.mark.parametrize("size", [8, 28, 32])
def test_small_cnn_shapes(size):
    net = SmallCNN(in_channels=1, num_classes=10, width=8, feature_dim=16)
    x = torch.randn(2, 1, size, size)
    assert net(x).shape == (2, 10) and net.features(x).shape == (2, 16)


def test_missing_classifier_checkpoint_says_how_to_make_one(tmp_path):
    with pytest.raises(FileNotFoundError, match="configs/classifier/fashion_mnist.yaml"):
        ClassifierExtractor(str(tmp_path / "nope.pt"))


