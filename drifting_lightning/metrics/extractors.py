"""Feature extractors for the Frechet distance, by name: samples [B, C, H, W] in [-1, 1] -> features [B, F].

Each has ``num_features`` (F) and ``metric_name``, the name its Frechet distance is logged under. Only the
Inception network with the standard 2015-12-05 weights gives ``fid``; everything else has its own name.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import Tensor, nn
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, FeatureExtractorInceptionV3

from drifting_lightning.encoders.base import FeatureEncoder
from drifting_lightning.files import file_sha256
from drifting_lightning.metrics.classifier import load_classifier
from drifting_lightning.metrics.npz import to_uint8

INCEPTION_FILENAME = URL_INCEPTION_V3.rsplit("/", 1)[-1]  # weights-inception-2015-12-05-6726825d.pth
INCEPTION_SHA256_PREFIX = re.search(r"-([0-9a-f]{8})\.pth$", INCEPTION_FILENAME).group(1)
INCEPTION_ENV = "DRIFTING_INCEPTION_WEIGHTS"


def default_inception_path() -> Path:
    """Where torch keeps hub downloads: ``$TORCH_HOME/hub/checkpoints/<filename>`` (~/.cache/torch by default)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILENAME


def resolve_inception_weights(weights: str | os.PathLike | None = None) -> Path:
    """The Inception weights file: ``weights``, else ``$DRIFTING_INCEPTION_WEIGHTS``, else the torch cache.

    Never downloads. A path given explicitly (argument or environment) must exist; otherwise a
    FileNotFoundError says which file is missing and where to put it.
    """
    how = (
        f"FID needs torch-fidelity's InceptionV3 weights {INCEPTION_FILENAME} (TF Inception 2015-12-05). "
        f"Download it once from {URL_INCEPTION_V3} and either put it at {default_inception_path()} "
        f"(TORCH_HOME decides that folder), set {INCEPTION_ENV}=/path/to/{INCEPTION_FILENAME}, or pass its path "
        "as the `weights` argument (--weights on the command line)."
    )
    for source, value in (("the `weights` argument", weights), (f"${INCEPTION_ENV}", os.environ.get(INCEPTION_ENV))):
        if value:
            if not Path(value).is_file():
                raise FileNotFoundError(f"Inception weights file {value} (from {source}) does not exist. {how}")
            return Path(value)
    path = default_inception_path()
    if not path.is_file():
        raise FileNotFoundError(f"Inception weights not found at {path} and {INCEPTION_ENV} is not set. {how}")
    return path


def is_standard_inception(path: str | os.PathLike) -> bool:
    """Whether the file's sha256 starts with the hash in torch-fidelity's file name (the published weights)."""
    return file_sha256(path).startswith(INCEPTION_SHA256_PREFIX)


class InceptionExtractor(nn.Module):
    """torch-fidelity's InceptionV3 exactly as the FID protocol uses it: pool features [B, 2048].

    Input x: [B, C, H, W] in [-1, 1], C = 1 (repeated to RGB) or 3. It is quantised to uint8 with the DiT rule
    (``to_uint8``), then torch-fidelity resizes to 299x299 with TF1-compatible bilinear interpolation, without
    antialiasing (torchmetrics' ``antialias=False``). Weights whose hash differs from the published file are
    accepted with a warning, and their distance is named ``fd_inception``, not ``fid``.
    """

    num_features = 2048

    def __init__(self, weights: str | None = None) -> None:
        super().__init__()
        self.weights_path = resolve_inception_weights(weights)
        self.standard_weights = is_standard_inception(self.weights_path)
        if not self.standard_weights:
            warnings.warn(
                f"{self.weights_path} is not the published {INCEPTION_FILENAME} (sha256 does not start with "
                f"{INCEPTION_SHA256_PREFIX}); its distance is logged as fd_inception and is not comparable to FID",
                stacklevel=2,
            )
        self.metric_name = "fid" if self.standard_weights else "fd_inception"
        self.net = FeatureExtractorInceptionV3(
            "inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=str(self.weights_path)
        )

    def train(self, mode: bool = True) -> InceptionExtractor:
        return super().train(False)

    @staticmethod
    def network_input(x: Tensor) -> Tensor:
        """x: [B, C, H, W] in [-1, 1] -> uint8 [B, 3, H, W], what torch-fidelity's Inception expects."""
        if x.dim() != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"Inception takes images [B, 1 or 3, H, W] in [-1, 1], got shape {list(x.shape)}")
        q = to_uint8(x, channels_last=False)
        return q.expand(-1, 3, -1, -1) if q.shape[1] == 1 else q

    @torch.no_grad()
    def features_and_logits(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x: [B, C, H, W] in [-1, 1] -> (pool features [B, 2048], unbiased logits [B, 1008]) in one pass."""
        return self.net(self.network_input(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.features_and_logits(x)[0]


CHOOSE_FEATURE = "choose one with FrechetCallback's feature_key (or `drifting evaluate --feature-key`)"


def _some(names: Iterable[str], shown: int = 8) -> str:
    names = sorted(names)
    return ", ".join(names[:shown]) + (f", ... ({len(names)} in all)" if len(names) > shown else "")


class EncoderExtractor(nn.Module):
    """One feature set of a FeatureEncoder, averaged over locations: [B, L, C] -> [B, C]. Named ``fd_encoder``."""

    metric_name = "fd_encoder"

    def __init__(self, encoder: FeatureEncoder, key: str | None = None) -> None:
        super().__init__()
        self.encoder = encoder
        self.key = key
        self.num_features: int | None = None  # known after the first call

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        feats = self.encoder(x)
        key = self.key
        if key is None:
            if len(feats) != 1:
                raise ValueError(f"the encoder returns {len(feats)} feature sets ({_some(feats)}) and fd_encoder "
                                 f"needs one: {CHOOSE_FEATURE}")  # fmt: skip
            (key,) = feats
        elif key not in feats:
            raise KeyError(f"the encoder has no feature set {key!r}; it returns {_some(feats)}: {CHOOSE_FEATURE}")
        out = feats[key].mean(dim=1)
        self.num_features = out.shape[1]
        return out


class ClassifierExtractor(nn.Module):
    """Penultimate features of a classifier trained on the dataset (``metrics/classifier.py``): ``fd_classifier``.

    x: [B, C, H, W] in the data's own range (the range the classifier was trained on) -> [B, feature_dim].
    """

    metric_name = "fd_classifier"

    def __init__(self, checkpoint: str) -> None:
        super().__init__()
        self.net = load_classifier(checkpoint)
        self.num_features = self.net.feature_dim
        self.checkpoint = checkpoint

    def train(self, mode: bool = True) -> ClassifierExtractor:
        return super().train(False)

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        trained_on = self.net.image_shape
        if trained_on is not None and tuple(x.shape[1:]) != trained_on:
            raise ValueError(
                f"the classifier {self.checkpoint} was trained on {_shape_words(trained_on)} images, these are "
                f"{_shape_words(tuple(x.shape[1:]))}: its features would mean nothing. Use a classifier trained on "
                "this data (`drifting fit --config configs/classifier/fashion_mnist.yaml` with its data section "
                "changed) or another metric"
            )
        return self.net.features(x)


def _shape_words(shape: tuple[int, ...]) -> str:
    """[C, H, W] as "28x28, 1 channel"."""
    c, *size = shape
    return f"{'x'.join(map(str, size))}, {c} channel{'s' if c != 1 else ''}"

