"""Latent-encoding throughput, to plan ImageNet's encode time (``drifting encode-latents``).

    python benchmarks/encode_latents.py                 # tiny VAE and SD-VAE architecture, 256x256, CPU
    python benchmarks/encode_latents.py --device cuda   # the same on a GPU (add --vae-dtype bfloat16 to compare)
    python benchmarks/encode_latents.py --threads 1     # on a shared CPU, one thread can beat two
    python benchmarks/encode_latents.py --quick         # smoke test: tiny VAE, 64x64, a few images

Two VAEs with random weights (throughput does not depend on the weights), both with SD's 8x down-sampling
(4x32x32 latents at 256x256): a tiny one (the test VAE's widths 8-16 on SD's four levels, 0.1M parameters) and the
SD-VAE architecture (stabilityai/sd-vae-ft-mse: 83.7M parameters). The tests' own VAE down-samples only 2x; at
256x256 its mid-block self-attention would run over 128x128 = 16k tokens, a cost no real VAE has.
For each, two rates in images per second, where every image is encoded twice (itself and its horizontal flip, as
the cache stores both):
- "VAE only": the posterior of a ready [B, 3, H, W] batch (median of several timed batches after a warm-up);
- "end to end": ``encode_latents`` on a folder of synthetic 500x375 JPEGs (ImageNet's typical size): JPEG decoding,
  ADM centre crop, VAE, posterior sample and the shard writes.
The last column extrapolates the end-to-end rate to ImageNet's 1,281,167 training images.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from drifting_lightning.data.latents import encode_latents  # noqa: E402
from drifting_lightning.models.vae import SD_VAE_CONFIG, VAECodec, as_dtype  # noqa: E402

IMAGENET_TRAIN = 1_281_167
# SD-VAE's four levels (8x down-sampling) at test widths: the cost shape of the real VAE, tiny.
TINY_CONFIG = {**SD_VAE_CONFIG, "block_out_channels": [8, 16, 16, 16], "layers_per_block": 1, "norm_num_groups": 8}


def save_vae(config: dict, folder: Path) -> int:
    """A random-weight AutoencoderKL of ``config`` saved to ``folder``; returns its parameter count."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(**config)
    vae.save_pretrained(folder)
    return sum(p.numel() for p in vae.parameters())


def write_jpegs(folder: Path, n: int, classes: int = 4) -> None:
    """n synthetic 500x375 JPEGs (smooth noise, so they compress like photos) in ``classes`` class folders."""
    rng = np.random.default_rng(0)
    for i in range(n):
        sub = folder / f"class{i % classes}"
        sub.mkdir(parents=True, exist_ok=True)
        small = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
        Image.fromarray(small).resize((500, 375), Image.Resampling.BICUBIC).save(sub / f"{i}.jpg", quality=90)


def vae_only(codec: VAECodec, batch: int, resolution: int, device: torch.device, repeats: int) -> float:
    """Images/s of the posterior of [batch] images and their flips (one VAE call on 2 x batch)."""
    x = torch.rand(2 * batch, 3, resolution, resolution, device=device) * 2 - 1
    times = []
    with torch.no_grad():
        for i in range(repeats + 1):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            codec.posterior(x)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i:  # the first call warms up (allocations, kernel selection)
                times.append(time.perf_counter() - start)
    return batch / statistics.median(times)


def end_to_end(folder: Path, vae: Path, out: Path, args: argparse.Namespace, batch: int, shard: int) -> float:
    """Images/s of a whole ``encode_latents`` run over ``folder`` (warm: the VAE was loaded once before)."""
    start = time.perf_counter()
    manifest = encode_latents(folder, str(vae), out, resolution=args.resolution, batch_size=batch,
                              shard_size=shard, num_workers=args.num_workers, device=args.device,
                              vae_dtype=args.vae_dtype, progress=False)  # fmt: skip
    return manifest["count"] / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> list[dict]:
    """Prints the table; returns its rows as dicts (for tests and scripts)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--images", type=int, default=None, help="JPEGs of the end-to-end run (default per VAE)")
    parser.add_argument("--num-workers", type=int, default=0, help="image-reading workers of the end-to-end run")
    parser.add_argument("--vae-dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--quick", action="store_true", help="tiny VAE only, 64x64, 8 images")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.resolution, args.images = 64, args.images or 8
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    # (name, config, batch, images for the end-to-end run, timed VAE batches)
    cases = [("tiny VAE", TINY_CONFIG, 16, 32, 3)]
    if not args.quick:
        cases.append(("SD-VAE architecture", SD_VAE_CONFIG, 64 if on_gpu else 2, 512 if on_gpu else 6, 3))
    print(f"# encode-latents throughput, {args.resolution}x{args.resolution}, device {device}"
          f"{f' ({torch.cuda.get_device_name(device)})' if on_gpu else ''}, VAE dtype {args.vae_dtype}")  # fmt: skip
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch threads "
          f"{torch.get_num_threads()}, torch {torch.__version__}, image workers {args.num_workers}\n")  # fmt: skip
    print("| VAE | parameters | batch | VAE only img/s | end to end img/s | ImageNet train (1.28M) |")
    print("|---|---:|---:|---:|---:|---:|")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name, config, batch, images, repeats in cases:
            images = args.images or images
            batch = min(batch, images)
            params = save_vae({**config, "sample_size": args.resolution}, work / name)
            codec = VAECodec(str(work / name), dtype=as_dtype(args.vae_dtype)).to(device)
            fast = vae_only(codec, batch, args.resolution, device, repeats)
            folder = work / f"{name}-images"
            if not folder.exists():
                write_jpegs(folder, images)
            rate = end_to_end(folder, work / name, work / f"{name}-cache", args, batch, max(1, images // 2))
            hours = IMAGENET_TRAIN / rate / 3600
            print(f"| {name} | {params / 1e6:.2f}M | {batch} | {fast:#.3g} | {rate:#.3g} | {hours:,.0f} h |")
            rows.append({"vae": name, "parameters": params, "batch": batch, "vae_images_per_s": fast,
                         "end_to_end_images_per_s": rate, "imagenet_hours": hours})  # fmt: skip
    return rows


if __name__ == "__main__":
    main()
