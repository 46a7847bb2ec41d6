"""What makes every ``drifting fit`` resumable, and the checkpoint it resumes from.

- ``resolve_ckpt_path`` checks ``--ckpt_path`` before anything reads it (LightningCLI itself loads a file given there
  for its hyper-parameters, and would fail on a damaged one without naming it), and turns a run folder
  (``runs/<name>/version_<k>``) into its ``checkpoints/last.ckpt``.
- ``resolve_last_checkpoint`` makes ``drifting fit --ckpt_path last`` find the run's ``last.ckpt`` even though each
  run of the command would otherwise log into a new ``version_N`` folder.
- ``harden_trainer`` gives every ``drifting fit`` trainer ``last.ckpt``, atomic checkpoint files, the training RNG
  stream in its checkpoints, a clean stop on SIGTERM/SIGINT and checkpoints between epochs that resume exactly.
"""

from __future__ import annotations

import glob
import importlib
import os
import re
from pathlib import Path
from typing import Any

from jsonargparse import Namespace
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.plugins.io import CheckpointIO

from drifting_lightning.callbacks.epoch_boundary import EpochBoundaryResume
from drifting_lightning.callbacks.graceful_stop import GracefulStop, notice
from drifting_lightning.callbacks.rng import TrainingRNG
from drifting_lightning.checkpoints.atomic_io import AtomicCheckpointIO
from drifting_lightning.checkpoints.reading import is_distributed_checkpoint, verify_checkpoint_file

LAST = re.compile(r"^last(-v\d+)?\.ckpt$")  # ModelCheckpoint's save_last names
VERSION = re.compile(r"^version_\d+$")  # the version folders of TensorBoard and CSV loggers


def resolve_ckpt_path(config: Namespace) -> None:
    """Check the ``ckpt_path`` of a parsed subcommand section ``config``: a file must be a complete checkpoint; a run
    folder becomes its newest ``last.ckpt``, and the run logs into that folder as with "last". Keywords ("last",
    "best", "hpc"), registry names, remote URLs and sharded checkpoint folders are left to Lightning."""
    ckpt_path = config.get("ckpt_path")
    if not ckpt_path or ckpt_path in ("last", "best", "hpc") or "://" in ckpt_path or ckpt_path.startswith("registry:"):
        return
    if os.path.isdir(ckpt_path):
        if not is_distributed_checkpoint(ckpt_path):
            last = last_in_run_folder(Path(ckpt_path))
            config.ckpt_path = str(last)
            _log_into_run_of(config, last)
            notice(f"--ckpt_path {ckpt_path} is a run folder: resuming from {last}")
        return
    verify_checkpoint_file(ckpt_path)


def last_in_run_folder(folder: Path) -> Path:
    """The newest ``last.ckpt`` of a run folder (in its ``checkpoints/``) or of a checkpoints folder; else a
    FileNotFoundError that says what ``--ckpt_path`` takes."""
    places = [folder / "checkpoints", folder]
    found = [p for place in places if place.is_dir() for p in place.iterdir() if LAST.match(p.name)]
    if found:
        return max(found, key=lambda p: p.stat().st_mtime)
    others = sorted(str(p) for place in places if place.is_dir() for p in place.glob("*.ckpt"))
    held = f" It holds {', '.join(others[:4])}: pass one of them." if others else ""
    raise FileNotFoundError(
        f"--ckpt_path {folder} is a folder without a last.ckpt (looked in {places[0]} and {folder}); expected a .ckpt "
        f"file, a run folder runs/<name>/version_<k> with checkpoints/last.ckpt, a sharded checkpoint folder, or "
        f"'last'.{held}"
    )


