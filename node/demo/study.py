"""The demo's sample study: a real packaged brain with one simulated lesion, as a scanner would send it.

Two series in one study, MR Image Storage, one file per slice:

1. "T1 MPRAGE AX": an axial T1 (1.2 x 1.2 x 2.0 mm, 150 x 176 x 75) of Colin27 with skull (Debian
   ``mricron-data``) or, where that is not installed, the MNI152 template that nilearn ships, with a
   simulated lesion (``models.evaluation.lesions``) of known size and place: the ground truth the demo
   prints beside what the node found. Named and timed as an MPRAGE so the node selects it as T1.
2. "localizer": a 3-slice sagittal scout that the node's series selection skips, as it must.

The patient is fake ("DEMO^PATIENT", "UAD-DEMO"); every call makes new UIDs, so a second run is a new study.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import SimpleITK as sitk

from node.demo.series_writer import AXIAL, SAGITTAL, SliceGrid, centred_grid, resample, write_mr_series

if TYPE_CHECKING:
    from models.evaluation.lesions import SimulatedLesion

PATIENT_NAME = "DEMO^PATIENT"
PATIENT_ID = "UAD-DEMO"
T1_DESCRIPTION = "T1 MPRAGE AX"
LOCALIZER_DESCRIPTION = "localizer"
T1_SPACING = (1.2, 1.2, 2.0)
T1_SIZE = (150, 176, 75)
LOCALIZER_SPACING = (2.0, 2.0, 10.0)
LOCALIZER_SIZE = (96, 96, 3)
LESION_KIND = "tumour"
LESION_POLARITY = "dark"  # a CSF-like core in a rim of oedema: plainly visible on T1
SIMULATION_MM = 2.0  # the lesion simulator's sizes assume isotropic voxels of this size
MAX_CSF_FRACTION = 0.05  # of the lesion's voxels that were CSF-dark before: more, and it hides in a ventricle
LESION_TRIES = 20

STUDY_ATTRIBUTES: dict[str, Any] = {
    "PatientName": PATIENT_NAME,
    "PatientID": PATIENT_ID,
    "PatientSex": "O",
    "StudyDescription": "UAD DEMO BRAIN",
    "AccessionNumber": "UADDEMO1",
    "ReferringPhysicianName": "",
    "BodyPartExamined": "HEAD",
    "Manufacturer": "uad-node demo",
    "MagneticFieldStrength": 3.0,
}
# A 3 T MPRAGE's timing and sequence: classified T1 by its name and by its timing alike.
T1_ATTRIBUTES: dict[str, Any] = {
    "ImageType": ["ORIGINAL", "PRIMARY", "M", "ND"],
    "ProtocolName": "t1_mprage_ax",
    "ScanningSequence": ["GR", "IR"],
    "SequenceVariant": ["SK", "SP", "MP"],
    "MRAcquisitionType": "3D",
    "RepetitionTime": 2300.0,
    "EchoTime": 2.98,
    "InversionTime": 900.0,
    "FlipAngle": 9.0,
}
_LOCALIZER: dict[str, Any] = {
    "ImageType": ["ORIGINAL", "PRIMARY", "LOCALIZER"],
    "ProtocolName": "localizer",
    "ScanningSequence": "GR",
    "SequenceVariant": "SP",
    "MRAcquisitionType": "2D",
    "RepetitionTime": 8.6,
    "EchoTime": 4.0,
    "FlipAngle": 20.0,
}


@dataclass(frozen=True)
class SampleStudy:
    """The files written and the ground truth: which brain, and the lesion's kind, size and place."""

    study_uid: str
    t1_series_uid: str
    localizer_series_uid: str
    files: list[Path]  # every file of both series
    brain: str  # "Colin27" or "MNI152"
    lesion_kind: str  # as models.evaluation.lesions names it, e.g. "tumour"
    lesion_polarity: str  # "dark" (T1-hypointense) or "bright"
    lesion_volume_ml: float  # the voxels the lesion visibly changed, on the T1 series' grid
    lesion_centre_lps: tuple[float, float, float]  # their centroid, patient coordinates (LPS, mm)

    @property
    def lesion(self) -> str:
        """The lesion in words, for printing: "dark tumour, 23.4 mL at (12.0, -30.5, 18.2) mm (LPS)"."""
        x, y, z = self.lesion_centre_lps
        return (
            f"{self.lesion_polarity} {self.lesion_kind}, {self.lesion_volume_ml:.1f} mL "
            f"at ({x:.1f}, {y:.1f}, {z:.1f}) mm (LPS)"
        )


def build_sample_study(folder: Path, seed: int = 0) -> SampleStudy:
    """Write the two-series sample study under ``folder`` (``t1/`` and ``localizer/``); ``seed`` picks the lesion."""
    from pydicom.uid import generate_uid

    name, head, brain_mask = _brain()
    t1_grid = centred_grid(head, AXIAL, T1_SPACING, T1_SIZE)
    lesioned, lesion_mask = _with_lesion(head, brain_mask, t1_grid, np.random.default_rng(seed))
    volume_ml, centre = _measure(lesion_mask)
    study_uid, frame_of_reference = generate_uid(), generate_uid()
    t1_uid, localizer_uid = generate_uid(), generate_uid()
    t1_files = write_mr_series(
        lesioned,
        folder / "t1",
        description=T1_DESCRIPTION,
        study_uid=study_uid,
        series_uid=t1_uid,
        frame_of_reference_uid=frame_of_reference,
        attributes={**STUDY_ATTRIBUTES, **T1_ATTRIBUTES, "SeriesTime": "120500"},
    )
    localizer_grid = centred_grid(head, SAGITTAL, LOCALIZER_SPACING, LOCALIZER_SIZE)
    localizer_files = write_mr_series(
        resample(head, localizer_grid),
        folder / "localizer",
        description=LOCALIZER_DESCRIPTION,
        study_uid=study_uid,
        series_number=2,
        series_uid=localizer_uid,
        frame_of_reference_uid=frame_of_reference,
        attributes={**STUDY_ATTRIBUTES, **_LOCALIZER, "SeriesTime": "120100"},
    )
    return SampleStudy(
        study_uid=study_uid,
        t1_series_uid=t1_uid,
        localizer_series_uid=localizer_uid,
        files=[*t1_files, *localizer_files],
        brain=name,
        lesion_kind=LESION_KIND,
        lesion_polarity=LESION_POLARITY,
        lesion_volume_ml=volume_ml,
        lesion_centre_lps=centre,
    )


