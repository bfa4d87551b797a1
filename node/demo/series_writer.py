"""A volume written as a DICOM MR series in a chosen geometry: what the demo sends, and what tests read back.

A ``SliceGrid`` is a SimpleITK grid (direction, spacing, size, origin). A volume is resampled into it
(linear) and stored as int16 with a rescale slope and intercept, one MR Image Storage file per slice.
Slice k of the grid is the image at ``TransformIndexToPhysicalPoint((0, 0, k))``. Only synthetic
data is written here, so the patient is always fake.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pydicom.valuerep import DSfloat

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"

# Direction matrices (row-major); their columns are the row cosine, column cosine and slice normal (LPS).
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)  # row R->L, column A->P, normal F->H
SAGITTAL = (0.0, 0.0, -1.0, 1.0, 0.0, 0.0, 0.0, -1.0, 0.0)  # row A->P, column H->F, normal L->R
CORONAL = (1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, -1.0, 0.0)  # row R->L, column H->F, normal A->P

SYNTHETIC_PATIENT_NAME = "SYNTHETIC^BRAIN"
SYNTHETIC_PATIENT_ID = "SYNTHETIC-BRAIN-0001"


@dataclass(frozen=True)
class SliceGrid:
    """Where a written series' voxels lie, in SimpleITK's terms."""

    direction: tuple[float, ...]  # 3x3 row-major; columns: row cosine, column cosine, slice normal
    spacing: tuple[float, float, float]  # between columns, between rows, between slices, mm
    size: tuple[int, int, int]  # columns, rows, slices
    origin: tuple[float, float, float]

    def reference(self, pixel_type: int = sitk.sitkFloat32) -> sitk.Image:
        """An empty image on this grid: the target of a resampling, or a field of view to test points against."""
        image = sitk.Image(list(self.size), pixel_type)
        image.SetOrigin(self.origin)
        image.SetSpacing(self.spacing)
        image.SetDirection(self.direction)
        return image


def centred_grid(
    image: sitk.Image, direction: tuple[float, ...], spacing: tuple[float, float, float], size: tuple[int, int, int]
) -> SliceGrid:
    """A grid of ``size`` voxels whose centre is the centre of ``image``: a crop of the head in any plane."""
    centre = np.array(image.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in image.GetSize()]))
    half_extent = np.reshape(direction, (3, 3)) @ (np.multiply(spacing, np.subtract(size, 1)) / 2)
    return SliceGrid(direction, spacing, size, tuple(float(x) for x in centre - half_extent))  # type: ignore[arg-type]


def resample(image: sitk.Image, grid: SliceGrid) -> sitk.Image:
    """``image`` sampled (linear) on ``grid``, float32; outside the image is 0."""
    return sitk.Resample(image, grid.reference(), sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)


@dataclass(frozen=True)
class Rescale:
    """Stored int16 = round((value - intercept) / slope); DS-friendly numbers (6 significant digits)."""

    slope: float
    intercept: float

    @classmethod
    def fitting(cls, values: np.ndarray) -> Rescale:
        """Spread the values over +-30000 so quantisation costs at most slope / 2."""
        low, high = float(values.min()), float(values.max())
        slope = float(f"{(high - low) / 60000:.6g}") if high > low else 1.0
        return cls(slope, float(f"{(high + low) / 2:.6g}"))

    def store(self, values: np.ndarray) -> np.ndarray:
        """The int16 pixel values that read back (times slope, plus intercept) as ``values``."""
        return np.round((values - self.intercept) / self.slope).astype(np.int16)


@dataclass(frozen=True)
class SeriesIds:
    """The identity shared by every instance of one written series, and its image size."""

    study_uid: str
    series_uid: str
    frame_of_reference_uid: str
    rows: int
    columns: int


def new_series_ids(
    volume: sitk.Image,
    study_uid: str | None = None,
    series_uid: str | None = None,
    frame_of_reference_uid: str | None = None,
) -> SeriesIds:
    """The ids of a series of ``volume``'s slices: the given UIDs, fresh ones for the rest."""
    width, height, _ = volume.GetSize()
    return SeriesIds(
        study_uid or generate_uid(),
        series_uid or generate_uid(),
        frame_of_reference_uid or generate_uid(),
        rows=height,
        columns=width,
    )


def base_instance(series: SeriesIds, sop_class_uid: str) -> Dataset:
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
    ds.PatientName = SYNTHETIC_PATIENT_NAME
    ds.PatientID = SYNTHETIC_PATIENT_ID
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


def write_mr_series(
    volume: sitk.Image,
    folder: Path,
    *,
    slice_thickness: float | None = None,
    description: str | None = None,
    study_uid: str | None = None,
    series_number: int = 1,
    series_uid: str | None = None,
    frame_of_reference_uid: str | None = None,
    attributes: Mapping[str, Any] | None = None,
) -> list[Path]:
    """One MR Image Storage file per slice of ``volume``; returns the paths in slice order (k).

    ``description`` becomes the SeriesDescription (series selection reads it); ``study_uid`` puts
    the series into an existing study. ``attributes`` (keyword -> value) are set on every instance
    last, so they can add acquisition details (RepetitionTime, ImageType) or replace the fake patient.
    """
    extra = dict(attributes or {})
    if unknown := [keyword for keyword in extra if tag_for_keyword(keyword) is None]:
        raise ValueError(f"not DICOM keywords: {', '.join(unknown)}")
    folder.mkdir(parents=True, exist_ok=True)
    voxels = sitk.GetArrayViewFromImage(volume)
    rescale = Rescale.fitting(voxels)
    series = new_series_ids(volume, study_uid, series_uid, frame_of_reference_uid)
    paths = []
    for k in range(volume.GetDepth()):
        ds = base_instance(series, MR_IMAGE_STORAGE)
        ds.SeriesNumber = series_number
        if description is not None:
            ds.SeriesDescription = description
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = decimal_strings(volume.TransformIndexToPhysicalPoint((0, 0, k)))
        ds.ImageOrientationPatient = decimal_strings(image_orientation(volume))
        ds.PixelSpacing = decimal_strings(volume.GetSpacing()[1::-1])
        ds.SliceThickness = DSfloat(slice_thickness or volume.GetSpacing()[2], auto_format=True)
        ds.RescaleSlope = DSfloat(rescale.slope, auto_format=True)
        ds.RescaleIntercept = DSfloat(rescale.intercept, auto_format=True)
        for keyword, value in extra.items():
            setattr(ds, keyword, value)
        ds.PixelData = rescale.store(voxels[k]).tobytes()
        path = folder / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def image_orientation(volume: sitk.Image) -> list[float]:
    """ImageOrientationPatient: the first two columns of the direction matrix."""
    direction = np.reshape(volume.GetDirection(), (3, 3))
    return [float(x) for x in (*direction[:, 0], *direction[:, 1])]


def decimal_strings(values: Sequence[float]) -> list[DSfloat]:
    """Numbers as DS values that fit the 16-character limit."""
    return [DSfloat(float(v), auto_format=True) for v in values]
