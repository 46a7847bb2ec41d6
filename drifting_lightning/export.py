"""Export the EMA generator (safetensors + config.json), load it back without Lightning, and rebuild a trained
module from a ``drifting fit`` checkpoint.

An export directory holds ``generator.safetensors`` (the weights) and ``config.json`` (the generator's class path and
constructor arguments, ``sample_shape``, ``num_classes``); ``load_generator`` needs only torch, safetensors and the
generator's own module. The constructor arguments come, in order of preference, from the run's ``config.yaml``
(what ``drifting fit`` ran; LightningCLI writes it beside the checkpoints), the generator's ``init_config``
attribute, or the built-in generators' own record (``DiT.config``; the layer widths of ``MLPGenerator``). Every
export is checked by building the class from the recorded arguments and loading the weights into it strictly.

``DriftingModule.load_from_checkpoint`` does not work for CLI-trained runs: the module keeps its components
(generator, loss, encoder) out of its hyper-parameters, so the checkpoint alone cannot rebuild them. ``load_module``
therefore instantiates the ``model`` section of the run's ``config.yaml`` with jsonargparse, as the CLI did, and
loads the checkpoint's weights into it.

A checkpoint is a ``.ckpt`` file or the folder a sharded save writes (``ModelParallelStrategy`` / FSDP with
``save_distributed_checkpoint``, their default): torch.distributed.checkpoint shards plus Lightning's ``meta.pt``.
Such a folder is gathered into one dict in this process, with no process group.
"""

from __future__ import annotations

import importlib
import json
import os
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_model, save_model
from torch import nn

if TYPE_CHECKING:  # Lightning is imported only by the functions that need it
    import lightning.pytorch as pl

    from drifting_lightning.models.base import Generator

FORMAT = "drifting-generator/1"
WEIGHTS_FILE = "generator.safetensors"
CONFIG_FILE = "config.json"
RUN_CONFIG = "config.yaml"
DISTRIBUTED_INDEX = ".metadata"  # torch.distributed.checkpoint's index file in a sharded checkpoint folder
DISTRIBUTED_META = "meta.pt"  # Lightning's file for everything but the model and optimiser in such a folder
PathLike = str | os.PathLike


def class_path(cls: type) -> str:
    """``module.QualName`` of a class, what ``import_class`` reads back."""
    return f"{cls.__module__}.{cls.__qualname__}"


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
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own if k in state and
              tuple(state[k].shape) != tuple(own[k].shape)]  # fmt: skip
    if missing or unexpected or shapes:
        raise ValueError(
            f"the weights do not fit {class_path(cls)} built from {source} with {init_args}: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}, shape mismatches (weights vs built) {shapes[:5]}"
        )


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
        ckpt_path = existing_checkpoint(module_or_ckpt)
        ckpt = read_checkpoint(ckpt_path)
        spec = generator_spec(ckpt, ckpt_path, config)
        cls, init_args = import_class(spec["class_path"]), spec["init_args"]
        prefix = "ema_generator." if use_ema else "generator."
        state = {k[len(prefix) :]: v for k, v in ckpt.get("state_dict", {}).items() if k.startswith(prefix)}
        if not state:
            raise ValueError(f"{ckpt_path} holds no '{prefix}*' weights: is it a checkpoint of a DriftingModule?")
        gen = cls(**init_args)
        try:
            gen.load_state_dict(state)
        except RuntimeError as err:
            raise ValueError(f"the generator weights in {ckpt_path} do not fit {spec}: {err}") from err
        source = {"checkpoint": str(ckpt_path), "global_step": ckpt.get("global_step")}
        needs_decoding = False  # a latent run's decoder lives in its module; see load_module
    state = {k: v.detach().cpu() for k, v in gen.state_dict().items()}
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
        text = json.dumps(config_json, indent=2)
    except TypeError as err:
        raise ValueError(f"the generator's arguments {init_args} are not JSON values: {err}") from err
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_FILE).unlink(missing_ok=True)  # an interrupted export must not look complete
    tmp = out / f".{WEIGHTS_FILE}.tmp-{os.getpid()}"
    was_device = next(iter(gen.parameters()), torch.empty(0)).device
    save_model(gen.cpu(), str(tmp), metadata={"format": FORMAT})
    gen.to(was_device)
    os.replace(tmp, out / WEIGHTS_FILE)
    tmp_cfg = out / f".{CONFIG_FILE}.tmp-{os.getpid()}"
    tmp_cfg.write_text(text + "\n")
    os.replace(tmp_cfg, out / CONFIG_FILE)
    return out


