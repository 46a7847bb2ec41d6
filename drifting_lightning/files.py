"""File helpers shared by every writer and reader: atomic writes and content hashes.

``atomic_write`` is how every file that a later run or command reads is written (checkpoints, exports, latent
shards and their manifest, sample and statistics .npz files, classifier files, metrics JSON): a reader sees the old
file or the complete new one, never a part, even when the writer is killed or the machine crashes mid-write.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
from collections.abc import Iterator
from pathlib import Path

_BLOCK = 1 << 22  # bytes read per hash update: large files are hashed without holding them in memory
# The process's umask, read once at import (reading it means setting it, which would race with threads later).
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def temporary_name(path: Path) -> Path:
    """A hidden name beside ``path``, unique per host and process (several nodes may share the folder):
    ``.<name>.tmp-<host>-<pid>``, the pattern by which leftovers of killed writers are recognised."""
    return path.with_name(f".{path.name}.tmp-{socket.gethostname()}-{os.getpid()}")


def fsync_dir(folder: Path) -> None:
    """Flush a folder's entries to disk: a rename is durable only then (POSIX). Not possible on every OS/file system,
    where it is skipped."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """Replace ``path`` in one step: yields a temporary path beside it for the caller to write (by name or with
    ``open``, any library); when the block ends, the temporary file is flushed to disk and renamed over ``path``.

    The temporary file lies in the target's own folder, so the rename never crosses file systems (where it would be a
    copy that a kill can cut short). If the block raises (or the process is interrupted), the temporary file is
    removed and ``path`` keeps its old content. The target's folder is created when missing. The file gets the
    permissions of a plainly created one (0666 less the umask): writers that go through a private temporary file of
    their own (safetensors) would otherwise leave it readable by its owner alone.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)  # the caller has closed it; fsync flushes the file's data whatever the fd
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read block by block (weights files of gigabytes hash in constant memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()
