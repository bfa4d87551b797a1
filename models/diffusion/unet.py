"""Guided-diffusion style 2D UNet (Dhariwal & Nichol 2021) with an optional condition vector, 1 channel in and out.

The condition (the image encoder's code of the clean slice) goes through an MLP and is concatenated with the time
embedding; every res block gets scale and shift (FiLM) from that joint vector. That is how cDDPM steers the
reconstruction towards the patient's own anatomy while the noise hides the anomaly.

GroupNorm uses ``gcd(32, channels)`` groups: 32 groups as in guided diffusion whenever the width allows, otherwise
the largest power-of-two divisor, so tiny test models (8 or 16 channels) build without special cases.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.diffusion.config import UNetConfig

NORM_GROUPS = 32
MAX_PERIOD = 10000.0  # longest wavelength of the sinusoidal timestep embedding, as in the Transformer


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with gcd(32, channels) groups (see the module docstring)."""
    return nn.GroupNorm(math.gcd(NORM_GROUPS, channels), channels)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero a layer's parameters so a residual branch starts as the identity (stable early training)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def timestep_embedding(t: Tensor, dim: int) -> Tensor:
    """Sinusoidal features of integer timesteps (B,) -> (B, dim) in float32, cos half then sin half."""
    half = dim // 2
    freqs = torch.exp(-math.log(MAX_PERIOD) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class ResBlock(nn.Module):
    """Two 3x3 convs; the embedding sets scale and shift of the second norm (FiLM), the output conv starts at zero."""

    def __init__(self, in_channels: int, out_channels: int, emb_dim: int, dropout: float) -> None:
        super().__init__()
        self.in_layers = nn.Sequential(
            group_norm(in_channels), nn.SiLU(), nn.Conv2d(in_channels, out_channels, 3, 1, 1)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, 2 * out_channels))
        self.out_norm = group_norm(out_channels)
        self.out_layers = nn.Sequential(
            nn.SiLU(), nn.Dropout(dropout), zero_module(nn.Conv2d(out_channels, out_channels, 3, 1, 1))
        )
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.in_layers(x)
        scale, shift = self.emb_layers(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.out_norm(h) * (1 + scale) + shift
        return self.skip(x) + self.out_layers(h)


class AttentionBlock(nn.Module):
    """Multi-head self-attention over all positions of a feature map, residual, output projection starts at zero."""

    def __init__(self, channels: int, head_channels: int) -> None:
        super().__init__()
        if channels % head_channels and channels > head_channels:
            raise ValueError(f"{channels} channels do not split into heads of {head_channels}")
        self.heads = max(1, channels // head_channels)
        self.norm = group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = zero_module(nn.Conv2d(channels, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w)
        q, k, v = qkv.transpose(-1, -2).unbind(dim=1)  # each (B, heads, HW, head_dim)
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(-1, -2).reshape(b, c, h, w)
        return x + self.proj(out)


class Downsample(nn.Module):
    """Halve the resolution with a strided 3x3 conv (learned, as in guided diffusion)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 2, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Double the resolution: nearest neighbour then 3x3 conv (no checkerboard artefacts of transposed convs)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One step of the encoder or decoder path: a res block, optionally followed by attention."""

    def __init__(self, res: ResBlock, attention: AttentionBlock | None) -> None:
        super().__init__()
        self.res = res
        self.attention = attention

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        x = self.res(x, emb)
        return self.attention(x) if self.attention is not None else x


class UNet(nn.Module):
    """x_t (B,1,H,W), t (B,) and an optional condition vector (B, cond_dim) -> a 1-channel prediction (here x0)."""

    def __init__(self, config: UNetConfig, cond_dim: int = 0) -> None:
        super().__init__()
        self.config = config
        self.cond_dim = cond_dim
        base = config.base_channels
        time_dim = 4 * base
        self.time_embed = nn.Sequential(nn.Linear(base, time_dim), nn.SiLU(), nn.Linear(time_dim, time_dim))
        self.cond_embed = (
            nn.Sequential(nn.Linear(cond_dim, time_dim), nn.SiLU(), nn.Linear(time_dim, time_dim)) if cond_dim else None
        )
        emb_dim = 2 * time_dim if cond_dim else time_dim

        def level(cin: int, cout: int, size: int) -> _Level:
            attention = AttentionBlock(cout, config.head_channels) if size in config.attention_resolutions else None
            return _Level(ResBlock(cin, cout, emb_dim, config.dropout), attention)

        self.input_conv = nn.Conv2d(1, base, 3, 1, 1)
        self.down = nn.ModuleList()
        skips = [base]
        channels, size = base, config.image_size
        last = len(config.channel_multipliers) - 1
        for index, mult in enumerate(config.channel_multipliers):
            for _ in range(config.res_blocks):
                self.down.append(level(channels, mult * base, size))
                channels = mult * base
                skips.append(channels)
            if index != last:
                self.down.append(Downsample(channels))
                skips.append(channels)
                size //= 2

        self.middle = nn.ModuleList(
            [
                ResBlock(channels, channels, emb_dim, config.dropout),
                AttentionBlock(channels, config.head_channels),
                ResBlock(channels, channels, emb_dim, config.dropout),
            ]
        )

        self.up = nn.ModuleList()
        for index, mult in reversed(list(enumerate(config.channel_multipliers))):
            for block in range(config.res_blocks + 1):
                self.up.append(level(channels + skips.pop(), mult * base, size))
                channels = mult * base
                if index != 0 and block == config.res_blocks:
                    self.up.append(Upsample(channels))
                    size *= 2

        self.out = nn.Sequential(group_norm(channels), nn.SiLU(), zero_module(nn.Conv2d(channels, 1, 3, 1, 1)))

    def forward(self, x: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        """Predict from x (B,1,H,W) at timesteps t (B,); ``cond`` (B, cond_dim) is required iff cond_dim > 0."""
        emb = self.time_embed(timestep_embedding(t, self.config.base_channels).to(self.time_embed[0].weight.dtype))
        if self.cond_embed is not None:
            if cond is None:
                raise ValueError("this UNet is conditioned: pass the condition vector")
            emb = torch.cat([emb, self.cond_embed(cond)], dim=1)
        elif cond is not None:
            raise ValueError("this UNet is unconditioned: cond must be None")

        h = self.input_conv(x)
        skips = [h]
        for module in self.down:
            h = module(h, emb) if isinstance(module, _Level) else module(h)
            skips.append(h)
        h = self.middle[0](h, emb)
        h = self.middle[1](h)
        h = self.middle[2](h, emb)
        for module in self.up:
            if isinstance(module, _Level):
                h = module(torch.cat([h, skips.pop()], dim=1), emb)
            else:
                h = module(h)
        return self.out(h)
