"""The authors' one-step DiT generator (their ``models/generator.py``: ``DitGen`` around ``LightningDiT``).

A transformer over noise patches (PAPER.md section 7; paper A.2, Table 8), layer for layer the released network, so
that their ImageNet weights load (``drifting import-official``) and new runs train the paper's architecture:
- condition c [B, cond_dim] = class embedding + style embedding + 0.02 * RMSNorm(MLP(sinusoid(alpha, 256))), the
  guidance scale alpha entering raw (alpha None means 1.0). Style: ``num_style_tokens`` indices, token t into its
  own ``style_codebook_size``-entry table, the picked rows summed (their ``noise_embeds_t``); style None means
  index 0 everywhere. ``num_classes = 0``: no class table, labels ignored.
- patch tokens: (p, p, C)-flattened patches -> linear, plus a learnable position embedding initialised 2-D sin-cos;
  ``num_context_tokens`` in-context tokens (one projection of c plus a learned vector each) go in front;
- blocks: RMSNorm (eps 1e-6, learnable weight) + adaLN-zero modulation from c, attention with RMSNorm QK-norm and
  1-D rotate-half RoPE over the whole sequence (context tokens at positions 0..k-1), SwiGLU MLP with biases and a
  hidden width rounded up to a multiple of 32;
- output: adaLN-modulated RMSNorm, a zero-initialised linear to patch pixels, context tokens dropped.
Shapes are ours (noise and samples [B, C, H, W]); theirs are [B, H, W, C]: the same values, transposed. We compute
in float32 (their released runs use bfloat16 activations).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from drifting_lightning.models.base import Generator

ALPHA_FREQ_DIM = 256
ALPHA_EMBED_SCALE = 0.02  # their `cond + cfg_norm(cfg_embedder(alpha)) * 0.02`
ROPE_THETA = 10000.0
NORM_EPS = 1e-6


def _arch(size: int, channels: int, patch: int, width: int, depth: int, heads: int, classes: int) -> dict:
    return dict(input_size=size, in_channels=channels, patch_size=patch, hidden_size=width, depth=depth,
                num_heads=heads, mlp_ratio=4.0, num_classes=classes)  # fmt: skip


# Presets by keyword, like DiT's DiT_models. The four ImageNet ones are the authors' configs/gen/*.yaml (with the
# default 32 x 64 style tokens and 16 context tokens): B/2 132,708,880 parameters, L/2 462,909,456, B/16 133,864,704,
# L/16 464,450,304, the counts of their flax module.
DIT_PRESETS: dict[str, dict] = {
    # latent_ablation, latent_sota_B: 32x32x4 SD-VAE latents
    "B/2": _arch(size=32, channels=4, patch=2, width=768, depth=12, heads=12, classes=1000),
    "L/2": _arch(size=32, channels=4, patch=2, width=1024, depth=24, heads=16, classes=1000),  # latent_sota_L
    "B/16": _arch(size=256, channels=3, patch=16, width=768, depth=12, heads=12, classes=1000),  # pixel_sota_B
    "L/16": _arch(size=256, channels=3, patch=16, width=1024, depth=24, heads=16, classes=1000),  # pixel_sota_L
    # Small presets for CPU runs and tests.
    "digits": _arch(size=8, channels=1, patch=2, width=128, depth=4, heads=2, classes=10),
    "fashion": _arch(size=28, channels=1, patch=4, width=192, depth=6, heads=3, classes=10),
    "cifar": _arch(size=32, channels=3, patch=4, width=256, depth=6, heads=4, classes=10),
    "tiny": _arch(size=32, channels=4, patch=2, width=64, depth=2, heads=2, classes=10),
}
_ARCH = tuple(DIT_PRESETS["B/2"])


def swiglu_hidden_size(hidden_size: int, mlp_ratio: float) -> int:
    """Their SwiGLU width: int(2/3 * int(ratio * D)), rounded up to a multiple of 32 (B: 2048, L: 2752)."""
    return (int(2 / 3 * int(hidden_size * mlp_ratio)) + 31) // 32 * 32


def sinusoidal_embedding(x: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """x: [B] float -> [B, dim] float32 features cos(x f_i), sin(x f_i), f_i geometric from 1 to 1/max_period."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=x.device, dtype=torch.float32) / half)
    args = x.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def sincos_pos_embed_2d(dim: int, grid: int) -> Tensor:
    """[grid * grid, dim] float32, tokens row-major: sin-cos of the column index in the first half of the features,
    of the row index in the second (MAE's ``get_2d_sincos_pos_embed``, which their generator uses)."""
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))
    rows, cols = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32), indexing="ij")

    def embed(pos: np.ndarray) -> np.ndarray:
        out = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return torch.from_numpy(np.concatenate([embed(cols), embed(rows)], axis=1)).float()


