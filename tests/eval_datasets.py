"""Small labelled datasets in the layouts ``models.evaluation.datasets`` reads, written from a real brain.

For the tests of dataset evaluation, calibration and fine-tuning: each case is Colin27 (the evaluation
brain) on a 2 mm grid, turned and shifted a little (up to 4 degrees and 4 mm about each axis) and scaled
in intensity, so cases differ as scans of one subject on different days do. A lesion case carries one
lesion from the project's simulator (``models.evaluation.lesions``: an irregular tumour with oedema, dark
or bright on T1, or a dark wedge-shaped infarct, with soft edges), painted on the case's own grid; the
label is the voxels it visibly changed. Healthy scans are the same anatomy, varied, without a lesion.

BraTS-style T2 and FLAIR are the T1 remapped tissue by tissue (CSF, GM, WM measured on the case) into
each contrast's order, enough for a contrast check; T1ce is the T1. Every writer is deterministic for a
seed (DICOM UIDs apart) and returns the dataset folder.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.sr.codedict import codes
from scipy import ndimage

from models.evaluation.lesions import TissueLevels, simulate_lesion, tissue_levels
from node.demo.series_writer import write_mr_series
from tests import brains

SPACING_MM = 2.0
ROTATION_DEG = 4.0
TRANSLATION_MM = 4.0
GAIN = (0.8, 1.25)
KINDS = (("tumour", "dark"), ("tumour", "bright"), ("stroke", "dark"))  # cycled over a dataset's cases
# Tissue levels (CSF, GM, WM) of the other contrasts, relative to the brightest tissue; a T1 level above
# WM (a bright lesion, fat) keeps the WM level.
CONTRAST_LEVELS = {"t2": (1.0, 0.55, 0.35), "flair": (0.15, 0.9, 0.6)}
# What a DICOM source image must carry for highdicom to copy the patient and study into a SEG.
SEG_SOURCE_ATTRIBUTES = {"PatientBirthDate": "", "PatientSex": "O", "AccessionNumber": "", "ReferringPhysicianName": ""}
_SALTS = {"brats": 1, "pairs": 2, "dicom": 3, "healthy": 4}


def write_brats(folder: Path, cases: int, *, skull: bool = False, seed: int = 0) -> Path:
    """``<case>/<case>_{t1,t1ce,t2,flair,seg}.nii.gz``; the label is 2 (rim), 4 and 1 (core) as BraTS labels."""
    for index in range(cases):
        lesioned = _lesion_case(seed, "brats", index, skull)
        case = f"BraTS2021_{index:05d}"
        t1, levels = lesioned.image, tissue_levels(lesioned.image, lesioned.brain)
        contrasts = {"t1": t1, "t1ce": t1, **{name: _remapped(t1, levels, name) for name in CONTRAST_LEVELS}}
        for name, array in contrasts.items():
            _write_nifti(array, lesioned.grid, folder / case / f"{case}_{name}.nii.gz")
        _write_nifti(_brats_labels(lesioned.lesion), lesioned.grid, folder / case / f"{case}_seg.nii.gz")
    return folder


def write_pairs(folder: Path, cases: int, *, skull: bool = True, suffix: str = ".nii.gz", seed: int = 0) -> Path:
    """``images/<id><suffix>`` and ``labels/<id><suffix>`` (0/1), as ATLAS and nnU-Net lay them out."""
    for index in range(cases):
        lesioned = _lesion_case(seed, "pairs", index, skull)
        _write_nifti(lesioned.image, lesioned.grid, folder / "images" / f"case-{index:03d}{suffix}")
        _write_nifti(lesioned.lesion.astype(np.uint8), lesioned.grid, folder / "labels" / f"case-{index:03d}{suffix}")
    return folder


def write_dicom(folder: Path, cases: int, *, seed: int = 0) -> Path:
    """``case-NNN/``: a T1 MR series (one file per slice) and ``segmentation.dcm``, a BINARY SEG of the lesion
    that references the series and, as highdicom does by default, leaves out the frames with no lesion."""
    for index in range(cases):
        lesioned = _lesion_case(seed, "dicom", index, skull=True)
        case = folder / f"case-{index:03d}"
        image = _on_grid(lesioned.image, lesioned.grid)
        paths = write_mr_series(image, case, description="T1", attributes=SEG_SOURCE_ATTRIBUTES)
        _segmentation(paths, lesioned.lesion).save_as(case / "segmentation.dcm", enforce_file_format=True)
    return folder


def write_healthy(folder: Path, scans: int, *, skull: bool = True, seed: int = 0, dicom: bool = False) -> Path:
    """``healthy-NNN.nii.gz``, or with ``dicom`` one MR series per folder ``healthy-NNN/``; no lesion."""
    for index in range(scans):
        grid, brain = _varied(np.random.default_rng([seed, _SALTS["healthy"], index]), skull)
        array = sitk.GetArrayFromImage(grid)
        if not skull:
            array[~brain] = 0
        if dicom:
            write_mr_series(_on_grid(array, grid), folder / f"healthy-{index:03d}", description="T1")
        else:
            _write_nifti(array, grid, folder / f"healthy-{index:03d}.nii.gz")
    return folder


# --- anatomy and lesions -------------------------------------------------------------------------------


@functools.cache
def _colin27(skull: bool) -> tuple[sitk.Image, sitk.Image, sitk.Image]:
    """Colin27 (with or without skull), its brain mask as float (for linear resampling), and the 2 mm grid."""
    head = brains.colin27(skull=skull)
    grid = sitk.Image([round(n / SPACING_MM) for n in head.GetSize()], sitk.sitkFloat32)
    grid.SetSpacing([SPACING_MM] * 3)
    grid.SetOrigin(head.GetOrigin())
    grid.SetDirection(head.GetDirection())
    return head, sitk.Cast(brains.colin27_brain_mask(), sitk.sitkFloat32), grid


def _varied(rng: np.random.Generator, skull: bool) -> tuple[sitk.Image, np.ndarray]:
    """Colin27 turned, shifted and scaled in intensity on the 2 mm grid; its brain mask there (bool array)."""
    head, mask, grid = _colin27(skull)
    transform = sitk.Euler3DTransform()
    transform.SetCenter(head.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in head.GetSize()]))
    transform.SetRotation(*np.radians(rng.uniform(-ROTATION_DEG, ROTATION_DEG, 3)))
    transform.SetTranslation(rng.uniform(-TRANSLATION_MM, TRANSLATION_MM, 3).tolist())
    image = sitk.Resample(head, grid, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32) * rng.uniform(*GAIN)
    brain = sitk.GetArrayFromImage(sitk.Resample(mask, grid, transform, sitk.sitkLinear, 0.0)) >= 0.5
    return image, brain


@dataclass(frozen=True, eq=False)
class _Lesioned:
    image: np.ndarray  # float32 (z, y, x) with the lesion painted in
    lesion: np.ndarray  # bool: the voxels the lesion visibly changed
    brain: np.ndarray  # bool
    grid: sitk.Image  # where the arrays lie


def _lesion_case(seed: int, layout: str, index: int, skull: bool) -> _Lesioned:
    """A varied Colin27 with one simulated lesion of the kind ``KINDS`` gives case ``index``.

    The simulator works on normalised intensities (1 = the brain's 99th percentile) inside the brain;
    only the voxels it changed are written back, so the skull and the rest of the head stay as they were.
    """
    rng = np.random.default_rng([seed, _SALTS[layout], index])
    image, brain = _varied(rng, skull)
    array = sitk.GetArrayFromImage(image)
    scale = float(np.percentile(array[brain], 99))
    normalised = np.where(brain, np.clip(array / scale, 0, 1), 0).astype(np.float32)
    kind, polarity = KINDS[index % len(KINDS)]
    lesion = simulate_lesion(normalised, brain, kind, polarity, rng)
    changed = lesion.image != normalised
    array[changed] = lesion.image[changed] * scale
    if not skull:
        array[~brain] = 0
    return _Lesioned(image=array, lesion=lesion.mask, brain=brain, grid=image)


def _remapped(t1: np.ndarray, levels: TissueLevels, contrast: str) -> np.ndarray:
    """The T1 with its CSF, GM and WM levels moved to those of ``contrast`` (relative to T1's WM); 0 stays 0."""
    targets = [0.0, *(level * levels.wm for level in CONTRAST_LEVELS[contrast])]
    return np.interp(t1, [0.0, levels.csf, levels.gm, levels.wm], targets).astype(np.float32)


def _brats_labels(mask: np.ndarray) -> np.ndarray:
    """BraTS-like label values by depth into the lesion: 2 at the rim (oedema), 4 within, 1 in the deeper half."""
    depth = ndimage.distance_transform_edt(mask)
    return np.select([depth > depth.max() / 2, depth > 1, mask], [1, 4, 2], 0).astype(np.uint8)


# --- writing -------------------------------------------------------------------------------------------


def _on_grid(array: np.ndarray, grid: sitk.Image) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(grid)
    return image


def _write_nifti(array: np.ndarray, grid: sitk.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(_on_grid(array, grid), str(path))


def _segmentation(series: list[Path], mask: np.ndarray) -> hd.seg.Segmentation:
    """A BINARY SEG with one manual "Lesion" segment; frame k of ``mask`` lies on (and references) series[k]."""
    segment = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label="Lesion",
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Lesion,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
    )
    return hd.seg.Segmentation(
        source_images=[pydicom.dcmread(path, stop_before_pixels=True) for path in series],
        pixel_array=mask.astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[segment],
        series_instance_uid=hd.UID(),
        series_number=100,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="uad-node tests",
        manufacturer_model_name="eval_datasets",
        software_versions="1",
        device_serial_number="0",
        omit_empty_frames=True,
    )
