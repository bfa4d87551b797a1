"""The preprocessing that training and inference share, and its inverse.

Forward (``Preprocessor``): reorient to LPS and resample to 1 mm, N4 bias correction, affine
registration to the atlas, brain mask in the subject's space, crop to the 1 mm box in atlas space,
2x2x2 block means onto the model grid (96x96x50 at 2 mm), percentile normalisation inside the brain.

The only geometric change between the input and the model grid is the one affine: reorienting and
resampling keep physical coordinates. So the inverse (``to_input_grid``) is one resampling through
that affine onto the input's own grid, and ``to_model_grid`` brings any other map of the input (a
lesion mask, for evaluation) the same way as the image.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from models.atlas import Atlas
from models.preprocessing.bias_field import correct_bias_field
from models.preprocessing.brain_mask import carried_brain_mask, refine_brain_mask
from models.preprocessing.errors import PreprocessingError
from models.preprocessing.grid import Grid, Interpolation, isotropic_grid, resample
from models.preprocessing.intensity import normalise
from models.preprocessing.model_grid import ModelGeometry, ModelGridSpec, model_geometry
from models.preprocessing.registration import register_to_atlas, registration_target

WORKING_SPACING_MM = 1.0
# Bump when any step above changes what reaches the model grid: checkpoints record it. Version 2 replaced the
# clipping percentile scaling (models/preprocessing/intensity.py); a version-1 checkpoint is still preprocessed
# with its own version, every other step being the same.
PREPROCESSING_VERSION = "2"
SUPPORTED_VERSIONS = ("1", "2")


@dataclass(frozen=True, eq=False)
class Preprocessed:
    """A head on the model grid, and what it takes to bring model-grid maps back to the input's grid.

    Arrays on the model grid have the numpy shape ``geometry.model.shape``: (z, y, x) = (50, 96, 96),
    for a SimpleITK size of 96x96x50; ``volume[k]`` is axial slice k, from the bottom up.
    """

    volume: np.ndarray  # float32 in [0, 1], 0 outside the brain mask
    unscaled: np.ndarray  # float32, the same before intensity scaling (bias-corrected input units), whole grid
    brain_mask: np.ndarray  # bool; only where the input's field of view covers the model voxel
    covered: np.ndarray  # bool: model voxels wholly inside the input's field of view
    input_brain_mask: sitk.Image  # uint8 on the input's own grid (the 1 mm mask, nearest neighbour)
    input_grid: Grid
    geometry: ModelGeometry
    atlas_to_input: sitk.AffineTransform  # maps atlas (model-grid) points to points of the input image
    seconds: dict[str, float]  # wall time of each stage, in order


class Preprocessor:
    """The preprocessing, with what it derives from the atlas computed once (~0.5 s) and reused.

    ``contrast`` (t1, t2, flair) is the model's: the registration compares the series with the atlas anatomy
    in that contrast (correlation copes with T2's inverted order, not with FLAIR's grey matter brighter than
    white matter against dark CSF). ``version`` is the checkpoint's preprocessing version (the current one for
    new training); only the intensity scaling differs between the versions.
    """

    def __init__(
        self,
        atlas: Atlas,
        spec: ModelGridSpec | None = None,
        contrast: str = "t1",
        version: str = PREPROCESSING_VERSION,
    ) -> None:
        if version not in SUPPORTED_VERSIONS:
            raise PreprocessingError(
                f"preprocessing version {version} is not supported (this node has {', '.join(SUPPORTED_VERSIONS)})"
            )
        self.version = version
        self.contrast = contrast
        self._atlas_mask = atlas.brain_mask
        self._target = registration_target(atlas, contrast)
        self.geometry = model_geometry(atlas.brain_mask, spec or ModelGridSpec())

    def __call__(self, image: sitk.Image) -> Preprocessed:
        """``image``: a head (skull on or off) in any orientation and spacing; raises PreprocessingError."""
        seconds: dict[str, float] = {}
        clock = time.perf_counter()

        def lap(stage: str) -> None:
            nonlocal clock
            now = time.perf_counter()
            seconds[stage] = now - clock
            clock = now

        input_grid = _check_input(image)
        oriented = sitk.DICOMOrient(image, "LPS")  # only relabels the axes; physical space is unchanged
        working = resample(oriented, isotropic_grid(oriented, WORKING_SPACING_MM), interpolation="linear")
        lap("reorient_resample")
        working = correct_bias_field(working)
        lap("bias_field")
        atlas_to_input = register_to_atlas(working, self._target)
        lap("registration")
        carried = carried_brain_mask(self._atlas_mask, atlas_to_input, Grid.of(working))
        mask = refine_brain_mask(working, carried)
        input_brain_mask = resample(mask, input_grid, interpolation="nearest", pixel_type=sitk.sitkUInt8)
        lap("brain_mask")
        covered = _field_of_view(input_grid, self.geometry, atlas_to_input)
        lap("field_of_view")
        brain = (_to_model_grid_linear(mask, self.geometry, atlas_to_input) >= 0.5) & covered
        unscaled = _to_model_grid_linear(working, self.geometry, atlas_to_input)
        volume = normalise(unscaled, brain, self.version, self.contrast)
        lap("model_grid")
        return Preprocessed(
            volume=volume,
            unscaled=unscaled,
            brain_mask=brain,
            covered=covered,
            input_brain_mask=input_brain_mask,
            input_grid=input_grid,
            geometry=self.geometry,
            atlas_to_input=atlas_to_input,
            seconds=seconds,
        )


def to_input_grid(array: np.ndarray, preprocessed: Preprocessed, interpolation: Interpolation) -> sitk.Image:
    """A map on the model grid as an image on the input's own grid (size, spacing, origin, direction).

    ``"linear"`` for scores (float32 out), ``"nearest"`` for labels and masks (integer type kept; bool
    becomes uint8). Input voxels the model grid does not cover (outside the 100 mm slab) get 0.
    """
    model_image = preprocessed.geometry.model.image(array)
    pixel_type = sitk.sitkFloat32 if interpolation == "linear" else model_image.GetPixelID()
    return resample(
        model_image, preprocessed.input_grid, preprocessed.atlas_to_input.GetInverse(), interpolation, pixel_type
    )


def mask_to_input_grid(mask: np.ndarray, preprocessed: Preprocessed) -> sitk.Image:
    """A model-grid mask on the input's own grid (uint8 {0, 1}): its partial-volume fraction cut at one half,
    smoother outlines on a finer input grid than nearest-neighbour blocks of 2 mm. The node's SEG is this mask,
    and the evaluation on a dataset measures this mask, so both see the same voxels."""
    fraction = to_input_grid(np.asarray(mask, dtype=np.float32), preprocessed, "linear")
    return sitk.Cast(fraction >= 0.5, sitk.sitkUInt8)


def to_model_grid(image: sitk.Image, preprocessed: Preprocessed, interpolation: Interpolation) -> np.ndarray:
    """A map of the input (any grid in the input's physical space) on the model grid, as the volume got there.

    ``"linear"``: through the 1 mm crop box and 2x2x2 block means, as the volume (float32; threshold a
    mask at 0.5 to get its partial volume majority). ``"nearest"``: sampled at the model voxel centres,
    for label maps (integer type kept).
    """
    if interpolation == "linear":
        return _to_model_grid_linear(image, preprocessed.geometry, preprocessed.atlas_to_input)
    model = resample(
        image, preprocessed.geometry.model, preprocessed.atlas_to_input, "nearest", pixel_type=image.GetPixelID()
    )
    return sitk.GetArrayFromImage(model)


def atlas_to_model_grid(image: sitk.Image, geometry: ModelGeometry) -> np.ndarray:
    """An image in atlas space (a template, a tissue map) on the model grid, as volumes get there."""
    return _to_model_grid_linear(image, geometry, sitk.Transform())


def _to_model_grid_linear(image: sitk.Image, geometry: ModelGeometry, atlas_to_input: sitk.Transform) -> np.ndarray:
    crop = sitk.GetArrayFromImage(resample(sitk.Cast(image, sitk.sitkFloat32), geometry.crop, atlas_to_input))
    nz, ny, nx = geometry.model.shape
    fz, fy, fx = (c // m for c, m in zip(geometry.crop.shape, geometry.model.shape, strict=True))
    return crop.reshape(nz, fz, ny, fy, nx, fx).mean(axis=(1, 3, 5), dtype=np.float32)


def _field_of_view(input_grid: Grid, geometry: ModelGeometry, atlas_to_input: sitk.Transform) -> np.ndarray:
    """Model voxels whose every 1 mm sample lies inside the input's field of view.

    A partial slab or a tight field of view leaves part of the model grid without data (0 after
    resampling); those voxels leave the brain mask, so they are neither normalised nor scored, instead
    of reading as dark "anomalies". An input that covers the model grid is unchanged by this.
    """
    ones = sitk.Image(list(input_grid.size), sitk.sitkFloat32) + 1.0
    ones.SetSpacing(input_grid.spacing)
    ones.SetOrigin(input_grid.origin)
    ones.SetDirection(input_grid.direction)
    return _to_model_grid_linear(ones, geometry, atlas_to_input) > 0.999


def _check_input(image: sitk.Image) -> Grid:
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise PreprocessingError(
            f"a 3D scalar image is needed, got {image.GetDimension()}D with "
            f"{image.GetNumberOfComponentsPerPixel()} component(s) per voxel"
        )
    if min(image.GetSize()) < 2:
        raise PreprocessingError(f"a volume is needed, got an image of size {image.GetSize()}")
    return Grid.of(image)
