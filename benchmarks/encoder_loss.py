"""Encoder forward/backward plus the multi-feature drift loss: time and peak memory as the feature sets grow.

    python benchmarks/encoder_loss.py                 # Fashion-MNIST config + ImageNet shapes, reduced, on the CPU
    python benchmarks/encoder_loss.py --quick         # smoke test: tiny batch
    python benchmarks/encoder_loss.py --device cuda   # ImageNet at the config's encoder width, 8 class groups

Cases (random weights, ``checkpoint: null``; the cost does not depend on the weights):
- fashion: the ResNetMAE of configs/fashion_mnist_mae.yaml (28x28x1, width 16, stages 1-1-1-1) at that config's
  batch: G class groups of N generated samples, P positives and M unconditional negatives;
- imagenet: the ResNetMAE of configs/imagenet.yaml (32x32x4 SD-VAE latents, stages 3-4-6-3, width 256: the encoder
  configs/mae/imagenet_latent.yaml trains) with that config's N, P, M per group, at ``--imagenet-width`` and
  ``--imagenet-groups`` (CPU default: width 32, 1 group; CUDA: the config's width, 8 groups, one GPU's share of the
  paper's N_c 64 over 8 GPUs, with bf16 autocast as configs/imagenet.yaml trains).
Rows: the feature families grow, global -> + patch2 -> + patch4 -> + location (every family: the ImageNet config's
default; the Fashion config uses the first three), each with the loss of the config at a fixed
``max_chunk_elements`` (``--chunk-elements``) and unchunked (None, the configs' default).

Each measurement runs in a fresh process (peak memory: see benchmarks/measure.py):
- encoder + loss: inputs (the generated samples as a leaf with gradient, positives, negatives, guidance weights),
  then the encoder on all three (generated with gradient, the others without), the loss, and the backward through
  the loss and the encoder to the generated samples. The backward column is the encoder's backward plus the loss's
  own, a single multiply (``drift.stop_gradient.StopGradientMSE``);
- loss alone: the loss forward + backward on random features of the encoder's shapes, against the engine's stated
  bound (drift/chunks.py docstring): one float32 force buffer the size of the generated features, which becomes their
  gradient, plus one chunk's working memory (``chunk_budget_bytes``, the largest over the feature sets).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from measure import CLOCKS, ROOT, PeakMemory, engine_version, machine, mb, ms, run_isolated, summary, sync, timed_runs

sys.path.insert(0, str(ROOT))

from drifting_lightning.checkpoints.loading import read_run_config  # noqa: E402
from drifting_lightning.drift.chunks import chunk_budget_bytes  # noqa: E402
from drifting_lightning.export import import_class  # noqa: E402
from drifting_lightning.module import _grouped  # noqa: E402

CASES = {"fashion": "configs/fashion_mnist_mae.yaml", "imagenet": "configs/imagenet.yaml"}
SAMPLE_SHAPES = {"fashion": [1, 28, 28], "imagenet": [4, 32, 32]}  # the encoders' inputs
FAMILY_STEPS = (("global",), ("global", "patch2"), ("global", "patch2", "patch4"),
                ("global", "patch2", "patch4", "location"))  # fmt: skip
SEGMENTS = ("encoder", "loss", "backward")


def case_spec(case: str, args: argparse.Namespace) -> dict:
    """Encoder, loss and batch shape of ``case`` from its config, with the command line's reductions."""
    cfg = read_run_config(ROOT / CASES[case])
    model, counts = cfg["model"]["init_args"], cfg["data"]["init_args"]["positives"]["init_args"]
    encoder = {**model["encoder"].get("init_args", {}), "checkpoint": None}
    arch = encoder["arch"] = dict(encoder.get("arch") or {})
    g = counts["classes_per_step"]
    if case == "imagenet":
        arch["width"] = args.imagenet_width or (arch.get("width", 256) if args.device != "cpu" else 32)
        g = args.imagenet_groups or (8 if args.device != "cpu" else 1)
    n, p, m = model["generated_per_group"], counts["positives_per_class"], counts["unconditional_per_class"]
    if args.quick:
        g, n, p, m = 2, 4, 4, 2
        arch["width"] = 8
    loss = model.get("loss", {"class_path": "drifting_lightning.drift.loss.DriftingLoss"})
    return {"case": case, "encoder_class": model["encoder"]["class_path"], "encoder": encoder,
            "shape": SAMPLE_SHAPES[case],
            "loss_class": loss["class_path"], "loss": loss.get("init_args", {}), "G": g, "N": n, "P": p, "M": m,
            "device": args.device, "threads": args.threads, "clock": args.clock, "warmup": args.warmup,
            "repeats": args.repeats,
            "bf16": args.device != "cpu"}  # fmt: skip


