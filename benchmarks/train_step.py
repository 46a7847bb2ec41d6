"""Time and peak memory of one training step of the shipped configs, and the share of each part of it.

    python benchmarks/train_step.py              # digits, Fashion-MNIST, Fashion-MNIST + MAE on the CPU: minutes
    python benchmarks/train_step.py --quick      # smoke test: digits at 2 class groups of 4
    python benchmarks/train_step.py --device cuda --imagenet   # adds DiT-B/2 at configs/imagenet.yaml's batch
    python benchmarks/train_step.py --device cuda --imagenet --compile generator   # the step under torch.compile

Model and data come from each config's YAML, built with jsonargparse as ``drifting fit`` builds them
(``export.instantiate_section``). The ResNetMAE of fashion_mnist_mae.yaml (and imagenet.yaml) is built with random
weights (``checkpoint: null``): the cost does not depend on the weights, and the pretrained file may not exist.
One real batch is drawn from the data module (for ImageNet: Gaussian latents of the config's shapes, the latent cache
being absent), and the module's own ``training_step`` runs once up to the loss call to capture the inputs of each
part. Then, each in a fresh process:
- step: ``Trainer.fit`` on that batch, with the config's precision and gradient clipping. A step is the time between
  consecutive batch starts; hooks split it into the generator's forward, the encoder's three forwards (generated
  samples with gradient, positives and unconditional negatives without), the loss's forward, the backward down to
  the generated samples (the encoder's backward; the loss's own is a single multiply) and the generator's
  backward. "rest" is everything else: the remainder of training_step and its logging, clipping, AdamW, EMA and
  Lightning's loop. On CUDA every hook synchronises, which costs a little overlap. Under ``--compile`` the hooks at
  the edges of a compiled part are graph breaks (Dynamo warns that it cannot trace ``time.perf_counter``); the
  part's body is compiled.
- peak memory of the step, and of each part alone (generator, encoder, loss: forward + backward on the captured
  inputs, a gradient of ones where the next part is missing). See benchmarks/measure.py; for the step the baseline
  is the start of the first step (model, EMA copy and batch exist; gradients, AdamW state, activations and the
  process's one-time allocations count), for a part the moment its inputs exist, after a run at one sample.
Times are medians over the timed steps after warm-up steps.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch
import yaml
from lightning_utilities.core.apply_func import apply_to_collection
from measure import CLOCKS, ROOT, PeakMemory, engine_version, machine, mb, ms, run_isolated, summary, sync, timed_runs

sys.path.insert(0, str(ROOT))

import lightning.pytorch as pl  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from drifting_lightning.checkpoints.loading import instantiate_section, read_run_config  # noqa: E402
from drifting_lightning.encoders.base import Identity  # noqa: E402

CONFIGS = ("configs/digits.yaml", "configs/fashion_mnist.yaml", "configs/fashion_mnist_mae.yaml")
IMAGENET = "configs/imagenet.yaml"
PARTS = ("generator", "encoder", "loss")
COLUMNS = ("generator fwd", "encoder fwd", "loss fwd", "encoder bwd", "generator bwd")
QUICK_GROUPS = {"classes_per_step": 2, "positives_per_class": 4, "unconditional_per_class": 2}


class _Captured(Exception):
    """Stops the captured training step at the loss call, before it needs a Trainer."""


def merged(base: dict, override: dict) -> dict:
    """``base`` with ``override`` merged in, dict by dict."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def write_config(
    config: str, folder: Path, quick: bool, imagenet_groups: int, compile_parts: list[str]
) -> tuple[Path, str]:
    """The config with the benchmark's overrides, written to ``folder`` -> (path, what was changed, in words)."""
    cfg = read_run_config(ROOT / config)
    model = cfg["model"]["init_args"]
    override: dict[str, Any] = {}
    notes = []
    if "encoder" in model:
        override = {"model": {"init_args": {"encoder": {"init_args": {"checkpoint": None}}}}}
        notes.append("encoder with random weights")
    groups = dict(QUICK_GROUPS) if quick else {}
    if config == IMAGENET:
        groups["classes_per_step"] = imagenet_groups
    if groups:
        override = merged(override, {"data": {"init_args": {"positives": {"init_args": groups}}}})
        notes.append(", ".join(f"{k} {v}" for k, v in groups.items()))
    if quick:
        override = merged(override, {"model": {"init_args": {"generated_per_group": 4}}})
        notes.append("generated_per_group 4")
    if compile_parts:
        override = merged(override, {"model": {"init_args": {"compile": compile_parts}}})
        notes.append(f"torch.compile: {' and '.join(compile_parts)} (the step; the parts alone run eager)")
    path = folder / Path(config).name
    path.write_text(yaml.safe_dump(merged(cfg, override)))
    return path, "; ".join(notes)


