"""The authors' generator artifacts (``kind: gen``) as export folders of our ``DiT``.

Their ``metadata.json`` holds ``model_config``, the fields of their flax ``DitGen``; ``ema_params.msgpack`` its EMA
parameters. ``dit_kwargs`` maps the fields to our arguments, ``parameter_rules`` every flax key to our parameter
(flax ``Dense`` kernels are [in, out], torch weights [out, in]; their 32 style tables ``noise_embeds_t`` are the row
blocks of our one ``style_embed``); anything unknown, missing or of the wrong shape is an error naming the key.

Inputs, theirs -> ours, for the same image: noise x [B, H, W, C] -> ``noise = x.permute(0, 3, 1, 2)``; class labels
``c`` -> ``labels``; ``noise_labels`` [B, 32] in [0, 64) -> ``style``; ``cfg_scale`` -> ``alpha``; their samples
[B, H, W, C] are ours permuted back. Latent models make SD-VAE latents scaled by 0.18215 (they decode with
sd-vae-ft-mse).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from drifting_lightning.models.dit import DIT_PRESETS, DiT
from drifting_lightning.official.artifact import METADATA_FILE, PARAMS_FILE, ArtifactError, read_metadata, read_params

# model_config fields -> our DiT arguments (noise_classes, noise_coords handled by dit_kwargs).
_FIELDS = {"input_size": "input_size", "in_channels": "in_channels", "patch_size": "patch_size",
           "hidden_size": "hidden_size", "depth": "depth", "num_heads": "num_heads", "mlp_ratio": "mlp_ratio",
           "num_classes": "num_classes", "cond_dim": "cond_dim", "n_cls_tokens": "num_context_tokens"}  # fmt: skip
_REQUIRED_FLAGS = ("use_qknorm", "use_swiglu", "use_rope", "use_rmsnorm")  # the released architecture: all true
_PRECISION_FIELDS = ("use_bf16", "attn_fp32", "use_remat")  # how they computed, not what they computed


@dataclass(frozen=True)
class Rule:
    """Where one flax array goes: our parameter ``target`` (rows ``rows`` of it when set), the flax shape expected,
    and the conversion from the flax layout."""

    target: str
    shape: tuple[int, ...]
    convert: Callable[[Tensor], Tensor]
    rows: slice | None = None


def _same(t: Tensor) -> Tensor:
    return t


def _transpose(t: Tensor) -> Tensor:
    return t.T.contiguous()


def _unbatch(t: Tensor) -> Tensor:
    return t[0]


def dit_kwargs(model_config: dict[str, Any], where: str = "model_config") -> dict[str, Any]:
    """Our ``DiT`` arguments for their ``DitGen`` fields; the matching preset's name when one matches."""
    expected = set(_FIELDS) | {"noise_classes", "noise_coords", "out_channels"}
    known = expected | set(_REQUIRED_FLAGS) | set(_PRECISION_FIELDS)
    missing = sorted(k for k in expected | set(_REQUIRED_FLAGS) if k not in model_config)
    unknown = sorted(set(model_config) - known)
    if missing or unknown:
        raise ArtifactError(f"{where}: missing fields {missing}, unknown fields {unknown}; is this a DitGen artifact?")
    off = [k for k in _REQUIRED_FLAGS if model_config[k] is not True]
    if off:
        raise ArtifactError(f"{where}: {off} are false; only the released architecture (all of "
                            f"{list(_REQUIRED_FLAGS)} true) maps to our DiT")  # fmt: skip
    if model_config["out_channels"] != model_config["in_channels"]:
        raise ArtifactError(f"{where}: out_channels {model_config['out_channels']} differs from in_channels "
                            f"{model_config['in_channels']}; our DiT makes samples shaped like its noise")  # fmt: skip
    kwargs: dict[str, Any] = {ours: model_config[theirs] for theirs, ours in _FIELDS.items()}
    styled = model_config["noise_classes"] > 0  # their noise tables exist only then
    kwargs["num_style_tokens"] = model_config["noise_coords"] if styled else 0
    if styled:
        kwargs["style_codebook_size"] = model_config["noise_classes"]
    arch = {k: kwargs[k] for k in DIT_PRESETS["B/2"]}
    preset = next((name for name, values in DIT_PRESETS.items() if values == arch), None)
    return {"preset": preset, **kwargs} if preset else {"preset": "B/2", **kwargs}


def _linear(rules: dict[str, Rule], theirs: str, ours: str, weight: Tensor) -> None:
    rules[f"{theirs}/Dense_0/kernel"] = Rule(f"{ours}.weight", tuple(weight.shape[::-1]), _transpose)
    rules[f"{theirs}/Dense_0/bias"] = Rule(f"{ours}.bias", (weight.shape[0],), _same)


