"""Reading weights files, never trusted blindly: every loader of the project reads through this module.

- ``read_checkpoint``: a ``drifting fit`` (Lightning) checkpoint, a ``.ckpt`` file or the folder of a sharded save, as
  one dict on the CPU. Used by ``fit`` resumes (``AtomicCheckpointIO``), ``sample``, ``export``, ``evaluate`` and
  ``load_module``.
- ``read_weights``: a weights file of any origin (a pretrained encoder, a classifier): ``.safetensors``, a
  ``torch.save`` archive, or the pickle of torch before 1.6.

Both check the bytes first (``verify_checkpoint_file``: ``torch.load`` checks no CRC, so a damaged archive would load
as wrong weights), name what a file is when it is not a weights file at all (a JPEG, a YAML config, text), and refuse
weights that hold NaN or Inf (``check_finite``), naming the tensor.
"""

from __future__ import annotations

import os
import pickle
import re
import struct
import tempfile
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

DISTRIBUTED_INDEX = ".metadata"  # torch.distributed.checkpoint's index file in a sharded checkpoint folder
DISTRIBUTED_META = "meta.pt"  # Lightning's file for everything but the model and optimiser in such a folder
FIT_CHECKPOINT = "a `drifting fit` checkpoint (runs/<name>/version_<k>/checkpoints/last.ckpt)"
LAST = re.compile(r"^last(-v\d+)?\.ckpt$")  # ModelCheckpoint's save_last names
WEIGHTS_FILE = "a weights file (.safetensors, or a torch.save file: .pt/.pth/.ckpt/.bin)"
PathLike = str | os.PathLike


class CheckpointError(RuntimeError):
    """A checkpoint file cannot be used; the message names the file and what to do."""


# ---- what a file is -------------------------------------------------------------------------------------------
_MAGIC = {b"\xff\xd8\xff": "a JPEG image", b"\x89PNG": "a PNG image", b"GIF8": "a GIF image", b"%PDF": "a PDF",
          b"\x1f\x8b": "a gzip file", b"\x93NUMPY": "a .npy array"}  # fmt: skip


def _head(path: Path, size: int = 4096) -> bytes:
    with open(path, "rb") as f:
        return f.read(size)


def _is_safetensors(head: bytes) -> bool:
    # An 8-byte little-endian header length, then the JSON header.
    return len(head) > 8 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] < (1 << 30)


def foreign_kind(path: Path) -> str | None:
    """What ``path`` is when its first bytes show a file of another kind than weights (a JPEG, text, ...); None when
    it may be a weights file (a zip archive, even a cut one; a pickle; safetensors) or is unrecognised."""
    head = _head(path)
    if not head or head.startswith((b"PK", b"\x80")) or _is_safetensors(head):
        return None
    if head.startswith(b"version https://git-lfs"):
        return None  # a damaged download rather than a mix-up: see verify_checkpoint_file
    for magic, kind in _MAGIC.items():
        if head.startswith(magic):
            return kind
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if "\0" in text:
        return None
    if path.suffix in (".yaml", ".yml"):
        return "a YAML text file (a run's config goes to --config)"
    return "a JSON text file" if text.lstrip().startswith(("{", "[")) else "a text file"


def not_a(path: Path, kind: str, expected: str) -> CheckpointError:
    return CheckpointError(f"{path} is {kind}, not {expected}")


