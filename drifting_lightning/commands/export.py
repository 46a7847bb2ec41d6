"""``drifting export``: a checkpoint's EMA generator as safetensors + config.json, loadable without the CLI.

    drifting export --ckpt runs/digits/version_0/checkpoints/last.ckpt --out exports/digits
    python -c "from drifting_lightning import load_generator; g = load_generator('exports/digits')"

The export holds the generator only: a latent model's exports make latents (decode them with the run's VAE).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from drifting_lightning.commands import check_output_folder, run_command


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="drifting export",
        description="Write the EMA generator of a `drifting fit` checkpoint to DIR/generator.safetensors and "
        "DIR/config.json (class path, constructor arguments, sample_shape, num_classes). Load it with "
        "drifting_lightning.load_generator(DIR): no Lightning, no CLI.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--ckpt", required=True, help="a `drifting fit` checkpoint: a .ckpt file, a sharded folder, "
                        "or a run folder (its newest last.ckpt)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--config", help="the run's config.yaml (default: found beside the checkpoint)")
    parser.add_argument("--online", action="store_true", help="export the online weights instead of the EMA")
    return parser


def _run(args: argparse.Namespace) -> int:
    from drifting_lightning.checkpoints.reading import existing_checkpoint
    from drifting_lightning.console import notice
    from drifting_lightning.export import CONFIG_FILE, export_generator

    check_output_folder(args.out)
    ckpt = existing_checkpoint(args.ckpt)
    if ckpt != Path(args.ckpt).expanduser():
        notice(f"--ckpt is a run folder: exporting from {ckpt}")
    out = export_generator(ckpt, args.out, use_ema=not args.online, config=args.config)
    cfg = json.loads((out / CONFIG_FILE).read_text())
    print(
        f"exported {cfg['class_path']} ({cfg['parameters']:,} parameters, {'EMA' if cfg['ema'] else 'online'} "
        f"weights, samples {cfg['sample_shape']}, {cfg['num_classes']} classes) to {out}"
    )
    return 0


def main(argv: Sequence[str]) -> int:
    """``drifting export --ckpt X --out DIR``; returns the exit status."""
    return run_command(build_parser(), _run, argv)
