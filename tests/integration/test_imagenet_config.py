"""The authors' ImageNet recipes (configs/imagenet.yaml, imagenet_sota_{B,L}.yaml on latents, imagenet_pixel_{B,L}.yaml
on pixels) and the latent-MAE configs (configs/mae/imagenet_latent*.yaml) through the CLI, a few CPU steps at tiny
size, and their hyper-parameters against the authors' configs/gen/*.yaml.

The latent run starts from an image folder and no cache: prepare_data encodes it with a tiny VAE, then the tiny DiT
trains on the latents. The overrides go in a second --config file (a YAML ``null`` reaches the encoder's
``checkpoint`` as None there; on the command line it would arrive as a string).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from drifting_lightning.data import latent_shards as shards
from tests.integration.cli_helpers import REPO, run_drifting

TINY_GROUPS = {"positives": {"init_args": {"classes_per_step": 2, "positives_per_class": 4,
                                           "unconditional_per_class": 2, "queue_size": 4,
                                           "unconditional_queue_size": 8, "push_per_step": 4}}}  # fmt: skip
TINY_SAMPLER_GROUPS = {"positives": {"init_args": {"classes_per_step": 2, "positives_per_class": 4,
                                                   "unconditional_per_class": 2}}}  # the MAE configs' ClassAwareSampler
SWEEP = [1.0, 1.1, 1.2, 1.4, 1.6, 1.8, 2.0, 2.5, 3.0, 3.5]
# The authors' configs/gen/<name>.yaml, as our keys: preset, lr, weight decay, warmup, steps, N_c, N_pos, N_unc,
# alpha power k, P(alpha = 1), push per step, their eval alpha sweep.
RECIPES = {
    "imagenet.yaml": ("B/2", 2e-4, 0.01, 5000, 30000, 64, 64, 16, 3.0, 0.0, 64, [1.0, 1.5, 2.0, 2.5, 3.0, 3.5]),
    "imagenet_sota_B.yaml": ("B/2", 4e-4, 0.0, 10000, 200000, 128, 64, 32, 5.0, 0.0, 128, SWEEP),
    "imagenet_sota_L.yaml": ("L/2", 4e-4, 0.01, 10000, 200000, 128, 64, 32, 3.0, 0.5, 64, SWEEP),
    "imagenet_pixel_B.yaml": ("B/16", 2e-4, 0.01, 10000, 100000, 128, 128, 32, 5.0, 0.0, 128, SWEEP),
    "imagenet_pixel_L.yaml": ("L/16", 4e-4, 0.01, 10000, 100000, 128, 128, 32, 5.0, 0.0, 128, SWEEP),
}


@pytest.mark.parametrize("config", sorted(RECIPES))
def test_recipes_hold_the_authors_hyper_parameters(config: str):
    preset, lr, wd, warmup, steps, nc, npos, nunc, power, p1, push, sweep = RECIPES[config]
    cfg = yaml.safe_load((REPO / "configs" / config).read_text())
    model, data = cfg["model"]["init_args"], cfg["data"]["init_args"]
    assert model["generator"]["init_args"]["preset"] == preset
    assert (model["lr"], model["weight_decay"], model["warmup_steps"]) == (lr, wd, warmup)
    assert (model["betas"], model["ema_decay"], model["generated_per_group"]) == ([0.9, 0.95], 0.999, 64)
    assert (cfg["trainer"]["max_steps"], cfg["trainer"]["gradient_clip_val"]) == (steps, 2.0)
    assert model["guidance"]["init_args"] == {"power": power, "alpha_min": 1.0, "alpha_max": 4.0, "p_unguided": p1}
    assert model["loss"]["init_args"] == {"temperatures": [0.02, 0.05, 0.2], "distributed_statistics": True}
    positives = data["positives"]["init_args"]
    assert data["positives"]["class_path"].endswith("ClassQueue")
    assert (positives["classes_per_step"], positives["positives_per_class"]) == (nc, npos)
    assert (positives["unconditional_per_class"], positives["push_per_step"]) == (nunc, push)
    assert (positives["queue_size"], positives["unconditional_queue_size"]) == (128, 1000)
    frechet = next(c for c in cfg["trainer"]["callbacks"] if c["class_path"].endswith("FrechetCallback"))
    assert frechet["init_args"]["alphas"] == sweep and frechet["init_args"]["num_samples"] == 50000
    if "pixel" not in config:
        assert model["vae"] == data["vae"] == "vae/sd-vae-ft-mse"


def trainer_overrides(tmp_path: Path) -> dict:
    return {
        "accelerator": "cpu",
        "precision": 32,
        "max_steps": 2,
        "default_root_dir": str(tmp_path / "runs"),
        "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                   "init_args": {"save_dir": str(tmp_path / "runs")}},
    }  # fmt: skip


def fit(config: str, overrides: dict, tmp_path: Path) -> Path:
    """Run ``drifting fit`` with the overrides; return the run's version folder."""
    path = tmp_path / "overrides.yaml"
    path.write_text(yaml.safe_dump(overrides))
    out = run_drifting("fit", "--config", str(REPO / "configs" / config), "--config", str(path))
    assert out.returncode == 0, out.stderr[-4000:]
    return next((tmp_path / "runs").glob("*/version_0"))


def small_callbacks(config: str, inception_weights: Path) -> list[dict]:
    """The config's own callbacks at test size: the Inception FID on 8 samples with random weights, at the first two
    alphas of the config's sweep (each alpha costs a decode and an Inception pass on the CPU)."""
    callbacks = yaml.safe_load((REPO / "configs" / config).read_text())["trainer"]["callbacks"]
    frechet = next(c for c in callbacks if c["class_path"].endswith("FrechetCallback"))
    frechet["init_args"].update(num_samples=8, num_reference=8, batch_size=4, weights=str(inception_weights),
                                alphas=frechet["init_args"]["alphas"][:2])  # fmt: skip
    return callbacks


