"""Our DiT against the authors' JAX DitGen (fixtures from tools/official_generator_fixtures.py): import of their
artifacts, the same samples for the same noise, labels, style labels and alpha, and the import's errors."""

import json
import math
import shutil
from pathlib import Path

import msgpack
import numpy as np
import pytest
import torch

from drifting_lightning import load_generator
from drifting_lightning.commands import import_official, sample
from drifting_lightning.models.dit import DiT
from drifting_lightning.official.artifact import ArtifactError, read_params
from drifting_lightning.official.generator import (
    dit_kwargs,
    import_generator,
    load_official_generator,
    parameter_rules,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "official"
NAMES = ["latent", "pixel", "plain"]
ALPHAS = ["alpha_1.0", "alpha_2.5", "alpha_vec"]


def their_outputs(name: str) -> dict[str, np.ndarray]:
    with np.load(FIXTURES / f"gen_{name}.npz") as d:
        return {k: d[k] for k in d.files}


def our_samples(gen: DiT, ref: dict[str, np.ndarray], alpha_key: str) -> np.ndarray:
    """Their inputs in our convention: BHWC noise -> BCHW, noise_labels -> style, cfg_scale -> alpha."""
    noise = torch.from_numpy(ref["noise_bhwc"]).permute(0, 3, 1, 2)
    style = torch.from_numpy(ref["style_labels"]).long() if gen.num_style_tokens else None
    with torch.no_grad():
        out = gen(noise, torch.from_numpy(ref["labels"]).long(), torch.from_numpy(ref[f"{alpha_key}_value"]), style)
    return out.permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("name", NAMES)
def test_imported_export_makes_their_samples(name, tmp_path):
    out = import_generator(FIXTURES / f"gen_{name}", tmp_path / name)
    gen = load_generator(out)
    ref = their_outputs(name)
    for key in ALPHAS:
        theirs = ref[key]
        assert np.abs(theirs).mean() > 0.1  # the fixture's weights were moved off the zero init
        np.testing.assert_allclose(our_samples(gen, ref, key), theirs, atol=1e-5, rtol=0, err_msg=key)
    assert np.abs(ref["alpha_1.0"] - ref["alpha_2.5"]).max() > 1e-4  # alpha matters at this tolerance
    params = read_params(FIXTURES / f"gen_{name}" / "ema_params.msgpack")
    assert sum(p.numel() for p in gen.parameters()) == sum(p.numel() for p in params.values())


@pytest.mark.parametrize("name", NAMES)
def test_fresh_model_has_their_initial_positions(name):
    metadata = json.loads((FIXTURES / f"gen_{name}" / "metadata.json").read_text())
    model = DiT(**dit_kwargs(metadata["model_config"]))
    np.testing.assert_allclose(model.pos_embed.detach().numpy(), their_outputs(name)["init_pos_embed"][0], atol=1e-7)


def test_config_mapping():
    config = json.loads((FIXTURES / "gen_latent" / "metadata.json").read_text())["model_config"]
    kwargs = dit_kwargs(config)
    assert kwargs["num_style_tokens"] == 32 and kwargs["style_codebook_size"] == 64
    assert kwargs["num_context_tokens"] == 16 and kwargs["cond_dim"] == 64
    released = {**config, "input_size": 32, "hidden_size": 1024, "depth": 24, "num_heads": 16, "cond_dim": 1024,
                "num_classes": 1000, "use_bf16": True, "attn_fp32": False}  # latent_sota_L
    assert dit_kwargs(released)["preset"] == "L/2"
    plain = dit_kwargs(json.loads((FIXTURES / "gen_plain" / "metadata.json").read_text())["model_config"])
    assert plain["num_style_tokens"] == 0 and plain["num_context_tokens"] == 0


RELEASED = json.loads((FIXTURES / "gen_release_shapes.json").read_text())


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_rules_cover_their_released_configurations_exactly(name):
    """Every parameter of their five ImageNet configurations (names and shapes from jax.eval_shape of their module,
    model_config as their train.py records it) has a rule, with that shape, and nothing else does."""
    release = RELEASED[name]
    with torch.device("meta"):
        model = DiT(**dit_kwargs(release["model_config"]))
    rules = parameter_rules(model)
    assert sorted(rules) == sorted(release["shapes"])
    assert all(list(rules[k].shape) == shape for k, shape in release["shapes"].items())
    assert sum(p.numel() for p in model.parameters()) == sum(math.prod(s) for s in release["shapes"].values())
    preset = {"latent_ablation": "B/2", "latent_sota_B": "B/2", "latent_sota_L": "L/2", "pixel_sota_B": "B/16",
              "pixel_sota_L": "L/16"}[name]  # fmt: skip
    assert model.config["preset"] == preset


def copy_fixture(tmp_path: Path, name: str = "plain") -> Path:
    folder = tmp_path / f"gen_{name}"
    shutil.copytree(FIXTURES / f"gen_{name}", folder)
    return folder


def rewrite_params(folder: Path, edit) -> None:
    path = folder / "ema_params.msgpack"
    tree = msgpack.unpackb(path.read_bytes(), raw=False, strict_map_key=False)
    edit(tree)
    path.write_bytes(msgpack.packb(tree, use_bin_type=True))


def flax_array(shape: tuple[int, ...]) -> msgpack.ExtType:
    data = np.zeros(shape, np.float32)
    return msgpack.ExtType(1, msgpack.packb((shape, "float32", data.tobytes()), use_bin_type=True))


def test_missing_key_names_it_and_its_shape(tmp_path):
    folder = copy_fixture(tmp_path)
    rewrite_params(folder, lambda t: t["LightningDiT_0"]["blocks_0"]["Attention_0"].pop("q_norm"))
    with pytest.raises(ArtifactError, match=r"missing key 'LightningDiT_0/blocks_0/Attention_0/q_norm/weight' "
                                            r"\(expected shape \[16\]"):  # fmt: skip
        import_generator(folder, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_wrong_shape_names_the_key_and_expected_shape(tmp_path):
    folder = copy_fixture(tmp_path)
    dense = ("TimestepEmbedder_0", "TorchLinear_0", "Dense_0")
    rewrite_params(folder, lambda t: t[dense[0]][dense[1]][dense[2]].update(kernel=flax_array((3,))))
    with pytest.raises(ArtifactError, match=r"key 'TimestepEmbedder_0/TorchLinear_0/Dense_0/kernel' has shape \[3\], "
                                            r"expected \[256, 32\]"):  # fmt: skip
        import_generator(folder, tmp_path / "out")


def test_unknown_key_is_an_error(tmp_path):
    folder = copy_fixture(tmp_path)
    rewrite_params(folder, lambda t: t.update(extra_head={"kernel": flax_array((2, 2))}))
    with pytest.raises(ArtifactError, match=r"unknown key 'extra_head/kernel'"):
        import_generator(folder, tmp_path / "out")


def test_params_under_a_top_level_params_key_are_read(tmp_path):
    folder = copy_fixture(tmp_path)
    rewrite_params(folder, lambda t: t.update(params={k: t.pop(k) for k in list(t)}))
    gen, _ = load_official_generator(folder)
    ref = their_outputs("plain")
    np.testing.assert_allclose(our_samples(gen, ref, "alpha_1.0"), ref["alpha_1.0"], atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda m: m.pop("model_config"), "not a generator artifact"),
        (lambda m: m["model_config"].pop("depth"), r"missing fields \['depth'\]"),
        (lambda m: m["model_config"].update(use_rope=False), r"\['use_rope'\] are false"),
        (lambda m: m["model_config"].update(out_channels=3), "out_channels 3 differs"),
        (lambda m: m["model_config"].update(depth=2), "missing key 'LightningDiT_0/blocks_1/"),
    ],
)
def test_bad_metadata_is_an_error(tmp_path, edit, match):
    folder = copy_fixture(tmp_path)
    meta = json.loads((folder / "metadata.json").read_text())
    edit(meta)
    (folder / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match=match):
        import_generator(folder, tmp_path / "out")


