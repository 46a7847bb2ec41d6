"""Every loader verifies what it reads: damaged bytes (CRC-32), NaN/Inf weights and files of another kind are refused
in one line naming the file, by sample, export, evaluate, load_module, load_generator, encoder and classifier
weights and a fit resume; a run folder is accepted as --ckpt_path."""

from __future__ import annotations

import json
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from jsonargparse import Namespace
from PIL import Image
from safetensors.torch import load_file, save_file

from drifting_lightning.checkpoints.atomic_io import AtomicCheckpointIO
from drifting_lightning.checkpoints.loading import load_module
from drifting_lightning.checkpoints.reading import CheckpointError, read_checkpoint, read_weights
from drifting_lightning.checkpoints.resume import resolve_ckpt_path
from drifting_lightning.commands import evaluate, export, sample
from drifting_lightning.data.image_sources import read_idx
from drifting_lightning.encoders.resnet_mae import ResNetConfig, ResNetMAE
from drifting_lightning.export import export_generator, load_generator
from drifting_lightning.metrics.classifier import SmallCNN, load_classifier, save_classifier
from drifting_lightning.models.dit import DiT
from drifting_lightning.module import DriftingModule

TINY_DIT = dict(preset="digits", hidden_size=32, depth=1, num_heads=2, num_style_tokens=4, style_codebook_size=8,
                num_context_tokens=2)  # fmt: skip
MODEL = {"class_path": "drifting_lightning.module.DriftingModule",
         "init_args": {"generator": {"class_path": "drifting_lightning.models.dit.DiT", "init_args": TINY_DIT},
                       "generated_per_group": 4}}  # fmt: skip
FIT_CHECKPOINT = "a `drifting fit` checkpoint (runs/<name>/version_<k>/checkpoints/last.ckpt)"
WEIGHTS_FILE = "a weights file (.safetensors, or a torch.save file: .pt/.pth/.ckpt/.bin)"

TINY_ARCH = ResNetConfig(1, 8, (1, 1, 1, 1))


@pytest.fixture
def run(tmp_path: Path) -> Path:
    """A run folder as `drifting fit` leaves it: config.yaml and checkpoints/last.ckpt (a tiny DiT on digits)."""
    folder = tmp_path / "runs" / "digits" / "version_0"
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump({"model": MODEL}))
    torch.manual_seed(0)
    module = DriftingModule(DiT(**TINY_DIT), generated_per_group=4)
    torch.save({"state_dict": module.state_dict(), "global_step": 3}, folder / "checkpoints" / "last.ckpt")
    return folder


