"""VAE latents: load_vae / VAECodec / VAEBridge, encode_latents (crash + resume, refusals), LatentDataModule."""

from __future__ import annotations

import json
import os
import pickle
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image
from safetensors.numpy import load_file

from drifting_lightning.data import latent_shards as shards
from drifting_lightning.data.image_sources import center_crop_arr
from drifting_lightning.data.latents import LatentDataModule, encode_latents, main
from drifting_lightning.data.vae import VAECodec, load_vae, resolve_vae_dir, shared_codec, vae_fingerprint
from drifting_lightning.encoders.resnet_mae import ResNetConfig, ResNetMAE
from drifting_lightning.encoders.vae_bridge import VAEBridge
from drifting_lightning.sampling.positives import ClassAwareSampler

REPO = Path(__file__).resolve().parents[2]
RES = 32  # images 32x32 -> latents 4x16x16 with the tiny VAE (one 2x down-sampling)
CLASSES = ("ant", "bee", "cat")


def make_tiny_vae(path: Path, seed: int = 0) -> Path:
    """A 44k-parameter AutoencoderKL (2x down-sampling, 4 latent channels) saved with save_pretrained."""
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=RES,
    )
    vae.save_pretrained(path)
    return path


def make_image_folder(root: Path, per_class: int = 4, corrupt: bool = True) -> Path:
    """Random RGB images of assorted sizes in root/<class>/, plus one corrupt file in bee/ (12 + 1 files)."""
    rng = np.random.default_rng(0)
    for name in CLASSES:
        (root / name).mkdir(parents=True)
        for j in range(per_class):
            size = (RES + 5 * j, RES + 9)
            Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(root / name / f"{j}.png")
    if corrupt:
        (root / "bee" / "bad.png").write_bytes(b"not a png")
    return root


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("latents")
    paths = {
        "vae": make_tiny_vae(base / "vae"),
        "other_vae": make_tiny_vae(base / "other_vae", seed=1),
        "images": make_image_folder(base / "images"),
    }
    paths["cache"] = base / "cache"
    encode_latents(
        paths["images"],
        str(paths["vae"]),
        paths["cache"],
        resolution=RES,
        batch_size=3,
        shard_size=5,
        device="cpu",
        progress=False,
    )
    return paths


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def as_input(path: Path) -> torch.Tensor:
    """The encoder's view of one image file: ADM centre crop, [1, 3, RES, RES] in [-1, 1]."""
    with Image.open(path) as image:
        arr = center_crop_arr(image.convert("RGB"), RES)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)[None].float() / 127.5 - 1


