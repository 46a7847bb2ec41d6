"""Reference points for fd_classifier on Fashion-MNIST: what a perfect generator and a trivial one would score.

    python benchmarks/fd_reference_points.py --classifier runs/classifier/fashion_mnist/classifier.pt

Every row is measured exactly as ``FrechetCallback`` in configs/fashion_mnist.yaml measures a generator: ``--num``
images (class-balanced labels for the made-up rows), uint8-quantised, SmallCNN features, against the statistics
of ``--num`` training images drawn with the callback's seed. Rows:
- held-out: the 10k test images (a random ``--num`` of them): the floor a perfect generator reaches at this count;
- train (other draw): other training images: the same floor without the train/test shift;
- class means: the per-class mean training image, repeated;
- class means + noise: per class, each pixel drawn independently from a Gaussian with that class's per-pixel mean
  and std (a diagonal Gaussian per class: right first and second moments per pixel, no structure).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from drifting_lightning.data.images import IDXDataModule  # noqa: E402
from drifting_lightning.metrics.extractors import ClassifierExtractor  # noqa: E402
from drifting_lightning.metrics.frechet import FrechetDistance  # noqa: E402
from drifting_lightning.metrics.npz import through_uint8  # noqa: E402


def fd_against(reference: FrechetDistance, extractor: ClassifierExtractor, images: torch.Tensor, batch: int) -> float:
    metric = FrechetDistance(extractor)
    metric.set_reference(*reference.statistics(real=True))
    for x in images.split(batch):
        metric.update(through_uint8(x), real=False)
    return float(metric.compute())


def class_moment_samples(train: torch.Tensor, labels: torch.Tensor, n: int, noise: bool, seed: int) -> torch.Tensor:
    """n images with labels i % 10: the class's per-pixel mean, plus (noise) its per-pixel std times N(0, 1)."""
    num_classes = int(labels.max()) + 1
    wanted = torch.arange(n) % num_classes
    means = torch.stack([train[labels == c].mean(0) for c in range(num_classes)])
    out = means[wanted]
    if noise:
        stds = torch.stack([train[labels == c].std(0) for c in range(num_classes)])
        gen = torch.Generator().manual_seed(seed)
        out = out + stds[wanted] * torch.randn(out.shape, generator=gen)
    return out.clamp(-1, 1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classifier", required=True, help="classifier.pt from configs/classifier/fashion_mnist.yaml")
    parser.add_argument("--root", default="/usr/share/datasets/fashion-mnist", help="the IDX folder")
    parser.add_argument("--num", type=int, default=2000, help="samples per row (the callback's num_samples)")
    parser.add_argument("--seed", type=int, default=0, help="the callback's seed (reference draw)")
    parser.add_argument("--batch-size", type=int, default=250)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    data = IDXDataModule(root=args.root)
    extractor = ClassifierExtractor(args.classifier).eval()
    reference = FrechetDistance(extractor)
    with torch.no_grad():
        for x in data.real_samples(args.num, split="train", seed=args.seed)[0].split(args.batch_size):
            reference.update(through_uint8(x), real=True)
        train, labels = data.real_samples(None, split="train", seed=args.seed)
        rows = {
            "held-out test images": data.real_samples(args.num, split="test", seed=args.seed)[0],
            "train images (other draw)": data.real_samples(args.num, split="train", seed=args.seed + 1)[0],
            "class means": class_moment_samples(train, labels, args.num, noise=False, seed=args.seed),
            "class means + per-pixel noise": class_moment_samples(train, labels, args.num, noise=True, seed=args.seed),
        }
        print(f"fd_classifier, {args.num} samples per row, reference: {args.num} training images (seed {args.seed})")
        print(f"{'row':32s} {'fd_classifier':>14s}")
        for name, images in rows.items():
            print(f"{name:32s} {fd_against(reference, extractor, images, args.batch_size):14.3f}")


if __name__ == "__main__":
    main()