@pytest.mark.parametrize("config", ["imagenet.yaml", *(pytest.param(c, marks=pytest.mark.slow)
                                                       for c in ("imagenet_sota_B.yaml", "imagenet_sota_L.yaml"))])
def test_imagenet_latent_config_encodes_then_trains(
    config: str, tmp_path: Path, random_inception_weights: Path, make_tiny_vae, make_image_folder
):
    vae = make_tiny_vae(tmp_path / "vae")
    images = make_image_folder(tmp_path / "images")
    cache = tmp_path / "latents"
    callbacks = small_callbacks(config, random_inception_weights)
    run = fit(
        config,
        {
            "trainer": {**trainer_overrides(tmp_path), "callbacks": callbacks},
            "model": {"init_args": {
                "generator": {"init_args": {"preset": "tiny"}},
                "encoder": {"init_args": {"arch": {"in_channels": 4, "width": 8}, "checkpoint": None}},
                "generated_per_group": 4,
                "vae": str(vae),
            }},
            "data": {"init_args": {
                "root": str(cache), "data": str(images), "vae": str(vae), "resolution": 64, "num_workers": 0,
                "steps_per_epoch": 2, **TINY_GROUPS,
            }},
        },
        tmp_path,
    )  # fmt: skip
    manifest = shards.read_manifest(cache)  # written by prepare_data: 64px images -> 4x32x32 latents
    assert manifest["count"] == 12 and manifest["skipped"] == 1 and manifest["latent_shape"] == [4, 32, 32]
    assert manifest["vae"]["id"] == str(vae) and manifest["resolution"] == 64

    saved = yaml.safe_load((run / "config.yaml").read_text())
    model = saved["model"]["init_args"]
    assert model["generator"]["init_args"]["preset"] == "tiny" and model["lr"] == RECIPES[config][1]
    assert saved["trainer"]["gradient_clip_val"] == 2.0
    assert saved["data"]["class_path"] == "drifting_lightning.data.latents.LatentDataModule"
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 2 and ckpt["LatentDataModule"]["positives"]["step"] == 2
    assert any(p.name.startswith("events.out.tfevents") for p in run.iterdir())
    # The grid and the FID see images decoded by the tiny VAE (64x64 RGB), not 4-channel latents.
    from PIL import Image

    grid = Image.open(run / "grid_final_alpha1.0.png")
    assert grid.mode == "RGB" and grid.size[0] > 8 * 64
    fid = json.loads((run / "fd_inception.json").read_text())
    assert fid["num_samples"] == 8 and fid["alphas"] == RECIPES[config][-1][:2]
    values = fid["history"][-1]
    assert values["step"] == 2 and all(v > 0 for k, v in values.items() if k != "step")


@pytest.mark.parametrize("config", ["imagenet_pixel_B.yaml", "imagenet_pixel_L.yaml"])
def test_imagenet_pixel_config_trains(config: str, tmp_path: Path, make_image_folder):
    images = make_image_folder(tmp_path / "images")
    run = fit(
        config,
        {
            "trainer": trainer_overrides(tmp_path),
            "model": {"init_args": {
                "generator": {"init_args": {"preset": "tiny", "in_channels": 3, "input_size": 32, "patch_size": 4}},
                # their ConvNeXt weights cannot be downloaded here: the pixel MAE alone, tiny and random
                "encoder": {"class_path": "drifting_lightning.encoders.resnet_mae.ResNetMAE", "init_args": {
                    "arch": {"in_channels": 3, "width": 8, "patchify": 8}, "checkpoint": None}},
                "generated_per_group": 4,
            }},
            "data": {"init_args": {"root": str(images), "resolution": 32, "num_workers": 0, "steps_per_epoch": 2,
                                   **TINY_GROUPS}},
        },
        tmp_path,
    )  # fmt: skip
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 2
    encoder = yaml.safe_load((run / "config.yaml").read_text())["model"]["init_args"]["encoder"]["init_args"]
    assert encoder["arch"]["patchify"] == 8


@pytest.mark.parametrize("config", ["mae/imagenet_latent_256.yaml", "mae/imagenet_latent_640.yaml",
                                    "mae/imagenet_pixel_640.yaml"])
def test_mae_configs_train_on_images(config: str, tmp_path: Path, make_tiny_vae, make_image_folder):
    """The MAE configs run on CPU with a tiny VAE (latent: encoded on the fly) and the classifier fine-tune."""
    latent = "latent" in config
    model: dict = {"arch": {"width": 8}, "log_images_every_n_steps": 1, "warmup_steps": 1,
                   "finetune_last_steps": 1, "finetune_warmup": 1}
    if latent:  # the VAE encodes the augmented pixels on the fly
        model["vae"] = str(make_tiny_vae(tmp_path / "vae"))
    checkpoints = tmp_path / "checkpoints"  # not the config's runs/mae/... folder
    overrides = {**trainer_overrides(tmp_path), "devices": 1, "callbacks": [
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"dirpath": str(checkpoints), "save_last": True}}]}
    fit(
        config,
        {
            "trainer": overrides,
            "model": {"init_args": model},
            "data": {"init_args": {"root": str(make_image_folder(tmp_path / "images")), "resolution": 64,
                                   "num_workers": 0, "steps_per_epoch": 2, **TINY_SAMPLER_GROUPS}},
        },
        tmp_path,
    )
    ckpt = torch.load(checkpoints / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 2
    assert ckpt["encoder_config"] == {"in_channels": 4 if latent else 3, "width": 8, "stages": [3, 4, 6, 3],
                                      "patchify": 1 if latent else 8}
