"""Fixtures of the authors' feature encoders (run through tools/official_fixtures.py --only encoder, in the JAX venv).

Writes into ``out``:
- ``mae_latent/``, ``mae_pixel/``: tiny ``MAEResNetJAX`` artifacts, as ``metadata.json`` + ``params_spec.json``
  instead of the megabytes of ``ema_params.msgpack``: every parameter's shape and their initialiser's mean and
  standard deviation, from which ``synthetic_params.values`` rebuilds bfloat16-exact weights (their code runs on
  those, and the tests write them into their msgpack format). ``mae_pixel`` keeps only the encoder (the latent MAE
  tests the decoder and the loss);
- ``mae_latent.npz``, ``mae_pixel.npz``: a fixed input ``x`` (NHWC), every feature set of their
  ``build_activation_function`` (``global`` + ``get_activations``) as ``feat/<name>``, and their ``__call__`` on a
  fixed batch (``mae_latent`` only): ``labels``, the ``mask`` their masking rng drew (NHWC, 1 = masked),
  ``lambda_cls`` and the per-sample ``loss``, ``recon_loss``, ``cls_loss``;
- ``convnext/``: a tiny random ConvNeXt-V2 as a transformers folder (``config.json`` + ``model.safetensors``,
  ``ConvNextV2ForImageClassification`` names), and ``convnext.npz``: input ``x`` (NHWC, [-1, 1]) and the features of
  their ``ConvNextV2.get_activations`` after their pixel pre-processing, with those weights converted by their
  ``convert_weights_to_jax``.
"""

from __future__ import annotations

import json
import struct
import sys
import types
from pathlib import Path

import numpy as np

MAE_VARIANTS = {
    # width 32 is the smallest their decoder allows (its concat GroupNorm has 32 groups, 3 * width channels).
    "mae_latent": {"in_channels": 4, "base_channels": 32, "layers": [1, 4, 2, 1], "input_patch_size": 1, "size": 16,
                   "whole": True},
    "mae_pixel": {"in_channels": 3, "base_channels": 32, "layers": [2, 2, 1, 1], "input_patch_size": 8, "size": 128,
                  "whole": False},
}
CONVNEXT = {"depths": [1, 1, 2, 1], "hidden_sizes": [8, 16, 32, 64], "num_labels": 10}
NUM_CLASSES = 10


def _write_mae(out: Path, name: str, spec: dict) -> None:
    import jax
    import jax.numpy as jnp
    from models.mae_model import MAEResNetJAX
    from official_fixtures import write_metadata
    from synthetic_params import spec_of, values

    config = {k: spec[k] for k in ("in_channels", "base_channels", "layers", "input_patch_size")}
    config.update(patch_size=2, dropout_prob=0.0, use_bf16=False, num_classes=NUM_CLASSES)
    model = MAEResNetJAX(**config)
    size = spec["size"]
    rng = np.random.default_rng(len(name))
    x = jnp.asarray(rng.standard_normal((2, size, size, spec["in_channels"])), jnp.float32)
    labels = jnp.asarray([3, 7], jnp.int32)
    variables = model.init({"params": jax.random.PRNGKey(1), "masking": jax.random.PRNGKey(2)}, x, labels,
                           train=False)
    # Their initialiser's shapes and statistics, stored as a spec: the tests rebuild the weights from it
    # (synthetic_params) instead of reading megabytes of random numbers.
    init_spec = spec_of(jax.device_get(variables["params"]))
    kept = init_spec if spec["whole"] else {"encoder": init_spec["encoder"]}
    write_metadata(out / name, "mae", config)
    (out / name / "params_spec.json").write_text(json.dumps(kept) + "\n", encoding="utf-8")
    params = jax.tree.map(jnp.asarray, values(kept))

    # Their activation function (build_activation_function) prepends the raw input as "global".
    feats = model.apply({"params": params}, x, method=model.get_activations, patch_mean_size=[2, 4],
                        patch_std_size=[2, 4], use_std=True, use_mean=True, every_k_block=2)
    feats = {"global": x.reshape(x.shape[0], 1, -1), **feats}

    arrays = {"x": x}
    if spec["whole"]:
        arrays.update(_their_loss(model, params, x, labels))
    arrays.update({f"feat/{k}": v for k, v in feats.items()})
    np.savez_compressed(out / f"{name}.npz", **{k: np.asarray(v) for k, v in arrays.items()},
                        names=np.array(list(feats)))


