"""DDP and FSDP2 on 2 CPU processes (gloo), through the real `drifting fit` entry point in subprocesses.

How a 1-process run sees the same global batch as a 2-process run: every random draw that belongs to a class group
(its positives and unconditional items, its noise, its guidance scale) comes from a generator keyed by the group's
index in the global batch, and rank r of a run with Nc groups per rank holds groups r Nc ... r Nc + Nc - 1 of one
shared label permutation (``PositiveSource.step_labels``, ``DriftingModule._draw_group_inputs``). So digits with
``classes_per_step 5`` on 2 ranks draws, step for step, exactly what ``classes_per_step 10`` draws on one rank.
With the drift statistics S and lambda all-reduced (``distributed_statistics``) each rank's force is the one the
single process computes for the same groups, and DDP / FSDP2 average the gradients of per-rank means over half the
elements, which is the single process's mean: the runs agree up to the order of floating-point sums.

Tolerance: 1e-5 on every weight, EMA weight and optimiser moment. The difference is not zero, for a known reason:
the gradients are summed in another order (two partial sums, then the all-reduce), and AdamW divides by
sqrt(v) + eps, so for gradients that are mostly cancellation noise (|g| ~ 1e-10, below eps = 1e-8) a change delta in
the last bits becomes a weight change of about lr * delta / eps. With these settings the largest difference seen was
9e-8 (the control without all-reduced statistics: 1.6e-3). A run at lr 1e-3 showed 5e-6, in style-embedding rows
whose gradients were about 2e-10.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from drifting_lightning.models.dit import DiT
from drifting_lightning.module import DriftingModule
from drifting_lightning.parallel import shard_fsdp2
from drifting_lightning.sampling.guidance import GuidanceSampler
from drifting_lightning.sampling.positives import ClassAwareSampler, ClassQueue
from tests.integration.cli_helpers import REPO, run_drifting, run_drifting_subprocess

TOLERANCE = 1e-5
DDP = ["--trainer.strategy", "ddp"]
FSDP2 = [
    "--trainer.strategy", "ModelParallelStrategy",
    "--trainer.strategy.data_parallel_size", "2",
    "--trainer.strategy.tensor_parallel_size", "1",
    "--trainer.strategy.save_distributed_checkpoint", "false",
]  # fmt: skip
# A step moves weights by about lr; EMA 0.5 makes the EMA move as much, so both show any disagreement.
DIGITS = [
    "--config", str(REPO / "configs/digits.yaml"), "--trainer.max_steps", "3",
    "--model.init_args.warmup_steps", "0", "--model.init_args.lr", "5e-4", "--model.init_args.ema_decay", "0.5",
]  # fmt: skip


def fit(out: Path, devices: int, *args: str, in_process: bool = False, probe: dict | None = None):
    """`drifting fit` with a checkpoint at the end (``out/ckpt/last.ckpt``), a DistributedProbe writing
    ``out/probe/rank<r>.json``, no logger and no other callbacks; returns the finished process."""
    callbacks = [
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"dirpath": str(out / "ckpt"), "save_last": True, "every_n_train_steps": 1}},
        {"class_path": "tests.integration.distributed_probe.DistributedProbe",
         "init_args": {"out": str(out / "probe"), **(probe or {})}},
    ]  # fmt: skip
    argv = [
        "fit", *args, "--trainer.devices", str(devices), "--trainer.default_root_dir", str(out),
        "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false", "--trainer.callbacks", json.dumps(callbacks),
    ]  # fmt: skip
    return run_drifting(*argv) if in_process else run_drifting_subprocess(*argv)


def check(finished) -> None:
    assert finished.returncode == 0, finished.stderr[-3000:]


def probes(out: Path) -> list[dict]:
    """The DistributedProbe reports of every rank, by rank."""
    return [json.loads(path.read_text()) for path in sorted((out / "probe").glob("rank*.json"))]


def checkpoint(out: Path) -> dict:
    return torch.load(out / "ckpt" / "last.ckpt", map_location="cpu", weights_only=False)


def differences(a: dict, b: dict) -> dict[str, float]:
    """Largest absolute difference per part of two checkpoints: generator, EMA, optimiser moments; asserts that they
    hold the same tensors, steps and data-stream position."""
    assert a["global_step"] == b["global_step"]
    assert a["state_dict"].keys() == b["state_dict"].keys()
    data = [k for k in a if k.endswith("DataModule")]
    assert data and all(a[k] == b[k] for k in data)
    out = {}
    for part in ("generator.", "ema_generator."):
        keys = [k for k in a["state_dict"] if k.startswith(part)]
        assert keys
        out[part] = max((a["state_dict"][k] - b["state_dict"][k]).abs().max().item() for k in keys)
    sa, sb = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    assert sa.keys() == sb.keys() and len(sa) == len([k for k in a["state_dict"] if k.startswith("generator.")])
    for moment in ("exp_avg", "exp_avg_sq"):
        out[moment] = max((sa[i][moment] - sb[i][moment]).abs().max().item() for i in sa)
    assert all(float(sa[i]["step"]) == float(sb[i]["step"]) == a["global_step"] for i in sa)
    return out


@pytest.fixture(scope="module")
def digits_single(tmp_path_factory) -> Path:
    """The reference: digits, 10 class groups on one process, statistics "all-reduced" (a no-op on one rank)."""
    out = tmp_path_factory.mktemp("digits_single")
    check(fit(out, 1, *DIGITS, "--data.positives.init_args.classes_per_step", "10",
              "--model.loss.init_args.distributed_statistics", "true", in_process=True))  # fmt: skip
    return out


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_processes_equal_one_process_on_the_same_global_batch(digits_single: Path, tmp_path: Path, strategy):
    """DDP and FSDP2, 2 ranks x 5 class groups, S and lambda all-reduced == 1 rank x 10 groups: weights, EMA and
    optimiser moments in the checkpoints to 1e-5 (see the module docstring). Gradient clipping at the config's 2.0
    is active in every step (pre-clip norms near 3), so the clipping norm is the global one too. Under FSDP2 the
    generator is really sharded (DTensor parameters, about half the elements per rank) and the EMA is whole."""
    out = tmp_path / strategy
    check(fit(out, 2, *DIGITS, "--data.positives.init_args.classes_per_step", "5",
              "--model.loss.init_args.distributed_statistics", "true", *(DDP if strategy == "ddp" else FSDP2)))
    diffs = differences(checkpoint(digits_single), checkpoint(out))
    assert max(diffs.values()) < TOLERANCE, diffs

    (single,), (rank0, rank1) = probes(digits_single), probes(out)
    assert all(n > 2.0 for n in single["grad_norms"]) and len(single["grad_norms"]) == 3
    np.testing.assert_allclose(rank0["grad_norms"], single["grad_norms"], rtol=1e-5)
    assert rank0["grad_norms"] == rank1["grad_norms"]
    for report in (rank0, rank1):
        assert report["ema_numel"] == report["numel"] == single["numel"]
        if strategy == "fsdp2":
            assert all(report["dtensor"])
            assert abs(report["local_numel"] - report["numel"] / 2) < 0.01 * report["numel"]
        else:
            assert not any(report["dtensor"]) and report["local_numel"] == report["numel"]


@pytest.mark.slow
def test_without_all_reduced_statistics_two_processes_differ(digits_single: Path, tmp_path: Path):
    """The control: with per-rank S and lambda the same 2-process run is not the 1-process run (each rank normalises
    by its own half of the batch), by far more than the tolerance above."""
    check(fit(tmp_path, 2, *DIGITS, "--data.positives.init_args.classes_per_step", "5",
              "--model.loss.init_args.distributed_statistics", "false", *DDP))  # fmt: skip
    diffs = differences(checkpoint(digits_single), checkpoint(tmp_path))
    assert diffs["generator."] > 50 * TOLERANCE, diffs


TOY = ["--config", str(REPO / "configs/toy/two_moons.yaml"), "--trainer.max_steps", "3",
       "--model.init_args.ema_decay", "0.5"]  # fmt: skip


@pytest.fixture(scope="module")
def toy_ddp(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("toy_ddp")
    check(fit(out, 2, *TOY, *DDP))
    return out


@pytest.mark.slow
def test_toy_ddp_runs_with_whole_weights_on_every_rank(toy_ddp: Path):
    """Two moons under DDP: both ranks finish 3 steps with the whole generator and EMA, the same finite gradient
    norms (DDP's all-reduce), and a checkpoint at step 3."""
    rank0, rank1 = probes(toy_ddp)
    for report in (rank0, rank1):
        assert not any(report["dtensor"]) and report["local_numel"] == report["numel"] == report["ema_numel"]
    assert rank0["grad_norms"] == rank1["grad_norms"] and len(rank0["grad_norms"]) == 3
    assert all(np.isfinite(rank0["grad_norms"]))
    assert checkpoint(toy_ddp)["global_step"] == 3


@pytest.mark.slow
def test_toy_fsdp2_equals_ddp(toy_ddp: Path, tmp_path: Path):
    """Two moons on 2 ranks (one group per rank, positives from each rank's own stream): FSDP2 (the MLP sharded as
    one unit) reaches the weights, EMA and optimiser moments of DDP to 1e-5."""
    check(fit(tmp_path, 2, *TOY, *FSDP2))
    diffs = differences(checkpoint(toy_ddp), checkpoint(tmp_path))
    assert max(diffs.values()) < TOLERANCE, diffs
    for report in probes(tmp_path):
        assert all(report["dtensor"]) and report["local_numel"] < report["numel"] == report["ema_numel"]


@pytest.mark.slow
def test_sharded_fsdp2_checkpoint_exports_the_gathered_weights(tmp_path: Path):
    """FSDP2 with its default sharded save (a folder per checkpoint) and with the gathered save (one file): the same
    run, so both exports must hold the same EMA generator, and `drifting export` must read the folder."""
    from drifting_lightning.checkpoints.reading import is_distributed_checkpoint, read_checkpoint
    from drifting_lightning.export import export_generator

    sharded = [a if a != "false" else "true" for a in FSDP2]
    check(fit(tmp_path / "sharded", 2, *DIGITS, *sharded))
    check(fit(tmp_path / "whole", 2, *DIGITS, *FSDP2))
    folder, file = tmp_path / "sharded" / "ckpt" / "last.ckpt", tmp_path / "whole" / "ckpt" / "last.ckpt"
    assert is_distributed_checkpoint(folder) and file.is_file()
    assert read_checkpoint(folder)["global_step"] == checkpoint(tmp_path / "whole")["global_step"] == 3
    a = export_generator(folder, tmp_path / "export_sharded") / "generator.safetensors"
    b = export_generator(file, tmp_path / "export_whole") / "generator.safetensors"
    from safetensors.torch import load_file

    wa, wb = load_file(a), load_file(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.slow
def test_a_rank_that_dies_ends_the_job(tmp_path: Path):
    """Rank 1 exits abruptly at the start of step 2. Lightning does not replace it: rank 0's next collective fails
    (gloo: connection reset by peer), the command exits non-zero within seconds instead of waiting for the 30-min
    collective timeout, and the checkpoint of step 2 written before the failure is intact."""
    started = time.monotonic()
    finished = fit(tmp_path, 2, "--config", str(REPO / "configs/toy/two_moons.yaml"), "--trainer.max_steps", "5",
                   *DDP, probe={"die_rank": 1, "die_step": 2})  # fmt: skip
    elapsed = time.monotonic() - started
    assert finished.returncode != 0
    assert "error:" in finished.stderr, finished.stderr[-3000:]
    assert elapsed < 240
    assert checkpoint(tmp_path)["global_step"] == 2


# ---- the pieces that make a step independent of the number of ranks (in-process, fast) ----------------------------


@pytest.mark.parametrize("kind", [ClassAwareSampler, ClassQueue])
def test_positive_draws_do_not_depend_on_the_number_of_ranks(kind):
    """2 ranks x 3 groups draw, step for step, what 1 rank x 6 groups draws (6 <= 12 classes)."""
    labels = np.repeat(np.arange(12), 20)
    single = kind(classes_per_step=6, positives_per_class=4, unconditional_per_class=2, seed=3)
    single.setup(labels)
    ranks = [kind(classes_per_step=3, positives_per_class=4, unconditional_per_class=2, seed=3) for _ in range(2)]
    for r, source in enumerate(ranks):
        source.setup(labels, rank=r, world_size=2)
    for _ in range(4):
        whole, halves = single.draw(), [source.draw() for source in ranks]
        for field in range(3):
            assert torch.equal(whole[field], torch.cat([h[field] for h in halves]))


def test_group_noise_does_not_depend_on_the_number_of_ranks():
    """The module's per-group noise, style indices and guidance scales: rank 1 of 2 with 2 groups draws groups 2-3
    of what one rank with 4 groups draws; different groups (and so different ranks) draw different noise."""
    module = DriftingModule(DiT(preset="digits", hidden_size=32, num_heads=2), guidance=GuidanceSampler(),
                            generated_per_group=3)  # fmt: skip
    module._noise_seed = 11

    def draw(rank: int, groups: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        module._trainer = SimpleNamespace(global_rank=rank, global_step=5)
        return module._draw_group_inputs(groups, 3, use_guidance=True, batch_idx=5)

    alpha, inputs = draw(0, 4)
    alpha1, inputs1 = draw(1, 2)
    assert set(inputs) == {"noise", "style"}
    assert torch.equal(alpha1, alpha[2:])
    for key in inputs:
        assert torch.equal(inputs1[key], inputs[key][6:])
    assert not torch.equal(inputs["noise"][:3], inputs["noise"][3:6])


def test_tensor_parallel_mesh_is_refused_with_the_flags_to_set():
    """ModelParallelStrategy's defaults put the devices of a node on the tensor-parallel axis; the generators have no
    tensor parallelism, so sharding must refuse such a mesh and name the flags that fix it."""

    class Mesh:
        mesh_dim_names = ("data_parallel", "tensor_parallel")

        def __getitem__(self, name: str) -> SimpleNamespace:
            return SimpleNamespace(size=lambda: 2 if name == "tensor_parallel" else 1)

        def size(self) -> int:
            return 2

    with pytest.raises(ValueError, match="data_parallel_size=2 --trainer.strategy.tensor_parallel_size=1"):
        shard_fsdp2(torch.nn.Linear(2, 2), Mesh())


@pytest.mark.parametrize(("strategy", "accumulate"), [
    ("ddp", 1), pytest.param("fsdp2", 1, marks=pytest.mark.slow), pytest.param("ddp", 2, marks=pytest.mark.slow),
])  # fmt: skip
def test_a_nonfinite_loss_on_one_rank_is_skipped_on_every_rank(tmp_path: Path, strategy, accumulate):
    """model.nonfinite=skip, 2 ranks, rank 1's drift loss NaN in the first batch of step 1 only (Lightning refuses a
    None loss on more than one rank): the run finishes its 3 steps, both ranks skip step 1 (weights and EMA as after
    step 0, the same on both ranks, the gradient NaN on both after the all-reduce), steps 0 and 2 move them, the skip
    is reported once and counted once, and AdamW counts 2 steps. With 2 batches accumulated per step, the NaN batch
    is the first one (DDP's no_sync): the whole step is skipped, and only once."""
    finished = fit(tmp_path, 2, "--config", str(REPO / "configs/toy/two_moons.yaml"), "--trainer.max_steps", "3",
                   "--trainer.accumulate_grad_batches", str(accumulate), "--model.init_args.nonfinite", "skip",
                   "--model.init_args.max_consecutive_skips", "2", "--model.init_args.generated_per_group", "32",
                   "--data.init_args.positives_per_step", "32", "--model.init_args.generator.init_args.hidden", "[32]",
                   *(DDP if strategy == "ddp" else FSDP2), probe={"nan_rank": 1, "nan_batch": accumulate})  # fmt: skip
    check(finished)
    rank0, rank1 = probes(tmp_path)
    assert rank0["digests"] == rank1["digests"] and len(rank0["digests"]) == 3 * accumulate
    after = rank0["digests"][accumulate - 1 :: accumulate]  # after each optimiser step
    for part in (0, 1):  # generator, EMA
        assert after[0][part] == after[1][part] != after[2][part]
    norms = np.array([rank0["grad_norms"], rank1["grad_norms"]])
    assert np.isnan(norms[:, 1]).all() and np.isfinite(norms[:, [0, 2]]).all()
    assert finished.stdout.count("NaN/Inf in the drift loss at step 1: step skipped") == 1
    assert finished.stdout.count("NaN/Inf in") == 1
    # under accumulation the whole step is skipped on several processes, not only the NaN batch
    summary = ("1 of 3 steps skipped" if accumulate == 1
               else "skipped (NaN/Inf, model.nonfinite=skip): 0 of 6 batches, 1 of 3 optimiser steps")
    assert f"[drifting] {summary}" in finished.stdout
    saved = checkpoint(tmp_path)
    assert saved["global_step"] == 3
    assert all(float(s["step"]) == 2 for s in saved["optimizer_states"][0]["state"].values())
