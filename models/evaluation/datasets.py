"""Labelled datasets on disk: which cases a folder holds and how one case is read, in the layouts sites have.

Researchers share lesion datasets as NIfTI folders and sites keep DICOM studies with lesions outlined as
DICOM SEG; evaluation needs each case as an image and a binary lesion mask on exactly that image's grid.

- ``brats``: one folder per case, ``<case>/<case>_{t1,t1ce,t2,flair,seg}.nii.gz`` (BraTS 2023 names,
  ``<case>-{t1n,t1c,t2w,t2f,seg}.nii.gz``, are read too). Any non-zero label value is lesion.
- ``pairs``: ``images/<id>.<ext>`` with ``labels/<id>.<ext>`` (ATLAS, nnU-Net's ``imagesTr``/``labelsTr``);
  nnU-Net's channel suffix ``_0000`` is stripped and its other channels are left out.
- ``dicom``: one folder per case holding a DICOM image series and one DICOM SEG that references it. The
  label is the union of all segments, placed slice by slice through the SEG frames' references to the
  series' instances (never through the frames' own geometry), so a SEG that omits empty frames works.

``find_healthy`` lists lesion-free scans (image files and DICOM series, as training reads them). Problems
with one case (a missing or unreadable file, a label on another grid) are raised by ``load_case``, so a
caller can skip that case and go on; problems with the dataset as a whole are raised by ``find_dataset``.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import highdicom as hd
import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.misc import is_dicom

from models.data.volumes import IMAGE_SUFFIXES, DataError, ImageSource, find_sources

Layout = Literal["brats", "pairs", "dicom"]
LAYOUTS: tuple[str, ...] = ("brats", "pairs", "dicom")
MODALITIES = ("t1", "t2", "flair")
SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
# A label may sit this far from its image's grid (rounding in the writing tool), in mm and in direction cosines.
GRID_TOLERANCE_MM = 1e-3
DIRECTION_TOLERANCE = 1e-4

# BraTS up to 2021 names contrasts t1/t1ce/t2/flair; from 2023 on t1n/t1c/t2w/t2f, after "-" instead of "_".
_BRATS_NAMES = {"t1": ("t1", "t1n"), "t2": ("t2", "t2w"), "flair": ("flair", "t2f")}
_BRATS_SUFFIX = re.compile(r"[_-](t1|t1ce|t2|flair|t1n|t1c|t2w|t2f|seg)\.nii(\.gz)?")
_PAIR_FOLDERS = (("images", "labels"), ("imagesTr", "labelsTr"))
_CHANNEL = re.compile(r"(.+)_(\d{4})")  # nnU-Net: <case>_<channel>, channel 0000 first
_LOOKED_FOR = {
    "brats": "case folders holding <case>_t1.nii.gz ... and <case>_seg.nii.gz",
    "pairs": "images/ and labels/ folders of image files with the same names",
    "dicom": "case folders holding a DICOM series and a DICOM SEG",
}


class DatasetError(ValueError):
    """A dataset or one of its cases cannot be used; the message names the folder or file and says why in one line."""


@dataclass(frozen=True)
class DatasetCase:
    """Where one case's files are; nothing is read until ``load_case``."""

    id: str  # the case folder's name (brats, dicom), the image's name without extension (pairs, healthy)
    image: tuple[Path, ...]  # one image file, or the files of one DICOM series (in GDCM's sorted order)
    label: Path | None  # the label image or the DICOM SEG; None for healthy scans. A dicom case folder that
    # has no single usable SEG and image series is its own label: load_case says what is wrong with it.
    layout: str  # "brats" | "pairs" | "dicom" | "healthy"


