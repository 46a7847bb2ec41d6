"""SampleGridCallback: class rows x fixed-noise columns per guidance scale, to PNG and TensorBoard."""

import os

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torchvision.utils import make_grid

from drifting_lightning.callbacks.sample_grid import SampleGridCallback, alpha_tag, displayable, grid_labels
from drifting_lightning.data.images import DigitsDataModule
from drifting_lightning.models.dit import DiT
from drifting_lightning.module import DriftingModule
from drifting_lightning.sampling.positives import ClassAwareSampler

TINY_DIT = dict(hidden_size=32, depth=1, num_heads=2, num_style_tokens=4, style_codebook_size=8, num_context_tokens=2)


def tiny_module(num_classes: int | None = None) -> DriftingModule:
    torch.manual_seed(0)
    return DriftingModule(DiT("digits", num_classes=num_classes, **TINY_DIT), generated_per_group=4, lr=1e-2,
                          ema_decay=0.0)  # fmt: skip


def digits() -> DigitsDataModule:
    return DigitsDataModule(positives=ClassAwareSampler(classes_per_step=10, positives_per_class=4), steps_per_epoch=10)


def fit(tmp_path, module, callbacks, steps=3) -> L.Trainer:
    trainer = L.Trainer(
        max_steps=steps, accelerator="cpu", logger=TensorBoardLogger(tmp_path), default_root_dir=tmp_path,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
    )  # fmt: skip
    trainer.fit(module, datamodule=digits())
    return trainer


def test_grids_png_and_tensorboard(tmp_path):
    grid = SampleGridCallback(every_n_steps=2, samples_per_class=3, max_classes=4, alpha=[1.0, 2.0], seed=7)
    module = tiny_module()
    trainer = fit(tmp_path, module, [grid])
    log_dir = trainer.log_dir

    # 4 class rows and 3 columns of 8x8 images with 2-pixel padding: 4*10+2 high, 3*10+2 wide, RGB.
    for name in ("step000002", "step000003", "final"):
        for a in ("1.0", "2.0"):
            with Image.open(os.path.join(log_dir, f"grid_{name}_alpha{a}.png")) as img:
                assert img.size == (32, 42) and img.mode == "RGB"
    final = np.array(Image.open(os.path.join(log_dir, "grid_final_alpha2.0.png")))
    step3 = np.asarray(Image.open(os.path.join(log_dir, "grid_step000003_alpha2.0.png")))
    np.testing.assert_array_equal(final, step3)

    events = EventAccumulator(log_dir, size_guidance={"images": 0})
    events.Reload()
    for a in ("1.0", "2.0"):
        assert [e.step for e in events.Images(f"samples/grid_alpha{a}")] == [2, 3]

    # The grid is exactly: row r = class r, columns from the seeded noise, same noise for every alpha.
    labels = torch.arange(4).repeat_interleave(3)
    for a in (1.0, 2.0):
        x = module.sample(12, labels=labels, alpha=a, generator=torch.Generator().manual_seed(7))
        expected = make_grid(x, nrow=3, padding=2, normalize=True, value_range=(-1, 1))
        torch.testing.assert_close(grid.grids(module)[a], expected, rtol=0, atol=0)
    g1, g2 = grid.grids(module).values()
    assert not torch.equal(g1, g2)  # alpha is an input of the generator: the grids differ
    png = torch.from_numpy(final).permute(2, 0, 1).float() / 255
    assert (png - grid.grids(module)[2.0]).abs().max() <= 1 / 255 + 1e-6  # the PNG is that grid, 8-bit


def test_decode_hook_and_unconditional_rows():
    module = tiny_module(num_classes=0)
    grid = SampleGridCallback(samples_per_class=2, max_classes=3, alpha=1.5)
    plain = grid.grids(module)[1.5]
    assert plain.shape == (3, 3 * 10 + 2, 2 * 10 + 2)  # unconditional: max_classes rows
    module.decoder = lambda x: torch.ones_like(x)  # a latent run's decoder, here: all white
    decoded = grid.grids(module)[1.5]
    assert decoded[:, 2:10, 2:10].min() == 1.0


def test_helpers_and_argument_errors():
    assert alpha_tag(1) == "1.0" and alpha_tag(1.25) == "1.25"
    assert grid_labels(10, 4, 2, torch.device("cpu")).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert grid_labels(0, 4, 2, torch.device("cpu")) is None
    assert displayable(torch.zeros(2, 4, 5, 5)).shape == (2, 3, 5, 5)  # latents: first three channels
    with pytest.raises(ValueError, match="images"):
        displayable(torch.zeros(2, 2))
    with pytest.raises(ValueError, match=">= 1"):
        SampleGridCallback(alpha=[0.5])
    with pytest.raises(ValueError, match="samples_per_class"):
        SampleGridCallback(samples_per_class=0)
