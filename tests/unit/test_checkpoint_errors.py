"""Checkpoint files and resume bookkeeping: atomic writes, refusal of damaged files, names of mismatched tensors,
where `--ckpt_path last` looks, and what every `drifting fit` trainer gets."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from jsonargparse import Namespace
from lightning.pytorch.callbacks import ModelCheckpoint

from drifting_lightning.callbacks.epoch_boundary import EpochBoundaryResume
from drifting_lightning.callbacks.graceful_stop import GracefulStop
from drifting_lightning.callbacks.resume_logs import PurgeLogsAfterCheckpoint
from drifting_lightning.callbacks.rng import TrainingRNG
from drifting_lightning.checkpoints.atomic_io import AtomicCheckpointIO
from drifting_lightning.checkpoints.reading import CheckpointError, verify_checkpoint_file
from drifting_lightning.checkpoints.resume import resolve_ckpt_path, resolve_last_checkpoint
from drifting_lightning.checkpoints.states import check_state_fits
from drifting_lightning.commands.fit import harden_trainer
from drifting_lightning.models.mlp import MLPGenerator
from drifting_lightning.module import DriftingModule


def _checkpoint(value: float) -> dict:
    return {"state_dict": {"w": torch.full((64, 64), value)}, "global_step": 3}


def test_atomic_save_replaces_the_file_or_leaves_the_old_one(tmp_path: Path, monkeypatch):
    io, path = AtomicCheckpointIO(), tmp_path / "run" / "last.ckpt"
    io.save_checkpoint(_checkpoint(1.0), path)
    io.save_checkpoint(_checkpoint(2.0), path)
    assert torch.equal(io.load_checkpoint(path)["state_dict"]["w"], torch.full((64, 64), 2.0))
    assert os.listdir(path.parent) == ["last.ckpt"]  # no temp file left behind

    def killed_mid_write(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", killed_mid_write)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint(_checkpoint(3.0), path)
    monkeypatch.undo()
    assert torch.equal(io.load_checkpoint(path)["state_dict"]["w"], torch.full((64, 64), 2.0))
    assert os.listdir(path.parent) == ["last.ckpt"]


def test_damaged_files_are_refused_naming_the_file_and_the_alternatives(tmp_path: Path):
    good = tmp_path / "epoch=0-step=3.ckpt"
    torch.save(_checkpoint(1.0), good)
    verify_checkpoint_file(good)
    data = good.read_bytes()
    bad = tmp_path / "last.ckpt"
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0x01  # inside the tensor bytes: torch.load alone would return wrong weights
    cases = [
        (bytes(flipped), "fails its CRC-32 check"),
        (data[: len(data) - 100], "not a complete torch.save archive"),  # cut short
        (b"", "not a complete torch.save archive"),
        (b"version https://git-lfs.github.com/spec/v1\noid sha256:0\n", "not a complete torch.save archive"),
    ]
    for content, problem in cases:
        bad.write_bytes(content)
        with pytest.raises(CheckpointError) as err:
            AtomicCheckpointIO().load_checkpoint(bad)
        message = str(err.value)
        assert message.startswith(f"checkpoint {bad} is corrupted") and problem in message
        assert f"Other checkpoints in {tmp_path}: epoch=0-step=3.ckpt" in message
    with pytest.raises(FileNotFoundError, match=r"nowhere\.ckpt does not exist.*epoch=0-step=3\.ckpt"):
        verify_checkpoint_file(tmp_path / "nowhere.ckpt")
    torch.save({"weights": torch.zeros(2)}, bad)  # a torch.save file, but no training state
    with pytest.raises(CheckpointError, match="no model weights"):
        AtomicCheckpointIO().load_checkpoint(bad)
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(bad))  # weights of another format: named, not called corrupted
    with pytest.raises(CheckpointError) as err:
        verify_checkpoint_file(bad)
    assert str(err.value) == (
        f"{bad} is a safetensors weights file (such as an export's generator.safetensors), not a `drifting fit` "
        "checkpoint (runs/<name>/version_<k>/checkpoints/last.ckpt)"
    )


def test_foreign_model_config_names_every_differing_tensor():
    small = DriftingModule(MLPGenerator(hidden=[16]))
    wide = DriftingModule(MLPGenerator(hidden=[32]))
    deep = DriftingModule(MLPGenerator(hidden=[16, 16]))
    check_state_fits(small.state_dict(), {"state_dict": small.state_dict()}, "a.ckpt")  # same config: accepted
    with pytest.raises(ValueError) as err:
        check_state_fits(small.state_dict(), {"state_dict": wide.state_dict()}, "wide.ckpt")
    message = str(err.value)
    assert "checkpoint wide.ckpt was written by a run with a different model config" in message
    assert "generator.body.0.weight [32, 32] in the checkpoint, [16, 32] in this run" in message
    assert "ema_generator.head.weight [2, 32] in the checkpoint, [2, 16] in this run" in message
    with pytest.raises(ValueError) as err:
        check_state_fits(deep.state_dict(), {"state_dict": small.state_dict()}, "small.ckpt")
    assert "4 missing keys: generator.body.2.weight; generator.body.2.bias" in str(err.value)


def _fit_config(tmp_path: Path, logger, callbacks=None) -> Namespace:
    trainer = Namespace(logger=logger, callbacks=callbacks, default_root_dir=str(tmp_path / "root"))
    return Namespace(ckpt_path="last", trainer=trainer)


def _tensorboard(save_dir: Path, version=None) -> Namespace:
    args = Namespace(save_dir=str(save_dir), name="toy", version=version)
    return Namespace(class_path="lightning.pytorch.loggers.TensorBoardLogger", init_args=args)


def _touch(path: Path, mtime: float) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    os.utime(path, (mtime, mtime))
    return path


def test_an_explicit_checkpoint_of_a_run_continues_that_run(tmp_path: Path):
    runs = tmp_path / "runs"
    step = runs / "toy" / "version_3" / "checkpoints" / "epoch=1-step=200.ckpt"
    step.parent.mkdir(parents=True)
    torch.save({"state_dict": {}}, step)
    config = _fit_config(tmp_path, _tensorboard(runs))
    config.ckpt_path = str(step)
    resolve_ckpt_path(config)
    assert config.ckpt_path == str(step) and config.trainer.logger.init_args.version == 3  # not a new version_4
    elsewhere = tmp_path / "saved.ckpt"  # a checkpoint outside the logger's folders leaves the logger alone
    torch.save({"state_dict": {}}, elsewhere)
    config = _fit_config(tmp_path, _tensorboard(runs))
    config.ckpt_path = str(elsewhere)
    resolve_ckpt_path(config)
    assert config.trainer.logger.init_args.version is None


def test_ckpt_path_last_finds_the_newest_last_ckpt_and_reuses_its_version(tmp_path: Path):
    runs = tmp_path / "runs"
    _touch(runs / "toy" / "version_0" / "checkpoints" / "last.ckpt", 1000)
    newest = _touch(runs / "toy" / "version_1" / "checkpoints" / "last.ckpt", 2000)
    _touch(runs / "toy" / "version_2" / "checkpoints" / "epoch=3-step=9.ckpt", 3000)  # not a last checkpoint
    config = _fit_config(tmp_path, _tensorboard(runs))
    resolve_last_checkpoint(config)
    assert config.ckpt_path == str(newest) and config.trainer.logger.init_args.version == 1

    pinned = _fit_config(tmp_path, _tensorboard(runs, version=0))  # a fixed version is respected
    resolve_last_checkpoint(pinned)
    assert pinned.ckpt_path == str(runs / "toy" / "version_0" / "checkpoints" / "last.ckpt")

    dirpath = _touch(tmp_path / "ckpts" / "last-v1.ckpt", 4000)  # a ModelCheckpoint dirpath is searched too
    callback = Namespace(class_path="lightning.pytorch.callbacks.ModelCheckpoint",
                         init_args=Namespace(dirpath=str(dirpath.parent)))  # fmt: skip
    with_dirpath = _fit_config(tmp_path, _tensorboard(runs), [callback])
    resolve_last_checkpoint(with_dirpath)
    assert with_dirpath.ckpt_path == str(dirpath) and with_dirpath.trainer.logger.init_args.version is None

    no_logger = _touch(tmp_path / "root" / "checkpoints" / "last.ckpt", 1000)
    config = _fit_config(tmp_path, False)
    resolve_last_checkpoint(config)
    assert config.ckpt_path == str(no_logger)
    default_logger = _touch(tmp_path / "root" / "lightning_logs" / "version_4" / "checkpoints" / "last.ckpt", 1000)
    config = _fit_config(tmp_path, None)
    resolve_last_checkpoint(config)
    assert config.ckpt_path == str(default_logger)


def test_ckpt_path_last_without_a_checkpoint_starts_a_new_run(tmp_path: Path, capsys):
    config = _fit_config(tmp_path, _tensorboard(tmp_path / "runs"))
    resolve_last_checkpoint(config)
    assert config.ckpt_path is None and config.trainer.logger.init_args.version is None
    searched = tmp_path / "runs" / "toy" / "*" / "checkpoints"
    assert f"no last.ckpt in {searched}; starting a new run" in capsys.readouterr().err


def test_every_fit_trainer_keeps_last_ckpt_and_writes_atomically():
    config: dict = {"callbacks": None, "plugins": None}
    added = harden_trainer(config)
    assert [type(c) for c in added] == [TrainingRNG, GracefulStop, EpochBoundaryResume, PurgeLogsAfterCheckpoint,
                                        ModelCheckpoint]  # fmt: skip
    assert added[4].filename == "last" and isinstance(config["plugins"][0], AtomicCheckpointIO)

    mine = ModelCheckpoint(every_n_train_steps=100)  # configured without save_last: it gets save_last
    config = {"callbacks": [mine], "plugins": ["bf16-mixed"]}
    added = harden_trainer(config)
    assert mine.save_last is True and not any(isinstance(c, ModelCheckpoint) for c in added)
    assert config["plugins"][0] == "bf16-mixed" and isinstance(config["plugins"][1], AtomicCheckpointIO)

    config = {"callbacks": [], "enable_checkpointing": False}
    assert not any(isinstance(c, ModelCheckpoint) for c in harden_trainer(config))


def test_the_spawn_launchers_weights_hand_over_is_read_as_the_bare_state_dict_it_is(tmp_path: Path):
    # strategy "ddp_spawn": rank 0 saves its state dict through the checkpoint IO and the main process loads it back
    from drifting_lightning.checkpoints.atomic_io import SPAWN_HANDOVER, AtomicCheckpointIO

    io, weights = AtomicCheckpointIO(), {"generator.w": torch.arange(3.0)}
    io.save_checkpoint(weights, tmp_path / SPAWN_HANDOVER)
    assert torch.equal(io.load_checkpoint(tmp_path / SPAWN_HANDOVER)["generator.w"], torch.arange(3.0))
    io.save_checkpoint(weights, tmp_path / "last.ckpt")  # any other file must still be a checkpoint
    with pytest.raises(RuntimeError, match="holds no model weights"):
        io.load_checkpoint(tmp_path / "last.ckpt")
