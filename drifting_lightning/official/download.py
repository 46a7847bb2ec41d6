"""``hf://<id>``: one artifact folder of the authors' HF repository, downloaded through huggingface_hub."""

from __future__ import annotations

import os
from pathlib import Path

ARTIFACT_KINDS = ("gen", "mae")


def download_artifact(model_id: str, repo: str, cache_dir: str | None = None) -> Path:
    """The local folder of ``models/{gen|mae}/jax/<model_id>/`` in ``repo``; offline, an error naming the way out."""
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False")
    hint = (f"download models/gen/jax/{model_id}/ (or models/mae/jax/{model_id}/) from https://huggingface.co/{repo} "
            "on a machine with network and pass that local folder instead of hf://")
    if offline:
        raise FileNotFoundError(f"hf://{model_id}: HF_HUB_OFFLINE is set, nothing can be downloaded; {hint}")
    from huggingface_hub import snapshot_download

    patterns = [f"models/{kind}/jax/{model_id}/*" for kind in ARTIFACT_KINDS]
    try:
        root = Path(snapshot_download(repo_id=repo, allow_patterns=patterns, cache_dir=cache_dir))
    except Exception as err:  # network, auth and missing-repo errors all end the same way for the user
        failure = f"hf://{model_id}: download from {repo} failed ({type(err).__name__})"
        raise FileNotFoundError(f"{failure}; {hint}") from None
    for kind in ARTIFACT_KINDS:
        folder = root / "models" / kind / "jax" / model_id
        if (folder / "metadata.json").is_file():
            return folder
    raise FileNotFoundError(f"hf://{model_id}: {repo} has no models/gen/jax/{model_id} or models/mae/jax/{model_id}")