def _their_loss(model, params, x, labels) -> dict:
    """Their ``__call__`` (the MAE loss) on ``x`` with the mask their masking rng draws."""
    import jax
    from models.mae_model import make_patch_mask, patch_input

    masking = jax.random.PRNGKey(5)
    lambda_cls = 0.3
    kwargs = dict(lambda_cls=lambda_cls, mask_ratio_min=0.5, mask_ratio_max=0.5, train=False)
    loss, metrics = model.apply({"params": params}, x, labels, rngs={"masking": masking}, **kwargs)

    def drawn_mask(module, x):  # the same rng stream as __call__: first make_rng("masking") of the apply
        xp = patch_input(x, module.input_patch_size)
        ratio_rng, mask_rng = jax.random.split(module.make_rng("masking"))
        ratio = jax.random.uniform(ratio_rng, (xp.shape[0],), dtype=xp.dtype) * 0.0 + 0.5
        return make_patch_mask(xp, mask_rng, ratio, module.patch_size)

    mask = model.apply({"params": params}, x, rngs={"masking": masking}, method=drawn_mask)
    return {"labels": labels, "mask": mask, "lambda_cls": np.float32(lambda_cls), "loss": loss,
            "recon_loss": metrics["recon_loss"], "cls_loss": metrics["cls_loss"]}


