"""Every config in configs/ parses, round-trips through --print_config, and runs a few CPU steps (here, or in the
dedicated test named in COVERED_ELSEWHERE)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import yaml

from tests.integration.cli_helpers import REPO, run_drifting

CONFIGS = sorted(str(p.relative_to(REPO)) for p in (REPO / "configs").rglob("*.yaml"))

TOY_TINY = ["--model.init_args.generated_per_group", "32", "--data.init_args.positives_per_step", "32"]
TINY_POSITIVES = ["--data.init_args.positives.init_args.positives_per_class", "4"]
CHECKPOINT_IN_TMP = (
    '[{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", '
    '"init_args": {"dirpath": "{tmp}/checkpoints", "save_last": true}}]'
)

# Per config: overrides that keep a run to a few seconds on CPU ({tmp} is the test's tmp_path).
RUNS: dict[str, list[str]] = {
    **{c: TOY_TINY for c in CONFIGS if c.startswith("configs/toy/")},
    "configs/digits.yaml": ["--model.init_args.generated_per_group", "4", *TINY_POSITIVES,
                            "--data.init_args.positives.init_args.unconditional_per_class", "2"],
    # Their ModelCheckpoint writes to a fixed dirpath under runs/ (where encoders read it): redirect it.
    "configs/mae/digits.yaml": ["--model.init_args.arch.width", "8", *TINY_POSITIVES,
                                "--trainer.callbacks", CHECKPOINT_IN_TMP],
    "configs/mae/fashion_mnist.yaml": ["--model.init_args.arch.width", "8", "--data.init_args.root", "{tmp}",
                                       *TINY_POSITIVES, "--trainer.callbacks", CHECKPOINT_IN_TMP],
}

# Configs whose few-step run needs fixtures built by their own test.
COVERED_ELSEWHERE = {
    "configs/classifier/fashion_mnist.yaml": "tests/integration/test_classifier_config.py",
    "configs/fashion_mnist.yaml": "tests/integration/test_fashion_configs.py",
    "configs/fashion_mnist_mae.yaml": "tests/integration/test_fashion_configs.py",
    **{f"configs/imagenet{name}.yaml": "tests/integration/test_imagenet_config.py"
       for name in ("", "_sota_B", "_sota_L", "_pixel_B", "_pixel_L")},
    "configs/mae/imagenet_latent_256.yaml": "tests/integration/test_imagenet_config.py",
    "configs/mae/imagenet_latent_640.yaml": "tests/integration/test_imagenet_config.py",
    "configs/mae/imagenet_pixel_640.yaml": "tests/integration/test_imagenet_config.py",
}


def test_every_config_is_exercised():
    for config in CONFIGS:
        assert config in RUNS or config in COVERED_ELSEWHERE, f"{config} is run by no test: add it to RUNS"
    for path in COVERED_ELSEWHERE.values():
        assert (REPO / path).exists(), path


@pytest.mark.parametrize("config", CONFIGS)
def test_config_parses_and_print_config_round_trips(config: str, tmp_path: Path):
    first = run_drifting("fit", "--config", config, "--print_config")
    assert first.returncode == 0, first.stderr[-3000:]
    saved = tmp_path / "printed.yaml"
    saved.write_text(first.stdout)
    second = run_drifting("fit", "--config", str(saved), "--print_config")
    assert second.returncode == 0, second.stderr[-3000:]
    assert yaml.safe_load(first.stdout) == yaml.safe_load(second.stdout)


@pytest.mark.parametrize("config", [c for c in CONFIGS if c.startswith("configs/mae/")])
def test_mae_configs_write_their_checkpoint_where_their_header_says(config: str):
    text = (REPO / config).read_text()
    trainer = yaml.safe_load(text)["trainer"]
    keepers = [c for c in trainer["callbacks"] if c["class_path"].endswith("ModelCheckpoint")]
    dirpaths = [c["init_args"].get("dirpath") for c in keepers]
    assert dirpaths == [f"{trainer['default_root_dir']}/checkpoints"]
    named = set(re.findall(r"runs/\S+\.ckpt", text))  # where the header tells users to find the encoder
    assert named <= {f"{dirpaths[0]}/last.ckpt"}


@pytest.mark.parametrize("config", sorted(RUNS))
def test_config_runs_a_few_cpu_steps(config: str, tmp_path: Path, fashion_mnist_files):
    fashion_mnist_files(tmp_path)
    overrides = [o.replace("{tmp}", str(tmp_path)) for o in RUNS[config]]
    out = run_drifting(
        "fit", "--config", config, *overrides,
        "--trainer.max_steps", "2", "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
        "--trainer.default_root_dir", str(tmp_path), "--trainer.logger", "false",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    # Two optimiser steps were taken and checkpointed.
    checkpoints = sorted(tmp_path.glob("**/checkpoints/*.ckpt"), key=lambda p: p.stat().st_mtime)
    assert checkpoints, "no checkpoint written"
    assert torch.load(checkpoints[-1], map_location="cpu", weights_only=False)["global_step"] == 2
