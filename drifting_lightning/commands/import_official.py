"""``drifting import-official SRC --out DIR``: one of the authors' released artifacts in our formats.

SRC is a local artifact folder (``metadata.json`` + ``ema_params.msgpack``) or ``hf://<id>`` (downloaded from the
authors' HF repository ``Goodeat/drifting`` when the network allows). The artifact's ``kind`` decides what is written:
a generator becomes an export folder (``drifting sample --ckpt DIR``, ``load_generator(DIR)``, ``init_from: DIR``),
an MAE becomes an encoder checkpoint for ``encoder: ResNetMAE``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from drifting_lightning.commands import check_output_folder, run_command
from drifting_lightning.official.download import OFFICIAL_REPO


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="drifting import-official",
        description="Convert one of the authors' released JAX artifacts (generator or MAE encoder) to this project's "
        "formats. SRC: a local folder with metadata.json + ema_params.msgpack, or hf://<id> such as "
        "hf://latent_L_sota, hf://ablation, hf://mae_latent_256 (needs the network).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("src", metavar="SRC", help="artifact folder or hf://<id>")
    parser.add_argument("--out", required=True, help="output folder (export folder or encoder checkpoint folder)")
    parser.add_argument("--repo", default=OFFICIAL_REPO, help="HF repository of the artifacts (for hf://)")
    return parser


def resolve_source(src: str, repo: str) -> Path:
    """A local artifact folder for ``src``: the folder itself, or an ``hf://<id>`` download."""
    if not src.startswith("hf://"):
        folder = Path(src)
        if not folder.is_dir():
            raise FileNotFoundError(f"{src} is not a folder: pass an artifact folder (metadata.json + "
                                    "ema_params.msgpack) or hf://<id>")
        return folder
    from drifting_lightning.official.download import download_artifact

    return download_artifact(src.removeprefix("hf://"), repo)


def _run(args: argparse.Namespace) -> int:
    from drifting_lightning.official.artifact import read_metadata

    check_output_folder(args.out)
    folder = resolve_source(args.src, args.repo)
    kind = read_metadata(folder).get("kind")
    if kind == "gen":
        from drifting_lightning.official.generator import import_generator

        out = import_generator(folder, args.out)
    elif kind == "mae":
        from drifting_lightning.official.encoder import import_encoder

        out = import_encoder(folder, args.out)
    else:
        raise ValueError(f"{folder}/metadata.json: kind {kind!r} is neither 'gen' nor 'mae'")
    print(f"imported {folder} ({kind}) to {out}")
    return 0


def main(argv: Sequence[str]) -> int:
    """``drifting import-official SRC --out DIR``; returns the exit status."""
    return run_command(build_parser(), _run, argv)