def make_run(spec: dict, encoder: torch.nn.Module, loss_fn: torch.nn.Module, sizes: tuple[int, int, int, int],
             segments: list[list[float]]) -> Callable[[], None]:
    """One forward + backward of the worker's mode at ``sizes`` = (G, N, P, M); in "full" mode each run appends its
    (encoder forward, loss forward, backward) seconds to ``segments``."""
    g, n, p, m = sizes
    device = torch.device(spec["device"])
    shape = tuple(spec["shape"])
    weights = torch.rand(g, device=device) * 4
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=spec["bf16"])
    if spec["mode"] == "loss":
        with torch.no_grad(), autocast:
            feats = encoder(torch.randn(1, *shape, device=device))

        def randn(k: int, like: torch.Tensor) -> torch.Tensor:
            return torch.randn(g, k, *like.shape[1:], device=device, dtype=like.dtype)

        gen = {k: randn(n, v).requires_grad_() for k, v in feats.items()}
        pos, neg = {k: randn(p, v) for k, v in feats.items()}, {k: randn(m, v) for k, v in feats.items()}
        del feats

        def run_loss() -> None:
            for v in gen.values():
                v.grad = None
            loss_fn(gen, pos, neg, weights).loss.backward()

        return run_loss

    x_gen = torch.randn(g * n, *shape, device=device).requires_grad_()
    x_pos, x_neg = torch.randn(g * p, *shape, device=device), torch.randn(g * m, *shape, device=device)
    now = CLOCKS[spec["clock"]]

    def run_full() -> None:
        x_gen.grad = None
        stamps = [now()]
        with autocast:
            gen = _grouped(encoder(x_gen), g)
            with torch.no_grad():
                pos, neg = _grouped(encoder(x_pos), g), _grouped(encoder(x_neg), g)
        sync(device)
        stamps.append(now())
        out = loss_fn(gen, pos, neg, weights)
        sync(device)
        stamps.append(now())
        out.loss.backward()
        sync(device)
        stamps.append(now())
        segments.append([b - a for a, b in zip(stamps, stamps[1:])])

    return run_full


def worker(spec: dict) -> dict:
    """One (case, families, chunk, mode) measurement in this fresh process."""
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    device = torch.device(spec["device"])
    encoder = import_class(spec["encoder_class"])(**{**spec["encoder"], "families": spec["families"]}).to(device)
    loss_fn = import_class(spec["loss_class"])(**{**spec["loss"], "max_chunk_elements": spec["chunk"]})
    g, n, p, m = sizes = spec["G"], spec["N"], spec["P"], spec["M"]
    with torch.no_grad():
        shapes = [v.shape[1:] for v in encoder(torch.randn(1, *spec["shape"])).values()]
    t = n + m + p
    # The working memory of the largest chunk: one [rows, N, T] matrix holds at most max_chunk_elements.
    budget = max(chunk_budget_bytes(min(spec["chunk"] or g * lc[0] * n * t, g * lc[0] * n * t), n, t, lc[1])
                 for lc in shapes)  # fmt: skip
    info: dict[str, Any] = {"features": len(shapes), "budget": budget,
                            "gen_bytes": sum(4 * g * n * lc.numel() for lc in shapes)}  # float32 force buffers
    segments: list[list[float]] = []
    # A run at one sample per group first: the process's one-time allocations (autograd threads, kernel
    # workspaces, about 20 MB) then fall before the baseline, and it leaves little freed memory to hide growth.
    make_run(spec, encoder, loss_fn, (1, 1, 1, 1), segments)()
    segments.clear()
    run = make_run(spec, encoder, loss_fn, sizes, segments)
    with PeakMemory(device) as memory:
        result = timed_runs(run, device, spec["warmup"], spec["repeats"], spec["clock"])
    timed = segments[spec["warmup"] :]
    parts = {name: summary([s[i] for s in timed]) for i, name in enumerate(SEGMENTS)} if timed else {}
    return {**result, **info, **parts, "extra": memory.extra}


def print_table(columns: list[str], results: list[tuple[str, tuple[str, ...], dict]], mode: str,
                cells: Callable[[dict, dict], list[Any]]) -> None:
    """One markdown row per (case, families): ``cells(chunked run, unchunked run)`` of ``mode``, or the error."""
    print("| case | families | " + " | ".join(columns) + " |")
    print("|---|---|" + "---:|" * len(columns))
    for case, families, runs in results:
        a, b = runs[(True, mode)], runs[(False, mode)]
        failed = a.get("error") or b.get("error")
        row = [f"failed: {failed}"] + [""] * (len(columns) - 1) if failed else cells(a, b)
        print(f"| {case} | {'+'.join(families)} | " + " | ".join(str(c) for c in row) + " |")


