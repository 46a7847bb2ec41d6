"""Several feature encoders side by side: their feature sets, concatenated into one dict."""

from __future__ import annotations

from torch import Tensor, nn

from drifting_lightning.encoders.base import FeatureEncoder


class CompositeEncoder(FeatureEncoder):
    """Runs every encoder on the same input and merges their feature sets ``{name: [B, L, C]}``.

    ``prefixes[i]`` (when given; "" for none) is prepended to encoder i's names as ``"{prefix}.{name}"``.
    Without prefixes the names are kept as they are. A name produced twice is an error: pass (other) prefixes.
    """

    def __init__(self, encoders: list[FeatureEncoder], prefixes: list[str] | None = None) -> None:
        super().__init__()
        if not encoders:
            raise ValueError("CompositeEncoder needs at least one encoder")
        if prefixes is not None and len(prefixes) != len(encoders):
            raise ValueError(f"got {len(prefixes)} prefixes for {len(encoders)} encoders; give one per encoder")
        self.encoders = nn.ModuleList(encoders)
        self.prefixes = list(prefixes) if prefixes is not None else [""] * len(encoders)
        self.freeze()

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        owner: dict[str, int] = {}
        for i, (prefix, encoder) in enumerate(zip(self.prefixes, self.encoders)):
            for name, feat in encoder(x).items():
                key = f"{prefix}.{name}" if prefix else name
                if key in out:
                    raise ValueError(
                        f"feature name {key!r} is produced by encoder {owner[key]} "
                        f"({type(self.encoders[owner[key]]).__name__}) and encoder {i} ({type(encoder).__name__}); "
                        "pass distinct prefixes=[...] to CompositeEncoder"
                    )
                out[key] = feat
                owner[key] = i
        return out
