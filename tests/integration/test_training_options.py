"""Training options and failures of DriftingModule: bf16-mixed with a float32 drift loss, matmul precision,
torch.compile and activation checkpointing from YAML, NaN/Inf gradients by policy, out-of-memory advice."""

from __future__ import annotations

import re
import time
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml
from torch.utils.data import DataLoader, IterableDataset

import drifting_lightning.models.dit as dit
from drifting_lightning.checkpoints.loading import instantiate_section
from drifting_lightning.drift import DriftingLoss
from drifting_lightning.models.mlp import MLPGenerator
from drifting_lightning.module import DriftingModule
from drifting_lightning.step_failures import NonFiniteLossError


class _Batches(IterableDataset):
    def __init__(self, steps: int) -> None:
        self.steps = steps

    def __iter__(self):
        g = torch.Generator().manual_seed(0)
        for _ in range(self.steps):
            yield {"positives": torch.randn(1, 8, 2, generator=g)}


def _fit(module: DriftingModule, tmp_path: Path, steps: int = 2, **trainer_args) -> pl.Trainer:
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                         **trainer_args)  # fmt: skip
    batches = steps * trainer_args.get("accumulate_grad_batches", 1)
    trainer.fit(module, DataLoader(_Batches(batches), batch_size=None))
    return trainer


class _Spy(DriftingLoss):
    """Records the dtype of the generated features, the loss and the matmul precision inside the loss."""

    seen: list = []

    def forward(self, gen, pos, neg=None, neg_weights=None):
        out = super().forward(gen, pos, neg, neg_weights)
        self.seen.append((gen["raw"].dtype, out.loss.dtype, torch.get_float32_matmul_precision()))
        return out


def test_bf16_mixed_generator_with_float32_drift_loss(tmp_path: Path):
    _Spy.seen = []
    module = DriftingModule(MLPGenerator(hidden=[32]), loss=_Spy(), generated_per_group=8)
    _fit(module, tmp_path, precision="bf16-mixed")
    assert [s[:2] for s in _Spy.seen] == [(torch.bfloat16, torch.float32)] * 2
    assert all(p.dtype == torch.float32 for p in module.generator.parameters())  # master weights stay float32


class _ImageBatches(IterableDataset):
    def __iter__(self):
        g = torch.Generator().manual_seed(0)
        for _ in range(2):
            yield {"positives": torch.randn(2, 4, 4, 8, 8, generator=g), "labels": torch.tensor([0, 1])}


@pytest.mark.parametrize(("precision", "dtype"), [("bf16-true", torch.bfloat16), ("64-true", torch.float64)])
def test_true_precisions_train_and_sample_a_dit(tmp_path: Path, precision: str, dtype: torch.dtype):
    """Under "-true" precisions the weights themselves are bf16 or float64: DiT's float32 noise and condition
    features, and the drift loss's float32 bookkeeping (made while the default dtype is the run's), must follow."""
    _Spy.seen = []
    generator = dit.DiT("tiny", input_size=8, depth=1)
    module = DriftingModule(generator, loss=_Spy(), generated_per_group=4)
    trainer = pl.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                         precision=precision)  # fmt: skip
    trainer.fit(module, DataLoader(_ImageBatches(), batch_size=None))
    assert [s[:2] for s in _Spy.seen] == [(dtype, torch.float32)] * 2
    assert all(p.dtype == dtype for p in module.generator.parameters())
    samples = module.sample(3)  # outside the trainer's forward context, as the sample callbacks and `sample` call it
    assert samples.shape == (3, 4, 8, 8) and samples.dtype == dtype and torch.isfinite(samples).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_an_mlp_with_true_precision_weights_takes_float32_noise(dtype: torch.dtype):
    generator = MLPGenerator(hidden=[8], num_classes=2).to(dtype)  # as a "-true" precision leaves it
    out = generator(torch.randn(3, 32), labels=torch.tensor([0, 1, 0]), alpha=torch.ones(3))
    assert out.dtype == dtype and out.shape == (3, 2)


@pytest.mark.parametrize(("args", "message"), [
    ({"hidden": [8, 0]}, "hidden must be >= 1 (a layer's width), got [8, 0]"),
    ({"noise_dim": 0}, "noise_dim must be >= 1"),
    ({"num_classes": -1}, "num_classes must be >= 0"),
])  # fmt: skip
def test_an_mlp_refuses_empty_layers(args: dict, message: str):
    with pytest.raises(ValueError, match=re.escape(message)):
        MLPGenerator(**args)


class _SlowCallback(pl.Callback):
    def on_train_batch_end(self, *args) -> None:
        time.sleep(0.5)  # an evaluation at the end of the step