# ---- load_vae / VAECodec / VAEBridge ------------------------------------------------------------------------------
def test_load_vae_local_dtype_and_offline_errors(assets, tmp_path, monkeypatch):
    vae = load_vae(str(assets["vae"]), dtype="bfloat16")
    assert next(vae.parameters()).dtype == torch.bfloat16 and not vae.training
    assert not any(p.requires_grad for p in vae.parameters())
    pipeline = tmp_path / "pipeline"
    make_tiny_vae(pipeline / "vae")  # a diffusers pipeline folder: the VAE sits in vae/
    assert resolve_vae_dir(str(pipeline)) == pipeline / "vae"

    with pytest.raises(FileNotFoundError, match="hf download stabilityai/sd-vae-ft-ema --local-dir vae/sd-vae") as err:
        load_vae("vae/sd-vae-ft-ema")
    assert "allow_hub" in str(err.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_vae(str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="could not fetch .*`hf download drifting-test/no-such-vae"):
        load_vae("drifting-test/no-such-vae", allow_hub=True)  # HF_HUB_OFFLINE=1: nothing cached, nothing fetched

    # With allow_hub a hub id resolves through the hub cache, asking for config + safetensors weights only.
    calls = []

    def fake_snapshot(repo, allow_patterns):
        calls.append((repo, allow_patterns))
        return str(assets["vae"])

    monkeypatch.setattr("huggingface_hub.snapshot_download", fake_snapshot)
    assert resolve_vae_dir("stabilityai/sd-vae-ft-ema", allow_hub=True) == assets["vae"]
    assert calls == [("stabilityai/sd-vae-ft-ema", ["config.json", "diffusion_pytorch_model*.safetensors"])]


def test_codec_encode_decode_round_trip(assets):
    codec = VAECodec(str(assets["vae"]))
    codec.train()
    assert not codec.vae.training and codec.scale_factor == pytest.approx(0.18215) and codec.downsample == 2
    x = torch.rand(2, 3, RES, RES) * 2 - 1
    mean = codec.encode(x, sample_posterior=False)
    reference = codec.vae.encode(x).latent_dist
    assert mean.shape == (2, 4, RES // 2, RES // 2)
    torch.testing.assert_close(mean, reference.mean * 0.18215)
    g = torch.Generator().manual_seed(3)
    sample = codec.encode(x, generator=g)
    eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(sample, (reference.mean + reference.std * eps) * 0.18215)
    decoded = codec.decode(mean)
    assert decoded.shape == x.shape and decoded.dtype == torch.float32
    torch.testing.assert_close(decoded, codec.vae.decode(reference.mean).sample)

    half = shared_codec(str(assets["vae"]), dtype="bfloat16")
    assert half is shared_codec(str(assets["vae"]), dtype="bfloat16") and half.vae.encoder is None
    assert half.decode(mean).dtype == torch.float32  # computed in bf16, returned in the latents' dtype
    with pytest.raises(RuntimeError, match="keep_encoder=False"):
        half.encode(x)


def test_vae_bridge_passes_gradients_to_latents(assets):
    pixel = ResNetMAE(ResNetConfig(3, 8, (1, 1, 1, 1), patchify=4))
    bridge = VAEBridge(str(assets["vae"]), pixel)
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
def test_cache_contents_manifest_and_corrupt_file(assets):
    manifest = shards.read_manifest(assets["cache"])
    assert manifest["count"] == 12 and manifest["count_per_class"] == [4, 4, 4]
    assert manifest["skipped"] == 1 and manifest["skipped_files"] == ["bee/bad.png"]
    assert manifest["resolution"] == RES and manifest["latent_shape"] == [4, 16, 16]
    assert manifest["scale_factor"] == pytest.approx(0.18215) and manifest["class_names"] == list(CLASSES)
    assert manifest["vae"] == {
        "id": str(assets["vae"]),
        "sha256": vae_fingerprint(str(assets["vae"])),
        "scale_factor": pytest.approx(0.18215),
    }
    assert [s["count"] for s in manifest["shards"]] == [5, 4, 3]  # files 0-4, 5-9 (with bee/bad.png), 10-12
    assert all(s["bytes"] == (assets["cache"] / s["file"]).stat().st_size for s in manifest["shards"])
    assert manifest["arrays"] == ["mean", "sample"] and manifest["config"]["dtype"] == "float16"

    # Sorted listing: ant/0-3 (files 0-3), bee/0-3 (4-7), bee/bad.png (8), cat/0-3 (9-12). Shard 1 holds files
    # 5..9: bee/1, bee/2, bee/3, (bad.png skipped), cat/0.
    path = assets["cache"] / "shard-00001.safetensors"
    index = np.asarray(shards.open_array(path, "index"))
    assert index.tolist() == [5, 6, 7, 9] and np.asarray(shards.open_array(path, "labels")).tolist() == [1, 1, 1, 2]
    mean = np.array(shards.open_array(path, "mean"))
    sample = np.array(shards.open_array(path, "sample"))
    assert mean.shape == sample.shape == (4, 2, 4, 16, 16) and mean.dtype == np.float16
    loaded = load_file(path)  # the shards are plain safetensors files
    assert np.array_equal(loaded["mean"], mean) and np.array_equal(loaded["index"], index)
    codec = VAECodec(str(assets["vae"]))
    x = as_input(assets["images"] / "bee" / "1.png")
    with torch.no_grad():
        m, s = codec.posterior(torch.cat([x, x.flip(-1)]))
    torch.testing.assert_close(torch.from_numpy(mean[0]).float(), m, atol=2e-3, rtol=2e-3)
    eps = torch.from_numpy(np.random.default_rng([0, 5]).standard_normal((2, 4, 16, 16), dtype=np.float32))
    torch.testing.assert_close(torch.from_numpy(sample[0]).float(), m + s * eps, atol=2e-3, rtol=2e-3)


def test_manifest_round_trip_and_missing_cache(assets, tmp_path):
    manifest = shards.read_manifest(assets["cache"])
    shards.write_manifest(tmp_path, manifest)
    assert shards.read_manifest(tmp_path) == manifest
    assert (tmp_path / "manifest.json").read_bytes() == (assets["cache"] / "manifest.json").read_bytes()
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


def test_stale_temporaries_of_dead_or_old_writers_are_removed(tmp_path):
    host = socket.gethostname()
    shard = tmp_path / "shard-00003.safetensors"
    names = {
        "dead": f".{shard.name}.tmp-{host}-{_dead_pid()}",
        "live": f".{shard.name}.tmp-{host}-{os.getpid()}",
        "other_host": f".{shard.name}.tmp-elsewhere-{os.getpid()}",
        "other_host_old": f".{shard.name}.tmp-elsewhere-1",
    }
    for name in names.values():
        (tmp_path / name).write_bytes(b"partial")
    os.utime(tmp_path / names["other_host_old"], (0, 0))
    shards.remove_stale_temporaries(shard)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([names["live"], names["other_host"]])


def _dead_pid() -> int:
    """The pid of a process that has exited (not reused within the test, in practice)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


_KILLED_RUN = """
import os, signal, sys
from drifting_lightning.data import latent_shards
from drifting_lightning.data.latents import main

real_write, calls = latent_shards.write_safetensors, []

def write_then_die(arrays, filename, metadata):
    calls.append(filename)
    if len(calls) == 1:
        return real_write(arrays, filename, metadata)
    with open(filename, "wb") as f:  # SIGKILL halfway through writing the second shard
        f.write(b"\\0" * 100)
    os.kill(os.getpid(), signal.SIGKILL)

latent_shards.write_safetensors = write_then_die
main(sys.argv[1:])
"""


def test_killed_encode_resumes_to_the_same_bytes(assets, tmp_path):
    args = [
        "--data",
        str(assets["images"]),
        "--vae",
        str(assets["vae"]),
        "--resolution",
        str(RES),
        "--batch-size",
        "3",
        "--shard-size",
        "5",
        "--device",
        "cpu",
        "--num-workers",
        "0",
        "--no-progress",
    ]
    out = tmp_path / "cache"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    killed = subprocess.run(
        [sys.executable, "-c", _KILLED_RUN, *args, "--out", str(out)],
        env=env,
        timeout=120,
        capture_output=True,
        text=True,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    names = sorted(p.name for p in out.iterdir())
    assert names[0].startswith(".shard-00001.safetensors.tmp-") and names[1:] == ["shard-00000.safetensors"]
    first = (out / "shard-00000.safetensors").stat()

    assert main([*args, "--out", str(out)]) == 0
    assert files_of(out) == files_of(assets["cache"])  # same names, same bytes; the partial temporary is gone
    assert (out / "shard-00000.safetensors").stat().st_mtime_ns == first.st_mtime_ns  # not encoded twice


def test_damaged_shard_reencoded_and_ranks_share_the_work(assets, tmp_path, caplog):
    kw = dict(resolution=RES, batch_size=3, shard_size=5, device="cpu", progress=False)
    out = tmp_path / "ranks"
    assert encode_latents(assets["images"], str(assets["vae"]), out, rank=1, world_size=2, **kw) is None
    assert sorted(p.name for p in out.iterdir()) == ["shard-00001.safetensors"]  # rank 1 of 2: shard 1 only
    assert encode_latents(assets["images"], str(assets["vae"]), out, rank=0, world_size=2, **kw) is not None
    assert files_of(out) == files_of(assets["cache"])

    (out / "manifest.json").unlink()
    shard = out / "shard-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-10])  # damaged after the fact: the header promises more bytes
    assert shards.shard_metadata(shard) is None
    encode_latents(assets["images"], str(assets["vae"]), out, **kw)
    assert "damaged" in caplog.text and files_of(out) == files_of(assets["cache"])


def test_mismatched_vae_or_resolution_is_refused(assets, tmp_path):
    kw = dict(batch_size=3, shard_size=5, device="cpu", progress=False)
    with pytest.raises(ValueError, match="vae_sha256: cache has .*another --out folder"):
        encode_latents(assets["images"], str(assets["other_vae"]), assets["cache"], resolution=RES, **kw)
    with pytest.raises(ValueError, match="resolution: cache has 32, requested 48"):
        encode_latents(assets["images"], str(assets["vae"]), assets["cache"], resolution=48, **kw)
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "shard-00000.safetensors").write_bytes((assets["cache"] / "shard-00000.safetensors").read_bytes())
    with pytest.raises(ValueError, match="belongs to another encoding: .*seed: cache has 0, requested 1"):
        encode_latents(assets["images"], str(assets["vae"]), partial, resolution=RES, seed=1, **kw)

    dm = LatentDataModule(str(assets["cache"]), vae=str(assets["other_vae"]), resolution=RES)
    with pytest.raises(ValueError, match="was encoded with VAE .* has other weights"):
        dm.prepare_data()
    with pytest.raises(ValueError, match="latents of 32px images, data.resolution is 64: set resolution: 32"):
        LatentDataModule(str(assets["cache"]), resolution=64).setup()
    with pytest.raises(FileNotFoundError, match="drifting encode-latents"):
        LatentDataModule(str(tmp_path / "none")).prepare_data()


# ---- LatentDataModule --------------------------------------------------------------------------------------------
def test_latent_datamodule_batches_flips_and_state(assets):
    def make(**kw) -> LatentDataModule:
        return LatentDataModule(
            str(assets["cache"]), positives=ClassAwareSampler(2, 3, 2), steps_per_epoch=6, resolution=RES, **kw
        )

    dm = make(vae=str(assets["vae"]))
    dm.prepare_data()
    dm.setup()
    assert dm.sample_shape == (4, 16, 16) and dm.num_classes == 3
    assert dm.vae_path == str(assets["vae"]) and dm.scale_factor == pytest.approx(0.18215)
    assert make().vae_path == str(assets["vae"])  # from the manifest
    stored = {}  # per class: every stored latent (image and flip) as bytes
    for p in sorted(assets["cache"].glob("shard-*.safetensors")):
        sample, labels = shards.open_array(p, "sample"), shards.open_array(p, "labels")
        for latents, c in zip(sample, labels):
            stored.setdefault(int(c), []).append([v.astype(np.float32).tobytes() for v in latents])
    batches = list(dm.train_dataloader())
    assert len(batches) == 6
    views = []
    for b in batches:
        assert b["positives"].shape == (2, 3, 4, 16, 16) and b["unconditional"].shape == (2, 2, 4, 16, 16)
        assert b["labels"].shape == (2,) and b["labels"].dtype == torch.int64
        for row, c in zip(b["positives"], b["labels"].tolist()):
            for latent in row:  # each positive is a stored latent of its group's class, image or flip
                view = [v.index(latent.numpy().tobytes()) for v in stored[c] if latent.numpy().tobytes() in v]
                assert len(view) == 1
                views.append(view[0])
    assert 0 < sum(views) < len(views)  # both the image and the flip are drawn

    resumed = make()
    resumed.load_state_dict({"positives": {"kind": "ClassAwareSampler", "seed": 0, "step": 4}})
    resumed.setup()
    for a, b in zip(batches[4:], list(resumed.train_dataloader())):
        assert all(torch.equal(a[k], b[k]) for k in a)

    source = dm.source("train")
    assert len(pickle.dumps(source)) < 20_000  # workers reopen the memory maps, no array data is sent
    workers = make(num_workers=2)
    workers.setup()
    for a, b in zip(batches, list(workers.train_dataloader()), strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)
    real, labels = dm.real_samples(5, seed=1)
    assert real.shape == (5, 4, 16, 16) and torch.equal(real, dm.real_samples(5, seed=1)[0])
    means = make(use_mean=True)
    means.setup()
    first = np.asarray(shards.open_array(assets["cache"] / "shard-00000.safetensors", "mean")[0, 0]).astype(np.float32)
    torch.testing.assert_close(means.source("train").load(np.array([0]))[0], torch.from_numpy(first))
    with pytest.raises(ValueError, match="needs val_root"):
        dm.real_samples(2, "val")


def test_main_mean_only_and_imagenet_layout(assets, tmp_path, capsys):
    imagenet = tmp_path / "imagenet"
    make_image_folder(imagenet / "train", per_class=2, corrupt=False)
    make_image_folder(imagenet / "val", per_class=1, corrupt=False)
    out = tmp_path / "means"
    code = main(
        [
            "--data",
            str(imagenet),
            "--vae",
            str(assets["vae"]),
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


@pytest.mark.slow
def test_encode_benchmark_quick_prints_its_table():
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "encode_latents.py"), "--quick"],
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert "| VAE | parameters | batch | VAE only img/s | end to end img/s | ImageNet train (1.28M) |" in out.stdout
    assert re.search(r"^\| tiny VAE \| 0\.08M \| 8 \| [\d.]+ \| [\d.]+ \| [\d,]+ h \|$", out.stdout, re.M)


def test_latent_generator_trains_through_vae_bridge(assets, tmp_path):
    import lightning as L

    from drifting_lightning.models.dit import DiT
    from drifting_lightning.module import DriftingModule

    dm = LatentDataModule(str(assets["cache"]), positives=ClassAwareSampler(2, 3, 2), steps_per_epoch=2, resolution=RES)
    pixel = ResNetMAE(ResNetConfig(3, 8, (1, 1, 1, 1), patchify=4))
    module = DriftingModule(DiT("tiny", input_size=16, num_classes=3), encoder=VAEBridge(str(assets["vae"]), pixel),
                            generated_per_group=3)  # fmt: skip
    zero = [p for p in module.generator.parameters() if not p.detach().any()]  # zero-initialised output layer
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(module, dm)
    assert trainer.global_step == 2 and torch.isfinite(trainer.callback_metrics["train/loss"])
    # Only a gradient moves a zero weight (weight decay keeps it at 0): the drift gradient reached the generator
    # through the pixel encoder and the VAE decoder.
    assert zero and any(p.detach().any() for p in zero)
    assert not any(p.requires_grad for p in module.encoder.parameters())


_CTRL_C_RUN = """
import os, signal, sys
from drifting_lightning.data import latent_shards
from drifting_lightning.data.latents import main

real_write = latent_shards.write_encoded_shard

def write_then_ctrl_c(*args, **kwargs):
    real_write(*args, **kwargs)  # the first shard is complete
    os.killpg(os.getpgid(0), signal.SIGINT)  # Ctrl-C reaches the whole process group, workers included

latent_shards.write_encoded_shard = write_then_ctrl_c
sys.exit(main(sys.argv[1:]))
"""


def test_ctrl_c_keeps_the_complete_shards_and_says_how_to_resume(assets, tmp_path):
    args = ["--data", str(assets["images"]), "--vae", str(assets["vae"]), "--resolution", str(RES), "--batch-size",
            "3", "--shard-size", "5", "--device", "cpu", "--num-workers", "2", "--no-progress"]  # fmt: skip
    out = tmp_path / "cache"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    stopped = subprocess.run([sys.executable, "-c", _CTRL_C_RUN, *args, "--out", str(out)], env=env, timeout=120,
                             capture_output=True, text=True, start_new_session=True)  # fmt: skip
    assert stopped.returncode == 130, stopped.stderr[-2000:]
    assert f"interrupted: the complete shards in {out} are kept" in stopped.stderr
    assert "Traceback" not in stopped.stderr, stopped.stderr[-2000:]
    assert (out / "shard-00000.safetensors").is_file() and not (out / shards.MANIFEST).exists()
    assert main([*args, "--out", str(out)]) == 0
    assert files_of(out) == files_of(assets["cache"])
