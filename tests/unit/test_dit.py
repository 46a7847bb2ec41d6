"""DiT generator: shapes, zero init, conditioning, presets and parameter counts, gradients, errors, random inputs.
Its agreement with the authors' JAX module is tested in test_official_generator.py."""

import pytest
import torch

from drifting_lightning.models.dit import DIT_PRESETS, DiT, apply_rope, rope_1d, swiglu_hidden_size

SMALL = ["digits", "fashion", "cifar", "tiny"]
FAST = {"preset": "tiny", "input_size": 8}  # 16 patch tokens: quick on CPU


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def perturb_zero_init(model: DiT, seed: int = 0) -> None:
    """Give every all-zero parameter (adaLN-zero and output layers, biases) small random values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


def labels_for(model: DiT, n: int) -> torch.Tensor:
    return torch.arange(n) % model.num_classes


@pytest.mark.parametrize("preset", SMALL)
def test_small_presets_shape_dtype_and_zero_init(preset):
    torch.manual_seed(0)
    model = DiT(preset)
    inputs = model.draw_inputs(3)
    out = model(**inputs, labels=labels_for(model, 3), alpha=torch.tensor([1.0, 2.0, 3.5]))
    assert out.shape == (3, *model.sample_shape) and model.sample_shape == model.noise_shape
    assert model.sample_shape == (DIT_PRESETS[preset]["in_channels"],) + (DIT_PRESETS[preset]["input_size"],) * 2
    assert out.dtype == torch.float32
    assert torch.equal(out, torch.zeros_like(out))  # zero-initialised output layer


def test_conditioning_changes_output_and_is_deterministic():
    torch.manual_seed(0)
    model = DiT(**FAST).eval()
    perturb_zero_init(model)
    inputs = model.draw_inputs(4, generator=torch.Generator().manual_seed(1))
    labels, alpha = torch.tensor([0, 1, 2, 3]), torch.full((4,), 1.5)
    base = model(**inputs, labels=labels, alpha=alpha)
    assert torch.equal(base, model(**inputs, labels=labels.clone(), alpha=alpha.clone()))
    assert not torch.equal(base, torch.zeros_like(base))
    changed = {
        "labels": model(**inputs, labels=labels + 1, alpha=alpha),
        "alpha": model(**inputs, labels=labels, alpha=alpha + 0.5),
        "style": model(inputs["noise"], labels, alpha, style=(inputs["style"] + 1) % 64),
        "noise": model(inputs["noise"] + 0.1, labels, alpha, style=inputs["style"]),
    }
    for name, out in changed.items():
        assert (out - base).abs().amax(dim=(1, 2, 3)).min() > 1e-6, f"changing {name} left some sample unchanged"
    # Each style token has its own codebook, so swapping two tokens' indices changes the output.
    style = inputs["style"].clone()
    style[:, :2] = torch.tensor([0, 1])
    swapped = style.clone()
    swapped[:, :2] = torch.tensor([1, 0])
    assert not torch.allclose(
        model(inputs["noise"], labels, alpha, style), model(inputs["noise"], labels, alpha, swapped)
    )
    # Defaults: alpha None is 1.0 (also as a Python scalar), style None is index 0 in every codebook.
    zero_style = torch.zeros_like(inputs["style"])
    ref = model(inputs["noise"], labels, torch.ones(4), style=zero_style)
    assert torch.equal(model(inputs["noise"], labels), ref)
    assert torch.equal(model(inputs["noise"], labels, alpha=1.0, style=zero_style), ref)


# Counted from the authors' flax DitGen with their configs/gen/*.yaml and num_classes 1000 (jax.eval_shape).
OFFICIAL_COUNTS = {"B/2": 132_708_880, "L/2": 462_909_456, "B/16": 133_864_704, "L/16": 464_450_304}


@pytest.mark.parametrize("preset", list(OFFICIAL_COUNTS))
def test_parameter_counts_equal_the_authors(preset):
    with torch.device("meta"):
        model = DiT(preset)
    assert n_params(model) == OFFICIAL_COUNTS[preset]
    patch_tokens = 256
    assert model.sample_shape == ((4, 32, 32) if preset.endswith("/2") else (3, 256, 256))
    assert model.pos_embed.shape[0] == patch_tokens and model.context_tokens.shape[0] == 16


def test_swiglu_width_is_theirs():
    assert swiglu_hidden_size(768, 4.0) == 2048 and swiglu_hidden_size(1024, 4.0) == 2752  # 2730 rounded up to 32
    assert DiT("tiny").blocks[0].mlp.w1.out_features == 192  # int(2/3 * 256) = 170 -> 192


def test_explicit_arguments_override_preset():
    model = DiT("tiny", hidden_size=32, depth=1, num_classes=0, num_style_tokens=4)
    assert model.config["hidden_size"] == 32 and model.config["depth"] == 1 and model.config["num_heads"] == 2
    assert len(model.blocks) == 1 and model.num_classes == 0 and model.class_embed is None
    assert model.draw_inputs(2)["style"].shape == (2, 4)


def test_unconditional_mode():
    torch.manual_seed(0)
    model = DiT("digits", num_classes=0)
    perturb_zero_init(model)
    inputs = model.draw_inputs(5)
    out = model(**inputs)
    assert out.shape == (5, 1, 8, 8) and torch.isfinite(out).all()
    assert torch.equal(out, model(**inputs, labels=torch.arange(5)))  # labels are ignored


def test_no_style_no_context_tokens():
    model = DiT("tiny", num_style_tokens=0, num_context_tokens=0)
    inputs = model.draw_inputs(2)
    assert set(inputs) == {"noise"}
    assert model(**inputs, labels=torch.tensor([0, 1])).shape == (2, 4, 32, 32)


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    model = DiT(**FAST).train()
    perturb_zero_init(model)
    inputs = model.draw_inputs(4)
    model(**inputs, labels=torch.arange(4), alpha=torch.rand(4) + 1).square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient for {name}"


def test_gradient_checkpointing_matches():
    torch.manual_seed(0)
    plain = DiT(**FAST).train()
    perturb_zero_init(plain)
    ckpt = DiT(**FAST, gradient_checkpointing=True).train()
    ckpt.load_state_dict(plain.state_dict())
    inputs = plain.draw_inputs(2)
    outs = []
    for model in (plain, ckpt):
        out = model(**inputs, labels=torch.tensor([3, 4]))
        out.square().sum().backward()
        outs.append(out)
    torch.testing.assert_close(outs[0], outs[1])
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=f"gradient of {name} differs")


def test_patch_layout_is_spatially_consistent():
    """Without blocks each token is processed alone: changing one input patch changes only that output patch
    (this also checks that the context tokens, not patch tokens, are dropped at the output)."""
    torch.manual_seed(0)
    model = DiT("tiny", depth=0)
    perturb_zero_init(model)
    noise = torch.randn(1, 4, 32, 32)
    bumped = noise.clone()
    bumped[..., 6:8, 10:12] += 1.0  # patch (row 3, column 5)
    diff = (model(bumped, torch.tensor([0])) - model(noise, torch.tensor([0]))).abs().sum(dim=(0, 1))
    assert diff[6:8, 10:12].min() > 0
    diff[6:8, 10:12] = 0
    assert diff.max() == 0


def test_rope_depends_on_relative_position_only():
    hd, length = 16, 12
    cos, sin = rope_1d(length, hd, torch.device("cpu"))
    q, k = torch.randn(2, hd, generator=torch.Generator().manual_seed(0))

    def score(i, j):  # token i attends token j
        t = torch.stack([q, k])[None, None]  # [1, 1, 2, hd]
        idx = torch.tensor([i, j])
        rq, rk = apply_rope(t, cos[idx], sin[idx])[0, 0]
        return (rq * rk).sum()

    torch.testing.assert_close(score(1, 4), score(7, 10))
    torch.testing.assert_close(score(0, 0), (q * k).sum())  # position 0: no rotation
    assert not torch.allclose(score(0, 1), score(0, 0)) and not torch.allclose(score(0, 1), score(0, 2))
    # Rotate-half pairs feature i with feature i + hd/2 (not the neighbouring feature).
    x = torch.zeros(1, 1, 1, hd)
    x[..., 0] = 1.0
    rotated = apply_rope(x, cos[3:4], sin[3:4])[0, 0, 0]
    assert rotated[[0, hd // 2]].abs().gt(0).all() and rotated[1 : hd // 2].abs().max() == 0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"preset": "XL/3"}, "valid presets: B/2, L/2"),
        ({"preset": "tiny", "input_size": 30, "patch_size": 4}, "input_size=30.*patch_size=4"),
        ({"preset": "tiny", "num_heads": 3}, "num_heads=3"),
        ({"preset": "tiny", "hidden_size": 60, "num_heads": 4}, "even integer head size"),
        ({"preset": "tiny", "num_context_tokens": -1}, "num_context_tokens"),
        ({"preset": "tiny", "init_output_std": -0.1}, "init_output_std"),
        ({"preset": "tiny", "hidden_size": 0}, "hidden_size must be > 0, got 0"),
        ({"preset": "tiny", "depth": -1}, "depth must be >= 0, got -1"),
        ({"preset": "tiny", "mlp_ratio": -1.0}, "mlp_ratio must be > 0"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DiT(**kwargs)


def test_bad_inputs():
    model = DiT("tiny")
    noise = torch.randn(2, 4, 32, 32)
    with pytest.raises(ValueError, match="needs labels"):
        model(noise)
    with pytest.raises(ValueError, match="noise must have shape"):
        model(torch.randn(2, 3, 32, 32), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="style must have shape"):
        model(noise, torch.tensor([0, 1]), style=torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="alpha"):
        model(noise, torch.tensor([0, 1]), alpha=torch.ones(3))


def test_draw_inputs_shapes_and_determinism():
    model = DiT("fashion")
    a = model.draw_inputs(6, generator=torch.Generator().manual_seed(7))
    b = model.draw_inputs(6, generator=torch.Generator().manual_seed(7))
    c = model.draw_inputs(6, generator=torch.Generator().manual_seed(8))
    assert a["noise"].shape == (6, 1, 28, 28) and a["noise"].dtype == torch.float32
    assert a["style"].shape == (6, 32) and a["style"].dtype == torch.long
    assert a["style"].min() >= 0 and a["style"].max() < 64
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["noise"], c["noise"]) and not torch.equal(a["style"], c["style"])


def test_bf16_autocast():
    torch.manual_seed(0)
    model = DiT(**FAST)
    perturb_zero_init(model)
    inputs = model.draw_inputs(2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**inputs, labels=torch.tensor([0, 1]), alpha=torch.tensor([1.0, 2.0]))
    ref = model(**inputs, labels=torch.tensor([0, 1]), alpha=torch.tensor([1.0, 2.0]))
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref, atol=0.05 * ref.abs().max().item(), rtol=0.05)


def test_jsonargparse_builds_from_config():
    jsonargparse = pytest.importorskip("jsonargparse")
    parser = jsonargparse.ArgumentParser()
    parser.add_class_arguments(DiT, "model")
    cfg = parser.parse_args(["--model.preset", "tiny", "--model.depth", "1", "--model.num_classes", "0"])
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes  # renamed in 4.49
    model = instantiate(cfg).model
    assert isinstance(model, DiT) and len(model.blocks) == 1 and model.num_classes == 0


@pytest.mark.parametrize("std", [0.25, 0.5, 1.0])
def test_init_output_std_spreads_initial_samples_by_noise(std):
    torch.manual_seed(0)
    model = DiT("digits", init_output_std=std)
    inputs = model.draw_inputs(512, generator=torch.Generator().manual_seed(1))
    labels = torch.zeros(512, dtype=torch.long)  # one class and one alpha: any spread comes from the noise
    with torch.no_grad():
        out = model(**inputs, labels=labels, alpha=1.0)
    assert out.std().item() == pytest.approx(std, rel=0.2)
    # Per pixel across samples, not only a fixed pattern: at init the sin-cos position embedding outweighs the
    # embedding of 2x2 patches of one channel, so about a third of the spread comes from the noise.
    assert out.std(0).mean().item() > 0.25 * std
    zero = DiT("digits")
    with torch.no_grad():
        assert zero(**inputs, labels=labels, alpha=1.0).abs().max().item() == 0.0
