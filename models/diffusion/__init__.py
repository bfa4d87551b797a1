"""Conditioned diffusion model (cDDPM, Behrendt et al. 2025): configs, noise, networks and the model wrapper.

``DiffusionModel(named_config("default"))`` builds a model; ``training_loss`` trains it and ``reconstruct`` gives
the healthy-looking reconstruction whose difference from the input is the anomaly map.
"""

from models.diffusion.config import (
    CONFIGS,
    DiffusionConfig,
    EncoderConfig,
    ModelConfig,
    NoiseConfig,
    UNetConfig,
    named_config,
    unconditioned,
)
from models.diffusion.encoder import ImageEncoder
from models.diffusion.model import DiffusionModel
from models.diffusion.schedule import CosineSchedule
from models.diffusion.simplex import simplex_noise
from models.diffusion.unet import UNet

__all__ = [
    "CONFIGS",
    "CosineSchedule",
    "DiffusionConfig",
    "DiffusionModel",
    "EncoderConfig",
    "ImageEncoder",
    "ModelConfig",
    "NoiseConfig",
    "UNet",
    "UNetConfig",
    "named_config",
    "simplex_noise",
    "unconditioned",
]
