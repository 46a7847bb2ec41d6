import copy
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from drifting_lightning.data.image_sources import center_crop_arr, read_idx
from drifting_lightning.data.images import DigitsDataModule, IDXDataModule, ImageFolderDataModule
from drifting_lightning.sampling.positives import ClassAwareSampler, ClassQueue
from tests.image_batches import check_batch, first_batches, write_folder


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


@pytest.mark.parametrize("gz", [True, False])
def test_idx_parsing_and_padding(tmp_path, gz, write_idx):
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
