"""Cosine noise schedule (Nichol & Dhariwal 2021): how much signal survives at each step of the forward process.

``CosineSchedule`` is an ``nn.Module`` whose tensors are non-persistent buffers: they follow ``.to(device)`` with the
model that owns the schedule, yet stay out of the state dict because they are a pure function of ``timesteps``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

COSINE_OFFSET = 0.008  # s in Nichol & Dhariwal: keeps beta_0 from being vanishingly small
MAX_BETA = 0.999  # clip so the last steps do not divide by ~0


def cosine_alpha_bar(timesteps: int, offset: float = COSINE_OFFSET, max_beta: float = MAX_BETA) -> Tensor:
    """alpha_bar[t] for t in [0, T) in float64: index t is the state after t+1 noising steps, as in guided diffusion."""
    steps = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
    f = torch.cos((steps + offset) / (1 + offset) * math.pi / 2) ** 2
    betas = (1 - f[1:] / f[:-1]).clamp(max=max_beta)
    return torch.cumprod(1 - betas, dim=0)


class CosineSchedule(nn.Module):
    """alpha_bar for T steps, and q(x_t | x_0) with any zero-mean, unit-variance noise (Gaussian or simplex)."""

    alpha_bar: Tensor
    sqrt_alpha_bar: Tensor
    sqrt_one_minus_alpha_bar: Tensor

    def __init__(self, timesteps: int) -> None:
        super().__init__()
        if timesteps < 2:
            raise ValueError(f"a schedule needs at least 2 timesteps, got {timesteps}")
        self.timesteps = timesteps
        alpha_bar = cosine_alpha_bar(timesteps)
        # float32 buffers: float64 is unsupported on some accelerators and float32 is ample for these factors.
        self.register_buffer("alpha_bar", alpha_bar.float(), persistent=False)
        self.register_buffer("sqrt_alpha_bar", alpha_bar.sqrt().float(), persistent=False)
        self.register_buffer("sqrt_one_minus_alpha_bar", (1 - alpha_bar).sqrt().float(), persistent=False)

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """sqrt(ab[t])·x0 + sqrt(1-ab[t])·noise with one t per sample, broadcast over the remaining dimensions."""
        if t.ndim != 1 or t.shape[0] != x0.shape[0]:
            raise ValueError(f"t must have shape ({x0.shape[0]},), got {tuple(t.shape)}")
        t = t.to(self.alpha_bar.device)
        view = (-1,) + (1,) * (x0.ndim - 1)
        signal = self.sqrt_alpha_bar[t].to(x0.device).view(view)
        spread = self.sqrt_one_minus_alpha_bar[t].to(x0.device).view(view)
        return signal * x0 + spread * noise
