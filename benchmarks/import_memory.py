"""Peak memory of ``drifting import-official`` on a full-size MAE artifact (issue 15).

Writes a random artifact in the authors' format (``metadata.json`` + ``ema_params.msgpack``: flax msgpack, every array
an ext of type 1 holding (shape, dtype, bytes)) for the requested architecture, streaming each array in slices so that
writing needs little memory, then imports it in a subprocess and prints that process's peak RSS
(``resource.getrusage(RUSAGE_CHILDREN)``) next to the float32 size of the encoder.

    python benchmarks/import_memory.py --dir /tmp/mae640              # mae_latent_640: width 640, 3-4-6-3 (~2.1B)
    python benchmarks/import_memory.py --dir /tmp/mae64 --width 64    # the same shapes scaled down
"""

from __future__ import annotations

import argparse
import json
import resource
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import BinaryIO

import msgpack
import numpy as np
import torch

from drifting_lightning.encoders.mae_model import MAEModel
from drifting_lightning.encoders.resnet_mae import ResNetConfig
from drifting_lightning.official.encoder import flax_layout

SLICE = 1 << 24  # float32 values written per slice (64 MiB)


def _tree(model: MAEModel) -> dict:
    """The authors' nested key tree {name: {...: shape}} of every parameter of ``model``."""
    tree: dict = {}
    for root, module in (("encoder", model.encoder), ("decoder", model.decoder), ("fc", model.fc)):
        for _, name, shape in flax_layout(module, root):
            *parents, leaf = name.split("/")
            node = tree
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = shape
    return tree


def _write_array(f: BinaryIO, packer: msgpack.Packer, shape: tuple[int, ...], rng: np.random.Generator) -> None:
    n = int(np.prod(shape))
    head = b"\x93" + packer.pack(list(shape)) + packer.pack("float32") + b"\xc6" + struct.pack(">I", 4 * n)
    f.write(b"\xc9" + struct.pack(">I", len(head) + 4 * n) + b"\x01" + head)
    for start in range(0, n, SLICE):
        f.write((0.02 * rng.standard_normal(min(SLICE, n - start), dtype=np.float32)).tobytes())


def _write_tree(f: BinaryIO, packer: msgpack.Packer, tree: dict, rng: np.random.Generator) -> None:
    f.write(packer.pack_map_header(len(tree)))
    for key, value in tree.items():
        f.write(packer.pack(key))
        if isinstance(value, dict):
            _write_tree(f, packer, value, rng)
        else:
            _write_array(f, packer, value, rng)


def write_random_artifact(folder: Path, arch: ResNetConfig, num_classes: int = 1000, seed: int = 0) -> int:
    """A random MAE artifact for ``arch`` in ``folder``; returns the number of encoder parameters."""
    with torch.device("meta"):
        model = MAEModel(arch, num_classes)
    folder.mkdir(parents=True, exist_ok=True)
    config = {"in_channels": arch.in_channels, "base_channels": arch.width, "layers": list(arch.stages),
              "input_patch_size": arch.patchify, "patch_size": 2, "num_classes": num_classes, "use_bf16": True}
    metadata = {"format": "flax.msgpack", "kind": "mae", "backend": "jax", "model_config": config}
    (folder / "metadata.json").write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")
    with open(folder / "ema_params.msgpack", "wb") as f:
        _write_tree(f, msgpack.Packer(), _tree(model), np.random.default_rng(seed))
    return sum(p.numel() for p in model.encoder.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", required=True, help="folder for the artifact and the imported checkpoint")
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--stages", type=int, nargs=4, default=[3, 4, 6, 3])
    parser.add_argument("--in-channels", type=int, default=4)
    args = parser.parse_args()
    root = Path(args.dir)
    arch = ResNetConfig(args.in_channels, args.width, tuple(args.stages))
    t0 = time.time()
    n = write_random_artifact(root / "artifact", arch)
    size = (root / "artifact" / "ema_params.msgpack").stat().st_size
    print(f"artifact: {size / 2**30:.2f} GiB written in {time.time() - t0:.0f} s; encoder {n / 1e9:.3f}B parameters "
          f"= {4 * n / 2**30:.2f} GiB float32")
    # The interpreter with the modules imported, alone: the fixed part of the peak.
    code = "import sys; from drifting_lightning.official.encoder import import_encoder"
    subprocess.run([sys.executable, "-c", code], check=True)
    base = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # kilobytes on Linux
    t0 = time.time()
    code += "; import_encoder(sys.argv[1], sys.argv[2])"
    subprocess.run([sys.executable, "-c", code, str(root / "artifact"), str(root / "imported")], check=True)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # the largest child so far
    print(f"import: {time.time() - t0:.0f} s, peak RSS {peak / 2**30:.2f} GiB = {peak / (4 * n):.2f}x the encoder "
          f"(interpreter and modules alone: {base / 2**30:.2f} GiB; above that {(peak - base) / (4 * n):.2f}x)")


if __name__ == "__main__":
    main()