def autocast(spec: dict) -> AbstractContextManager:
    """The autocast of the config's trainer precision (bf16-mixed on the ImageNet config), for the parts."""
    device = torch.device(spec["device"])
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled="bf16" in str(spec["precision"]))


def tensors(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``obj`` (nested dicts, lists, tuples) with ``fn`` applied to every tensor in it."""
    return apply_to_collection(obj, torch.Tensor, fn)


def first(obj: Any, dims: int) -> Any:
    """Every tensor of ``obj`` cut to size 1 along its first ``dims`` dimensions (batch; class groups, samples)."""
    return tensors(obj, lambda t: t[(slice(0, 1),) * min(dims, t.dim())])


def synthetic_batch(cfg: dict, module: pl.LightningModule) -> dict[str, torch.Tensor]:
    """Gaussian stand-ins for a latent batch of the config's shapes (the latent cache is not needed to time a step)."""
    counts = cfg["data"]["init_args"]["positives"]["init_args"]
    g, gen = counts["classes_per_step"], module.generator
    shape = tuple(gen.sample_shape)
    return {
        "positives": torch.randn(g, counts["positives_per_class"], *shape),
        "labels": torch.randint(gen.num_classes, (g,)),
        "unconditional": torch.randn(g, counts["unconditional_per_class"], *shape),
    }


def capture(spec: dict, module: pl.LightningModule, device: torch.device) -> dict:
    """Draws a real batch, runs the module's training step up to its loss call and saves the inputs of every part."""
    draw: dict | None = None
    if spec["config"] == IMAGENET:
        batch = synthetic_batch(read_run_config(spec["path"]), module)
    else:
        data = instantiate_section(spec["path"], "data", pl.LightningDataModule)
        data.setup("fit")
        batches = iter(data.train_dataloader())
        draw = timed_runs(lambda: next(batches), torch.device("cpu"), 1, spec["repeats"], spec["clock"])
        batch = next(batches)
    seen: dict[str, Any] = {"encoder": []}

    def on_generator(_mod: torch.nn.Module, _args: tuple, kwargs: dict) -> None:
        seen["generator"] = tensors(kwargs, torch.Tensor.detach)

    def on_encoder(_mod: torch.nn.Module, args: tuple) -> None:
        seen["encoder"].append((args[0].detach(), args[0].requires_grad))

    def on_loss(_mod: torch.nn.Module, args: tuple) -> None:
        seen["loss"] = tensors(args, torch.Tensor.detach)
        raise _Captured

    module.generator.register_forward_pre_hook(on_generator, with_kwargs=True)
    module.encoder.register_forward_pre_hook(on_encoder)
    module.loss.register_forward_pre_hook(on_loss)
    try:
        with autocast(spec):
            module.training_step(tensors(batch, lambda t: t.to(device)), 0)
    except _Captured:
        pass
    torch.save({"batch": batch, **seen}, spec["capture"])
    gen = seen["loss"][0]
    return {
        "draw": draw,
        "generated": gen[next(iter(gen))].shape[:2].numel(),
        "features": len(gen),
        "feature_values": sum(v[0, 0].numel() for v in gen.values()),
        "params": sum(p.numel() for p in module.generator.parameters()),
        "encoder": not isinstance(module.encoder, Identity),
    }


class StepTimer(pl.Callback):
    """The time of every training step (batch start to the next batch start) and of each part inside it, from hooks
    on the module's generator, encoder and loss and Lightning's backward hooks; the peak memory from the first step on.

    Backward is split where the gradient reaches the generated samples: before, the encoder's backward (and the
    loss's own, a single multiply); after, the generator's.
    """

    def __init__(self, device: torch.device, clock: str) -> None:
        self.device, self.now = device, CLOCKS[clock]
        self.steps: list[dict[str, float]] = []
        self.current: dict[str, float] = dict.fromkeys(COLUMNS, 0.0)
        self.marks: dict[str, float] = {}
        self.memory = PeakMemory(device)

    def stamp(self) -> float:
        sync(self.device)
        return self.now()

    def on_fit_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        for name in ("generator", "encoder", "loss"):
            part = getattr(module, name)
            part.register_forward_pre_hook(lambda _m, _a, name=name: self.marks.update({name: self.stamp()}))
            part.register_forward_hook(lambda _m, _a, out, name=name: self.forward_done(name, out))

    def forward_done(self, name: str, out: Any) -> None:
        self.current[f"{name} fwd"] += self.stamp() - self.marks[name]
        if name == "generator" and out.requires_grad:
            out.register_hook(lambda _grad: self.marks.update({"samples grad": self.stamp()}))

    def on_before_backward(self, trainer: pl.Trainer, module: pl.LightningModule, loss: torch.Tensor) -> None:
        self.marks["backward"] = self.stamp()

    def on_after_backward(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self.current["encoder bwd"] += self.marks["samples grad"] - self.marks["backward"]
        self.current["generator bwd"] += self.stamp() - self.marks["samples grad"]

    def on_train_batch_start(self, trainer: pl.Trainer, module: pl.LightningModule, batch: Any, idx: int) -> None:
        if "step" in self.marks:
            self.steps.append({**self.current, "step": self.stamp() - self.marks["step"]})
            self.current = dict.fromkeys(COLUMNS, 0.0)
        else:
            self.memory.start()
        self.marks["step"] = self.stamp()

    def on_train_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self.memory.stop()


def step(spec: dict, module: pl.LightningModule, device: torch.device) -> dict:
    """``Trainer.fit`` on the captured batch: warm-up steps, then the timed ones (each up to the next batch start)."""
    batch = torch.load(spec["capture"], weights_only=True)["batch"]
    steps = spec["warmup"] + spec["repeats"] + 1
    timer = StepTimer(device, spec["clock"])
    trainer_cfg = read_run_config(spec["path"]).get("trainer", {})
    with tempfile.TemporaryDirectory() as tmp:
        trainer = pl.Trainer(
            accelerator=device.type, devices=1, precision=spec["precision"], max_steps=steps,
            gradient_clip_val=trainer_cfg.get("gradient_clip_val"),
            gradient_clip_algorithm=trainer_cfg.get("gradient_clip_algorithm"),
            logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            callbacks=[timer], default_root_dir=tmp,
        )  # fmt: skip
        trainer.fit(module, train_dataloaders=DataLoader([batch] * steps, batch_size=None))
    timed = timer.steps[spec["warmup"] :]
    rest = [s["step"] - sum(s[c] for c in COLUMNS) for s in timed]
    return {"step": summary([s["step"] for s in timed]), **{c: summary([s[c] for s in timed]) for c in COLUMNS},
            "rest": summary(rest), "base": timer.memory.base, "extra": timer.memory.extra}  # fmt: skip


def part_run(spec: dict, module: pl.LightningModule, saved: dict) -> Callable[[], None]:
    """Forward + backward of the part ``spec["phase"]`` on its captured inputs ``saved``."""
    if spec["phase"] == "generator":
        net, kwargs = module.generator, saved["generator"]

        def run_generator() -> None:
            net.zero_grad(set_to_none=True)
            with autocast(spec):
                out = net(**kwargs)
            out.backward(torch.ones_like(out))

        return run_generator
    if spec["phase"] == "encoder":
        calls = [(x.requires_grad_(grad), grad) for x, grad in saved["encoder"]]

        def run_encoder() -> None:
            outs = []
            with autocast(spec):
                for x, grad in calls:
                    x.grad = None
                    with torch.set_grad_enabled(grad):
                        feats = module.encoder(x)
                    if grad:
                        outs += list(feats.values())
            torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])

        return run_encoder
    gen, pos, neg, weights = saved["loss"]
    gen = {k: v.requires_grad_() for k, v in gen.items()}

    def run_loss() -> None:
        for v in gen.values():
            v.grad = None
        module.loss(gen, pos, neg, weights).loss.backward()

    return run_loss


