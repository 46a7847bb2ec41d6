"""Test settings and the fixtures that several test modules share: IDX files, image folders, a tiny VAE and an
Inception stand-in. Factories are fixtures that return a function, for tests that make several of a kind."""

from __future__ import annotations

import gzip
import os
import struct
import sys
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# Tests use small tensors: one thread avoids oversubscription when subprocesses run beside pytest.
torch.set_num_threads(1)

VAE_RES = 32  # the tiny VAE's images: 32x32 -> latents 4x16x16 (one 2x down-sampling)
FOLDER_CLASSES = ("ant", "bee", "cat")


def _write_idx(path: Path, array: np.ndarray) -> None:
    data = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data += array.astype(np.uint8).tobytes()
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


@pytest.fixture
def write_idx() -> Callable[[Path, np.ndarray], None]:
    """``write_idx(path, array)``: an MNIST-format IDX file of uint8 ``array`` (gzipped when path ends in .gz)."""
    return _write_idx


@pytest.fixture
def fashion_mnist_files() -> Callable[..., Path]:
    """``fashion_mnist_files(root, train=40, test=20)``: random 28x28 Fashion-MNIST-format IDX files (10 classes)
    in root -> root."""

    def make(root: Path, train: int = 40, test: int = 20) -> Path:
        rng = np.random.default_rng(0)
        for prefix, n in (("train", train), ("t10k", test)):
            _write_idx(root / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8))
            _write_idx(root / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10)
        return root

    return make


def _make_tiny_vae(path: Path, seed: int = 0) -> Path:
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=VAE_RES,
    )
    vae.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def make_tiny_vae() -> Callable[..., Path]:
    """``make_tiny_vae(path, seed=0)``: a 44k-parameter AutoencoderKL (2x down-sampling, 4 latent channels) saved
    with save_pretrained -> path."""
    return _make_tiny_vae


def _make_image_folder(root: Path, per_class: int = 4, corrupt: bool = True) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for name in FOLDER_CLASSES:
        (root / name).mkdir(parents=True)
        for j in range(per_class):
            size = (VAE_RES + 5 * j, VAE_RES + 9)
            Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(root / name / f"{j}.png")
    if corrupt:
        (root / "bee" / "bad.png").write_bytes(b"not a png")
    return root


@pytest.fixture(scope="session")
def make_image_folder() -> Callable[..., Path]:
    """``make_image_folder(root, per_class=4, corrupt=True)``: random RGB images of assorted sizes in
    root/{ant,bee,cat}/, plus one corrupt file in bee/ (12 + 1 files) -> root."""
    return _make_image_folder


@pytest.fixture(scope="session")
def random_inception_weights(tmp_path_factory) -> Path:
    """An Inception stand-in: torch-fidelity's InceptionV3 built without loading weights, its random state_dict saved
    under the published file name (its hash differs, so extractors name their distance fd_inception)."""
    import torch_fidelity.feature_extractor_inceptionv3 as tf_inception

    from drifting_lightning.metrics.extractors import INCEPTION_FILENAME

    with (
        mock.patch.object(tf_inception, "load_state_dict_from_url", lambda *a, **k: None),
        mock.patch.object(tf_inception.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None),
    ):
        torch.manual_seed(0)
        net = tf_inception.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    path = tmp_path_factory.mktemp("inception") / INCEPTION_FILENAME
    torch.save(net.state_dict(), path)
    return path


# A DiT small enough for CPU tests of the callbacks and commands.
TINY_DIT = dict(hidden_size=32, depth=1, num_heads=2, num_style_tokens=4, style_codebook_size=8, num_context_tokens=2)


@pytest.fixture
def tiny_digits_module() -> Callable[..., object]:
    """``tiny_digits_module(num_classes=None)``: a DriftingModule with a tiny digits DiT (seed 0, EMA decay 0, so the
    EMA generator is the trained one)."""
    from drifting_lightning.models.dit import DiT
    from drifting_lightning.module import DriftingModule

    def make(num_classes: int | None = None) -> DriftingModule:
        torch.manual_seed(0)
        generator = DiT("digits", num_classes=num_classes, **TINY_DIT)
        return DriftingModule(generator, generated_per_group=4, lr=1e-2, ema_decay=0.0)

    return make


@pytest.fixture
def digits_data() -> Callable[[], object]:
    """``digits_data()``: DigitsDataModule with 10 class groups of 4 positives, 10 steps per epoch."""
    from drifting_lightning.data.images import DigitsDataModule
    from drifting_lightning.sampling.positives import ClassAwareSampler

    def make() -> DigitsDataModule:
        return DigitsDataModule(
            positives=ClassAwareSampler(classes_per_step=10, positives_per_class=4), steps_per_epoch=10
        )

    return make


@pytest.fixture(scope="session")
def latent_assets(tmp_path_factory, make_tiny_vae, make_image_folder) -> dict[str, Path]:
    """{"vae", "other_vae" (other weights), "images" (make_image_folder), "cache" (the images encoded by "vae" at
    32x32, shards of 5)}: shared, so tests must not modify them (copy first)."""
    from drifting_lightning.data.latents import encode_latents

    base = tmp_path_factory.mktemp("latents")
    paths = {
        "vae": make_tiny_vae(base / "vae"),
        "other_vae": make_tiny_vae(base / "other_vae", seed=1),
        "images": make_image_folder(base / "images"),
    }
    paths["cache"] = base / "cache"
    encode_latents(
        paths["images"], str(paths["vae"]), paths["cache"], resolution=VAE_RES, batch_size=3, shard_size=5,
        device="cpu", progress=False,
    )  # fmt: skip
    return paths


@pytest.fixture
def files_of() -> Callable[[Path], dict[str, bytes]]:
    """``files_of(folder)``: {file name: bytes} of a folder's files, to compare two folders byte for byte."""
    return lambda folder: {p.name: p.read_bytes() for p in sorted(folder.iterdir())}