def test_samples_per_second_leave_out_the_callbacks_at_the_step_end(tmp_path: Path):
    module = DriftingModule(MLPGenerator(hidden=[32]), generated_per_group=8)
    trainer = _fit(module, tmp_path, steps=3, callbacks=[_SlowCallback()])
    assert trainer.callback_metrics["train/samples_per_s"] > 8 / 0.5  # one group of 8 in well under the 0.5 s


def test_drift_loss_runs_at_highest_matmul_precision_whatever_the_run_sets(tmp_path: Path):
    before = torch.get_float32_matmul_precision()
    try:
        _Spy.seen = []
        module = DriftingModule(MLPGenerator(hidden=[32]), loss=_Spy(), generated_per_group=8,
                                float32_matmul_precision="medium")  # fmt: skip
        _fit(module, tmp_path, steps=1)
        assert torch.get_float32_matmul_precision() == "medium"  # set for the run by setup()
        assert _Spy.seen[0][2] == "highest"
    finally:
        torch.set_float32_matmul_precision(before)
    with pytest.raises(ValueError, match="float32_matmul_precision"):
        DriftingModule(MLPGenerator(), float32_matmul_precision="fast")


def test_compile_option_compiles_the_named_parts(monkeypatch):
    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *a, **k: compiled.append(self))
    module = DriftingModule(MLPGenerator(), compile=["generator", "loss"])
    module.setup("fit")
    assert compiled == [module.generator, module.loss]
    with pytest.raises(ValueError, match="compile takes 'generator' and/or 'loss'"):
        DriftingModule(MLPGenerator(), compile=["encoder"])


@pytest.mark.slow
def test_compiled_training_matches_eager(tmp_path: Path):
    """Two real compiled steps on CPU (inductor needs a C++ compiler; about a minute)."""
    states = []
    for parts in ((), ("generator", "loss")):
        pl.seed_everything(0)
        module = DriftingModule(MLPGenerator(hidden=[32]), generated_per_group=8, compile=parts)
        _fit(module, tmp_path)
        states.append(module.generator.state_dict())
    for key, value in states[0].items():
        torch.testing.assert_close(states[1][key], value, rtol=1e-5, atol=1e-6)


def test_activation_checkpointing_and_compile_are_reachable_from_yaml(tmp_path: Path, monkeypatch):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"model": {"class_path": "DriftingModule", "init_args": {
        "generator": {"class_path": "DiT", "init_args": {"preset": "digits", "hidden_size": 32, "depth": 2,
                                                         "num_heads": 2, "gradient_checkpointing": True}},
        "generated_per_group": 4, "compile": ["generator"]}}}))  # fmt: skip
    module = instantiate_section(config, "model", pl.LightningModule)
    assert module.generator.gradient_checkpointing and list(module.hparams.compile) == ["generator"]

    calls = []

    def counting_checkpoint(block, *args, **kwargs):
        calls.append(block)
        return torch.utils.checkpoint.checkpoint(block, *args, **kwargs)

    monkeypatch.setattr(dit, "checkpoint", counting_checkpoint)
    module.trainer = pl.Trainer(accelerator="cpu", logger=False)
    module.log = module.log_dict = lambda *args, **kwargs: None
    batch = {"positives": torch.rand(2, 3, 1, 8, 8) * 2 - 1, "labels": torch.tensor([1, 7])}
    module.training_step(batch, 0).backward()
    assert len(calls) == 2  # each DiT block recomputed in the backward pass
    assert all(p.grad is not None for p in module.generator.parameters() if p.requires_grad)


def _nan_gradients(module: DriftingModule) -> None:
    first = next(module.generator.parameters())
    first.register_hook(lambda grad: grad * float("nan"))


