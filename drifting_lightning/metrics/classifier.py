"""A small CNN classifier for small images and its training module: the feature space of ``fd_classifier``.

The Frechet distance in the penultimate features of a classifier trained on the dataset is the usual metric for
28x28 data (Inception features of upsampled MNIST digits say little). It is logged as ``fd_classifier``, never
as FID. Train it once per dataset (``configs/classifier/fashion_mnist.yaml``); the exported file is what
``ClassifierExtractor`` loads.
"""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

from drifting_lightning.checkpoints.reading import read_weights
from drifting_lightning.files import atomic_write

CHECKPOINT_FORMAT = "drifting-classifier/1"
ARCH_KEYS = ("in_channels", "num_classes", "width", "feature_dim")  # the SmallCNN arguments a checkpoint stores


class SmallCNN(nn.Module):
    """Two conv stages (conv-conv-pool) and an adaptive 4x4 pool: works for 8x8, 28x28 and 32x32 inputs alike.

    x: [B, C, H, W] -> logits [B, num_classes]; ``features(x)`` -> penultimate activations [B, feature_dim].
    No batch norm, so features do not depend on the batch they are computed in.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 32, feature_dim: int = 128) -> None:
        super().__init__()
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, w, 3, padding=1), nn.SiLU(),
            nn.Conv2d(w, w, 3, padding=1), nn.SiLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.SiLU(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.SiLU(),
            nn.MaxPool2d(2, ceil_mode=True),
            nn.AdaptiveAvgPool2d(4), nn.Flatten(),  # a coarse 4x4 layout survives, unlike a global pool
            nn.Linear(2 * w * 16, feature_dim), nn.SiLU(),
        )  # fmt: skip
        self.head = nn.Linear(feature_dim, num_classes)
        self.in_channels = in_channels
        self.feature_dim = feature_dim
        # [C, H, W] of the images it was trained on, when its file records them (any size runs; only that one means
        # something)
        self.image_shape: tuple[int, ...] | None = None

    def features(self, x: Tensor) -> Tensor:
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


def save_classifier(
    path: str | os.PathLike, net: SmallCNN, hparams: dict, test_accuracy: float | None,
    image_shape: tuple[int, ...] | None = None,
) -> Path:
    """Write the classifier file that ``load_classifier`` reads (temporary file + rename, never half-written).
    ``image_shape``: the [C, H, W] of its training images (default: ``net.image_shape``), checked at use."""
    path = Path(path)
    state = {k: v.detach().cpu() for k, v in net.state_dict().items()}  # loadable on a machine without a GPU
    payload = {"format": CHECKPOINT_FORMAT, "hparams": hparams, "state_dict": state}
    payload["test_accuracy"] = test_accuracy
    image_shape = image_shape or net.image_shape
    if image_shape is not None:
        payload["image_shape"] = [int(v) for v in image_shape]
    with atomic_write(path) as tmp:
        torch.save(payload, tmp)
    return path


def load_classifier(path: str | os.PathLike) -> SmallCNN:
    """A SmallCNN from a file of ``save_classifier`` or a Lightning checkpoint of ``ClassifierTraining``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"classifier checkpoint {path} not found; train one with "
            "`drifting fit --config configs/classifier/fashion_mnist.yaml` (it writes classifier.pt)"
        )
    ckpt = read_weights(path, "classifier checkpoint")
    if ckpt.get("format") == CHECKPOINT_FORMAT:
        hparams, state = ckpt["hparams"], ckpt["state_dict"]
    elif "hyper_parameters" in ckpt and "state_dict" in ckpt:
        hparams = ckpt["hyper_parameters"]
        state = {k.removeprefix("net."): v for k, v in ckpt["state_dict"].items() if k.startswith("net.")}
    else:
        raise ValueError(f"{path} is neither a classifier file of save_classifier nor a ClassifierTraining checkpoint")
    net = SmallCNN(**{k: hparams[k] for k in ARCH_KEYS})
    net.load_state_dict(state)
    if ckpt.get("image_shape") is not None:  # files written before it was recorded have none
        net.image_shape = tuple(int(v) for v in ckpt["image_shape"])
    return net.eval().requires_grad_(False)


