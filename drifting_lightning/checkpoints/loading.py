"""Rebuilding a trained module from a ``drifting fit`` checkpoint and its run's config.yaml.

``DriftingModule.load_from_checkpoint`` does not work for CLI-trained runs: the module keeps its components
(generator, loss, encoder) out of its hyper-parameters, so the checkpoint alone cannot rebuild them. ``load_module``
therefore instantiates the ``model`` section of the run's ``config.yaml`` with jsonargparse, as the CLI did, and
loads the checkpoint's weights (read and verified by ``read_checkpoint``) into it.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from drifting_lightning.checkpoints.reading import PathLike, existing_checkpoint, existing_file, read_checkpoint
from drifting_lightning.checkpoints.states import describe_mismatch

if TYPE_CHECKING:  # Lightning is imported only by the functions that need it
    import lightning.pytorch as pl

RUN_CONFIG = "config.yaml"


def class_path(cls: type) -> str:
    """``module.QualName`` of a class, what ``import_class`` reads back."""
    return f"{cls.__module__}.{cls.__qualname__}"


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
        "writes it to the run folder runs/<name>/version_<k>/; give the run's config.yaml (`drifting sample` and "
        "`drifting export` take --config, load_module config=)"
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
    report = describe_mismatch(module.state_dict(), ckpt["state_dict"], "the checkpoint", "the model") if strict else ""
    if report:
        raise ValueError(f"the weights in {ckpt_path} do not fit the model built from {cfg_path}: {report}")
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
