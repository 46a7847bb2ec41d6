"""Pixel-space features of latent samples: decode with the frozen VAE, then run a pixel encoder (PAPER.md 4).

A latent-space generator (SD-VAE latents, PAPER.md 7) can be trained with a pixel-space feature encoder (e.g. a
pixel ResNet-MAE or a pretrained ResNet-50): the latents are decoded to images first, and the drift gradient flows
back through the encoder and the decoder, both frozen, to the latents.
"""

from __future__ import annotations

from torch import Tensor

from drifting_lightning.encoders.base import FeatureEncoder
from drifting_lightning.models.vae import VAECodec


class VAEBridge(FeatureEncoder):
    """latents z [B, C, h, w] -> ``encoder(VAE.decode(z))`` = {name: [B, L, C']}.

    ``vae``: a diffusers AutoencoderKL folder (a hub id only with ``allow_hub``; see ``models.vae.load_vae``).
    ``scale_factor``: the latent scale the generator works in (SD-VAE: 0.18215). ``dtype``: the decoder's weight
    dtype ("float32", "bfloat16", "float16"). ``clamp``: clamp decoded images to [-1, 1] before the encoder (off by
    default: clamping zeroes the gradient of saturated pixels). Only the decoder half of the VAE is kept; it is
    loaded once when the bridge is built and frozen like the encoder (``FeatureEncoder``).
    """

    def __init__(
        self,
        vae: str,
        encoder: FeatureEncoder,
        scale_factor: float = 0.18215,
        allow_hub: bool = False,
        dtype: str = "float32",
        clamp: bool = False,
    ) -> None:
        super().__init__()
        self.codec = VAECodec(vae, scale_factor, allow_hub, dtype, keep_encoder=False)
        self.encoder = encoder
        self.clamp = clamp
        self.freeze()

    def decode(self, z: Tensor) -> Tensor:
        """z: [B, C, h, w] scaled latents -> images [B, 3, h*f, w*f] (float32 for a float32 z)."""
        x = self.codec.decode(z)
        return x.clamp(-1.0, 1.0) if self.clamp else x

    def forward(self, z: Tensor) -> dict[str, Tensor]:
        return self.encoder(self.decode(z))