def rope_1d(length: int, head_dim: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Rotate-half RoPE tables for positions 0..length-1: cos, sin [length, head_dim] float32."""
    half = head_dim // 2
    freqs = 1.0 / ROPE_THETA ** (torch.arange(half, device=device, dtype=torch.float32) / half)
    angles = torch.outer(torch.arange(length, device=device, dtype=torch.float32), freqs)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: [B, H, T, hd]; cos, sin: [T, hd] -> x * cos + rotate_half(x) * sin, rotate_half(a, b) = (-b, a)."""
    a, b = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-b, a], dim=-1) * sin


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN: x [B, T, D] * (1 + scale [B, D]) + shift [B, D]."""
    return x * (1 + scale[:, None]) + shift[:, None]


def rms_norm(dim: int) -> nn.RMSNorm:
    return nn.RMSNorm(dim, eps=NORM_EPS)


def norm_in_float32(norm: nn.RMSNorm, x: Tensor) -> Tensor:
    """norm(x) in float32 whatever x's and the weight's dtypes: autocast, or bf16 weights under "bf16-true" (torch's
    fused norm wants both in one dtype)."""
    return F.rms_norm(x.float(), norm.normalized_shape, norm.weight.float(), norm.eps)


class Attention(nn.Module):
    """Multi-head self-attention: fused qkv, RMSNorm QK-norm per head, RoPE, scale head_dim^-1/2, output linear."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = rms_norm(dim // num_heads)
        self.k_norm = rms_norm(dim // num_heads)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        q, k, v = self.qkv(x).unflatten(-1, (3, self.num_heads, -1)).permute(2, 0, 3, 1, 4)  # 3 x [B, H, T, hd]
        q = apply_rope(norm_in_float32(self.q_norm, q), cos, sin).to(v.dtype)  # QK-norm and RoPE in float32
        k = apply_rope(norm_in_float32(self.k_norm, k), cos, sin).to(v.dtype)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).flatten(2))


