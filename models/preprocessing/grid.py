"""Voxel grids in physical space, and moving images between them.

Every step of the preprocessing is a resampling onto some grid (the 1 mm working grid in the
subject's space, the crop box in atlas space, the model grid, back to the input grid); one small
dataclass for "where the voxels lie" keeps those steps explicit and lets the inverse mapping
reproduce the input's grid exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import SimpleITK as sitk

Interpolation = Literal["linear", "nearest"]

_INTERPOLATORS: dict[Interpolation, int] = {"linear": sitk.sitkLinear, "nearest": sitk.sitkNearestNeighbor}


@dataclass(frozen=True)
class Grid:
    """Size, spacing, origin and direction of a 3D image, as SimpleITK defines them (LPS, mm)."""

    size: tuple[int, int, int]  # x, y, z: numpy arrays of this grid have shape (z, y, x)
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]  # centre of voxel (0, 0, 0)
    direction: tuple[float, ...]  # 3x3 row-major; column i is the direction of index axis i

    @classmethod
    def of(cls, image: sitk.Image) -> Grid:
        if image.GetDimension() != 3:
            raise ValueError(f"a 3D image is needed, got {image.GetDimension()}D")
        return cls(
            size=tuple(int(n) for n in image.GetSize()),  # type: ignore[arg-type]
            spacing=tuple(float(s) for s in image.GetSpacing()),  # type: ignore[arg-type]
            origin=tuple(float(o) for o in image.GetOrigin()),  # type: ignore[arg-type]
            direction=tuple(float(d) for d in image.GetDirection()),
        )

    @property
    def shape(self) -> tuple[int, int, int]:
        """The numpy shape (z, y, x) of an array on this grid."""
        return self.size[2], self.size[1], self.size[0]

    def image(self, array: np.ndarray) -> sitk.Image:
        """``array`` (shape ``self.shape``) placed on this grid; bool becomes uint8 (SimpleITK has no bool)."""
        if array.shape != self.shape:
            raise ValueError(f"array of shape {array.shape} does not fit a grid of shape {self.shape}")
        image = sitk.GetImageFromArray(array.astype(np.uint8) if array.dtype == bool else array)
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image


def resample(
    image: sitk.Image,
    grid: Grid,
    transform: sitk.Transform | None = None,
    interpolation: Interpolation = "linear",
    pixel_type: int = sitk.sitkFloat32,
) -> sitk.Image:
    """``image`` sampled at the voxels of ``grid``; ``transform`` maps grid points to ``image`` points.

    Points that fall outside ``image`` get 0.
    """
    return sitk.Resample(
        image,
        grid.size,
        transform or sitk.Transform(),
        _INTERPOLATORS[interpolation],
        grid.origin,
        grid.spacing,
        grid.direction,
        0.0,
        pixel_type,
    )


def isotropic_grid(image: sitk.Image, spacing: float) -> Grid:
    """A grid with the image's orientation and physical extent, at ``spacing`` mm in every direction.

    The extent is kept edge to edge (not centre to centre), so no part of the field of view is lost
    and the new voxels are centred in it.
    """
    old_size = np.array(image.GetSize())
    old_spacing = np.array(image.GetSpacing())
    extent = old_size * old_spacing
    size = np.maximum(np.round(extent / spacing), 1).astype(int)
    direction = np.array(image.GetDirection()).reshape(3, 3)
    first_corner = np.array(image.GetOrigin()) - direction @ (old_spacing / 2)
    centre_offset = (extent - size * spacing) / 2 + spacing / 2
    origin = first_corner + direction @ centre_offset
    return Grid(
        size=tuple(int(n) for n in size),  # type: ignore[arg-type]
        spacing=(spacing, spacing, spacing),
        origin=tuple(float(o) for o in origin),  # type: ignore[arg-type]
        direction=tuple(float(d) for d in direction.ravel()),
    )
