"""Training the diffusion model on healthy slices: ``train(config, data, options, out, stop, ...)``."""

from models.training.trainer import StopAt, TrainingOptions, train

__all__ = ["StopAt", "TrainingOptions", "train"]
