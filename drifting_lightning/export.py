"""Export the EMA generator (safetensors + config.json) and load it back without Lightning.

An export directory holds ``generator.safetensors`` (the weights) and ``config.json`` (the generator's class path and
constructor arguments, ``sample_shape``, ``num_classes``, the weights file's sha256); ``load_generator`` needs only
torch, safetensors and the generator's own module. The constructor arguments come, in order of preference, from the
run's ``config.yaml`` (what ``drifting fit`` ran; LightningCLI writes it beside the checkpoints), the generator's
``init_config`` attribute, or the built-in generators' own record (``DiT.config``; the layer widths of
``MLPGenerator``). Every export is checked by building the class from the recorded arguments and loading the weights
into it strictly. Checkpoints are read (and verified) by ``drifting_lightning.checkpoints``.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, load_model, save_model
from torch import nn

from drifting_lightning.checkpoints.loading import class_path, find_run_config, read_run_config
from drifting_lightning.checkpoints.reading import (
    CheckpointError,
    PathLike,
    check_finite,
    existing_checkpoint,
    read_checkpoint,
)
from drifting_lightning.checkpoints.states import describe_mismatch
from drifting_lightning.files import atomic_write, file_sha256

if TYPE_CHECKING:
    from drifting_lightning.models.base import Generator

FORMAT = "drifting-generator/1"
WEIGHTS_FILE = "generator.safetensors"
CONFIG_FILE = "config.json"


def import_class(path: str) -> type:
    """The class named by a dotted path ``package.module.Class``."""
    module_name, _, name = path.rpartition(".")
    try:
        obj = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError) as err:
        raise ImportError(f"cannot import generator class {path!r}: {err}; is its package installed?") from err
    if not isinstance(obj, type) or not issubclass(obj, nn.Module):
        raise TypeError(f"{path!r} is not a torch.nn.Module class")
    return obj


def generator_init_args(generator: nn.Module) -> dict[str, Any]:
    """Constructor arguments that rebuild ``generator``'s architecture (weights aside), from the generator itself.

    Uses ``generator.init_config`` when the class provides it, else ``DiT.config`` (the resolved architecture) or
    the layer sizes of an ``MLPGenerator``; any other generator needs ``init_config`` or a run's config.yaml.
    """
    from drifting_lightning.models.dit import DiT
    from drifting_lightning.models.mlp import MLPGenerator

    try:
        own = getattr(generator, "init_config", None)
    except NotImplementedError:  # a base-class property the subclass did not fill in
        own = None
    if isinstance(own, Mapping):
        return dict(own)
    if type(generator) is DiT:
        return dict(generator.config)
    if type(generator) is MLPGenerator:
        widths = [m.out_features for m in generator.body if isinstance(m, nn.Linear)]
        return {
            "noise_dim": generator.noise_shape[0],
            "output_dim": generator.sample_shape[0],
            "hidden": widths,
            "num_classes": generator.num_classes,
        }  # init/init_point/init_scale only shape the initial weights, which the export replaces
    raise ValueError(
        f"cannot tell the constructor arguments of {class_path(type(generator))}: give the class an `init_config` "
        "property (a dict of its __init__ arguments), or export from a `drifting fit` checkpoint (its config.yaml "
        "records them)"
    )


def _check_builds(cls: type, init_args: dict[str, Any], state: Mapping[str, torch.Tensor], source: str) -> None:
    """Raise unless ``cls(**init_args)`` has exactly the parameters of ``state`` (names and shapes)."""
    try:
        with torch.device("meta"):  # no memory and no initialisation cost, even for L/2
            own = cls(**init_args).state_dict()
    except Exception as err:
        raise ValueError(f"{class_path(cls)}(**{init_args}) from {source} fails: {err}") from err
    report = describe_mismatch(own, state, "the weights", "the built generator")
    if report:
        raise ValueError(f"the weights do not fit {class_path(cls)} built from {source} with {init_args}: {report}")


def export_generator(
    module_or_ckpt: nn.Module | PathLike, out_dir: PathLike, use_ema: bool = True, config: PathLike | None = None
) -> Path:
    """Write ``out_dir/generator.safetensors`` and ``out_dir/config.json``; returns ``out_dir``.

    ``module_or_ckpt``: a DriftingModule (its ``ema_generator``, or ``generator`` with ``use_ema=False``), a bare
    generator, or the path of a ``drifting fit`` checkpoint (its run's config.yaml, or ``config``, gives the
    generator's arguments). config.json is written last, so its presence marks a complete export.
    """
    if isinstance(module_or_ckpt, nn.Module):
        module = module_or_ckpt
        gen = getattr(module, "ema_generator" if use_ema else "generator", None)
        gen = module if gen is None else gen  # a bare generator
        if not hasattr(gen, "sample_shape"):
            raise TypeError(f"{type(module).__name__} is neither a generator nor a module with one")
        cls, init_args = type(gen), generator_init_args(gen)
        source = {"module": class_path(type(module))}
        needs_decoding = getattr(module, "decoder", None) is not None  # a latent DriftingModule
    else:
        ckpt_path = existing_checkpoint(module_or_ckpt)  # a run folder: its newest last.ckpt
        ckpt = read_checkpoint(ckpt_path)
        spec = generator_spec(ckpt, ckpt_path, config)
        cls, init_args = import_class(spec["class_path"]), spec["init_args"]
        prefix = "ema_generator." if use_ema else "generator."
        state = {k[len(prefix) :]: v for k, v in ckpt.get("state_dict", {}).items() if k.startswith(prefix)}
        if not state:
            raise ValueError(f"{ckpt_path} holds no '{prefix}*' weights: is it a checkpoint of a DriftingModule?")
        gen = cls(**init_args)
        report = describe_mismatch(gen.state_dict(), state, "the checkpoint", "the generator built from the config")
        if report:
            raise ValueError(f"the generator weights in {ckpt_path} do not fit {spec}: {report}")
        gen.load_state_dict(state)
        source = {"checkpoint": str(ckpt_path), "global_step": ckpt.get("global_step")}
        needs_decoding = False  # a latent run's decoder lives in its module; see load_module
    state = {k: v.detach().cpu() for k, v in gen.state_dict().items()}
    check_finite(state, source.get("checkpoint") or source.get("module"))
    _check_builds(cls, init_args, state, "the recorded arguments")
    config_json = {
        "format": FORMAT,
        "class_path": class_path(cls),
        "init_args": init_args,
        "sample_shape": list(gen.sample_shape),
        "noise_shape": list(getattr(gen, "noise_shape", gen.sample_shape)),
        "num_classes": int(getattr(gen, "num_classes", 0)),
        "weights": WEIGHTS_FILE,
        "ema": bool(use_ema),
        "parameters": sum(p.numel() for p in gen.parameters()),
        "needs_decoding": needs_decoding,
        "source": source,
    }
    try:
        json.dumps(config_json)
    except TypeError as err:
        raise ValueError(f"the generator's arguments {init_args} are not JSON values: {err}") from err
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_FILE).unlink(missing_ok=True)  # an interrupted export must not look complete
    was_device = next(iter(gen.parameters()), torch.empty(0)).device
    with atomic_write(out / WEIGHTS_FILE) as tmp:
        save_model(gen.cpu(), str(tmp), metadata={"format": FORMAT})
    gen.to(was_device)
    config_json["sha256"] = file_sha256(out / WEIGHTS_FILE)  # load_generator checks it: safetensors has no CRC
    with atomic_write(out / CONFIG_FILE) as tmp:
        tmp.write_text(json.dumps(config_json, indent=2) + "\n")
    return out


def load_generator(path: PathLike, device: str | torch.device = "cpu") -> Generator:
    """The generator of an export directory (or its config.json), in eval mode without gradients, on ``device``.

    Needs neither Lightning nor the CLI: imports the class from config.json, builds it and loads the weights
    strictly. ``g.draw_inputs(n, device, generator)`` then ``g(**inputs, labels=..., alpha=...)`` samples.
    """
    cfg_file, cfg, weights = _verified_export(path)
    gen = import_class(cfg["class_path"])(**cfg["init_args"])
    load_model(gen, str(weights), strict=True)
    check_finite(gen.state_dict(), weights)
    if list(gen.sample_shape) != list(cfg["sample_shape"]):
        raise ValueError(
            f"{cfg_file}: the rebuilt generator makes {gen.sample_shape}, config says {cfg['sample_shape']}"
        )
    return gen.to(device).eval().requires_grad_(False)


def load_generator_weights(generator: nn.Module, path: PathLike) -> None:
    """Copy the weights of an export folder into ``generator`` (same architecture), e.g. to start a run from them;
    the folder is verified as ``load_generator`` does."""
    _, cfg, weights = _verified_export(path)
    source = load_file(str(weights))
    check_finite(source, weights)
    mismatch = describe_mismatch(generator.state_dict(), source, theirs=f"export {path}", ours="this generator")
    if mismatch:
        raise ValueError(f"init_from {path}: its weights do not fit this generator ({mismatch}); build it with "
                         f"{cfg.get('class_path')} and {cfg.get('init_args')}")  # fmt: skip
    generator.load_state_dict(source, strict=True)


def _verified_export(path: PathLike) -> tuple[Path, dict[str, Any], Path]:
    """(config.json path, its content, weights path) of an export folder (or its config.json), with the weights'
    sha256 checked against the one recorded at export."""
    path = Path(path)
    folder = path.parent if path.name == CONFIG_FILE else path
    cfg_file = folder / CONFIG_FILE
    if not cfg_file.is_file():
        raise FileNotFoundError(
            f"no {CONFIG_FILE} in {folder}: not a (complete) generator export. "
            "Write one with `drifting export --ckpt runs/<name>/version_<k>/checkpoints/last.ckpt --out DIR`"
        )
    cfg = json.loads(cfg_file.read_text())
    if cfg.get("format") != FORMAT:
        raise ValueError(f"{cfg_file} has format {cfg.get('format')!r}; this version reads {FORMAT!r}")
    weights = folder / cfg.get("weights", WEIGHTS_FILE)
    if not weights.is_file():
        raise FileNotFoundError(f"{cfg_file} names weights file {weights.name}, which is missing from {folder}")
    if "sha256" in cfg and file_sha256(weights) != cfg["sha256"]:
        raise CheckpointError(
            f"{weights} is damaged: its sha256 differs from the one {cfg_file} recorded at export; export it again"
        )
    return cfg_file, cfg, weights


# ---- checkpoints ----------------------------------------------------------------------------------------------
def generator_spec(ckpt: Mapping[str, Any], ckpt_path: Path, config: PathLike | None = None) -> dict[str, Any]:
    """{"class_path", "init_args"} of a checkpoint's generator: from its hyper-parameters when they hold it, else
    from the ``model.init_args.generator`` section of the run's config.yaml (or ``config``)."""
    spec = ckpt.get("hyper_parameters", {}).get("generator") if config is None else None
    where = f"the hyper-parameters of {ckpt_path}"
    if not (isinstance(spec, Mapping) and "class_path" in spec):
        cfg_path = Path(config) if config is not None else find_run_config(ckpt_path)
        model = read_run_config(cfg_path).get("model") or {}
        spec = (model.get("init_args") or {}).get("generator")
        where = f"{cfg_path} (model.init_args.generator)"
    if not (isinstance(spec, Mapping) and isinstance(spec.get("class_path"), str)):
        raise ValueError(f"no generator class_path in {where}: is this the config of a DriftingModule run?")
    init_args = {**(spec.get("init_args") or {}), **(spec.get("dict_kwargs") or {})}
    nested = [k for k, v in init_args.items() if isinstance(v, Mapping) and "class_path" in v]
    if nested:
        raise ValueError(f"generator arguments {nested} in {where} are objects; an export records plain values only")
    return {"class_path": spec["class_path"], "init_args": init_args}
