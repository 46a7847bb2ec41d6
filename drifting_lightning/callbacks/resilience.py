"""Resilience: checkpoints that survive a kill, resumes that continue the same run, clear refusals.

- ``AtomicCheckpointIO`` writes each checkpoint next to its target and renames it into place, and refuses a
  truncated or corrupted file when loading, naming the file and the other checkpoints beside it.
- ``TrainingRNG`` keeps what the training steps draw from the global random generators in the checkpoint.
- ``GracefulStop`` turns SIGTERM (SLURM preemption, ``kill``) and Ctrl-C into: finish the step, write
  ``last.ckpt``, exit with 128 + the signal number.
- ``resolve_last_checkpoint`` makes ``drifting fit --ckpt_path last`` find the run's ``last.ckpt`` even though each
  run of the command would otherwise log into a new ``version_N`` folder.
- ``check_state_fits`` names the tensors that differ when a checkpoint comes from a run with another model config.
"""

from __future__ import annotations

import contextlib
import glob
import importlib
import os
import pickle
import random
import re
import signal
import sys
import threading
import uuid
import zipfile
from collections.abc import Mapping
from pathlib import Path
from types import FrameType
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
import torch.distributed as dist
from fsspec.implementations.local import LocalFileSystem
from jsonargparse import Namespace
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.plugins.io import CheckpointIO, TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch import Tensor

LAST = re.compile(r"^last(-v\d+)?\.ckpt$")  # ModelCheckpoint's save_last names
VERSION = re.compile(r"^version_\d+$")  # the version folders of TensorBoard and CSV loggers


def notice(message: str) -> None:
    """One line on stderr, from rank 0 only (the rank is known from the environment before the trainer exists)."""
    if rank_zero_only.rank == 0:
        print(f"[drifting] {message}", file=sys.stderr, flush=True)


class CheckpointError(RuntimeError):
    """A checkpoint file cannot be used; the message names the file and what to do."""


