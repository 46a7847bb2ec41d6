"""The `drifting` command: list, short component names, clear errors, a toy fit that writes its outputs."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from tests.integration.cli_helpers import REPO, run_drifting, run_drifting_subprocess

TOY = str(REPO / "configs" / "toy" / "checkerboard.yaml")
FAST = ["--trainer.max_steps", "4", "--model.init_args.generated_per_group", "64",
        "--data.init_args.positives_per_step", "64"]


def test_list_prints_every_kind_with_docs_and_args():
    out = run_drifting_subprocess("list")  # the real entry point, once
    assert out.returncode == 0, out.stderr
    for name in ("kernels:", "Laplace", "Gaussian", "Cauchy", "fields:", "MeanShift", "MMD", "SinkhornDrift",
                 "generators:", "MLPGenerator", "DiT", "encoders:", "Identity", "data:", "ToyDataModule"):
        assert name in out.stdout, name
    assert "args: normalization='both'" in out.stdout


def test_list_unknown_kind_suggests():
    out = run_drifting("list", "kernals")
    assert out.returncode == 2
    assert "did you mean 'kernels'" in out.stderr


def test_unknown_component_name_gets_did_you_mean():
    out = run_drifting("fit", "--config", TOY, "--model.init_args.loss.init_args.kernel", "Gausian", *FAST)
    assert out.returncode != 0
    assert "did you mean 'Gaussian'" in out.stderr


def test_missing_config_file_is_named():
    out = run_drifting("fit", "--config", "configs/does_not_exist.yaml")
    assert out.returncode != 0
    assert "does_not_exist.yaml" in out.stderr
    assert "Traceback" not in out.stderr


def test_malformed_config_is_reported(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    out = run_drifting("fit", "--config", str(bad))
    assert out.returncode != 0
    assert "bad.yaml" in out.stderr
    assert "Traceback" not in out.stderr


def test_swap_kernel_and_field_by_short_name_and_fit_writes_outputs(tmp_path: Path):
    out = run_drifting(
        "fit", "--config", TOY, *FAST,
        "--model.loss.kernel", "Gaussian", "--model.loss.field", "SinkhornDrift",
        "--trainer.logger.init_args.save_dir", str(tmp_path),
    )
    assert out.returncode == 0, out.stderr[-3000:]
    run = next((tmp_path / "checkerboard").glob("version_*"))
    config = yaml.safe_load((run / "config.yaml").read_text())
    loss = config["model"]["init_args"]["loss"]["init_args"]
    assert loss["kernel"]["class_path"].endswith("Gaussian")
    assert loss["field"]["class_path"].endswith("SinkhornDrift")
    assert (run / "samples_final.png").stat().st_size > 1000
    assert list(run.glob("events.out.tfevents.*"))
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics  # the energy distance callback wrote its value
    assert list((run / "checkpoints").glob("*.ckpt"))


def test_print_config_round_trips(tmp_path: Path):
    first = run_drifting("fit", "--config", TOY, "--model.loss.kernel", "Cauchy", "--print_config")
    assert first.returncode == 0, first.stderr
    saved = tmp_path / "printed.yaml"
    saved.write_text(first.stdout)
    second = run_drifting("fit", "--config", str(saved), "--print_config")
    assert second.returncode == 0, second.stderr
    assert yaml.safe_load(first.stdout) == yaml.safe_load(second.stdout)
    assert "Cauchy" in first.stdout


def test_ctrl_c_in_a_tool_command_is_a_short_message(capsys, monkeypatch):
    from drifting_lightning import cli
    from drifting_lightning.commands import sample

    def interrupted(argv):
        raise KeyboardInterrupt

    monkeypatch.setattr(sample, "main", interrupted)
    assert cli.main(["sample", "--ckpt", "x.ckpt", "--out", "x.npz"]) == 130
    assert capsys.readouterr().err.strip() == "interrupted"
