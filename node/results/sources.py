"""The source images a result refers to, and what every result object copies from them or shares.

Results belong to the source study (same patient and study attributes), name the equipment that made
them, and say "research use only". The source data sets may be full images or headers read without
pixel data; only headers are ever used here.
"""

from __future__ import annotations

import copy
import socket
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

import node
from node.config import ResultsSection
from node.volume import SeriesVolume, SliceSource

RESEARCH_NOTICE = "RESEARCH USE ONLY - NOT FOR DIAGNOSIS"
MODEL_NAME = "uad-node"

# Patient and study attributes a result copies; highdicom reads them as attributes, so a source
# missing one (Type 2 means present, possibly empty) would otherwise fail the build.
_STUDY_ATTRIBUTES = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
)
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


def new_uid() -> str:
    """A fresh UUID-derived UID (2.25...): every build gets new ones, because a PACS that already holds a
    UID (Orthanc, others) silently keeps the old object."""
    return generate_uid(prefix=None)


@dataclass(frozen=True)
class Equipment:
    """Who made a result object (General and Enhanced General Equipment modules)."""

    manufacturer: str
    model_name: str
    software_versions: str
    device_serial_number: str
    institution_name: str | None


def equipment(options: ResultsSection) -> Equipment:
    return Equipment(
        manufacturer=options.manufacturer,
        model_name=MODEL_NAME,
        software_versions=node.__version__,
        device_serial_number=options.device_serial_number or socket.gethostname()[:64] or "unknown",
        institution_name=options.institution_name or None,
    )


def header_only(ds: Dataset) -> Dataset:
    """A copy of ``ds`` without pixel data, with the Type 2 patient/study attributes present (empty when the
    source lacks them), so highdicom can copy them and the caller's data set stays untouched."""
    header = Dataset()
    for element in ds:
        if element.keyword not in _PIXEL_KEYWORDS:
            header.add(copy.deepcopy(element))
    for keyword in _STUDY_ATTRIBUTES:
        if keyword not in header:
            setattr(header, keyword, "")
    return header


def sources_by_uid(series: SeriesVolume, sources: Sequence[Dataset]) -> dict[str, Dataset]:
    """The source data set of every SOP instance the volume's slices came from, by SOP Instance UID; raises
    ValueError naming a missing one (a result must reference the images it was computed from)."""
    by_uid = {str(ds.SOPInstanceUID): ds for ds in sources}
    missing = sorted({s.sop_instance_uid for s in series.slice_sources} - set(by_uid))
    if missing:
        raise ValueError(f"{len(missing)} source instance(s) of the volume were not given, e.g. {missing[0]}")
    first = by_uid[series.slice_sources[0].sop_instance_uid]
    if str(first.get("SeriesInstanceUID", "")) != series.series_instance_uid:
        raise ValueError("the source data sets belong to another series than the volume")
    return by_uid


def study_attributes(ds: Dataset) -> dict[str, object]:
    """Patient and study identity of a source, as highdicom's SOPClass arguments (same patient, same study)."""
    return {
        "study_instance_uid": str(ds.StudyInstanceUID),
        "patient_id": ds.get("PatientID") or None,
        "patient_name": ds.get("PatientName") or None,
        "patient_birth_date": ds.get("PatientBirthDate") or None,
        "patient_sex": ds.get("PatientSex") or None,
        "accession_number": ds.get("AccessionNumber") or None,
        "study_id": ds.get("StudyID") or None,
        "study_date": ds.get("StudyDate") or None,
        "study_time": ds.get("StudyTime") or None,
        "referring_physician_name": ds.get("ReferringPhysicianName") or None,
    }


def image_reference(source: SliceSource) -> Dataset:
    """An item of ReferencedImageSequence / SourceImageSequence naming the image (and frame) of one slice."""
    item = Dataset()
    item.ReferencedSOPClassUID = source.sop_class_uid
    item.ReferencedSOPInstanceUID = source.sop_instance_uid
    if source.frame_number is not None:
        item.ReferencedFrameNumber = source.frame_number
    return item


def patient_orientation(series: SeriesVolume) -> tuple[str, str]:
    """PatientOrientation (0020,0020) of the series' slices: the patient directions along a row (left to right)
    and down a column, as letters by decreasing weight (e.g. "L", "PF" for an oblique axial)."""
    direction = np.reshape(series.image.GetDirection(), (3, 3))
    return _letters(direction[:, 0]), _letters(direction[:, 1])


def _letters(cosine: np.ndarray) -> str:
    """Up to three direction letters (LPS: +x left, +y posterior, +z head), main axis first; components below
    0.2 (about 12 degrees of tilt) are left out, as viewers do."""
    names = (("L", "R"), ("P", "A"), ("H", "F"))
    order = np.argsort(-np.abs(cosine), kind="stable")
    letters = [names[axis][0 if cosine[axis] > 0 else 1] for axis in order if abs(cosine[axis]) >= 0.2]
    return "".join(letters[:3]) or names[int(order[0])][0 if cosine[order[0]] > 0 else 1]


def slice_position_mm(series: SeriesVolume, k: int) -> float:
    """Where slice k lies along the slice normal, mm: the figure a viewer shows as slice location."""
    direction = np.reshape(series.image.GetDirection(), (3, 3))
    return float(np.dot(series.image.TransformIndexToPhysicalPoint((0, 0, k)), direction[:, 2]))
