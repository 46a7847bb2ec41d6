"""encode-latents and latent training in processes: a killed or interrupted encode resumes, stale temporaries of
dead writers go, the benchmark, LatentDataModule with workers, a latent generator trained through the VAE bridge."""

from __future__ import annotations

import os
import pickle
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from drifting_lightning.commands.encode_latents import main
from drifting_lightning.data import latent_shards as shards
from drifting_lightning.data.latents import LatentDataModule
from drifting_lightning.encoders.resnet_mae import ResNetConfig, ResNetMAE
from drifting_lightning.encoders.vae_bridge import VAEBridge
from drifting_lightning.sampling.positives import ClassAwareSampler
from tests.conftest import VAE_RES as RES

REPO = Path(__file__).resolve().parents[2]


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
from drifting_lightning.commands.encode_latents import main

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


def test_killed_encode_resumes_to_the_same_bytes(latent_assets, tmp_path, files_of):
    args = [
        "--data",
        str(latent_assets["images"]),
        "--vae",
        str(latent_assets["vae"]),
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
    assert files_of(out) == files_of(latent_assets["cache"])  # same names, same bytes; the partial temporary is gone
    assert (out / "shard-00000.safetensors").stat().st_mtime_ns == first.st_mtime_ns  # not encoded twice


# ---- LatentDataModule --------------------------------------------------------------------------------------------
def test_latent_datamodule_batches_flips_and_state(latent_assets):
    def make(**kw) -> LatentDataModule:
        return LatentDataModule(
            str(latent_assets["cache"]), positives=ClassAwareSampler(2, 3, 2), steps_per_epoch=6, resolution=RES, **kw
        )

    dm = make(vae=str(latent_assets["vae"]))
    dm.prepare_data()
    dm.setup()
    assert dm.sample_shape == (4, 16, 16) and dm.num_classes == 3
    assert dm.vae_path == str(latent_assets["vae"]) and dm.scale_factor == pytest.approx(0.18215)
    assert make().vae_path == str(latent_assets["vae"])  # from the manifest
    stored = {}  # per class: every stored latent (image and flip) as bytes
    for p in sorted(latent_assets["cache"].glob("shard-*.safetensors")):
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
    first = np.asarray(shards.open_array(latent_assets["cache"] / "shard-00000.safetensors", "mean")[0, 0]).astype(
        np.float32
    )
    torch.testing.assert_close(means.source("train").load(np.array([0]))[0], torch.from_numpy(first))
    with pytest.raises(ValueError, match="needs val_root"):
        dm.real_samples(2, "val")


@pytest.mark.slow
def test_encode_benchmark_quick_measures_the_tiny_vae(capsys):
    sys.path.insert(0, str(REPO / "benchmarks"))
    import encode_latents as bench

    (row,) = bench.main(["--quick"])
    assert (row["vae"], row["batch"]) == ("tiny VAE", 8) and 0.05e6 < row["parameters"] < 0.1e6
    assert row["vae_images_per_s"] > 0 and row["end_to_end_images_per_s"] > 0
    assert row["imagenet_hours"] == pytest.approx(1_281_167 / row["end_to_end_images_per_s"] / 3600)
    assert "| tiny VAE |" in capsys.readouterr().out


def test_latent_generator_trains_through_vae_bridge(latent_assets, tmp_path):
    import lightning as L

    from drifting_lightning.models.dit import DiT
    from drifting_lightning.module import DriftingModule

    dm = LatentDataModule(
        str(latent_assets["cache"]), positives=ClassAwareSampler(2, 3, 2), steps_per_epoch=2, resolution=RES
    )
    pixel = ResNetMAE(ResNetConfig(3, 8, (1, 1, 1, 1), patchify=4))
    bridge = VAEBridge(str(latent_assets["vae"]), pixel)
    module = DriftingModule(DiT("tiny", input_size=16, num_classes=3), encoder=bridge, generated_per_group=3)
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
from drifting_lightning.commands.encode_latents import main

real_write = latent_shards.write_encoded_shard

def write_then_ctrl_c(*args, **kwargs):
    real_write(*args, **kwargs)  # the first shard is complete
    os.killpg(os.getpgid(0), signal.SIGINT)  # Ctrl-C reaches the whole process group, workers included

latent_shards.write_encoded_shard = write_then_ctrl_c
sys.exit(main(sys.argv[1:]))
"""


def test_ctrl_c_keeps_the_complete_shards_and_says_how_to_resume(latent_assets, tmp_path, files_of):
    args = ["--data", str(latent_assets["images"]), "--vae", str(latent_assets["vae"]), "--resolution", str(RES),
            "--batch-size", "3", "--shard-size", "5", "--device", "cpu", "--num-workers", "2",
            "--no-progress"]  # fmt: skip
    out = tmp_path / "cache"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    stopped = subprocess.run([sys.executable, "-c", _CTRL_C_RUN, *args, "--out", str(out)], env=env, timeout=120,
                             capture_output=True, text=True, start_new_session=True)  # fmt: skip
    assert stopped.returncode == 130, stopped.stderr[-2000:]
    assert f"interrupted: the complete shards in {out} are kept" in stopped.stderr
    assert "Traceback" not in stopped.stderr, stopped.stderr[-2000:]
    assert (out / "shard-00000.safetensors").is_file() and not (out / shards.MANIFEST).exists()
    assert main([*args, "--out", str(out)]) == 0
    assert files_of(out) == files_of(latent_assets["cache"])