def full_cells(a: dict, b: dict) -> list[Any]:
    """Row of the encoder + loss table from the chunked (a) and unchunked (b) runs."""
    return [a["features"], mb(a["gen_bytes"]), ms(a["encoder"]), ms(a["loss"]), ms(a["backward"]), ms(a),
            mb(a["extra"]), ms(b["loss"]), ms(b), mb(b["extra"])]


def loss_cells(a: dict, b: dict) -> list[Any]:
    """Row of the loss-alone table: the peak extra beyond the gradient is the engine's own working memory."""
    own, own_unchunked = a["extra"] - a["gen_bytes"], b["extra"] - b["gen_bytes"]
    return [mb(a["gen_bytes"]), mb(a["budget"]), ms(a), mb(a["extra"]), mb(own), f"{own / a['budget']:.2f}", ms(b),
            mb(b["extra"]), mb(own_unchunked)]


def main(argv: list[str] | None = None) -> list[tuple[str, tuple[str, ...], dict]]:
    """Prints both tables; returns their rows: (case, families, {(chunked, "full" | "loss"): measurements})."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="2 groups of 4, encoder width 8, the first and last families row (smoke test)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: a shared CPU)")
    parser.add_argument("--clock", choices=list(CLOCKS), default="wall",
                        help="wall time, or the process's CPU time (a shared CPU, one thread)")
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--chunk-elements", type=int, default=2**20,
                        help="max_chunk_elements of the chunked rows (default 2**20: 4 MiB per [rows, N, T] matrix)")
    parser.add_argument("--imagenet-width", type=int, default=None,
                        help="encoder width of the ImageNet case (default: 32 on CPU, the config's 256 on CUDA)")
    parser.add_argument("--imagenet-groups", type=int, default=None,
                        help="class groups of the ImageNet case (default: 1 on CPU, 8 on CUDA)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs first")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs (default 3, quick 1)")
    args = parser.parse_args(argv)
    args.repeats = args.repeats or (1 if args.quick else 3)
    device = torch.device(args.device)
    if args.clock == "cpu" and (device.type == "cuda" or args.threads != 1):
        parser.error("--clock cpu measures one CPU thread's work: use it with --device cpu --threads 1")
    chunk = args.chunk_elements
    print(f"encoder + loss benchmark, {time.strftime('%Y-%m-%d %H:%M')}, device {device} ({machine(device)}), "
          f"torch {torch.__version__}, engine {engine_version()}, {args.threads} torch thread(s), {args.clock} clock, "
          f"max_chunk_elements {chunk:,} or None")
    print(f"median of {args.repeats} timed runs (range) after {args.warmup} warm-up run(s), each in a fresh process\n")
    results = []
    for case in args.cases:
        spec = case_spec(case, args)
        enc = spec["encoder"]
        arch = enc["arch"]
        print(f"{case}: {CASES[case]}, encoder width {arch['width']}, stages {arch.get('stages', [3, 4, 6, 3])}, "
              f"{'x'.join(map(str, spec['shape']))} inputs, G={spec['G']} groups of "
              f"N={spec['N']} generated, P={spec['P']} positives, M={spec['M']} negatives"
              + (", bf16 autocast" if spec["bf16"] else ""))  # fmt: skip
        for families in (FAMILY_STEPS[0], FAMILY_STEPS[-1]) if args.quick else FAMILY_STEPS:
            runs = {(chunked, mode): run_isolated(worker, {**spec, "families": list(families), "mode": mode,
                                                           "chunk": chunk if chunked else None})
                    for chunked in (True, False) for mode in ("full", "loss")}  # fmt: skip
            results.append((case, families, runs))
    print("\nEncoder + loss: forward, loss, backward (ms) and peak extra memory (MB), chunked vs unchunked\n")
    print_table(["feature sets", "gen features MB", "encoder fwd", "loss fwd", "backward", "total", "peak extra",
                 "loss fwd unchunked", "total unchunked", "peak extra unchunked"], results, "full", full_cells)
    print("\nLoss alone on random features of the same shapes, peak extra memory (MB): the engine holds one float32 "
          "force buffer per feature set (gen's size), which becomes the gradient, plus one chunk's working memory "
          "(chunk budget, the largest over the feature sets)\n")
    print_table(["gen = gradient MB", "chunk budget MB", "loss ms", "peak extra", "extra - gradient",
                 "(extra - gradient) / budget", "loss ms unchunked", "peak extra unchunked",
                 "extra - gradient unchunked"], results, "loss", loss_cells)  # fmt: skip
    print(f"\nload average {' '.join(f'{x:.1f}' for x in os.getloadavg())} at the end")
    return results


if __name__ == "__main__":
    main()
