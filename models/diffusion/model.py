"""cDDPM: UNet + optional image encoder + cosine schedule + simplex noise, as one module whose weights are saved.

Images are in [0, 1] at this module's boundary (``training_loss``, ``reconstruct``) and in [-1, 1] inside
(``encode``, ``predict_x0``, ``predict_x0_encoded``). Randomness always comes from an explicit
``torch.Generator`` so that a seed reproduces a loss or a reconstruction exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from models.diffusion.config import ModelConfig
from models.diffusion.encoder import ImageEncoder
from models.diffusion.schedule import CosineSchedule
from models.diffusion.simplex import simplex_noise
from models.diffusion.unet import UNet


class DiffusionModel(nn.Module):
    """UNet + optional image encoder + cosine schedule + noise; images in [0,1] outside, [-1,1] inside."""

    config: ModelConfig

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = ImageEncoder(config.encoder) if config.encoder is not None else None
        self.unet = UNet(config.unet, cond_dim=config.encoder.out_dim if config.encoder is not None else 0)
        self.schedule = CosineSchedule(config.diffusion.timesteps)

    @property
    def conditioned(self) -> bool:
        """Whether an image encoder steers the UNet (cDDPM) or not (the plain DDPM baseline)."""
        return self.encoder is not None

    def encode(self, condition: Tensor | None) -> Tensor | None:
        """Condition vector of the clean slice (B,1,H,W) in [-1,1]; None for an unconditioned model.

        Separate from the UNet call so that one encoding serves every noise level of a reconstruction.
        """
        if self.encoder is None:
            if condition is not None:
                raise ValueError("this model is unconditioned: condition must be None")
            return None
        if condition is None:
            raise ValueError("this model is conditioned: pass the clean slice as condition")
        return self.encoder(condition)

    def predict_x0(self, x_t: Tensor, t: Tensor, condition: Tensor | None) -> Tensor:
        """x0 estimate from x_t at timesteps t (B,), conditioned on the clean slice ``condition``; all in [-1,1]."""
        return self.predict_x0_encoded(x_t, t, self.encode(condition))

    def predict_x0_encoded(self, x_t: Tensor, t: Tensor, code: Tensor | None) -> Tensor:
        """As ``predict_x0`` but from an already computed condition vector (``encode``), or None if unconditioned."""
        return self.unet(x_t, t, code)

    def noise(self, shape: tuple[int, ...], generator: torch.Generator) -> Tensor:
        """Unit-variance forward-process noise (simplex or Gaussian per config) on the generator's device, float32."""
        spec = self.config.diffusion.noise
        if spec.kind == "gaussian":
            return torch.randn(shape, generator=generator, device=generator.device)
        if len(shape) != 4:
            raise ValueError(f"simplex noise needs a (B, C, H, W) shape, got {shape}")
        b, c, h, w = shape
        return simplex_noise((b, c, h, w), generator, spec.octaves, spec.persistence, spec.frequency)

    def training_loss(self, x0: Tensor, generator: torch.Generator, max_timestep: int | None = None) -> Tensor:
        """Mean L1 between predicted and true x0 (in [-1,1]) for x0 (B,1,H,W) in [0,1], t ~ U{0..max_timestep-1}.

        ``max_timestep`` (default T) lets training skip noise levels inference never uses: the one-shot
        reconstruction only needs t up to the largest ensemble level. t and the noise are drawn from
        ``generator`` on its own device and then moved to x0's device.
        """
        high = self.schedule.timesteps if max_timestep is None else max_timestep
        if not 0 < high <= self.schedule.timesteps:
            raise ValueError(f"max_timestep must be in (0, {self.schedule.timesteps}], got {max_timestep}")
        t = torch.randint(0, high, (x0.shape[0],), generator=generator, device=generator.device)
        return self.loss_at(x0, t.to(x0.device), generator)

    def loss_at(self, x0: Tensor, t: Tensor, generator: torch.Generator) -> Tensor:
        """Mean L1 of the x0 prediction at the given timesteps t (B,): what validation tracks per ensemble level."""
        x = 2 * x0 - 1
        noise = self.noise(tuple(x.shape), generator).to(device=x.device, dtype=x.dtype)
        x_t = self.schedule.q_sample(x, t, noise)
        prediction = self.predict_x0(x_t, t, x if self.conditioned else None)
        return (prediction.float() - x.float()).abs().mean()

    @torch.no_grad()
    def reconstruct(self, x: Tensor, generator: torch.Generator, timesteps: Sequence[int] | None = None) -> Tensor:
        """Healthy-looking reconstruction of x (B,1,H,W) in [0,1]: one x0 prediction per noise level, averaged.

        Not an iterative chain: for each t the input is noised to t and denoised in one pass (cDDPM inference).
        The encoder runs once per slice. Noise for each t is drawn in order from ``generator``. The caller
        chooses train/eval mode (dropout is 0 in the shipped configs).
        """
        steps = tuple(self.config.ensemble_timesteps if timesteps is None else timesteps)
        if not steps:
            raise ValueError("reconstruct needs at least one timestep")
        for t in steps:
            if not 0 <= t < self.schedule.timesteps:
                raise ValueError(f"timestep {t} outside [0, {self.schedule.timesteps})")
        clean = 2 * x - 1
        code = self.encode(clean if self.conditioned else None)
        total = torch.zeros_like(clean, dtype=torch.float32)
        for t in steps:
            tt = torch.full((clean.shape[0],), t, dtype=torch.long, device=clean.device)
            noise = self.noise(tuple(clean.shape), generator).to(device=clean.device, dtype=clean.dtype)
            total += self.predict_x0_encoded(self.schedule.q_sample(clean, tt, noise), tt, code).float()
        mean = (total / len(steps)).clamp_(-1.0, 1.0)
        return ((mean + 1) / 2).to(x.dtype)
