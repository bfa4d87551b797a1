"""T2 and FLAIR versions of known anatomy for evaluation: tissue maps painted at fixed mid-range class means.

No T2 or FLAIR brain exists offline. The evaluation brain (Colin27, never trained on) gets its other contrasts
the way training synthesises them (models/data/synthesis.py), but with nothing drawn at random: every class
mean is the middle of its training range and the smooth multiplicative texture is one fixed, seeded field. A
model is therefore judged on a typical image of its contrast, the same one on every run, that no training
step has seen (training paints training brains only, with random means). Noise is left to the evaluation's
acquisition variation, which every case gets anyway.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from models.data.synthesis import _MEANS, TEXTURE_AMPLITUDE, TEXTURE_GRID

PAINTED_CONTRASTS = ("t2", "flair")
TEXTURE_SEED = 27  # one fixed texture field for every evaluation run


def mid_range_means(contrast: str) -> tuple[float, float, float]:
    """(CSF, GM, WM) class means of ``contrast``: the middle of each range training draws from."""
    if contrast not in _MEANS:
        raise ValueError(f"no class means for contrast {contrast!r}; known: {', '.join(_MEANS)}")
    csf, gm, wm = (0.5 * (low + high) for low, high in _MEANS[contrast])
    return csf, gm, wm


def paint_tissue(tissue: np.ndarray, contrast: str, texture: bool = True) -> np.ndarray:
    """``tissue`` (3, D, H, W) CSF/GM/WM probabilities -> a float32 (D, H, W) image of ``contrast``, >= 0.

    Partial-volume voxels mix the class means by their probabilities; ``texture`` multiplies by the fixed
    smooth field (amplitude: the middle of training's range). Without it the image is the flat class mix,
    which is what an average over many textured brains tends to (the atlas-mean baseline uses that).
    """
    if tissue.ndim != 4 or tissue.shape[0] != 3:
        raise ValueError(f"tissue must be (3, D, H, W), got {tuple(tissue.shape)}")
    means = np.asarray(mid_range_means(contrast), dtype=np.float32)
    image = np.einsum("c,cdhw->dhw", means, np.asarray(tissue, dtype=np.float32))
    if texture:
        image = image * (1.0 + 0.5 * sum(TEXTURE_AMPLITUDE) * texture_field(image.shape))
    return np.maximum(image, 0.0).astype(np.float32)


def texture_field(shape: tuple[int, ...]) -> np.ndarray:
    """The fixed smooth texture: training's coarse random grid, seeded, upsampled trilinearly to ``shape``."""
    generator = torch.Generator().manual_seed(TEXTURE_SEED)
    coarse = torch.randn((1, 1, *TEXTURE_GRID), generator=generator)
    field = F.interpolate(coarse, size=tuple(shape), mode="trilinear", align_corners=True)[0, 0]
    return field.numpy().astype(np.float32)