# ---- checks -----------------------------------------------------------------------------------------------------
def verify_checkpoint_file(path: PathLike, expected: str = FIT_CHECKPOINT) -> None:
    """Raise CheckpointError unless ``path`` is a complete ``torch.save`` file: a zip archive whose every member
    matches its CRC-32. ``torch.load`` checks no CRC, so a flipped byte would load silently as wrong weights."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist.{_others(path)}")
    if not zipfile.is_zipfile(path):
        if _is_safetensors(_head(path, 64)):
            raise not_a(path, "a safetensors weights file (such as an export's generator.safetensors)", expected)
        kind = foreign_kind(path)
        if kind is not None:
            raise not_a(path, kind, expected)
        problem = "it is not a complete torch.save archive (cut short, or not a checkpoint at all)"
        if _head(path, 64).startswith(b"version https://git-lfs"):
            problem += "; it is a Git LFS pointer: fetch the file itself with `git lfs pull`"
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


def _others(path: Path) -> str:
    others = sorted(p.name for p in path.parent.glob("*.ckpt") if p.name != path.name) if path.parent.is_dir() else []
    if others:
        return f" Other checkpoints in {path.parent}: {', '.join(others)}; use one of them, or start anew."
    return " Use another checkpoint (`drifting fit` without --ckpt_path starts a new run)."


def check_finite(tensors: Mapping[str, Any], source: PathLike) -> None:
    """Raise CheckpointError naming the first tensor of ``tensors`` (nested mappings included) that holds NaN or Inf:
    such weights make NaN samples (black images) or a NaN loss, never a usable model."""
    bad = [(name, t) for name, t in _floating(tensors, "") if not bool(torch.isfinite(t).all())]
    if bad:
        name, t = bad[0]
        what = "NaN" if bool(torch.isnan(t).any()) else "Inf"
        more = f" (and {len(bad) - 1} more tensors)" if len(bad) > 1 else ""
        raise CheckpointError(f"{source}: tensor '{name}' has {what}{more}; the file is damaged or its run diverged, "
                              "use an earlier checkpoint")  # fmt: skip


def _floating(tree: Mapping[str, Any], prefix: str) -> list[tuple[str, Tensor]]:
    found = []
    for key, value in tree.items():
        if isinstance(value, Tensor) and (value.is_floating_point() or value.is_complex()):
            found.append((f"{prefix}{key}", value))
        elif isinstance(value, Mapping):
            found.extend(_floating(value, f"{prefix}{key}."))
    return found


# ---- Lightning checkpoints ----------------------------------------------------------------------------------
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
    """``path`` as a Path when it is a checkpoint file or a sharded checkpoint folder; a run folder
    (``runs/<name>/version_<k>``) or its ``checkpoints/`` as its newest ``last.ckpt`` (``last_in_run_folder``);
    else FileNotFoundError."""
    p = Path(path).expanduser()
    if p.is_dir():
        return p if is_distributed_checkpoint(p) else last_in_run_folder(p)
    return existing_file(p, "checkpoint")


def last_in_run_folder(folder: Path, option: str = "", keywords: str = "") -> Path:
    """The newest ``last.ckpt`` of a run folder (in its ``checkpoints/``) or of a checkpoints folder; else a
    FileNotFoundError that says what a checkpoint argument takes. ``option`` names the argument in that message;
    ``keywords`` adds the words it also takes (``fit --ckpt_path``: "last")."""
    places = [folder / "checkpoints", folder]
    found = [p for place in places if place.is_dir() for p in place.iterdir() if LAST.match(p.name)]
    if found:
        return max(found, key=lambda p: p.stat().st_mtime)
    others = sorted(str(p) for place in places if place.is_dir() for p in place.glob("*.ckpt"))
    held = f" It holds {', '.join(others[:4])}: pass one of them." if others else ""
    given = f"{option} {folder}" if option else str(folder)
    raise FileNotFoundError(
        f"{given} is a folder without a last.ckpt (looked in {places[0]} and {folder}); expected a .ckpt file, a run "
        f"folder runs/<name>/version_<k> with checkpoints/last.ckpt, {'a' if keywords else 'or a'} sharded "
        f"checkpoint folder (with a {DISTRIBUTED_INDEX} file){keywords}.{held}"
    )


def _torch_load(path: Path, map_location: Any, weights_only: bool | None) -> Any:
    """torch.load of a verified archive. ``weights_only=None``: tensors and containers only, and a file holding other
    Python objects (some callbacks store them) is read in full with a warning, as Lightning itself does."""
    try:
        return torch.load(path, map_location=map_location, weights_only=weights_only is not False)
    except pickle.UnpicklingError as err:  # objects beyond tensors and containers
        if weights_only is not None:
            raise CheckpointError(f"checkpoint {path} cannot be read with weights_only=True: {err}") from err
    except (RuntimeError, EOFError, OSError) as err:
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(err).__name__}: {err})") from err
    warnings.warn(f"{path} holds Python objects beyond tensors; loading it in full (trusted files only)", stacklevel=3)
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as err:  # the objects need code that is not installed, or the pickle itself is damaged
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(err).__name__}: {err})") from err


def _read_distributed_checkpoint(path: Path) -> dict[str, Any]:
    """A sharded checkpoint folder as one Lightning checkpoint dict: the gathered shards (``state_dict`` or FSDP's
    ``model``, optimiser states) plus ``meta.pt`` (step, hyper-parameters, loops, callbacks, DataModule)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as tmp:
        whole = Path(tmp) / "gathered.pt"
        try:
            dcp_to_torch_save(path, whole)
        except Exception as err:
            raise CheckpointError(f"cannot gather the sharded checkpoint {path}: {err}") from err
        ckpt = _torch_load(whole, "cpu", None)
    if "state_dict" not in ckpt and "model" in ckpt:  # FSDPStrategy names the model's entry "model"
        ckpt["state_dict"] = ckpt.pop("model")
    meta = path / DISTRIBUTED_META
    if meta.is_file():
        verify_checkpoint_file(meta)
        ckpt.update(_torch_load(meta, "cpu", None))
    return ckpt


