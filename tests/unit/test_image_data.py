import copy
import gzip
import logging
import struct
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from drifting_lightning.data.image_sources import FolderSource, center_crop_arr, read_idx
from drifting_lightning.data.images import DigitsDataModule, IDXDataModule, ImageFolderDataModule
from drifting_lightning.sampling.positives import ClassAwareSampler, ClassQueue

CONTRACT_KEYS = {"positives", "labels", "unconditional"}


def check_batch(batch: dict, nc: int, npos: int, nunc: int, shape: tuple) -> None:
    """The training batch contract: keys, shapes, dtypes, value range."""
    assert set(batch) == CONTRACT_KEYS
    assert batch["positives"].shape == (nc, npos, *shape) and batch["positives"].dtype == torch.float32
    assert batch["unconditional"].shape == (nc, nunc, *shape) and batch["unconditional"].dtype == torch.float32
    assert batch["labels"].shape == (nc,) and batch["labels"].dtype == torch.int64
    for key in ("positives", "unconditional"):
        x = batch[key]
        assert x.numel() == 0 or (x.min() >= -1 and x.max() <= 1)


def first_batches(dm, n: int) -> list[dict]:
    out = []
    for batch in dm.train_dataloader():
        out.append(batch)
        if len(out) == n:
            return out
    return out


def same_batches(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in CONTRACT_KEYS)


def test_digits_splits_shapes_and_range():
    dm = DigitsDataModule()
    train, test = dm.source("train"), dm.source("test")
    assert (len(train), len(test)) == (1500, 297)
    assert dm.sample_shape == (1, 8, 8) and dm.num_classes == 10
    x = train.load(np.arange(len(train)))
    assert x.shape == (1500, 1, 8, 8) and x.dtype == torch.float32
    assert x.min() == -1 and x.max() == 1  # grey levels 0..16
    assert set(train.labels.tolist()) == set(range(10)) and train.labels.dtype == np.int64
    real, labels = dm.real_samples(50, "test", seed=3)
    assert real.shape == (50, 1, 8, 8) and labels.shape == (50,) and labels.dtype == torch.int64
    again, _ = dm.real_samples(50, "val", seed=3)  # "val" is the held-out split too
    assert torch.equal(real, again) and not torch.equal(real, dm.real_samples(50, "test", seed=4)[0])
    test = dm.source("test")
    for image, label in zip(real, labels):  # each image comes with its own label
        i = int(torch.nonzero((test.load(np.arange(len(test))) == image).flatten(1).all(1))[0])
        assert test.labels[i] == label
    assert dm.real_samples(split="test")[0].shape == (297, 1, 8, 8)  # n=None: the whole split
    assert dm.real_samples(1000, "test")[0].shape == (297, 1, 8, 8)  # at most the split, never repeated
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        dm.source("dev")


@pytest.mark.parametrize("positives", [ClassAwareSampler(4, 6, 3), ClassQueue(4, 6, 3, queue_size=16, push_per_step=8)])
def test_digits_batch_contract_and_groups(positives):
    dm = DigitsDataModule(positives=positives, steps_per_epoch=3)
    dm.setup("fit")
    expected = copy.deepcopy(dm._live)  # the indices the stream will draw
    batches = first_batches(dm, 3)
    assert len(batches) == 3
    train = dm.source("train")
    for batch in batches:
        check_batch(batch, 4, 6, 3, (1, 8, 8))
        labels, pos_idx, unc_idx = expected.draw()
        assert torch.equal(batch["labels"], labels)
        assert torch.equal(batch["positives"], train.load(pos_idx.numpy()))
        assert torch.equal(batch["unconditional"], train.load(unc_idx.numpy()))
        assert (torch.from_numpy(train.labels)[pos_idx] == labels[:, None]).all()


def test_default_positive_source_and_selection_by_name():
    from jsonargparse import ArgumentParser

    dm = DigitsDataModule(steps_per_epoch=2)
    dm.setup()
    check_batch(first_batches(dm, 1)[0], 10, 32, 0, (1, 8, 8))  # ClassAwareSampler() by default
    assert dm.state_dict()["positives"]["kind"] == "ClassAwareSampler"
    parser = ArgumentParser()
    parser.add_class_arguments(DigitsDataModule, "data")
    cfg = parser.parse_args(["--data.positives", "ClassQueue", "--data.positives.init_args.queue_size", "40"])
    dm = parser.instantiate(cfg).data
    assert isinstance(dm.positives, ClassQueue) and dm.positives.queue_size == 40


