"""VAE latents: load_vae / VAECodec / VAEBridge, encode_latents (crash + resume, refusals), LatentDataModule."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.numpy import load_file

from drifting_lightning.commands.encode_latents import main
from drifting_lightning.data import latent_shards as shards
from drifting_lightning.data.image_sources import center_crop_arr
from drifting_lightning.data.latents import LatentDataModule, encode_latents
from drifting_lightning.encoders.resnet_mae import ResNetConfig, ResNetMAE
from drifting_lightning.encoders.vae_bridge import VAEBridge
from drifting_lightning.models.vae import VAECodec, load_vae, resolve_vae_dir, shared_codec, vae_fingerprint
from drifting_lightning.sampling.positives import ClassAwareSampler
from tests.conftest import FOLDER_CLASSES as CLASSES
from tests.conftest import VAE_RES as RES

REPO = Path(__file__).resolve().parents[2]


def as_input(path: Path) -> torch.Tensor:
    """The encoder's view of one image file: ADM centre crop, [1, 3, RES, RES] in [-1, 1]."""
    with Image.open(path) as image:
        arr = center_crop_arr(image.convert("RGB"), RES)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)[None].float() / 127.5 - 1


# ---- load_vae / VAECodec / VAEBridge ------------------------------------------------------------------------------
def test_load_vae_local_dtype_and_offline_errors(latent_assets, tmp_path, monkeypatch, make_tiny_vae):
    vae = load_vae(str(latent_assets["vae"]), dtype="bfloat16")
    assert next(vae.parameters()).dtype == torch.bfloat16 and not vae.training
    assert not any(p.requires_grad for p in vae.parameters())
    pipeline = tmp_path / "pipeline"
    make_tiny_vae(pipeline / "vae")  # a diffusers pipeline folder: the VAE sits in vae/
    assert resolve_vae_dir(str(pipeline)) == pipeline / "vae"

    with pytest.raises(FileNotFoundError, match="hf download stabilityai/sd-vae-ft-mse --local-dir vae/sd-vae") as err:
        load_vae("vae/sd-vae-ft-mse")
    assert "allow_hub" in str(err.value)
    # a folder named after the other fine-tune is offered that one; any other name the paper's (ft-mse)
    for name, source in [("stabilityai/sd-vae-ft-ema", "sd-vae-ft-ema"), ("vae/mine", "sd-vae-ft-mse")]:
        with pytest.raises(FileNotFoundError, match=f"`hf download stabilityai/{source} --local-dir {name}`"):
            load_vae(name)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_vae(str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="could not fetch .*`hf download drifting-test/no-such-vae"):
        load_vae("drifting-test/no-such-vae", allow_hub=True)  # HF_HUB_OFFLINE=1: nothing cached, nothing fetched

    # With allow_hub a hub id resolves through the hub cache, asking for config + safetensors weights only.
    calls = []

    def fake_snapshot(repo, allow_patterns):
        calls.append((repo, allow_patterns))
        return str(latent_assets["vae"])

    monkeypatch.setattr("huggingface_hub.snapshot_download", fake_snapshot)
    assert resolve_vae_dir("stabilityai/sd-vae-ft-mse", allow_hub=True) == latent_assets["vae"]
    assert calls == [("stabilityai/sd-vae-ft-mse", ["config.json", "diffusion_pytorch_model*.safetensors"])]


