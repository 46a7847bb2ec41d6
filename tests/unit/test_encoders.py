"""Feature encoders: names and shapes, statistics, frozen weights with gradient flow, checkpoint loading."""

from __future__ import annotations

import warnings

import pytest
import torch
import torchvision
from torch import nn

from drifting_lightning.encoders.base import FeatureEncoder, Identity
from drifting_lightning.encoders.composite import CompositeEncoder
from drifting_lightning.encoders.resnet50 import PretrainedResNet50
from drifting_lightning.encoders.resnet_mae import ResNetMAE, stage_strides
from drifting_lightning.encoders.stats import input_statistic, multiscale_features, patch_fits

TAPS = [
    "stem",
    "stage1.block2",
    "stage1.block3",
    "stage2.block2",
    "stage2.block4",
    "stage3.block2",
    "stage3.block4",
    "stage3.block6",
    "stage4.block2",
    "stage4.block3",
]


def random_r50() -> PretrainedResNet50:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PretrainedResNet50()


def test_multiscale_features_match_loops():
    torch.manual_seed(0)
    eps = 1e-6
    fmap = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    out = multiscale_features(fmap, "f", eps=eps)
    assert set(out) == {
        "f.location",
        "f.mean",
        "f.std",
        "f.patch2.mean",
        "f.patch2.std",
        "f.patch4.mean",
        "f.patch4.std",
    }
    for b in range(2):
        for c in range(3):
            for i in range(8):
                for j in range(8):
                    assert out["f.location"][b, i * 8 + j, c] == fmap[b, c, i, j]
            vals = fmap[b, c].flatten()
            assert torch.isclose(out["f.mean"][b, 0, c], vals.mean())
            assert torch.isclose(out["f.std"][b, 0, c], torch.sqrt(vals.var(unbiased=False) + eps))
            for p in (2, 4):
                g = 8 // p
                for pi in range(g):
                    for pj in range(g):
                        patch = fmap[b, c, pi * p : (pi + 1) * p, pj * p : (pj + 1) * p].flatten()
                        k = pi * g + pj
                        assert torch.isclose(out[f"f.patch{p}.mean"][b, k, c], patch.mean())
                        assert torch.isclose(
                            out[f"f.patch{p}.std"][b, k, c], torch.sqrt(patch.var(unbiased=False) + eps)
                        )


def test_patch_families_skipped_when_they_do_not_fit():
    assert set(multiscale_features(torch.randn(1, 2, 6, 6), "m")) == {
        "m.location",
        "m.mean",
        "m.std",
        "m.patch2.mean",
        "m.patch2.std",
    }
    assert "m.patch4.mean" not in multiscale_features(torch.randn(1, 2, 4, 4), "m")  # one patch = global
    assert set(multiscale_features(torch.randn(1, 2, 7, 7), "m")) == {"m.location", "m.mean", "m.std"}
    assert not patch_fits(2, 2, 2) and patch_fits(28, 28, 4) and not patch_fits(14, 14, 4)
    only = multiscale_features(torch.randn(1, 2, 8, 8), "m", families=("global",))
    assert set(only) == {"m.mean", "m.std"}
    with pytest.raises(ValueError, match="unknown feature families"):
        multiscale_features(torch.randn(1, 2, 8, 8), "m", families=("patch3",))


def test_std_and_input_statistic_backprop_at_zero():
    x = torch.zeros(2, 3, 4, 4, requires_grad=True)
    feats = multiscale_features(x, "z")
    total = sum(f.sum() for f in feats.values()) + input_statistic(x).sum()
    total.backward()
    assert torch.isfinite(x.grad).all()


def test_input_statistic_kinds():
    x = torch.randn(2, 3, 5, 5)
    ms = (x**2).mean((2, 3)).unsqueeze(1)
    assert input_statistic(x, "mean_sq").shape == (2, 1, 3)
    torch.testing.assert_close(input_statistic(x, "mean_sq"), ms)
    torch.testing.assert_close(input_statistic(x), torch.sqrt(ms + 1e-6))
    with pytest.raises(ValueError, match="unknown input statistic"):
        input_statistic(x, "mean")