class SwiGLU(nn.Module):
    """w2(silu(w1 x) * w3 x), every linear with a bias."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden)
        self.w3 = nn.Linear(dim, hidden)
        self.w2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class DiTBlock(nn.Module):
    """Pre-norm transformer block with adaLN-zero: shift, scale and gate of both branches come from c."""

    def __init__(self, dim: int, num_heads: int, mlp_hidden: int, cond_dim: int) -> None:
        super().__init__()
        self.norm1 = rms_norm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = rms_norm(dim)
        self.mlp = SwiGLU(dim, mlp_hidden)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 6 * dim))

    def forward(self, x: Tensor, c: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(c).chunk(6, dim=-1)
        x = x + gate1[:, None] * self.attn(modulate(self.norm1(x), shift1, scale1), cos, sin)
        return x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))


class FinalLayer(nn.Module):
    """adaLN-modulated RMSNorm then a linear map to (p, p, C)-ordered patch pixels."""

    def __init__(self, dim: int, out_dim: int, cond_dim: int) -> None:
        super().__init__()
        self.norm = rms_norm(dim)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 2 * dim))
        self.linear = nn.Linear(dim, out_dim)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.ada(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))


class DiT(Generator):
    """The authors' generator: noise [B, C, H, W] (+ labels, alpha, style) -> sample [B, C, H, W].

    Argument rule: ``preset`` (a key of ``DIT_PRESETS``, default "B/2") gives every architecture argument
    (input_size ... num_classes); each of those passed explicitly (not None) overrides the preset, so
    ``DiT("tiny", num_classes=0)`` is the unconditional tiny model. ``cond_dim`` (None: hidden_size) is the width of
    the condition vector. The resolved arguments are in ``self.config``.

    ``gradient_checkpointing`` recomputes each block in the backward pass while training. ``init_output_std``: 0 is
    the authors' zero-initialised output layer (every sample starts at exactly 0, whatever the noise); s > 0 draws
    the output layer so that initial samples have std about s and already depend on the noise.
    """

    def __init__(
        self,
        preset: str = "B/2",
        input_size: int | None = None,
        in_channels: int | None = None,
        patch_size: int | None = None,
        hidden_size: int | None = None,
        depth: int | None = None,
        num_heads: int | None = None,
        mlp_ratio: float | None = None,
        num_classes: int | None = None,
        cond_dim: int | None = None,
        num_style_tokens: int = 32,
        style_codebook_size: int = 64,
        num_context_tokens: int = 16,
        gradient_checkpointing: bool = False,
        init_output_std: float = 0.0,
    ) -> None:
        super().__init__()
        if init_output_std < 0:
            raise ValueError(f"init_output_std must be >= 0, got {init_output_std}")
        if preset not in DIT_PRESETS:
            raise ValueError(f"unknown DiT preset {preset!r}; valid presets: {', '.join(DIT_PRESETS)}")
        given = (input_size, in_channels, patch_size, hidden_size, depth, num_heads, mlp_ratio, num_classes)
        cfg = {**DIT_PRESETS[preset], **{k: v for k, v in zip(_ARCH, given, strict=True) if v is not None}}
        size, chans, p, dim, heads = (cfg[k] for k in ("input_size", "in_channels", "patch_size", "hidden_size",
                                                       "num_heads"))  # fmt: skip
        for key in ("input_size", "in_channels", "patch_size", "hidden_size", "num_heads", "mlp_ratio"):
            if not cfg[key] > 0:
                raise ValueError(f"{key} must be > 0, got {cfg[key]}")
        if cfg["depth"] < 0:  # 0 blocks: each patch token alone (a test of the layout)
            raise ValueError(f"depth must be >= 0, got {cfg['depth']}")
        cond_dim = dim if cond_dim is None else cond_dim
        if size % p != 0:
            raise ValueError(f"input_size={size} is not divisible by patch_size={p}")
        if dim % heads != 0 or (dim // heads) % 2 != 0:
            raise ValueError(
                f"hidden_size={dim} / num_heads={heads} must be an even integer head size (RoPE rotates halves)"
            )
        if min(num_style_tokens, num_context_tokens, cfg["num_classes"]) < 0 or min(style_codebook_size, cond_dim) < 1:
            raise ValueError(
                "num_classes, num_style_tokens, num_context_tokens must be >= 0 and style_codebook_size, cond_dim "
                f">= 1, got {cfg['num_classes']}, {num_style_tokens}, {num_context_tokens}, {style_codebook_size}, "
                f"{cond_dim}"
            )
        self.config = dict(
            preset=preset,
            **cfg,
            cond_dim=cond_dim,
            num_style_tokens=num_style_tokens,
            style_codebook_size=style_codebook_size,
            num_context_tokens=num_context_tokens,
        )
        self.sample_shape = self.noise_shape = (chans, size, size)
        self.num_classes = cfg["num_classes"]
        self.patch_size, self.grid, self.num_heads = p, size // p, heads
        self.num_style_tokens, self.style_codebook_size = num_style_tokens, style_codebook_size
        self.gradient_checkpointing = gradient_checkpointing
        self.init_output_std = init_output_std

        self.class_embed = nn.Embedding(self.num_classes, cond_dim) if self.num_classes > 0 else None
        # Style tables, flattened: token t, entry j -> row t * style_codebook_size + j.
        self.style_embed = nn.Embedding(num_style_tokens * style_codebook_size, cond_dim) if num_style_tokens else None
        self.alpha_embed = nn.Sequential(nn.Linear(ALPHA_FREQ_DIM, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim))
        self.alpha_norm = rms_norm(cond_dim)
        self.patch_embed = nn.Linear(p * p * chans, dim)
        self.pos_embed = nn.Parameter(torch.empty(self.grid**2, dim))
        self.context_proj = nn.Linear(cond_dim, dim) if num_context_tokens else None
        self.context_tokens = nn.Parameter(torch.empty(num_context_tokens, dim)) if num_context_tokens else None
        hidden = swiglu_hidden_size(dim, cfg["mlp_ratio"])
        self.blocks = nn.ModuleList(DiTBlock(dim, heads, hidden, cond_dim) for _ in range(cfg["depth"]))
        self.final = FinalLayer(dim, p * p * chans, cond_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Their initialisation: Xavier-uniform linears with zero biases, N(0, 0.02) embeddings, context vectors and
        alpha-MLP weights, unit norm weights, 2-D sin-cos positions, zero adaLN and output layers (adaLN-zero)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.RMSNorm):
                nn.init.ones_(m.weight)
        for p in (self.class_embed, self.style_embed, self.alpha_embed[0], self.alpha_embed[2]):
            if p is not None:
                nn.init.normal_(p.weight, std=0.02)
        if self.context_tokens is not None:
            nn.init.normal_(self.context_tokens, std=0.02)
        if self.pos_embed.device.type != "meta":
            with torch.no_grad():
                self.pos_embed.copy_(sincos_pos_embed_2d(self.pos_embed.shape[1], self.grid))
        for layer in [b.ada[-1] for b in self.blocks] + [self.final.ada[-1], self.final.linear]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        if self.init_output_std > 0:
            # The final norm gives unit-RMS features, so a weight std of s / sqrt(D) gives outputs of std about s.
            nn.init.normal_(self.final.linear.weight, std=self.init_output_std / self.final.linear.in_features**0.5)

    def draw_inputs(
        self, n: int, device: torch.device | str | None = None, generator: torch.Generator | None = None
    ) -> dict[str, Tensor]:
        """``{"noise": [n, C, H, W] Gaussian, "style": [n, num_style_tokens] long in [0, style_codebook_size)}``.

        Noise is drawn first (the same as ``Generator.draw_inputs`` for the same generator state), then style.
        Without style tokens the "style" key is absent.
        """
        inputs = super().draw_inputs(n, device, generator)
        if self.num_style_tokens:
            inputs["style"] = torch.randint(
                self.style_codebook_size, (n, self.num_style_tokens), device=inputs["noise"].device, generator=generator
            )
        return inputs

    def condition(
        self, n: int, labels: Tensor | None, alpha: Tensor | float | None, style: Tensor | None, device: torch.device
    ) -> Tensor:
        """The condition vector c: [n, cond_dim] = class + style + alpha embeddings (see the module docstring)."""
        alpha = torch.as_tensor(1.0 if alpha is None else alpha, dtype=torch.float32, device=device)
        if alpha.dim() > 1 or alpha.numel() not in (1, n):
            raise ValueError(f"alpha must be a scalar or of shape [{n}], got shape {tuple(alpha.shape)}")
        # the parameters' dtype: float32 under autocast, bf16 or float64 under "-true" precisions
        dtype = self.alpha_embed[0].weight.dtype
        features = sinusoidal_embedding(alpha.expand(n), ALPHA_FREQ_DIM).to(dtype)
        c = ALPHA_EMBED_SCALE * norm_in_float32(self.alpha_norm, self.alpha_embed(features))
        if self.class_embed is not None:
            if labels is None or labels.shape != (n,):
                got = None if labels is None else tuple(labels.shape)
                raise ValueError(
                    f"a conditional DiT (num_classes={self.num_classes}) needs labels of shape [{n}], "
                    f"got {got}; use num_classes=0 for an unconditional model"
                )
            c = c + self.class_embed(labels)
        if self.style_embed is not None:
            if style is None:
                style = torch.zeros(n, self.num_style_tokens, dtype=torch.long, device=device)
            if style.shape != (n, self.num_style_tokens):
                raise ValueError(f"style must have shape [{n}, {self.num_style_tokens}], got {tuple(style.shape)}")
            offsets = torch.arange(self.num_style_tokens, device=device) * self.style_codebook_size
            c = c + self.style_embed(style + offsets).sum(dim=1)
        return c.to(dtype)

    def forward(
        self,
        noise: Tensor,
        labels: Tensor | None = None,
        alpha: Tensor | float | None = None,
        style: Tensor | None = None,
    ) -> Tensor:
        """noise: [B, C, H, W]; labels: [B] long (ignored when num_classes = 0); alpha: [B], scalar or None (1.0);
        style: [B, num_style_tokens] long or None (index 0 everywhere) -> [B, C, H, W]."""
        if noise.dim() != 4 or tuple(noise.shape[1:]) != self.noise_shape:
            raise ValueError(
                f"noise must have shape [B, {', '.join(map(str, self.noise_shape))}], got {tuple(noise.shape)}"
            )
        n, p, g = noise.shape[0], self.patch_size, self.grid
        noise = noise.to(self.patch_embed.weight.dtype)  # float32 noise into a bf16 or float64 ("-true") model
        c = self.condition(n, labels, alpha, style, noise.device)
        patches = noise.reshape(n, -1, g, p, g, p).permute(0, 2, 4, 3, 5, 1).reshape(n, g * g, -1)  # (p, p, C) order
        x = self.patch_embed(patches) + self.pos_embed
        k = 0 if self.context_tokens is None else self.context_tokens.shape[0]
        if k:
            x = torch.cat([(self.context_proj(c)[:, None] + self.context_tokens).to(x.dtype), x], dim=1)
        cos, sin = rope_1d(x.shape[1], x.shape[-1] // self.num_heads, noise.device)
        for block in self.blocks:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, c, cos, sin, use_reentrant=False)
            else:
                x = block(x, c, cos, sin)
        x = self.final(x[:, k:], c)  # [B, g*g, p*p*C]
        x = x.reshape(n, g, g, p, p, -1).permute(0, 5, 1, 3, 2, 4)  # [B, C, g, p, g, p]
        return x.reshape(n, -1, g * p, g * p)
