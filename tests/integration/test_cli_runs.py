"""`drifting fit` run folders, console and interrupts: a mismatch stops before the first step and leaves no folder,
a resume keeps the first config, a resume of a finished run writes nothing, a new run never overwrites another's
checkpoints, the console carries no noise, and Ctrl-C during start-up is `interrupted` with exit status 130."""

from __future__ import annotations

import re
import signal
import time
from pathlib import Path

import yaml

from tests.integration.cli_helpers import REPO, run_drifting, start_drifting_subprocess

TOY = str(REPO / "configs" / "toy" / "checkerboard.yaml")
DIGITS = str(REPO / "configs" / "digits.yaml")
QUIET = ["--trainer.callbacks=[]", "--trainer.enable_model_summary", "false", "--model.init_args.generated_per_group",
         "64", "--data.init_args.positives_per_step", "64"]  # fmt: skip


def bare(root: Path, *args: str) -> list[str]:
    """A toy fit without logger (checkpoints in root/checkpoints) or progress bar."""
    return ["fit", "--config", TOY, *QUIET, "--trainer.logger", "false", "--trainer.default_root_dir", str(root),
            "--trainer.enable_progress_bar", "false", *args]  # fmt: skip


def test_a_mismatch_stops_before_the_first_step_names_the_key_and_leaves_no_folder(tmp_path: Path):
    out = run_drifting(*bare(tmp_path / "shape", "--model.generator.init_args.output_dim", "3"))
    assert out.returncode == 1
    assert out.stderr.strip().splitlines()[-2] == (
        "error: the generator (MLPGenerator) makes samples of shape (3,), the data (ToyDataModule) holds samples of "
        "shape (2,): set model.generator.init_args.output_dim 2"
    )
    assert not (tmp_path / "shape").exists()
    digits = run_drifting("fit", "--config", DIGITS, "--trainer.callbacks=[]", "--trainer.logger", "false",
                          "--trainer.default_root_dir", str(tmp_path / "classes"), "--trainer.enable_progress_bar",
                          "false", "--model.generator.init_args.num_classes", "5")  # fmt: skip
    assert digits.returncode == 1
    assert "error: the data (DigitsDataModule) has 10 classes, the generator (DiT) only 5 " in digits.stderr
    assert "set model.generator.init_args.num_classes 10" in digits.stderr and "IndexError" not in digits.stderr
    assert not (tmp_path / "classes").exists()


def test_a_run_that_fails_before_its_first_step_leaves_no_empty_log_folders(tmp_path: Path):
    logs = tmp_path / "logs"
    out = run_drifting("fit", "--config", TOY, *QUIET, "--trainer.logger.init_args.save_dir", str(logs),
                       "--model.generator.init_args.output_dim", "3")  # fmt: skip
    assert out.returncode == 1 and "makes samples of shape (3,)" in out.stderr
    assert not logs.exists()  # neither logs/checkerboard/version_0 nor the folders above it, made for this run


def test_a_new_run_without_logger_refuses_to_overwrite_the_last_one(tmp_path: Path):
    assert run_drifting(*bare(tmp_path, "--trainer.max_steps", "1")).returncode == 0
    last = tmp_path / "checkpoints" / "last.ckpt"
    written = last.stat().st_mtime_ns
    again = run_drifting(*bare(tmp_path, "--trainer.max_steps", "1"))
    assert again.returncode == 1
    assert f"error: {last}: checkpoint(s) of an earlier run, which this new run would overwrite: resume that run " \
           "with --ckpt_path last, or start this one in another folder with --trainer.default_root_dir" in again.stderr
    assert last.stat().st_mtime_ns == written
    resumed = run_drifting(*bare(tmp_path, "--trainer.max_steps", "2", "--ckpt_path", "last"))
    assert resumed.returncode == 0, resumed.stderr[-2000:]


def test_a_resume_keeps_the_first_config_and_the_console_is_quiet(tmp_path: Path):
    common = ["fit", "--config", TOY, *QUIET, "--trainer.logger.init_args.save_dir", str(tmp_path)]
    assert run_drifting(*common, "--trainer.max_steps", "2").returncode == 0
    # The real entry point, for the console: Lightning's warnings and advice, and the progress bar.
    finished = start_drifting_subprocess(*common, "--trainer.max_steps", "4", "--ckpt_path", "last")
    stdout, stderr = finished.communicate(timeout=300)
    assert finished.returncode == 0, stderr[-3000:]
    for noise in ("args parameter is intended", "Tip: For seamless cloud logging", "LeafSpec", "is not empty",
                  "Epoch 0/-2"):  # fmt: skip
        assert noise not in stdout + stderr, noise
    assert not re.search(r"\.py:\d+: ", stderr), stderr  # no warning at all (they print as file.py:line: text)
    assert "step" in stdout and "4/4" in stdout  # the bar counts steps up to max_steps, across the resume
    run = tmp_path / "checkerboard" / "version_0"
    assert sorted(p.name for p in run.glob("config*.yaml")) == ["config.resume-1.yaml", "config.yaml"]
    assert yaml.safe_load((run / "config.yaml").read_text())["trainer"]["max_steps"] == 2
    assert yaml.safe_load((run / "config.resume-1.yaml").read_text())["trainer"]["max_steps"] == 4


def test_a_refused_resume_adds_nothing_to_the_run_folder(tmp_path: Path):
    common = ["fit", "--config", TOY, *QUIET, "--trainer.logger.init_args.save_dir", str(tmp_path)]
    assert run_drifting(*common, "--trainer.max_steps", "2").returncode == 0
    before = sorted(tmp_path.rglob("*"))
    refused = run_drifting(*common, "--trainer.max_steps", "4", "--ckpt_path", "last",
                           "--model.generator.init_args.hidden", "[64]")  # fmt: skip
    assert refused.returncode == 1 and "different model config" in refused.stderr
    assert sorted(tmp_path.rglob("*")) == before  # no config.resume-1.yaml of a run that never ran, no event file
    # a finished run (a preemptible job's command run once more): nothing to train, said so, nothing written
    run = tmp_path / "checkerboard" / "version_0"
    finished = run_drifting(*common, "--trainer.max_steps", "2", "--ckpt_path", str(run))
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert (f"{run / 'checkpoints' / 'last.ckpt'} is at step 2: the run already reached --trainer.max_steps 2, so "
            "there is nothing to train. To train further, raise it (e.g. --trainer.max_steps 4)") in finished.stderr
    assert sorted(tmp_path.rglob("*")) == before


def _interrupt(process, after: str | None) -> tuple[int, str]:
    """SIGINT to ``process`` once a stderr line contains ``after`` (None: at once), then its status and stderr."""
    seen = ""
    if after is not None:
        for line in process.stderr:
            seen += line
            if after in line:
                break
    else:
        time.sleep(0.5)
    process.send_signal(signal.SIGINT)
    _, rest = process.communicate(timeout=120)
    return process.returncode, seen + rest


def test_ctrl_c_during_start_up_is_interrupted_130(tmp_path: Path):
    # While Python loads torch and Lightning, then while the trainer sets up (the logger's line is printed then).
    for after in (None, "TPU available"):
        root = tmp_path / str(after)
        code, stderr = _interrupt(start_drifting_subprocess(*bare(root, "--trainer.max_steps", "100000")), after)
        lines = [line for line in stderr.splitlines() if not line.startswith(("Seed set", "GPU available", "TPU"))]
        assert (code, lines) == (130, ["interrupted"]), stderr[-3000:]
        assert not root.exists()