@pytest.mark.parametrize(
    "channels,size,maps", [(1, 8, [8, 8, 4, 4, 4]), (1, 28, [28, 28, 14, 7, 7]), (4, 32, [32, 32, 16, 8, 4])]
)
def test_resnet_mae_names_and_shapes(channels, size, maps):
    width = 8
    enc = ResNetMAE(in_channels=channels, width=width, input_size=size)
    feats = enc(torch.randn(2, channels, size, size))
    expected = {}
    for tap in TAPS:
        stage = 0 if tap == "stem" else int(tap[5])
        s, c = maps[stage], width * 2 ** max(stage - 1, 0)
        expected[f"{tap}.location"] = (2, s * s, c)
        expected[f"{tap}.mean"] = expected[f"{tap}.std"] = (2, 1, c)
        for p in (2, 4):
            if patch_fits(s, s, p):
                expected[f"{tap}.patch{p}.mean"] = expected[f"{tap}.patch{p}.std"] = (2, s * s // p**2, c)
    expected["input.stat"] = (2, 1, channels)
    expected["raw"] = (2, 1, channels * size * size)
    assert {k: tuple(v.shape) for k, v in feats.items()} == expected


def test_stage_strides_rule():
    assert stage_strides(32, 4) == [1, 2, 2, 2]
    assert stage_strides(28, 4) == [1, 2, 2, 1]
    assert stage_strides(8, 4) == [1, 2, 1, 1]
    assert stage_strides(64, 4, min_map=8) == [1, 2, 2, 2]


def test_resnet_mae_patchify_and_options():
    enc = ResNetMAE(
        in_channels=3,
        width=8,
        stages=(1, 1),
        input_size=32,
        patchify=4,
        families=("global",),
        include_raw=False,
        input_stat="mean_sq",
    )
    feats = enc(torch.randn(2, 3, 32, 32))
    assert set(feats) == {
        "stem.mean",
        "stem.std",
        "stage1.block1.mean",
        "stage1.block1.std",
        "stage2.block1.mean",
        "stage2.block1.std",
        "input.stat",
    }
    assert feats["input.stat"].shape == (2, 1, 48)  # statistic of the 8x8x48 patchified input
    with pytest.raises(ValueError, match="multiple of patchify"):
        ResNetMAE(in_channels=3, width=8, input_size=30, patchify=4)


def test_resnet50_names_and_shapes():
    feats = random_r50()(torch.rand(2, 3, 64, 64) * 2 - 1)
    shapes = {k: tuple(v.shape) for k, v in feats.items()}
    assert shapes["layer1.location"] == (2, 256, 256)
    assert shapes["layer1.patch4.std"] == (2, 16, 256)
    assert shapes["layer2.patch2.mean"] == (2, 16, 512)
    assert shapes["layer3.location"] == (2, 16, 1024) and "layer3.patch4.mean" not in shapes
    assert shapes["layer4.mean"] == (2, 1, 2048) and "layer4.patch2.mean" not in shapes  # 2x2 map
    assert len(shapes) == 7 + 7 + 5 + 3


@pytest.mark.parametrize(
    "make",
    [lambda: ResNetMAE(in_channels=1, width=8, stages=(1, 2), input_size=8), random_r50],
    ids=["resnet_mae", "resnet50"],
)
def test_frozen_encoder_passes_gradient_to_generator(make):
    torch.manual_seed(0)
    encoder: FeatureEncoder = make()
    channels = encoder.backbone.stem[0].in_channels if isinstance(encoder, ResNetMAE) else 3
    size = 8 if isinstance(encoder, ResNetMAE) else 32
    shape = (channels, size, size)
    generator = nn.Sequential(nn.Linear(4, channels * size * size), nn.Tanh(), nn.Unflatten(1, shape))
    parent = nn.ModuleDict({"generator": generator, "encoder": encoder})
    parent.train()
    assert not any(m.training for m in encoder.modules())
    assert all(not p.requires_grad for p in encoder.parameters())
    frozen = {k: v.clone() for k, v in encoder.state_dict().items()}
    gen_before = {k: v.clone() for k, v in generator.state_dict().items()}
    opt = torch.optim.AdamW(parent.parameters(), lr=1e-2, weight_decay=0.1)
    feats = encoder(generator(torch.randn(4, 4)))
    loss = sum(f.float().square().mean() for f in feats.values())
    loss.backward()
    assert generator[0].weight.grad is not None and generator[0].weight.grad.abs().sum() > 0
    opt.step()
    for k, v in encoder.state_dict().items():
        assert torch.equal(v, frozen[k]), k
    assert not torch.equal(generator[0].weight, gen_before["0.weight"])


def test_resnet_mae_plain_state_dict_round_trip(tmp_path):
    src = ResNetMAE(in_channels=1, width=8, stages=(1, 1), input_size=8)
    torch.save(src.backbone.state_dict(), tmp_path / "w.pt")
    torch.save(src.state_dict(), tmp_path / "prefixed.pt")
    from safetensors.torch import save_file

    save_file(src.backbone.state_dict(), str(tmp_path / "w.safetensors"))
    for name in ("w.pt", "prefixed.pt", "w.safetensors"):
        dst = ResNetMAE(in_channels=1, width=8, stages=(1, 1), input_size=8, checkpoint=str(tmp_path / name))
        for k, v in src.state_dict().items():
            assert torch.equal(dst.state_dict()[k], v), (name, k)
    with pytest.raises(RuntimeError, match=r"missing keys: .*stages\.1\.1\.|shape mismatches"):
        ResNetMAE(in_channels=1, width=8, stages=(1, 2), input_size=8, checkpoint=str(tmp_path / "w.pt"))
    with pytest.raises(RuntimeError, match="shape mismatches: stem.0.weight"):
        ResNetMAE(in_channels=1, width=16, stages=(1, 1), input_size=8, checkpoint=str(tmp_path / "w.pt"))


def test_missing_checkpoint_file_is_named(tmp_path):
    missing = str(tmp_path / "nowhere.ckpt")
    with pytest.raises(FileNotFoundError, match="nowhere.ckpt"):
        ResNetMAE(in_channels=1, width=8, stages=(1,), input_size=8, checkpoint=missing)
    with pytest.raises(FileNotFoundError, match="nowhere.ckpt"):
        PretrainedResNet50(checkpoint=missing)


def _torchvision_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    return torchvision.models.resnet50(weights=None).state_dict()


def test_resnet50_checkpoint_layouts(tmp_path):
    sd = _torchvision_state()
    moco = {f"module.encoder_q.{k}": v for k, v in sd.items() if not k.startswith("fc.")}
    moco.update(
        {
            "module.encoder_q.fc.0.weight": torch.zeros(2048, 2048),
            "module.encoder_q.fc.2.weight": torch.zeros(128, 2048),
            "module.encoder_k.conv1.weight": torch.zeros(1),
            "module.queue": torch.zeros(1),
        }
    )
    no_counter = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    files = {
        "moco": ({"state_dict": moco, "epoch": 200}, "auto"),
        "torchvision": (sd, "auto"),
        "simclr": ({"state_dict": no_counter}, "simclr"),
        "ddp": ({"model": {f"module.{k}": v for k, v in sd.items()}}, "auto"),
    }
    for name, (obj, layout) in files.items():
        torch.save(obj, tmp_path / f"{name}.pth")
        enc = PretrainedResNet50(checkpoint=str(tmp_path / f"{name}.pth"), key_layout=layout)
        for k, v in enc.net.state_dict().items():
            assert torch.equal(v, sd[k]) or k.endswith("num_batches_tracked"), (name, k)
    with pytest.raises(RuntimeError, match="missing keys"):
        PretrainedResNet50(checkpoint=str(tmp_path / "moco.pth"), key_layout="torchvision")


def test_resnet50_missing_keys_are_listed(tmp_path):
    sd = _torchvision_state()
    del sd["layer4.2.conv3.weight"], sd["bn1.running_mean"]
    torch.save(sd, tmp_path / "partial.pt")
    with pytest.raises(RuntimeError, match="2 missing keys") as err:
        PretrainedResNet50(checkpoint=str(tmp_path / "partial.pt"))
    assert "layer4.2.conv3.weight" in str(err.value) and "bn1.running_mean" in str(err.value)
    assert "partial.pt" in str(err.value)
    with pytest.raises(ValueError, match="unknown key_layout"):
        PretrainedResNet50(checkpoint=str(tmp_path / "partial.pt"), key_layout="dino")


def test_composite_naming_and_clash():
    x = torch.randn(2, 3)
    comp = CompositeEncoder([Identity(), Identity("flat")])
    assert set(comp(x)) == {"raw", "flat"}
    comp = CompositeEncoder([Identity(), Identity()], prefixes=["a", "b"])
    feats = comp(x)
    assert set(feats) == {"a.raw", "b.raw"} and feats["a.raw"].shape == (2, 1, 3)
    with pytest.raises(ValueError, match="'raw' is produced by encoder 0 .* and encoder 1"):
        CompositeEncoder([Identity(), Identity()])(x)
    with pytest.raises(ValueError, match="prefixes"):
        CompositeEncoder([Identity(), Identity()], prefixes=["a"])
    inner = CompositeEncoder([ResNetMAE(in_channels=1, width=8, stages=(1,), input_size=8), Identity("pix")])
    inner.train()
    assert not any(m.training for m in inner.modules())
    assert "stem.location" in inner(torch.randn(2, 1, 8, 8))
