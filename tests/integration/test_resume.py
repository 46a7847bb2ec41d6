"""Resuming `drifting fit`: --ckpt_path last continues the same run bit for bit (weights, EMA, optimiser, scheduler,
sampler position, random streams, loss curve); SIGTERM/SIGINT stop cleanly with a loadable last.ckpt; a corrupted or
foreign checkpoint is refused with a message."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from drifting_lightning.callbacks.epoch_boundary import EpochBoundaryResume
from drifting_lightning.callbacks.rng import TrainingRNG
from drifting_lightning.checkpoints.atomic_io import AtomicCheckpointIO
from drifting_lightning.data.toy import ToyDataModule
from drifting_lightning.models.mlp import MLPGenerator
from drifting_lightning.module import DriftingModule
from tests.integration.cli_helpers import REPO, run_drifting

TOY = str(REPO / "configs" / "toy" / "checkerboard.yaml")
DIGITS = str(REPO / "configs" / "digits.yaml")
# 5 steps per epoch, so that runs cross epoch boundaries and stop in the middle of an epoch.
TOY_ARGS = ["--config", TOY, "--trainer.callbacks=[]", "--trainer.logger.init_args.name", "toy",
            "--trainer.log_every_n_steps", "1", "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false", "--data.init_args.steps_per_epoch", "5",
            "--model.init_args.generated_per_group", "64", "--data.init_args.positives_per_step", "64"]  # fmt: skip


# A small DiT on digits, quiet: the class-conditional runs below add their data options.
DIGITS_ARGS = ["--config", DIGITS, "--trainer.callbacks=[]", "--trainer.logger.init_args.name", "digits",
               "--trainer.log_every_n_steps", "1", "--trainer.enable_progress_bar", "false",
               "--trainer.enable_model_summary", "false", "--model.init_args.generator.init_args.hidden_size", "32",
               "--model.init_args.generator.init_args.depth", "1",
               "--model.init_args.generated_per_group", "6"]  # fmt: skip


def toy(save_dir: Path, steps: int, *extra: str) -> list[str]:
    return ["fit", *TOY_ARGS, "--trainer.logger.init_args.save_dir", str(save_dir), "--trainer.max_steps", str(steps),
            *extra]  # fmt: skip


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def losses(run: Path) -> dict[int, float]:
    """train/loss by step from every TensorBoard event file of a run folder (a resumed run adds a file)."""
    events = EventAccumulator(str(run))
    events.Reload()
    return {e.step: e.value for e in events.Scalars("train/loss")}


def assert_same_training_state(a: dict, b: dict) -> None:
    assert a["global_step"] == b["global_step"]
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key, value in a["state_dict"].items():  # generator and EMA
        assert torch.equal(value, b["state_dict"][key]), key
    opt_a, opt_b = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    assert opt_a.keys() == opt_b.keys()
    for i, slots in opt_a.items():
        for name, value in slots.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(opt_b[i][name])), (i, name)
    assert a["lr_schedulers"] == b["lr_schedulers"]
    assert a["loops"]["fit_loop"]["epoch_loop.batch_progress"] == b["loops"]["fit_loop"]["epoch_loop.batch_progress"]


def assert_resuming_to_12_is_exact(save_dir: Path, straight_dir: Path) -> None:
    """`--ckpt_path last` of the stopped toy run under ``save_dir`` to step 12 equals 12 uninterrupted steps (run under
    ``straight_dir``) bit for bit, loss curve included."""
    resumed = run_drifting(*toy(save_dir, 12, "--ckpt_path", "last"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    straight = run_drifting(*toy(straight_dir, 12))
    assert straight.returncode == 0, straight.stderr[-3000:]
    run, straight_run = save_dir / "toy" / "version_0", straight_dir / "toy" / "version_0"
    last = "checkpoints/last.ckpt"
    assert_same_training_state(load(straight_run / last), load(run / last))
    assert losses(run) == losses(straight_run) and len(losses(run)) == 12


def test_resume_from_last_matches_the_uninterrupted_run(tmp_path: Path):
    """12 steps straight vs 7 steps + `--ckpt_path last` to 12, in-process: bitwise the same state and loss curve.
    Step 7 is in the middle of epoch 1, so the stream position inside an epoch is exercised."""
    straight = run_drifting(*toy(tmp_path / "straight", 12))
    assert straight.returncode == 0, straight.stderr[-3000:]
    # The first segment already passes --ckpt_path last: with nothing to resume it starts a new run.
    first = run_drifting(*toy(tmp_path / "resumed", 7, "--ckpt_path", "last"))
    assert first.returncode == 0, first.stderr[-3000:]
    assert "no last.ckpt" in first.stderr and "starting a new run" in first.stderr
    run = tmp_path / "resumed" / "toy" / "version_0"
    assert load(run / "checkpoints" / "last.ckpt")["ToyDataModule"] == {"epoch": 1, "batch": 2}
    second = run_drifting(*toy(tmp_path / "resumed", 12, "--ckpt_path", "last"))
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"resuming from {run / 'checkpoints' / 'last.ckpt'}" in second.stderr
    # The resumed run continued in the same version folder instead of starting version_1.
    assert [p.name for p in (tmp_path / "resumed" / "toy").iterdir()] == ["version_0"]
    expected = load(tmp_path / "straight" / "toy" / "version_0" / "checkpoints" / "last.ckpt")
    resumed = load(run / "checkpoints" / "last.ckpt")
    assert expected["global_step"] == 12
    assert_same_training_state(expected, resumed)
    assert expected["ToyDataModule"] == resumed["ToyDataModule"] == {"epoch": 2, "batch": 2}
    curve = losses(tmp_path / "straight" / "toy" / "version_0")
    assert sorted(curve) == list(range(12))
    assert losses(run) == curve


def test_a_resume_after_a_kill_drops_the_steps_logged_past_the_checkpoint(tmp_path: Path):
    """A kill after step 9 with last.ckpt at step 6 (made here by putting the step-6 checkpoint back after a run to
    12): the resume logs steps 7-11 again (the same values: resumes are exact), and TensorBoard shows each step once."""
    every_2 = ("--trainer.log_every_n_steps", "2")  # training scalars at 1, 3, 5 | 7, 9, 11 (the step count before)
    assert run_drifting(*toy(tmp_path, 6, *every_2)).returncode == 0
    run = tmp_path / "toy" / "version_0"
    last = run / "checkpoints" / "last.ckpt"
    at_6 = last.read_bytes()
    assert run_drifting(*toy(tmp_path, 12, *every_2, "--ckpt_path", "last")).returncode == 0
    last.write_bytes(at_6)
    resumed = run_drifting(*toy(tmp_path, 12, *every_2, "--ckpt_path", "last"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    events = EventAccumulator(str(run))
    events.Reload()
    steps = [e.step for e in events.Scalars("train/loss")]
    assert steps == [1, 3, 5, 7, 9, 11]  # not 1, 3, 5, 7, 9, 11, 7, 9, 11


def test_digits_resume_continues_queue_sampler_and_guidance(tmp_path: Path):
    """The class-conditional path (DiT, guidance alpha, MoCo-style class queues): 4 steps straight vs 2 + resume."""
    args = [*DIGITS_ARGS, "--data.init_args.steps_per_epoch", "3", "--data.init_args.positives", "ClassQueue",
            "--data.init_args.positives.init_args.classes_per_step", "4",
            "--data.init_args.positives.init_args.positives_per_class", "4",
            "--data.init_args.positives.init_args.unconditional_per_class", "4",
            "--data.init_args.positives.init_args.queue_size", "8",
            "--data.init_args.positives.init_args.unconditional_queue_size", "16",
            "--data.init_args.positives.init_args.push_per_step", "4"]  # fmt: skip

    def fit(folder: str, steps: int, *extra: str) -> Path:
        out = run_drifting("fit", *args, "--trainer.logger.init_args.save_dir", str(tmp_path / folder),
                           "--trainer.max_steps", str(steps), *extra)  # fmt: skip
        assert out.returncode == 0, out.stderr[-3000:]
        return tmp_path / folder / "digits" / "version_0"

    straight = fit("straight", 4)
    fit("resumed", 2)
    resumed = fit("resumed", 4, "--ckpt_path", "last")
    a, b = load(straight / "checkpoints" / "last.ckpt"), load(resumed / "checkpoints" / "last.ckpt")
    assert a["global_step"] == 4
    assert_same_training_state(a, b)
    queues_a, queues_b = a["DigitsDataModule"]["positives"], b["DigitsDataModule"]["positives"]
    assert queues_a.keys() == queues_b.keys() and queues_a["step"] == 4
    for key, value in queues_a.items():
        assert torch.equal(value, queues_b[key]) if isinstance(value, torch.Tensor) else value == queues_b[key], key
    assert losses(straight) == losses(resumed) and len(losses(straight)) == 4


class _DropoutMLP(MLPGenerator):
    """Draws from the global torch RNG in every step (dropout), like a plug-in generator might."""

    def forward(self, noise, labels=None, alpha=None):
        return torch.nn.functional.dropout(super().forward(noise), 0.5, training=self.training)


def fit_toy(folder: Path, steps: int, steps_per_epoch: int, generator: type[MLPGenerator],
            callbacks: list[type[Callback]], resume: bool = False, every_n_train_steps: int | None = None) -> dict:
    """A small toy run of a plain Trainer (none of `drifting fit`'s additions but new ``callbacks``) that keeps
    ``folder/last.ckpt`` (written at every epoch end, or instead every ``every_n_train_steps`` steps), resumed from
    that file when ``resume``: the checkpoint it ends with."""
    pl.seed_everything(0)
    module = DriftingModule(generator(hidden=[16]), generated_per_group=8)
    checkpoint = ModelCheckpoint(dirpath=folder, filename="last", enable_version_counter=False,
                                 every_n_train_steps=every_n_train_steps)  # fmt: skip
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[checkpoint, *(c() for c in callbacks)])  # fmt: skip
    data = ToyDataModule(positives_per_step=8, steps_per_epoch=steps_per_epoch)
    trainer.fit(module, data, ckpt_path=folder / "last.ckpt" if resume else None)
    return load(folder / "last.ckpt")


def same_weights(a: dict, b: dict) -> bool:
    return all(torch.equal(value, b["state_dict"][key]) for key, value in a["state_dict"].items())


def test_training_rng_continues_the_global_random_stream(tmp_path: Path):
    """7 steps straight vs 4 + resume (epochs of 3 steps: DataLoader iterators draw from the global RNG at every
    epoch start): the same weights with TrainingRNG, different ones without it."""
    for rng in (True, False):
        callbacks = [TrainingRNG] if rng else []
        straight = fit_toy(tmp_path / f"straight-{rng}", 7, 3, _DropoutMLP, callbacks)
        fit_toy(tmp_path / f"resumed-{rng}", 4, 3, _DropoutMLP, callbacks)
        resumed = fit_toy(tmp_path / f"resumed-{rng}", 7, 3, _DropoutMLP, callbacks, resume=True)
        assert same_weights(straight, resumed) is rng


def test_checkpoints_between_epochs_resume_at_the_next_epoch(tmp_path: Path):
    """ModelCheckpoint writes last.ckpt at every epoch end. 5 steps (one whole epoch) + resume to 12 equals 12 straight
    steps when EpochBoundaryResume closes the epoch in the checkpoint, at saving or at loading; Lightning alone
    resumes inside the finished epoch (one more step there, with batch_idx 5) and the runs diverge."""
    straight = fit_toy(tmp_path / "straight", 12, 5, MLPGenerator, [])
    for saved_with, loaded_with in ((True, False), (False, True), (False, False)):
        folder = tmp_path / f"saved-{saved_with}-loaded-{loaded_with}"
        fit_toy(folder, 5, 5, MLPGenerator, [EpochBoundaryResume] if saved_with else [])
        resumed = fit_toy(folder, 12, 5, MLPGenerator, [EpochBoundaryResume] if loaded_with else [], resume=True)
        assert same_weights(straight, resumed) is (saved_with or loaded_with), folder.name
        if saved_with or loaded_with:
            assert_same_training_state(straight, resumed)


class FinalEMA(Callback):
    """Keeps the module's EMA weights as the fit ends (after every hook of its last step)."""

    weights: dict[str, torch.Tensor] = {}

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        FinalEMA.weights = {k: v.clone() for k, v in pl_module.ema_generator.state_dict().items()}


def test_step_checkpoints_hold_the_ema_of_their_step_and_resume_exactly(tmp_path: Path):
    """ModelCheckpoint(every_n_train_steps) saves in its on_train_batch_end, which Lightning calls before the module's
    hooks: the EMA must be updated by then. The step-4 checkpoint (inside an epoch of 5) holds the EMA the module ends
    step 4 with, and 4 steps + resume to 12 equal 12 straight steps, EMA included (before, it was one update behind)."""
    straight = fit_toy(tmp_path / "straight", 12, 5, MLPGenerator, [], every_n_train_steps=4)
    folder = tmp_path / "resumed"
    first = fit_toy(folder, 4, 5, MLPGenerator, [FinalEMA], every_n_train_steps=4)
    assert first["global_step"] == 4
    assert FinalEMA.weights.keys() == {k.removeprefix("ema_generator.") for k in first["state_dict"]
                                       if k.startswith("ema_generator.")}  # fmt: skip
    for key, value in FinalEMA.weights.items():
        assert torch.equal(first["state_dict"][f"ema_generator.{key}"], value), key
    resumed = fit_toy(folder, 12, 5, MLPGenerator, [], resume=True, every_n_train_steps=4)
    assert resumed["global_step"] == 12
    assert_same_training_state(straight, resumed)


class SigtermAtFirstCheckpoint(Callback):
    """SIGTERM to this process while the first last.ckpt (end of epoch 0, step 5) is being written: where the signal
    of the SIGTERM tests lands when the machine is loaded (they send it once that file exists), without the timing.
    Lightning then stops after the epoch rather than after a step."""

    def __init__(self) -> None:
        self.sent = False

    def on_save_checkpoint(self, *args) -> None:
        if not self.sent:
            self.sent = True
            os.kill(os.getpid(), signal.SIGTERM)


def test_sigterm_at_an_epoch_end_saves_a_checkpoint_that_resumes_exactly(tmp_path: Path):
    """The flake of the SIGTERM tests, made deterministic: a stop at the end of epoch 0 (step 5), `--ckpt_path last`
    to step 12, and 12 uninterrupted steps are bitwise the same (before EpochBoundaryResume the resumed run trained a
    sixth step in epoch 0 and diverged)."""
    signal_at_epoch_end = "--trainer.callbacks+=tests.integration.test_resume.SigtermAtFirstCheckpoint"
    killed = run_drifting(*toy(tmp_path / "killed", 1000, signal_at_epoch_end))
    run = tmp_path / "killed" / "toy" / "version_0"
    last = run / "checkpoints" / "last.ckpt"
    assert killed.returncode == 143, killed.stderr[-3000:]
    assert f"SIGTERM received: stopped after step 5, saved {last}" in killed.stderr
    assert load(last)["ToyDataModule"] == {"epoch": 1}
    assert_resuming_to_12_is_exact(tmp_path / "killed", tmp_path / "straight")


class PauseEachStep(Callback):
    """Slows a run down (sleeping, not computing), so that a signal sent after its first checkpoint lands early."""

    def on_train_batch_end(self, *args) -> None:
        time.sleep(0.1)


def _stop_after_first_checkpoint(save_dir: Path, signum: int) -> tuple[Path, str]:
    """A real `drifting fit` process of 1000 toy steps, sent ``signum`` once its first last.ckpt (end of epoch 0,
    step 5) exists: its run folder and stderr. It must exit with 128 + signum (stopped by the signal, not finished)."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    args = toy(save_dir, 1000, "--trainer.callbacks+=tests.integration.test_resume.PauseEachStep")
    proc = subprocess.Popen([sys.executable, "-m", "drifting_lightning", *args], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    run = save_dir / "toy" / "version_0"
    deadline = time.monotonic() + 240
    while not (run / "checkpoints" / "last.ckpt").exists():
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint within 240 s"
        time.sleep(0.02)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 128 + signum, err[-3000:]
    return run, err


def test_sigterm_mid_run_saves_a_checkpoint_that_resumes_exactly(tmp_path: Path):
    """SIGTERM to a running `drifting fit` (SLURM preemption): exit 143, an intact last.ckpt at the step it stopped;
    `--ckpt_path last` to step 12 then equals 12 uninterrupted steps bit for bit, loss curve included. The signal
    usually stops the run after step 6 or 7; on a loaded machine it can land while epoch 0 ends, the case that
    test_sigterm_at_an_epoch_end_saves_a_checkpoint_that_resumes_exactly makes certain."""
    run, err = _stop_after_first_checkpoint(tmp_path / "killed", signal.SIGTERM)
    last = run / "checkpoints" / "last.ckpt"
    stopped = AtomicCheckpointIO().load_checkpoint(last, weights_only=True)["global_step"]  # verified, then loaded
    assert 5 <= stopped < 12, "the signal should stop the run within a step or two of step 5"
    assert f"SIGTERM received: stopped after step {stopped}, saved {last}" in err and "Traceback" not in err
    assert_resuming_to_12_is_exact(tmp_path / "killed", tmp_path / "straight")


def test_ctrl_c_stops_after_the_step_with_a_checkpoint(tmp_path: Path):
    run, err = _stop_after_first_checkpoint(tmp_path, signal.SIGINT)
    last = run / "checkpoints" / "last.ckpt"
    saved = AtomicCheckpointIO().load_checkpoint(last, weights_only=True)
    assert f"SIGINT received: stopped after step {saved['global_step']}, saved {last}" in err
    assert "KeyboardInterrupt" not in err and "Traceback" not in err
    assert "weights_only" not in err and "Received SIGTERM" not in err  # Lightning's lines, silenced by `drifting`


def test_fit_refuses_corrupted_and_foreign_checkpoints(tmp_path: Path):
    first = run_drifting(*toy(tmp_path, 2))
    assert first.returncode == 0, first.stderr[-3000:]
    last = tmp_path / "toy" / "version_0" / "checkpoints" / "last.ckpt"
    good = last.read_bytes()

    # Another model config: the message names the tensors that differ.
    out = run_drifting(*toy(tmp_path, 4, "--ckpt_path", str(last)),
                       "--model.init_args.generator.init_args.hidden", "[64, 64]")  # fmt: skip
    assert out.returncode == 1
    assert "different model config" in out.stderr
    assert "generator.body.0.weight [256, 32] in the checkpoint, [64, 32] in this run" in out.stderr
    assert "Traceback" not in out.stderr

    # One flipped byte inside the weights: torch.load would accept it, the CRC check does not.
    data = bytearray(good)
    data[len(data) // 2] ^= 0xFF
    last.write_bytes(bytes(data))
    out = run_drifting(*toy(tmp_path, 4, "--ckpt_path", "last"))
    assert out.returncode == 1
    assert f"checkpoint {last} is corrupted" in out.stderr and "CRC-32" in out.stderr and "Traceback" not in out.stderr

    last.write_bytes(good[: len(good) // 3])  # a copy cut short, given by path
    out = run_drifting(*toy(tmp_path, 4, "--ckpt_path", str(last)))
    assert out.returncode == 1
    assert f"checkpoint {last} is corrupted: it is not a complete torch.save archive" in out.stderr
    assert "Traceback" not in out.stderr

    # A run folder: its checkpoints/last.ckpt, continued in the same folder; a folder without one: what is expected.
    last.write_bytes(good)
    run = last.parent.parent
    out = run_drifting(*toy(tmp_path, 4, "--ckpt_path", str(run)))
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"--ckpt_path {run} is a run folder: resuming from {last}" in out.stderr
    assert load(last)["global_step"] == 4 and sorted(losses(run)) == [0, 1, 2, 3]  # logged on in version_0
    folders = sorted(run.parent.iterdir())
    out = run_drifting(*toy(tmp_path, 6, "--ckpt_path", str(tmp_path)))
    assert out.returncode == 1 and f"--ckpt_path {tmp_path} is a folder without a last.ckpt" in out.stderr
    assert sorted(run.parent.iterdir()) == folders  # refused before any version folder is made


def test_sigterm_to_the_whole_job_with_dataloader_workers_stops_cleanly_and_resumes_exactly(tmp_path: Path):
    """SLURM signals every process of a job, DataLoader workers included (a terminal's Ctrl-C does the same with
    SIGINT). The workers must outlive the signal so the main process can finish its step and save; the resumed run
    (workers again) then equals an uninterrupted one."""
    args = [*DIGITS_ARGS, "--data.init_args.steps_per_epoch", "5", "--data.init_args.num_workers", "2",
            "--data.init_args.positives.init_args.classes_per_step", "4",
            "--data.init_args.positives.init_args.positives_per_class", "4",
            "--data.init_args.positives.init_args.unconditional_per_class", "4"]  # fmt: skip

    def command(folder: str, steps: int, *extra: str) -> list[str]:
        return ["fit", *args, "--trainer.logger.init_args.save_dir", str(tmp_path / folder), "--trainer.max_steps",
                str(steps), *extra]  # fmt: skip

    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    killed = command("killed", 1000, "--trainer.callbacks+=tests.integration.test_resume.PauseEachStep")
    proc = subprocess.Popen([sys.executable, "-m", "drifting_lightning", *killed], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # fmt: skip
    run = tmp_path / "killed" / "digits" / "version_0"
    last = run / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 240
    while not last.exists():
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint within 240 s"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGTERM)  # the main process and its two workers
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 143, err[-3000:]
    stopped = AtomicCheckpointIO().load_checkpoint(last, weights_only=True)["global_step"]
    assert f"SIGTERM received: stopped after step {stopped}, saved {last}" in err and "Traceback" not in err
    assert "killed by signal" not in err, err[-3000:]

    steps = stopped + 3  # across the next epoch boundary (5 steps per epoch)
    resumed = run_drifting(*command("killed", steps, "--ckpt_path", "last"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    straight = run_drifting(*command("straight", steps))
    assert straight.returncode == 0, straight.stderr[-3000:]
    straight_run = tmp_path / "straight" / "digits" / "version_0"
    assert_same_training_state(load(straight_run / "checkpoints" / "last.ckpt"), load(last))
    assert losses(run) == losses(straight_run) and len(losses(run)) == steps
