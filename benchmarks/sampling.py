"""One-step sampling throughput of the small DiT presets, and the feature-extraction cost of the Frechet metrics.

    python benchmarks/sampling.py              # full run: about a minute on a 2-core CPU
    python benchmarks/sampling.py --quick      # smoke test: small batches, one repeat
    python benchmarks/sampling.py --device cuda

Weights are random (the cost of a forward pass does not depend on them). Rows, each the median of several timed
runs after one warm-up:
- sample: ``draw_inputs`` + one forward of DiT preset "digits" (8x8x1) or "fashion" (28x28x1), conditional, with
  alpha, i.e. what ``DriftingModule.sample`` and ``drifting sample`` do per batch (uint8 quantisation included);
- classifier: penultimate features of the ``fd_classifier`` SmallCNN (configs/classifier: width 32, 128 features);
- inception: torch-fidelity's InceptionV3 (``fid`` / ``fd_inception``) on the same images, resized to 299x299
  inside the network; built without loading weights, so no download is needed.
The last column is the time the stage would take for 50k samples, the FID protocol's count.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from drifting_lightning.metrics.classifier import SmallCNN  # noqa: E402
from drifting_lightning.metrics.npz import to_uint8  # noqa: E402
from drifting_lightning.models.dit import DiT  # noqa: E402

FID_SAMPLES = 50_000


def timed(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs after one warm-up run."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def random_inception(device: torch.device) -> torch.nn.Module:
    """torch-fidelity's InceptionV3 (the FID network) with random weights: its loader is bypassed, nothing is read."""
    import torch_fidelity.feature_extractor_inceptionv3 as tf_inception

    with (
        mock.patch.object(tf_inception, "load_state_dict_from_url", lambda *a, **k: None),
        mock.patch.object(tf_inception.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None),
    ):
        net = tf_inception.FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"])
    return net.eval().to(device)


def row(stage: str, what: str, batch: int, seconds: float) -> dict:
    return {"stage": stage, "what": what, "batch": batch, "ms": 1e3 * seconds, "rate": batch / seconds}


@torch.no_grad()
def run(device: torch.device, quick: bool) -> list[dict]:
    repeats = 1 if quick else 5
    sample_batches = [16] if quick else [64, 256]
    rows = []
    for preset in ("digits", "fashion"):
        torch.manual_seed(0)
        gen = DiT(preset).eval().to(device)
        params = sum(p.numel() for p in gen.parameters()) / 1e6
        for b in sample_batches:
            labels = torch.arange(b, device=device) % gen.num_classes
            alpha = torch.full((b,), 1.5, device=device)
            noise = torch.Generator(device=device).manual_seed(0)

            def sample(b=b, labels=labels, alpha=alpha, noise=noise, gen=gen) -> torch.Tensor:
                return to_uint8(gen(**gen.draw_inputs(b, device, noise), labels=labels, alpha=alpha))

            rows.append(row("sample", f"DiT {preset} ({params:.1f}M)", b, timed(sample, repeats, device)))

    classifier = SmallCNN(in_channels=1, num_classes=10, width=32, feature_dim=128).eval().to(device)
    inception = random_inception(device)
    clf_batch, inc_batch = (64, 2) if quick else (256, 8)
    for size in (8, 28):
        x = torch.rand(clf_batch, 1, size, size, device=device) * 2 - 1
        seconds = timed(lambda x=x: classifier.features(x), repeats, device)
        rows.append(row("classifier", f"SmallCNN features, {size}x{size}", clf_batch, seconds))
        u8 = to_uint8(x[:inc_batch], channels_last=False).expand(-1, 3, -1, -1)
        seconds = timed(lambda u8=u8: inception(u8), repeats, device)
        rows.append(row("inception", f"InceptionV3 2048+logits, {size}x{size} -> 299", inc_batch, seconds))
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| stage | what | batch | ms / batch | images / s | 50k samples |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        total = FID_SAMPLES / r["rate"]
        when = f"{total:.0f} s" if total < 120 else f"{total / 60:.1f} min" if total < 7200 else f"{total / 3600:.1f} h"
        rate = f"{r['rate']:,.0f}" if r["rate"] >= 10 else f"{r['rate']:.2g}"
        lines.append(f"| {r['stage']} | {r['what']} | {r['batch']} | {r['ms']:.1f} | {rate} | {when} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small batches and one repeat (smoke test)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = run(device, args.quick)
    print(
        f"torch {torch.__version__}, device {device}, {torch.get_num_threads()} CPU threads, "
        f"{platform.processor() or platform.machine()}; random weights, median of timed runs after a warm-up\n"
    )
    print(table(rows))


if __name__ == "__main__":
    main()