def test_nonfinite_gradients_stop_with_the_tensor_names_and_the_weights_before(tmp_path: Path):
    module = DriftingModule(MLPGenerator(hidden=[32]), generated_per_group=8)
    before = {k: v.clone() for k, v in module.generator.state_dict().items()}
    _nan_gradients(module)
    with pytest.raises(NonFiniteLossError, match=r"NaN/Inf in the gradients at step 0\..*nonfinite-step0\.ckpt.*"
                                                 r"NaN/Inf in 1 of 4 tensors: body\.0\.weight"):  # fmt: skip
        _fit(module, tmp_path)
    saved = torch.load(tmp_path / "nonfinite-step0.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    assert all(torch.equal(saved[f"generator.{k}"], v) for k, v in before.items())


def test_nonfinite_gradients_skip_policy_leaves_the_weights_and_the_ema(tmp_path: Path, capsys):
    module = DriftingModule(MLPGenerator(hidden=[32]), generated_per_group=8, nonfinite="skip", ema_decay=0.5)
    with torch.no_grad():  # an EMA apart from the weights, which an update would move
        torch._foreach_add_(list(module.ema_generator.parameters()), 1.0)
    before = {k: v.clone() for k, v in module.generator.state_dict().items()}
    ema = {k: v.clone() for k, v in module.ema_generator.state_dict().items()}
    _nan_gradients(module)
    _fit(module, tmp_path)
    assert all(torch.equal(module.generator.state_dict()[k], v) for k, v in before.items())
    assert all(torch.equal(module.ema_generator.state_dict()[k], v) for k, v in ema.items())
    assert capsys.readouterr().out.count("NaN/Inf in the gradients at step") == 2

    finite = DriftingModule(MLPGenerator(hidden=[32]), generated_per_group=8, nonfinite="skip")
    start = {k: v.clone() for k, v in finite.generator.state_dict().items()}
    _fit(finite, tmp_path)  # the same steps with finite gradients do move the weights
    assert not torch.equal(finite.generator.state_dict()["head.weight"], start["head.weight"])


def test_a_step_the_grad_scaler_skips_leaves_the_ema(tmp_path: Path):
    """16-mixed: Inf gradients make the GradScaler skip the optimiser step (and halve its scale); the EMA must not
    move toward weights that did not change. The next, finite step updates both."""
    from lightning.pytorch.plugins import MixedPrecision

    module = DriftingModule(MLPGenerator(hidden=[32]), generated_per_group=8, ema_decay=0.5)
    with torch.no_grad():  # an EMA apart from the weights, which an update would move
        torch._foreach_add_(list(module.ema_generator.parameters()), 1.0)
    ema = {k: v.clone() for k, v in module.ema_generator.state_dict().items()}
    calls = []

    def inf_first(grad):
        calls.append(1)
        return grad * float("inf") if len(calls) == 1 else grad

    next(module.generator.parameters()).register_hook(inf_first)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    trainer = _fit(module, tmp_path, steps=1, plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    assert trainer.precision_plugin.scaler.get_scale() == 512.0  # the scaler did skip
    assert all(torch.equal(module.ema_generator.state_dict()[k], v) for k, v in ema.items())
    _fit(module, tmp_path, steps=1, plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    assert not torch.equal(module.ema_generator.state_dict()["head.weight"], ema["head.weight"])


class _NaNOnCall(DriftingLoss):
    """The drift loss, NaN on the calls numbered in ``nan_calls`` (counted from 1)."""

    def __init__(self, nan_calls) -> None:
        super().__init__()
        self.nan_calls, self.calls = set(nan_calls), 0

    def forward(self, gen, pos, neg=None, neg_weights=None):
        out = super().forward(gen, pos, neg, neg_weights)
        self.calls += 1
        if self.calls in self.nan_calls:
            out.loss = out.loss * float("nan")
        return out


@pytest.mark.parametrize(("nan_calls", "moves"), [({2}, True), ({1, 2}, False)])
def test_accumulation_skips_a_nan_batch_and_the_ema_follows_the_weights(tmp_path: Path, capsys, nan_calls, moves):
    """Two batches per optimiser step, a NaN loss skipped on the last: the optimiser still applies the first
    batch's gradients, and the EMA follows those weights. With both batches skipped, neither moves. The messages
    count batches, not steps."""
    module = DriftingModule(MLPGenerator(hidden=[32]), loss=_NaNOnCall(nan_calls), generated_per_group=8,
                            nonfinite="skip", ema_decay=0.5)  # fmt: skip
    with torch.no_grad():  # an EMA apart from the weights: an update moves it
        torch._foreach_add_(list(module.ema_generator.parameters()), 1.0)
    weights = {k: v.clone() for k, v in module.generator.state_dict().items()}
    ema = {k: v.clone() for k, v in module.ema_generator.state_dict().items()}
    _fit(module, tmp_path, steps=1, accumulate_grad_batches=2)
    assert module.loss.calls == 2
    head = "head.weight"
    assert torch.equal(module.generator.state_dict()[head], weights[head]) is not moves
    assert torch.equal(module.ema_generator.state_dict()[head], ema[head]) is not moves
    if moves:  # lerp with weight 1 - decay = 0.5 toward the new weights
        expected = (ema[head] + module.generator.state_dict()[head]) / 2
        torch.testing.assert_close(module.ema_generator.state_dict()[head], expected)
    out = capsys.readouterr().out
    assert out.count("NaN/Inf in the drift loss at step 0: batch skipped") == len(nan_calls)
    assert (f"[drifting] skipped (NaN/Inf, model.nonfinite=skip): {len(nan_calls)} of 2 batches, "
            "0 of 1 optimiser steps") in out


def test_accumulation_counts_skipped_gradients_in_optimiser_steps(tmp_path: Path, capsys):
    """NaN gradients under accumulation skip optimiser steps: 2 of 2, not 2 of the 4 batches."""
    module = DriftingModule(MLPGenerator(hidden=[32]), generated_per_group=8, nonfinite="skip")
    _nan_gradients(module)
    _fit(module, tmp_path, steps=2, accumulate_grad_batches=2)
    out = capsys.readouterr().out
    assert out.count("NaN/Inf in the gradients at step") == 2
    assert "skipped (NaN/Inf, model.nonfinite=skip): 0 of 4 batches, 2 of 2 optimiser steps" in out


def test_skip_policy_stops_after_max_consecutive_skips_like_stop(tmp_path: Path, capsys):
    module = DriftingModule(MLPGenerator(hidden=[32]), generated_per_group=8, nonfinite="skip",
                            max_consecutive_skips=2)  # fmt: skip
    before = {k: v.clone() for k, v in module.generator.state_dict().items()}
    _nan_gradients(module)
    message = r"NaN/Inf in the gradients for 2 steps in a row \(model\.max_consecutive_skips\) at step 1\..*step1\.ckpt"
    with pytest.raises(NonFiniteLossError, match=message):
        _fit(module, tmp_path, steps=5)
    assert capsys.readouterr().out.count("step skipped") == 2
    saved = torch.load(tmp_path / "nonfinite-step1.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    assert all(torch.equal(saved[f"generator.{k}"], v) for k, v in before.items())


def test_a_finite_step_resets_the_consecutive_skips(tmp_path: Path, capsys):
    """NaN gradients on every other step: never 2 in a row, so the run ends and reports 2 of 4 skipped."""
    module = DriftingModule(MLPGenerator(hidden=[32]), generated_per_group=8, nonfinite="skip",
                            max_consecutive_skips=2)  # fmt: skip
    calls = []

    def every_other(grad):
        calls.append(1)
        return grad * float("nan") if len(calls) % 2 else grad

    next(module.generator.parameters()).register_hook(every_other)
    _fit(module, tmp_path, steps=4)
    assert "[drifting] 2 of 4 steps skipped (NaN/Inf, model.nonfinite=skip)" in capsys.readouterr().out


def test_clipping_reuses_the_checked_norm_as_torch_clips(tmp_path: Path):
    """With gradient clipping the module scales by the norm its non-finite check computed: the same gradients
    as torch.nn.utils.clip_grad_norm_."""
    module = DriftingModule(MLPGenerator(hidden=[32]), generated_per_group=8)
    seen = {}

    class Record(pl.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            seen["raw"] = [p.grad.clone() for p in pl_module.generator.parameters()]

    original = module.configure_gradient_clipping

    def clip_and_record(optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        original(optimizer, gradient_clip_val, gradient_clip_algorithm)
        seen["clipped"] = [p.grad.clone() for p in module.generator.parameters()]

    module.configure_gradient_clipping = clip_and_record
    _fit(module, tmp_path, steps=1, gradient_clip_val=1e-3, callbacks=[Record()])
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in seen["raw"]]
    for p, g in zip(params, seen["raw"], strict=True):
        p.grad = g.clone()
    total = torch.nn.utils.clip_grad_norm_(params, 1e-3)
    assert total > 1e-3  # clipping was active
    for p, got in zip(params, seen["clipped"], strict=True):
        torch.testing.assert_close(got, p.grad, rtol=0, atol=0)


class _OutOfMemory(MLPGenerator):
    def forward(self, noise, labels=None, alpha=None):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (GPU 0; 79.1 GiB total)")


def test_out_of_memory_names_the_step_sizes_and_what_to_lower(tmp_path: Path):
    module = DriftingModule(_OutOfMemory(), generated_per_group=8)
    with pytest.raises(torch.OutOfMemoryError) as err:
        _fit(module, tmp_path)
    message = str(err.value)
    assert message.startswith("out of memory in training step 0 (CUDA out of memory. Tried to allocate 20.00 GiB")
    assert "1 class group(s) with N_pos=8 positives, N_unc=0 unconditional samples and N_neg=8 generated" in message
    for key in ("model.generated_per_group", "positives_per_class", "positives_per_step",
                "model.loss.init_args.max_chunk_elements (now None)", "trainer.precision bf16-mixed"):  # fmt: skip
        assert key in message, key
