"""The SD-VAE (diffusers ``AutoencoderKL``): loading without surprises and a frozen latent codec (PAPER.md 7).

The paper's latent models generate 32x32x4 SD-VAE latents of 256x256 images, scaled by 0.18215. ``load_vae`` reads a
local diffusers folder (always) or a Hugging Face hub id (only when the caller passes ``allow_hub=True``: this module
never touches the network otherwise); ``VAECodec`` wraps the frozen VAE with its scale factor:
``posterior(images in [-1, 1]) -> scaled (mean, std)`` and ``decode(scaled latents) -> images``; ``LatentDecoder`` is
the optional decoder of a latent ``DriftingModule``.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from drifting_lightning.files import file_sha256

if TYPE_CHECKING:  # diffusers takes seconds to import: only the functions that need it import it
    from diffusers import AutoencoderKL

log = logging.getLogger(__name__)

# The authors decode with sd-vae-ft-mse (PAPER.md 11). Its encoder is the original kl-f8 one, as in ft-ema (its model
# card: only the decoders were fine-tuned), so the latents are the same whichever of the two encodes.
SD_VAE_ID = "stabilityai/sd-vae-ft-mse"
SD_VAE_NAMES = ("sd-vae-ft-mse", "sd-vae-ft-ema")
SD_SCALE_FACTOR = 0.18215
# The architecture of stabilityai/sd-vae-ft-mse (83.7M parameters, 8x down-sampling), for random-weight benchmarks.
SD_VAE_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 256,
    "scaling_factor": SD_SCALE_FACTOR,
}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_WEIGHT_PATTERNS = ("diffusion_pytorch_model*.safetensors", "diffusion_pytorch_model*.bin")
_fingerprints: dict[tuple[str, int, int], str] = {}  # (file, size, mtime_ns) -> sha256: hash each file once
_codecs: dict[tuple[str, bool, str, str, float | None], VAECodec] = {}


def as_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """A dtype name ("float32", "float16", "bfloat16") or a torch.dtype -> torch.dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    return DTYPES[dtype]


def download_hint(path_or_id: str) -> str:
    """What to run so that ``path_or_id`` resolves: as a local folder and (if it has that shape) as a hub id."""
    parts = path_or_id.strip("/").split("/")
    # a folder named after one of the two SD-VAE fine-tunes (vae/sd-vae-ft-ema) gets that one, any other the paper's
    source = f"stabilityai/{parts[-1]}" if parts[-1] in SD_VAE_NAMES else SD_VAE_ID
    what = "that SD-VAE" if source != SD_VAE_ID else "the paper's SD-VAE"
    hint = (
        f"To use {path_or_id!r} as a local folder, download {what} there once: "
        f"`hf download {source} --local-dir {path_or_id}` (older huggingface_hub: `huggingface-cli download "
        f"{source} --local-dir {path_or_id}`); any folder written by AutoencoderKL.save_pretrained works."
    )
    if len(parts) in (2, 3) and not path_or_id.startswith((".", "/", "~")):
        hint += (
            f" To read it as a Hugging Face hub id instead, allow the hub explicitly (allow_hub=True; CLI: "
            f"--allow-hub; config: allow_hub: true), or download it with `hf download {'/'.join(parts[:2])} "
            f"--local-dir vae/{parts[1]}` and pass that folder."
        )
    return hint


def _local_vae_dir(path: Path) -> Path:
    if (path / "config.json").is_file():
        return path
    if (path / "vae" / "config.json").is_file():  # a whole diffusers pipeline folder
        return path / "vae"
    raise FileNotFoundError(
        f"VAE folder {path} has no config.json (nor vae/config.json): it is not a diffusers AutoencoderKL folder. "
        + download_hint(str(path))
    )


