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
from drifting_lightning.encoders.resnet_mae import ResNetConfig, ResNetMAE, gn_groups, patchify, unpatchify
from drifting_lightning.encoders.stats import input_statistic, multiscale_features, patch_fits

# The authors' taps for blocks 3-4-6-3 (get_activations with every_k_block = 2).
TAPS = ["conv1", "layer1", "layer2", "layer3", "layer4", "layer1_blk2", "layer2_blk2", "layer2_blk4", "layer3_blk2",
        "layer3_blk4", "layer3_blk6", "layer4_blk2"]


def random_r50() -> PretrainedResNet50:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PretrainedResNet50()


def test_multiscale_features_match_loops():
    torch.manual_seed(0)
    eps = 1e-6
    fmap = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    out = multiscale_features(fmap, "f", eps=eps)
    assert list(out) == ["f", "f_mean", "f_std", "f_mean_2", "f_mean_4", "f_std_2", "f_std_4"]
    for b in range(2):
        for c in range(3):
            for i in range(8):
                for j in range(8):
                    assert out["f"][b, i * 8 + j, c] == fmap[b, c, i, j]
            vals = fmap[b, c].flatten()
            assert torch.isclose(out["f_mean"][b, 0, c], vals.mean())
            assert torch.isclose(out["f_std"][b, 0, c], torch.sqrt(vals.var(unbiased=False) + eps))
            for p in (2, 4):
                g = 8 // p
                for pi in range(g):
                    for pj in range(g):
                        patch = fmap[b, c, pi * p : (pi + 1) * p, pj * p : (pj + 1) * p].flatten()
                        k = pi * g + pj
                        assert torch.isclose(out[f"f_mean_{p}"][b, k, c], patch.mean())
                        assert torch.isclose(
                            out[f"f_std_{p}"][b, k, c], torch.sqrt(patch.var(unbiased=False) + eps)
                        )


def test_patch_families_skipped_when_they_do_not_fit():
    assert set(multiscale_features(torch.randn(1, 2, 6, 6), "m")) == {"m", "m_mean", "m_std", "m_mean_2", "m_std_2"}
    four = multiscale_features(torch.randn(1, 2, 4, 4), "m")  # the authors keep 4x4 on a 4x4 map
    torch.testing.assert_close(four["m_mean_4"], four["m_mean"])
    assert set(multiscale_features(torch.randn(1, 2, 7, 7), "m")) == {"m", "m_mean", "m_std"}
    assert patch_fits(2, 2, 2) and patch_fits(28, 28, 4) and not patch_fits(14, 14, 4)
    only = multiscale_features(torch.randn(1, 2, 8, 8), "m", families=("global",))
    assert set(only) == {"m_mean", "m_std"}
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