def part(spec: dict, module: pl.LightningModule, device: torch.device) -> dict:
    """The peak memory of one part of the step alone, on its captured inputs."""
    saved = tensors(torch.load(spec["capture"], weights_only=True), lambda t: t.to(device))
    # A run on one sample (one class group of one sample for the loss) first: the process's one-time allocations
    # (autograd threads, kernel workspaces, about 20 MB) then fall before the baseline.
    small = {"generator": first(saved["generator"], 1), "encoder": first(saved["encoder"], 1),
             "loss": first(saved["loss"], 2)}  # fmt: skip
    part_run(spec, module, small)()
    run = part_run(spec, module, saved)
    with PeakMemory(device) as memory:
        for _ in range(2):  # the first run at full size, and one in the steady state
            run()
    return {"base": memory.base, "extra": memory.extra}


def worker(spec: dict) -> dict:
    # Lightning's banners ("GPU available", tips, "max_steps reached") would interleave with the tables.
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    torch.manual_seed(0)
    module = instantiate_section(spec["path"], "model", pl.LightningModule).to(device)
    if spec["phase"] == "capture":
        return capture(spec, module, device)
    if spec["phase"] == "step":
        return step(spec, module, device)
    return part(spec, module, device)


Row = dict[str, Any]


def step_rows(configs: list[str], args: argparse.Namespace, warmup: int, repeats: int) -> list[Row]:
    """A row per config: "config", "notes" (the benchmark's overrides, in words), "error" (None when measured) and,
    when measured: "generated" samples per step, "features" (feature sets), "feature_values" (per sample), "params"
    (generator), "draw" (one data batch, a ``summary`` of seconds; None for a synthetic batch), "step" (``summary`` of
    seconds), "parts" ({each of COLUMNS and "rest": ``summary`` of its seconds inside the step}), "base" (bytes in use
    at the start of the first step), "step_extra" (the step's peak extra bytes) and "part_extra" ({each of PARTS: its
    peak extra bytes alone; None when not measured: no encoder, or the part failed})."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for config in configs:
            path, notes = write_config(config, Path(tmp), args.quick, args.imagenet_groups, args.compile)
            precision = read_run_config(path).get("trainer", {}).get("precision", "32-true")
            spec = {"config": config, "path": str(path), "device": args.device, "threads": args.threads,
                    "clock": args.clock,
                    "warmup": warmup, "repeats": repeats, "precision": precision,
                    "capture": str(Path(tmp) / f"{path.stem}.pt")}  # fmt: skip
            row: Row = {"config": config, "notes": notes}
            info = run_isolated(worker, {**spec, "phase": "capture"})
            if "error" in info:
                rows.append({**row, "error": info["error"]})
                continue
            phases = ["step", *(p for p in PARTS if p != "encoder" or info["encoder"])]
            res = {p: run_isolated(worker, {**spec, "phase": p}) for p in phases}
            if "error" in res["step"]:
                rows.append({**row, "error": res["step"]["error"]})
                continue
            step = res["step"]
            rows.append({
                **row, "error": None, **{k: info[k] for k in ("generated", "features", "feature_values", "params")},
                "draw": info["draw"], "step": step["step"], "parts": {c: step[c] for c in (*COLUMNS, "rest")},
                "base": step["base"], "step_extra": step["extra"],
                "part_extra": {p: res[p]["extra"] if p in res and "error" not in res[p] else None for p in PARTS},
            })  # fmt: skip
    return rows


def share(result: dict, total: float) -> str:
    return f"{result['time'] * 1e3:,.1f} ({result['time'] / total:.0%})"


def print_tables(rows: list[Row], device: torch.device) -> None:
    """The two markdown tables of ``step_rows``: times inside the step, and peak memory."""
    print("Time inside the step, ms (share of the step's median): medians over the timed steps\n")
    print("| config | generated / step | feature sets (values / sample) | data batch ms | step ms (range) "
          + "".join(f"| {c} " for c in COLUMNS) + "| rest |")
    print("|---|---:|---:|---:|---:|" + "---:|" * (len(COLUMNS) + 1))
    for row in rows:
        name = f"{Path(row['config']).stem}" + (f" ({row['notes']})" if row["notes"] else "")
        if row["error"]:
            print(f"| {name} | failed: {row['error']} |" + " |" * (len(COLUMNS) + 4))
            continue
        total, parts = row["step"]["time"], row["parts"]
        draw = ms(row["draw"]) if row["draw"] else "synthetic"
        print(f"| {name} | {row['generated']:,} | {row['features']} ({row['feature_values']:,}) | {draw} "
              f"| {ms(row['step'])} " + "".join(f"| {share(parts[c], total)} " for c in COLUMNS)
              + f"| {share(parts['rest'], total)} |")  # fmt: skip
    what = "RSS" if device.type == "cpu" else "allocated"
    print(f"\nPeak memory, MB: {what} at the start of the first step, and the peak extra over the baseline\n")
    print(f"| config | generator params | {what} at step start | step peak extra | generator peak extra "
          "| encoder peak extra | drift loss peak extra |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        if row["error"]:
            continue
        extra = {p: "-" if b is None else mb(b) for p, b in row["part_extra"].items()}
        print(f"| {Path(row['config']).stem} | {row['params'] / 1e6:.2f}M | {mb(row['base'])} "
              f"| {mb(row['step_extra'])} | {extra['generator']} | {extra['encoder']} | {extra['loss']} |")


def main(argv: list[str] | None = None) -> list[Row]:
    """Prints both tables; returns their rows (``step_rows``)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="digits only, 2 class groups of 4 (smoke test)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: a shared CPU)")
    parser.add_argument("--clock", choices=list(CLOCKS), default="wall",
                        help="wall time, or the process's CPU time (a shared CPU, one thread)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed runs first (default 2, quick 1)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs (default 5, quick 2)")
    parser.add_argument("--imagenet", action="store_true",
                        help=f"add {IMAGENET} (DiT-B/2, ResNetMAE width 256; CUDA only)")
    parser.add_argument("--compile", nargs="+", default=[], choices=["generator", "loss"],
                        help="parts the step runs under torch.compile (the config's model.compile; default none)")
    parser.add_argument("--imagenet-groups", type=int, default=8,
                        help="class groups per step of the ImageNet row (default 8: one GPU's share of the paper's "
                             "N_c 64 over 8 GPUs)")  # fmt: skip
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.imagenet and device.type != "cuda":
        parser.error("--imagenet needs --device cuda (B/2 at the paper's batch does not fit a CPU benchmark)")
    if args.clock == "cpu" and (device.type == "cuda" or args.threads != 1):
        parser.error("--clock cpu measures one CPU thread's work: use it with --device cpu --threads 1")
    warmup = args.warmup if args.warmup is not None else 1 if args.quick else 2
    repeats = args.repeats or (2 if args.quick else 5)
    configs = list(CONFIGS[:1] if args.quick else CONFIGS + ((IMAGENET,) if args.imagenet else ()))

    print(f"training step benchmark, {time.strftime('%Y-%m-%d %H:%M')}, device {device} ({machine(device)}), "
          f"torch {torch.__version__}, engine {engine_version()}, {args.threads} torch thread(s), {args.clock} clock")
    print(f"median of {repeats} timed steps (range) after {warmup} warm-up step(s); every measurement in a fresh "
          "process\n")
    rows = step_rows(configs, args, warmup, repeats)
    print_tables(rows, device)
    print(f"\nload average {' '.join(f'{x:.1f}' for x in os.getloadavg())} at the end")
    return rows


if __name__ == "__main__":
    main()
