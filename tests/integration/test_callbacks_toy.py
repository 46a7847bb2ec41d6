import json
import os

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from drifting_lightning.callbacks.sample_metrics import SampleMetricCallback
from drifting_lightning.callbacks.scatter import ScatterPlotCallback
from drifting_lightning.data.toy import ToyDataModule
from drifting_lightning.data.vector import VectorDataModule
from drifting_lightning.metrics.energy import energy_distance, gaussian_mmd2, median_bandwidth


class FakeModule(L.LightningModule):
    """A dummy parameter to train and a ``sample`` that returns fixed Gaussian points."""

    def __init__(self, dim: int = 2) -> None:
        super().__init__()
        self.dim = dim
        self.w = torch.nn.Parameter(torch.zeros(dim))
        self.sample_calls: list[tuple[int, bool]] = []

    def training_step(self, batch, batch_idx):
        return (batch["positives"].mean((0, 1)) - self.w).square().sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def sample(self, n: int, use_ema: bool = True, generator: torch.Generator | None = None) -> torch.Tensor:
        self.sample_calls.append((n, use_ema))
        return torch.randn(n, self.dim, generator=generator)


def make_trainer(tmp_path, callbacks, logger=True):
    return L.Trainer(
        max_steps=3,
        accelerator="cpu",
        logger=TensorBoardLogger(tmp_path) if logger else False,
        default_root_dir=tmp_path,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )


def read_events(log_dir):
    events = EventAccumulator(log_dir, size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    return events


def test_scatter_and_energy_metric_with_tensorboard(tmp_path):
    scatter = ScatterPlotCallback(every_n_steps=2, num_samples=200, use_ema=False)
    metric = SampleMetricCallback(every_n_steps=2, num_samples=300)
    trainer = make_trainer(tmp_path, [scatter, metric])
    module, dm = FakeModule(), ToyDataModule("checkerboard", positives_per_step=64, steps_per_epoch=10)
    trainer.fit(module, datamodule=dm)
    log_dir = trainer.log_dir

    for name in ("samples_step000002.png", "samples_step000003.png", "samples_final.png"):
        with open(os.path.join(log_dir, name), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert (200, False) in module.sample_calls and (300, True) in module.sample_calls

    generated = module.sample(300, generator=torch.Generator().manual_seed(1234))  # the callback's fixed noise
    expected = energy_distance(generated, dm.real_samples(300, seed=1234)[0])
    assert metric.last_value == pytest.approx(expected, rel=1e-9)
    assert [step for step, _ in metric.history] == [2, 3]
    assert trainer.callback_metrics["metrics/energy_distance"].item() == pytest.approx(expected, rel=1e-6)
    with open(os.path.join(log_dir, "metrics.json")) as f:
        record = json.load(f)
    assert record["metric"] == "energy_distance" and record["step"] == 3
    assert record["value"] == pytest.approx(expected, rel=1e-9)

    assert any(name.startswith("events.out.tfevents") for name in os.listdir(log_dir))
    events = read_events(log_dir)
    scalars = events.Scalars("metrics/energy_distance")
    assert [s.step for s in scalars] == [2, 3]
    assert scalars[-1].value == pytest.approx(expected, rel=1e-5)
    assert [i.step for i in events.Images("samples/scatter")] == [2, 3]


def test_mmd_metric_and_no_logger(tmp_path):
    metric = SampleMetricCallback(metric="mmd", every_n_steps=5, num_samples=200, seed=7)
    scatter = ScatterPlotCallback(every_n_steps=5, num_samples=100, filename="plots/step{step}.png")
    trainer = make_trainer(tmp_path, [metric, scatter], logger=False)
    module, dm = FakeModule(), ToyDataModule("bimodal", positives_per_step=32, steps_per_epoch=10)
    trainer.fit(module, datamodule=dm)
    target = dm.real_samples(200, seed=7)[0]
    assert metric.bandwidth == pytest.approx(median_bandwidth(target))
    generated = module.sample(200, generator=torch.Generator().manual_seed(7))
    assert metric.last_value == pytest.approx(gaussian_mmd2(generated, target, metric.bandwidth), rel=1e-9)
    assert [step for step, _ in metric.history] == [3]  # only the end of training
    assert os.path.isfile(tmp_path / "plots" / "step3.png") and os.path.isfile(tmp_path / "samples_final.png")
    assert os.path.isfile(tmp_path / "metrics.json")


def test_vector_data_plots_first_two_coordinates(tmp_path):
    path = tmp_path / "actions.npy"
    np.save(path, np.random.default_rng(0).normal(size=(100, 5)))
    scatter = ScatterPlotCallback(every_n_steps=1, num_samples=50)
    metric = SampleMetricCallback(every_n_steps=3, num_samples=50)
    trainer = make_trainer(tmp_path, [scatter, metric])
    trainer.fit(FakeModule(dim=5), datamodule=VectorDataModule(str(path), positives_per_step=16))
    assert sorted(f for f in os.listdir(trainer.log_dir) if f.endswith(".png")) == [
        "samples_final.png",
        "samples_step000001.png",
        "samples_step000002.png",
        "samples_step000003.png",
    ]
    assert metric.last_value is not None and metric.last_value > 0


def test_needs_a_datamodule(tmp_path):
    loader = ToyDataModule(positives_per_step=8, steps_per_epoch=3).train_dataloader()
    trainer = make_trainer(tmp_path, [ScatterPlotCallback(every_n_steps=1)])
    with pytest.raises(RuntimeError, match="real_samples"):
        trainer.fit(FakeModule(), train_dataloaders=loader)


@pytest.mark.parametrize("ends_by", ["steps", "epochs"])
def test_the_metric_at_the_last_step_is_in_its_checkpoint_and_survives_a_resume(tmp_path, ends_by):
    from lightning.pytorch.callbacks import ModelCheckpoint

    def fit(steps, ckpt_path=None):  # epochs of one step each, when training ends by epochs
        metric = SampleMetricCallback(every_n_steps=2, num_samples=100)
        length = {"max_steps": steps} if ends_by == "steps" else {"max_epochs": steps, "max_steps": -1}
        trainer = L.Trainer(
            **length, accelerator="cpu", logger=False, default_root_dir=tmp_path,
            enable_progress_bar=False, enable_model_summary=False,
            callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True), metric],
        )
        steps_per_epoch = 10 if ends_by == "steps" else 1
        dm = ToyDataModule("checkerboard", positives_per_step=32, steps_per_epoch=steps_per_epoch)
        trainer.fit(FakeModule(), datamodule=dm, ckpt_path=ckpt_path)
        return metric

    first = fit(3)
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)["callbacks"]
    (state,) = [v for k, v in saved.items() if k.startswith("SampleMetricCallback")]
    assert [step for step, _ in state["history"]] == [2, 3]  # the end's value was evaluated before the save

    resumed = fit(5, ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert resumed.history[:2] == first.history and [step for step, _ in resumed.history] == [2, 3, 4, 5]
    with open(tmp_path / "metrics.json") as f:
        assert [step for step, _ in json.load(f)["history"]] == [2, 3, 4, 5]
