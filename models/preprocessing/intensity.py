"""Intensity scaling to [0, 1], as the method does it: MR intensities have no absolute unit."""

from __future__ import annotations

import numpy as np

from models.preprocessing.errors import PreprocessingError

# Percentiles, not the minimum and maximum, so a few extreme voxels (vessels, fat, noise) do not set the scale.
PERCENTILES = (1.0, 99.0)


def normalise(volume: np.ndarray, brain_mask: np.ndarray) -> np.ndarray:
    """``volume`` with its 1st/99th brain percentiles mapped to 0/1, clipped to [0, 1]; 0 outside the brain.

    Outside the brain is set to 0 because the model is trained on skull-stripped slices.
    """
    inside = volume[brain_mask]
    if inside.size == 0:
        raise PreprocessingError("the brain mask is empty on the model grid")
    low, high = np.percentile(inside, PERCENTILES)
    if high <= low:
        raise PreprocessingError(f"the brain has no intensity contrast (1st and 99th percentiles both {low:g})")
    scaled = np.clip((volume - low) / (high - low), 0.0, 1.0).astype(np.float32)
    scaled[~brain_mask] = 0.0
    return scaled
