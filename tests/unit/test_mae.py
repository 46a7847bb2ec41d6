"""MAE pretraining: masking, masked-only loss, optimisation, and the checkpoint that ResNetMAE loads."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader, Dataset

from drifting_lightning.encoders.mae import (
    MAEPretraining,
    random_patch_mask,
    random_resized_crop,
    reconstruction_loss,
)
from drifting_lightning.encoders.resnet_mae import ResNetMAE

TINY = {"in_channels": 1, "width": 8, "stages": (1, 1), "input_size": 8}


def test_mask_fraction_and_patches():
    g = torch.Generator().manual_seed(0)
    keep = random_patch_mask((64, 3, 32, 32), patch=2, ratio=0.5, generator=g)
    assert keep.shape == (64, 1, 32, 32)
    assert abs((1 - keep).mean().item() - 0.5) < 0.02
    blocks = keep.view(64, 1, 16, 2, 16, 2)
    assert torch.equal(blocks.amin((3, 5)), blocks.amax((3, 5)))  # constant on each 2x2 patch
    odd = random_patch_mask((4, 1, 7, 7), patch=2, ratio=0.5, generator=g)
    assert odd.shape == (4, 1, 7, 7)


def test_loss_only_on_masked_region():
    g = torch.Generator().manual_seed(1)
    pred, target = torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, 3, 8, 8, generator=g)
    keep = random_patch_mask(target.shape, generator=g)
    base = reconstruction_loss(pred, target, keep)
    visible_changed = target + 5.0 * keep
    assert torch.equal(reconstruction_loss(pred, visible_changed, keep), base)
    masked_changed = target + 5.0 * (1 - keep)
    assert not torch.isclose(reconstruction_loss(pred, masked_changed, keep), base)
    expected = ((pred - target) ** 2 * (1 - keep)).sum() / ((1 - keep).sum() * 3)
    torch.testing.assert_close(base, expected)


def test_mae_step_masks_the_encoder_input():
    module = MAEPretraining(**TINY)
    out = module.mae_step(torch.randn(4, 1, 8, 8), augment=False, generator=torch.Generator().manual_seed(0))
    zero = out["masked"] == 0
    assert 0.2 < zero.float().mean() < 0.8
    assert torch.equal(out["masked"][~zero], out["target"][~zero])
    assert out["pred"].shape == out["target"].shape == (4, 1, 8, 8)


def test_random_resized_crop():
    x = torch.randn(3, 2, 16, 16)
    assert random_resized_crop(x, (1.0, 1.0)) is x
    g = torch.Generator().manual_seed(0)
    y = random_resized_crop(x, (0.3, 0.6), generator=g)
    assert y.shape == x.shape and not torch.allclose(y, x)
    const = torch.full((2, 1, 8, 8), 0.25)
    torch.testing.assert_close(random_resized_crop(const, (0.2, 1.0)), const)


def test_optimisation_decreases_loss():
    torch.manual_seed(0)
    module = MAEPretraining(**TINY, lr=1e-2)
    opt = module.configure_optimizers()
    images = torch.randn(16, 1, 8, 8).cumsum(-1).clamp(-2, 2) / 2  # smooth rows: predictable from neighbours
    losses = []
    for _ in range(15):
        out = module.mae_step(images, augment=False, generator=torch.Generator().manual_seed(0))
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
    assert losses[-1] < 0.6 * losses[0], losses


def test_batch_flattening_and_classifier_ramp():
    pos = torch.randn(3, 4, 1, 8, 8)
    images, labels = MAEPretraining.images_and_labels({"positives": pos, "labels": torch.tensor([5, 0, 2])})
    assert images.shape == (12, 1, 8, 8) and torch.equal(images[4], pos[1, 0])
    assert labels.tolist() == [5] * 4 + [0] * 4 + [2] * 4
    module = MAEPretraining(**TINY, classifier_weight=0.1, classifier_ramp_steps=10, num_classes=6)
    assert [module.classifier_lambda(s) for s in (0, 5, 10, 20)] == pytest.approx([0.0, 0.05, 0.1, 0.1])
    assert MAEPretraining(**TINY).classifier_lambda(5) == 0.0
    with pytest.raises(ValueError, match="num_classes"):
        MAEPretraining(**TINY, classifier_weight=0.1)


class _GroupedBatches(Dataset):
    """Batches shaped like the drifting DataModules': positives [Nc, Npos, C, H, W], labels [Nc]."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(i)
        return {"positives": torch.rand(2, 3, 1, 8, 8, generator=g) * 2 - 1, "labels": torch.tensor([i % 3, 2])}


def test_lightning_checkpoint_loads_into_resnet_mae(tmp_path):
    torch.manual_seed(0)
    module = MAEPretraining(**TINY, classifier_weight=0.1, num_classes=3, log_images_every_n_steps=1, ema_decay=0.5)
    trainer = Trainer(
        max_steps=2,
        accelerator="cpu",
        logger=TensorBoardLogger(str(tmp_path), name="mae"),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, DataLoader(_GroupedBatches(), batch_size=None))
    assert {"mae/loss", "mae/recon", "mae/ce"} <= set(trainer.callback_metrics)
    log_dir = trainer.log_dir
    assert sorted(p.name for p in (tmp_path / "mae" / "version_0" / "mae_images").iterdir()) == [
        "step_0000000.png",
        "step_0000001.png",
    ]
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "mae" / "version_0").iterdir()), log_dir
    ckpt = tmp_path / "mae.ckpt"
    trainer.save_checkpoint(ckpt)

    encoder = ResNetMAE(**TINY, checkpoint=str(ckpt))
    ema, online = module.ema_encoder.state_dict(), module.encoder.state_dict()
    assert any(not torch.equal(ema[k], online[k]) for k in ema)  # the EMA lags the online weights
    for k, v in encoder.backbone.state_dict().items():
        assert torch.equal(v, ema[k]), k
    with pytest.raises(RuntimeError, match=r"trained with \{'width': 8\}"):
        ResNetMAE(**{**TINY, "width": 16}, checkpoint=str(ckpt))
    with pytest.warns(UserWarning, match=r"trained with \{'input_size': 8\}"):
        ResNetMAE(**{**TINY, "input_size": 16}, checkpoint=str(ckpt))

    module.export_encoder(tmp_path / "encoder.safetensors")
    exported = ResNetMAE(**TINY, checkpoint=str(tmp_path / "encoder.safetensors"))
    for k, v in exported.backbone.state_dict().items():
        assert torch.equal(v, ema[k]), k