def test_corrupted_or_missing_metadata_through_the_command(tmp_path, capsys):
    folder = copy_fixture(tmp_path)
    (folder / "metadata.json").write_text("{not json")
    assert import_official.main([str(folder), "--out", str(tmp_path / "out")]) == 1
    assert "metadata.json is not valid JSON" in capsys.readouterr().err
    (folder / "metadata.json").unlink()
    assert import_official.main([str(folder), "--out", str(tmp_path / "out")]) == 1
    assert "metadata.json does not exist" in capsys.readouterr().err


def test_hf_ids_are_checked_before_any_download_and_offline_names_the_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert import_official.main(["hf://latent_L_sot", "--out", str(tmp_path / "out")]) == 1
    assert "error: hf://latent_L_sot: unknown artifact id 'latent_L_sot'; did you mean 'latent_L_sota'" in (
        capsys.readouterr().err)
    assert import_official.main(["hf://mae_latent_640", "--out", str(tmp_path / "out")]) == 1
    assert "download models/mae/jax/mae_latent_640/ from https://huggingface.co/Goodeat/drifting" in (
        capsys.readouterr().err)
    # another repository may hold other ids: not checked against the authors' list
    assert import_official.main(["hf://mine", "--repo", "me/mine", "--out", str(tmp_path / "out")]) == 1
    assert "hf://mine: HF_HUB_OFFLINE is set" in capsys.readouterr().err


def test_import_then_sample_and_init_from(tmp_path, capsys):
    out = tmp_path / "pixel"
    assert import_official.main([str(FIXTURES / "gen_pixel"), "--out", str(out)]) == 0
    npz = tmp_path / "samples.npz"
    args = ["--ckpt", str(out), "--num", "6", "--batch-size", "4", "--alpha", "1.5", "--out", str(npz), "--no-progress"]
    assert sample.main(args) == 0
    with np.load(npz) as d:
        assert d["arr_0"].shape == (6, 16, 16, 3) and d["arr_0"].dtype == np.uint8 and d["arr_0"].std() > 0
        assert d["arr_1"].tolist() == [0, 1, 2, 3, 4, 5]

    from drifting_lightning.module import DriftingModule

    kwargs = dit_kwargs(json.loads((FIXTURES / "gen_pixel" / "metadata.json").read_text())["model_config"])
    module = DriftingModule(DiT(**kwargs), init_from=str(out))
    imported = load_generator(out).state_dict()
    for net in (module.generator, module.ema_generator):
        for key, value in net.state_dict().items():
            assert torch.equal(value, imported[key]), key
    with pytest.raises(ValueError, match=r"init_from .*pixel: its weights do not fit this generator"):
        DriftingModule(DiT(**{**kwargs, "depth": 1}), init_from=str(out))


def test_latent_export_samples_through_a_vae(tmp_path, make_tiny_vae):
    vae = make_tiny_vae(tmp_path / "vae")
    out = import_generator(FIXTURES / "gen_latent", tmp_path / "latent")
    npz = tmp_path / "samples.npz"
    args = ["--ckpt", str(out), "--num", "3", "--out", str(npz), "--no-progress"]
    assert sample.main(args) == 1  # 4-channel latents are no images without --vae
    assert sample.main([*args, "--vae", str(vae)]) == 0
    with np.load(npz) as d:
        assert d["arr_0"].shape == (3, 16, 16, 3)  # the tiny VAE up-samples 2x
