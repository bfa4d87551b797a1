"""Real brains written as DICOM MR series in a chosen geometry, for tests that read series back.

A ``SliceGrid`` is a SimpleITK grid (direction, spacing, size, origin). The brain is resampled into
it (linear) and stored as int16 with a rescale slope and intercept: one MR Image Storage file per
slice, or one Enhanced MR Image Storage file with per-frame functional groups. Slice k of the grid
is the image at ``TransformIndexToPhysicalPoint((0, 0, k))``; the patient is fake.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pydicom.valuerep import DSfloat

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
ENHANCED_MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4.1"

# Direction matrices (row-major); their columns are the row cosine, column cosine and slice normal (LPS).
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)  # row R->L, column A->P, normal F->H
SAGITTAL = (0.0, 0.0, -1.0, 1.0, 0.0, 0.0, 0.0, -1.0, 0.0)  # row A->P, column H->F, normal L->R
CORONAL = (1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, -1.0, 0.0)  # row R->L, column H->F, normal A->P


@dataclass(frozen=True)
class SliceGrid:
    """Where a written series' voxels lie, in SimpleITK's terms."""

    direction: tuple[float, ...]  # 3x3 row-major; columns: row cosine, column cosine, slice normal
    spacing: tuple[float, float, float]  # between columns, between rows, between slices, mm
    size: tuple[int, int, int]  # columns, rows, slices
    origin: tuple[float, float, float]


def rotated(direction: tuple[float, ...], axis: int, degrees: float) -> tuple[float, ...]:
    """``direction`` turned by ``degrees`` about patient axis ``axis`` (0 x, 1 y, 2 z): an oblique plane."""
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    i, j = [a for a in range(3) if a != axis]
    rotation = np.eye(3)
    rotation[i, i], rotation[i, j], rotation[j, i], rotation[j, j] = c, -s, s, c
    return tuple(float(x) for x in (rotation @ np.reshape(direction, (3, 3))).ravel())


def centred_grid(
    image: sitk.Image, direction: tuple[float, ...], spacing: tuple[float, float, float], size: tuple[int, int, int]
) -> SliceGrid:
    """A grid of ``size`` voxels whose centre is the centre of ``image``: a crop of the head in any plane."""
    centre = np.array(image.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in image.GetSize()]))
    half_extent = np.reshape(direction, (3, 3)) @ (np.multiply(spacing, np.subtract(size, 1)) / 2)
    return SliceGrid(direction, spacing, size, tuple(float(x) for x in centre - half_extent))  # type: ignore[arg-type]


def resample(image: sitk.Image, grid: SliceGrid) -> sitk.Image:
    """``image`` sampled (linear) on ``grid``, float32; outside the image is 0."""
    reference = sitk.Image(list(grid.size), sitk.sitkFloat32)
    reference.SetOrigin(grid.origin)
    reference.SetSpacing(grid.spacing)
    reference.SetDirection(grid.direction)
    return sitk.Resample(image, reference, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)


@dataclass(frozen=True)
class _Rescale:
    """Stored int16 = round((value - intercept) / slope); DS-friendly numbers (6 significant digits)."""

    slope: float
    intercept: float

    @classmethod
    def fitting(cls, values: np.ndarray) -> _Rescale:
        """Spread the values over +-30000 so quantisation costs at most slope / 2."""
        low, high = float(values.min()), float(values.max())
        slope = float(f"{(high - low) / 60000:.6g}") if high > low else 1.0
        return cls(slope, float(f"{(high + low) / 2:.6g}"))

    def store(self, values: np.ndarray) -> np.ndarray:
        return np.round((values - self.intercept) / self.slope).astype(np.int16)


def write_mr_series(
    volume: sitk.Image,
    folder: Path,
    *,
    slice_thickness: float | None = None,
    description: str | None = None,
    study_uid: str | None = None,
    series_number: int = 1,
) -> list[Path]:
    """One MR Image Storage file per slice of ``volume``; returns the paths in slice order (k).

    ``description`` becomes the SeriesDescription (series selection reads it); ``study_uid`` puts
    the series into an existing study."""
    folder.mkdir(parents=True, exist_ok=True)
    voxels = sitk.GetArrayViewFromImage(volume)
    rescale = _Rescale.fitting(voxels)
    series = _series(volume, study_uid)
    paths = []
    for k in range(volume.GetDepth()):
        ds = _instance(series, MR_IMAGE_STORAGE)
        ds.SeriesNumber = series_number
        if description is not None:
            ds.SeriesDescription = description
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = _ds(volume.TransformIndexToPhysicalPoint((0, 0, k)))
        ds.ImageOrientationPatient = _ds(_orientation(volume))
        ds.PixelSpacing = _ds(volume.GetSpacing()[1::-1])
        ds.SliceThickness = DSfloat(slice_thickness or volume.GetSpacing()[2], auto_format=True)
        ds.RescaleSlope = DSfloat(rescale.slope, auto_format=True)
        ds.RescaleIntercept = DSfloat(rescale.intercept, auto_format=True)
        ds.PixelData = rescale.store(voxels[k]).tobytes()
        path = folder / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def write_enhanced_mr(volume: sitk.Image, path: Path, *, frame_order: Sequence[int] | None = None) -> Path:
    """One Enhanced MR Image Storage file; frame j (0-based) holds slice ``frame_order[j]`` of ``volume``.

    Orientation and pixel measures are shared by all frames; position and rescale are per frame
    (each frame has its own slope), so the reader must look in both places.
    """
    order = list(frame_order) if frame_order is not None else list(range(volume.GetDepth()))
    voxels = sitk.GetArrayViewFromImage(volume)
    ds = _instance(_series(volume), ENHANCED_MR_IMAGE_STORAGE)
    ds.InstanceNumber = 1
    ds.NumberOfFrames = len(order)
    measures = Dataset()
    measures.PixelSpacing = _ds(volume.GetSpacing()[1::-1])
    measures.SliceThickness = DSfloat(volume.GetSpacing()[2], auto_format=True)
    orientation = Dataset()
    orientation.ImageOrientationPatient = _ds(_orientation(volume))
    shared = Dataset()
    shared.PixelMeasuresSequence = DicomSequence([measures])
    shared.PlaneOrientationSequence = DicomSequence([orientation])
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])
    per_frame, pixels = [], []
    for k in order:
        rescale = _Rescale.fitting(voxels[k])
        position, transformation, groups = Dataset(), Dataset(), Dataset()
        position.ImagePositionPatient = _ds(volume.TransformIndexToPhysicalPoint((0, 0, k)))
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


@dataclass(frozen=True)
class _Series:
    study_uid: str
    series_uid: str
    frame_of_reference_uid: str
    rows: int
    columns: int


def _series(volume: sitk.Image, study_uid: str | None = None) -> _Series:
    width, height, _ = volume.GetSize()
    return _Series(study_uid or generate_uid(), generate_uid(), generate_uid(), rows=height, columns=width)


def _instance(series: _Series, sop_class_uid: str) -> Dataset:
    """The attributes every written instance shares: identity, fake patient, int16 greyscale pixels."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = series.study_uid
    ds.SeriesInstanceUID = series.series_uid
    ds.FrameOfReferenceUID = series.frame_of_reference_uid
    ds.PatientName = "TEST^BRAIN"
    ds.PatientID = "TEST-BRAIN-0001"
    ds.StudyDate, ds.StudyTime, ds.StudyID = "20260101", "120000", "1"
    ds.Modality = "MR"
    ds.SeriesNumber = 1
    ds.Rows, ds.Columns = series.rows, series.columns
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    return ds


def _orientation(volume: sitk.Image) -> list[float]:
    """ImageOrientationPatient: the first two columns of the direction matrix."""
    direction = np.reshape(volume.GetDirection(), (3, 3))
    return [*direction[:, 0], *direction[:, 1]]


def _ds(values: Sequence[float]) -> list[DSfloat]:
    return [DSfloat(float(v), auto_format=True) for v in values]
