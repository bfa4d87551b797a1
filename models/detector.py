"""Volume in, anomaly map out: the seam between ``models`` and the node.

``AnomalyDetector`` holds a checkpoint's EMA weights on the best device and turns a preprocessed
volume (model grid, [0, 1]) into a reconstruction of healthy anatomy, the post-processed anomaly
score and a segmentation at the checkpoint's calibrated threshold. The node maps those back onto
the input's grid with ``models.preprocessing.to_input_grid``.

Only slices holding brain are reconstructed (the rest cannot hold a finding), in batches of
``batch_size`` slices to bound memory; the noise comes from a generator seeded per call, so the
same volume always gives the same map.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from models.anomaly_map import anomaly_score, segment
from models.checkpoint import Checkpoint, CheckpointError, load_checkpoint
from models.diffusion.model import DiffusionModel
from models.precision import Precision, autocast, autocast_dtype, default_device


@dataclass(frozen=True, eq=False)
class AnomalyResult:
    """Model-grid maps, (z, y, x) = (50, 96, 96)."""

    reconstruction: np.ndarray  # float32 in [0, 1]
    score: np.ndarray  # float32 anomaly score (|x - x_hat|, median filtered, 0 outside the eroded brain mask)
    mask: np.ndarray  # bool: score above the threshold, small components removed
    threshold: float
    seconds: float  # reconstruction wall time


class AnomalyDetector:
    def __init__(
        self,
        checkpoint: Checkpoint,
        device: torch.device | None = None,
        precision: Precision = "auto",
        seed: int = 0,
        batch_size: int = 32,
        timesteps: Sequence[int] | None = None,
    ) -> None:
        """``timesteps`` overrides the checkpoint's noise ensemble (for ablations); None keeps it."""
        self.checkpoint = checkpoint
        self.device = device or default_device()
        self.model = DiffusionModel(checkpoint.config)
        self.model.load_state_dict(checkpoint.ema_weights)
        self.model.to(self.device).eval().requires_grad_(False)
        self._dtype = autocast_dtype(self.device, precision)
        self._seed = seed
        self._batch_size = batch_size
        self.timesteps = tuple(timesteps or checkpoint.config.ensemble_timesteps)

    @classmethod
    def from_file(cls, path: Path, **kwargs: object) -> AnomalyDetector:
        return cls(load_checkpoint(path), **kwargs)  # type: ignore[arg-type]

    @property
    def version(self) -> str:
        """The checkpoint's content hash, short: what the DICOM objects name as the algorithm version."""
        return self.checkpoint.content_hash[:12]

    def reconstruct(self, volume: np.ndarray, brain_mask: np.ndarray) -> np.ndarray:
        """The healthy-looking reconstruction of every slice that holds brain (other slices: the input)."""
        reconstruction = volume.astype(np.float32, copy=True)
        slices = np.flatnonzero(brain_mask.reshape(len(brain_mask), -1).any(axis=1))
        generator = torch.Generator(self.device).manual_seed(self._seed)
        for start in range(0, len(slices), self._batch_size):
            chosen = slices[start : start + self._batch_size]
            batch = torch.from_numpy(volume[chosen]).float().unsqueeze(1).to(self.device)
            with autocast(self.device, self._dtype):
                output = self.model.reconstruct(batch, generator, self.timesteps)
            reconstruction[chosen] = output.float().squeeze(1).cpu().numpy()
        return reconstruction

    def residual(self, volume: np.ndarray, brain_mask: np.ndarray) -> np.ndarray:
        """|x - x_hat| before post-processing: the scorer the evaluation harness compares with baselines."""
        return np.abs(volume - self.reconstruct(volume, brain_mask)) * brain_mask

    def analyse(self, volume: np.ndarray, brain_mask: np.ndarray, threshold: float | None = None) -> AnomalyResult:
        """Reconstruction, score and segmentation; ``threshold`` defaults to the checkpoint's calibrated one."""
        threshold = self.checkpoint.threshold if threshold is None else threshold
        if threshold is None:
            raise CheckpointError("the checkpoint has no calibrated threshold; run `uad-node evaluate --ship`")
        started = time.perf_counter()
        reconstruction = self.reconstruct(volume, brain_mask)
        seconds = time.perf_counter() - started
        score = anomaly_score(np.abs(volume - reconstruction) * brain_mask, brain_mask)
        return AnomalyResult(
            reconstruction=reconstruction,
            score=score,
            mask=segment(score, threshold),
            threshold=threshold,
            seconds=seconds,
        )
