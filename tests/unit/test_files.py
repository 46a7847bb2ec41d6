"""atomic_write replaces a file in one step or not at all; file_sha256 hashes block by block."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest

from drifting_lightning.files import atomic_write, file_sha256


def test_atomic_write_replaces_the_file_or_leaves_the_old_one(tmp_path: Path):
    path = tmp_path / "new" / "folder" / "stats.npz"  # the folder is made on the way
    with atomic_write(path) as tmp, open(tmp, "wb") as f:
        assert tmp.parent == path.parent and tmp.name.startswith(".stats.npz.tmp-")
        np.savez(f, mu=np.arange(3))
    with np.load(path) as saved:
        assert saved["mu"].tolist() == [0, 1, 2]

    with pytest.raises(KeyboardInterrupt), atomic_write(path) as tmp:  # killed halfway through the new content
        tmp.write_bytes(b"PK\x03\x04 half a file")
        raise KeyboardInterrupt
    with np.load(path) as saved:
        assert saved["mu"].tolist() == [0, 1, 2]
    assert os.listdir(path.parent) == ["stats.npz"]  # no temporary file left behind

    with atomic_write(path) as tmp:
        tmp.write_text("second")
    assert path.read_text() == "second" and os.listdir(path.parent) == ["stats.npz"]


def test_file_sha256_reads_in_blocks(tmp_path: Path):
    data = np.random.default_rng(0).bytes((1 << 22) * 2 + 123)  # more than two blocks
    (tmp_path / "w.bin").write_bytes(data)
    assert file_sha256(tmp_path / "w.bin") == hashlib.sha256(data).hexdigest()
    (tmp_path / "empty").write_bytes(b"")
    assert file_sha256(tmp_path / "empty") == hashlib.sha256(b"").hexdigest()


def test_atomic_write_gives_the_permissions_of_a_plainly_created_file(tmp_path: Path):
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    private = tmp_path / "weights.safetensors"
    with atomic_write(private) as tmp:
        # what safetensors does: its own temporary file, readable by the owner alone
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT, 0o600))
    assert private.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777


def test_an_export_is_as_readable_as_its_config(tmp_path: Path):
    from drifting_lightning.export import export_generator
    from drifting_lightning.models.mlp import MLPGenerator

    export_generator(MLPGenerator(noise_dim=4, hidden=(8,)), tmp_path / "export")
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "export").iterdir()}
    assert len(set(modes.values())) == 1, modes