def load_generator(path: PathLike, device: str | torch.device = "cpu") -> Generator:
    """The generator of an export directory (or its config.json), in eval mode without gradients, on ``device``.

    Needs neither Lightning nor the CLI: imports the class from config.json, builds it and loads the weights
    strictly. ``g.draw_inputs(n, device, generator)`` then ``g(**inputs, labels=..., alpha=...)`` samples.
    """
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
    gen = import_class(cfg["class_path"])(**cfg["init_args"])
    load_model(gen, str(weights), strict=True)
    if list(gen.sample_shape) != list(cfg["sample_shape"]):
        raise ValueError(
            f"{cfg_file}: the rebuilt generator makes {gen.sample_shape}, config says {cfg['sample_shape']}"
        )
    return gen.to(device).eval().requires_grad_(False)


# ---- Lightning checkpoints and run configs ---------------------------------------------------------------------
def existing_file(path: PathLike, what: str) -> Path:
    """``path`` as a Path, or FileNotFoundError naming it and what it should have been."""
    p = Path(path).expanduser()
    if not p.is_file():
        hint = " (drifting fit writes runs/<name>/version_<k>/checkpoints/*.ckpt)" if what == "checkpoint" else ""
        raise FileNotFoundError(f"{what} file {str(p)!r} does not exist{hint}")
    return p


def is_distributed_checkpoint(path: PathLike) -> bool:
    """Whether ``path`` is a sharded checkpoint folder (torch.distributed.checkpoint layout)."""
    return (Path(path) / DISTRIBUTED_INDEX).is_file()


def existing_checkpoint(path: PathLike) -> Path:
    """``path`` as a Path when it is a checkpoint file or a sharded checkpoint folder, else FileNotFoundError."""
    p = Path(path).expanduser()
    if p.is_dir() and not is_distributed_checkpoint(p):
        raise FileNotFoundError(
            f"{str(p)!r} is a folder but not a sharded checkpoint (no {DISTRIBUTED_INDEX} file): pass a .ckpt file "
            "or a folder that a sharded save wrote"
        )
    return p if p.is_dir() else existing_file(p, "checkpoint")


def _torch_load(path: Path) -> Any:
    """torch.load on the CPU with ``weights_only=True`` first; a file holding other Python objects (some callbacks
    store them) is read in full, with a warning, as Lightning itself does."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle.UnpicklingError for objects beyond tensors and containers
        if "weights_only" not in str(err) and "Unpickl" not in type(err).__name__:
            raise ValueError(f"cannot read checkpoint {path}: {err}") from err
        warnings.warn(
            f"{path} holds Python objects beyond tensors; loading it in full (trusted files only)", stacklevel=3
        )
        return torch.load(path, map_location="cpu", weights_only=False)


def _read_distributed_checkpoint(path: Path) -> dict[str, Any]:
    """A sharded checkpoint folder as one Lightning checkpoint dict: the gathered shards (``state_dict`` or FSDP's
    ``model``, optimiser states) plus ``meta.pt`` (step, hyper-parameters, loops, callbacks, DataModule)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as tmp:
        whole = Path(tmp) / "gathered.pt"
        try:
            dcp_to_torch_save(path, whole)
        except Exception as err:
            raise ValueError(f"cannot gather the sharded checkpoint {path}: {err}") from err
        ckpt = _torch_load(whole)
    if "state_dict" not in ckpt and "model" in ckpt:  # FSDPStrategy names the model's entry "model"
        ckpt["state_dict"] = ckpt.pop("model")
    if (path / DISTRIBUTED_META).is_file():
        ckpt.update(_torch_load(path / DISTRIBUTED_META))
    return ckpt


def read_checkpoint(path: PathLike) -> dict[str, Any]:
    """A Lightning checkpoint (a file or a sharded checkpoint folder) as a dict, on the CPU."""
    path = existing_checkpoint(path)
    ckpt = _read_distributed_checkpoint(path) if path.is_dir() else _torch_load(path)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise ValueError(f"{path} is not a Lightning checkpoint (no 'state_dict')")
    return ckpt


