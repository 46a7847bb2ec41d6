"""The authors' encoders: import of their MAE artifacts, their 86/13 feature sets and their MAE loss, against
fixtures written by their JAX code (tools/official_encoder_fixtures.py)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import msgpack
import numpy as np
import pytest
import torch

from drifting_lightning.commands.import_official import main as import_official
from drifting_lightning.drift.loss import DriftingLoss
from drifting_lightning.encoders.convnext import ConvNeXtV2
from drifting_lightning.encoders.resnet_mae import ResNetConfig, ResNetMAE
from drifting_lightning.official.artifact import ArtifactError
from drifting_lightning.official.encoder import import_encoder, load_mae_model

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures" / "official"
sys.path.insert(0, str(ROOT / "tools"))
from synthetic_params import values, write_flax_msgpack  # noqa: E402  (pure numpy, shared with the fixture tool)


@pytest.fixture
def mae_artifact(tmp_path: Path):
    """Their artifact folder for a committed MAE fixture: its metadata and the weights rebuilt from its spec."""

    def build(name: str) -> Path:
        folder = tmp_path / "artifacts" / name
        folder.mkdir(parents=True)
        shutil.copy(FIXTURES / name / "metadata.json", folder)
        spec = json.loads((FIXTURES / name / "params_spec.json").read_text(encoding="utf-8"))
        write_flax_msgpack(folder / "ema_params.msgpack", values(spec))
        return folder

    return build


def fixture(name: str) -> dict[str, np.ndarray]:
    with np.load(FIXTURES / f"{name}.npz") as z:
        return dict(z)


def nchw(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(a).permute(0, 3, 1, 2).contiguous()


def assert_features_match(ours: dict[str, torch.Tensor], theirs: dict[str, np.ndarray]) -> None:
    """Same names in the same order; values equal to 1e-5 of each set's scale (float32 sums in another order: flax's
    GroupNorm takes E[x^2] - E[x]^2, torch a two-pass variance)."""
    names = list(theirs["names"])
    assert list(ours) == names
    for name in names:
        ref = torch.from_numpy(theirs[f"feat/{name}"])
        scale = max(1.0, ref.abs().max().item())
        torch.testing.assert_close(ours[name], ref, rtol=1e-5, atol=1e-5 * scale, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("name,arch", [("mae_latent", ResNetConfig(4, 32, (1, 4, 2, 1))),
                                       ("mae_pixel", ResNetConfig(3, 32, (2, 2, 1, 1), patchify=8))])
def test_imported_mae_returns_their_features(name: str, arch: ResNetConfig, tmp_path: Path, mae_artifact):
    path = import_encoder(mae_artifact(name), tmp_path)
    encoder = ResNetMAE(checkpoint=str(path))
    assert encoder.arch == arch
    theirs = fixture(name)
    assert_features_match(encoder(nchw(theirs["x"])), theirs)


def test_mae_loss_matches_theirs(mae_artifact):
    model = load_mae_model(mae_artifact("mae_latent"))  # the pixel fixture keeps only the encoder (size)
    theirs = fixture("mae_latent")
    out = model(nchw(theirs["x"]), torch.from_numpy(theirs["labels"]).long(), nchw(theirs["mask"]),
                float(theirs["lambda_cls"]))
    for key in ("loss", "recon_loss", "cls_loss"):
        torch.testing.assert_close(out[key].detach(), torch.from_numpy(theirs[key]), rtol=1e-5, atol=1e-5)


def test_convnext_features_match_theirs():
    encoder = ConvNeXtV2(str(FIXTURES / "convnext"))
    theirs = fixture("convnext")
    feats = encoder(nchw(theirs["x"]))
    assert len(feats) == 13
    assert_features_match(feats, theirs)


def test_convnext_tiny_random_config_and_offline_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from transformers import ConvNextV2Config, ConvNextV2Model

    torch.manual_seed(0)
    ConvNextV2Model(ConvNextV2Config(depths=[1, 1, 1, 1], hidden_sizes=[4, 8, 8, 16])).save_pretrained(tmp_path)
    x = (torch.rand(2, 3, 256, 256) * 2 - 1).requires_grad_(True)
    feats = ConvNeXtV2(str(tmp_path))(x)  # 256 -> 224 (antialiased, like jax.image.resize)
    assert feats["convenxt_stage_1"].shape == (2, 28 * 28, 8) and feats["global_mean"].shape == (2, 1, 16)
    sum(f.square().mean() for f in feats.values()).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="not a local folder and the hub is offline.*--local-dir"):
        ConvNeXtV2("facebook/convnextv2-base-22k-224")


def test_imported_features_run_through_drifting_loss(tmp_path: Path, mae_artifact):
    encoder = ResNetMAE(checkpoint=str(import_encoder(mae_artifact("mae_latent"), tmp_path)))
    torch.manual_seed(0)
    groups, gen_n, pos_n = 2, 3, 4
    gen = torch.randn(groups * gen_n, 4, 16, 16, requires_grad=True)
    pos = torch.randn(groups * pos_n, 4, 16, 16)

    def grouped(feats: dict[str, torch.Tensor], n: int) -> dict[str, torch.Tensor]:
        return {k: v.reshape(groups, n, *v.shape[1:]) for k, v in feats.items()}

    out = DriftingLoss()(grouped(encoder(gen), gen_n), grouped(encoder(pos), pos_n))
    assert len({k.split("/")[0] for k in out.stats}) == 56  # one loss term per feature set
    out.loss.backward()
    assert torch.isfinite(out.loss) and gen.grad.abs().sum() > 0


def test_import_official_command_writes_an_encoder_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture, mae_artifact
):
    assert import_official([str(mae_artifact("mae_latent")), "--out", str(tmp_path / "enc")]) == 0
    assert "(mae)" in capsys.readouterr().out
    saved = torch.load(tmp_path / "enc" / "encoder.pt", weights_only=True)
    assert saved["encoder_config"] == {"in_channels": 4, "width": 32, "stages": [1, 4, 2, 1], "patchify": 1}
    assert not any(k.startswith(("decoder", "fc")) for k in saved["encoder"])


def _rewrite(src: Path, dst: Path, edit) -> Path:
    """A copy of artifact ``src`` whose parameter tree went through ``edit(tree)``."""
    shutil.copytree(src, dst)
    tree = msgpack.unpackb((src / "ema_params.msgpack").read_bytes(), raw=False)
    edit(tree)
    (dst / "ema_params.msgpack").write_bytes(msgpack.packb(tree))
    return dst


def _array(shape: tuple[int, ...]) -> msgpack.ExtType:
    data = np.zeros(shape, np.float32)
    return msgpack.ExtType(1, msgpack.packb((list(shape), "float32", data.tobytes())))


def test_import_errors_name_key_and_shape(tmp_path: Path, mae_artifact):
    src = mae_artifact("mae_latent")
    missing = _rewrite(src, tmp_path / "missing", lambda t: t["encoder"]["layer2_norm"].pop("scale"))
    with pytest.raises(ArtifactError, match=r"encoder/layer2_norm/scale \[64\] is missing"):
        import_encoder(missing, tmp_path / "out")
    wrong = _rewrite(src, tmp_path / "wrong", lambda t: t["encoder"]["conv1"].update(kernel=_array((3, 3, 4, 16))))
    shapes = r"encoder/conv1/kernel has shape \[3, 3, 4, 16\], expected \[3, 3, 4, 32\]"
    with pytest.raises(ArtifactError, match=shapes):
        import_encoder(wrong, tmp_path / "out")
    extra = _rewrite(src, tmp_path / "extra", lambda t: t["encoder"].update(layer5_norm={"scale": _array((8,))}))
    with pytest.raises(ArtifactError, match=r"unknown parameter encoder/layer5_norm/scale \[8\]"):
        import_encoder(extra, tmp_path / "out")
    # the decoder is never read for features: a broken decoder does not stop the import
    no_decoder = _rewrite(src, tmp_path / "no_decoder", lambda t: t["decoder"].update(bridge={}))
    assert import_encoder(no_decoder, tmp_path / "ok").is_file()
