"""The toy stream with DataLoader worker processes: picklable, and the workers split the steps without repeats."""

import pickle

import torch

from drifting_lightning.data.toy import ToyDataModule


def test_stream_is_picklable_and_workers_split_steps():
    dm = ToyDataModule(positives_per_step=4, steps_per_epoch=6)
    stream = dm.train_dataloader().dataset
    assert pickle.loads(pickle.dumps(stream)).steps == 6
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=2)
    batches = [b["positives"] for b in loader]
    assert len(batches) == 6
    assert len({tuple(b.flatten().tolist()) for b in batches}) == 6  # workers never repeat each other
