"""Training throughput of the digits config on 1 vs 2 processes (DDP and FSDP2 over gloo on the CPU).

    python benchmarks/scaling.py                     # every run below, 40 steps each: minutes on a 2-core CPU
    python benchmarks/scaling.py --runs single ddp   # a subset
    python benchmarks/scaling.py --steps 3 --skip 1 --runs single   # smoke test

Each run is a real ``drifting fit --config configs/digits.yaml`` in a fresh process (Lightning launches the second
rank itself), with no logger, checkpoints or evaluation callbacks, and a ``StepTimer`` callback added on the command
line. Throughput = generated samples of the global batch per step (ranks x class groups per rank x
generated_per_group) / median time between consecutive step starts on rank 0, over the steps after ``--skip``
warm-up steps. Runs (OMP_NUM_THREADS = threads per process):
- single: 1 process, 1 thread, 10 class groups (the config's batch);
- single_2threads: 1 process, 2 threads, 10 groups: what the second core buys without distribution;
- ddp: 2 processes x 1 thread, 5 groups per rank: the same global batch split over ranks (strong scaling);
- ddp_weak: 2 processes x 1 thread, 10 groups per rank: the per-rank batch kept, the global batch doubled;
- fsdp2: as ddp, with ModelParallelStrategy (FSDP2) sharding the generator.
The drift statistics are all-reduced in every run (``distributed_statistics``), so ddp and fsdp2 compute the single
run's steps. The load average before and after each run is printed: other jobs on the machine slow every run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl

ROOT = Path(__file__).resolve().parents[1]

RUNS: dict[str, dict[str, Any]] = {
    "single": {"devices": 1, "threads": 1, "groups": 10, "strategy": []},
    "single_2threads": {"devices": 1, "threads": 2, "groups": 10, "strategy": []},
    "ddp": {"devices": 2, "threads": 1, "groups": 5, "strategy": ["--trainer.strategy", "ddp"]},
    "ddp_weak": {"devices": 2, "threads": 1, "groups": 10, "strategy": ["--trainer.strategy", "ddp"]},
    "fsdp2": {
        "devices": 2, "threads": 1, "groups": 5,
        "strategy": ["--trainer.strategy", "ModelParallelStrategy", "--trainer.strategy.data_parallel_size", "2",
                     "--trainer.strategy.tensor_parallel_size", "1"],
    },
}  # fmt: skip


class StepTimer(pl.Callback):
    """On global rank 0: the start time of every training step and the global generated samples per step, written
    to ``out`` as JSON when training ends."""

    def __init__(self, out: str) -> None:
        self.out = out
        self.starts: list[float] = []
        self.samples_per_step = 0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, *args: Any) -> None:
        self.starts.append(time.perf_counter())
        self.samples_per_step = trainer.world_size * batch["positives"].shape[0] * pl_module.hparams.generated_per_group

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            self.starts.append(time.perf_counter())
            Path(self.out).write_text(json.dumps({"starts": self.starts, "samples_per_step": self.samples_per_step}))


def measure(name: str, steps: int, skip: int, workdir: Path) -> dict[str, Any]:
    """One run of ``RUNS[name]`` -> its spec plus seconds per step (median) and samples/s."""
    spec = RUNS[name]
    out = workdir / f"{name}.json"
    callbacks = [{"class_path": "scaling.StepTimer", "init_args": {"out": str(out)}}]
    argv = [
        sys.executable, "-m", "drifting_lightning", "fit", "--config", str(ROOT / "configs/digits.yaml"),
        "--trainer.devices", str(spec["devices"]), "--trainer.max_steps", str(steps),
        "--trainer.default_root_dir", str(workdir / name), "--trainer.logger", "false",
        "--trainer.enable_checkpointing", "false", "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false", "--trainer.callbacks", json.dumps(callbacks),
        "--data.positives.init_args.classes_per_step", str(spec["groups"]),
        "--model.loss.init_args.distributed_statistics", "true", *spec["strategy"],
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]), HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "benchmarks")]))  # fmt: skip
    load_before = os.getloadavg()[0]
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"run {name!r} failed:\n{done.stderr[-3000:]}")
    timing = json.loads(out.read_text())
    gaps = [b - a for a, b in zip(timing["starts"], timing["starts"][1:])][skip:]
    if not gaps:
        raise ValueError(f"--steps {steps} leaves no timed step after --skip {skip}")
    per_step = statistics.median(gaps)
    return {
        "run": name, **{k: v for k, v in spec.items() if k != "strategy"},
        "samples_per_step": timing["samples_per_step"], "s_per_step": per_step,
        "samples_per_s": timing["samples_per_step"] / per_step, "timed_steps": len(gaps),
        "load_before": load_before, "load_after": os.getloadavg()[0],
    }  # fmt: skip


def table(rows: list[dict[str, Any]]) -> str:
    base = next((r["samples_per_s"] for r in rows if r["run"] == "single"), None)
    lines = [
        "| run | processes x threads | groups per rank | generated per step | s/step (median) | samples/s "
        "| vs single | load before/after |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        ratio = f"{r['samples_per_s'] / base:.2f}x" if base else "-"
        lines.append(
            f"| {r['run']} | {r['devices']} x {r['threads']} | {r['groups']} | {r['samples_per_step']} "
            f"| {r['s_per_step']:.3f} | {r['samples_per_s']:,.0f} | {ratio} "
            f"| {r['load_before']:.1f} / {r['load_after']:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", nargs="+", choices=list(RUNS), default=list(RUNS))
    parser.add_argument("--steps", type=int, default=40, help="training steps per run")
    parser.add_argument("--skip", type=int, default=5, help="warm-up steps left out of the timing")
    parser.add_argument("--json", type=Path, help="also write the rows to this file")
    args = parser.parse_args(argv)
    print(f"digits config, {args.steps} steps per run, timing after {args.skip}; {platform.processor() or 'cpu'}, "
          f"{os.cpu_count()} logical CPUs, {time.strftime('%Y-%m-%d %H:%M')}", flush=True)  # fmt: skip
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.runs:
            rows.append(measure(name, args.steps, args.skip, Path(tmp)))
            print(f"  {name}: {rows[-1]['samples_per_s']:,.0f} samples/s", flush=True)
    print(table(rows))
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