def test_codec_posterior_and_decode(latent_assets):
    codec = VAECodec(str(latent_assets["vae"]))
    codec.train()
    assert not codec.vae.training and codec.scale_factor == pytest.approx(0.18215) and codec.downsample == 2
    x = torch.rand(2, 3, RES, RES) * 2 - 1
    mean, std = codec.posterior(x)
    reference = codec.vae.encode(x).latent_dist
    assert mean.shape == std.shape == (2, 4, RES // 2, RES // 2)
    torch.testing.assert_close(mean, reference.mean * 0.18215)
    torch.testing.assert_close(std, reference.std * 0.18215)
    decoded = codec.decode(mean)
    assert decoded.shape == x.shape and decoded.dtype == torch.float32
    torch.testing.assert_close(decoded, codec.vae.decode(reference.mean).sample)

    half = shared_codec(str(latent_assets["vae"]), dtype="bfloat16")
    assert half is shared_codec(str(latent_assets["vae"]), dtype="bfloat16") and half.vae.encoder is None
    assert half.decode(mean).dtype == torch.float32  # computed in bf16, returned in the latents' dtype
    with pytest.raises(RuntimeError, match="keep_encoder=False"):
        half.posterior(x)


def test_vae_bridge_passes_gradients_to_latents(latent_assets):
    pixel = ResNetMAE(ResNetConfig(3, 8, (1, 1, 1, 1), patchify=4))
    bridge = VAEBridge(str(latent_assets["vae"]), pixel)
    assert not any(p.requires_grad for p in bridge.parameters()) and bridge.codec.vae.encoder is None
    z = torch.randn(3, 4, RES // 2, RES // 2, requires_grad=True)
    feats = bridge(z)
    expected = pixel(bridge.codec.decode(z.detach()))
    assert feats.keys() == expected.keys()
    for k in feats:
        torch.testing.assert_close(feats[k], expected[k])
    sum(f.square().mean() for f in feats.values()).backward()
    assert z.grad is not None and torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0
    assert all(p.grad is None for p in bridge.parameters())


# ---- encode_latents ---------------------------------------------------------------------------------------------
def test_cache_contents_manifest_and_corrupt_file(latent_assets):
    manifest = shards.read_manifest(latent_assets["cache"])
    assert manifest["count"] == 12 and manifest["count_per_class"] == [4, 4, 4]
    assert manifest["skipped"] == 1 and manifest["skipped_files"] == ["bee/bad.png"]
    assert manifest["resolution"] == RES and manifest["latent_shape"] == [4, 16, 16]
    assert manifest["scale_factor"] == pytest.approx(0.18215) and manifest["class_names"] == list(CLASSES)
    assert manifest["vae"] == {
        "id": str(latent_assets["vae"]),
        "sha256": vae_fingerprint(str(latent_assets["vae"])),
        "scale_factor": pytest.approx(0.18215),
    }
    assert [s["count"] for s in manifest["shards"]] == [5, 4, 3]  # files 0-4, 5-9 (with bee/bad.png), 10-12
    assert all(s["bytes"] == (latent_assets["cache"] / s["file"]).stat().st_size for s in manifest["shards"])
    assert manifest["arrays"] == ["mean", "sample"] and manifest["config"]["dtype"] == "float16"

    # Sorted listing: ant/0-3 (files 0-3), bee/0-3 (4-7), bee/bad.png (8), cat/0-3 (9-12). Shard 1 holds files
    # 5..9: bee/1, bee/2, bee/3, (bad.png skipped), cat/0.
    path = latent_assets["cache"] / "shard-00001.safetensors"
    index = np.asarray(shards.open_array(path, "index"))
    assert index.tolist() == [5, 6, 7, 9] and np.asarray(shards.open_array(path, "labels")).tolist() == [1, 1, 1, 2]
    mean = np.array(shards.open_array(path, "mean"))
    sample = np.array(shards.open_array(path, "sample"))
    assert mean.shape == sample.shape == (4, 2, 4, 16, 16) and mean.dtype == np.float16
    loaded = load_file(path)  # the shards are plain safetensors files
    assert np.array_equal(loaded["mean"], mean) and np.array_equal(loaded["index"], index)
    codec = VAECodec(str(latent_assets["vae"]))
    x = as_input(latent_assets["images"] / "bee" / "1.png")
    with torch.no_grad():
        m, s = codec.posterior(torch.cat([x, x.flip(-1)]))
    torch.testing.assert_close(torch.from_numpy(mean[0]).float(), m, atol=2e-3, rtol=2e-3)
    eps = torch.from_numpy(np.random.default_rng([0, 5]).standard_normal((2, 4, 16, 16), dtype=np.float32))
    torch.testing.assert_close(torch.from_numpy(sample[0]).float(), m + s * eps, atol=2e-3, rtol=2e-3)


def test_no_cache_and_no_image_folder_names_both_keys(tmp_path):
    module = LatentDataModule(root=str(tmp_path / "latents"), data=str(tmp_path / "imagenet" / "train"), vae="vae")
    with pytest.raises(FileNotFoundError, match=r"data.root .*latents holds no latent cache \(manifest.json\) and "
                                                r"data.data .*train is no image folder"):  # fmt: skip
        module.prepare_data()


def test_manifest_round_trip_and_missing_cache(latent_assets, tmp_path):
    manifest = shards.read_manifest(latent_assets["cache"])
    shards.write_manifest(tmp_path, manifest)
    assert shards.read_manifest(tmp_path) == manifest
    assert (tmp_path / "manifest.json").read_bytes() == (latent_assets["cache"] / "manifest.json").read_bytes()
    with pytest.raises(FileNotFoundError, match="no latent cache. Encode .*`drifting encode-latents"):
        shards.read_manifest(tmp_path / "nothing")
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "shard-00000.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"1 shard\(s\) but no manifest.json \(an unfinished encode\)"):
        shards.read_manifest(partial)
    (tmp_path / "manifest.json").write_text(json.dumps({**manifest, "format": "other/0"}))
    with pytest.raises(ValueError, match="re-encode"):
        shards.read_manifest(tmp_path)


def test_damaged_shard_reencoded_and_ranks_share_the_work(latent_assets, tmp_path, caplog, files_of):
    kw = dict(resolution=RES, batch_size=3, shard_size=5, device="cpu", progress=False)
    out = tmp_path / "ranks"
    assert encode_latents(latent_assets["images"], str(latent_assets["vae"]), out, rank=1, world_size=2, **kw) is None
    assert sorted(p.name for p in out.iterdir()) == ["shard-00001.safetensors"]  # rank 1 of 2: shard 1 only
    assert (
        encode_latents(latent_assets["images"], str(latent_assets["vae"]), out, rank=0, world_size=2, **kw) is not None
    )
    assert files_of(out) == files_of(latent_assets["cache"])

    (out / "manifest.json").unlink()
    shard = out / "shard-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-10])  # damaged after the fact: the header promises more bytes
    assert shards.shard_metadata(shard) is None
    encode_latents(latent_assets["images"], str(latent_assets["vae"]), out, **kw)
    assert "damaged" in caplog.text and files_of(out) == files_of(latent_assets["cache"])


def test_mismatched_vae_or_resolution_is_refused(latent_assets, tmp_path):
    kw = dict(batch_size=3, shard_size=5, device="cpu", progress=False)
    with pytest.raises(ValueError, match="vae_sha256: cache has .*another --out folder"):
        encode_latents(
            latent_assets["images"], str(latent_assets["other_vae"]), latent_assets["cache"], resolution=RES, **kw
        )
    with pytest.raises(ValueError, match="resolution: cache has 32, requested 48"):
        encode_latents(latent_assets["images"], str(latent_assets["vae"]), latent_assets["cache"], resolution=48, **kw)
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "shard-00000.safetensors").write_bytes((latent_assets["cache"] / "shard-00000.safetensors").read_bytes())
    with pytest.raises(ValueError, match="belongs to another encoding: .*seed: cache has 0, requested 1"):
        encode_latents(latent_assets["images"], str(latent_assets["vae"]), partial, resolution=RES, seed=1, **kw)

    dm = LatentDataModule(str(latent_assets["cache"]), vae=str(latent_assets["other_vae"]), resolution=RES)
    with pytest.raises(ValueError, match="was encoded with VAE .* has other weights"):
        dm.prepare_data()
    with pytest.raises(ValueError, match="latents of 32px images, data.resolution is 64: set resolution: 32"):
        LatentDataModule(str(latent_assets["cache"]), resolution=64).setup()
    with pytest.raises(FileNotFoundError, match="drifting encode-latents"):
        LatentDataModule(str(tmp_path / "none")).prepare_data()


def test_main_mean_only_and_imagenet_layout(latent_assets, tmp_path, capsys, make_image_folder):
    imagenet = tmp_path / "imagenet"
    make_image_folder(imagenet / "train", per_class=2, corrupt=False)
    make_image_folder(imagenet / "val", per_class=1, corrupt=False)
    out = tmp_path / "means"
    code = main(
        [
            "--data",
            str(imagenet),
            "--vae",
            str(latent_assets["vae"]),
            "--out",
            str(out),
            "--resolution",
            str(RES),
            "--mean-only",
            "--dtype",
            "float32",
            "--device",
            "cpu",
            "--num-workers",
            "0",
            "--no-progress",
        ]
    )
    assert code == 0 and "6 latents [4, 16, 16] of 3 classes in 1 shard(s); 0 unreadable" in capsys.readouterr().out
    manifest = shards.read_manifest(out)
    assert manifest["arrays"] == ["mean"] and manifest["count_per_class"] == [2, 2, 2]  # train/ only
    assert shards.open_array(out / "shard-00000.safetensors", "mean").dtype == np.float32
    with pytest.raises(ValueError, match="posterior means only .* use_mean: true"):
        LatentDataModule(str(out), resolution=RES).setup()
    dm = LatentDataModule(str(out), positives=ClassAwareSampler(3, 2), resolution=None, use_mean=True)
    dm.setup()
    assert next(iter(dm.train_dataloader()))["positives"].shape == (3, 2, 4, 16, 16)