def find_dataset(folder: Path, layout: str = "auto", modality: str = "t1") -> tuple[str, list[DatasetCase]]:
    """The layout (detected when ``layout`` is "auto") and the cases, sorted by id.

    ``modality`` picks the image of a BraTS case. Raises DatasetError for a folder with no cases, or one
    that could be read in more than one layout (detection never guesses).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"{folder}: not a folder")
    if modality not in MODALITIES:
        raise DatasetError(f"unknown modality {modality!r}; expected one of {', '.join(MODALITIES)}")
    if layout == "auto":
        layout = _detect(folder)
    elif layout not in LAYOUTS:
        raise DatasetError(f"unknown layout {layout!r}; expected auto or one of {', '.join(LAYOUTS)}")
    if layout == "brats":
        cases = [_brats_case(case, modality) for case in _brats_folders(folder)]
    elif layout == "pairs":
        cases = _pair_cases(folder)
    else:
        cases = [_dicom_case(case)[0] for case in _dicom_folders(folder)]
    if not cases:
        raise DatasetError(f"{folder}: no {layout} cases found (looked for {_LOOKED_FOR[layout]})")
    return layout, sorted(cases, key=lambda case: case.id)


def find_healthy(folder: Path) -> list[DatasetCase]:
    """Lesion-free scans below ``folder``: NIfTI, MHA/MHD and NRRD files and DICOM series, sorted by id.

    Found exactly as training finds a site's scans. Ids are the path relative to ``folder`` without the
    extension, or the series' folder (with the series UID when a folder holds several).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"{folder}: not a folder")
    try:
        sources = find_sources(folder)
    except DataError as error:
        raise DatasetError(f"{folder}: {error}") from error
    if not sources:
        raise DatasetError(f"{folder}: no NIfTI, MHA, NRRD or DICOM series found")
    ids = _healthy_ids(folder, sources)
    cases = [
        DatasetCase(id=i, image=source.files, label=None, layout="healthy")
        for i, source in zip(ids, sources, strict=True)
    ]
    return sorted(cases, key=lambda case: case.id)


def load_case(case: DatasetCase) -> tuple[sitk.Image, sitk.Image | None]:
    """The image and its lesion mask (UInt8, 1 = lesion) on exactly the image's grid; None for healthy scans.

    Raises DatasetError naming the file for a missing or unreadable file, an image that is not one 3D
    greyscale volume, a label whose grid differs from the image's, or a SEG that does not fit the series.
    """
    if case.layout == "dicom" and case.label is not None and case.label.is_dir():
        problem = _dicom_case(case.label)[1] or "changed since the dataset was listed; list it again"
        raise DatasetError(f"{case.label}: {problem}")
    image = _read(case.image)
    if case.label is None:
        return image, None
    if case.layout == "dicom":
        lesion = _segmentation_mask(case.label, case.image, image)
    else:
        lesion = _label_mask(case.label, image)
    label = sitk.GetImageFromArray(lesion.astype(np.uint8))
    label.CopyInformation(image)
    return image, label


# --- layouts -------------------------------------------------------------------------------------------


def _detect(folder: Path) -> str:
    found = {
        "brats": _count(len(_brats_folders(folder)), "brats-style case folder"),
        "pairs": " and ".join(f"an {images.name}/{labels.name} pair" for images, labels in _pair_folders(folder)),
        "dicom": _count(len(_dicom_folders(folder)), "case folder") + " of DICOM files",
    }
    matches = [layout for layout, what in found.items() if what and not what.startswith("0 ")]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        looked_for = "; ".join(f"{layout}: {what}" for layout, what in _LOOKED_FOR.items())
        raise DatasetError(f"{folder}: no dataset found (looked for {looked_for})")
    listed = " and ".join(found[layout] for layout in matches)
    raise DatasetError(f"{folder}: found {listed}; choose a layout ({', '.join(matches)})")


def _count(number: int, what: str) -> str:
    return f"{number} {what}{'' if number == 1 else 's'}"


def _subfolders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _brats_folders(folder: Path) -> list[Path]:
    """Subfolders holding at least one ``<folder name>_<contrast or seg>.nii[.gz]`` file."""
    return [
        case
        for case in _subfolders(folder)
        if any(
            path.name.startswith(case.name) and _BRATS_SUFFIX.fullmatch(path.name[len(case.name) :])
            for path in case.iterdir()
        )
    ]


def _brats_case(folder: Path, modality: str) -> DatasetCase:
    image = _brats_file(folder, _BRATS_NAMES[modality])
    return DatasetCase(id=folder.name, image=(image,), label=_brats_file(folder, ("seg",)), layout="brats")


def _brats_file(folder: Path, names: tuple[str, ...]) -> Path:
    """The first of the names' files that exists; the plain BraTS name when none does (load_case reports it)."""
    candidates = [
        folder / f"{folder.name}{separator}{name}{suffix}"
        for name in names
        for separator in "_-"
        for suffix in (".nii.gz", ".nii")
    ]
    return next((path for path in candidates if path.is_file()), candidates[0])


def _pair_folders(folder: Path) -> list[tuple[Path, Path]]:
    """The (images, labels) folder pairs present, ``images``/``labels`` first."""
    pairs = [(folder / images, folder / labels) for images, labels in _PAIR_FOLDERS]
    return [(images, labels) for images, labels in pairs if images.is_dir() and labels.is_dir()]


