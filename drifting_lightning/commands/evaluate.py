"""``drifting evaluate``: Frechet distance (+ Inception Score, precision/recall) of an ADM .npz of samples; the
energy distance of vector samples (toy and vector data).

    drifting evaluate samples.npz --ref VIRTUAL_imagenet256_labeled.npz --metric fid
    drifting evaluate samples.npz --data-config configs/fashion_mnist.yaml --metric fd_classifier \
        --checkpoint runs/classifier/fashion_mnist/classifier.pt --out metrics.json
    drifting evaluate points.npz --data-config configs/toy/checkerboard.yaml   # vectors: energy_distance

Real and generated images take the same path: uint8 (the DiT rule, ``to_uint8``) -> [-1, 1] -> feature extractor.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from drifting_lightning.commands import check_output_file, resolve_device, run_command
from drifting_lightning.files import atomic_write
from drifting_lightning.metrics.frechet import FeatureMoments
from drifting_lightning.metrics.npz import from_uint8, open_npz, to_uint8

IS_SPLITS = 10
VECTOR_METRICS = ("energy_distance", "energy")  # the metric of vector samples, and its short name


def read_images(path: str, what: str) -> np.ndarray:
    """``arr_0`` of an ADM-style .npz: uint8 [N, H, W, C]."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{what} file {path} does not exist (`drifting sample` writes one)")
    with open_npz(path, f"{what} file") as f:
        if "arr_0" not in f.files:
            raise KeyError(f"{path} has no 'arr_0' images (it has {sorted(f.files)}); expected an ADM-style .npz")
        return f["arr_0"]


def batches(
    images: np.ndarray, batch_size: int, device: torch.device, desc: str = "", progress: bool = False
) -> Iterator[Tensor]:
    """``images`` in batches on ``device`` in [-1, 1], with a progress bar (``desc``) when ``progress``."""
    from tqdm.auto import tqdm

    with tqdm(total=len(images), unit="img", desc=desc, disable=not progress) as bar:
        for start in range(0, len(images), batch_size):
            yield from_uint8(images[start : start + batch_size]).to(device)
            bar.update(min(batch_size, len(images) - start))


def encoder_for(checkpoint: str) -> nn.Module:
    """The encoder of ``fd_encoder``: a ResNetMAE from an MAEPretraining checkpoint, or the feature encoder of a
    ``drifting fit`` run."""
    from drifting_lightning.callbacks.frechet import encoder_from_checkpoint
    from drifting_lightning.checkpoints.loading import load_module
    from drifting_lightning.checkpoints.reading import existing_file, read_checkpoint
    from drifting_lightning.metrics.classifier import CHECKPOINT_FORMAT as CLASSIFIER_FORMAT

    existing_file(checkpoint, "encoder checkpoint")
    ckpt = read_checkpoint(checkpoint)
    if "encoder_config" in ckpt:
        return encoder_from_checkpoint(checkpoint)
    if ckpt.get("format") == CLASSIFIER_FORMAT:
        raise ValueError(f"--checkpoint {checkpoint} is a classifier file: its metric is --metric fd_classifier")
    return load_module(checkpoint).encoder


class Features(FeatureMoments):
    """Runs the extractor over batches: the Frechet moments of every feature, the first ``keep`` features [keep, F]
    (precision/recall) and, for Inception, every logit (Inception Score)."""

    def __init__(self, extractor: nn.Module, keep: int, logits: bool) -> None:
        super().__init__()
        self.extractor, self.keep, self.want_logits = extractor, keep, logits
        self.kept: list[Tensor] = []
        self.logits: list[Tensor] = []

    @torch.no_grad()
    def add_images(self, x: Tensor) -> None:
        if self.want_logits:
            f, logits = self.extractor.features_and_logits(x)
            self.logits.append(logits.float().cpu())
        else:
            f = self.extractor(x)
        room = self.keep - sum(len(k) for k in self.kept)
        if room > 0:
            self.kept.append(f[:room].float().cpu())
        self.add(f)

    def kept_features(self) -> Tensor:
        return torch.cat(self.kept) if self.kept else torch.empty(0)


def reference_images(args: argparse.Namespace, num_samples: int) -> tuple[np.ndarray | None, dict | None, str]:
    """(uint8 reference images [M, H, W, C] or None, {"mu", "sigma"} from the .npz or None, description)."""
    if args.ref:
        if not Path(args.ref).is_file():
            raise FileNotFoundError(f"--ref {args.ref} does not exist (an ADM reference batch or a stats .npz)")
        with open_npz(args.ref, "--ref") as f:
            stats = {"mu": f["mu"], "sigma": f["sigma"]} if {"mu", "sigma"} <= set(f.files) else None
            images = f["arr_0"] if "arr_0" in f.files else None
        if stats is None and images is None:
            raise KeyError(f"--ref {args.ref} holds neither mu/sigma nor arr_0 images (it has {sorted(f.files)})")
        if stats is not None:
            check_reference_statistics(stats["mu"], stats["sigma"], args.ref)
        return images, stats, args.ref
    x, desc = data_samples(args, num_samples)
    if x.dim() != 4 or x.shape[1] not in (1, 3):
        raise ValueError(
            f"the real samples of {args.data_config} have shape {list(x.shape[1:])}, not images [C, H, W] with C = 1 "
            "or 3 (latent data?): give --ref with reference images or statistics instead"
        )
    return to_uint8(x).numpy(), None, desc