# ---- resuming with --ckpt_path last ------------------------------------------------------------------------
def resolve_last_checkpoint(config: Namespace) -> None:
    """For ``drifting fit --ckpt_path last``: set ``config.ckpt_path`` to the newest ``last.ckpt`` of the run, and point
    the logger at the version folder that holds it (``_log_into_run_of``). ``config``: the parsed ``fit`` section.

    Where the run keeps its checkpoints: a ModelCheckpoint's ``dirpath`` when set, else
    ``<logger save_dir>/<name>/<version>/checkpoints`` (every version is searched), else
    ``<default_root_dir>/checkpoints`` without a logger. No last.ckpt there: the run starts from scratch, as
    Lightning does, so one command line serves the first start and every restart of a preemptible job.
    """
    if config.get("ckpt_path") != "last":
        return
    trainer = config.trainer
    # glob patterns of the checkpoint folders
    folders = [glob.escape(d) for d in _checkpoint_dirpaths(trainer.get("callbacks"))]
    logger = _first_logger(trainer.get("logger"))
    root = glob.escape(trainer.get("default_root_dir") or ".")
    if isinstance(logger, Namespace):
        args = logger.init_args
        base = Path(args.save_dir) / str(args.get("name") or "")
        version = args.get("version")
        folder = "*" if version is None else glob.escape(version if isinstance(version, str) else f"version_{version}")
        folders.append(os.path.join(glob.escape(str(base)), folder, "checkpoints"))
    elif logger is False:
        folders.append(os.path.join(root, "checkpoints"))
    elif logger is True:
        folders.append(os.path.join(root, "lightning_logs", "*", "checkpoints"))
    if not folders:  # a logger with another folder layout: Lightning resolves "last" once the logger exists
        return
    found = [Path(p) for folder in folders for p in glob.glob(os.path.join(folder, "*")) if LAST.match(Path(p).name)]
    if not found:
        notice(f"--ckpt_path last: no last.ckpt in {', '.join(folders)}; starting a new run.")
        config.ckpt_path = None
        return
    newest = max(found, key=lambda p: p.stat().st_mtime)
    config.ckpt_path = str(newest)
    _log_into_run_of(config, newest)
    notice(f"--ckpt_path last: resuming from {newest}")


def _log_into_run_of(config: Namespace, checkpoint: Path) -> None:
    """Point a TensorBoard/CSV logger without a fixed ``version`` at the version folder whose ``checkpoints/`` holds
    ``checkpoint``, so that the resumed run writes its logs and checkpoints where the interrupted one did."""
    trainer = config.get("trainer") or Namespace()
    logger = _first_logger(trainer.get("logger"))
    if not isinstance(logger, Namespace) or logger.init_args.get("version") is not None:
        return
    base = Path(logger.init_args.save_dir) / str(logger.init_args.get("name") or "")
    run_folder = checkpoint.parent.parent
    if run_folder.parent.resolve() == base.resolve():
        logger.init_args.version = int(run_folder.name[8:]) if VERSION.match(run_folder.name) else run_folder.name


def _first_logger(logger: Any) -> Namespace | bool | None:
    """The logger whose folder holds the checkpoints (Lightning uses the first): its Namespace for a TensorBoard or
    CSV logger (save_dir/name/version layout), False for none, True for Lightning's default logger, None for a logger
    of another layout."""
    if isinstance(logger, list):
        logger = logger[0] if logger else False
    if logger is None or isinstance(logger, bool):
        return logger is not False
    if isinstance(logger, Namespace) and issubclass(_import(logger.class_path), (TensorBoardLogger, CSVLogger)):
        return logger
    return None


def _import(class_path: str) -> type:
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _checkpoint_dirpaths(callbacks: Any) -> list[str]:
    dirpaths = []
    for cb in callbacks if isinstance(callbacks, list) else [callbacks] if callbacks else []:
        dirpath = (cb.get("init_args") or Namespace()).get("dirpath") if isinstance(cb, Namespace) else None
        if dirpath and issubclass(_import(cb.class_path), ModelCheckpoint):
            dirpaths.append(dirpath)
    return dirpaths


# ---- the trainer of every `drifting fit` ----------------------------------------------------------------------
def harden_trainer(config: dict[str, Any]) -> list[Callback]:
    """Make the Trainer arguments ``config`` resumable; returns the callbacks to add.

    Adds ``TrainingRNG``, ``GracefulStop`` and ``EpochBoundaryResume``; makes sure a ModelCheckpoint keeps
    ``last.ckpt`` unless ``enable_checkpointing`` is false: turns on ``save_last`` of the first configured one, or
    (none configured) adds ``ModelCheckpoint(filename="last", enable_version_counter=False)``, which overwrites the one
    file last.ckpt at every epoch end and when training stops (``save_last`` alone would write each checkpoint twice,
    under its epoch-step name and as last.ckpt). Uses ``AtomicCheckpointIO`` unless a CheckpointIO plugin is
    configured.
    """
    added: list[Callback] = [TrainingRNG(), GracefulStop(), EpochBoundaryResume()]
    configured = config.get("callbacks") or []
    checkpoints = [c for c in (configured if isinstance(configured, list) else [configured])
                   if isinstance(c, ModelCheckpoint)]  # fmt: skip
    if config.get("enable_checkpointing", True) is not False:
        if not checkpoints:
            added.append(ModelCheckpoint(filename="last", enable_version_counter=False))
        elif not any(c.save_last for c in checkpoints):
            checkpoints[0].save_last = True
    plugins = config.get("plugins") or []
    plugins = list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
    if not any(isinstance(p, CheckpointIO) for p in plugins):
        config["plugins"] = [*plugins, AtomicCheckpointIO()]
    return added
