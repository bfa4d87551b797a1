"""The stored instances of one series as one SimpleITK image.

Headers are read first, without pixel data, so a series is checked and sorted before any pixel is
decoded: a rejected series costs only its headers, and each instance's pixel data is read once.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataset import Dataset

from node.volume.frames import Frame, SliceSource, read_frames
from node.volume.geometry import regular_grid
from node.volume.rejection import VolumeRejected

Instance = str | os.PathLike[str] | Dataset


@dataclass(frozen=True)
class SeriesVolume:
    """A series as one image, and for every slice k the source image a SEG must reference for it."""

    image: sitk.Image  # float32, rescaled values, LPS geometry; k grows along row cosine x column cosine
    slice_sources: list[SliceSource]  # slice_sources[k]
    series_instance_uid: str
    frame_of_reference_uid: str  # "" when the instances carry none


def series_to_volume(instances: Sequence[Instance], *, min_slices: int = 3) -> SeriesVolume:
    """The volume the instances of one series form, in any file order; raises VolumeRejected(reason) when they
    form none.

    ``instances`` are file paths or pydicom data sets (single-frame MR, or multi-frame Enhanced MR with
    functional groups), in any mix. Anything wrong with the input is a VolumeRejected, never another error.
    """
    if min_slices < 2:
        raise ValueError("min_slices must be at least 2: the slice spacing needs two positions")
    headers = [_header(instance) for instance in instances]
    series_uid, frame_of_reference_uid = _one_series(headers)
    frames = [frame for index, ds in enumerate(headers) for frame in read_frames(ds, index)]
    grid = regular_grid(frames, min_slices)

    slices: dict[int, list[tuple[int, Frame]]] = {}  # instance -> (k, frame) for each of its frames
    for k, index in enumerate(grid.order):
        slices.setdefault(frames[index].instance, []).append((k, frames[index]))
    voxels = np.empty(grid.size[::-1], np.float32)
    for instance, placed in slices.items():
        pixels = _pixels(instances[instance], headers[instance])
        for k, frame in placed:
            stored = pixels[(frame.source.frame_number or 1) - 1]
            voxels[k] = stored * np.float32(frame.slope) + np.float32(frame.intercept)

    image = sitk.GetImageFromArray(voxels)
    image.SetOrigin(grid.origin)
    image.SetSpacing(grid.spacing)
    image.SetDirection(grid.direction)
    return SeriesVolume(image, [frames[index].source for index in grid.order], series_uid, frame_of_reference_uid)


def _header(instance: Instance) -> Dataset:
    if isinstance(instance, Dataset):
        return instance
    try:
        return pydicom.dcmread(instance, stop_before_pixels=True)
    except Exception as exc:  # pydicom raises many types on malformed files; all mean "unreadable"
        raise VolumeRejected(f"{Path(instance).name} is not a readable DICOM file ({_say(exc)})") from exc


def _one_series(headers: list[Dataset]) -> tuple[str, str]:
    """The series and frame of reference UIDs the instances share; positions in two frames of reference
    cannot be compared."""
    series = {str(ds.get("SeriesInstanceUID", "")) for ds in headers}
    if len(series) > 1:
        raise VolumeRejected(f"the instances belong to {len(series)} series; a volume is built from one")
    references = {str(ds.get("FrameOfReferenceUID", "")) for ds in headers} - {""}
    if len(references) > 1:
        raise VolumeRejected(f"the instances have {len(references)} frames of reference; their positions do not mix")
    return next(iter(series), ""), next(iter(references), "")


def _pixels(instance: Instance, header: Dataset) -> np.ndarray:
    """All frames of one instance as (frames, rows, columns)."""
    label = f"instance {header.SOPInstanceUID}"
    meta = getattr(header, "file_meta", Dataset())
    syntax = meta.TransferSyntaxUID.name if "TransferSyntaxUID" in meta else "transfer syntax unknown"
    try:
        ds = instance if isinstance(instance, Dataset) else pydicom.dcmread(instance)
    except Exception as exc:  # pydicom raises many types on malformed files; all mean "unreadable"
        raise VolumeRejected(f"the pixel data of {label} cannot be read ({syntax}): {_say(exc)}") from exc
    if "PixelData" not in ds:
        raise VolumeRejected(f"{label} has no pixel data")
    if not ds.PixelData:  # zero length: pydicom gives None or b"", and its decoders fail with a TypeError
        raise VolumeRejected(f"the pixel data of {label} is empty (zero length)")
    try:
        pixels = ds.pixel_array
    except Exception as exc:  # decoders raise many types for corrupt, truncated or undecodable pixel data
        raise VolumeRejected(f"the pixel data of {label} cannot be read ({syntax}): {_say(exc)}") from exc
    shape = (int(header.get("NumberOfFrames", 1)), int(header.Rows), int(header.Columns))
    if pixels.size != shape[0] * shape[1] * shape[2]:
        raise VolumeRejected(f"the pixel data of {label} holds {pixels.shape}, not {shape} (frames, rows, columns)")
    return pixels.reshape(shape)


def _say(exc: Exception) -> str:
    """An exception as one line of a reason."""
    return "; ".join(line.strip() for line in str(exc).splitlines() if line.strip()) or type(exc).__name__