def damage_tensor_bytes(path: Path) -> str:
    """Flip one byte inside the largest tensor's data of a torch.save archive; returns the member's name."""
    with zipfile.ZipFile(path) as archive:
        info = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    data = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26 : info.header_offset + 30])
    data[info.header_offset + 30 + name_len + extra_len + info.file_size // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with zipfile.ZipFile(path) as archive:
        assert archive.testzip() == info.filename
    return info.filename


def only_error(capsys) -> str:
    """The error line of a command's stderr, after checking that it printed one error and no traceback."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if not line.startswith("(set DRIFTING_DEBUG")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def commands_refuse(ckpt: Path, tmp_path: Path, capsys) -> list[str]:
    """The error lines of sample, export and evaluate (fd_encoder of a run) given ``ckpt``; each must exit 1."""
    samples = tmp_path / "samples.npz"
    np.savez(samples, arr_0=np.zeros((4, 8, 8, 1), np.uint8))
    calls = [
        (sample.main, ["--ckpt", str(ckpt), "--out", str(tmp_path / "s.npz"), "--num", "4", "--device", "cpu",
                       "--no-progress"]),
        (export.main, ["--ckpt", str(ckpt), "--out", str(tmp_path / "export")]),
        (evaluate.main, [str(samples), "--ref", str(samples), "--metric", "fd_encoder", "--checkpoint", str(ckpt),
                         "--device", "cpu"]),
    ]  # fmt: skip
    lines = []
    for main, argv in calls:
        assert main(argv) == 1, main
        lines.append(only_error(capsys))
    assert not (tmp_path / "s.npz").exists() and not (tmp_path / "export").exists()
    return lines


def test_damaged_tensor_bytes_are_refused_by_every_loader(run: Path, tmp_path: Path, capsys):
    ckpt = run / "checkpoints" / "last.ckpt"
    member = damage_tensor_bytes(ckpt)
    expected = f"checkpoint {ckpt} is corrupted: its member {member} fails its CRC-32 check"
    for line in commands_refuse(ckpt, tmp_path, capsys):
        assert line.startswith(f"error: {expected}. Use another checkpoint"), line
    for load in (load_module, read_checkpoint, AtomicCheckpointIO().load_checkpoint):  # the last: a fit resume
        with pytest.raises(CheckpointError, match="fails its CRC-32 check"):
            load(ckpt)
    with pytest.raises(CheckpointError, match="fails its CRC-32 check"):  # before LightningCLI reads it
        resolve_ckpt_path(Namespace(ckpt_path=str(ckpt)))


def test_encoder_and_classifier_weights_are_verified(tmp_path: Path):
    encoder = ResNetMAE(TINY_ARCH)
    torch.save(encoder.encoder.state_dict(), tmp_path / "encoder.pt")
    ResNetMAE(TINY_ARCH, checkpoint=str(tmp_path / "encoder.pt"))  # intact
    legacy = tmp_path / "legacy.pth"  # torch < 1.6 wrote a plain pickle (no zip, so no CRC): still read
    torch.save(encoder.encoder.state_dict(), legacy, _use_new_zipfile_serialization=False)
    assert read_weights(legacy).keys() == encoder.encoder.state_dict().keys()
    member = damage_tensor_bytes(tmp_path / "encoder.pt")
    with pytest.raises(CheckpointError, match=f"encoder.pt is corrupted: its member {member} fails its CRC-32"):
        ResNetMAE(TINY_ARCH, checkpoint=str(tmp_path / "encoder.pt"))

    state = encoder.encoder.state_dict()
    name = next(k for k, v in state.items() if v.is_floating_point())
    state[name] = torch.full_like(state[name], float("inf"))
    save_file(state, str(tmp_path / "encoder.safetensors"))
    with pytest.raises(CheckpointError, match=rf"encoder.safetensors: tensor '{name}' has Inf; the file is damaged"):
        ResNetMAE(TINY_ARCH, checkpoint=str(tmp_path / "encoder.safetensors"))

    net = SmallCNN(in_channels=1, num_classes=3, width=8, feature_dim=16)
    arch = {"in_channels": 1, "num_classes": 3, "width": 8, "feature_dim": 16}
    path = save_classifier(tmp_path / "classifier.pt", net, arch, None)
    load_classifier(path)
    damage_tensor_bytes(path)
    with pytest.raises(CheckpointError, match="classifier.pt is corrupted"):
        load_classifier(path)


def test_nonfinite_weights_are_refused_naming_the_tensor(run: Path, tmp_path: Path, capsys):
    ckpt = run / "checkpoints" / "last.ckpt"
    saved = torch.load(ckpt, weights_only=True)
    name = "ema_generator.blocks.0.attn.qkv.weight"
    saved["state_dict"][name][3, 5] = float("nan")
    torch.save(saved, ckpt)  # a valid archive: the CRC check passes, the weights are still unusable
    expected = (f"error: {ckpt}: tensor '{name}' has NaN; the file is damaged or its run diverged, use an earlier "
                "checkpoint")  # fmt: skip
    assert commands_refuse(ckpt, tmp_path, capsys) == [expected] * 3
    for load in (load_module, AtomicCheckpointIO().load_checkpoint):
        with pytest.raises(CheckpointError, match=f"tensor '{name}' has NaN"):
            load(ckpt)

    module = DriftingModule(DiT(**TINY_DIT), generated_per_group=4)
    with torch.no_grad():
        module.ema_generator.final.linear.bias[0] = float("inf")
    with pytest.raises(CheckpointError, match="tensor 'final.linear.bias' has Inf"):  # an in-memory export
        export_generator(module, tmp_path / "from_module")


def test_load_generator_checks_the_weights_hash_and_finiteness(tmp_path: Path):
    torch.manual_seed(0)
    out = export_generator(DiT(**TINY_DIT), tmp_path / "export")
    load_generator(out)
    weights = out / "generator.safetensors"
    good = weights.read_bytes()
    damaged = bytearray(good)
    damaged[-10] ^= 0xFF  # inside the last tensor: safetensors itself would load it
    weights.write_bytes(bytes(damaged))
    with pytest.raises(CheckpointError, match=r"generator.safetensors is damaged: its sha256 differs from the one .*"
                                              r"config.json recorded at export; export it again"):  # fmt: skip
        load_generator(out)

    weights.write_bytes(good)
    state = load_file(str(weights))
    state["patch_embed.weight"][0] = float("nan")
    save_file(state, str(weights), metadata={"format": "drifting-generator/1"})
    config = json.loads((out / "config.json").read_text())
    del config["sha256"]  # an export written before exports recorded their hash
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="tensor 'patch_embed.weight' has NaN"):
        load_generator(out)


def test_files_of_another_kind_are_named_in_one_line(tmp_path: Path, capsys):
    Image.new("RGB", (8, 8)).save(tmp_path / "cat.jpg")
    (tmp_path / "config.yaml").write_text("model:\n  class_path: DriftingModule\n")
    (tmp_path / "notes.txt").write_text("hello\n")
    kinds = {"cat.jpg": "a JPEG image", "config.yaml": "a YAML text file (a run's config goes to --config)",
             "notes.txt": "a text file"}  # fmt: skip
    for name, kind in kinds.items():
        path = tmp_path / name
        assert sample.main(["--ckpt", str(path), "--out", str(tmp_path / "s.npz"), "--device", "cpu"]) == 1
        assert only_error(capsys) == f"error: {path} is {kind}, not {FIT_CHECKPOINT}"
        assert export.main(["--ckpt", str(path), "--out", str(tmp_path / "e")]) == 1
        assert only_error(capsys) == f"error: {path} is {kind}, not {FIT_CHECKPOINT}"
        with pytest.raises(CheckpointError) as err:
            resolve_ckpt_path(Namespace(ckpt_path=str(path)))  # `drifting fit --ckpt_path cat.jpg`
        assert str(err.value) == f"{path} is {kind}, not {FIT_CHECKPOINT}"
        with pytest.raises(CheckpointError) as err:
            read_weights(path, "encoder checkpoint")
        assert str(err.value) == f"{path} is {kind}, not {WEIGHTS_FILE}"


def test_cut_idx_and_gzip_files_are_named(tmp_path: Path):
    header = struct.pack(">BBBB", 0, 0, 0x08, 3) + struct.pack(">I", 60000)  # 3 dimensions, 1 of them written
    (tmp_path / "train-images-idx3-ubyte").write_bytes(header)
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte is not a complete IDX file: its header is cut "
                                         r"short \(8 bytes, 3 dimensions need 16\); download it again"):  # fmt: skip
        read_idx(tmp_path / "train-images-idx3-ubyte")

    import gzip

    whole = gzip.compress(header + struct.pack(">II", 2, 2) + bytes(60000 * 4))
    (tmp_path / "labels.gz").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ValueError, match=r"labels.gz is not a complete gzip file \(Compressed file ended .*\): "
                                         r"expected a gzipped IDX file; download it again"):  # fmt: skip
        read_idx(tmp_path / "labels.gz")


def test_ckpt_path_accepts_a_run_folder_or_says_what_it_takes(run: Path, tmp_path: Path):
    logger = Namespace(class_path="lightning.pytorch.loggers.TensorBoardLogger",
                       init_args=Namespace(save_dir=str(run.parent.parent), name="digits", version=None))  # fmt: skip
    for given in (run, run / "checkpoints"):
        config = Namespace(ckpt_path=str(given), trainer=Namespace(logger=logger))
        resolve_ckpt_path(config)
        assert config.ckpt_path == str(run / "checkpoints" / "last.ckpt")
        assert logger.init_args.version == 0  # the resumed run logs into its own folder, as with "last"
        logger.init_args.version = None

    empty = tmp_path / "runs" / "digits" / "version_1"
    (empty / "checkpoints").mkdir(parents=True)
    (empty / "checkpoints" / "epoch=0-step=5.ckpt").write_bytes(b"")
    with pytest.raises(FileNotFoundError) as err:
        resolve_ckpt_path(Namespace(ckpt_path=str(empty)))
    assert str(err.value) == (
        f"--ckpt_path {empty} is a folder without a last.ckpt (looked in {empty / 'checkpoints'} and {empty}); "
        "expected a .ckpt file, a run folder runs/<name>/version_<k> with checkpoints/last.ckpt, a sharded "
        f"checkpoint folder (with a .metadata file), or 'last'. It holds "
        f"{empty / 'checkpoints' / 'epoch=0-step=5.ckpt'}: pass one of them."
    )