# ---- checkpoint files ---------------------------------------------------------------------------------------
def verify_checkpoint_file(path: str | os.PathLike) -> None:
    """Raise CheckpointError unless ``path`` is a complete ``torch.save`` file: a zip archive whose every member
    matches its CRC-32. ``torch.load`` checks no CRC, so a flipped byte would load silently as wrong weights."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist.{_others(path)}")
    if not zipfile.is_zipfile(path):
        problem = "it is not a complete torch.save archive (cut short, or not a checkpoint at all)"
    else:
        try:
            with zipfile.ZipFile(path) as archive:
                bad = archive.testzip()
        except (zipfile.BadZipFile, OSError, EOFError) as err:
            problem = f"the archive is damaged ({err})"
        else:
            problem = None if bad is None else f"its member {bad} fails its CRC-32 check"
    if problem:
        raise CheckpointError(f"checkpoint {path} is corrupted: {problem}.{_others(path)}")


def verify_ckpt_path_argument(ckpt_path: str | None) -> None:
    """Check the ``--ckpt_path`` of a CLI run before anything reads it: LightningCLI itself loads a file given there
    (for its hyper-parameters) and would fail on a damaged one without naming it. Keywords ("last", "best", "hpc"),
    registry names, remote URLs and folders (sharded checkpoints) are left to Lightning."""
    if not ckpt_path or ckpt_path in ("last", "best", "hpc") or os.path.isdir(ckpt_path):
        return
    if "://" not in ckpt_path and not ckpt_path.startswith("registry:"):
        verify_checkpoint_file(ckpt_path)


def _others(path: Path) -> str:
    others = sorted(p.name for p in path.parent.glob("*.ckpt") if p.name != path.name) if path.parent.is_dir() else []
    if others:
        return f" Other checkpoints in {path.parent}: {', '.join(others)}; pass one with --ckpt_path, or start anew."
    return " Resume from another checkpoint with --ckpt_path, or start a new run without it."


class AtomicCheckpointIO(TorchCheckpointIO):
    """TorchCheckpointIO that never leaves a partial file under a checkpoint's name.

    Lightning's own atomic save writes into the system temp folder and moves the file; across file systems (node-local
    /tmp, shared run folder) that move is a copy, which a kill can cut short after the old file is gone. Here a local
    checkpoint is written to a hidden temp file in its own folder, flushed to disk, then renamed over the target in one
    step. Remote (fsspec) paths keep Lightning's save. Loading verifies the file first (``verify_checkpoint_file``).
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or not isinstance(get_filesystem(path), LocalFileSystem):
            return super().save_checkpoint(checkpoint, path, storage_options)
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        temp = target.with_name(f".{target.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
        try:
            with open(temp, "xb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(temp, target)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                temp.unlink()
            raise
        # The rename itself must reach the disk too, or a crash could bring back the old file.
        with contextlib.suppress(OSError):
            fd = os.open(target.parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        if isinstance(get_filesystem(path), LocalFileSystem):
            verify_checkpoint_file(path)
        kwargs = {} if map_location is None else {"map_location": map_location}
        try:
            checkpoint = super().load_checkpoint(path, weights_only=weights_only, **kwargs)
        except (RuntimeError, EOFError, pickle.UnpicklingError) as err:
            raise CheckpointError(f"checkpoint {path} cannot be read ({type(err).__name__}: {err})") from err
        if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
            raise CheckpointError(f"{path} holds no model weights ('state_dict'): is it a `drifting fit` checkpoint?")
        return checkpoint


def check_state_fits(expected: Mapping[str, Tensor], checkpoint: Mapping[str, Any], source: str) -> None:
    """Raise ValueError naming every tensor of ``checkpoint["state_dict"]`` that is missing, unexpected or of another
    shape than in ``expected`` (the module's state_dict)."""
    found = checkpoint.get("state_dict", {})
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    shapes = [f"{k} {list(found[k].shape)} in the checkpoint, {list(v.shape)} in this run" for k, v in expected.items()
              if k in found and isinstance(found[k], Tensor) and found[k].shape != v.shape]  # fmt: skip
    if not (missing or unexpected or shapes):
        return
    parts = []
    for title, keys in (("other shapes", shapes), ("missing from the checkpoint", missing),
                        ("only in the checkpoint", unexpected)):  # fmt: skip
        if keys:
            shown = "; ".join(keys[:8]) + (f"; ... ({len(keys) - 8} more)" if len(keys) > 8 else "")
            parts.append(f"{len(keys)} {title}: {shown}")
    raise ValueError(
        f"checkpoint {source} was written by a run with a different model config. " + ". ".join(parts) + ". "
        "Resume with the config of the run that wrote it (config.yaml in its run folder), or start a new run without "
        "--ckpt_path."
    )


# ---- resuming with --ckpt_path last ------------------------------------------------------------------------
def resolve_last_checkpoint(config: Namespace) -> None:
    """For ``drifting fit --ckpt_path last``: set ``config.ckpt_path`` to the newest ``last.ckpt`` of the run, and point
    a TensorBoard/CSV logger without a fixed ``version`` at the version folder that holds it, so that the resumed
    run writes its logs and checkpoints where the interrupted one did. ``config``: the parsed ``fit`` section.

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
    run_folder = newest.parent.parent
    if isinstance(logger, Namespace) and logger.init_args.get("version") is None and run_folder.parent == base:
        logger.init_args.version = int(run_folder.name[8:]) if VERSION.match(run_folder.name) else run_folder.name
    notice(f"--ckpt_path last: resuming from {newest}")


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

    Adds ``TrainingRNG`` and ``GracefulStop``; makes sure a ModelCheckpoint keeps ``last.ckpt`` unless
    ``enable_checkpointing`` is false: turns on ``save_last`` of the first configured one, or (none configured) adds
    ``ModelCheckpoint(filename="last", enable_version_counter=False)``, which overwrites the one file last.ckpt at every
    epoch end and when training stops (``save_last`` alone would write each checkpoint twice, under its epoch-step name
    and as last.ckpt). Uses ``AtomicCheckpointIO`` unless a CheckpointIO plugin is configured.
    """
    added: list[Callback] = [TrainingRNG(), GracefulStop()]
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


# ---- random state ------------------------------------------------------------------------------------------
class TrainingRNG(Callback):
    """The random stream of the training steps, kept apart from everything else and saved in checkpoints.

    Each step starts from the global RNG state (torch, this process's CUDA device, numpy, random) in which the
    previous step ended. Whatever draws between steps (DataLoader iterators at an epoch start, plotting callbacks)
    therefore changes nothing in training, and a resumed run makes exactly the global draws of the uninterrupted one
    (dropout in a plug-in generator, say; DriftingModule's noise and guidance scales come from generators keyed by
    seed, step and group). The checkpoint holds one state per process (rank).
    """

    def __init__(self) -> None:
        self._state: dict[str, Any] | None = None  # where the last training step left the RNGs
        self._loaded: list[dict[str, Any] | None] | None = None  # per rank, from a checkpoint

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._loaded is None:
            return
        rank = trainer.global_rank
        if rank < len(self._loaded):
            self._state = _from_portable(self._loaded[rank])
        else:
            saved = len(self._loaded)
            rank_zero_warn(f"the checkpoint holds the random states of {saved} processes, this run has "
                           f"{trainer.world_size}: ranks {saved} and up start new random streams")  # fmt: skip

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int):
        if self._state is not None:
            _set_rng_state(self._state, pl_module.device)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:  # fmt: skip
        self._state = _rng_state(pl_module.device)

    def state_dict(self) -> dict[str, Any]:
        if self._state is None and self._loaded is not None:  # saved again before the first resumed step
            return {"ranks": self._loaded}
        mine = None if self._state is None else _to_portable(self._state)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            ranks: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(ranks, mine)
            return {"ranks": ranks}
        return {"ranks": [mine]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loaded = list(state_dict.get("ranks", []))


def _rng_state(device: torch.device) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


# Checkpoints hold tensors and plain Python values only, so that they load with torch.load(weights_only=True).
def _to_portable(state: dict[str, Any]) -> dict[str, Any]:
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    return {**state, "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss]}


def _from_portable(state: dict[str, Any] | None) -> dict[str, Any] | None:
    if state is None:
        return None
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    version, internal, gauss_next = state["python"]
    return {**state, "numpy": (kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss),
            "python": (version, tuple(internal), gauss_next)}  # fmt: skip


# ---- signals -------------------------------------------------------------------------------------------------
class GracefulStop(Callback):
    """SIGTERM or Ctrl-C (SIGINT): finish the current step, write ``last.ckpt``, exit with 128 + the signal number
    (143 for SIGTERM, 130 for SIGINT). SIGKILL stops at once, without a checkpoint.

    Lightning already notes SIGTERM and stops at the next step boundary (``SIGTERMException``); this callback routes
    SIGINT the same way and writes the checkpoint when that stop happens. Without a ModelCheckpoint
    (``enable_checkpointing: false``) nothing is written.
    """

    def __init__(self) -> None:
        self._signal = signal.SIGTERM

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning has installed its SIGTERM handler by now and restores every handler of the process when fit ends.
        # Every Ctrl-C takes the SIGTERM path: with several processes, a second SIGINT from the terminal must not
        # interrupt one of them in the middle of a collective.
        if threading.current_thread() is threading.main_thread():

            def on_sigint(signum: int, frame: FrameType | None) -> None:
                self._signal = signal.SIGINT
                handler = signal.getsignal(signal.SIGTERM)
                if not callable(handler):
                    raise KeyboardInterrupt
                handler(signum, frame)

            signal.signal(signal.SIGINT, on_sigint)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException):
            return
        name = signal.Signals(self._signal).name
        checkpoints = [c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint) and c.dirpath]
        if checkpoints:
            keeper = next((c for c in checkpoints if c.save_last), checkpoints[0])
            path = keeper.last_model_path or os.path.join(keeper.dirpath, keeper.CHECKPOINT_NAME_LAST + ".ckpt")
            # Recorded before saving, as ModelCheckpoint does: the resumed run then refreshes this file.
            keeper.last_model_path = path
            trainer.save_checkpoint(path)
            where = f"saved {path}; resume with --ckpt_path last (or --ckpt_path {path})"
        else:
            where = "no checkpoint written (checkpointing is off)"
        notice(f"{name} received: stopped after step {trainer.global_step}, {where}")
        # SIGTERMException is a SystemExit; its code becomes the exit status once it leaves the CLI.
        exception.code = 128 + int(self._signal)
