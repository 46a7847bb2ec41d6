"""Write the fixtures that our tests compare against the authors' JAX code (never imported by the package).

Run in its own venv, against a fetched snapshot of github lambertae/drifting:

    python3 -m venv /tmp/jaxvenv && /tmp/jaxvenv/bin/pip install jax jaxlib flax einops msgpack numpy
    /tmp/jaxvenv/bin/python tools/official_fixtures.py --official /path/to/drifting --out tests/fixtures/official

It imports their modules from --official, builds tiny random-weight models, saves them in their artifact format
(``metadata.json`` + ``ema_params.msgpack``, as their ``utils/ckpt_util.py`` writes) and stores their outputs for
fixed inputs as ``.npz``. The tests read only these files: JAX and flax are never needed by ``make test``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def use_official(path: str) -> None:
    """Make their modules importable and patch what newer JAX renamed."""
    import jax.numpy as jnp

    sys.path.insert(0, str(Path(path).resolve()))
    sys.path.insert(0, str(HERE))
    if not hasattr(jnp, "_drifting_clip_patched"):
        clip = jnp.clip

        def clip_compat(x, a_min=None, a_max=None, **kwargs):
            kwargs.setdefault("min", a_min)
            kwargs.setdefault("max", a_max)
            return clip(x, **kwargs)

        jnp.clip = clip_compat
        jnp._drifting_clip_patched = True


def write_artifact(folder: Path, params: Any, kind: str, model_config: dict[str, Any]) -> None:
    """Their artifact format: ``metadata.json`` + ``ema_params.msgpack`` (flax ``msgpack_serialize``)."""
    from flax import serialization

    write_metadata(folder, kind, model_config)
    (folder / "ema_params.msgpack").write_bytes(serialization.msgpack_serialize(params))


def write_metadata(folder: Path, kind: str, model_config: dict[str, Any]) -> None:
    """The ``metadata.json`` of their artifact format."""
    folder.mkdir(parents=True, exist_ok=True)
    metadata = {
        "format": "flax.msgpack",
        "kind": kind,
        "backend": "jax",
        "ema_decay": 0.999,
        "step": 0,
        "path": "params_ema/ema_params.msgpack",
        "model_config": model_config,
    }
    (folder / "metadata.json").write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--official", required=True, help="a checkout of github lambertae/drifting")
    parser.add_argument("--out", default=str(HERE.parent / "tests" / "fixtures" / "official"))
    parser.add_argument("--only", choices=["generator", "encoder"], help="write one family of fixtures")
    args = parser.parse_args()
    use_official(args.official)
    out = Path(args.out)
    if args.only in (None, "generator"):
        import official_generator_fixtures

        official_generator_fixtures.write(out)
    if args.only in (None, "encoder"):
        import official_encoder_fixtures

        official_encoder_fixtures.write(out)


if __name__ == "__main__":
    main()
