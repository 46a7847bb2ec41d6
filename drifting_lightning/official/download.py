"""``hf://<id>``: one artifact folder of the authors' HF repository, downloaded through huggingface_hub."""

from __future__ import annotations

import os
from pathlib import Path

ARTIFACT_KINDS = ("gen", "mae")
OFFICIAL_REPO = "Goodeat/drifting"
# The artifacts of OFFICIAL_REPO and their kinds (the tables of the authors' README).
OFFICIAL_IDS = {
    "latent_L_sota": "gen", "latent_B_sota": "gen", "pixel_L_sota": "gen", "pixel_B_sota": "gen", "ablation": "gen",
    "mae_latent_640": "mae", "mae_pixel_640": "mae", "mae_latent_256": "mae",
}  # fmt: skip


def download_artifact(model_id: str, repo: str, cache_dir: str | None = None) -> Path:
    """The local folder of ``models/{gen|mae}/jax/<model_id>/`` in ``repo``; offline, an error naming the way out.
    An id the authors' repository does not have is refused before any download."""
    if repo == OFFICIAL_REPO and model_id not in OFFICIAL_IDS:
        from drifting_lightning.registry import unknown

        raise ValueError(f"hf://{model_id}: {unknown('artifact id', model_id, list(OFFICIAL_IDS))} ({repo})")
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False")
    kind = OFFICIAL_IDS.get(model_id) if repo == OFFICIAL_REPO else None
    where = f"models/{kind}/jax/{model_id}/" if kind else f"models/gen/jax/{model_id}/ (or models/mae/jax/{model_id}/)"
    hint = f"download {where} from https://huggingface.co/{repo} on a machine with network and pass that local folder "
    hint += "instead of hf://"
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
