"""SD-VAE latents of an image folder: encode once into shards (``drifting encode-latents``), stream them after.

The paper's latent models train on 32x32x4 latents of ADM-centre-cropped 256x256 ImageNet images (PAPER.md 7).
``encode_latents`` writes, for every readable image, the scaled posterior mean and a posterior sample of the image
and of its horizontal flip (format: ``latent_shards``); ``LatentDataModule`` streams them memory-mapped with the
class-aware positive sources of the image DataModules, choosing image or flip at random per draw.

    drifting encode-latents --data data/imagenet/train --vae vae/sd-vae-ft-mse --out data/imagenet_latents
    torchrun --nproc_per_node 8 -m drifting_lightning encode-latents ...   # one process per GPU
    drifting fit --config configs/imagenet.yaml
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from drifting_lightning.data import latent_shards as shards
from drifting_lightning.data.image_sources import FolderSource, ImageSource
from drifting_lightning.data.images import DEFAULT_POSITIVES, ImageDataModule
from drifting_lightning.models.vae import VAECodec, vae_fingerprint
from drifting_lightning.sampling.positives import PositiveSource

log = logging.getLogger(__name__)


class _Reader(Dataset):
    """Item i -> (i, uint8 [H, W, 3] centre crop of file i, or None when unreadable)."""

    def __init__(self, source: FolderSource) -> None:
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> tuple[int, np.ndarray | None]:
        return i, self.source.read(i)


def _collate(items: list[tuple[int, np.ndarray | None]]) -> tuple[np.ndarray, np.ndarray, Tensor]:
    """-> (file indices [k], readable mask [k], uint8 [k_ok, H, W, 3] of the readable ones)."""
    idx = np.array([i for i, _ in items], dtype=np.int64)
    ok = np.array([a is not None for _, a in items])
    good = [a for _, a in items if a is not None]
    return idx, ok, torch.from_numpy(np.stack(good)) if good else torch.zeros((0, 0, 0, 3), dtype=torch.uint8)


def _posterior_noise(seed: int, index: np.ndarray, shape: Sequence[int]) -> Tensor:
    """eps [k, 2, *shape] float32, each image's from its own generator (seed, file index): the latents depend
    neither on batch size nor on which files failed to read, so a resumed encode writes the same bytes."""
    return torch.from_numpy(
        np.stack([np.random.default_rng([seed, int(i)]).standard_normal((2, *shape), dtype=np.float32) for i in index])
    )


@torch.no_grad()
def _encode_batch(codec: VAECodec, images: Tensor, device: torch.device) -> tuple[Tensor, Tensor]:
    """uint8 [k, H, W, 3] -> scaled posterior (mean, std), each [k, 2, C, h, w] float32 on CPU (index 1: flip)."""
    x = images.to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
    mean, std = codec.posterior(torch.cat([x, x.flip(-1)]))  # one VAE call for both views
    k = len(images)
    return tuple(t.reshape(2, k, *t.shape[1:]).transpose(0, 1).contiguous().cpu() for t in (mean, std))


def encode_latents(
    data_root: str | Path,
    vae: str,
    out_dir: str | Path,
    resolution: int = 256,
    batch_size: int = 32,
    shard_size: int = 10_000,
    sample_posterior: bool = True,
    num_workers: int = 0,
    rank: int = 0,
    world_size: int = 1,
    device: str | torch.device | None = None,
    dtype: str = "float16",
    vae_dtype: str = "float32",
    seed: int = 0,
    allow_hub: bool = False,
    progress: bool = True,
) -> dict[str, Any] | None:
    """Encode every readable image of ``data_root`` (ImageFolder layout, or an ImageNet root with ``train/``) with
    the VAE ``vae`` (folder, or hub id with ``allow_hub``) into shards under ``out_dir``; see ``latent_shards``.

    Images get the ADM centre crop to ``resolution``; both the image and its flip are encoded. Latents are stored
    in ``dtype`` (float16 halves the disk: ImageNet's 1.28M x 2 x 4x32x32 latents take 21 GB per array). Shard k
    is encoded by rank ``k % world_size`` on ``device`` (default: CUDA if available); shards already complete are
    skipped, so a crashed run restarts at its first missing shard. The process that completes the last shard
    writes ``manifest.json`` and gets it back; the others get None. An existing cache made with another VAE,
    resolution or setting is refused (ValueError) rather than mixed.
    """
    if batch_size < 1 or shard_size < 1 or not 0 <= rank < world_size:
        raise ValueError(
            f"need batch_size, shard_size >= 1 and 0 <= rank < world_size, got "
            f"{batch_size}, {shard_size}, {rank}, {world_size}"
        )
    if dtype not in ("float16", "float32"):
        raise ValueError(f"dtype must be 'float16' or 'float32', got {dtype!r}")
    out = Path(out_dir)
    source = FolderSource(shards.image_root(data_root), resolution, random_flip=False)
    config = shards.encode_config(source, vae, allow_hub, sample_posterior, shard_size, dtype, vae_dtype, seed)
    fix = f"use another --out folder, or delete {out} to re-encode"
    if (out / shards.MANIFEST).is_file():
        manifest = shards.read_manifest(out)
        diff = shards.config_difference(manifest["config"], config)
        if diff:
            raise ValueError(
                f"{out / shards.MANIFEST} was encoded differently: {shards.describe_difference(diff)}. "
                f"Point at the cache's own VAE/resolution, {fix}."
            )
        log.info("%s: latent cache already complete (%d latents)", out, manifest["count"])
        return manifest
    out.mkdir(parents=True, exist_ok=True)

    num_shards = -(-len(source) // shard_size)
    pending = []
    for k in range(rank, num_shards, world_size):
        path = out / shards.shard_name(k)
        if path.exists():
            meta = shards.shard_metadata(path)
            if meta is None:
                log.warning("%s is damaged (size differs from its header): encoding it again", path)
                path.unlink()
            elif meta["config"] != config:
                diff = shards.describe_difference(shards.config_difference(meta["config"], config))
                raise ValueError(f"{path} belongs to another encoding: {diff}. Resume with the same settings, {fix}.")
            else:
                continue
        shards.remove_stale_temporaries(path)
        pending.append(k)
    if pending:
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        codec = VAECodec(vae, config["scale_factor"], allow_hub, vae_dtype).to(device)
        _encode_shards(source, codec, out, pending, config, batch_size, num_workers, device, progress)
    return shards.finish_manifest(out, source, vae, config, num_shards)


def _encode_shards(
    source: FolderSource,
    codec: VAECodec,
    out: Path,
    pending: list[int],
    config: dict[str, Any],
    batch_size: int,
    num_workers: int,
    device: torch.device,
    progress: bool,
) -> None:
    """Encode the shards ``pending`` in order with one DataLoader (workers read ahead across shard boundaries)."""
    from tqdm.auto import tqdm

    size, n = config["shard_size"], len(source)
    ranges = {k: (k * size, min((k + 1) * size, n)) for k in pending}
    batches = [
        list(range(s, min(s + batch_size, stop)))
        for start, stop in ranges.values()
        for s in range(start, stop, batch_size)
    ]
    loader = DataLoader(
        _Reader(source),
        batch_sampler=batches,
        collate_fn=_collate,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
    )
    store = np.float16 if config["dtype"] == "float16" else np.float32
    parts: dict[str, list[Any]] = {"index": [], "mean": [], "sample": [], "skipped": []}
    bar = tqdm(total=sum(b - a for a, b in ranges.values()), unit="img", desc="encode-latents", disable=not progress)
    for idx, ok, images in loader:
        parts["skipped"] += [os.fsdecode(source.files[i]) for i in idx[~ok]]
        if len(images):
            mean, std = _encode_batch(codec, images, device)
            parts["index"].append(idx[ok])
            parts["mean"].append(mean.numpy().astype(store))
            if config["sample_posterior"]:
                eps = _posterior_noise(config["seed"], idx[ok], config["latent_shape"])
                parts["sample"].append((mean + std * eps).numpy().astype(store))
        bar.update(len(idx))
        k = int(idx[0]) // size  # batches never span two shards
        if idx[-1] + 1 == ranges[k][1]:  # the shard's last batch: write it, start the next one
            shards.write_encoded_shard(out, k, ranges[k], parts, source, config, store)
            parts = {key: [] for key in parts}
    bar.close()


class LatentDataModule(ImageDataModule):
    """Class-grouped batches of VAE latents, memory-mapped from the cache at ``root`` (PAPER.md 6, 7).

    The batch contract of ``ImageDataModule``, with ``positives`` / ``unconditional`` of shape [Nc, N, C, h, w]
    (4x32x32 for ImageNet).

    ``use_mean``: train on the posterior means instead of the stored posterior samples. ``random_flip``: draw
    the latent of the image or of its flip with probability 1/2 each. When ``root`` holds no complete cache,
    ``prepare_data`` (once per node) encodes the image folder ``data`` with the VAE ``vae`` at ``resolution``
    (``encode_*`` arguments as in ``encode_latents``; device: the trainer's); a cache made with another VAE or
    resolution is refused (``resolution: null`` accepts any). For multi-GPU encoding of ImageNet, run
    ``drifting encode-latents`` under torchrun first. ``val_root``: a second cache (e.g. of ImageNet val), the
    held-out split of ``real_samples``. ``vae_path`` names the VAE for decoding (sample grids, FID, pixel encoders).
    """

    def __init__(
        self,
        root: str,
        positives: PositiveSource = DEFAULT_POSITIVES,
        steps_per_epoch: int = 1000,
        num_workers: int = 0,
        use_mean: bool = False,
        data: str | None = None,
        vae: str | None = None,
        resolution: int | None = 256,
        random_flip: bool = True,
        val_root: str | None = None,
        allow_hub: bool = False,
        encode_batch_size: int = 32,
        encode_shard_size: int = 10_000,
        encode_dtype: str = "float16",
        encode_vae_dtype: str = "float32",
    ) -> None:
        super().__init__(positives, steps_per_epoch, num_workers)
        self.root, self.use_mean, self.data, self.vae, self.resolution = root, use_mean, data, vae, resolution
        self.random_flip, self.val_root, self.allow_hub = random_flip, val_root, allow_hub
        self.encode_args = {
            "batch_size": encode_batch_size,
            "shard_size": encode_shard_size,
            "dtype": encode_dtype,
            "vae_dtype": encode_vae_dtype,
        }

    @property
    def manifest(self) -> dict[str, Any]:
        return self.source("train").manifest

    @property
    def vae_path(self) -> str | None:
        """The VAE to decode these latents with: ``vae`` if given, else the one recorded in the manifest."""
        if self.vae is not None:
            return self.vae
        if (Path(self.root) / shards.MANIFEST).is_file():
            return self.manifest["vae"]["id"]
        return None

    @property
    def scale_factor(self) -> float:
        return float(self.manifest["scale_factor"])

    def prepare_data(self) -> None:
        """Encode the cache if it is missing (or resume an unfinished one); check an existing one's VAE."""
        root = Path(self.root)
        if (root / shards.MANIFEST).is_file():
            self._check_cache(check_vae=True)
            return
        if self.data is None or self.vae is None:
            shards.read_manifest(root)  # raises the error that says how to make the cache
        if not Path(self.data).is_dir():
            raise FileNotFoundError(
                f"data.root {root} holds no latent cache ({shards.MANIFEST}) and data.data {self.data} is no image "
                "folder to encode one from: point data.root at a cache made by `drifting encode-latents`, or "
                "data.data at an ImageFolder (root/<class>/<image>)"
            )
        trainer = self.trainer
        device = trainer.strategy.root_device if trainer is not None else None
        log.info("%s: no complete latent cache, encoding %s with %s", root, self.data, self.vae)
        encode_latents(
            self.data,
            self.vae,
            root,
            resolution=self.resolution or 256,
            num_workers=self.num_workers,
            device=device,
            allow_hub=self.allow_hub,
            **self.encode_args,
        )
        if device is not None and device.type == "cuda":
            torch.cuda.empty_cache()  # hand the VAE's cached blocks back before training allocates

    def setup(self, stage: str | None = None) -> None:
        self._check_cache(check_vae=False)
        super().setup(stage)

    def _check_cache(self, check_vae: bool) -> None:
        manifest = shards.read_manifest(self.root)
        where = Path(self.root) / shards.MANIFEST
        if self.resolution is not None and manifest["resolution"] != self.resolution:
            raise ValueError(
                f"{where} holds latents of {manifest['resolution']}px images, data.resolution is "
                f"{self.resolution}: set resolution: {manifest['resolution']} (or null), or point root at "
                f"a cache encoded at {self.resolution}px"
            )
        if not check_vae or self.vae is None:
            return
        try:
            found = vae_fingerprint(self.vae, self.allow_hub)
        except FileNotFoundError as err:  # training on latents needs no VAE; decoding will say what is missing
            log.warning("cannot check the VAE of %s: %s", where, err)
            return
        if found != manifest["vae"]["sha256"]:
            raise ValueError(
                f"{where} was encoded with VAE {manifest['vae']['id']!r} (sha256 "
                f"{manifest['vae']['sha256'][:12]}...), but data.vae {self.vae!r} has other weights "
                f"(sha256 {found[:12]}...): use the cache's VAE, or another root to encode anew"
            )

    def make_source(self, split: str) -> ImageSource:
        if split == "train":
            return shards.LatentSource(self.root, self.use_mean, self.random_flip)
        if self.val_root is None:
            raise ValueError(
                f"{type(self).__name__}: split {split!r} needs val_root (a latent cache of held-out images)"
            )
        source = shards.LatentSource(self.val_root, self.use_mean, random_flip=False)
        if source.class_names != self.source("train").class_names:
            raise ValueError(f"class names of val_root {self.val_root} differ from those of root {self.root}")
        return source