@pytest.mark.parametrize("kind", ["sampler", "queue"])
def test_state_round_trip_and_workers_do_not_change_batches(kind):
    def make(workers: int = 0) -> DigitsDataModule:
        positives = ClassAwareSampler(3, 4, 2) if kind == "sampler" else ClassQueue(3, 4, 2, queue_size=8)
        dm = DigitsDataModule(positives=positives, steps_per_epoch=5, num_workers=workers)
        dm.setup()
        return dm

    dm = make()
    epoch = first_batches(dm, 5)
    assert same_batches(epoch, first_batches(make(workers=2), 5))
    first_batches(dm, 2)  # two batches into the second epoch
    state = dm.state_dict()
    assert state["positives"]["step"] == 7
    expected = first_batches(dm, 3)
    resumed = make()
    resumed.load_state_dict(state)
    assert same_batches(expected, first_batches(resumed, 3))
    pending = DigitsDataModule(positives=copy.deepcopy(dm.positives), steps_per_epoch=5)
    pending.load_state_dict(state)  # before setup(), as when restoring: applied at set-up
    pending.setup()
    assert same_batches(expected, first_batches(pending, 3))


class _Recorder(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.seen: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        self.seen.append(
            torch.cat([batch["labels"].float(), batch["positives"].flatten(), batch["unconditional"].flatten()])
        )
        return (self.w * batch["positives"].mean()) ** 2

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize("kind", ["sampler", "queue"])
def test_lightning_resume_continues_the_same_batches(kind, tmp_path):
    """Checkpoints mid-epoch (step 3) and at a later epoch; a resumed fit sees the uninterrupted run's batches."""

    def fit(ckpt_path=None, dirpath=None) -> list[torch.Tensor]:
        positives = ClassAwareSampler(3, 4, 2) if kind == "sampler" else ClassQueue(3, 4, 2, queue_size=8)
        model = _Recorder()
        callbacks = (
            [L.pytorch.callbacks.ModelCheckpoint(dirpath, every_n_train_steps=3, save_top_k=-1)] if dirpath else []
        )
        trainer = L.Trainer(
            max_steps=8,
            accelerator="cpu",
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=bool(dirpath),
            callbacks=callbacks,
        )
        trainer.fit(model, datamodule=DigitsDataModule(positives=positives, steps_per_epoch=4), ckpt_path=ckpt_path)
        return model.seen

    full = fit(dirpath=tmp_path)
    for step in (3, 6):
        resumed = fit(ckpt_path=next(tmp_path.glob(f"*step={step}.ckpt")))
        assert len(resumed) == 8 - step
        assert all(torch.equal(a, b) for a, b in zip(full[step:], resumed))


def write_idx(path: Path, array: np.ndarray) -> None:
    data = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data += array.astype(np.uint8).tobytes()
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


@pytest.mark.parametrize("gz", [True, False])
def test_idx_parsing_and_padding(tmp_path, gz):
    rng = np.random.default_rng(0)
    suffix = ".gz" if gz else ""
    parts = {}
    for prefix, n in (("train", 12), ("t10k", 5)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        images[0] = 0
        images[1] = 255
        labels = np.arange(n) % 3
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte{suffix}", images)
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte{suffix}", labels)
        parts[prefix] = (images, labels)
    assert np.array_equal(read_idx(tmp_path / f"train-images-idx3-ubyte{suffix}"), parts["train"][0])

    dm = IDXDataModule(root=str(tmp_path), pad_to=32, positives=ClassAwareSampler(2, 3, 1), steps_per_epoch=2)
    assert dm.sample_shape == (1, 32, 32) and dm.num_classes == 3
    train, test = dm.source("train"), dm.source("test")
    assert (len(train), len(test)) == (12, 5) and test.labels.tolist() == [0, 1, 2, 0, 1]
    x = train.load(np.array([0, 1, 2]))
    assert x.shape == (3, 1, 32, 32)
    assert (x[0] == -1).all() and (x[1, :, 2:30, 2:30] == 1).all()  # 0 -> -1, 255 -> 1
    assert (x[:, :, :2] == -1).all() and (x[:, :, :, 30:] == -1).all()  # padding is background
    expected = torch.from_numpy(parts["train"][0][2]).float() / 127.5 - 1
    assert torch.allclose(x[2, 0, 2:30, 2:30], expected, atol=1e-6)
    dm.setup()
    check_batch(first_batches(dm, 1)[0], 2, 3, 1, (1, 32, 32))
    assert IDXDataModule(root=str(tmp_path)).sample_shape == (1, 28, 28)


def test_idx_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install -y dataset-fashion-mnist"):
        IDXDataModule(root=str(tmp_path / "missing")).setup()
    with pytest.raises(FileNotFoundError, match="has no train-images-idx3-ubyte"):
        IDXDataModule(root=str(tmp_path)).setup()
    (tmp_path / "bad").write_bytes(b"\x12\x34\x56\x78rest")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(struct.pack(">BBBBI", 0, 0, 8, 1, 10) + b"\x00" * 4)
    with pytest.raises(ValueError, match="promises shape"):
        read_idx(tmp_path / "short")


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir(), reason="Fashion-MNIST not installed")
def test_fashion_mnist_installed():
    dm = IDXDataModule(pad_to=32)
    assert (len(dm.source("train")), len(dm.source("test"))) == (60000, 10000)
    assert dm.sample_shape == (1, 32, 32) and dm.num_classes == 10


def write_folder(root: Path, sizes=((40, 30), (30, 50), (64, 64))) -> None:
    """Three classes of three PNGs each (class k is filled with grey level 60 * k + image number)."""
    for k, name in enumerate(["ant", "bee", "cat"]):
        (root / name).mkdir(parents=True)
        for j, size in enumerate(sizes):
            Image.new("RGB", size, (60 * k + j,) * 3).save(root / name / f"{j}.png")


def test_center_crop_sizes():
    for size in [(300, 200), (1000, 90), (64, 64), (20, 30), (513, 1024)]:
        out = center_crop_arr(Image.new("RGB", size, (10, 20, 30)), 64)
        assert out.shape == (64, 64, 3) and out.dtype == np.uint8
        assert (out == (10, 20, 30)).all()
    # The centre is kept: a wide image whose middle third is white crops to (almost) all white.
    wide = np.zeros((100, 300, 3), np.uint8)
    wide[:, 100:200] = 255
    out = center_crop_arr(Image.fromarray(wide), 50)
    assert out.shape == (50, 50, 3) and out[:, 2:-2].min() == 255


def test_image_folder_batches_flips_and_corrupt_files(tmp_path, caplog):
    write_folder(tmp_path / "train")
    (tmp_path / "train" / "bee" / "3.png").write_bytes(b"not a png")
    left = np.zeros((32, 32, 3), np.uint8)
    left[:, :16] = 255
    Image.fromarray(left).save(tmp_path / "train" / "cat" / "3.png")
    dm = ImageFolderDataModule(
        root=str(tmp_path / "train"),
        resolution=16,
        positives=ClassAwareSampler(3, 4, 2),
        steps_per_epoch=4,
        num_workers=2,
    )
    assert dm.sample_shape == (3, 16, 16) and dm.num_classes == 3
    dm.setup()
    source = dm.source("train")
    assert source.class_names == ["ant", "bee", "cat"] and len(source) == 11
    with caplog.at_level(logging.WARNING):
        batches = first_batches(dm, 4)  # every step draws all 4 bee images: the bad file is always hit
        for batch in batches:
            check_batch(batch, 3, 4, 2, (3, 16, 16))
        assert source.skipped >= 4  # counted across the worker processes
        dm.teardown("fit")
    assert any("unreadable training image" in r.getMessage() for r in caplog.records)

    bad = int(np.flatnonzero([f.endswith(b"bee/3.png") for f in source.files])[0])
    x = source.load(np.array([bad]))  # replaced by another image of class bee: grey 60 + j
    assert round(float((x.mean() + 1) * 127.5)) in (60, 61, 62)
    assert any("bee/3.png" in r.getMessage() for r in caplog.records)

    flipped = FolderSource(tmp_path / "train", resolution=16, random_flip=True)
    idx = np.full(16, int(np.flatnonzero([f.endswith(b"cat/3.png") for f in flipped.files])[0]))
    x = flipped.load(idx, np.random.default_rng(0))
    plain = flipped.load(idx[:1])
    is_flipped = [torch.equal(img, plain[0].flip(-1)) for img in x]
    assert all(f or torch.equal(img, plain[0]) for f, img in zip(is_flipped, x)) and 0 < sum(is_flipped) < 16
    assert torch.equal(x, flipped.load(idx, np.random.default_rng(0)))
    assert flipped.load(np.zeros((3, 0), np.int64), np.random.default_rng(0)).shape == (3, 0, 3, 16, 16)  # Nunc = 0


def test_image_folder_real_samples_from_val_root(tmp_path):
    write_folder(tmp_path / "train")
    write_folder(tmp_path / "val")
    dm = ImageFolderDataModule(root=str(tmp_path / "train"), resolution=8, val_root=str(tmp_path / "val"))
    real, labels = dm.real_samples(5, "val", seed=1)
    assert real.shape == (5, 3, 8, 8) and torch.equal(real, dm.real_samples(5, "test", seed=1)[0])
    assert set(labels.tolist()) <= {0, 1, 2}
    with pytest.raises(ValueError, match="needs val_root"):
        ImageFolderDataModule(root=str(tmp_path / "train")).real_samples(2, "test")


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolderDataModule(root=str(tmp_path / "missing")).setup()
    (tmp_path / "flat").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "flat" / "x.png")
    with pytest.raises(ValueError, match="has no class sub-folders"):
        ImageFolderDataModule(root=str(tmp_path / "flat")).setup()
    write_folder(tmp_path / "train")
    (tmp_path / "train" / "dog").mkdir()
    (tmp_path / "train" / "dog" / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match=r"class folder .*train/dog has no images"):
        ImageFolderDataModule(root=str(tmp_path / "train")).setup()
