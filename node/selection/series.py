"""A series as the selection rules see it: its instance headers, and the few facts read from them.

Selection runs on headers only (files read with ``stop_before_pixels``), so a
500-image series costs a few megabytes, not a few hundred. Enhanced MR keeps
most per-image facts in functional groups instead of the top level; this module
is the one place that knows both layouts, so the rules never have to.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import repeat
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset

# NumberOfFrames is the sender's claim and sizes nothing on its own: beyond this many frames an instance is
# counted as this many (no MR instance comes near it; an Enhanced MR of a long fMRI run has a few thousand).
# Trusting it made one instance claiming 2**31-1 frames allocate 16 GB in serve and get it OOM-killed.
MAX_FRAMES = 65_536

# The free-text names that describe what a series is, most specific first: the description is set per
# series; GE puts the whole exam's protocol name in ProtocolName; SequenceName and (Enhanced MR)
# PulseSequenceName name the pulse sequence.
NAME_ATTRIBUTES = ("SeriesDescription", "ProtocolName", "SequenceName", "PulseSequenceName")


@dataclass(frozen=True)
class SeriesHeaders:
    """The headers of every instance of one series (pixel data need not be, and should not be, read)."""

    series_uid: str
    instances: tuple[Dataset, ...]

    def __post_init__(self) -> None:
        if not self.instances:
            raise ValueError(f"series {self.series_uid} has no instances")
        strangers = [_text(ds.get("SOPInstanceUID")) for ds in self.instances if _series_uid(ds) != self.series_uid]
        if strangers:
            raise ValueError(f"instances {strangers} do not belong to series {self.series_uid}")


def read_headers(paths: Iterable[Path]) -> list[Dataset]:
    """Headers of stored files, without pixel data (selection never needs it)."""
    return [dcmread(path, stop_before_pixels=True) for path in paths]


def group_by_series(datasets: Iterable[Dataset]) -> list[SeriesHeaders]:
    """Split instance headers into series by SeriesInstanceUID, in the order each series is first seen."""
    groups: dict[str, list[Dataset]] = {}
    for ds in datasets:
        uid = _series_uid(ds)
        if not uid:
            raise ValueError(f"instance {_text(ds.get('SOPInstanceUID')) or '(no SOPInstanceUID)'} has no series UID")
        groups.setdefault(uid, []).append(ds)
    return [SeriesHeaders(uid, tuple(instances)) for uid, instances in groups.items()]


@dataclass(frozen=True)
class Timing:
    """Acquisition timing in ms; each is the value most images of the series carry, None when absent."""

    repetition_ms: float | None
    echo_ms: float | None
    inversion_ms: float | None

    def __str__(self) -> str:
        values = (("TR", self.repetition_ms), ("TE", self.echo_ms), ("TI", self.inversion_ms))
        return ", ".join(f"{name} {value:g} ms" if value is not None else f"{name} none" for name, value in values)


@dataclass(frozen=True)
class SeriesSummary:
    """What the selection rules look at, gathered over every instance and every frame of a series."""

    series_uid: str
    modalities: tuple[str, ...]  # distinct values, first seen first; "" when an instance has none
    sop_class_uids: tuple[str, ...]
    image_types: tuple[str, ...]  # distinct ImageType values, plus FrameType values of Enhanced MR frames
    names: tuple[tuple[str, str], ...]  # (attribute keyword, value): distinct non-empty values, NAME_ATTRIBUTES order
    images: int  # frames over all instances (a single-frame instance is one)
    slices: int  # distinct slice positions when every image has its own, otherwise ``images``
    timing: Timing
    max_b_value: float | None  # largest DiffusionBValue of any image, None when no image has one


def summarise(series: SeriesHeaders) -> SeriesSummary:
    """Gather the facts the rules need, from top-level attributes and Enhanced MR functional groups alike."""
    modalities: dict[str, None] = {}
    sop_classes: dict[str, None] = {}
    image_types: dict[str, None] = {}
    names: dict[tuple[str, str], None] = {}
    images: list[_Image] = []
    for ds in series.instances:
        modalities[_text(ds.get("Modality")).upper()] = None
        sop_classes[_text(ds.get("SOPClassUID"))] = None
        for value in _values(ds.get("ImageType")):
            image_types[value] = None
        for keyword in NAME_ATTRIBUTES:
            if value := _text(ds.get(keyword)):
                names[(keyword, value)] = None
        for image in _images(ds):
            images.append(image)
            for value in image.frame_type:
                image_types[value] = None
    positions = [image.position for image in images]
    slices = len(set(positions)) if None not in positions else len(images)
    b_values = [image.b_value for image in images if image.b_value is not None]
    return SeriesSummary(
        series_uid=series.series_uid,
        modalities=tuple(modalities),
        sop_class_uids=tuple(sop_classes),
        image_types=tuple(image_types),
        names=tuple(sorted(names, key=lambda name: NAME_ATTRIBUTES.index(name[0]))),
        images=len(images),
        slices=slices,
        timing=Timing(
            repetition_ms=_most_common(image.repetition_ms for image in images),
            echo_ms=_most_common(image.echo_ms for image in images),
            inversion_ms=_most_common(image.inversion_ms for image in images),
        ),
        max_b_value=max(b_values) if b_values else None,
    )


@dataclass(frozen=True)
class _Image:
    """One frame's facts, wherever its instance keeps them."""

    position: tuple[float, ...] | None
    repetition_ms: float | None
    echo_ms: float | None
    inversion_ms: float | None
    b_value: float | None
    frame_type: tuple[str, ...]