def _brain() -> tuple[str, sitk.Image, sitk.Image]:
    """Colin27 with skull (a head, as scanners send) when installed; else the MNI152 template (nilearn)."""
    from models.data import brains

    if brains.COLIN27_HEAD.is_file() and brains.COLIN27_BRAIN.is_file():
        return "Colin27", brains.colin27(skull=True), brains.colin27_brain_mask()
    return "MNI152", brains.mni152_t1(), brains.mni152_brain_mask()


def _with_lesion(
    head: sitk.Image, brain_mask: sitk.Image, grid: SliceGrid, rng: np.random.Generator
) -> tuple[sitk.Image, sitk.Image]:
    """``head`` on ``grid`` with one simulated lesion, and the lesion's mask on ``grid``.

    The simulator works on normalised intensities on a 2 mm grid (its sizes are in such voxels), so the
    lesion is made there, as a change of intensity, scaled back to the head's units, and added to the head
    on ``grid``. It may only lie where ``grid`` sees the brain, so that the whole lesion is in the series.
    """
    sim_grid = _isotropic_grid(head, SIMULATION_MM)
    head_sim = sitk.GetArrayFromImage(resample(head, sim_grid))
    nearest = (sitk.Transform(), sitk.sitkNearestNeighbor)
    in_view = sitk.Resample(grid.reference(sitk.sitkUInt8) + 1, sim_grid.reference(sitk.sitkUInt8), *nearest)
    mask_sim = sitk.Resample(brain_mask, sim_grid.reference(sitk.sitkUInt8), *nearest)
    brain = (sitk.GetArrayFromImage(mask_sim) > 0) & (sitk.GetArrayFromImage(in_view) > 0)
    # As the preprocessing normalises: the brain's 1st and 99th percentiles to 0 and 1.
    low, high = np.percentile(head_sim[brain], [1, 99])
    normalised = np.where(brain, np.clip((head_sim - low) / (high - low), 0, 1), 0).astype(np.float32)
    lesion = _clear_lesion(normalised, brain, rng)
    change = np.where(brain, (lesion.image - normalised) * (high - low), 0).astype(np.float32)

    change_image = _on(sim_grid, change)
    lesioned = resample(head, grid) + resample(change_image, grid)
    mask = resample(_on(sim_grid, lesion.mask.astype(np.float32)), grid) >= 0.5
    return lesioned, mask


def _clear_lesion(normalised: np.ndarray, brain: np.ndarray, rng: np.random.Generator) -> SimulatedLesion:
    """A lesion in brain tissue, away from the ventricles and sulci, where a reader sees it at once.

    The simulator places a tumour anywhere deep enough; one whose dark core falls into a ventricle
    hardly shows. Lesions are drawn from ``rng`` until one lies almost wholly in tissue that was not
    CSF-dark before (deterministic for a seed); after ``LESION_TRIES`` the clearest drawn is kept.
    """
    from models.evaluation.lesions import simulate_lesion, tissue_levels

    levels = tissue_levels(normalised, brain)
    csf_dark = normalised < (levels.csf + levels.gm) / 2
    best, best_fraction = None, 2.0
    for _ in range(LESION_TRIES):
        lesion = simulate_lesion(normalised, brain, LESION_KIND, LESION_POLARITY, rng)
        fraction = float(csf_dark[lesion.mask].mean()) if lesion.mask.any() else 1.0
        if fraction < best_fraction:
            best, best_fraction = lesion, fraction
        if fraction <= MAX_CSF_FRACTION:
            break
    assert best is not None
    return best


def _isotropic_grid(image: sitk.Image, spacing_mm: float) -> SliceGrid:
    """A grid over all of ``image`` with cubic voxels, in its own orientation."""
    extent = np.multiply(image.GetSize(), image.GetSpacing())
    size = tuple(int(n) for n in np.ceil(extent / spacing_mm))
    return centred_grid(image, image.GetDirection(), (spacing_mm,) * 3, size)  # type: ignore[arg-type]


def _on(grid: SliceGrid, array: np.ndarray) -> sitk.Image:
    """``array`` (z, y, x) as an image on ``grid``."""
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(grid.reference())
    return image


def _measure(mask: sitk.Image) -> tuple[float, tuple[float, float, float]]:
    """Volume (mL) and centroid (LPS mm) of a binary mask."""
    voxels = np.argwhere(sitk.GetArrayViewFromImage(mask) > 0)
    if not len(voxels):
        raise RuntimeError("the simulated lesion lies outside the T1 series")
    volume_ml = len(voxels) * float(np.prod(mask.GetSpacing())) / 1000.0
    centroid = voxels.mean(axis=0)[::-1]  # (z, y, x) -> (x, y, z) index
    x, y, z = mask.TransformContinuousIndexToPhysicalPoint([float(c) for c in centroid])
    return volume_ml, (float(x), float(y), float(z))
