"""What guidance does to a trained class-conditional generator, next to what the paper's guidance can do at most.

    python benchmarks/guidance.py --checkpoint runs/digits/version_0/checkpoints/last.ckpt --data digits
    python benchmarks/guidance.py --checkpoint runs/fashion_mnist/version_0/checkpoints/last.ckpt --data idx \
        --classifier runs/classifier/fashion_mnist/classifier.pt --grid guidance.png

Guidance by unconditional negatives (PAPER.md 5) trains q(.|c, alpha) toward alpha p(.|c) - (alpha - 1) p(.),
clipped at zero and renormalised: a *linear* extrapolation away from the unconditional distribution, unlike
diffusion's classifier-free guidance, which tilts p(.|c) by P(c|x)^(alpha - 1). By Bayes p(x) / p(x|c) =
P(c) / P(c|x), so the target reweights each real image x of class c by max(0, alpha - (alpha - 1) P(c) / P(c|x)).
The "ideal" table applies that weight to held-out real images with a classifier's P(c|x): how far the guided
target lies from p(.|c) (total variation), the share of p(.|c) it removes, and the classifier accuracy it would
have. When classes barely overlap, P(c|x) is near 1 almost everywhere and the target hardly moves.

The "generator" table samples each class at each alpha from the same noise and reports the same classifier's
accuracy and mean P(c|x), the mean |pixel| (contrast), the within-class per-pixel std (diversity), and how far
samples move from their alpha = 1 version, relative to their spread around the class mean.

``--hard-grid`` shows where guidance acts: the samples per class that the classifier finds least like their class at
alpha = 1, with the same noise at every alpha, and prints how the classifier sees just those.

The classifier is ``--classifier`` (a classifier.pt of configs/classifier/*.yaml) or, by default, a multinomial
logistic regression on the training split's pixels.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from drifting_lightning.checkpoints.reading import is_distributed_checkpoint  # noqa: E402
from drifting_lightning.data.images import DigitsDataModule, IDXDataModule, ImageDataModule  # noqa: E402
from drifting_lightning.export import export_generator, load_generator  # noqa: E402
from drifting_lightning.metrics.classifier import load_classifier  # noqa: E402


def guided_weights(posterior: Tensor, prior: Tensor, alpha: float) -> Tensor:
    """Density ratio q_alpha(x|c) / p(x|c) of the guided target, up to normalisation, for images x of class c.

    posterior: P(c|x) of each image for its own class [n]; prior: P(c) [n]. Returns
    max(0, alpha - (alpha - 1) P(c) / P(c|x)) [n] (alpha = 1 gives ones)."""
    return (alpha - (alpha - 1.0) * prior / posterior.clamp_min(1e-12)).clamp_min(0.0)


def ideal_row(posterior: Tensor, prior: Tensor, correct: Tensor, alpha: float) -> tuple[float, float, float]:
    """(total variation between the guided target and p(.|c), share of p(.|c) it removes, classifier accuracy under
    the guided target), estimated on real images of known class."""
    r = guided_weights(posterior, prior, alpha)
    r = r / r.mean()
    tv = 0.5 * (r - 1.0).abs().mean().item()
    removed = (r == 0).double().mean().item()
    accuracy = (r * correct.double()).mean().item()
    return tv, removed, accuracy


class PixelLogistic:
    """Multinomial logistic regression on pixels, the default classifier: probabilities [n, K] of images."""

    def __init__(self, images: Tensor, labels: Tensor, max_train: int = 10_000) -> None:
        from sklearn.linear_model import LogisticRegression

        self.model = LogisticRegression(max_iter=2000, C=0.5)
        self.model.fit(images[:max_train].flatten(1).numpy(), labels[:max_train].numpy())

    def __call__(self, images: Tensor) -> Tensor:
        return torch.from_numpy(self.model.predict_proba(images.flatten(1).numpy())).float()


class CNNProbabilities:
    """A trained SmallCNN (classifier.pt) as probabilities [n, K]."""

    def __init__(self, path: str) -> None:
        self.net = load_classifier(path)

    @torch.no_grad()
    def __call__(self, images: Tensor) -> Tensor:
        return torch.cat([self.net(x).softmax(-1) for x in images.split(500)])


def data_module(name: str, root: str) -> ImageDataModule:
    return DigitsDataModule() if name == "digits" else IDXDataModule(root=root)


@torch.no_grad()
def generator_rows(generator, classify, num_classes: int, per_class: int, alphas: list[float], seed: int):
    """Per alpha: (accuracy, mean P(c|x), mean |x|, within-class std, move from alpha = 1 / spread); the samples of
    every alpha [len(alphas), K * per_class, C, H, W] from one noise draw; the classifier's probabilities of every
    sample [len(alphas), n, K]."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    inputs = generator.draw_inputs(len(labels), generator=gen)
    samples = torch.stack([generator(**inputs, labels=labels, alpha=a).clamp(-1, 1) for a in alphas])
    base = samples[alphas.index(1.0)] if 1.0 in alphas else None
    rows, probabilities = [], []
    for s in samples:
        p = classify(s)
        probabilities.append(p)
        own = p[torch.arange(len(labels)), labels]
        flat = s.flatten(1).view(num_classes, per_class, -1)
        spread = (flat - flat.mean(1, keepdim=True)).norm(dim=-1).mean()
        move = float("nan") if base is None else ((s - base).flatten(1).norm(dim=1).mean() / spread).item()
        rows.append((
            (p.argmax(1) == labels).float().mean().item(),
            own.mean().item(),
            s.abs().mean().item(),
            flat.std(1).mean().item(),
            move,
        ))
    return rows, samples, torch.stack(probabilities)


