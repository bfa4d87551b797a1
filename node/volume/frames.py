"""The 2D frames of a series, read from DICOM headers: where each lies, its pixel grid, its rescale,
and which instance (and frame) it comes from.

Single-frame MR images carry these attributes at the top level. Enhanced (and Legacy Converted
Enhanced) MR carry them in functional groups, per frame or once for all frames in the shared
groups; a per-frame item wins over a shared one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from node.volume.rejection import VolumeRejected


@dataclass(frozen=True)
class SliceSource:
    """The image one slice of a volume came from, as a SEG must reference it."""

    sop_instance_uid: str
    frame_number: int | None  # 1-based within a multi-frame instance; None for a single-frame one
    sop_class_uid: str

    @property
    def label(self) -> str:
        """How a rejection reason names this image."""
        frame = f" frame {self.frame_number}" if self.frame_number is not None else ""
        return f"instance {self.sop_instance_uid}{frame}"


@dataclass(frozen=True)
class Frame:
    """One 2D image of the series and everything needed to place it in a 3D grid."""

    source: SliceSource
    instance: int  # index of its instance in the caller's list: where its pixels are read from
    position: tuple[float, ...]  # ImagePositionPatient (3): centre of the first pixel, mm, LPS
    orientation: tuple[float, ...]  # ImageOrientationPatient (6): row cosine, then column cosine
    pixel_spacing: tuple[float, ...]  # PixelSpacing (2): between rows, then between columns, mm
    rows: int
    columns: int
    slope: float
    intercept: float


def read_frames(ds: Dataset, instance: int) -> list[Frame]:
    """Every frame of one instance, in file order; raises VolumeRejected naming what is missing or malformed."""
    uid = str(ds.get("SOPInstanceUID", "")).strip()
    if not uid:
        raise VolumeRejected(f"instance {instance + 1} of the list has no SOP Instance UID")
    sop_class_uid = str(ds.get("SOPClassUID", "")).strip()
    where = f"instance {uid}"
    rows, columns = _count(ds, "Rows", where), _count(ds, "Columns", where)
    if (samples := ds.get("SamplesPerPixel", 1)) != 1:
        raise VolumeRejected(f"{where} has {samples} samples per pixel; only greyscale images make a volume")

    def frame(
        number: int | None, position: Dataset, orientation: Dataset, measures: Dataset, rescale: Dataset
    ) -> Frame:
        source = SliceSource(uid, number, sop_class_uid)
        slope, intercept = _rescale(rescale, source.label)
        return Frame(
            source=source,
            instance=instance,
            position=_numbers(position, "ImagePositionPatient", 3, source.label),
            orientation=_numbers(orientation, "ImageOrientationPatient", 6, source.label),
            pixel_spacing=_numbers(measures, "PixelSpacing", 2, source.label),
            rows=rows,
            columns=columns,
            slope=slope,
            intercept=intercept,
        )

    if "PerFrameFunctionalGroupsSequence" not in ds and "SharedFunctionalGroupsSequence" not in ds:
        if _count(ds, "NumberOfFrames", where, default=1) != 1:
            raise VolumeRejected(f"{where} has several frames but no functional groups to place them")
        return [frame(None, ds, ds, ds, ds)]

    count = _count(ds, "NumberOfFrames", where)
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    if len(per_frame) not in (0, count):
        raise VolumeRejected(f"{where} has {count} frames but {len(per_frame)} per-frame functional group items")
    shared = list(ds.get("SharedFunctionalGroupsSequence") or [])[:1]
    frames = []
    for number in range(1, count + 1):
        groups = ([per_frame[number - 1]] if per_frame else []) + shared
        here = f"{where} frame {number}"
        frames.append(
            frame(
                number,
                _required_item(groups, "PlanePositionSequence", here),
                _required_item(groups, "PlaneOrientationSequence", here),
                _required_item(groups, "PixelMeasuresSequence", here),
                _item(groups, "PixelValueTransformationSequence") or Dataset(),
            )
        )
    return frames


def _item(groups: list[Dataset], sequence: str) -> Dataset | None:
    """The first item of ``sequence`` in the first functional groups that have it (per-frame before shared)."""
    for candidate in groups:
        if candidate.get(sequence):
            return candidate[sequence][0]
    return None


def _required_item(groups: list[Dataset], sequence: str, where: str) -> Dataset:
    item = _item(groups, sequence)
    if item is None:
        raise VolumeRejected(f"{where} has no {sequence} in its functional groups")
    return item


def _numbers(ds: Dataset, keyword: str, count: int, where: str) -> tuple[float, ...]:
    value = ds.get(keyword)
    if value is None or value == "":
        raise VolumeRejected(f"{where} has no {keyword}")
    try:
        numbers = tuple(float(v) for v in (value if isinstance(value, MultiValue | list) else [value]))
    except (TypeError, ValueError):
        raise VolumeRejected(f"{where} has a malformed {keyword}") from None
    if len(numbers) != count or not all(math.isfinite(n) for n in numbers):
        raise VolumeRejected(f"{where} has a malformed {keyword} (expected {count} finite numbers)")
    return numbers


def _count(ds: Dataset, keyword: str, where: str, default: int | None = None) -> int:
    value = ds.get(keyword, default)
    try:
        number = int(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise VolumeRejected(f"{where} has no usable {keyword}") from None
    if number < 1:
        raise VolumeRejected(f"{where} has {keyword} {number}")
    return number


def _rescale(ds: Dataset, where: str) -> tuple[float, float]:
    """Slope and intercept; their absence means the stored values are the real values."""
    slope = _numbers(ds, "RescaleSlope", 1, where)[0] if "RescaleSlope" in ds else 1.0
    intercept = _numbers(ds, "RescaleIntercept", 1, where)[0] if "RescaleIntercept" in ds else 0.0
    if slope == 0:
        raise VolumeRejected(f"{where} has a RescaleSlope of 0")
    return slope, intercept