def _pair_cases(folder: Path) -> list[DatasetCase]:
    if not (pairs := _pair_folders(folder)):
        return []
    images, labels = pairs[0]
    files = {
        _image_stem(path.name): path for path in sorted(images.iterdir()) if path.is_file() and _image_stem(path.name)
    }
    cases: dict[str, DatasetCase] = {}
    for stem, path in files.items():
        channel = _CHANNEL.fullmatch(stem)
        if channel and channel[2] != "0000" and f"{channel[1]}_0000" in files:
            continue  # another nnU-Net channel of a case: the model reads one contrast, channel 0000
        case_id = channel[1] if channel and channel[2] == "0000" else stem
        if case_id in cases:
            raise DatasetError(f"{path}: a second image of case {case_id} ({cases[case_id].image[0].name})")
        suffix = path.name[len(stem) :]
        candidates = [labels / f"{case_id}{ending}" for ending in (suffix, *IMAGE_SUFFIXES)]
        label = next((candidate for candidate in candidates if candidate.is_file()), candidates[0])
        cases[case_id] = DatasetCase(id=case_id, image=(path,), label=label, layout="pairs")
    return list(cases.values())


def _image_stem(name: str) -> str:
    """The name without its image extension; "" when it is no image file's name."""
    suffix = next((s for s in IMAGE_SUFFIXES if name.lower().endswith(s)), None)
    return name[: -len(suffix)] if suffix else ""


def _dicom_folders(folder: Path) -> list[Path]:
    """Subfolders with a DICOM file anywhere below them (a case's series may sit in a subfolder)."""
    return [case for case in _subfolders(folder) if any(p.is_file() and is_dicom(p) for p in case.rglob("*"))]


def _dicom_case(folder: Path) -> tuple[DatasetCase, str | None]:
    """The case of a folder of DICOM files and, when it cannot be evaluated, why (the case is then its own label).

    The image is the folder's one image series, or the one the SEG references when there are several.
    """
    try:
        sources = [source for source in find_sources(folder) if source.series]
    except DataError as error:
        return DatasetCase(folder.name, (), folder, "dicom"), str(error)
    headers = [_header(source.files[0]) for source in sources]
    segmentations = [s.files for s, h in zip(sources, headers, strict=True) if h.SOPClassUID == SEGMENTATION_STORAGE]
    series = {
        h.SeriesInstanceUID: s.files
        for s, h in zip(sources, headers, strict=True)
        if h.SOPClassUID != SEGMENTATION_STORAGE
    }
    seg = [path for files in segmentations for path in files]
    if len(seg) != 1:
        problem = f"{len(seg)} DICOM SEG files; a case needs exactly one"
    elif not series:
        problem = "no DICOM image series"
    elif len(series) > 1:
        referenced = {item.SeriesInstanceUID for item in _header(seg[0]).get("ReferencedSeriesSequence", [])}
        count, series = len(series), {uid: files for uid, files in series.items() if uid in referenced}
        problem = (
            None if len(series) == 1 else f"{count} image series, {len(series)} referenced by the SEG; one is needed"
        )
    else:
        problem = None
    image = next(iter(series.values())) if len(series) == 1 else ()
    return DatasetCase(folder.name, image, folder if problem else seg[0], "dicom"), problem


def _healthy_ids(folder: Path, sources: list[ImageSource]) -> list[str]:
    """Short ids; the sources' names (paths relative to ``folder``) where the short ones would collide."""
    per_folder = Counter(source.files[0].parent for source in sources if source.series)
    ids = []
    for source in sources:
        relative = source.files[0].parent.relative_to(folder).as_posix()
        if not source.series:
            ids.append(_image_stem(source.name))
        elif per_folder[source.files[0].parent] > 1:
            ids.append(source.name.removeprefix("./"))
        else:
            ids.append(folder.name if relative == "." else relative)
    return ids if len(set(ids)) == len(ids) else [source.name for source in sources]


# --- reading -------------------------------------------------------------------------------------------