def _hf_convnext_state(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Random weights of a tiny ``ConvNextV2ForImageClassification`` in transformers' names and (PyTorch) shapes."""
    depths, dims = CONVNEXT["depths"], CONVNEXT["hidden_sizes"]
    state: dict[str, np.ndarray] = {}

    def put(key: str, *shape: int, scale: float = 0.2, offset: float = 0.0) -> None:
        state[key] = (offset + scale * rng.standard_normal(shape)).astype(np.float32)

    put("convnextv2.embeddings.patch_embeddings.weight", dims[0], 3, 4, 4)
    put("convnextv2.embeddings.patch_embeddings.bias", dims[0])
    put("convnextv2.embeddings.layernorm.weight", dims[0], offset=1.0)
    put("convnextv2.embeddings.layernorm.bias", dims[0])
    for i, (depth, dim) in enumerate(zip(depths, dims)):
        stage = f"convnextv2.encoder.stages.{i}"
        if i > 0:
            put(f"{stage}.downsampling_layer.0.weight", dims[i - 1], offset=1.0)
            put(f"{stage}.downsampling_layer.0.bias", dims[i - 1])
            put(f"{stage}.downsampling_layer.1.weight", dim, dims[i - 1], 2, 2)
            put(f"{stage}.downsampling_layer.1.bias", dim)
        for j in range(depth):
            layer = f"{stage}.layers.{j}"
            put(f"{layer}.dwconv.weight", dim, 1, 7, 7)
            put(f"{layer}.dwconv.bias", dim)
            put(f"{layer}.layernorm.weight", dim, offset=1.0)
            put(f"{layer}.layernorm.bias", dim)
            put(f"{layer}.pwconv1.weight", 4 * dim, dim)
            put(f"{layer}.pwconv1.bias", 4 * dim)
            put(f"{layer}.grn.weight", 1, 1, 1, 4 * dim)
            put(f"{layer}.grn.bias", 1, 1, 1, 4 * dim)
            put(f"{layer}.pwconv2.weight", dim, 4 * dim)
            put(f"{layer}.pwconv2.bias", dim)
    put("convnextv2.layernorm.weight", dims[-1], offset=1.0)
    put("convnextv2.layernorm.bias", dims[-1])
    put("classifier.weight", CONVNEXT["num_labels"], dims[-1])
    put("classifier.bias", CONVNEXT["num_labels"])
    return state


def _write_safetensors(path: Path, state: dict[str, np.ndarray]) -> None:
    """The safetensors layout (8-byte header size, JSON header, raw little-endian data), written without torch."""
    header, offset, blobs = {}, 0, []
    for key, arr in state.items():
        data = np.ascontiguousarray(arr, dtype="<f4").tobytes()
        header[key] = {"dtype": "F32", "shape": list(arr.shape), "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        blobs.append(data)
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    path.write_bytes(struct.pack("<Q", len(head)) + head + b"".join(blobs))


class _TorchLike:
    """The two methods their ``convert_weights_to_jax`` calls on a PyTorch tensor, on a numpy array."""

    def __init__(self, array: np.ndarray) -> None:
        self.array, self.shape = array, array.shape

    def detach(self) -> _TorchLike:
        return self

    def numpy(self) -> np.ndarray:
        return self.array


def _write_convnext(out: Path) -> None:
    # Their convnext.py imports torch (only for the permutes of the weight conversion) and PIL (via their logging).
    shim = types.ModuleType("torch")
    shim.permute = lambda t, dims: _TorchLike(np.transpose(t.array, dims))
    sys.modules.setdefault("torch", shim)
    for mod in ("PIL", "PIL.Image"):
        sys.modules.setdefault(mod, types.ModuleType(mod))
    import jax
    import jax.numpy as jnp
    from models.convnext import ConvNextV2, convert_weights_to_jax
    from utils.hsdp_util import set_global_mesh

    folder = out / "convnext"
    folder.mkdir(parents=True, exist_ok=True)
    state = _hf_convnext_state(np.random.default_rng(11))
    _write_safetensors(folder / "model.safetensors", state)
    config = {"model_type": "convnextv2", "architectures": ["ConvNextV2ForImageClassification"],
              "depths": CONVNEXT["depths"], "hidden_sizes": CONVNEXT["hidden_sizes"], "num_channels": 3,
              "patch_size": 4, "num_stages": 4, "hidden_act": "gelu", "layer_norm_eps": 1e-12,
              "num_labels": CONVNEXT["num_labels"], "image_size": 224}
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")

    model = ConvNextV2(depths=CONVNEXT["depths"], dims=CONVNEXT["hidden_sizes"], num_classes=CONVNEXT["num_labels"])
    init = model.init(jax.random.PRNGKey(0), jnp.ones((1, 224, 224, 3)))
    params = convert_weights_to_jax(init, {k: _TorchLike(v) for k, v in state.items()}, hf=True)

    # Their pixel pipeline (build_activation_function): [-1, 1] -> [0, 1] -> ImageNet normalisation -> features.
    x = jnp.asarray(np.random.default_rng(12).uniform(-1, 1, (2, 32, 32, 3)), jnp.float32)
    y = ((x + 1) / 2 - jnp.array([0.485, 0.456, 0.406])) / jnp.array([0.229, 0.224, 0.225])
    set_global_mesh(1)  # their get_activations shards the batch over the global mesh
    feats = model.apply(params, y, method=model.get_activations)
    np.savez_compressed(out / "convnext.npz", x=np.asarray(x), names=np.array(list(feats)),
                        **{f"feat/{k}": np.asarray(v) for k, v in feats.items()})


def write(out: Path) -> None:
    """Write every encoder fixture into ``out`` (see the module docstring)."""
    out.mkdir(parents=True, exist_ok=True)
    for name, spec in MAE_VARIANTS.items():
        _write_mae(out, name, spec)
    _write_convnext(out)
