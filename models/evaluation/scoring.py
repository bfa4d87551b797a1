"""One volume on its own grid through a scorer, and its maps brought back to that grid.

The built-in evaluation works on the model grid (Colin27 lives there already). A dataset's images come on
their own grids with labels drawn there, so they are scored the way the node scores a series: preprocessed,
scored on the model grid, and the segmentation brought back through the registration as the node builds
its SEG (partial-volume fraction cut at one half). Metrics against a label are then measured on the label's
own grid, which is what a prediction file written next to it shows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from models.anomaly_map import anomaly_score, segment
from models.evaluation.baselines import Scorer
from models.preprocessing import Preprocessed, Preprocessor, mask_to_input_grid, to_input_grid, to_model_grid


@dataclass(frozen=True, eq=False)
class PreparedVolume:
    """A volume on the model grid with its label, ready for any number of scorers."""

    id: str
    prepared: Preprocessed
    truth: np.ndarray | None  # bool on the model grid: the label brought there as the image was (>= 0.5)
    label: sitk.Image | None  # uint8 {0, 1} on the image's own grid


@dataclass(frozen=True, eq=False)
class ScoredVolume:
    """A volume's post-processed score on the model grid, and what it takes to judge it on its own grid."""

    volume: PreparedVolume
    score: np.ndarray  # float32 on the model grid: the residual through ``anomaly_score``

    @property
    def prepared(self) -> Preprocessed:
        return self.volume.prepared


def prepare_volume(
    preprocessor: Preprocessor, image: sitk.Image, label: sitk.Image | None = None, id: str = ""
) -> PreparedVolume:
    """Preprocess ``image`` and bring ``label`` (on the image's grid) to the model grid the same way.

    Raises PreprocessingError when the image cannot be brought to the model grid.
    """
    prepared = preprocessor(image)
    truth = None
    if label is not None:
        truth = to_model_grid(sitk.Cast(label > 0, sitk.sitkFloat32), prepared, "linear") >= 0.5
    return PreparedVolume(id=id, prepared=prepared, truth=truth, label=label)


def score_volume(scorer: Scorer, volume: PreparedVolume) -> ScoredVolume:
    """The scorer's residual through the shared post-processing (as ``harness.case_score``)."""
    residual = scorer(volume.prepared.volume, volume.prepared.brain_mask)
    return ScoredVolume(volume, anomaly_score(np.asarray(residual, dtype=np.float32), volume.prepared.brain_mask))


def native_mask(scored: ScoredVolume, threshold: float) -> sitk.Image:
    """The segmentation at ``threshold`` on the image's own grid (uint8 {0, 1}), exactly as the node's SEG."""
    return mask_to_input_grid(segment(scored.score, threshold), scored.prepared)


def native_score(scored: ScoredVolume) -> sitk.Image:
    """The score map on the image's own grid (float32, 0 where the model grid does not reach)."""
    return to_input_grid(scored.score, scored.prepared, "linear")


def volume_ml(mask: sitk.Image) -> float:
    """The volume of a binary image in mL, from its own voxel size."""
    voxels = int(np.count_nonzero(sitk.GetArrayViewFromImage(mask)))
    return voxels * float(np.prod(mask.GetSpacing())) / 1000.0
