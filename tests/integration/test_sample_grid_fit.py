"""SampleGridCallback in a short fit: PNGs every n steps and at the end, TensorBoard images."""

import os

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torchvision.utils import make_grid

from drifting_lightning.callbacks.sample_grid import SampleGridCallback


def fit(tmp_path, module, datamodule, callbacks, steps=3) -> L.Trainer:
    trainer = L.Trainer(
        max_steps=steps, accelerator="cpu", logger=TensorBoardLogger(tmp_path), default_root_dir=tmp_path,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
    )  # fmt: skip
    trainer.fit(module, datamodule=datamodule)
    return trainer


def test_grids_png_and_tensorboard(tmp_path, tiny_digits_module, digits_data):
    grid = SampleGridCallback(every_n_steps=2, samples_per_class=3, max_classes=4, alpha=[1.0, 2.0], seed=7)
    module = tiny_digits_module()
    trainer = fit(tmp_path, module, digits_data(), [grid])
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