def resolve_vae_dir(path_or_id: str, allow_hub: bool = False) -> Path:
    """The local folder holding the VAE's config.json and weights.

    A local folder (or a diffusers pipeline folder with a ``vae/`` sub-folder) is used as is. Otherwise, with
    ``allow_hub``, ``path_or_id`` is a hub id ("org/name" or "org/name/subfolder") fetched into the Hugging Face
    cache (config and weights only; honours HF_HUB_OFFLINE). Without ``allow_hub`` a missing folder raises a
    FileNotFoundError that says what to download and where.
    """
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        return _local_vae_dir(path)
    if path.exists():
        raise FileNotFoundError(f"VAE {path_or_id!r} is a file; pass the folder holding config.json and the weights")
    if not allow_hub:
        raise FileNotFoundError(
            f"VAE {path_or_id!r}: no such local folder ({path.resolve()}). " + download_hint(path_or_id)
        )
    from huggingface_hub import snapshot_download

    parts = path_or_id.strip("/").split("/")
    repo, sub = "/".join(parts[:2]), "/".join(parts[2:])
    prefix = f"{sub}/" if sub else ""
    try:
        # Weights as safetensors when the repository has them, else .bin: never both (SD-VAE ships both, 2 x 335 MB).
        for pattern in _WEIGHT_PATTERNS:
            snap = Path(snapshot_download(repo, allow_patterns=[f"{prefix}config.json", prefix + pattern]))
            folder = snap / sub if sub else snap
            if any(folder.glob(pattern)):
                return _local_vae_dir(folder)
    except (OSError, ValueError) as err:  # offline mode, no network, unknown repository, ...
        raise FileNotFoundError(
            f"could not fetch the VAE {path_or_id!r} from the Hugging Face hub ({type(err).__name__}: {err}). "
            f"On a machine with network run `hf download {repo} --local-dir vae/{parts[-1]}` and pass that folder "
            "instead of the hub id."
        ) from err
    raise FileNotFoundError(f"hub repository {repo!r} has no diffusers VAE weights under {prefix or 'its root'}")


def weight_files(folder: Path) -> list[Path]:
    """The weight files diffusers loads from ``folder``: the safetensors ones if present, else the .bin ones."""
    for pattern in _WEIGHT_PATTERNS:
        found = sorted(folder.glob(pattern))
        if found:
            return found
    raise FileNotFoundError(
        f"VAE folder {folder} has no weights (diffusion_pytorch_model.safetensors or .bin). "
        + download_hint(str(folder))
    )


def _file_sha256(path: Path) -> str:
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _fingerprints:
        _fingerprints[key] = file_sha256(path)
    return _fingerprints[key]


def vae_fingerprint(path_or_id: str, allow_hub: bool = False) -> str:
    """sha256 over the VAE's config.json and weight files: the identity of a latent cache's VAE, independent of
    where the folder lives (a moved folder keeps its fingerprint, other weights do not)."""
    folder = resolve_vae_dir(path_or_id, allow_hub)
    digest = hashlib.sha256()
    for file in [folder / "config.json", *weight_files(folder)]:
        digest.update(f"{file.name}:{_file_sha256(file)}\n".encode())
    return digest.hexdigest()


def load_vae(path_or_id: str, allow_hub: bool = False, dtype: str | torch.dtype = torch.float32) -> AutoencoderKL:
    """A frozen diffusers ``AutoencoderKL`` in eval mode with weights in ``dtype``, from a local folder or (only with
    ``allow_hub``) a hub id; see ``resolve_vae_dir`` for the lookup and the errors."""
    from diffusers import AutoencoderKL

    folder = resolve_vae_dir(path_or_id, allow_hub)
    vae = AutoencoderKL.from_pretrained(
        folder, torch_dtype=as_dtype(dtype), local_files_only=True, low_cpu_mem_usage=False
    )
    return vae.requires_grad_(False).eval()