def check_reference_statistics(mu: np.ndarray, sigma: np.ndarray, path: str) -> None:
    """mu [F] and sigma [F, F] of a reference file, finite: else an error that names the file (the distance would
    blame the features)."""
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
        raise ValueError(f"--ref {path}: mu must be [F] and sigma [F, F], got {list(mu.shape)} and {list(sigma.shape)}")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError(f"--ref {path}: mu or sigma holds NaN or Inf; the reference statistics are damaged")


def data_samples(args: argparse.Namespace, num_samples: int) -> tuple[Tensor, str]:
    """(real samples of --data-config's data, as many as ``num_samples`` or --num-ref, description)."""
    import lightning.pytorch as pl

    from drifting_lightning.checkpoints.loading import instantiate_section

    dm = instantiate_section(args.data_config, "data", pl.LightningDataModule)
    if not hasattr(dm, "real_samples"):
        raise ValueError(f"the data of {args.data_config} ({type(dm).__name__}) has no real_samples(n, split, seed)")
    x = dm.real_samples(args.num_ref or num_samples, split=args.split, seed=args.seed)[0]
    return x, f"{args.data_config} ({type(dm).__name__}, split {args.split})"


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    """The metrics of ``args.samples`` against the reference, as a dict (also what --out writes)."""
    from drifting_lightning.callbacks.frechet import make_extractor, metric_kind
    from drifting_lightning.metrics.frechet import frechet_distance
    from drifting_lightning.metrics.inception_score import inception_score
    from drifting_lightning.metrics.precision_recall import precision_recall

    fake_images = read_images(args.samples, "samples")
    vectors = fake_images.ndim == 2
    metric = args.metric or ("energy_distance" if vectors else "fid")
    if metric in VECTOR_METRICS or vectors:
        if not (metric in VECTOR_METRICS and vectors):
            raise ValueError(
                f"{args.samples} holds vectors {list(fake_images.shape[1:])} (a toy or vector model): their metric is "
                "--metric energy_distance, the default for them" if vectors else
                f"--metric {metric} is for vector samples [N, D]; {args.samples} holds images "
                f"{list(fake_images.shape[1:])}: use fid, fd_inception, fd_classifier or fd_encoder"
            )
        return evaluate_vectors(args, fake_images)
    kind = metric_kind(metric)
    device = resolve_device(args.device)
    encoder = encoder_for(args.checkpoint) if kind == "encoder" and args.checkpoint else None
    if kind == "encoder" and encoder is None:
        raise ValueError("--metric fd_encoder needs --checkpoint: an MAEPretraining or `drifting fit` checkpoint")
    extractor = make_extractor(metric, args.checkpoint, args.weights, encoder, args.feature_key)
    extractor = extractor.eval().to(device)
    name = extractor.metric_name
    real_images, stats, ref_desc = reference_images(args, len(fake_images))
    if real_images is not None and real_images.shape[1:] != fake_images.shape[1:]:
        raise ValueError(f"reference images are {list(real_images.shape[1:])}, samples {list(fake_images.shape[1:])}")

    keep = args.pr_samples
    fake = Features(extractor, keep, logits=kind == "inception")
    progress = not args.no_progress
    for x in batches(fake_images, args.batch_size, device, f"{name} of the samples", progress):
        fake.add_images(x)
    mu2, sigma2 = fake.statistics()
    if stats is not None and np.shape(stats["mu"]) != (mu2.shape[0],):
        if real_images is None:
            raise ValueError(
                f"--ref {args.ref} has statistics of {np.shape(stats['mu'])[0]} features, {name} has {mu2.shape[0]}: "
                "they come from another feature extractor (ADM reference batches hold Inception statistics)"
            )
        stats = None  # recompute from the reference's images in this feature space
    real = None
    if real_images is not None and (stats is None or keep > 0):
        real = Features(extractor, keep, logits=False)
        for x in batches(real_images, args.batch_size, device, f"{name} of the reference", progress):
            real.add_images(x)
    mu1, sigma1 = (stats["mu"], stats["sigma"]) if stats is not None else real.statistics()

    result: dict[str, Any] = {"metric": name, name: frechet_distance(mu1, sigma1, mu2, sigma2)}
    if kind == "inception" and fake.n >= IS_SPLITS:  # IS is a mean over 10 splits of the samples
        result["inception_score"], result["inception_score_std"] = inception_score(torch.cat(fake.logits), IS_SPLITS)
    if keep > 0 and real is not None:
        result["precision"], result["recall"] = precision_recall(real.kept_features(), fake.kept_features(), k=args.k)
        result["pr_samples"] = [len(real.kept_features()), len(fake.kept_features())]
    result.update(
        samples=str(args.samples),
        num_samples=len(fake_images),
        reference=ref_desc,
        num_reference=None if real is None or stats is not None else real.n,  # None: statistics from --ref
        reference_statistics="file" if stats is not None else "computed",
        extractor={"checkpoint": args.checkpoint,
                   "weights": _path_or_none(getattr(extractor, "weights_path", args.weights))},
    )
    return result