def hardest(posterior: Tensor, num_classes: int, per_class: int, k: int) -> Tensor:
    """Indices of the k samples of each class with the lowest P(c|x); samples are grouped by class, per_class each."""
    order = posterior.view(num_classes, per_class).argsort(dim=1)[:, :k]
    return (order + per_class * torch.arange(num_classes)[:, None]).flatten()


def save_panels(samples: Tensor, per_class: int, path: str, scale: int) -> None:
    """One grid per alpha (rows = classes), side by side, pixels enlarged ``scale`` times."""
    from torchvision.utils import make_grid, save_image

    panels = [make_grid((s + 1) / 2, nrow=per_class, padding=1, pad_value=0.3) for s in samples]
    gap = torch.ones(3, panels[0].shape[1], 4)
    joined = torch.cat([t for p in panels for t in (p, gap)][:-1], dim=2)
    save_image(torch.nn.functional.interpolate(joined[None], scale_factor=scale, mode="nearest")[0], path)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Prints the tables; returns them: {"classifier_accuracy", "ideal": {alpha: (TV, removed, accuracy)},
    "generator": {alpha: (accuracy, P(c|x), |pixel|, within-class std, move)}, "real": (the same for held-out images),
    "hardest": {alpha: (accuracy, P(c|x))} (with --hard-grid)}."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a training checkpoint or an export directory")
    parser.add_argument("--data", choices=["digits", "idx"], default="digits")
    parser.add_argument("--root", default="/usr/share/datasets/fashion-mnist", help="the IDX folder (--data idx)")
    parser.add_argument("--classifier", default=None, help="classifier.pt; default: logistic regression on pixels")
    parser.add_argument("--alphas", default="1,1.5,2,3,4", help="comma-separated guidance scales")
    parser.add_argument("--per-class", type=int, default=200, help="samples per class and alpha")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--grid", default=None, help="write a PNG of 8 samples per class for every alpha")
    parser.add_argument("--hard-grid", default=None, help="write a PNG of the 4 least class-like alpha-1 samples per "
                        "class, at every alpha")  # fmt: skip
    parser.add_argument("--grid-scale", type=int, default=4)
    args = parser.parse_args(argv)
    alphas = [float(a) for a in args.alphas.split(",")]
    if args.hard_grid and 1.0 not in alphas:
        parser.error("--hard-grid picks samples by their P(c|x) at alpha 1: include 1 in --alphas")

    data = data_module(args.data, args.root)
    train_x, train_y = data.real_samples(None, split="train", seed=args.seed)
    test_x, test_y = data.real_samples(None, split="test", seed=args.seed)
    classify = CNNProbabilities(args.classifier) if args.classifier else PixelLogistic(train_x, train_y)
    num_classes = int(train_y.max()) + 1
    prior = torch.bincount(train_y, minlength=num_classes).double() / len(train_y)

    probs = classify(test_x).double()
    posterior = probs[torch.arange(len(test_y)), test_y]
    correct = probs.argmax(1) == test_y
    print(f"classifier: {'pixel logistic regression' if args.classifier is None else args.classifier}, "
          f"held-out accuracy {correct.double().mean():.3f} on {len(test_y)} images")  # fmt: skip
    print("\nideal: the guided target alpha p(.|c) - (alpha - 1) p(.) on held-out real images")
    print("| alpha | TV to p(.|c) | share of p(.|c) removed | classifier accuracy |")
    print("|---|---|---|---|")
    result: dict[str, Any] = {"classifier_accuracy": correct.double().mean().item(), "ideal": {}, "hardest": {}}
    for a in alphas:
        tv, removed, accuracy = ideal_row(posterior, prior[test_y], correct, a)
        result["ideal"][a] = (tv, removed, accuracy)
        print(f"| {a:g} | {tv:.3f} | {removed:.3f} | {accuracy:.3f} |")

    if Path(args.checkpoint).is_dir() and not is_distributed_checkpoint(args.checkpoint):
        generator = load_generator(args.checkpoint)
    else:
        with tempfile.TemporaryDirectory() as out:
            generator = load_generator(export_generator(args.checkpoint, out))
    rows, samples, probabilities = generator_rows(generator, classify, num_classes, args.per_class, alphas, args.seed)
    print(f"\ngenerator: {args.per_class} samples per class and alpha, one noise draw for all alphas")
    print("| alpha | classifier accuracy | mean P(c|x) | mean abs pixel | within-class std | move from alpha 1 |")
    print("|---|---|---|---|---|---|")
    for a, (acc, pc, contrast, std, move) in zip(alphas, rows):
        print(f"| {a:g} | {acc:.3f} | {pc:.3f} | {contrast:.3f} | {std:.3f} | {move:.3f} |")
    result["generator"] = dict(zip(alphas, rows))
    real = test_x.flatten(1)
    real_std = np.mean([real[test_y == c].std(0).mean().item() for c in range(num_classes)])
    result["real"] = (result["classifier_accuracy"], posterior.mean().item(), real.abs().mean().item(), real_std)
    print(f"| real (held-out) | {correct.double().mean():.3f} | {posterior.mean():.3f} | {real.abs().mean():.3f} "
          f"| {real_std:.3f} | - |")  # fmt: skip
    if args.grid:
        per_row = min(8, args.per_class)
        keep = torch.arange(num_classes)[:, None] * args.per_class + torch.arange(per_row)
        save_panels(samples[:, keep.flatten()], per_row, args.grid, args.grid_scale)
        print(f"\nwrote {args.grid}: alphas {', '.join(f'{a:g}' for a in alphas)} left to right")
    if args.hard_grid:
        k = min(4, args.per_class)
        labels = torch.arange(num_classes).repeat_interleave(args.per_class)
        at_one = probabilities[alphas.index(1.0)]
        keep = hardest(at_one[torch.arange(len(labels)), labels], num_classes, args.per_class, k)
        labels = labels[keep]
        print(f"\nthe {k} least class-like alpha-1 samples of each class, same noise at every alpha")
        print("| alpha | classifier accuracy | mean P(c|x) |")
        print("|---|---|---|")
        for a, p_all in zip(alphas, probabilities):
            p = p_all[keep]
            accuracy = (p.argmax(1) == labels).float().mean().item()
            result["hardest"][a] = (accuracy, p[torch.arange(len(keep)), labels].mean().item())
            print(f"| {a:g} | {accuracy:.3f} | {result['hardest'][a][1]:.3f} |")
        save_panels(samples[:, keep], k, args.hard_grid, args.grid_scale)
        print(f"wrote {args.hard_grid}")
    return result


if __name__ == "__main__":
    main()