def parameter_rules(model: DiT) -> dict[str, Rule]:
    """Every flax key of their ``DitGen`` with ``model``'s architecture -> where it goes in ``model``."""
    own = model.state_dict()
    rules: dict[str, Rule] = {}
    linears = {"TimestepEmbedder_0/TorchLinear_0": "alpha_embed.0", "TimestepEmbedder_0/TorchLinear_1": "alpha_embed.2",
               "LightningDiT_0/TorchLinear_0": "patch_embed",
               "LightningDiT_0/FinalLayer_0/TorchLinear_0": "final.ada.1",
               "LightningDiT_0/FinalLayer_0/TorchLinear_1": "final.linear"}  # fmt: skip
    norms = {"RMSNorm_0/weight": "alpha_norm.weight",
             "LightningDiT_0/FinalLayer_0/RMSNorm_0/weight": "final.norm.weight"}  # fmt: skip
    block_linears = {"Attention_0/TorchLinear_0": "attn.qkv", "Attention_0/TorchLinear_1": "attn.proj",
                     "SwiGLUFFN_0/TorchLinear_0": "mlp.w1", "SwiGLUFFN_0/TorchLinear_1": "mlp.w3",
                     "SwiGLUFFN_0/TorchLinear_2": "mlp.w2", "TorchLinear_0": "ada.1"}  # fmt: skip
    block_norms = {"RMSNorm_0/weight": "norm1.weight", "RMSNorm_1/weight": "norm2.weight",
                   "Attention_0/q_norm/weight": "attn.q_norm.weight", "Attention_0/k_norm/weight": "attn.k_norm.weight"}
    for i in range(len(model.blocks)):
        for theirs, ours in block_linears.items():
            linears[f"LightningDiT_0/blocks_{i}/{theirs}"] = f"blocks.{i}.{ours}"
        for theirs, ours in block_norms.items():
            norms[f"LightningDiT_0/blocks_{i}/{theirs}"] = f"blocks.{i}.{ours}"
    if model.context_proj is not None:
        linears["LightningDiT_0/TorchLinear_1"] = "context_proj"
        rules["LightningDiT_0/cls_embed"] = Rule("context_tokens", (1, *own["context_tokens"].shape), _unbatch)
    for theirs, ours in linears.items():
        _linear(rules, theirs, ours, own[f"{ours}.weight"])
    for theirs, ours in norms.items():
        rules[theirs] = Rule(ours, tuple(own[ours].shape), _same)
    rules["LightningDiT_0/pos_embed"] = Rule("pos_embed", (1, *own["pos_embed"].shape), _unbatch)
    if model.class_embed is not None:
        rules["Embed_0/embedding"] = Rule("class_embed.weight", tuple(own["class_embed.weight"].shape), _same)
    size, width = model.style_codebook_size, own["alpha_norm.weight"].shape[0]
    for t in range(model.num_style_tokens):
        rows = slice(t * size, (t + 1) * size)
        rules[f"noise_embeds_{t}/embedding"] = Rule("style_embed.weight", (size, width), _same, rows)
    return rules


def load_official_generator(folder: str | Path) -> tuple[DiT, dict[str, Any]]:
    """(our DiT with the artifact's EMA weights, its metadata) from one of their generator artifact folders."""
    folder = Path(folder)
    metadata = read_metadata(folder)
    where = f"{folder / METADATA_FILE}"
    if metadata.get("kind") != "gen" or not isinstance(metadata.get("model_config"), dict):
        raise ArtifactError(f"{where}: not a generator artifact (needs kind 'gen' and a model_config object)")
    model = DiT(**dit_kwargs(metadata["model_config"], f"{where} model_config"))
    params = read_params(folder / PARAMS_FILE)
    if params and all(k.startswith("params/") for k in params):  # a tree saved with flax's top-level "params"
        params = {k.removeprefix("params/"): v for k, v in params.items()}
    rules = parameter_rules(model)
    source = folder / PARAMS_FILE
    unknown = sorted(set(params) - set(rules))
    if unknown:
        raise ArtifactError(f"{source}: unknown key {unknown[0]!r} ({len(unknown)} unknown), not a parameter of "
                            f"DitGen with {where} model_config")  # fmt: skip
    missing = sorted(set(rules) - set(params))
    if missing:
        raise ArtifactError(f"{source}: missing key {missing[0]!r} (expected shape {list(rules[missing[0]].shape)}; "
                            f"{len(missing)} missing)")  # fmt: skip
    bad = [f"key {k!r} has shape {list(params[k].shape)}, expected {list(r.shape)}" for k, r in rules.items()
           if tuple(params[k].shape) != r.shape]  # fmt: skip
    if bad:
        raise ArtifactError(f"{source}: {bad[0]}" + (f" ({len(bad)} shape mismatches)" if len(bad) > 1 else ""))
    state = model.state_dict()  # shares storage with the parameters: copies below fill the model in place
    filled = dict.fromkeys(state, 0)
    with torch.no_grad():
        for key, rule in rules.items():
            target = state[rule.target] if rule.rows is None else state[rule.target][rule.rows]
            target.copy_(rule.convert(params.pop(key).float()))  # pop: each array is freed once copied
            filled[rule.target] += target.numel()
    unfilled = [k for k, v in state.items() if filled[k] != v.numel()]
    if unfilled:  # a rule table that misses part of a parameter is our bug, not the user's
        raise RuntimeError(f"the import rules leave {unfilled} of our DiT unset")
    return model, metadata


def import_generator(folder: str | Path, out: str | Path) -> Path:
    """Convert their generator artifact ``folder`` to our export folder ``out`` (generator.safetensors +
    config.json): ``drifting sample --ckpt out``, ``load_generator(out)`` and ``init_from: out`` read it."""
    from drifting_lightning.export import export_generator

    model, _ = load_official_generator(folder)
    return export_generator(model.eval(), out)
