"""MAE pretraining through a real Trainer.fit: images logged, the fine-tune ramp reached, and its Lightning checkpoint
and exported encoder loading into ResNetMAE with their architecture."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader, Dataset

from drifting_lightning.encoders.mae import MAEPretraining
from drifting_lightning.encoders.resnet_mae import ResNetConfig, ResNetMAE

TINY = ResNetConfig(in_channels=1, width=8, stages=(1, 1, 1, 1))


class _GroupedBatches(Dataset):
    """Batches shaped like the drifting DataModules': positives [Nc, Npos, C, H, W], labels [Nc]."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(i)
        return {"positives": torch.rand(2, 3, 1, 8, 8, generator=g) * 2 - 1, "labels": torch.tensor([i % 3, 2])}


def test_lightning_checkpoint_loads_into_resnet_mae(tmp_path):
    torch.manual_seed(0)
    module = MAEPretraining(TINY, num_classes=3, finetune_last_steps=2, finetune_warmup=1, log_images_every_n_steps=1,
                            ema_decay=0.5)
    trainer = Trainer(
        max_steps=3,
        accelerator="cpu",
        logger=TensorBoardLogger(str(tmp_path), name="mae"),
        enable_progress_bar=False,
        enable_model_summary=False,
    )  # Lightning's own ModelCheckpoint (no monitor): its state in the file holds an Inf kth_value, not a weight
    trainer.fit(module, DataLoader(_GroupedBatches(), batch_size=None))
    assert {"mae/loss", "mae/recon", "mae/ce"} <= set(trainer.callback_metrics)  # step 2: lambda 0.1
    images = sorted(p.name for p in (tmp_path / "mae" / "version_0" / "mae_images").iterdir())
    assert images == ["step_0000000.png", "step_0000001.png", "step_0000002.png"]
    ckpt = tmp_path / "mae.ckpt"
    trainer.save_checkpoint(ckpt)

    encoder = ResNetMAE(checkpoint=str(ckpt))  # the architecture comes with the checkpoint
    assert encoder.arch == TINY
    ema, online = module.ema_encoder.state_dict(), module.model.encoder.state_dict()
    assert any(not torch.equal(ema[k], online[k]) for k in ema)  # the EMA lags the online weights
    for k, v in encoder.encoder.state_dict().items():
        assert torch.equal(v, ema[k]), k
    with pytest.raises(RuntimeError, match=r"holds an encoder with arch .*'width': 8"):
        ResNetMAE(ResNetConfig(1, 16, (1, 1, 1, 1)), checkpoint=str(ckpt))

    module.export_encoder(tmp_path / "encoder.pt")
    exported = ResNetMAE(checkpoint=str(tmp_path / "encoder.pt"))
    assert exported.arch == TINY
    for k, v in exported.encoder.state_dict().items():
        assert torch.equal(v, ema[k]), k


def test_step_checkpoints_hold_the_ema_of_their_step(tmp_path):
    """ModelCheckpoint(every_n_train_steps) saves in its on_train_batch_end, which Lightning calls before the module's:
    the step-2 checkpoint must hold the EMA encoder the module ends step 2 with, not the one of step 1."""
    torch.manual_seed(0)
    module = MAEPretraining(TINY, num_classes=3, warmup_steps=0, ema_decay=0.5, log_images_every_n_steps=0)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, filename="step", every_n_train_steps=2)
    trainer = Trainer(max_steps=2, accelerator="cpu", logger=False, callbacks=[checkpoint], enable_progress_bar=False,
                      enable_model_summary=False)  # fmt: skip
    trainer.fit(module, DataLoader(_GroupedBatches(), batch_size=None))
    saved = torch.load(tmp_path / "step.ckpt", map_location="cpu", weights_only=True)
    assert saved["global_step"] == 2
    ema = module.ema_encoder.state_dict()
    assert any(not torch.equal(ema[k], v) for k, v in module.model.encoder.state_dict().items())  # the EMA lags
    for k, v in ema.items():
        assert torch.equal(saved["state_dict"][f"ema_encoder.{k}"], v), k
