"""Fixtures of the authors' generator (``models/generator.py`` ``DitGen``), written by ``official_fixtures.py``.

For each tiny config below: their module at random init, every parameter then moved by N(0, 0.05^2) so that the
zero-initialised adaLN and output layers do something (at init every output is exactly 0 and a comparison would
prove nothing), saved as their artifact (``gen_<name>/metadata.json`` + ``ema_params.msgpack``), and
``gen_<name>.npz``: fixed BHWC noise, labels, style labels and their samples for alpha 1.0, 2.5 and a per-sample
alpha vector, plus the untouched initial ``pos_embed`` (their 2-D sin-cos init). ``gen_reader.msgpack`` +
``gen_reader.npz`` exercise the msgpack reader: float32, bfloat16, a chunked array and a scalar, written by flax.
``gen_release_shapes.json``: for each of their configs/gen/*.yaml, the model_config their train.py records and the
name and shape of every parameter (``jax.eval_shape``, nothing initialised), the layout of their released artifacts.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

BATCH = 4
ALPHAS = {"alpha_1.0": 1.0, "alpha_2.5": 2.5, "alpha_vec": [1.0, 1.5, 2.5, 4.0]}
PERTURB_STD = 0.05
# DitGen fields (what their train.py records as model_config); flags as in every released config.
RELEASED_FLAGS = dict(use_qknorm=True, use_swiglu=True, use_rope=True, use_rmsnorm=True, use_bf16=False,
                      attn_fp32=True, use_remat=False)  # fmt: skip
CONFIGS = {
    # Latent-like: 4 channels, patch 2, 32 style tokens x 64 entries, 16 in-context tokens.
    "latent": dict(cond_dim=64, num_classes=10, noise_classes=64, noise_coords=32, input_size=8, in_channels=4,
                   n_cls_tokens=16, patch_size=2, hidden_size=64, depth=2, num_heads=4, mlp_ratio=4.0,
                   out_channels=4),  # fmt: skip
    # Pixel-like: 3 channels, patch 4, a narrower condition vector and an MLP ratio whose width is rounded up.
    "pixel": dict(cond_dim=32, num_classes=7, noise_classes=8, noise_coords=4, input_size=16, in_channels=3,
                  n_cls_tokens=4, patch_size=4, hidden_size=48, depth=2, num_heads=3, mlp_ratio=3.0,
                  out_channels=3),  # fmt: skip
    # No style tables and no in-context tokens.
    "plain": dict(cond_dim=32, num_classes=5, noise_classes=0, noise_coords=1, input_size=8, in_channels=1,
                  n_cls_tokens=0, patch_size=2, hidden_size=32, depth=1, num_heads=2, mlp_ratio=4.0,
                  out_channels=1),  # fmt: skip
}


def _forward(module, x, labels, alpha, noise_labels):
    """Their DitGen.__call__ without its own noise draw: condition, then the transformer on the given BHWC noise."""
    return module.generate_image(x, module.c_cfg_noise_to_cond(labels, alpha, noise_labels))


def _perturb(params, key):
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(key, len(leaves))
    moved = [p + PERTURB_STD * jax.random.normal(k, p.shape, p.dtype) for p, k in zip(leaves, keys, strict=True)]
    return jax.tree_util.tree_unflatten(tree, moved)


def write_model(out: Path, name: str, fields: dict, seed: int) -> None:
    from models.generator import DitGen
    from official_fixtures import write_artifact

    model_config = {**fields, **RELEASED_FLAGS}
    module = DitGen(**model_config)
    rng = np.random.default_rng(seed)
    size, chans = fields["input_size"], fields["in_channels"]
    noise = rng.standard_normal((BATCH, size, size, chans)).astype(np.float32)
    labels = rng.integers(0, fields["num_classes"], BATCH).astype(np.int32)
    coords, classes = max(1, fields["noise_coords"]), max(1, fields["noise_classes"])
    style = rng.integers(0, classes, (BATCH, coords)).astype(np.int32)
    key_init, key_move = jax.random.split(jax.random.PRNGKey(seed))
    params = module.init({"params": key_init}, noise, labels, jnp.ones((BATCH,)), style, method=_forward)["params"]
    init_pos_embed = np.asarray(params["LightningDiT_0"]["pos_embed"])
    params = _perturb(params, key_move)
    write_artifact(out / f"gen_{name}", params, "gen", model_config)
    arrays = {"noise_bhwc": noise, "labels": labels, "style_labels": style, "init_pos_embed": init_pos_embed}
    for key, alpha in ALPHAS.items():
        alpha_arg = jnp.asarray(alpha, jnp.float32)
        arrays[key] = np.asarray(module.apply({"params": params}, noise, labels, alpha_arg, style, method=_forward))
        arrays[f"{key}_value"] = np.asarray(alpha, np.float32)
    np.savez_compressed(out / f"gen_{name}.npz", **arrays)


def write_reader_fixture(out: Path) -> None:
    """A flax msgpack file with every leaf kind our reader handles, and its expected values."""
    from flax import serialization

    rng = np.random.default_rng(0)
    tree = {
        "f32": rng.standard_normal((3, 5)).astype(np.float32),
        "nested": {"bf16": jnp.asarray(rng.standard_normal((4, 6)), jnp.bfloat16), "scalar": np.float32(2.5)},
        "big": rng.standard_normal((7, 9)).astype(np.float32),  # chunked below
        "skipme": {"a": np.arange(10, dtype=np.float32), "b": {"c": np.ones((2, 2), np.float32)}},
    }
    expected = {"f32": tree["f32"], "nested/bf16": np.asarray(tree["nested"]["bf16"], np.float32),
                "nested/scalar": np.float32(2.5), "big": tree["big"], "skipme/a": tree["skipme"]["a"],
                "skipme/b/c": tree["skipme"]["b"]["c"]}  # fmt: skip
    saved = serialization.MAX_CHUNK_SIZE
    serialization.MAX_CHUNK_SIZE = 100  # bytes: "big" (252 bytes) becomes three chunks, the others stay whole
    try:
        (out / "gen_reader.msgpack").write_bytes(serialization.msgpack_serialize(tree))
    finally:
        serialization.MAX_CHUNK_SIZE = saved
    np.savez(out / "gen_reader.npz", **{k.replace("/", "."): v for k, v in expected.items()})


def write_release_shapes(out: Path) -> None:
    """Parameter names and shapes of their five released configurations."""
    import yaml
    from models import generator
    from models.generator import DitGen

    configs = Path(generator.__file__).resolve().parents[1] / "configs" / "gen"
    release = {}
    for path in sorted(configs.glob("*.yaml")):
        cfg = yaml.safe_load(path.read_text())
        module = DitGen(num_classes=cfg["dataset"]["num_classes"], **cfg["model"])
        # What their train.py (_generator_model_config) writes into metadata.json.
        model_config = {k: v for k, v in vars(module).items() if k not in {"parent", "name"} and not k.startswith("_")}
        size, chans, coords = module.input_size, module.in_channels, max(1, module.noise_coords)
        args = (jnp.zeros((1, size, size, chans)), jnp.zeros((1,), jnp.int32), jnp.ones((1,)),
                jnp.zeros((1, coords), jnp.int32))  # fmt: skip
        shapes = jax.eval_shape(lambda m=module, a=args: m.init({"params": jax.random.PRNGKey(0)}, *a,
                                                                method=_forward))["params"]  # fmt: skip
        flat = jax.tree_util.tree_flatten_with_path(shapes)[0]
        release[path.stem] = {"model_config": model_config,
                              "shapes": {"/".join(k.key for k in keys): list(x.shape) for keys, x in flat}}  # fmt: skip
    (out / "gen_release_shapes.json").write_text(json.dumps(release, indent=1, sort_keys=True) + "\n")


def write(out: Path) -> None:
    """Every generator fixture into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    for seed, (name, fields) in enumerate(CONFIGS.items()):
        write_model(out, name, fields, seed)
    write_reader_fixture(out)
    write_release_shapes(out)