class VAECodec(nn.Module):
    """A frozen VAE and its latent scale: images [B, 3, H, W] in [-1, 1] <-> scaled latents [B, C, H/f, W/f].

    ``vae``: an AutoencoderKL (moved to ``dtype`` in place) or a path / hub id for ``load_vae``. ``scale_factor``
    defaults to the VAE config's ``scaling_factor`` (0.18215 for the SD-VAE). ``keep_encoder=False`` drops the
    encoder half (a decode-only codec holds about 60% of the weights). The weights never train and the module stays
    in eval mode, but gradients flow through ``decode`` to the latents. Inputs are cast to the VAE's dtype and
    outputs back to the input's dtype.
    """

    def __init__(
        self,
        vae: AutoencoderKL | str,
        scale_factor: float | None = None,
        allow_hub: bool = False,
        dtype: str | torch.dtype = torch.float32,
        keep_encoder: bool = True,
    ) -> None:
        super().__init__()
        vae = load_vae(vae, allow_hub=allow_hub, dtype=dtype) if isinstance(vae, str) else vae.to(as_dtype(dtype))
        if not keep_encoder:
            vae.encoder, vae.quant_conv = None, None
        self.vae = vae.requires_grad_(False).eval()
        self.scale_factor = float(vae.config.scaling_factor if scale_factor is None else scale_factor)
        self.latent_channels = int(vae.config.latent_channels)
        self.downsample = 2 ** (len(vae.config.block_out_channels) - 1)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    def train(self, mode: bool = True) -> VAECodec:
        return super().train(False)  # frozen: a parent's .train() must not switch the VAE to training mode

    def posterior(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x: [B, 3, H, W] in [-1, 1] -> (mean, std) of the scaled posterior, each [B, C, H/f, W/f] float32."""
        if self.vae.encoder is None:
            raise RuntimeError("this VAECodec was built with keep_encoder=False and cannot encode")
        dist = self.vae.encode(x.to(self.dtype)).latent_dist
        return dist.mean.float() * self.scale_factor, dist.std.float() * self.scale_factor

    def encode(self, x: Tensor, sample_posterior: bool = True, generator: torch.Generator | None = None) -> Tensor:
        """x: [B, 3, H, W] in [-1, 1] -> scaled latents [B, C, H/f, W/f] float32: a posterior sample (noise from
        ``generator``) or the posterior mean (the latent MAE encodes its augmented crops on the fly)."""
        mean, std = self.posterior(x)
        if not sample_posterior:
            return mean
        device = mean.device if generator is None else generator.device
        return mean + std * torch.randn(mean.shape, generator=generator, device=device).to(mean.device)

    def decode(self, z: Tensor) -> Tensor:
        """z: scaled latents [B, C, h, w] -> images [B, 3, h*f, w*f] in about [-1, 1], in z's dtype. Not clamped,
        so gradients reach every latent (clamp for display)."""
        return self.vae.decode(z.to(self.dtype) / self.scale_factor).sample.to(z.dtype)

    def forward(self, z: Tensor) -> Tensor:
        return self.decode(z)


def shared_codec(
    path_or_id: str,
    allow_hub: bool = False,
    dtype: str | torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    scale_factor: float | None = None,
) -> VAECodec:
    """One decode-only codec per (VAE, dtype, device, scale) in this process, for sample grids, FID and other
    no-grad consumers: the VAE is loaded once however many callbacks ask. Not for training modules (those own their
    codec as a submodule, e.g. ``VAEBridge``)."""
    key = (str(path_or_id), allow_hub, str(as_dtype(dtype)), str(torch.device(device)), scale_factor)
    if key not in _codecs:
        codec = VAECodec(path_or_id, scale_factor, allow_hub, dtype, keep_encoder=False)
        _codecs[key] = codec.to(device)
    return _codecs[key]


class LatentDecoder:
    """The decoder of a latent run (``DriftingModule(vae=...)``): latents [B, C, h, w] -> images [B, 3, h*f, w*f]
    in [-1, 1], for sample grids, Frechet metrics and ``drifting sample``. Not a submodule: the VAE is loaded on
    first use, once per process and device (``shared_codec``), and stays out of the module's state_dict, so
    checkpoints stay small."""

    def __init__(self, vae: str, allow_hub: bool = False, dtype: str = "float32") -> None:
        self.vae, self.allow_hub, self.dtype = vae, allow_hub, dtype

    @torch.no_grad()
    def __call__(self, z: Tensor) -> Tensor:
        return shared_codec(self.vae, self.allow_hub, self.dtype, z.device).decode(z.float()).clamp(-1.0, 1.0)
