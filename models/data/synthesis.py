"""Contrast synthesis from tissue probabilities: new T1-, T2- or FLAIR-like images of a known anatomy.

Only two real T1 brains exist offline and no T2 or FLAIR at all. Painting the tissue maps with random
class intensities (in the order each contrast has) gives a T2/FLAIR model something to train on and
a T1 model many more appearances of the same anatomy. Partial-volume voxels mix the class intensities
by their probabilities; a smooth multiplicative texture and a little noise stop the tissues being flat.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

Contrast = Literal["t1", "t2", "flair"]
CONTRASTS: tuple[Contrast, ...] = ("t1", "t2", "flair")

# Class means relative to the brightest tissue, (CSF, GM, WM), as (low, high) ranges. The ranges of
# each contrast never overlap in the wrong order, so the ordering holds for every draw:
# T1: CSF < GM < WM; T2: CSF > GM > WM; FLAIR: CSF dark, GM > WM.
_MEANS: dict[str, tuple[tuple[float, float], tuple[float, float], tuple[float, float]]] = {
    "t1": ((0.10, 0.40), (0.50, 0.75), (0.85, 1.00)),
    "t2": ((0.85, 1.00), (0.45, 0.65), (0.25, 0.42)),
    "flair": ((0.03, 0.25), (0.80, 1.00), (0.50, 0.72)),
}
TEXTURE_GRID = (12, 24, 24)  # coarse random grid upsampled to the volume: features ~4 voxels across
TEXTURE_AMPLITUDE = (0.02, 0.08)  # std of the multiplicative texture
NOISE_STD = (0.005, 0.02)  # per-voxel Gaussian noise, relative to the brightest tissue


def synthesise_contrast(tissue: Tensor, contrast: Contrast, generator: torch.Generator) -> Tensor:
    """``tissue`` (3, D, H, W) probabilities CSF, GM, WM -> an image (D, H, W) >= 0 of the given contrast.

    Voxels with no tissue (outside the brain) come out ~0 (noise only, clipped at 0).
    """
    if contrast not in _MEANS:
        raise ValueError(f"unknown contrast {contrast!r}; expected one of {', '.join(CONTRASTS)}")
    if tissue.dim() != 4 or tissue.shape[0] != 3:
        raise ValueError(f"tissue must be (3, D, H, W), got {tuple(tissue.shape)}")
    tissue = tissue.float()
    means = torch.tensor([_uniform(low, high, generator) for low, high in _MEANS[contrast]])
    image = torch.einsum("c,cdhw->dhw", means, tissue)
    amplitude = _uniform(*TEXTURE_AMPLITUDE, generator)
    coarse = torch.randn((1, 1, *TEXTURE_GRID), generator=generator)
    texture = F.interpolate(coarse, size=tuple(tissue.shape[1:]), mode="trilinear", align_corners=True)[0, 0]
    image = image * (1.0 + amplitude * texture)
    noise = _uniform(*NOISE_STD, generator) * torch.randn(tuple(image.shape), generator=generator)
    return (image + noise * (tissue.sum(dim=0) > 0)).clamp_(min=0.0)


def _uniform(low: float, high: float, generator: torch.Generator) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))
