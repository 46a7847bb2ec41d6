"""What a failing training step tells the user: NaN/Inf losses and gradients (skipped or stopped, and counted) and
out-of-memory advice. DriftingModule decides when; this module words it and keeps the count."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


class NonFiniteLossError(RuntimeError):
    """The drift loss or the gradients became NaN or Inf; the message names the step and the statistics."""


@dataclass
class SkipTally:
    """Skips of one fit under ``nonfinite: skip``: batches (a NaN loss on one process: their gradients are left
    out of the step) and optimiser steps (NaN gradients, or a NaN loss on several processes), out of all batches
    and steps, and the skips in a row that ``max_consecutive_skips`` bounds."""

    skipped_batches: int = 0
    skipped_steps: int = 0
    in_a_row: int = 0
    batches: int = 0
    steps: int = 0

    def skip(self, unit: Literal["batch", "step"]) -> int:
        """Counts one skip; returns the skips in a row."""
        if unit == "batch":
            self.skipped_batches += 1
        else:
            self.skipped_steps += 1
        self.in_a_row += 1
        return self.in_a_row

    def summary(self, accumulate_grad_batches: int) -> str | None:
        """The end-of-fit line, or None when nothing was skipped."""
        skipped = self.skipped_batches + self.skipped_steps
        if not skipped:
            return None
        if accumulate_grad_batches == 1:  # a batch is a step
            return f"[drifting] {skipped} of {self.batches} steps skipped (NaN/Inf, model.nonfinite=skip)"
        return (f"[drifting] skipped (NaN/Inf, model.nonfinite=skip): {self.skipped_batches} of {self.batches} "
                f"batches, {self.skipped_steps} of {self.steps} optimiser steps")


def nonfinite_error(what: str, step: int, checkpoint: str, summary: str) -> NonFiniteLossError:
    return NonFiniteLossError(
        f"NaN/Inf in {what} at step {step}. The weights before this step are saved in {checkpoint}. "
        f"Statistics: {summary}. Try a lower lr, gradient clipping (trainer.gradient_clip_val), or "
        "model.nonfinite=skip to skip such steps."
    )


def oom_advice(
    err: BaseException, step: int, sizes: tuple[int, int, int], generated_per_group: int,
    max_chunk_elements: int | None, gradient_checkpointing_off: bool, full_precision: bool,
) -> str:
    """The message of an out-of-memory training step: its sizes (class groups, N_pos, N_unc per group) and the keys
    that lower its memory."""
    groups, n_pos, n_unc = sizes
    said = str(err).strip().splitlines()[0] if str(err).strip() else "out of memory"
    advice = [
        "model.generated_per_group (N_neg)",
        "the DataModule's positives per step (data.positives.init_args.classes_per_step / positives_per_class / "
        "unconditional_per_class for image data, data.positives_per_step for toy and vector data)",
        f"the drift loss's chunk size model.loss.init_args.max_chunk_elements (now {max_chunk_elements})",
    ]
    if gradient_checkpointing_off:
        advice.append("or recompute activations: model.generator.init_args.gradient_checkpointing true")
    if full_precision:
        advice.append("or halve activations: trainer.precision bf16-mixed")
    return (
        f"out of memory in training step {step} ({said}). The step had {groups} class group(s) with "
        f"N_pos={n_pos} positives, N_unc={n_unc} unconditional samples and N_neg={generated_per_group}"
        " generated samples each. Lower " + "; ".join(advice) + "."
    )
