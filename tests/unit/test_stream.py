"""PassTracker: the stream position that training consumed, from the trainer's count when attached, else from the
batches the loader handed out; the toy DataModule's state follows it across epochs and partial passes."""

from types import SimpleNamespace

import torch

from drifting_lightning.data.stream import PassTracker
from drifting_lightning.data.toy import ToyDataModule


def fake_trainer(ready: int) -> SimpleNamespace:
    progress = SimpleNamespace(total=SimpleNamespace(ready=ready))
    return SimpleNamespace(fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(batch_progress=progress)))


def test_position_without_a_trainer_counts_handed_out_batches():
    tracker = PassTracker()
    assert tracker.position(None) is None  # no pass yet
    tracker.begin(7, None)
    batches = tracker.count(iter(range(5)))
    next(batches), next(batches)
    assert tracker.position(None) == 9
    tracker.forget()
    assert tracker.position(None) is None


def test_position_with_a_trainer_ignores_prefetched_batches():
    tracker = PassTracker()
    trainer = fake_trainer(ready=12)  # batches the trainer's steps took before this pass (e.g. a restored run)
    tracker.begin(3, trainer)
    batches = tracker.count(iter(range(5)))
    next(batches), next(batches), next(batches)  # the loader and Lightning run ahead of the steps
    trainer.fit_loop.epoch_loop.batch_progress.total.ready = 13
    assert tracker.position(trainer) == 4


def test_toy_state_after_a_partial_pass_resumes_the_same_batches():
    dm = ToyDataModule(positives_per_step=4, steps_per_epoch=3, seed=5)
    loader = dm.train_dataloader()
    list(loader)
    batches = iter(loader)
    next(batches)  # one batch into epoch 1
    assert dm.state_dict() == {"epoch": 1, "batch": 1}
    rest = [b["positives"] for b in batches]
    resumed = ToyDataModule(positives_per_step=4, steps_per_epoch=3, seed=5)
    resumed.load_state_dict({"epoch": 1, "batch": 1})
    again = [b["positives"] for b in resumed.train_dataloader()]
    assert len(rest) == len(again) == 2 and all(torch.equal(a, b) for a, b in zip(rest, again, strict=True))
    assert resumed.state_dict() == {"epoch": 2}


def test_toy_state_follows_the_trainers_count_not_the_loader():
    """Attached to a trainer, the toy (and vector) position is the trainer's count of batches its steps took, as for
    image data: batches Lightning and workers fetched ahead are not consumed, and a new pass starts where the steps
    stopped, also when a restored run's count does not start at 0."""
    trainer = fake_trainer(ready=0)
    trainer.global_rank = 0
    dm = ToyDataModule(positives_per_step=4, steps_per_epoch=3, seed=5)
    dm.trainer = trainer
    loader = dm.train_dataloader()
    first = [b["positives"] for b in loader]  # the whole epoch fetched ...
    trainer.fit_loop.epoch_loop.batch_progress.total.ready = 2  # ... two of its batches used by steps
    assert dm.state_dict() == {"epoch": 0, "batch": 2}
    rest = [b["positives"] for b in loader]  # a new pass resumes at batch 2, not at epoch 1
    assert len(rest) == 1 and torch.equal(rest[0], first[2])
    trainer.fit_loop.epoch_loop.batch_progress.total.ready = 4
    assert dm.state_dict() == {"epoch": 1, "batch": 1}

    restored = fake_trainer(ready=4)  # a resumed run: Lightning restores its count with the DataModule's state
    restored.global_rank = 0
    again = ToyDataModule(positives_per_step=4, steps_per_epoch=3, seed=5)
    again.trainer = restored
    again.load_state_dict({"epoch": 1, "batch": 1})
    assert again.state_dict() == {"epoch": 1, "batch": 1}
    batches = iter(again.train_dataloader())
    next(batches), next(batches)
    restored.fit_loop.epoch_loop.batch_progress.total.ready = 5
    assert again.state_dict() == {"epoch": 1, "batch": 2}