def read_checkpoint(path: PathLike, map_location: Any = "cpu", weights_only: bool | None = None) -> dict[str, Any]:
    """A Lightning checkpoint (a file or a sharded checkpoint folder) as a dict, verified (CRC-32, finite weights).

    ``weights_only``: as ``torch.load``; None reads files that hold Python objects beyond tensors too, with a warning.
    """
    path = existing_checkpoint(path)
    if path.is_dir():
        ckpt = _read_distributed_checkpoint(path)
    else:
        verify_checkpoint_file(path)
        ckpt = _torch_load(path, map_location, weights_only)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(f"{path} holds no model weights ('state_dict'): is it a `drifting fit` checkpoint?")
    check_finite(ckpt["state_dict"], path)
    return ckpt


# ---- weights files of any origin ------------------------------------------------------------------------------
def read_weights(path: PathLike, what: str = "weights file") -> Mapping[str, Any]:
    """The mapping stored in a weights file, on the CPU, verified: a ``.safetensors`` file, a ``torch.save`` archive
    (CRC-checked) or a pre-1.6 torch pickle, read with ``weights_only=True`` (no code in the file runs).

    ``what`` names the file in the errors ("encoder checkpoint", "classifier file").
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {str(path)!r} (check the path; nothing is downloaded)")
    head = _head(path, 64)
    if _is_safetensors(head):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            obj: Any = load_file(str(path), device="cpu")
        except SafetensorError as err:
            raise CheckpointError(f"{what} {path} is a damaged safetensors file ({err})") from err
    elif head.startswith(b"\x80") and not zipfile.is_zipfile(path):  # torch < 1.6 wrote plain pickles, no CRC
        obj = _load_weights_only(path, what)
    else:
        verify_checkpoint_file(path, WEIGHTS_FILE)
        obj = _load_weights_only(path, what)
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{what} {path} holds a {type(obj).__name__}, expected a dict of tensors")
    # A Lightning checkpoint's weights are its state_dict; the rest is training state, where an Inf is no damage
    # (a ModelCheckpoint without a monitor stores kth_value = inf).
    check_finite(obj["state_dict"] if isinstance(obj.get("state_dict"), Mapping) else obj, path)
    return obj


def _load_weights_only(path: Path, what: str) -> Any:
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # a pickle that holds more than tensors and containers, or damaged
        raise CheckpointError(
            f"could not read {what} {str(path)!r} with torch.load(weights_only=True) ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}); save the weights as a plain state_dict (.pt) or "
            ".safetensors file"
        ) from err