@pytest.mark.parametrize("channels,size,maps", [(4, 32, [32, 32, 16, 8, 4]), (1, 28, [28, 28, 14, 7, 4])])
def test_resnet_mae_names_and_shapes(channels, size, maps):
    width = 8
    feats = ResNetMAE(ResNetConfig(channels, width, (3, 4, 6, 3)))(torch.randn(2, channels, size, size))
    expected = {"global": (2, 1, channels * size * size), "norm_x": (2, 1, channels)}
    for tap in TAPS:
        stage = 0 if tap == "conv1" else int(tap[5])
        s, c = maps[stage], width * 2 ** max(stage - 1, 0)
        expected[tap] = (2, s * s, c)
        expected[f"{tap}_mean"] = expected[f"{tap}_std"] = (2, 1, c)
        for p in (2, 4):
            if patch_fits(s, s, p):
                expected[f"{tap}_mean_{p}"] = expected[f"{tap}_std_{p}"] = (2, s * s // p**2, c)
    assert {k: tuple(v.shape) for k, v in feats.items()} == expected
    if size == 32:  # the authors' latent MAE: 86 feature sets
        assert len(feats) == 86


def test_group_norm_groups_and_arch_checks():
    assert [gn_groups(c) for c in (640, 48, 24, 7, 1)] == [32, 24, 24, 7, 1]
    enc = ResNetMAE(ResNetConfig(1, 24, (1, 1, 1, 1)))
    assert enc.encoder.gn1.num_groups == 24 and enc.encoder.gn1.eps == 1e-6
    assert enc.encoder.layer4_norm.num_groups == 32  # 192 channels
    with pytest.raises(ValueError, match="4 positive block counts"):
        ResNetConfig(stages=(1, 1))


def test_patchify_orders_channels_h_w_c():
    x = torch.randn(2, 3, 16, 16)
    z = patchify(x, 8)
    assert z.shape == (2, 192, 2, 2)
    # channel (h2 * 8 + w2) * 3 + c of patch (i, j) is pixel (8i + h2, 8j + w2) of channel c
    assert torch.equal(z[1, (5 * 8 + 2) * 3 + 1, 1, 0], x[1, 1, 8 + 5, 2])
    assert torch.equal(unpatchify(z, 8, 3), x)


def test_resnet_mae_patchify_and_options():
    enc = ResNetMAE(ResNetConfig(3, 8, (1, 1, 1, 1), patchify=4), families=("global",), include_raw=False)
    feats = enc(torch.randn(2, 3, 32, 32))
    taps = ["conv1", "layer1", "layer2", "layer3", "layer4"]
    assert list(feats) == ["norm_x"] + [f"{t}_{s}" for t in taps for s in ("mean", "std")]
    assert feats["norm_x"].shape == (2, 1, 48)  # statistic of the 8x8x48 patchified input


def test_resnet50_names_and_shapes():
    feats = random_r50()(torch.rand(2, 3, 64, 64) * 2 - 1)
    shapes = {k: tuple(v.shape) for k, v in feats.items()}
    assert shapes["layer1"] == (2, 256, 256)
    assert shapes["layer1_std_4"] == (2, 16, 256)
    assert shapes["layer2_mean_2"] == (2, 16, 512)
    assert shapes["layer3"] == (2, 16, 1024) and shapes["layer3_mean_4"] == (2, 1, 1024)
    assert shapes["layer4_mean"] == (2, 1, 2048) and shapes["layer4_mean_2"] == (2, 1, 2048)  # 2x2 map
    assert len(shapes) == 7 + 7 + 7 + 5


@pytest.mark.parametrize(
    "make",
    [lambda: ResNetMAE(ResNetConfig(1, 8, (1, 2, 1, 1))), random_r50],
    ids=["resnet_mae", "resnet50"],
)
def test_frozen_encoder_passes_gradient_to_generator(make):
    torch.manual_seed(0)
    encoder: FeatureEncoder = make()
    channels = encoder.arch.in_channels if isinstance(encoder, ResNetMAE) else 3
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
    arch = ResNetConfig(1, 8, (1, 1, 1, 1))
    src = ResNetMAE(arch)
    torch.save(src.encoder.state_dict(), tmp_path / "w.pt")
    torch.save(src.state_dict(), tmp_path / "prefixed.pt")
    from safetensors.torch import save_file

    save_file(src.encoder.state_dict(), str(tmp_path / "w.safetensors"))
    for name in ("w.pt", "prefixed.pt", "w.safetensors"):
        dst = ResNetMAE(arch, checkpoint=str(tmp_path / name))
        for k, v in src.state_dict().items():
            assert torch.equal(dst.state_dict()[k], v), (name, k)
    with pytest.raises(RuntimeError, match=r"missing keys: stages\.1\.1\."):
        ResNetMAE(ResNetConfig(1, 8, (1, 2, 1, 1)), checkpoint=str(tmp_path / "w.pt"))
    with pytest.raises(RuntimeError, match="shape mismatches: conv1.weight"):
        ResNetMAE(ResNetConfig(1, 16, (1, 1, 1, 1)), checkpoint=str(tmp_path / "w.pt"))


def test_missing_checkpoint_file_is_named(tmp_path):
    missing = str(tmp_path / "nowhere.ckpt")
    with pytest.raises(FileNotFoundError, match="nowhere.ckpt"):
        ResNetMAE(checkpoint=missing)
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
    inner = CompositeEncoder([ResNetMAE(ResNetConfig(1, 8, (1, 1, 1, 1))), Identity("pix")])
    inner.train()
    assert not any(m.training for m in inner.modules())
    assert "conv1" in inner(torch.randn(2, 1, 8, 8))
