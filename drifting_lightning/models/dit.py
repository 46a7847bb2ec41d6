"""DiT-style one-step generator (PAPER.md section 7; paper A.2, Table 8).

A transformer over noise patches with SwiGLU MLPs, 2-D axial RoPE, RMSNorm, QK-norm, adaLN-zero modulation from
one condition vector and a zero-initialised output layer, so an untrained generator outputs exactly 0.

Condition vector c [B, D] = class embedding + guidance-scale embedding + style embedding:
- class: one learned vector per label (``num_classes = 0``: unconditional, no class table, labels ignored);
- guidance scale alpha: sinusoidal features of ``ALPHA_SCALE * alpha`` -> MLP (PAPER.md 5); alpha None means 1.0;
- style: ``num_style_tokens`` random indices, token t into its own ``style_codebook_size``-entry learned codebook;
  the picked embeddings are summed (PAPER.md 7). Style None means index 0 in every codebook.
``num_context_tokens`` in-context tokens (one projection of c, shared, plus a learned vector per token) are prepended
to the patch tokens and dropped at the output. RoPE rotates patch tokens by their (row, column) on the patch grid;
context tokens get no rotation, i.e. the rotation of position (0, 0): their learned vectors tell them apart.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from drifting_lightning.models.base import Generator

ALPHA_SCALE = 1000.0  # alpha in [1, 4] -> sinusoid argument in [1e3, 4e3], like DiT's timestep t in [0, 1000)
ALPHA_FREQ_DIM = 256
ROPE_THETA = 10000.0

_ARCH = ("input_size", "in_channels", "patch_size", "hidden_size", "depth", "num_heads", "mlp_ratio", "num_classes")


def _preset(*values: float) -> dict:
    return dict(zip(_ARCH, values, strict=True))


# Architecture presets, like DiT's DiT_models. Parameter counts with the default style/context settings:
# B/2 132.5M, L/2 461.4M (paper: 133M, 463M), B/16 133.6M, L/16 463.0M.
# Columns follow _ARCH: input_size, in_channels, patch_size, hidden_size, depth, num_heads, mlp_ratio, num_classes.
DIT_PRESETS: dict[str, dict] = {
    "B/2": _preset(32, 4, 2, 768, 12, 12, 4.0, 1000),  # ImageNet SD-VAE latents
    "L/2": _preset(32, 4, 2, 1024, 24, 16, 4.0, 1000),
    "B/16": _preset(256, 3, 16, 768, 12, 12, 4.0, 1000),  # ImageNet pixels
    "L/16": _preset(256, 3, 16, 1024, 24, 16, 4.0, 1000),
    # Small presets for CPU runs and tests.
    "digits": _preset(8, 1, 2, 128, 4, 2, 4.0, 10),
    "fashion": _preset(28, 1, 4, 192, 6, 3, 4.0, 10),
    "cifar": _preset(32, 3, 4, 256, 6, 4, 4.0, 10),
    "tiny": _preset(32, 4, 2, 64, 2, 2, 4.0, 10),
}


def swiglu_hidden_size(hidden_size: int, mlp_ratio: float) -> int:
    """SwiGLU width with the parameters of a GELU MLP of ratio ``mlp_ratio``: 2/3 * ratio * D, up to a multiple of 8."""
    return (int(2 * mlp_ratio * hidden_size / 3) + 7) // 8 * 8


def sinusoidal_embedding(x: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """x: [B] float -> [B, dim] float32 features cos(x f_i), sin(x f_i), f_i geometric from 1 to 1/max_period."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=x.device, dtype=torch.float32) / half)
    args = x.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def rope_2d(grid: int, head_dim: int, num_prefix: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Axial RoPE angles for ``num_prefix`` unrotated tokens then a grid x grid patch grid (row-major).

    Returns cos, sin: [num_prefix + grid^2, head_dim // 2] float32. The first half of the rotated pairs follow the
    row index, the second half the column index.
    """
    quarter = head_dim // 4
    freqs = ROPE_THETA ** (-torch.arange(quarter, device=device, dtype=torch.float32) / quarter)
    pos = torch.arange(grid, device=device, dtype=torch.float32)
    rows, cols = torch.meshgrid(pos, pos, indexing="ij")
    angles = torch.cat([rows.reshape(-1, 1) * freqs, cols.reshape(-1, 1) * freqs], dim=-1)
    angles = torch.cat([angles.new_zeros(num_prefix, 2 * quarter), angles], dim=0)
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: [B, H, T, hd]; cos, sin: [T, hd // 2]. Rotates the pairs (x[2i], x[2i+1])."""
    x0, x1 = x.unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN: x [B, T, D] * (1 + scale [B, D]) + shift [B, D]."""
    return x * (1 + scale[:, None]) + shift[:, None]


class Attention(nn.Module):
    """Multi-head self-attention with QK-norm (RMSNorm per head) and RoPE, via ``F.scaled_dot_product_attention``."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = nn.RMSNorm(dim // num_heads, eps=1e-6)
        self.k_norm = nn.RMSNorm(dim // num_heads, eps=1e-6)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        q, k, v = self.qkv(x).unflatten(-1, (3, self.num_heads, -1)).permute(2, 0, 3, 1, 4)  # 3 x [B, H, T, hd]
        q = apply_rope(self.q_norm(q.float()), cos, sin).to(v.dtype)  # QK-norm and RoPE in float32
        k = apply_rope(self.k_norm(k.float()), cos, sin).to(v.dtype)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).flatten(2))


class SwiGLU(nn.Module):
    """w3(silu(w1 x) * w2 x)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        a, b = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(a) * b)


class DiTBlock(nn.Module):
    """Pre-norm transformer block with adaLN-zero: shift, scale and gate of both branches come from c."""

    def __init__(self, dim: int, num_heads: int, mlp_hidden: int) -> None:
        super().__init__()
        self.norm1 = nn.RMSNorm(dim, eps=1e-6, elementwise_affine=False)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.RMSNorm(dim, eps=1e-6, elementwise_affine=False)
        self.mlp = SwiGLU(dim, mlp_hidden)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: Tensor, c: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(c).chunk(6, dim=-1)
        x = x + gate1[:, None] * self.attn(modulate(self.norm1(x), shift1, scale1), cos, sin)
        return x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))


class FinalLayer(nn.Module):
    """adaLN-modulated RMSNorm then a linear map to patch pixels; both linears zero-initialised."""

    def __init__(self, dim: int, out_dim: int) -> None:
        super().__init__()
        self.norm = nn.RMSNorm(dim, eps=1e-6, elementwise_affine=False)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.linear = nn.Linear(dim, out_dim)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.ada(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))


class DiT(Generator):
    """DiT-style one-step generator: noise [B, C, H, W] (+ labels, alpha, style) -> sample [B, C, H, W].

    Argument rule: ``preset`` (a key of ``DIT_PRESETS``, default "B/2") gives every architecture argument
    (input_size ... mlp_ratio, num_classes); each of those passed explicitly (not None) overrides the preset.
    So ``DiT("tiny", num_classes=0)`` is the unconditional tiny model. ``mlp_ratio`` sizes the SwiGLU hidden layer
    to match a GELU MLP of that ratio (``swiglu_hidden_size``). The resolved arguments are in ``self.config``.

    With the defaults (32 style tokens x 64 entries, 16 context tokens) B/2 has 132.5M parameters and L/2 461.4M
    (paper: 133M, 463M). ``gradient_checkpointing`` recomputes each block in the backward pass while training.
    ``init_output_std``: 0 is DiT's zero-initialised output layer (every sample starts at exactly 0, whatever the
    noise); s > 0 draws the output layer so that initial samples have std about s and already depend on the noise.
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
        size, chans, p, dim, heads = (
            cfg[k] for k in ("input_size", "in_channels", "patch_size", "hidden_size", "num_heads")
        )
        if size % p != 0:
            raise ValueError(f"input_size={size} is not divisible by patch_size={p}")
        if dim % heads != 0 or (dim // heads) % 4 != 0:
            raise ValueError(
                f"hidden_size={dim} / num_heads={heads} must be an integer head size divisible by 4 "
                "(2-D RoPE rotates pairs along two axes)"
            )
        if min(num_style_tokens, num_context_tokens, cfg["num_classes"]) < 0 or style_codebook_size < 1:
            raise ValueError(
                "num_classes, num_style_tokens, num_context_tokens must be >= 0 and "
                f"style_codebook_size >= 1, got {cfg['num_classes']}, {num_style_tokens}, "
                f"{num_context_tokens}, {style_codebook_size}"
            )
        self.config = dict(
            preset=preset,
            **cfg,
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

        self.patch_embed = nn.Conv2d(chans, dim, kernel_size=p, stride=p)
        self.class_embed = nn.Embedding(self.num_classes, dim) if self.num_classes > 0 else None
        self.alpha_embed = nn.Sequential(nn.Linear(ALPHA_FREQ_DIM, dim), nn.SiLU(), nn.Linear(dim, dim))
        # Style codebooks, flattened: token t, entry j -> row t * style_codebook_size + j.
        self.style_embed = nn.Embedding(num_style_tokens * style_codebook_size, dim) if num_style_tokens else None
        self.context_proj = nn.Linear(dim, dim) if num_context_tokens else None
        self.context_tokens = nn.Parameter(torch.zeros(num_context_tokens, dim)) if num_context_tokens else None
        hidden = swiglu_hidden_size(dim, cfg["mlp_ratio"])
        self.blocks = nn.ModuleList(DiTBlock(dim, heads, hidden) for _ in range(cfg["depth"]))
        self.final = FinalLayer(dim, p * p * chans)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """DiT initialisation: Xavier linears, N(0, 0.02) embeddings, zero adaLN and output layers (adaLN-zero)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.patch_embed.weight.view(self.patch_embed.weight.shape[0], -1))
        nn.init.zeros_(self.patch_embed.bias)
        for emb in (self.class_embed, self.style_embed):
            if emb is not None:
                nn.init.normal_(emb.weight, std=0.02)
        if self.context_tokens is not None:
            nn.init.normal_(self.context_tokens, std=0.02)
        for layer in (self.alpha_embed[0], self.alpha_embed[2]):
            nn.init.normal_(layer.weight, std=0.02)
        for ada in [b.ada[-1] for b in self.blocks] + [self.final.ada[-1], self.final.linear]:
            nn.init.zeros_(ada.weight)
            nn.init.zeros_(ada.bias)
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
        """The condition vector c: [n, D] = class + alpha + style embeddings (see the module docstring)."""
        alpha = torch.as_tensor(1.0 if alpha is None else alpha, dtype=torch.float32, device=device)
        if alpha.dim() > 1 or alpha.numel() not in (1, n):
            raise ValueError(f"alpha must be a scalar or of shape [{n}], got shape {tuple(alpha.shape)}")
        c = self.alpha_embed(sinusoidal_embedding(alpha.expand(n) * ALPHA_SCALE, ALPHA_FREQ_DIM))
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
        return c

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
        c = self.condition(n, labels, alpha, style, noise.device)
        x = self.patch_embed(noise).flatten(2).transpose(1, 2)  # [B, g*g, D]
        k = 0 if self.context_tokens is None else self.context_tokens.shape[0]
        if k:
            x = torch.cat([self.context_proj(c)[:, None] + self.context_tokens, x], dim=1)  # [B, k + g*g, D]
        cos, sin = rope_2d(g, x.shape[-1] // self.num_heads, k, noise.device)
        for block in self.blocks:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, c, cos, sin, use_reentrant=False)
            else:
                x = block(x, c, cos, sin)
        x = self.final(x[:, k:], c)  # [B, g*g, p*p*C]
        x = x.reshape(n, g, g, p, p, -1).permute(0, 5, 1, 3, 2, 4)  # [B, C, g, p, g, p]
        return x.reshape(n, -1, g * p, g * p)
