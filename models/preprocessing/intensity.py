"""Intensity scaling inside the brain: MR intensities have no absolute unit.

Two versions, because checkpoints are tied to the scaling they were trained with:

- version 1 (the first shipped T1 model): the brain's 1st/99th percentiles to 0/1, clipped. Anything
  brighter than the 99th percentile (on T1 that is white matter) becomes 1.0: a bright lesion is clipped
  to the level of white matter and its contrast is lost.
- version 2: the brain's median to the contrast's ``MEDIAN_LEVEL`` and a floor ``LOW_MARGIN`` of the
  median's distance below the 1st percentile to 0, linear up to ``KNEE``, then a soft (tanh) compression
  that approaches 1 but never clips. The median is a tissue reference that a lesion hardly moves (a 60 mL
  tumour is ~4 % of a brain; the 99th percentile would land inside it) and it lies between the tissue
  peaks (GM/WM on T1, GM on T2 and FLAIR). Its level leaves room above the brightest normal tissue: on T1
  white matter sits at ~0.5, so enhancing tumour or blood up to ~1.5x white matter stays linear; on T2,
  where CSF is 3-4x the median, the level is lower so that CSF and fluid-like lesions are compressed but
  still ordered; on FLAIR grey matter sits at ~0.45 and lesions at 1.5-2x it stay brighter than any normal
  tissue. The floor lies below the darkest tissue, so a lesion darker still (a haemorrhage in T2 white
  matter, the darkest T2 tissue) is not cut off at its level either.
"""

from __future__ import annotations

import numpy as np

from models.preprocessing.errors import PreprocessingError

# Version 1: percentiles, not minimum and maximum, so a few extreme voxels (vessels, fat, noise) do not set the scale.
PERCENTILES = (1.0, 99.0)
# Version 2.
LOW_PERCENTILE = 1.0
LOW_MARGIN = 0.25  # the floor (0) lies this fraction of (median - 1st percentile) below the 1st percentile
MEDIAN_LEVEL = {"t1": 0.4, "t2": 0.25, "flair": 0.4}  # pd (training anatomy only) scales as t2
KNEE = 0.75  # linear below, tanh-compressed towards 1 above
SCALINGS = ("1", "2")


def normalise(volume: np.ndarray, brain_mask: np.ndarray, version: str, contrast: str = "t1") -> np.ndarray:
    """``volume`` (of ``contrast``) scaled to [0, 1] inside ``brain_mask`` by the scaling of preprocessing
    ``version``; 0 outside.

    Outside the brain is set to 0 because the model is trained on skull-stripped slices.
    """
    inside = volume[brain_mask]
    if inside.size == 0:
        raise PreprocessingError("the brain mask is empty on the model grid")
    if version == "1":
        scaled = _percentile_clip(volume, inside)
    elif version == "2":
        scaled = _median_soft_knee(volume, inside, MEDIAN_LEVEL.get(contrast, MEDIAN_LEVEL["t2"]))
    else:
        raise ValueError(f"unknown intensity scaling version {version!r}; known: {', '.join(SCALINGS)}")
    scaled = scaled.astype(np.float32)
    scaled[~brain_mask] = 0.0
    return scaled


def _percentile_clip(volume: np.ndarray, inside: np.ndarray) -> np.ndarray:
    low, high = np.percentile(inside, PERCENTILES)
    if high <= low:
        raise PreprocessingError(f"the brain has no intensity contrast (1st and 99th percentiles both {low:g})")
    return np.clip((volume - low) / (high - low), 0.0, 1.0)


def _median_soft_knee(volume: np.ndarray, inside: np.ndarray, level: float) -> np.ndarray:
    dark, median = np.percentile(inside, (LOW_PERCENTILE, 50.0))
    if median <= dark:
        raise PreprocessingError(f"the brain has no intensity contrast (1st percentile and median both {dark:g})")
    low = dark - LOW_MARGIN * (median - dark)
    linear = np.maximum((volume - low) * (level / (median - low)), 0.0)
    return soft_knee(linear)


def soft_knee(linear: np.ndarray) -> np.ndarray:
    """Identity below ``KNEE``; above it ``KNEE + (1 - KNEE) tanh((x - KNEE) / (1 - KNEE))``: continuous with
    slope 1 at the knee, increasing, approaching 1 (strictly below it up to ~7x the median level)."""
    headroom = 1.0 - KNEE
    above = KNEE + headroom * np.tanh((linear - KNEE) / headroom)
    return np.where(linear > KNEE, above, linear)