def _read(files: tuple[Path, ...]) -> sitk.Image:
    """One 3D greyscale volume from an image file or a DICOM series."""
    if not files:
        raise DatasetError("no image files")
    for path in files:
        if not path.is_file():
            raise DatasetError(f"{path}: missing")
    series = len(files) > 1 or not files[0].name.lower().endswith(IMAGE_SUFFIXES)
    name = str(files[0].parent if series else files[0])
    try:
        image = ImageSource(name=name, files=files, series=series).read()
    except DataError as error:
        raise DatasetError(str(error)) from error
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise DatasetError(
            f"{name}: a {image.GetDimension()}D image with {image.GetNumberOfComponentsPerPixel()} values per voxel; "
            "one 3D greyscale volume is needed"
        )
    return image


def _label_mask(path: Path, image: sitk.Image) -> np.ndarray:
    """Lesion voxels of a label image: non-zero integers, or >= 0.5 for a float (probability) label."""
    label = _read((path,))
    _check_grid(path, label, image)
    values = sitk.GetArrayViewFromImage(label)
    return values >= 0.5 if np.issubdtype(values.dtype, np.floating) else values != 0


def _check_grid(path: Path, label: sitk.Image, image: sitk.Image) -> None:
    checks = (
        ("size", label.GetSize(), image.GetSize(), 0),
        ("spacing", label.GetSpacing(), image.GetSpacing(), GRID_TOLERANCE_MM),
        ("origin", label.GetOrigin(), image.GetOrigin(), GRID_TOLERANCE_MM),
        ("direction", label.GetDirection(), image.GetDirection(), DIRECTION_TOLERANCE),
    )
    for what, theirs, ours, tolerance in checks:
        if np.max(np.abs(np.subtract(theirs, ours))) > tolerance:
            raise DatasetError(
                f"{path}: the label's grid is not the image's ({what} {_numbers(theirs)} vs {_numbers(ours)})"
            )


def _numbers(values: tuple[float, ...]) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"


def _header(path: Path) -> pydicom.Dataset:
    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except Exception as error:  # a malformed file makes pydicom raise almost any error type
        raise DatasetError(f"{path}: not a readable DICOM file ({error})") from error


def _segmentation_mask(path: Path, files: tuple[Path, ...], image: sitk.Image) -> np.ndarray:
    """The union of a SEG's segments on the series' slices, found through each frame's referenced instance."""
    instances = [str(_header(file).SOPInstanceUID) for file in files]
    if len(instances) != image.GetDepth():
        raise DatasetError(f"{files[0]}: a multi-frame image; only series of single-frame images are read")
    try:
        segmentation = hd.seg.segread(path)
    except Exception as error:  # a malformed file makes pydicom and highdicom raise almost any error type
        raise DatasetError(f"{path}: not a readable DICOM SEG ({error})") from error
    references, preserved = _frame_references(segmentation)
    in_series = [bool(frame & set(instances)) for frame in references]
    if not any(in_series):
        raise DatasetError(f"{path}: the SEG references no image of the series in {files[0].parent}")
    if not all(in_series):
        raise DatasetError(f"{path}: {in_series.count(False)} of its frames reference no image of the series")
    if preserved - {"YES"}:
        raise DatasetError(f"{path}: its frames say spatial locations were not preserved from the source images")
    width, height = image.GetSize()[:2]
    if (segmentation.Rows, segmentation.Columns) != (height, width):
        raise DatasetError(
            f"{path}: frames of {segmentation.Rows}x{segmentation.Columns}, the series' images are {height}x{width}"
        )
    try:
        pixels = segmentation.get_pixels_by_source_instance(
            source_sop_instance_uids=instances,
            ignore_spatial_locations=True,  # checked above: highdicom would also refuse frames that leave it unsaid
            assert_missing_frames_are_empty=True,  # slices without a frame (omitted as empty) are 0
        )
    except (KeyError, ValueError, RuntimeError) as error:
        raise DatasetError(f"{path}: its frames cannot be placed on the series ({error})") from error
    return (pixels >= 0.5).any(axis=-1)  # (slices, rows, columns, segments): any segment, FRACTIONAL >= 0.5


def _frame_references(segmentation: hd.seg.Segmentation) -> tuple[list[set[str]], set[str]]:
    """Per frame, the source instances it was derived from; and every SpatialLocationsPreserved value given."""
    references, preserved = [], set()
    for frame in segmentation.get("PerFrameFunctionalGroupsSequence", []):
        instances = set()
        for derivation in frame.get("DerivationImageSequence", []):
            for source in derivation.get("SourceImageSequence", []):
                instances.add(str(source.ReferencedSOPInstanceUID))
                if "SpatialLocationsPreserved" in source:
                    preserved.add(str(source.SpatialLocationsPreserved))
        references.append(instances)
    return references, preserved