def find_run_config(ckpt_path: PathLike) -> Path:
    """The config.yaml of the run a checkpoint belongs to: beside it or in the folder above (LightningCLI writes
    ``<log_dir>/config.yaml``, ModelCheckpoint ``<log_dir>/checkpoints/*.ckpt``)."""
    ckpt_path = Path(ckpt_path).resolve()
    candidates = [ckpt_path.parent / RUN_CONFIG, ckpt_path.parent.parent / RUN_CONFIG]
    for c in candidates:
        if c.is_file():
            return c
    raise FileNotFoundError(
        f"no {RUN_CONFIG} for checkpoint {ckpt_path} (looked at {', '.join(map(str, candidates))}). `drifting fit` "
        f"writes it to the run folder runs/<name>/version_<k>/; pass the run's config with --config"
    )


def read_run_config(path: PathLike) -> dict[str, Any]:
    """The YAML of a ``drifting fit`` config (or the config.yaml a run saved) as a dict."""
    import yaml

    path = existing_file(path, "config")
    try:
        cfg = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ValueError(f"{path} is not valid YAML: {err}") from err
    if not isinstance(cfg, dict):
        raise ValueError(f"{path} does not hold a config mapping (model:, data:, trainer:)")
    return cfg


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


def instantiate_section(config_path: PathLike, section: str, base: type) -> Any:
    """Build the ``section`` ("model" or "data") of a ``drifting fit`` config with jsonargparse, as the CLI does.

    ``base``: the section's base class (``LightningModule`` / ``LightningDataModule``); short class names and
    third-party plug-ins resolve as on the command line.
    """
    from jsonargparse import ArgumentParser

    from drifting_lightning import registry

    cfg = read_run_config(config_path)
    if section not in cfg:
        raise KeyError(f"{config_path} has no '{section}:' section (it has {sorted(cfg)})")
    registry.load_components()
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(base, section, fail_untyped=False)
    try:
        parsed = parser.parse_object({section: cfg[section]})
        return getattr(parser.instantiate_classes(parsed), section)
    except Exception as err:  # jsonargparse's ArgumentError and errors raised by the constructors
        raise ValueError(f"cannot build '{section}' from {config_path}: {err}") from err


def load_module(ckpt_path: PathLike, config: PathLike | None = None, strict: bool = True) -> pl.LightningModule:
    """The LightningModule of a ``drifting fit`` checkpoint, on the CPU in eval mode, with its trained weights.

    Built from the ``model`` section of ``config`` (default: the run's config.yaml beside the checkpoint) and loaded
    with the checkpoint's ``state_dict``. A config whose hyper-parameters differ from the checkpoint's is reported.
    """
    import lightning.pytorch as pl

    ckpt_path = existing_checkpoint(ckpt_path)
    ckpt = read_checkpoint(ckpt_path)
    cfg_path = Path(config) if config is not None else find_run_config(ckpt_path)
    module = instantiate_section(cfg_path, "model", pl.LightningModule)
    saved = ckpt.get("hyper_parameters") or {}
    if saved.get("_class_path") not in (None, class_path(type(module))):
        raise ValueError(
            f"{cfg_path} builds {class_path(type(module))} but {ckpt_path} was saved by {saved['_class_path']}: "
            "pass the run's own config with --config"
        )
    differ = [k for k, v in saved.items() if not k.startswith("_") and k in module.hparams
              and json.dumps(v, default=str) != json.dumps(_plain(module.hparams[k]), default=str)]  # fmt: skip
    if differ:
        warnings.warn(f"{cfg_path} and {ckpt_path} disagree on {differ}: is the config from another run?", stacklevel=2)
    module.on_load_checkpoint(ckpt)
    try:
        module.load_state_dict(ckpt["state_dict"], strict=strict)
    except RuntimeError as err:
        raise ValueError(f"the weights in {ckpt_path} do not fit the model built from {cfg_path}: {err}") from err
    return module.eval()


def _plain(value: Any) -> Any:
    """Tuples -> lists, so that hyper-parameters compare equal to their YAML/checkpoint form."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
