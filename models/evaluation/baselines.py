"""Trivial baselines that every model must beat; each gives a raw residual for ``anomaly_score``.

A ``Scorer`` maps (model-grid volume, brain mask) to a raw residual map of the same shape; the
harness applies the shared post-processing (eroded mask, median, threshold, components) to all.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

Scorer = Callable[[np.ndarray, np.ndarray], np.ndarray]


class AtlasMeanBaseline:
    """|x - the voxel-wise mean of the training brains|: a 'reconstruction' that ignores the input.

    Registration puts every brain in atlas space, so the mean healthy brain already predicts most of a
    new one; a model that cannot beat it has not learned anything about the subject.
    """

    def __init__(self, training_volumes: list[np.ndarray]) -> None:
        if not training_volumes:
            raise ValueError("the atlas-mean baseline needs at least one training volume")
        self.mean = np.mean(np.stack([np.asarray(v, dtype=np.float32) for v in training_volumes]), axis=0)

    def __call__(self, volume: np.ndarray, brain_mask: np.ndarray) -> np.ndarray:
        if volume.shape != self.mean.shape:
            raise ValueError(f"volume {volume.shape} is not on the training grid {self.mean.shape}")
        return np.abs(np.asarray(volume, dtype=np.float32) - self.mean)


def intensity_baseline(volume: np.ndarray, brain_mask: np.ndarray) -> np.ndarray:
    """The paper's 'intensity threshold' baseline: the intensity itself is the score.

    It finds hyperintense lesions only (on T1 that is our 'bright' kind; on FLAIR/T2, where the paper
    used it, most lesions); dark lesions score *below* healthy tissue and are never found.
    """
    return np.where(brain_mask, np.asarray(volume, dtype=np.float32), np.float32(0))
