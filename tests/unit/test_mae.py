"""MAE pretraining with the authors' recipe: masking, their per-sample loss, optimiser, fine-tune ramp, checkpoints."""

from __future__ import annotations

import pytest
import torch

from drifting_lightning.encoders.mae import MAEPretraining, random_flip, random_resized_crop
from drifting_lightning.encoders.mae_model import MAEModel, patch_mask
from drifting_lightning.encoders.resnet_mae import ResNetConfig

TINY = ResNetConfig(in_channels=1, width=8, stages=(1, 1, 1, 1))


def test_mask_fraction_and_patches():
    g = torch.Generator().manual_seed(0)
    mask = patch_mask((64, 32, 32), patch=2, ratio=0.5, generator=g)
    assert mask.shape == (64, 1, 32, 32)
    assert abs(mask.mean().item() - 0.5) < 0.02
    blocks = mask.view(64, 1, 16, 2, 16, 2)
    assert torch.equal(blocks.amin((3, 5)), blocks.amax((3, 5)))  # constant on each 2x2 patch
    with pytest.raises(ValueError, match="not tiled"):
        patch_mask((4, 7, 7), patch=2, ratio=0.5)


def test_loss_is_their_per_sample_masked_error():
    torch.manual_seed(1)
    model = MAEModel(ResNetConfig(3, 8, (1, 1, 1, 1), patchify=4), num_classes=5)
    x, labels = torch.randn(2, 3, 16, 16), torch.tensor([1, 4])
    mask = patch_mask((2, 4, 4), 2, 0.5, generator=torch.Generator().manual_seed(0))
    out = model(x, labels, mask, lambda_cls=0.25)
    target = torch.nn.functional.pixel_unshuffle(x, 4)  # channel order does not matter for the summed error
    sq = (out["recon"] - target.view(2, 3, 16, 4, 4).transpose(1, 2).reshape(2, 48, 4, 4)).square()
    expected = (sq * mask).sum((1, 2, 3)) / mask.sum((1, 2, 3))  # summed over channels, mean over masked places
    torch.testing.assert_close(out["recon_loss"], expected)
    torch.testing.assert_close(out["loss"], 0.25 * out["cls_loss"] + 0.75 * out["recon_loss"])
    # changing the masked pixels changes the target there, so the loss (the encoder never sees them)
    changed = x + 5.0 * torch.nn.functional.interpolate(1 - mask, scale_factor=4)
    assert not torch.allclose(model(changed, labels, mask)["recon_loss"], out["recon_loss"])


def test_random_resized_crop_and_flip():
    x = torch.randn(3, 2, 16, 16)
    assert random_resized_crop(x, (1.0, 1.0)) is x
    g = torch.Generator().manual_seed(0)
    y = random_resized_crop(x, (0.2, 0.6), generator=g)
    assert y.shape == x.shape and not torch.allclose(y, x)
    const = torch.full((2, 1, 8, 8), 0.25)
    torch.testing.assert_close(random_resized_crop(const, (0.2, 1.0)), const)
    flipped = random_flip(x, torch.Generator().manual_seed(3))
    assert all(torch.equal(f, a) or torch.equal(f, a.flip(-1)) for f, a in zip(flipped, x))


def test_optimiser_is_their_adamw_on_every_parameter():
    module = MAEPretraining(TINY, num_classes=3, warmup_steps=4)
    cfg = module.configure_optimizers()
    opt, sched = cfg["optimizer"], cfg["lr_scheduler"]["scheduler"]
    (group,) = opt.param_groups
    assert group["weight_decay"] == 0.01 and group["betas"] == (0.9, 0.95) and group["lr"] == pytest.approx(1e-3)
    assert len(group["params"]) == len(list(module.model.parameters()))  # norms and biases decay too
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([1e-3, 2e-3, 3e-3, 4e-3, 4e-3, 4e-3])  # warm-up, then constant


def test_optimisation_decreases_loss():
    torch.manual_seed(0)
    module = MAEPretraining(TINY, num_classes=2, lr=1e-2, warmup_steps=0)
    opt = module.configure_optimizers()
    images = torch.randn(16, 1, 16, 16).cumsum(-1).clamp(-2, 2) / 2  # smooth rows: predictable from neighbours
    losses = []
    for _ in range(15):
        out = module.mae_step(images, None, 0, augment=False, generator=torch.Generator().manual_seed(0))
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
    assert losses[-1] < 0.6 * losses[0], losses


def test_batch_flattening_and_finetune_ramp():
    pos = torch.randn(3, 4, 1, 8, 8)
    images, labels = MAEPretraining.images_and_labels({"positives": pos, "labels": torch.tensor([5, 0, 2])})
    assert images.shape == (12, 1, 8, 8) and torch.equal(images[4], pos[1, 0])
    assert labels.tolist() == [5] * 4 + [0] * 4 + [2] * 4
    module = MAEPretraining(TINY, num_classes=6, total_steps=100, finetune_last_steps=30, finetune_warmup=10)
    lams = [module.classifier_lambda(s) for s in (0, 69, 70, 75, 80, 99)]
    assert lams == pytest.approx([0.0, 0.0, 0.0, 0.05, 0.1, 0.1])
    assert MAEPretraining(TINY, num_classes=6).classifier_lambda(5) == 0.0
    with pytest.raises(ValueError, match="num_classes"):
        MAEPretraining(TINY, num_classes=1, finetune_last_steps=3)
