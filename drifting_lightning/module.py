"""DriftingModule: draw -> generate -> encode -> drift loss -> step, with EMA and one-step sampling (DESIGN.md)."""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, SingleDeviceStrategy
from torch import Tensor
from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

from drifting_lightning.checkpoints.states import check_state_fits
from drifting_lightning.drift.loss import DriftingLoss
from drifting_lightning.encoders.base import FeatureEncoder, Identity
from drifting_lightning.fit_checks import check_parts_fit
from drifting_lightning.models.base import Generator
from drifting_lightning.models.vae import LatentDecoder
from drifting_lightning.parallel import clip_fsdp_gradients, full_parameters, shard_fsdp2, wrap_fsdp
from drifting_lightning.rng import torch_generator
from drifting_lightning.sampling.guidance import GuidanceSampler, guidance_weight
from drifting_lightning.sampling.labels import balanced_labels
from drifting_lightning.step_failures import SkipTally, nonfinite_error, oom_advice


class DriftingModule(pl.LightningModule):
    """Trains a one-step generator with the drifting loss.

    generator: f(noise, labels, alpha); loss: DriftingLoss (default: the paper's); encoder: feature encoder
    (default Identity: raw samples as one vector); guidance: alpha sampler used when batches carry unconditional
    negatives (PAPER.md 5). generated_per_group: N_neg, generated samples per class group.
    Optimiser: AdamW(lr, betas, weight_decay), linear warmup over ``warmup_steps`` then constant (paper Table 8).
    ema_decay: EMA of the generator, updated after every optimiser step that is not skipped, used for ``sample`` and
    evaluation. vae: local path (or, with vae_allow_hub, a hub id) of the VAE whose latents the generator makes:
    ``decoder`` (None for a pixel run) decodes them for metrics.
    nonfinite: "stop" (save ``nonfinite-step<k>.ckpt`` with the last finite weights and raise) or "skip" (skip the
    step) on a NaN/Inf loss or gradient (gradients are checked before clipping, except under 16-mixed, whose gradient
    scaler skips such steps itself). Under "skip", ``max_consecutive_skips`` skipped steps in a row stop the run as
    "stop" does, and the end of training prints how many steps were skipped (under gradient accumulation: batches,
    a NaN loss on one process, and optimiser steps, NaN gradients or a NaN loss on several processes).
    compile: parts to ``torch.compile`` (``nn.Module.compile``, in place: checkpoints keep their keys), any of
    "generator", "loss". float32_matmul_precision: ``torch.set_float32_matmul_precision`` for the run; "auto" is
    "high" (TF32) on CUDA and leaves other devices alone. The drift loss always runs at "highest".
    init_from: an export folder (``drifting export``, ``drifting import-official``) whose weights start the generator
    and its EMA; the generator's arguments must build the same architecture (its config.json records them).
    """

    def __init__(
        self,
        generator: Generator,
        loss: DriftingLoss | None = None,
        encoder: FeatureEncoder | None = None,
        guidance: GuidanceSampler | None = None,
        generated_per_group: int = 64,
        lr: float = 2e-4,
        betas: tuple[float, float] = (0.9, 0.95),
        weight_decay: float = 0.01,
        warmup_steps: int = 0,
        ema_decay: float = 0.999,
        nonfinite: Literal["stop", "skip"] = "stop",
        max_consecutive_skips: int = 10,
        vae: str | None = None,
        vae_allow_hub: bool = False,
        vae_dtype: str = "float32",
        compile: Sequence[Literal["generator", "loss"]] = (),
        float32_matmul_precision: Literal["auto", "highest", "high", "medium"] = "auto",
        init_from: str | None = None,
    ) -> None:
        super().__init__()
        if generated_per_group < 1:
            raise ValueError(f"generated_per_group must be >= 1, got {generated_per_group}")
        if not lr > 0:  # AdamW would refuse it at the first step, without naming the key
            raise ValueError(f"lr must be > 0, got {lr}")
        if not weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {list(betas)}")
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must lie in [0, 1), got {ema_decay}")
        if nonfinite not in ("stop", "skip"):
            raise ValueError(f"nonfinite must be 'stop' or 'skip', got {nonfinite!r}")
        if max_consecutive_skips < 1:
            raise ValueError(f"max_consecutive_skips must be >= 1, got {max_consecutive_skips}")
        if not set(compile) <= {"generator", "loss"}:
            raise ValueError(f"compile takes 'generator' and/or 'loss', got {list(compile)}")
        if float32_matmul_precision not in ("auto", "highest", "high", "medium"):
            raise ValueError(
                f"float32_matmul_precision must be auto, highest, high or medium, got {float32_matmul_precision!r}"
            )
        self.save_hyperparameters(ignore=["generator", "loss", "encoder", "guidance"])
        if init_from is not None:
            from drifting_lightning.export import load_generator_weights

            load_generator_weights(generator, init_from)
        self.generator = generator
        self.ema_generator = copy.deepcopy(generator).requires_grad_(False).eval()
        self.loss = loss if loss is not None else DriftingLoss()
        self.encoder = (encoder if encoder is not None else Identity()).freeze()
        self.guidance = guidance
        self._step_started = self._step_ended = 0.0  # the step's own work, without the callbacks at its end
        self._step_sizes = (0, 0, 0)  # class groups, N_pos, N_unc of the current step, for the out-of-memory advice
        self._noise_seed: int | None = None  # base of the per-group noise streams, set by on_fit_start
        self._group_generator: torch.Generator | None = None  # re-seeded for every class group's stream
        self._grad_norm: Tensor | None = None  # this step's global gradient norm, for the check and the clipping
        self._skipped = False  # this batch was skipped (nonfinite="skip")
        self._updates = False  # this optimiser step moves the weights (on_before_optimizer_step)
        self._drop_gradients = False  # a loss skipped on more than one rank left NaN in the (accumulated) gradients
        self._skips = SkipTally()  # of this fit
        # A latent run's samples are decoded to images for grids, Frechet metrics and `drifting sample`.
        self.decoder = LatentDecoder(vae, vae_allow_hub, vae_dtype) if vae is not None else None

    # ---- training -------------------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor | None:
        positives = batch["positives"]
        groups, n = positives.shape[0], self.hparams.generated_per_group
        labels = batch.get("labels")
        unconditional = batch.get("unconditional")
        use_guidance = self.guidance is not None and unconditional is not None and unconditional.shape[1] > 0
        alpha, inputs = self._draw_group_inputs(groups, n, use_guidance, batch_idx)
        x = self.generator(
            **inputs,
            labels=None if labels is None else labels.repeat_interleave(n),
            alpha=None if alpha is None else alpha.repeat_interleave(n),
        )
        gen = _grouped(self.encoder(x), groups)
        with torch.no_grad():
            pos = _grouped(self.encoder(positives.flatten(0, 1)), groups)
            neg = _grouped(self.encoder(unconditional.flatten(0, 1)), groups) if use_guidance else None
        weights = guidance_weight(alpha, n, unconditional.shape[1]) if use_guidance else None
        with _highest_matmul_precision():
            out = self.loss(gen, pos, neg, weights)

        finite = bool(torch.isfinite(out.loss).item())
        if not self.trainer.strategy.reduce_boolean_decision(finite, all=True):
            stats = ", ".join(f"{k}={v.item():.4g}" for k, v in out.stats.items())
            # raises unless it may be skipped: this batch on one process, the whole step on several (below)
            self._handle_nonfinite("the drift loss", stats, "batch" if self.trainer.world_size == 1 else "step")
            if self.trainer.world_size == 1:
                return None
            # Lightning refuses None on more than one rank. All ranks agree on the skip (the decision above is
            # all-reduced), so each runs the backward its DDP/FSDP collectives expect, and on_before_optimizer_step
            # drops the gradients. NaN makes them non-finite for certain, so that a GradScaler skips the step too.
            self._drop_gradients = True
            return out.loss * float("nan")
        self.log("train/loss", out.loss, prog_bar=True)
        self.log_dict({f"drift/{k}": v for k, v in out.stats.items()})
        for tau, sq_norm in zip(self.loss.temperatures, out.drift_sq_norm, strict=True):
            self.log(f"train/drift_sq_norm_tau{tau:g}", sq_norm, prog_bar=tau == self.loss.temperatures[-1])
        if alpha is not None:
            self.log("train/alpha_mean", alpha.mean())
        self.log("train/generated_per_step", float(groups * n))
        return out.loss

    def _draw_group_inputs(
        self, groups: int, n: int, use_guidance: bool, batch_idx: int
    ) -> tuple[Tensor | None, dict[str, Tensor]]:
        """alpha [groups] (None without guidance) and the generator's inputs for groups * n samples. Class group g of
        this rank is group rank * groups + g of the global batch and draws from its own stream, keyed by (seed,
        step, batch_idx, global group) (``drifting_lightning.rng``): ranks never share noise, a resume replays it,
        and the global batch does not depend on how many ranks split it. One generator, re-seeded per group."""
        seed = torch.initial_seed() if self._noise_seed is None else self._noise_seed
        if self._group_generator is None or self._group_generator.device != self.device:
            self._group_generator = torch.Generator(device=self.device)
        first = self.global_rank * groups
        alphas, draws = [], []
        for g in range(first, first + groups):
            gen = torch_generator(seed, self.global_step, batch_idx, g, reuse=self._group_generator)
            if use_guidance:
                alphas.append(self.guidance.sample(1, device=self.device, generator=gen))
            draws.append(self.generator.draw_inputs(n, device=self.device, generator=gen))
        inputs = {k: torch.cat([d[k] for d in draws]) for k in draws[0]}
        return (torch.cat(alphas) if use_guidance else None), inputs

    def on_train_end(self) -> None:
        summary = self._skips.summary(self.trainer.accumulate_grad_batches)
        if summary:
            self.print(summary)

    def on_fit_start(self) -> None:
        # the EMA copy of the generator: never wrapped by a strategy
        check_parts_fit(self.ema_generator, self.encoder, self.guidance, self.trainer, self.device)
        self._skips = SkipTally()
        self._drop_gradients = False
        # Rank 0's seed (the one seed_everything set) for every rank's group streams.
        self._noise_seed = self.trainer.strategy.broadcast(torch.initial_seed())

    def _handle_nonfinite(self, what: str, summary: str, unit: Literal["batch", "step"]) -> None:
        """Skips (``unit``: this batch, or this optimiser step) or stops, as ``nonfinite`` says."""
        step = self.global_step
        if self.hparams.nonfinite == "skip":
            self._skipped = True
            in_a_row = self._skips.skip(unit)
            shown = "step" if self.trainer.accumulate_grad_batches == 1 else unit  # a batch is a step
            self.print(f"[drifting] NaN/Inf in {what} at step {step}: {shown} skipped ({summary})")
            limit = self.hparams.max_consecutive_skips
            if in_a_row < limit:
                return None
            what = f"{what} for {limit} steps in a row (model.max_consecutive_skips)"
        path = Path(self.trainer.default_root_dir if self.logger is None else self.trainer.log_dir or ".")
        ckpt = path / f"nonfinite-step{step}.ckpt"
        self.trainer.save_checkpoint(ckpt)
        raise nonfinite_error(what, step, str(ckpt), summary)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self._grad_norm = None
        self._updates = False  # whether this optimiser step moves the weights (and so the EMA, optimizer_step)
        self._skips.steps += 1
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        if self._drop_gradients:  # reported and counted by training_step; under accumulation, maybe batches ago
            self._drop_gradients, self._skipped = False, True
            if scaler is None:
                optimizer.zero_grad(set_to_none=True)  # AdamW leaves parameters without a gradient untouched
            return
        grads = _local_gradients(self.generator)
        # No gradients: every batch of this step was skipped. A skipped last batch under accumulation leaves the
        # earlier batches' gradients, which the optimiser applies; Lightning's 16-mixed precision does not step then.
        if not grads or (self._skipped and scaler is not None):
            return
        self._updates = True
        if scaler is not None:
            return  # 16-mixed: Inf gradients are how the GradScaler calibrates; it skips those steps itself
        norms = torch._foreach_norm(list(grads.values()))
        total = torch.linalg.vector_norm(torch.stack(norms))
        if _sharded(self.generator) and torch.distributed.is_initialized():
            # Each rank holds a shard of the gradients: one all-reduce of the squares makes the global norm, the
            # same on every rank, so the ranks agree on the verdict without another collective.
            square = total.square()
            torch.distributed.all_reduce(square)
            total = square.sqrt()
        self._grad_norm = total  # clipping reuses it (configure_gradient_clipping)
        if bool(torch.isfinite(total)):  # the one host sync of the check
            return
        bad = [k for k, norm in zip(grads, norms, strict=True) if not torch.isfinite(norm)]
        shown = ", ".join(bad[:6])
        summary = f"gradient norm {total.item():.4g}; NaN/Inf in {len(bad)} of {len(grads)} tensors: {shown}"
        if self.hparams.nonfinite == "skip":
            optimizer.zero_grad(set_to_none=True)  # AdamW leaves parameters without a gradient untouched
            self._grad_norm, self._updates = None, False
        self._handle_nonfinite("the gradients", summary, "step")

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        scale = None if scaler is None else scaler.get_scale()
        # The closure (forward, loss, backward) runs inside the optimiser step, so this sees every training OOM.
        try:
            super().optimizer_step(*args, **kwargs)
        except torch.OutOfMemoryError as err:
            advice = oom_advice(err, self.global_step, self._step_sizes, self.hparams.generated_per_group,
                                self.loss.max_chunk_elements,
                                getattr(self.generator, "gradient_checkpointing", True) is False,
                                str(self.trainer.precision) in ("32", "32-true"))
            raise torch.OutOfMemoryError(advice) from err
        # 16-mixed: a GradScaler that found Inf/NaN skipped the step and lowered its scale (it synced to decide)
        scaler_skipped = scaler is not None and scaler.get_scale() < scale
        # The EMA follows the optimiser steps that move the weights (once per accumulated batch), and it is updated
        # here rather than in on_train_batch_end: Lightning runs the callbacks' on_train_batch_end, where
        # ModelCheckpoint(every_n_train_steps) saves, before the module's, and a checkpoint must hold its step's EMA.
        if self._updates and not scaler_skipped:
            self._update_ema()
        self._step_ended = time.perf_counter()

    def setup(self, stage: str) -> None:
        precision = self.hparams.float32_matmul_precision
        if precision == "auto":
            precision = "high" if self.device.type == "cuda" else None
        if precision is not None:
            torch.set_float32_matmul_precision(precision)
        for name in self.hparams.compile:
            getattr(self, name).compile()  # compiles lazily at the first call, after any sharding by configure_model

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Name the tensors that differ before Lightning's strict load fails on them. Sharded strategies load (and
        # check) their own way; without a trainer (checkpoints.loading.load_module) the caller chooses strictness.
        trainer = self._trainer
        if (trainer is not None and self.strict_loading and "state_dict" in checkpoint
                and isinstance(trainer.strategy, (SingleDeviceStrategy, DDPStrategy))):  # fmt: skip
            check_state_fits(self.state_dict(), checkpoint, str(trainer.ckpt_path))

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._step_started = time.perf_counter()
        self._skipped = False
        self._skips.batches += 1
        positives, unconditional = batch["positives"], batch.get("unconditional")
        n_unc = 0 if unconditional is None else unconditional.shape[1]
        self._step_sizes = (positives.shape[0], positives.shape[1], n_unc)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if not self._skipped:
            self._skips.in_a_row = 0
        elapsed = self._step_ended - self._step_started  # < 0 when no optimiser step ended in this batch
        if elapsed > 0:
            per_step = batch["positives"].shape[0] * self.hparams.generated_per_group
            self.log("train/samples_per_s", per_step / elapsed)

    @torch.no_grad()
    def _update_ema(self) -> None:
        decay = self.hparams.ema_decay
        ema = list(self.ema_generator.parameters())
        with full_parameters(self.generator) as params:  # gathered on every rank when the generator is sharded
            if len(params) != len(ema):
                raise RuntimeError(
                    f"the generator shows {len(params)} parameters, its EMA copy {len(ema)}: under FSDPStrategy keep "
                    "use_orig_params=True (the default)"
                )
            torch._foreach_lerp_(ema, params, 1.0 - decay)
        for e, b in zip(self.ema_generator.buffers(), self.generator.buffers(), strict=True):
            e.copy_(b)

    def configure_model(self) -> None:
        """Shards the generator under FSDP2 (``ModelParallelStrategy``) or FSDP (``FSDPStrategy``); see
        ``drifting_lightning.parallel``. Nothing to do on one device or under DDP."""
        strategy = self._trainer.strategy if self._trainer is not None else None
        if self.device_mesh is not None:
            shard_fsdp2(self.generator, self.device_mesh)
        elif isinstance(strategy, FSDPStrategy):
            self.generator = wrap_fsdp(self, strategy.root_device)

    def configure_gradient_clipping(
        self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        norm = gradient_clip_algorithm in (None, "norm")
        if gradient_clip_val and norm and self._grad_norm is not None:
            # torch's clip_grad_norm_ with the norm the non-finite check already has (global under sharding)
            coef = (gradient_clip_val / (self._grad_norm + 1e-6)).clamp(max=1.0)
            torch._foreach_mul_(list(_local_gradients(self.generator).values()), coef)
            return
        # Lightning's norm clipping refuses FSDP (FSDPStrategy); FSDP's own clip_grad_norm_ is the correct one.
        if not (gradient_clip_val and norm and clip_fsdp_gradients(self.generator, gradient_clip_val)):
            self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        opt = torch.optim.AdamW(self.generator.parameters(), lr=hp.lr, betas=tuple(hp.betas),
                                weight_decay=hp.weight_decay)
        warmup = max(1, hp.warmup_steps)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / warmup))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "name": "lr"}}

    # ---- inference ------------------------------------------------------------------------------------------
    def decode_samples(self, x: Tensor) -> Tensor:
        """Samples -> images: a latent run's ``decoder`` maps latents to pixels in [-1, 1]; other samples pass."""
        return x if self.decoder is None else self.decoder(x)

    @torch.no_grad()
    def sample(
        self,
        n: int,
        labels: Tensor | None = None,
        alpha: float | Tensor | None = None,
        use_ema: bool = True,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """n samples [n, *sample_shape] in one network evaluation. Labels default to class-balanced
        (0, 1, ..., K-1, 0, ...) for a conditional generator; alpha defaults to 1 (no guidance)."""
        net = self.ema_generator if use_ema else self.generator
        device = self.device
        if labels is None:
            labels = balanced_labels(n, net.num_classes, device)
        if alpha is not None and not isinstance(alpha, Tensor):
            alpha = torch.full((n,), float(alpha), device=device)
        was_training = net.training
        net.eval()
        inputs = net.draw_inputs(n, device=device, generator=generator)
        out = net(**inputs, labels=None if labels is None else labels.to(device), alpha=alpha)
        net.train(was_training)
        return out


@contextlib.contextmanager
def _highest_matmul_precision() -> Iterator[None]:
    """Full float32 matmuls inside: the drift loss's distances (|x|^2 + |y|^2 - 2 x.y) cancel, TF32 would not do."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def _local_gradients(generator: torch.nn.Module) -> dict[str, Tensor]:
    """This rank's gradient tensors by parameter name: the local shard of a sharded (DTensor) gradient."""
    return {k: p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
            for k, p in generator.named_parameters() if p.grad is not None}  # fmt: skip


def _sharded(generator: torch.nn.Module) -> bool:
    """Whether each rank holds only a shard of the generator's gradients (FSDP2 or FSDP)."""
    return isinstance(generator, (FSDPModule, FullyShardedDataParallel))


def _grouped(features: dict[str, Tensor], groups: int) -> dict[str, Tensor]:
    """{name: [G*K, L, C]} -> {name: [G, K, L, C]}."""
    return {k: v.reshape(groups, v.shape[0] // groups, *v.shape[1:]) for k, v in features.items()}
