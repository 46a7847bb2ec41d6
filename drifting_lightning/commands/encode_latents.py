"""``drifting encode-latents``: an image folder (or ImageNet root) -> SD-VAE latent shards for LatentDataModule.

    drifting encode-latents --data data/imagenet/train --vae vae/sd-vae-ft-mse --out data/imagenet_latents
    torchrun --nproc_per_node 8 -m drifting_lightning encode-latents ...   # one process per GPU

Under torchrun, RANK / WORLD_SIZE / LOCAL_RANK pick the shards and the GPU of each process. The encoding itself
is ``drifting_lightning.data.latents.encode_latents``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from drifting_lightning.commands import run_command


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="drifting encode-latents",
        description="Encode an image folder (or ImageNet root) into SD-VAE latent shards for LatentDataModule. "
        "Resumable: run the same command again after a crash. Multi-GPU: torchrun --nproc_per_node N -m "
        "drifting_lightning encode-latents ...",
    )
    parser.add_argument("--data", required=True, help="ImageFolder root (root/<class>/<image>) or ImageNet root")
    parser.add_argument("--vae", required=True, help="diffusers AutoencoderKL folder (or hub id with --allow-hub)")
    parser.add_argument("--out", required=True, help="cache folder (shards + manifest.json)")
    parser.add_argument("--resolution", type=int, default=256, help="ADM centre-crop size (default 256)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per VAE call (x2 with the flips)")
    parser.add_argument("--shard-size", type=int, default=10_000, help="images per shard (default 10000)")
    parser.add_argument("--mean-only", action="store_true", help="store posterior means only, no samples")
    parser.add_argument("--dtype", choices=("float16", "float32"), default="float16", help="storage dtype")
    parser.add_argument("--vae-dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    parser.add_argument("--num-workers", type=int, default=min(8, os.cpu_count() or 1), help="image reading workers")
    parser.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK if CUDA is available, else cpu")
    parser.add_argument("--seed", type=int, default=0, help="seed of the posterior samples")
    parser.add_argument("--allow-hub", action="store_true", help="allow --vae to be a Hugging Face hub id")
    parser.add_argument("--rank", type=int, default=int(os.environ.get("RANK", 0)))
    parser.add_argument("--world-size", type=int, default=int(os.environ.get("WORLD_SIZE", 1)))
    parser.add_argument("--no-progress", action="store_true")
    return parser


def _run(args: argparse.Namespace) -> int:
    import torch

    from drifting_lightning.data.latents import encode_latents

    device = args.device
    if device is None and torch.cuda.is_available():
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0)) % torch.cuda.device_count()}"
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        manifest = encode_latents(
            args.data,
            args.vae,
            args.out,
            resolution=args.resolution,
            batch_size=args.batch_size,
            shard_size=args.shard_size,
            sample_posterior=not args.mean_only,
            num_workers=args.num_workers,
            rank=args.rank,
            world_size=args.world_size,
            device=device,
            dtype=args.dtype,
            vae_dtype=args.vae_dtype,
            seed=args.seed,
            allow_hub=args.allow_hub,
            progress=not args.no_progress,
        )
    except KeyboardInterrupt:  # more than the policy's "interrupted": what was kept and how to go on
        print(f"interrupted: the complete shards in {args.out} are kept; run the same command again to encode the "
              "rest", file=sys.stderr)  # fmt: skip
        return 130
    if manifest is None:
        print(f"rank {args.rank}: its shards are done; the last rank to finish writes {args.out}/manifest.json")
    else:
        print(
            f"{args.out}: {manifest['count']} latents {manifest['latent_shape']} of {len(manifest['class_names'])} "
            f"classes in {len(manifest['shards'])} shard(s); {manifest['skipped']} unreadable image(s) skipped"
        )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``drifting encode-latents --data X --vae V --out DIR``; returns the exit status."""
    return run_command(build_parser(), _run, sys.argv[1:] if argv is None else argv)
