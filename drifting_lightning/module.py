"""DriftingModule: draw -> generate -> encode -> drift loss -> step, with EMA and one-step sampling (DESIGN.md)."""

from __future__ import annotations

import copy
import time
import warnings
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch import Tensor

from drifting_lightning.drift.loss import DriftingLoss
from drifting_lightning.encoders.base import FeatureEncoder, Identity
from drifting_lightning.models.base import Generator
from drifting_lightning.sampling.guidance import GuidanceSampler, guidance_weight

# The frozen encoder and the EMA copy are in eval mode on purpose; Lightning warns about any module in eval mode.
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode", category=UserWarning)


class NonFiniteLossError(RuntimeError):
    """The drift loss became NaN or Inf; the message names the step and the statistics."""


class DriftingModule(pl.LightningModule):
    """Trains a one-step generator with the drifting loss.

    generator: f(noise, labels, alpha); loss: DriftingLoss (default: the paper's); encoder: feature encoder
    (default Identity: raw samples as one vector); guidance: alpha sampler used when batches carry unconditional
    negatives (PAPER.md 5). generated_per_group: N_neg, generated samples per class group.
    Optimiser: AdamW(lr, betas, weight_decay), linear warmup over ``warmup_steps`` then constant (paper Table 8).
    ema_decay: EMA of the generator, used for ``sample`` and evaluation. vae: local path (or, with vae_allow_hub, a hub
    id) of the VAE whose latents the generator makes; it adds ``decode_samples`` for grids and metrics.
    nonfinite: "stop" (save ``nonfinite-step<k>.ckpt`` with the last finite weights and raise) or "skip" (skip the
    step) on a NaN/Inf loss.
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
        vae: str | None = None,
        vae_allow_hub: bool = False,
        vae_dtype: str = "float32",
    ) -> None:
        super().__init__()
        if generated_per_group < 1:
            raise ValueError(f"generated_per_group must be >= 1, got {generated_per_group}")
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must lie in [0, 1), got {ema_decay}")
        if nonfinite not in ("stop", "skip"):
            raise ValueError(f"nonfinite must be 'stop' or 'skip', got {nonfinite!r}")
        self.save_hyperparameters(ignore=["generator", "loss", "encoder", "guidance"])
        self.generator = generator
        self.ema_generator = copy.deepcopy(generator).requires_grad_(False).eval()
        self.loss = loss if loss is not None else DriftingLoss()
        self.encoder = (encoder if encoder is not None else Identity()).freeze()
        self.guidance = guidance
        self._step_started = 0.0
        if vae is not None:
            # Latent run: grids, FID and `drifting sample` decode through this. An instance attribute, so that
            # hasattr(module, "decode_samples") tells latent modules from pixel ones.
            self.decode_samples = self._decode_latents

    # ---- training -------------------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor | None:
        positives = batch["positives"]
        groups, n = positives.shape[0], self.hparams.generated_per_group
        labels = batch.get("labels")
        unconditional = batch.get("unconditional")
        use_guidance = self.guidance is not None and unconditional is not None and unconditional.shape[1] > 0
        alpha = self.guidance.sample(groups, device=self.device) if use_guidance else None

        inputs = self.generator.draw_inputs(groups * n, device=self.device)
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
        out = self.loss(gen, pos, neg, weights)

        finite = bool(torch.isfinite(out.loss).item())
        if not self.trainer.strategy.reduce_boolean_decision(finite, all=True):
            return self._handle_nonfinite(out.stats)
        self.log("train/loss", out.loss, prog_bar=True)
        self.log_dict({f"drift/{k}": v for k, v in out.stats.items()})
        for tau in self.loss.temperatures:
            total = sum(v for k, v in out.stats.items() if k.endswith(f"drift_sq_norm/tau{tau:g}"))
            self.log(f"train/drift_sq_norm_tau{tau:g}", total, prog_bar=tau == self.loss.temperatures[-1])
        if alpha is not None:
            self.log("train/alpha_mean", alpha.mean())
        self.log("train/generated_per_step", float(groups * n))
        return out.loss

    def _handle_nonfinite(self, stats: dict[str, Tensor]) -> None:
        step = self.global_step
        summary = ", ".join(f"{k}={v.item():.4g}" for k, v in stats.items())
        if self.hparams.nonfinite == "skip":
            self.print(f"[drifting] non-finite loss at step {step}: step skipped ({summary})")
            return None
        path = Path(self.trainer.default_root_dir if self.logger is None else self.trainer.log_dir or ".")
        ckpt = path / f"nonfinite-step{step}.ckpt"
        self.trainer.save_checkpoint(ckpt)
        raise NonFiniteLossError(
            f"the drift loss is NaN/Inf at step {step}. The weights before this step are saved in {ckpt}. "
            f"Statistics: {summary}. Try a lower lr, gradient clipping (trainer.gradient_clip_val), or "
            "model.nonfinite=skip to skip such steps."
        )

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._step_started = time.perf_counter()

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._update_ema()
        elapsed = time.perf_counter() - self._step_started
        if elapsed > 0:
            per_step = batch["positives"].shape[0] * self.hparams.generated_per_group
            self.log("train/samples_per_s", per_step / elapsed)

    @torch.no_grad()
    def _update_ema(self) -> None:
        decay = self.hparams.ema_decay
        ema = list(self.ema_generator.parameters())
        torch._foreach_lerp_(ema, [p.detach() for p in self.generator.parameters()], 1.0 - decay)
        for e, b in zip(self.ema_generator.buffers(), self.generator.buffers(), strict=True):
            e.copy_(b)

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        opt = torch.optim.AdamW(self.generator.parameters(), lr=hp.lr, betas=tuple(hp.betas),
                                weight_decay=hp.weight_decay)
        warmup = max(1, hp.warmup_steps)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / warmup))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "name": "lr"}}

    @torch.no_grad()
    def _decode_latents(self, x: Tensor) -> Tensor:
        """Latents [B, C, h, w] -> images [B, 3, h*f, w*f] in [-1, 1] with the run's frozen VAE decoder (loaded once
        per process and device, kept out of the state_dict so checkpoints stay small)."""
        from drifting_lightning.data.vae import shared_codec

        hp = self.hparams
        return shared_codec(hp.vae, hp.vae_allow_hub, hp.vae_dtype, x.device).decode(x.float()).clamp(-1.0, 1.0)

    # ---- inference ------------------------------------------------------------------------------------------
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
        if labels is None and net.num_classes > 0:
            labels = torch.arange(n, device=device) % net.num_classes
        if alpha is not None and not isinstance(alpha, Tensor):
            alpha = torch.full((n,), float(alpha), device=device)
        was_training = net.training
        net.eval()
        inputs = net.draw_inputs(n, device=device, generator=generator)
        out = net(**inputs, labels=None if labels is None else labels.to(device), alpha=alpha)
        net.train(was_training)
        return out


def _grouped(features: dict[str, Tensor], groups: int) -> dict[str, Tensor]:
    """{name: [G*K, L, C]} -> {name: [G, K, L, C]}."""
    return {k: v.reshape(groups, v.shape[0] // groups, *v.shape[1:]) for k, v in features.items()}
