"""Where the model grid sits in atlas space.

The method crops the registered volume to 192x192x100 voxels at 1 mm and halves the resolution:
96x96x50 at 2 mm, axial slices. Axes follow LPS (identity direction), so an axial slice as a numpy
array, ``volume[k]``, shows the patient's right on the left and anterior at the top, as a radiologist
reads it.

192 mm covers the atlas brain left-right (145 mm) and front-back (181 mm) with room for a subject's
brain that the affine leaves a little larger. 100 mm does *not* cover it top to bottom: the MNI152
brain mask spans 155 mm (z -72 to +82; the brain stem reaches the template's lower edge). The
paper's code centre-crops SRI24's 155 slices to 100 (torchio CropOrPad), which also drops both
ends. Here the 100 mm slab is placed where it holds the most brain volume: z -38 to +61 in MNI
space, 88 % of the atlas brain; the top ~21 mm (vertex) and the lower cerebellum and brain stem are
not screened. The slice count is a free parameter of a 2D slice model (``ModelGridSpec``), should
more have to be covered: 78 slices at 2 mm hold the whole atlas mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from models.preprocessing.grid import Grid


@dataclass(frozen=True)
class ModelGridSpec:
    """The crop box at 1 mm and how much the model grid is coarser; the defaults are the paper's."""

    crop_size: tuple[int, int, int] = (192, 192, 100)  # x, y, z voxels at 1 mm
    downsampling: int = 2  # model grid = crop box in blocks of downsampling^3 voxels


@dataclass(frozen=True)
class ModelGeometry:
    """The 1 mm crop box and the model grid it is averaged down to, both in atlas space."""

    crop: Grid
    model: Grid


def model_geometry(brain_mask: sitk.Image, spec: ModelGridSpec) -> ModelGeometry:
    """The crop box around the atlas ``brain_mask``: centred on it left-right and front-back, and the
    slab of ``spec.crop_size[2]`` slices that holds the most brain volume top to bottom.

    The model grid's voxels are the crop box's blocks of ``spec.downsampling``^3 voxels, so it is
    exactly aligned with it (a block mean is an anti-aliased downsampling with no interpolation).
    """
    factor = spec.downsampling
    if any(n % factor for n in spec.crop_size):
        raise ValueError(f"crop size {spec.crop_size} is not a multiple of the downsampling {factor}")
    lower, upper = _brain_box(brain_mask)
    centre = (lower + upper) / 2
    origin = centre - (np.array(spec.crop_size) - 1) / 2
    origin[2] = _densest_slab(brain_mask, spec.crop_size[2])
    identity = tuple(float(v) for v in np.eye(3).ravel())
    crop = Grid(
        size=spec.crop_size,
        spacing=(1.0, 1.0, 1.0),
        origin=tuple(float(o) for o in origin),  # type: ignore[arg-type]
        direction=identity,
    )
    model = Grid(
        size=tuple(n // factor for n in spec.crop_size),  # type: ignore[arg-type]
        spacing=(float(factor),) * 3,  # type: ignore[arg-type]
        origin=tuple(float(o) for o in origin + (factor - 1) / 2),  # type: ignore[arg-type]
        direction=identity,
    )
    return ModelGeometry(crop=crop, model=model)


def _brain_points(brain_mask: sitk.Image) -> np.ndarray:
    """Physical (LPS) coordinates of the mask's voxels, one row each."""
    index = np.argwhere(sitk.GetArrayViewFromImage(brain_mask) > 0)[:, ::-1].astype(float)  # (z,y,x) -> (x,y,z)
    direction = np.array(brain_mask.GetDirection()).reshape(3, 3)
    return np.array(brain_mask.GetOrigin()) + (index * np.array(brain_mask.GetSpacing())) @ direction.T


def _brain_box(brain_mask: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    points = _brain_points(brain_mask)
    return points.min(axis=0), points.max(axis=0)


def _densest_slab(brain_mask: sitk.Image, slices: int) -> float:
    """The z (mm) of the lowest 1 mm slice of the ``slices``-thick slab holding the most brain voxels."""
    z = np.round(_brain_points(brain_mask)[:, 2]).astype(int)
    low = int(z.min())
    counts = np.bincount(z - low, minlength=slices)
    in_slab = np.convolve(counts, np.ones(slices, dtype=int), mode="valid")
    return float(low + int(np.argmax(in_slab)))
