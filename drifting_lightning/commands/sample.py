"""``drifting sample``: class-balanced one-step samples of a trained generator as an ADM .npz (+ PNGs).

    drifting sample --ckpt runs/imagenet/version_0/checkpoints/last.ckpt --num 50000 --alpha 1.0 --out samples.npz
    drifting sample --ckpt runs/checkerboard/version_0 --num 5000 --out points.npz --plot points.png   # vectors

Vector models (toy and vector data) write their samples as float32 [N, D] in the same layout (arr_0, arr_1), in the
units the model was trained in: a ``VectorDataModule`` with ``standardize`` (its default) trains in standardised units,
which its ``unstandardize`` maps back to the file's (``drifting evaluate`` compares them with its real samples, also
standardised).

Single device: one process samples everything (one network evaluation per sample, so 50k ImageNet samples take
minutes on one GPU). For several GPUs, run one process per GPU with different --seed and merge the .npz files.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from drifting_lightning.commands import check_output_file, resolve_device, run_command
from drifting_lightning.metrics.npz import to_uint8, write_adm_npz, write_vector_npz
from drifting_lightning.sampling.labels import balanced_labels

# (n, labels [n] or None, torch.Generator) -> images [n, C, H, W] in [-1, 1], or vectors [n, D]
SampleFn = Callable[[int, Tensor | None, torch.Generator], Tensor]
PLOT_SUFFIXES = (".png", ".pdf", ".svg", ".jpg")


@torch.no_grad()
def draw_samples(
    sample_fn: SampleFn,
    num: int,
    num_classes: int,
    batch_size: int = 250,
    seed: int = 0,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray | None]:
    """``num`` samples in batches -> (samples, labels [num] or None): images [C, H, W] as uint8 [num, H, W, C],
    quantised with ``to_uint8`` (the DiT rule, as an ADM .npz holds them); vectors [D] (toy and vector data) as
    float32 [num, D].

    Noise comes from one ``torch.Generator(device)`` seeded with ``seed`` and consumed batch after batch, so the
    output is reproducible for a given seed, batch size and device.
    """
    from tqdm.auto import tqdm

    labels = balanced_labels(num, num_classes)
    noise = torch.Generator(device=device).manual_seed(seed)
    samples: np.ndarray | None = None
    with tqdm(total=num, unit="sample", desc="sampling", disable=not progress) as bar:
        for start in range(0, num, batch_size):
            n = min(batch_size, num - start)
            batch_labels = None if labels is None else labels[start : start + n].to(device)
            q = _as_stored(sample_fn(n, batch_labels, noise))
            if samples is None:
                samples = np.empty((num, *q.shape[1:]), dtype=q.dtype)  # preallocated: no 2x peak at the end
            samples[start : start + n] = q
            bar.update(n)
    return samples, None if labels is None else labels.numpy()


def _as_stored(x: Tensor) -> np.ndarray:
    """A batch of samples as the .npz stores them: images as uint8 [n, H, W, C], vectors as float32 [n, D]."""
    if sample_kind(x) == "vectors":
        return x.float().cpu().numpy()
    return to_uint8(x).cpu().numpy()


def sample_kind(x: Tensor) -> str:
    """"images" for [n, C, H, W] with C = 1 or 3, "vectors" for [n, D]; else a ValueError saying what can be
    sampled."""
    if x.dim() == 2:
        return "vectors"
    if x.dim() == 4 and x.shape[1] in (1, 3):
        return "images"
    raise ValueError(
        f"the generator makes samples of shape {list(x.shape[1:])}: neither images [C, H, W] with C = 1 or 3 nor "
        "vectors [D] (a latent model's samples need its decoder: sample from the run's checkpoint, or pass --vae "
        "for an export folder)"
    )


def sampler_from(
    path: str, config: str | None, alpha: float, device: torch.device, vae: str | None = None, allow_hub: bool = False
) -> tuple[SampleFn, int]:
    """(sample function, number of classes) of a ``drifting fit`` checkpoint (its module's EMA generator and
    ``decode_samples``) or of a ``drifting export`` directory (the generator alone; its latents decoded by ``vae``,
    a local diffusers folder or, with ``allow_hub``, a hub id, when given)."""
    from drifting_lightning.checkpoints.reading import existing_checkpoint, is_distributed_checkpoint
    from drifting_lightning.console import notice
    from drifting_lightning.export import CONFIG_FILE, load_generator

    if Path(path).is_dir() and not (Path(path) / CONFIG_FILE).exists() and not is_distributed_checkpoint(path):
        try:  # a run folder, as `drifting fit --ckpt_path` takes one: its newest last.ckpt
            path = str(existing_checkpoint(path))
            notice(f"--ckpt is a run folder: sampling from {path}")
        except FileNotFoundError:
            pass  # not a run folder either: load_generator says what an export folder holds
    if Path(path).is_dir() and not is_distributed_checkpoint(path):
        gen = load_generator(path, device)
        codec = None
        if vae is not None:
            from drifting_lightning.models.vae import shared_codec

            codec = shared_codec(vae, allow_hub, device=device)

        def from_export(n: int, labels: Tensor | None, noise: torch.Generator) -> Tensor:
            inputs = gen.draw_inputs(n, device=device, generator=noise)
            x = gen(**inputs, labels=labels, alpha=torch.full((n,), alpha, device=device))
            return x if codec is None else codec.decode(x.float()).clamp(-1.0, 1.0)

        return from_export, gen.num_classes

    from drifting_lightning.callbacks.sample_grid import generator_classes
    from drifting_lightning.checkpoints.loading import load_module

    module = load_module(path, config).to(device)

    def from_module(n: int, labels: Tensor | None, noise: torch.Generator) -> Tensor:
        return module.decode_samples(module.sample(n, labels=labels, alpha=alpha, use_ema=True, generator=noise))

    return from_module, generator_classes(module)


def write_pngs(images: np.ndarray, folder: str) -> None:
    """One PNG per sample, ``folder/000000.png`` ..., as DiT's sample_ddp.py writes them."""
    from PIL import Image

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(out / f"{i:06d}.png")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="drifting sample",
        description="Class-balanced one-step sampling (EMA weights) into an ADM-evaluator .npz: arr_0 uint8 "
        "[N, H, W, C], arr_1 labels; for vector models (toy data) arr_0 float32 [N, D], in the units the model was "
        "trained in (standardised for VectorDataModule by default). Single device; run several processes with "
        "different --seed for more GPUs.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--ckpt", required=True,
                        help="a `drifting fit` checkpoint (.ckpt file or sharded folder), a run folder "
                             "(runs/<name>/version_<k>: its newest last.ckpt) or an export directory")
    parser.add_argument("--config", help="the run's config.yaml (default: found beside the checkpoint)")
    parser.add_argument("--num", type=int, default=50000, help="number of samples (50000 for reported FID)")
    parser.add_argument("--alpha", type=float, default=1.0, help="guidance scale (1.0 = no guidance)")
    parser.add_argument("--out", required=True, help="output .npz path (written atomically; .npz added if missing)")
    parser.add_argument("--batch-size", type=int, default=250, help="samples per network evaluation")
    parser.add_argument("--vae", help="export folders of latent generators: the VAE that decodes their samples, a "
                        "local diffusers folder (or a hub id with --allow-hub), e.g. stabilityai/sd-vae-ft-mse")
    parser.add_argument("--allow-hub", action="store_true", help="let --vae name a Hugging Face hub id (downloads)")
    parser.add_argument("--png-dir", help="images: also write every sample as a PNG into this folder")
    parser.add_argument("--plot", help="vectors (toy data): also draw the samples' first two coordinates into this "
                        "picture file (.png, .pdf, .svg)")
    parser.add_argument("--seed", type=int, default=0, help="noise seed (same seed + batch size = same samples)")
    parser.add_argument("--device", default="auto", help="auto (cuda, else mps, else cpu), cpu, cuda, cuda:1, ...")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _run(args: argparse.Namespace) -> int:
    if args.num < 1 or args.batch_size < 1:
        raise ValueError(f"--num and --batch-size must be >= 1, got {args.num} and {args.batch_size}")
    if not math.isfinite(args.alpha) or args.alpha < 1.0:
        raise ValueError(f"--alpha must be a number >= 1 (1 = no guidance), got {args.alpha}")
    if not Path(args.ckpt).exists():
        raise FileNotFoundError(
            f"--ckpt {args.ckpt} does not exist (drifting fit writes runs/<name>/version_<k>/checkpoints/*.ckpt)"
        )
    if Path(args.out).suffix.lower() != ".npz":  # as numpy.savez names it; evaluate reads .npz files
        args.out = f"{args.out}.npz"
    check_output_file(args.out, "samples.npz")
    plot_folder = Path(args.plot).parent if args.plot else None
    for flag, folder in (("--png-dir", args.png_dir), ("--out", Path(args.out).parent), ("--plot", plot_folder)):
        if folder and Path(folder).exists() and not Path(folder).is_dir():
            raise NotADirectoryError(f"{flag}: {folder} is a file, not a folder")
    if args.plot and Path(args.plot).suffix.lower() not in PLOT_SUFFIXES:
        raise ValueError(f"--plot {args.plot}: name a picture file ({', '.join(PLOT_SUFFIXES)})")
    device = resolve_device(args.device)
    sample_fn, num_classes = sampler_from(args.ckpt, args.config, args.alpha, device, args.vae, args.allow_hub)
    # one sample first (its own noise): what the model makes decides which outputs apply, before the long part
    probe_labels = balanced_labels(1, num_classes)
    kind = sample_kind(sample_fn(1, None if probe_labels is None else probe_labels.to(device),
                                 torch.Generator(device=device).manual_seed(args.seed)))  # fmt: skip
    if kind == "vectors" and args.png_dir:
        raise ValueError(
            "--png-dir: this model makes vectors, not images; --plot FILE.png draws them as a scatter plot"
        )
    if kind == "images" and args.plot:
        raise ValueError("--plot: this model makes images; --png-dir DIR writes them as PNGs")
    samples, labels = draw_samples(
        sample_fn, args.num, num_classes, args.batch_size, args.seed, device, progress=not args.no_progress
    )
    if kind == "images":
        path = write_adm_npz(args.out, samples, labels)
        if args.png_dir:
            write_pngs(samples, args.png_dir)
    else:
        path = write_vector_npz(args.out, samples, labels)
        if args.plot:
            plot_vectors(samples, args.plot, title=f"{len(samples)} samples of {args.ckpt}")
    plotted = f"; the plot to {args.plot}" if kind == "vectors" and args.plot else ""
    shape = list(samples.shape[1:])
    print(f"wrote {len(samples)} samples {shape} (alpha {args.alpha}, {num_classes} classes) to {path}{plotted}")
    return 0


def plot_vectors(samples: np.ndarray, path: str, title: str = "") -> None:
    """The first two coordinates of vector samples [N, D] as a scatter plot (a PNG or another picture format)."""
    from drifting_lightning.callbacks.scatter import first_two_coords, scatter_figure
    from drifting_lightning.files import atomic_write

    fig = scatter_figure(first_two_coords(torch.from_numpy(samples)), None, title=title)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(Path(path)) as tmp, open(tmp, "wb") as f:
        fig.savefig(f, format=Path(path).suffix.lstrip(".").lower())


def main(argv: Sequence[str]) -> int:
    """``drifting sample --ckpt X --num N --alpha A --out samples.npz [...]``; returns the exit status."""
    return run_command(build_parser(), _run, argv)
