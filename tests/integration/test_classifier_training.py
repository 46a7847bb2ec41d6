"""ClassifierTraining in short fits: training, logging, export; a crash or a resume keeps the last finished epoch's
classifier."""

import lightning as L
import pytest
import torch

from drifting_lightning.metrics.classifier import ClassifierTraining, load_classifier
from drifting_lightning.metrics.extractors import ClassifierExtractor
from drifting_lightning.metrics.frechet import FrechetDistance

NUM_CLASSES = 4


def make_images(labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """8x8 images in [-1, 1]: class k lights rows 2k and 2k+1, plus noise."""
    x = -1 + 0.3 * torch.rand(len(labels), 1, 8, 8, generator=generator)
    for i, k in enumerate(labels.tolist()):
        x[i, 0, 2 * k : 2 * k + 2] = 1.0
    return x


class StripesData(L.LightningDataModule):
    """The DataModule contract in miniature: class-grouped batches and real_samples(split=...)."""

    def __init__(self, steps: int = 30, per_class: int = 8) -> None:
        super().__init__()
        self.steps, self.per_class = steps, per_class

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        labels = torch.arange(NUM_CLASSES)
        shape = (NUM_CLASSES, self.per_class, 1, 8, 8)
        batches = [
            {"positives": make_images(labels.repeat_interleave(self.per_class), g).view(shape), "labels": labels}
            for _ in range(self.steps)
        ]
        return torch.utils.data.DataLoader(batches, batch_size=None)  # each item is already a batch

    def real_samples(self, split: str = "train"):
        labels = torch.arange(NUM_CLASSES).repeat(25)
        return make_images(labels, torch.Generator().manual_seed(1 if split == "test" else 2)), labels


def test_train_log_export_and_extract(tmp_path):
    export = tmp_path / "classifier.pt"
    module = ClassifierTraining(num_classes=NUM_CLASSES, width=8, feature_dim=16, lr=1e-2, export_path=str(export))
    trainer = L.Trainer(
        max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(module, datamodule=StripesData())
    acc = trainer.callback_metrics["test/accuracy"].item()
    assert acc > 0.9  # stripes are trivially separable; chance is 0.25

    net = load_classifier(export)
    x, y = StripesData().real_samples(split="test")
    assert (net(x).argmax(1) == y).float().mean().item() == pytest.approx(acc)
    assert torch.load(export, weights_only=True)["test_accuracy"] == pytest.approx(acc)
    trainer.save_checkpoint(tmp_path / "lightning.ckpt")  # the Lightning checkpoint loads the same network
    torch.testing.assert_close(load_classifier(tmp_path / "lightning.ckpt").features(x), net.features(x))

    # both files record the training images' shape, and the extractor refuses images of another
    assert net.image_shape == load_classifier(tmp_path / "lightning.ckpt").image_shape == (1, 8, 8)
    extractor = ClassifierExtractor(str(export))
    assert extractor.metric_name == "fd_classifier" and extractor.num_features == 16
    with pytest.raises(ValueError, match="trained on 8x8, 1 channel images, these are 16x16, 3 channels"):
        extractor(torch.zeros(2, 3, 16, 16))
    fd = FrechetDistance(extractor)
    fd.update(x[:50], real=True)
    fd.update(x[50:], real=False)
    assert 0 <= fd.compute().item() < float("inf")


class CrashAtSecondEpoch(L.Callback):
    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == 1:
            raise RuntimeError("simulated crash")


def _trainer(tmp_path, max_epochs: int, callbacks=()) -> L.Trainer:
    return L.Trainer(
        max_epochs=max_epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path, callbacks=list(callbacks),
    )  # fmt: skip


def test_a_crash_keeps_the_last_finished_epochs_classifier(tmp_path):
    export = tmp_path / "classifier.pt"
    module = ClassifierTraining(num_classes=NUM_CLASSES, width=8, feature_dim=16, lr=1e-2, export_path=str(export))
    trainer = _trainer(tmp_path, max_epochs=3, callbacks=[CrashAtSecondEpoch()])
    with pytest.raises(RuntimeError, match="simulated crash"):
        trainer.fit(module, datamodule=StripesData())
    saved = torch.load(export, weights_only=True)
    assert saved["test_accuracy"] == pytest.approx(module.test_accuracy) and module.test_accuracy > 0.9
    torch.testing.assert_close(saved["state_dict"], {k: v for k, v in module.net.state_dict().items()})


def test_a_resume_with_no_epoch_left_keeps_the_written_classifier(tmp_path):
    export = tmp_path / "classifier.pt"
    module = ClassifierTraining(num_classes=NUM_CLASSES, width=8, feature_dim=16, lr=1e-2, export_path=str(export))
    trainer = _trainer(tmp_path, max_epochs=1)
    trainer.fit(module, datamodule=StripesData())
    trainer.save_checkpoint(tmp_path / "done.ckpt")
    written = torch.load(export, weights_only=True)

    again = ClassifierTraining(num_classes=NUM_CLASSES, width=8, feature_dim=16, lr=1e-2, export_path=str(export))
    _trainer(tmp_path, max_epochs=1).fit(again, datamodule=StripesData(), ckpt_path=tmp_path / "done.ckpt")
    kept = torch.load(export, weights_only=True)
    assert kept["test_accuracy"] == pytest.approx(written["test_accuracy"]) and kept["test_accuracy"] is not None
