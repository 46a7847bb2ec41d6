"""The authors' MAE artifacts (``models/mae/jax/<id>/``: ``metadata.json`` + ``ema_params.msgpack``) in our formats.

``import_encoder`` writes an encoder checkpoint for ``encoder: ResNetMAE`` (``checkpoint: DIR/encoder.pt``) with the
decoder and classifier head skipped unread; ``load_mae_model`` builds the whole ``MAEModel`` (tests, further training).

Name rules, flax -> torch: ``stages_{i}/layers_{j}/X`` -> ``stages.{i}.{j}.X``, other ``/`` -> ``.``; a conv ``kernel``
[kh, kw, in, out] -> ``weight`` [out, in, kh, kw]; a dense ``kernel`` [in, out] -> ``weight`` [out, in]; a GroupNorm
``scale`` -> ``weight``; ``bias`` stays. Every parameter of the model must be in the file with the shape the
metadata's architecture gives, and the file may hold nothing else under the kept subtrees.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from drifting_lightning.encoders.mae_model import MAEModel
from drifting_lightning.encoders.resnet_mae import ResNetConfig, ResNetEncoder, save_encoder
from drifting_lightning.official.artifact import PARAMS_FILE, ArtifactError, read_metadata, read_params

ENCODER_FILE = "encoder.pt"


def arch_of(metadata: dict[str, Any], source: Path) -> tuple[ResNetConfig, int]:
    """(architecture, number of classes) from an MAE artifact's ``model_config``."""
    if metadata.get("kind") != "mae":
        raise ArtifactError(f"{source}/metadata.json: kind is {metadata.get('kind')!r}, not 'mae'")
    cfg = metadata.get("model_config")
    if not isinstance(cfg, dict):
        raise ArtifactError(f"{source}/metadata.json has no model_config: re-download the artifact")
    try:
        arch = ResNetConfig(in_channels=int(cfg.get("in_channels", 3)), width=int(cfg.get("base_channels", 64)),
                            stages=tuple(cfg.get("layers", (2, 2, 2, 2))),
                            patchify=int(cfg.get("input_patch_size", 1)))
    except (TypeError, ValueError) as err:
        raise ArtifactError(f"{source}/metadata.json: model_config {cfg} is not an MAE ResNet ({err})") from None
    return arch, int(cfg.get("num_classes", 1000))


def flax_name(torch_key: str) -> str:
    """Our module path -> the authors' key path: ``stages.1.0.proj_gn`` -> ``stages_1/layers_0/proj_gn``."""
    return re.sub(r"stages\.(\d+)\.(\d+)(\.|$)", r"stages_\1/layers_\2\3", torch_key).replace(".", "/")


def _flax_leaf(module: nn.Module, leaf: str) -> str:
    if leaf == "bias":
        return "bias"
    return "kernel" if isinstance(module, (nn.Conv2d, nn.Linear)) else "scale"  # scale: a GroupNorm's weight


def _flax_shape(module: nn.Module, leaf: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    if leaf == "weight" and isinstance(module, nn.Conv2d):  # [out, in, kh, kw] <- [kh, kw, in, out]
        return (shape[2], shape[3], shape[1], shape[0])
    if leaf == "weight" and isinstance(module, nn.Linear):  # [out, in] <- [in, out]
        return (shape[1], shape[0])
    return shape


def _to_torch(module: nn.Module, leaf: str, value: Tensor) -> Tensor:
    if leaf == "weight" and isinstance(module, nn.Conv2d):
        return value.permute(3, 2, 0, 1).contiguous()
    if leaf == "weight" and isinstance(module, nn.Linear):
        return value.t().contiguous()
    return value


def flax_layout(model: nn.Module, root: str) -> Iterator[tuple[str, str, tuple[int, ...]]]:
    """(our key, the authors' key path, the authors' shape) for every parameter of ``model`` under ``root``."""
    modules = dict(model.named_modules())
    for key, expected in model.state_dict(keep_vars=True).items():
        path, _, leaf = key.rpartition(".")
        module = modules[path]
        name = "/".join(p for p in (root, flax_name(path), _flax_leaf(module, leaf)) if p)
        yield key, name, _flax_shape(module, leaf, tuple(expected.shape))


def _load_tree(model: nn.Module, root: str, params: dict[str, Tensor], source: Path) -> dict[str, Tensor]:
    """Our state_dict for ``model`` from the flax leaves under ``root``; pops what it uses from ``params``, so each
    original array is freed as soon as its converted copy exists."""
    modules = dict(model.named_modules())
    state: dict[str, Tensor] = {}
    for key, name, shape in flax_layout(model, root):
        if name not in params:
            raise ArtifactError(f"{source}: parameter {name} {list(shape)} is missing (expected by the architecture "
                                "in metadata.json)")
        value = params.pop(name)
        if tuple(value.shape) != shape:
            raise ArtifactError(f"{source}: parameter {name} has shape {list(value.shape)}, expected {list(shape)} "
                                "for the architecture in metadata.json")
        path, _, leaf = key.rpartition(".")
        state[key] = _to_torch(modules[path], leaf, value)
        del value
    extra = sorted(k for k in params if k.startswith(root + "/"))
    if extra:
        raise ArtifactError(f"{source}: unknown parameter {extra[0]} {list(params[extra[0]].shape)} "
                            f"({len(extra)} unknown under {root}/): not the authors' MAE ResNet")
    return state


def _params_file(folder: Path) -> Path:
    path = folder / PARAMS_FILE
    if not path.is_file():
        raise ArtifactError(f"{path} does not exist: an artifact folder holds metadata.json and {PARAMS_FILE}")
    return path


def import_encoder(folder: str | Path, out: str | Path) -> Path:
    """Convert the MAE artifact in ``folder`` into ``out/encoder.pt`` (the encoder only); returns that path.

    Peak memory is about the encoder's float32 size: the decoder and head are skipped unread, and each array is
    converted and the original dropped before the next.
    """
    folder, out = Path(folder), Path(out)
    arch, _ = arch_of(read_metadata(folder), folder)
    with torch.device("meta"):  # shapes and module types only: no memory for a 2B-parameter template
        template = ResNetEncoder(arch)
    params = read_params(_params_file(folder), skip=lambda path: path[0] != "encoder")
    state = _load_tree(template, "encoder", params, folder)
    out.mkdir(parents=True, exist_ok=True)
    target = out / ENCODER_FILE
    save_encoder(target, state, arch)
    return target


def load_mae_model(folder: str | Path) -> MAEModel:
    """The whole MAE of an artifact (encoder, decoder, classifier head) as ``MAEModel``, float32, eval mode."""
    folder = Path(folder)
    arch, num_classes = arch_of(read_metadata(folder), folder)
    model = MAEModel(arch, num_classes)
    params = read_params(_params_file(folder))
    state = {f"encoder.{k}": v for k, v in _load_tree(model.encoder, "encoder", params, folder).items()}
    state.update({f"decoder.{k}": v for k, v in _load_tree(model.decoder, "decoder", params, folder).items()})
    state.update({f"fc.{k}": v for k, v in _load_tree(model.fc, "fc", params, folder).items()})
    model.load_state_dict(state)
    return model.eval()