def _images(ds: Dataset) -> Iterator[_Image]:
    """Every frame of an instance. Enhanced MR: the frame's per-frame group, then the shared group.
    A multi-frame instance without functional groups gives its frames no position of their own."""
    shared = ds.get("SharedFunctionalGroupsSequence")
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    frames = min(max(_int(ds.get("NumberOfFrames")) or 1, 1), MAX_FRAMES)
    if not shared and not per_frame:
        position = _position(ds.get("ImagePositionPatient")) if frames == 1 else None
        image = _Image(
            position=position,
            repetition_ms=_number(ds.get("RepetitionTime")),
            echo_ms=_number(ds.get("EchoTime")),
            inversion_ms=_positive(_number(ds.get("InversionTime"))),
            b_value=_number(ds.get("DiffusionBValue")),
            frame_type=(),
        )
        yield from repeat(image, frames)
        return
    shared_item = (shared[0],) if shared else ()
    for index in range(min(max(frames, len(per_frame or ())), MAX_FRAMES)):
        groups = ((per_frame[index],) if per_frame and index < len(per_frame) else ()) + shared_item
        yield _Image(
            position=_position(_macro(groups, "PlanePositionSequence", "ImagePositionPatient")),
            repetition_ms=_number(_macro(groups, "MRTimingAndRelatedParametersSequence", "RepetitionTime")),
            echo_ms=_number(_macro(groups, "MREchoSequence", "EffectiveEchoTime")),
            inversion_ms=_positive(_number(_macro(groups, "MRModifierSequence", "InversionTimes"))),
            b_value=_number(_macro(groups, "MRDiffusionSequence", "DiffusionBValue")),
            frame_type=_values(_macro(groups, "MRImageFrameTypeSequence", "FrameType")),
        )


def _macro(groups: tuple[Dataset, ...], sequence: str, keyword: str) -> object:
    """An attribute of a functional group macro, from the first group item that has it."""
    for group in groups:
        items = group.get(sequence)
        if items:
            value = items[0].get(keyword)
            if value is not None and value != "":
                return value
    return None


def _most_common(values: Iterable[float | None]) -> float | None:
    """The value most images carry (ties: the smallest), so one odd image does not decide a series."""
    counts = Counter(value for value in values if value is not None)
    if not counts:
        return None
    return min(counts, key=lambda value: (-counts[value], value))


def _series_uid(ds: Dataset) -> str:
    return _text(ds.get("SeriesInstanceUID"))


def _text(value: object) -> str:
    return str(value).strip() if value is not None else ""


def _values(value: object) -> tuple[str, ...]:
    """A multi-valued CS as upper-case strings (pydicom gives a str for one value, a list for more)."""
    if value is None or value == "":
        return ()
    items = [value] if isinstance(value, str) else list(value)  # type: ignore[call-overload]
    return tuple(text for item in items if (text := _text(item).upper()))


def _first(value: object) -> object:
    if value is None or isinstance(value, str | bytes) or not hasattr(value, "__len__"):
        return value
    return value[0] if len(value) else None  # type: ignore[index, arg-type]


def _number(value: object) -> float | None:
    try:
        return float(_first(value))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def _positive(value: float | None) -> float | None:
    """Some scanners write TI 0 for sequences without inversion."""
    return value if value is not None and value > 0 else None


def _int(value: object) -> int | None:
    try:
        return int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return None


def _position(value: object) -> tuple[float, ...] | None:
    """Image position rounded to 0.01 mm, so re-encoded decimal strings still compare equal."""
    try:
        numbers = tuple(round(float(v), 2) for v in value)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        return None
    return numbers if len(numbers) == 3 else None
