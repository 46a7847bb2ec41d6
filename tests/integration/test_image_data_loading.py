"""Image DataModules with worker processes and in Lightning fits: workers do not change the batches, a resume
continues them, unreadable files are replaced."""

import copy
import logging

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from drifting_lightning.data.image_sources import FolderSource
from drifting_lightning.data.images import DigitsDataModule, ImageFolderDataModule
from drifting_lightning.sampling.positives import ClassAwareSampler, ClassQueue
from tests.image_batches import check_batch, first_batches, same_batches, write_folder


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
    assert any("draw(s) of unreadable training images so far" in r.getMessage() for r in caplog.records)

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
