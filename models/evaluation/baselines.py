"""Trivial baselines that every model must beat; each gives a raw residual for ``anomaly_score``.

A ``Scorer`` maps (model-grid volume, brain mask) to a raw residual map of the same shape; the
harness applies the shared post-processing (eroded mask, median, threshold, components) to all.

The atlas-mean baseline of a model is built here, in one place, for the built-in evaluation and for
``evaluate --dataset``: the mean of the model's training brains *acquired in its contrast* (the knowledge a
model trained on them could have), scaled with its preprocessing version; where none was acquired in that
contrast (FLAIR from the offline brains) the training brains' tissue painted at the evaluation's fixed
mid-range class means, without texture (the average of many textured brains), then scaled the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from models.data.volumes import TrainingVolume, healthy_volumes
from models.evaluation.painting import paint_tissue
from models.preprocessing.intensity import normalise

if TYPE_CHECKING:
    from models.checkpoint import Checkpoint

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


def atlas_mean_baseline(volumes: list[TrainingVolume], contrast: str, version: str) -> tuple[str, AtlasMeanBaseline]:
    """(method name, baseline) for a model of ``contrast`` and preprocessing ``version`` trained on ``volumes``.

    The volumes acquired in ``contrast`` when there are any (they must carry ``version``'s scaling: ValueError
    otherwise); else every volume with tissue maps, painted in ``contrast`` and scaled.
    """
    acquired = [v for v in volumes if v.contrast == contrast]
    if acquired:
        stale = sorted({v.scaling for v in acquired} - {version})
        if stale:
            raise ValueError(f"training volumes scaled with version(s) {', '.join(stale)}, the model has {version}")
        return f"atlas-mean ({len(acquired)} training brains)", AtlasMeanBaseline([v.volume for v in acquired])
    painted = [
        normalise(paint_tissue(v.tissue, contrast, texture=False), v.brain_mask, version, contrast)
        for v in volumes
        if v.tissue is not None
    ]
    if not painted:
        raise ValueError(f"no training volume acquired in {contrast} and none with tissue maps to paint one")
    return f"atlas-mean ({len(painted)} training brains painted as {contrast})", AtlasMeanBaseline(painted)


def training_atlas_mean(checkpoint: Checkpoint, data: str, cache_dir: Path) -> tuple[str, AtlasMeanBaseline]:
    """The atlas-mean baseline of ``checkpoint`` from its training data ``data`` ("offline" or a folder)."""
    volumes = healthy_volumes(data, cache_dir, checkpoint.contrast, checkpoint.preprocessing_version)
    return atlas_mean_baseline(volumes, checkpoint.contrast, checkpoint.preprocessing_version)


def intensity_baseline(volume: np.ndarray, brain_mask: np.ndarray) -> np.ndarray:
    """The paper's 'intensity threshold' baseline: the intensity itself is the score.

    It finds hyperintense lesions only (on T1 that is our 'bright' kind; on FLAIR/T2, where the paper
    used it, most lesions); dark lesions score *below* healthy tissue and are never found.
    """
    return np.where(brain_mask, np.asarray(volume, dtype=np.float32), np.float32(0))