def flatten_batch(batch: dict) -> tuple[Tensor, Tensor]:
    """The class-grouped batch (positives [Nc, Npos, ...], labels [Nc]) -> (x [Nc*Npos, ...], y [Nc*Npos])."""
    pos, labels = batch["positives"], batch["labels"]
    return pos.flatten(0, 1), labels.repeat_interleave(pos.shape[1])


class ClassifierTraining(L.LightningModule):
    """Trains a SmallCNN with cross-entropy on the standard class-grouped batch dict.

    After every training epoch it logs ``test/accuracy`` on ``datamodule.real_samples(split="test")``
    (``(samples [N, C, H, W], labels [N])``, the whole test split) and rank 0 writes the classifier to
    ``export_path`` (default ``<log_dir>/classifier.pt``) for ``ClassifierExtractor``: a crash or a stop keeps the
    last finished epoch's network. A fit that trains no epoch (a resume past max_epochs) writes it at the end only
    when no file is there yet.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        width: int = 32,
        feature_dim: int = 128,
        lr: float = 2e-3,
        weight_decay: float = 1e-4,
        export_path: str | None = None,
        eval_batch_size: int = 1000,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = SmallCNN(in_channels, num_classes, width, feature_dim)
        self.test_accuracy: float | None = None
        self._test_set: tuple[Tensor, Tensor] | None = None  # loaded once, at the first epoch end
        self._exported = False

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        x, y = flatten_batch(batch)
        self.net.image_shape = tuple(x.shape[1:])
        logits = self.net(x)
        loss = F.cross_entropy(logits, y)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/accuracy", (logits.argmax(1) == y).float().mean())
        return loss

    @torch.no_grad()
    def evaluate(self, x: Tensor, y: Tensor) -> float:
        """Accuracy of the classifier on samples x: [N, ...] with labels y: [N]."""
        was_training = self.net.training
        self.net.eval()
        correct = 0
        for xb, yb in zip(x.split(self.hparams.eval_batch_size), y.split(self.hparams.eval_batch_size)):
            correct += (self.net(xb.to(self.device)).argmax(1).cpu() == yb.cpu()).sum().item()
        self.net.train(was_training)
        return correct / max(len(y), 1)

    def on_train_epoch_end(self) -> None:
        test_set = self._load_test_set()
        if test_set is not None:
            self.test_accuracy = self.evaluate(*test_set)
            self.log("test/accuracy", self.test_accuracy)
        self._export()

    def _load_test_set(self) -> tuple[Tensor, Tensor] | None:
        if self._test_set is None:
            dm = getattr(self.trainer, "datamodule", None)
            if dm is None or not hasattr(dm, "real_samples"):
                rank_zero_warn("the datamodule has no real_samples(split='test'): test accuracy is not logged")
                return None
            x, y = dm.real_samples(split="test")
            if y is None:
                raise ValueError(f"{type(dm).__name__}.real_samples(split='test') gave no labels: it is unconditional")
            self._test_set = (x, y)
        return self._test_set

    def on_train_end(self) -> None:
        if not self._exported and not os.path.exists(self.export_file):
            self._export()
        if self._exported:
            acc = "not measured" if self.test_accuracy is None else f"{self.test_accuracy:.4f}"
            rank_zero_info(f"classifier written to {self.export_file} (test accuracy {acc})")

    @property
    def export_file(self) -> str:
        return self.hparams.export_path or os.path.join(self.trainer.log_dir or ".", "classifier.pt")

    def _export(self) -> None:
        if self.trainer.is_global_zero:
            save_classifier(self.export_file, self.net, {k: self.hparams[k] for k in ARCH_KEYS}, self.test_accuracy)
        self._exported = True

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["image_shape"] = None if self.net.image_shape is None else list(self.net.image_shape)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if checkpoint.get("image_shape") is not None:
            self.net.image_shape = tuple(checkpoint["image_shape"])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.net.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
