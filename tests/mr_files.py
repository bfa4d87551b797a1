"""Synthetic MR instances for tests: valid DICOM, fake patient, fresh UIDs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


def mr_slice(
    study_uid: str,
    series_uid: str,
    index: int,
    *,
    size: int = 32,
    sop_class_uid: str = MR_IMAGE_STORAGE,
    sop_instance_uid: str | None = None,
    seed: int = 0,
) -> Dataset:
    """One axial slice of a 1 mm series, with file meta so it can be written or sent."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = sop_instance_uid or generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = study_uid
    ds.PatientName = "TEST^PATIENT"
    ds.PatientID = "TEST-0001"
    ds.Modality = "MR" if sop_class_uid == MR_IMAGE_STORAGE else "CT"
    ds.SeriesNumber = 1
    ds.SeriesDescription = "T1 AX"
    ds.InstanceNumber = index + 1
    ds.ImagePositionPatient = [0.0, 0.0, float(index)]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.PixelSpacing = [1.0, 1.0]
    ds.SliceThickness = 1.0
    ds.Rows = ds.Columns = size
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    rng = np.random.default_rng(seed * 100003 + index)
    ds.PixelData = rng.integers(0, 4096, (size, size), dtype=np.uint16).tobytes()
    return ds


def mr_series(count: int, *, size: int = 32, study_uid: str | None = None, seed: int = 0) -> list[Dataset]:
    """``count`` slices of one new series (in a new study unless ``study_uid`` is given)."""
    study_uid = study_uid or generate_uid()
    series_uid = generate_uid()
    return [mr_slice(study_uid, series_uid, i, size=size, seed=seed) for i in range(count)]


def write_series(datasets: list[Dataset], folder: Path) -> list[Path]:
    """Write each data set as a DICOM file; returns the paths in order."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for ds in datasets:
        path = folder / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