def evaluate_vectors(args: argparse.Namespace, samples: np.ndarray) -> dict[str, Any]:
    """The energy distance (V-statistic, ``metrics.energy``) of vector samples [N, D] to reference points: --ref's
    ``arr_0`` [M, D], or the real samples of --data-config's data (as many as samples, or --num-ref)."""
    from drifting_lightning.metrics.energy import energy_distance

    if args.ref:
        if not Path(args.ref).is_file():
            raise FileNotFoundError(f"--ref {args.ref} does not exist (an .npz of reference points, arr_0 [M, D])")
        with open_npz(args.ref, "--ref") as f:
            if "arr_0" not in f.files:
                raise KeyError(f"--ref {args.ref} has no 'arr_0' points (it has {sorted(f.files)})")
            real, ref_desc = torch.from_numpy(f["arr_0"]), args.ref
    else:
        real, ref_desc = data_samples(args, len(samples))
    if real.dim() != 2 or real.shape[1] != samples.shape[1]:
        raise ValueError(f"reference points are {list(real.shape[1:])}, samples {list(samples.shape[1:])}")
    return {
        "metric": "energy_distance",
        "energy_distance": energy_distance(torch.from_numpy(samples), real),
        "samples": str(args.samples),
        "num_samples": len(samples),
        "reference": ref_desc,
        "num_reference": len(real),
    }


def _path_or_none(path: object) -> str | None:
    """A path for the JSON record; None stays null (str() would make it the string 'None')."""
    return None if path is None else str(path)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="drifting evaluate",
        description="Frechet distance of a sample .npz (arr_0 uint8 [N, H, W, C]) against reference statistics or "
        "real data, named by its feature space: fid (Inception 2015-12-05 weights), fd_inception (other Inception "
        "weights), fd_classifier, fd_encoder. Also the Inception Score (Inception) and precision/recall. Vector "
        "samples (arr_0 float [N, D], toy data): the energy distance to the reference points.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("samples", help="samples .npz written by `drifting sample` (or any ADM sample batch)")
    ref = parser.add_mutually_exclusive_group(required=True)
    ref.add_argument("--ref", help="reference .npz: ADM reference batch (mu, sigma and/or arr_0 images)")
    ref.add_argument("--data-config", help="a `drifting fit` config (or a run's config.yaml): its data's real images")
    parser.add_argument("--split", default="train", help="real split with --data-config (train, test)")
    parser.add_argument("--num-ref", type=int, help="real images with --data-config (default: as many as samples)")
    parser.add_argument("--seed", type=int, default=0, help="order of the real images drawn with --data-config")
    parser.add_argument(
        "--metric",
        help="images: fid (default) | fd_inception | fd_classifier | fd_encoder (or inception, classifier, encoder); "
        "vectors: energy_distance (default)",
    )
    parser.add_argument(
        "--weights", help="Inception weights file (default: $DRIFTING_INCEPTION_WEIGHTS or torch cache)"
    )
    parser.add_argument("--checkpoint", help="classifier file (fd_classifier); MAE or drifting checkpoint (fd_encoder)")
    parser.add_argument("--feature-key", help="feature set of the encoder for fd_encoder (default: its only one)")
    parser.add_argument("--pr-samples", type=int, default=10000, help="samples per side for precision/recall (0: off)")
    parser.add_argument("--k", type=int, default=3, help="neighbourhood size of precision/recall")
    parser.add_argument("--batch-size", type=int, default=250, help="images per extractor call")
    parser.add_argument("--device", default="auto", help="auto (cuda, else mps, else cpu), cpu, cuda, ...")
    parser.add_argument("--out", help="also write the metrics to this JSON file")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def _run(args: argparse.Namespace) -> int:
    if args.out:
        check_output_file(args.out, "metrics.json")
    result = evaluate(args)
    name = result["metric"]
    print(f"{name}: {result[name]:.6g}" if name == "energy_distance" else f"{name}: {result[name]:.4f}")
    if result["metric"] in ("fid", "fd_inception") and "inception_score" not in result:
        print(f"inception_score: not computed (needs at least {IS_SPLITS} samples)")
    if "inception_score" in result:
        print(f"inception_score: {result['inception_score']:.4f} +- {result['inception_score_std']:.4f}")
    if "precision" in result:
        print(f"precision: {result['precision']:.4f}\nrecall: {result['recall']:.4f}")
    if args.out:
        out = Path(args.out)
        with atomic_write(out) as tmp:
            tmp.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {out}")
    return 0


def main(argv: Sequence[str]) -> int:
    """``drifting evaluate samples.npz --ref ref.npz|--data-config X --metric NAME [...]``; returns the exit status."""
    return run_command(build_parser(), _run, argv)
