"""Real brains written as DICOM MR series in a chosen geometry, for tests that read series back.

The single-frame MR writer and its geometry live in ``node.demo.series_writer`` (the demo sends such a
series) and are re-exported here; the Enhanced MR writer and the oblique-plane helper are for tests only.
A ``SliceGrid`` is a SimpleITK grid (direction, spacing, size, origin). The brain is resampled into
it (linear) and stored as int16 with a rescale slope and intercept: one MR Image Storage file per
slice, or one Enhanced MR Image Storage file with per-frame functional groups. Slice k of the grid
is the image at ``TransformIndexToPhysicalPoint((0, 0, k))``; the patient is fake.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.valuerep import DSfloat

from node.demo.series_writer import (
    AXIAL,
    CORONAL,
    MR_IMAGE_STORAGE,
    SAGITTAL,
    Rescale,
    SliceGrid,
    base_instance,
    centred_grid,
    decimal_strings,
    image_orientation,
    new_series_ids,
    resample,
    write_mr_series,
)

__all__ = [
    "AXIAL",
    "CORONAL",
    "ENHANCED_MR_IMAGE_STORAGE",
    "MR_IMAGE_STORAGE",
    "SAGITTAL",
    "SliceGrid",
    "centred_grid",
    "resample",
    "rotated",
    "write_enhanced_mr",
    "write_mr_series",
]

ENHANCED_MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4.1"


def rotated(direction: tuple[float, ...], axis: int, degrees: float) -> tuple[float, ...]:
    """``direction`` turned by ``degrees`` about patient axis ``axis`` (0 x, 1 y, 2 z): an oblique plane."""
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    i, j = [a for a in range(3) if a != axis]
    rotation = np.eye(3)
    rotation[i, i], rotation[i, j], rotation[j, i], rotation[j, j] = c, -s, s, c
    return tuple(float(x) for x in (rotation @ np.reshape(direction, (3, 3))).ravel())


def write_enhanced_mr(volume: sitk.Image, path: Path, *, frame_order: Sequence[int] | None = None) -> Path:
    """One Enhanced MR Image Storage file; frame j (0-based) holds slice ``frame_order[j]`` of ``volume``.

    Orientation and pixel measures are shared by all frames; position and rescale are per frame
    (each frame has its own slope), so the reader must look in both places.
    """
    order = list(frame_order) if frame_order is not None else list(range(volume.GetDepth()))
    voxels = sitk.GetArrayViewFromImage(volume)
    ds = base_instance(new_series_ids(volume), ENHANCED_MR_IMAGE_STORAGE)
    ds.InstanceNumber = 1
    ds.NumberOfFrames = len(order)
    measures = Dataset()
    measures.PixelSpacing = decimal_strings(volume.GetSpacing()[1::-1])
    measures.SliceThickness = DSfloat(volume.GetSpacing()[2], auto_format=True)
    orientation = Dataset()
    orientation.ImageOrientationPatient = decimal_strings(image_orientation(volume))
    shared = Dataset()
    shared.PixelMeasuresSequence = DicomSequence([measures])
    shared.PlaneOrientationSequence = DicomSequence([orientation])
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])
    per_frame, pixels = [], []
    for k in order:
        rescale = Rescale.fitting(voxels[k])
        position, transformation, groups = Dataset(), Dataset(), Dataset()
        position.ImagePositionPatient = decimal_strings(volume.TransformIndexToPhysicalPoint((0, 0, k)))
        transformation.RescaleSlope = DSfloat(rescale.slope, auto_format=True)
        transformation.RescaleIntercept = DSfloat(rescale.intercept, auto_format=True)
        transformation.RescaleType = "US"
        groups.PlanePositionSequence = DicomSequence([position])
        groups.PixelValueTransformationSequence = DicomSequence([transformation])
        per_frame.append(groups)
        pixels.append(rescale.store(voxels[k]))
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(per_frame)
    ds.PixelData = np.stack(pixels).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path
