"""The latent cache on disk: what identifies it, safetensors shards written atomically, the manifest, and
``LatentSource``, which reads the shards by memory map.

A cache directory holds ``shard-00000.safetensors``, ... and, once every shard is complete, ``manifest.json``.
Shard k covers files ``[k * shard_size, (k + 1) * shard_size)`` of the sorted image listing (unreadable files
skipped) and holds, for its n readable images,
    "mean"   [n, 2, C, h, w]  scaled posterior mean of (image, its horizontal flip)
    "sample" [n, 2, C, h, w]  scaled posterior sample of the same (absent when encoded without sampling)
    "labels" [n] int64, "index" [n] int64 (position in the image listing)
and string metadata: the encoding ``config`` (JSON; see ``encode_config``), its range and the files it skipped.
A shard file exists only when complete (written under a temporary name, fsynced, renamed), so a crash never leaves
a truncated file that looks complete; ``shard_metadata`` also checks the size promised by the header, against
damage after the fact. The manifest (``finish_manifest``) records the VAE (id, sha256, scale factor), resolution,
latent shape, class names, counts per class, skipped files and per-shard counts and sizes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import struct
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from drifting_lightning.data.image_sources import FolderSource, ImageSource
from drifting_lightning.files import atomic_write
from drifting_lightning.models.vae import resolve_vae_dir, vae_fingerprint

log = logging.getLogger(__name__)

FORMAT = "drifting-latents/1"
MANIFEST = "manifest.json"
ARRAYS = ("mean", "sample")  # the latent arrays a shard may hold
_ST_DTYPES = {"F16": np.float16, "BF16": None, "F32": np.float32, "F64": np.float64, "I64": np.int64, "I32": np.int32}
_ST_CODES = {"float16": "F16", "float32": "F32", "float64": "F64", "int64": "I64", "int32": "I32"}


def shard_name(k: int) -> str:
    return f"shard-{k:05d}.safetensors"


def write_safetensors(arrays: dict[str, np.ndarray], path: Path, metadata: dict[str, str]) -> None:
    """A safetensors file with a canonical header (keys sorted, tensors in name order), so equal contents give
    equal bytes: the safetensors library orders header keys differently from run to run, and writes a strided
    numpy array's memory as it lies (scrambled)."""
    header: dict[str, Any] = {"__metadata__": dict(metadata)}
    offset = 0
    for name in sorted(arrays):
        arr = arrays[name]
        code = _ST_CODES.get(arr.dtype.name)
        if code is None:
            raise ValueError(f"array {name!r}: dtype {arr.dtype} is not one of {sorted(_ST_CODES)}")
        header[name] = {"dtype": code, "shape": list(arr.shape), "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
    raw = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format pads the header to a multiple of 8 bytes with spaces
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name in sorted(arrays):
            f.write(np.ascontiguousarray(arrays[name], arrays[name].dtype.newbyteorder("<")).data)


def write_shard(path: Path, arrays: dict[str, np.ndarray], metadata: dict[str, str]) -> None:
    """Write a safetensors file atomically: temporary name, fsync, rename over ``path``."""
    with atomic_write(path) as tmp:
        write_safetensors(arrays, tmp, metadata)


def remove_stale_temporaries(path: Path, max_age_s: float = 3600.0) -> None:
    """Delete leftovers of interrupted writes of ``path``: those of dead processes on this host, and any older than
    ``max_age_s`` (a shard takes seconds to write). A live writer's file stays, e.g. another node's encoding the
    same shard on a shared filesystem."""
    host = socket.gethostname()
    for tmp in path.parent.glob(f".{path.name}.tmp-*"):
        writer_host, _, pid = tmp.name.rpartition("-")
        dead = writer_host.endswith(f".tmp-{host}") and pid.isdigit() and not _alive(int(pid))
        try:
            if dead or time.time() - tmp.stat().st_mtime > max_age_s:
                tmp.unlink(missing_ok=True)
        except FileNotFoundError:
            pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_header(path: Path) -> tuple[dict[str, Any], int]:
    """(safetensors header, byte offset of the data section). Raises ValueError on a malformed file."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path}: shorter than a safetensors header")
        n = struct.unpack("<Q", head)[0]
        raw = f.read(n)
    if len(raw) < n:
        raise ValueError(f"{path}: truncated safetensors header")
    try:
        return json.loads(raw), 8 + n
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: malformed safetensors header ({err})") from err


def shard_metadata(path: Path) -> dict[str, Any] | None:
    """The metadata of a complete shard (``config`` parsed), or None when the file is damaged (size differs from
    what its header promises, or unreadable)."""
    try:
        header, start = read_header(path)
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        if path.stat().st_size != start + end:
            return None
        meta = dict(header.get("__metadata__", {}))
        if meta.get("format") != FORMAT:
            return None
        meta["config"] = json.loads(meta["config"])
        meta["skipped"] = json.loads(meta.get("skipped", "[]"))
        return meta
    except (OSError, ValueError, KeyError):
        return None


def open_array(path: Path, name: str) -> np.ndarray:
    """One tensor of a safetensors file as a read-only memory map (nothing is read until indexed)."""
    header, start = read_header(path)
    if name not in header:
        raise KeyError(f"{path} has no array {name!r} (it holds {sorted(k for k in header if k != '__metadata__')})")
    entry = header[name]
    dtype = _ST_DTYPES.get(entry["dtype"])
    if dtype is None:
        raise ValueError(f"{path}: array {name!r} has dtype {entry['dtype']}, which numpy cannot map")
    shape = tuple(entry["shape"])
    if 0 in shape:
        return np.empty(shape, dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=start + entry["data_offsets"][0], shape=shape)


def write_manifest(root: Path, manifest: dict[str, Any]) -> None:
    """``root/manifest.json`` atomically, keys sorted, so equal manifests are equal bytes."""
    with atomic_write(root / MANIFEST) as tmp, open(tmp, "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
        f.write("\n")


def read_manifest(root: str | Path) -> dict[str, Any]:
    """The manifest of a complete cache; a FileNotFoundError saying how to make one when it is missing."""
    path = Path(root) / MANIFEST
    if not path.is_file():
        partial = sorted(Path(root).glob("shard-*.safetensors")) if Path(root).is_dir() else []
        state = f"{len(partial)} shard(s) but no {MANIFEST} (an unfinished encode)" if partial else "no latent cache"
        raise FileNotFoundError(
            f"{root}: {state}. Encode (or resume) it with `drifting encode-latents --data <image folder> --vae "
            f"<VAE folder> --out {root}`, or give the LatentDataModule `data` and `vae` so that prepare_data does."
        )
    with open(path) as f:
        manifest = json.load(f)
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}; re-encode the cache")
    return manifest


def config_difference(found: dict[str, Any], expected: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """{key: (found, expected)} for every key whose value differs (missing keys included)."""
    return {
        k: (found.get(k), expected.get(k))
        for k in sorted(set(found) | set(expected))
        if found.get(k) != expected.get(k)
    }


def describe_difference(diff: dict[str, tuple[Any, Any]]) -> str:
    def short(v: Any) -> str:
        text = json.dumps(v)
        return text if len(text) <= 80 else text[:77] + "..."

    return "; ".join(f"{k}: cache has {short(a)}, requested {short(b)}" for k, (a, b) in diff.items())


def image_root(data: str | Path) -> Path:
    """An ImageFolder root, or an ImageNet root whose ``train/`` holds the class folders (then ``train/``)."""
    root = Path(data)
    train = root / "train"
    if train.is_dir() and any(e.is_dir() for e in os.scandir(train)):
        log.info("%s has a train/ folder of class folders: encoding %s", root, train)
        return train
    return root


def listing_digest(source: FolderSource) -> str:
    """sha256 of the sorted relative paths and labels: identifies the image listing a cache was made from."""
    digest = hashlib.sha256(b"\0".join(source.files.tolist()))
    digest.update(source.labels.tobytes())
    return digest.hexdigest()


def encode_config(
    source: FolderSource,
    vae: str,
    allow_hub: bool,
    sample_posterior: bool,
    shard_size: int,
    dtype: str,
    vae_dtype: str,
    seed: int,
) -> dict[str, Any]:
    """What a cache's shards must agree on: a resume with another value would mix two encodings."""
    with open(resolve_vae_dir(vae, allow_hub) / "config.json") as f:
        vae_config = json.load(f)
    factor = 2 ** (len(vae_config["block_out_channels"]) - 1)
    if source.resolution % factor:
        raise ValueError(f"resolution {source.resolution} is not a multiple of the VAE's down-sampling {factor}")
    side = source.resolution // factor
    return {
        "format": FORMAT,
        "vae_sha256": vae_fingerprint(vae, allow_hub),
        "scale_factor": float(vae_config.get("scaling_factor", 0.18215)),
        "resolution": source.resolution,
        "latent_shape": [int(vae_config.get("latent_channels", 4)), side, side],
        "sample_posterior": bool(sample_posterior),
        "dtype": dtype,
        "vae_dtype": vae_dtype,
        "seed": int(seed),
        "shard_size": int(shard_size),
        "num_files": len(source),
        "files_sha256": listing_digest(source),
        "class_names": list(source.class_names),
    }


def write_encoded_shard(
    out: Path,
    k: int,
    span: tuple[int, int],
    parts: dict[str, list[Any]],
    source: FolderSource,
    config: dict[str, Any],
    store: type,
) -> None:
    """Write shard k from the encoder's accumulated ``parts`` (index / mean / sample chunks, skipped paths)."""
    index = np.concatenate(parts["index"]) if parts["index"] else np.zeros(0, np.int64)
    empty = np.zeros((0, 2, *config["latent_shape"]), store)
    arrays = {"index": index, "labels": source.labels[index].astype(np.int64)}
    arrays["mean"] = np.concatenate(parts["mean"]) if parts["mean"] else empty
    if config["sample_posterior"]:
        arrays["sample"] = np.concatenate(parts["sample"]) if parts["sample"] else empty
    metadata = {
        "format": FORMAT,
        "config": json.dumps(config, sort_keys=True),
        "shard": str(k),
        "start": str(span[0]),
        "stop": str(span[1]),
        "skipped": json.dumps(parts["skipped"]),
    }
    write_shard(out / shard_name(k), arrays, metadata)


def finish_manifest(out: Path, source: FolderSource, vae: str, config: dict[str, Any], num_shards: int) -> dict | None:
    """Write the manifest when every shard is complete (whichever rank gets here last); else None."""
    entries, skipped, per_class = [], [], np.zeros(len(source.class_names), np.int64)
    for k in range(num_shards):
        path = out / shard_name(k)
        meta = shard_metadata(path) if path.exists() else None
        if meta is None or meta["config"] != config:
            log.info("%s not complete yet: the rank that encodes it writes the manifest", path)
            return None
        labels = np.asarray(open_array(path, "labels"))
        per_class += np.bincount(labels, minlength=len(per_class))
        skipped += meta["skipped"]
        entries.append(
            {
                "file": path.name,
                "count": len(labels),
                "start": int(meta["start"]),
                "stop": int(meta["stop"]),
                "bytes": path.stat().st_size,
            }
        )
    manifest = {
        "format": FORMAT,
        "config": config,
        "vae": {"id": str(vae), "sha256": config["vae_sha256"], "scale_factor": config["scale_factor"]},
        "resolution": config["resolution"],
        "latent_shape": config["latent_shape"],
        "scale_factor": config["scale_factor"],
        "arrays": ["mean", "sample"] if config["sample_posterior"] else ["mean"],
        "class_names": config["class_names"],
        "data_root": os.fsdecode(source.root),
        "count": int(per_class.sum()),
        "count_per_class": per_class.tolist(),
        "skipped": len(skipped),
        "skipped_files": skipped,
        "shards": entries,
    }
    write_manifest(out, manifest)
    log.info(
        "%s: %d latents of %d classes, %d unreadable image(s) skipped",
        out,
        manifest["count"],
        len(per_class),
        len(skipped),
    )
    return manifest


class LatentSource(ImageSource):
    """The latents of a complete cache as an ``ImageSource``: ``load(idx, rng)`` -> float32 [*idx.shape, C, h, w],
    the image's latent or (with ``rng`` and ``random_flip``, probability 1/2 per item) its flip's.

    Shards are memory-mapped lazily in each process (DataLoader workers included): nothing but the labels is held
    in memory, and pickling sends no array data.
    """

    def __init__(self, root: str | Path, use_mean: bool = False, random_flip: bool = True) -> None:
        self.root = Path(root)
        self.manifest = read_manifest(self.root)
        self.array = "mean" if use_mean else "sample"
        if self.array not in self.manifest["arrays"]:
            raise ValueError(
                f"{self.root} holds posterior means only (encoded without sampling): set use_mean: true "
                "or re-encode with posterior samples"
            )
        self.random_flip = random_flip
        self.paths = [self.root / s["file"] for s in self.manifest["shards"]]
        for path, entry in zip(self.paths, self.manifest["shards"]):
            if not path.is_file() or path.stat().st_size != entry["bytes"]:
                raise ValueError(
                    f"{path} is missing or has another size than {self.root / MANIFEST} records: "
                    f"the cache is damaged; delete {self.root} and encode it again"
                )
        self.offsets = np.cumsum([0] + [s["count"] for s in self.manifest["shards"]])
        self.labels = np.concatenate([np.asarray(open_array(p, "labels")) for p in self.paths] or [[]])
        self.labels = self.labels.astype(np.int64)
        self.class_names = list(self.manifest["class_names"])
        self.sample_shape = tuple(self.manifest["latent_shape"])
        self._arrays: list[np.ndarray] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_arrays": None}  # memory maps reopen in the receiving process

    def arrays(self) -> list[np.ndarray]:
        """Per shard, the memory-mapped [n, 2, C, h, w] latents."""
        if self._arrays is None:
            self._arrays = [open_array(p, self.array) for p in self.paths]
        return self._arrays

    def load(self, idx: np.ndarray, rng: np.random.Generator | None = None, threads: int = 1) -> Tensor:
        idx = np.asarray(idx, dtype=np.int64)
        flat = idx.reshape(-1)
        if flat.size and (flat.min() < 0 or flat.max() >= len(self)):
            raise IndexError(f"latent index out of range [0, {len(self)})")
        flips = (rng.random(flat.size) < 0.5) if rng is not None and self.random_flip else np.zeros(flat.size, bool)
        shard = np.searchsorted(self.offsets, flat, side="right") - 1
        out = np.empty((flat.size, *self.sample_shape), np.float32)
        arrays = self.arrays()
        for s in np.unique(shard):
            rows = shard == s
            out[rows] = arrays[s][flat[rows] - self.offsets[s], flips[rows].astype(np.int64)]
        return torch.from_numpy(out).reshape(*idx.shape, *self.sample_shape)
